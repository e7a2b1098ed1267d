"""Fused Triton kernels for the InfoNCE / CLIP / SigLIP / NT-Xent family.

The launchers ``infonce_fwd``, ``infonce_bwd``, ``siglip_fwd``, ``siglip_bwd`` implement exactly the
contract of ``contrastgen/reference/core.py`` (read it first).  Nothing of size N x M is ever stored.

Design
------
* Forward (``_infonce_fwd_kernel``): one program per block of BLOCK_N query rows loops over the key
  tiles (the M in-batch keys, then the K bank keys); each logits tile ``S = scale Q K^T`` is computed with
  an inner loop over D (masked, so any D works) and folded into an online log-sum-exp per row.
  Symmetric losses need the same per column, ``col_loss_j = lse_{i valid} s_ij - mean_{i pos} s_ij``, by one
  of two deterministic paths (no atomics, fixed summation order), picked per call by ``infonce_fwd_workspace``
  from the shapes alone (no host sync):
  - partials (small problems): the row kernel also reduces each tile over its rows and stores per-row-block
    column partials ``(R, 4, M)`` fp32, R = cdiv(N, BLOCK_N), = [max_i s_ij, sum_i exp(s_ij - max), sum of
    positive logits, #positives]; the small ``_infonce_col_reduce_kernel`` merges the R partials of each column
    (lse_j = max_r m_r + log sum_r exp(m_r - max) l_r).  Cost: 1 matmul-equivalent (G) for the forward, but
    16 R M bytes = 16 N M / BLOCK_N (N M / 4 bytes at BLOCK_N = 64: O(N M), 1 GiB at N = M = 65,536), so it is
    used only while that is at most max(COL_PARTIAL_BUDGET_BYTES = 32 MiB, COL_PARTIAL_INPUT_RATIO (= 1) x the
    bytes of q and k), i.e. extra memory O(N D + 1).
  - column pass (otherwise): the column quantities are the row quantities of the transposed problem
    (s^T = scale K Q^T; positives / validity are symmetric in (i, j): the diagonal, label equality
    ``q_labels[i] == k_labels[j]``, ``exclude_self``, ``in_batch_negatives``), so the same forward kernel runs a
    second time with the roles swapped: one program per block of keys loops over all query tiles with the
    online (max, sum exp), the positive-logit sum and npos per key, and writes col_loss / col_stats directly
    (supcon, no bank, no partials).  Cost: one more G (2G forward, 5G forward + backward instead of 4G); extra
    memory: none beyond the outputs (12 (N + M) bytes).  Both paths agree up to fp32 rounding.
  Why not atomics: a (max, sum) pair cannot be merged by one atomic (it needs a CAS loop or a known upper
  bound of the logits, which unnormalised features do not give), and float atomics are not reproducible.
* pml: the loss ``sum_p softplus(lse_i - s_ip)`` needs the final ``lse_i`` (over negatives), so the forward
  kernel runs a second loop over the in-batch key tiles that contain a positive (tiles without one are
  skipped before their matmul: for class labels only a few tiles per row block recompute).  The backward
  coefficient ``c_i = sum_p sigmoid(lse_i - s_ip)`` is computed the same way by ``_infonce_pml_coef_kernel``
  (a cheap extra pass over positive tiles) before the main backward kernels.
* Backward, default path (``_infonce_bwd_kernel`` with DK_ATOMIC=True): each program recomputes every
  logits tile of its row block once and produces dQ and dK from the same dS tile: 3 matmul-equivalents
  (4 with the forward).  dQ rows belong to the program (accumulated in an fp32 buffer, D chunk by D chunk,
  so D is unbounded); dK/dbank are accumulated with fp32 atomics.  dscale (and SigLIP's dbias) are in-tile
  reductions stored as one partial per program, summed by torch (no atomics).
* Backward, deterministic path (env ``CONTRASTGEN_DETERMINISTIC=1`` or ``deterministic=True``): the row
  kernel computes only dQ (DK_ATOMIC=False) and ``_infonce_bwd_dk_kernel`` (one program per key block,
  looping over the query blocks) computes dK/dbank: no atomics, bitwise reproducible, one extra
  recomputation of S (5 matmul-equivalents in all).  Autotuning is off in this mode (a timing-dependent
  tile choice would change the summation order).
* "-inf" is the finite ``NEG = -1e30``; every exp is masked with ``tl.where`` so that empty sets give
  lse = NEG, loss 0 and zero gradients, never NaN.
* Dtypes: fp32/bf16/fp16 inputs, fp32 accumulation.  fp32 tiles use ``input_precision="tf32x3"``
  (near-fp32 accuracy on tensor cores); 16-bit dS tiles are rounded to the input dtype for the
  gradient matmuls (as flash attention does).  2026-11-24: the Triton interpreter computes bf16
  ``tl.dot`` wrongly (upstream issue 11584), so under TRITON_INTERPRET=1 the constexpr UPCAST converts dot
  operands to fp32.
* Tiles: ``triton.autotune`` over a short list on GPU; the fixed default when CONTRASTGEN_AUTOTUNE=0, in
  deterministic mode, and always under the interpreter (64 x 64 tiles there, to keep CI fast).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

NEG = tl.constexpr(-1.0e30)  # the finite "-inf" of the contract (any value <= -1e30 means an empty set);
# a tl.constexpr global: plain module globals cannot be read inside @triton.jit (caught by the AOT test)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _deterministic(flag) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("CONTRASTGEN_DETERMINISTIC", "0") == "1"


def _autotuning(deterministic: bool) -> bool:
    return not (_interpreting() or deterministic or os.environ.get("CONTRASTGEN_AUTOTUNE", "1") == "0")


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:  # 2026-11-24: interpreter bf16 tl.dot bug (triton issue 11584): compute in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif FP32_DOT:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _qk_tile(q_ptr, k_ptr, rows, cols, n_rows, n_cols, D,
             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Q[rows] K[cols]^T (BLOCK_N, BLOCK_M) in fp32; rows/cols out of range read zeros."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    rmask = rows < n_rows
    cmask = cols < n_cols
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qa = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        ka = tl.load(k_ptr + cols[:, None] * D + offs_d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        acc = _dot(qa, tl.trans(ka), acc, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_D) x (BLOCK_D, BLOCK_M)
    return acc


@triton.jit
def _masks(rows, cols, N, n_cols, ql_ptr, kl_ptr, has_labels, exclude_self, in_batch_neg, is_bank):
    """(positive, valid) masks of a tile; out-of-range entries are neither.  Bank columns (is_bank):
    never positive, always valid.  All flags are runtime ints (uniform branches): one compiled variant."""
    rmask = rows < N
    cmask = cols < n_cols
    inb = rmask[:, None] & cmask[None, :]
    use_labels = (has_labels != 0) & (is_bank == 0)
    ql = tl.load(ql_ptr + rows, mask=rmask & use_labels, other=0)
    kl = tl.load(kl_ptr + cols, mask=cmask & use_labels, other=1)
    same = rows[:, None] == cols[None, :]
    pos = tl.where(has_labels != 0, ql[:, None] == kl[None, :], same)
    valid = inb & ((exclude_self == 0) | (~same))
    pos = pos & valid
    valid = valid & (pos | (in_batch_neg != 0))
    bank = inb & (is_bank != 0)
    pos = pos & (~bank)
    valid = valid | bank
    return pos, valid


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _accumulate_grads(ds, q_ptr, k_ptr, dq_ptr, dk_ptr, rows, cols, N, n_cols, D,
                      DO_DQ: tl.constexpr, DO_DK: tl.constexpr, DK_ATOMIC: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """dq[rows] += ds @ K[cols];  dk[cols] += ds^T @ Q[rows]   (fp32 buffers, D chunk by D chunk).

    ``ds`` (BLOCK_N, BLOCK_M) already includes the scale factor.  dq rows (and dk columns when not atomic)
    belong to the calling program, so their read-modify-write needs no synchronisation."""
    rmask = rows < N
    cmask = cols < n_cols
    ds_lo = ds.to(q_ptr.dtype.element_ty)
    # two separate D loops (dq, then dk): fewer live tiles than one fused loop, which spilled registers
    if DO_DQ:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            qmask = rmask[:, None] & dmask[None, :]
            kmask = cmask[:, None] & dmask[None, :]
            kc = tl.load(k_ptr + cols[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
            dq_ptrs = dq_ptr + rows[:, None] * D + offs_d[None, :]
            dq = tl.load(dq_ptrs, mask=qmask, other=0.0)
            dq = _dot(ds_lo, kc, dq, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_M) x (BLOCK_M, BLOCK_D)
            tl.store(dq_ptrs, dq, mask=qmask)
    if DO_DK:
        ds_t = tl.trans(ds_lo)  # (BLOCK_M, BLOCK_N)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            qmask = rmask[:, None] & dmask[None, :]
            kmask = cmask[:, None] & dmask[None, :]
            qc = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            dk_ptrs = dk_ptr + cols[:, None] * D + offs_d[None, :]
            if DK_ATOMIC:
                dk = _dot(ds_t, qc, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_D)
                tl.atomic_add(dk_ptrs, dk, mask=kmask)
            else:
                dk = tl.load(dk_ptrs, mask=kmask, other=0.0)
                dk = _dot(ds_t, qc, dk, FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_D)
                tl.store(dk_ptrs, dk, mask=kmask)


# ----------------------------------------------------------------------------------------------- InfoNCE
@triton.jit
def _infonce_fwd_kernel(q_ptr, k_ptr, bank_ptr, scale_ptr, ql_ptr, kl_ptr,
                        row_loss_ptr, row_stats_ptr, col_part_ptr,
                        N, M, K, D, has_labels, exclude_self, in_batch_neg, pml, symmetric,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Row losses/stats of one block of BLOCK_N queries; column partials for symmetric.

    s_ij = scale q_i.k_j over in-batch keys j < M then bank keys.
    supcon: lse_i = lse_{j valid} s_ij, loss_i = lse_i - (1/npos_i) sum_{p pos} s_ip   (0 if npos_i = 0)
    pml:    lse_i = lse_{j valid, not pos} s_ij, loss_i = sum_{p pos} softplus(lse_i - s_ip)
    symmetric: per column j the partial (max_i, sum_i exp(s_ij - max), sum_pos s_ij, npos) over this block.
    Also the column pass of symmetric losses: launched on (k, q, k_labels, q_labels), K = 0, pml = symmetric = 0,
    its row losses / stats are col_loss / col_stats (see the module docstring).
    Gradient: see _infonce_bwd_kernel."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    scale = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full((BLOCK_N,), NEG, tl.float32)
    l_i = tl.zeros((BLOCK_N,), tl.float32)
    possum = tl.zeros((BLOCK_N,), tl.float32)
    npos = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        s = scale * _qk_tile(q_ptr, k_ptr, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        pos, valid = _masks(rows, cols, N, M, ql_ptr, kl_ptr, has_labels, exclude_self, in_batch_neg, False)
        lmask = valid & ((pml == 0) | (~pos))
        m_new = tl.maximum(m_i, tl.max(tl.where(lmask, s, NEG), 1))
        p = tl.exp(tl.where(lmask, s - m_new[:, None], NEG))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
        npos += tl.sum(pos.to(tl.float32), 1)
        possum += tl.sum(tl.where(pos, s, 0.0), 1)
        if symmetric != 0:
            cm = tl.max(tl.where(valid, s, NEG), 0)
            cl = tl.sum(tl.exp(tl.where(valid, s - cm[None, :], NEG)), 0)
            cps = tl.sum(tl.where(pos, s, 0.0), 0)
            cnp = tl.sum(pos.to(tl.float32), 0)
            part = col_part_ptr + pid.to(tl.int64) * 4 * M + cols
            cmask = cols < M
            tl.store(part, cm, mask=cmask)
            tl.store(part + M, cl, mask=cmask)
            tl.store(part + 2 * M, cps, mask=cmask)
            tl.store(part + 3 * M, cnp, mask=cmask)
    for c0 in range(0, K, BLOCK_M):  # bank columns: always valid, never positive
        cols = c0 + tl.arange(0, BLOCK_M)
        s = scale * _qk_tile(q_ptr, bank_ptr, rows, cols, N, K, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        valid = rmask[:, None] & (cols < K)[None, :]
        m_new = tl.maximum(m_i, tl.max(tl.where(valid, s, NEG), 1))
        p = tl.exp(tl.where(valid, s - m_new[:, None], NEG))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), NEG)
    if pml != 0:
        loss = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, M, BLOCK_M):
            cols = c0 + tl.arange(0, BLOCK_M)
            pos, valid = _masks(rows, cols, N, M, ql_ptr, kl_ptr, has_labels, exclude_self, in_batch_neg, False)
            if tl.sum(pos.to(tl.int32)) > 0:  # skip tiles without a positive before their matmul
                s = scale * _qk_tile(q_ptr, k_ptr, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
                loss += tl.sum(tl.where(pos, _softplus(lse[:, None] - s), 0.0), 1)
    else:
        loss = tl.where(npos > 0, lse - possum / tl.maximum(npos, 1.0), 0.0)
    tl.store(row_loss_ptr + rows, loss, mask=rmask)
    tl.store(row_stats_ptr + 2 * rows, lse, mask=rmask)
    tl.store(row_stats_ptr + 2 * rows + 1, npos, mask=rmask)


@triton.jit
def _infonce_col_reduce_kernel(col_part_ptr, col_loss_ptr, col_stats_ptr, M, R, BLOCK_C: tl.constexpr):
    """Merge the R row-block partials of each column: lse_j = max + log(sum_r exp(max_r - max) l_r);
    col_loss_j = lse_j - possum_j / npos_j (0 if npos_j = 0).  Fixed order: deterministic."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < M
    m = tl.full((BLOCK_C,), NEG, tl.float32)
    l = tl.zeros((BLOCK_C,), tl.float32)
    ps = tl.zeros((BLOCK_C,), tl.float32)
    npos = tl.zeros((BLOCK_C,), tl.float32)
    for r in range(0, R):
        part = col_part_ptr + r * 4 * M + cols
        pm = tl.load(part, mask=cmask, other=NEG)
        pl = tl.load(part + M, mask=cmask, other=0.0)
        m_new = tl.maximum(m, pm)
        l = l * tl.exp(m - m_new) + pl * tl.exp(pm - m_new)
        m = m_new
        ps += tl.load(part + 2 * M, mask=cmask, other=0.0)
        npos += tl.load(part + 3 * M, mask=cmask, other=0.0)
    lse = tl.where(l > 0, m + tl.log(tl.maximum(l, 1e-30)), NEG)
    loss = tl.where(npos > 0, lse - ps / tl.maximum(npos, 1.0), 0.0)
    tl.store(col_loss_ptr + cols, loss, mask=cmask)
    tl.store(col_stats_ptr + 2 * cols, lse, mask=cmask)
    tl.store(col_stats_ptr + 2 * cols + 1, npos, mask=cmask)


@triton.jit
def _infonce_pml_coef_kernel(q_ptr, k_ptr, scale_ptr, ql_ptr, kl_ptr, row_stats_ptr, coef_ptr,
                             N, M, D, has_labels, exclude_self, in_batch_neg,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """pml backward coefficient c_i = sum_{p pos} sigmoid(lse_i - s_ip), over the tiles holding a positive."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(row_stats_ptr + 2 * rows, mask=rmask, other=NEG)
    c = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        pos, valid = _masks(rows, cols, N, M, ql_ptr, kl_ptr, has_labels, exclude_self, in_batch_neg, False)
        if tl.sum(pos.to(tl.int32)) > 0:
            s = scale * _qk_tile(q_ptr, k_ptr, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
            c += tl.sum(tl.where(pos, tl.sigmoid(tl.where(pos, lse[:, None] - s, 0.0)), 0.0), 1)
    tl.store(coef_ptr + rows, c, mask=rmask)


@triton.jit
def _infonce_ds_tile(q_ptr, keys_ptr, scale, rows, cols, N, n_cols, D, ql_ptr, kl_ptr,
                     has_labels, exclude_self, in_batch_neg, row_stats_ptr, col_stats_ptr, g_row_ptr, g_col_ptr,
                     coef_ptr, IS_BANK, pml, symmetric,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """(dS, Q K^T) of one tile; dS = dLoss/ds_ij as in the contract (without the scale factor)."""
    rmask = rows < N
    qk = _qk_tile(q_ptr, keys_ptr, rows, cols, N, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
    s = scale * qk
    pos, valid = _masks(rows, cols, N, n_cols, ql_ptr, kl_ptr, has_labels, exclude_self, in_batch_neg, IS_BANK)
    lse = tl.load(row_stats_ptr + 2 * rows, mask=rmask, other=0.0)
    npos = tl.load(row_stats_ptr + 2 * rows + 1, mask=rmask, other=0.0)
    g = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
    if pml != 0:
        c = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        p_neg = tl.exp(tl.where(valid & (~pos), s - lse[:, None], NEG))
        r = tl.where(pos, tl.sigmoid(tl.where(pos, lse[:, None] - s, 0.0)), 0.0)
        ds = g[:, None] * (c[:, None] * p_neg - r)
    else:
        p = tl.exp(tl.where(valid, s - lse[:, None], NEG))
        ds = g[:, None] * (p - pos.to(tl.float32) / tl.maximum(npos, 1.0)[:, None])
        ds = tl.where((npos > 0)[:, None], ds, 0.0)
    if symmetric != 0:
        cmask = cols < n_cols
        lse_c = tl.load(col_stats_ptr + 2 * cols, mask=cmask, other=0.0)
        npos_c = tl.load(col_stats_ptr + 2 * cols + 1, mask=cmask, other=0.0)
        g_c = tl.load(g_col_ptr + cols, mask=cmask, other=0.0)
        pc = tl.exp(tl.where(valid, s - lse_c[None, :], NEG))
        dsc = g_c[None, :] * (pc - pos.to(tl.float32) / tl.maximum(npos_c, 1.0)[None, :])
        ds += tl.where((npos_c > 0)[None, :], dsc, 0.0)
    return ds, qk


@triton.jit
def _infonce_bwd_kernel(q_ptr, k_ptr, bank_ptr, scale_ptr, ql_ptr, kl_ptr, row_stats_ptr, col_stats_ptr,
                        g_row_ptr, g_col_ptr, coef_ptr, dq_ptr, dk_ptr, dbank_ptr, dscale_part_ptr,
                        N, M, K, D, has_labels, exclude_self, in_batch_neg, pml, symmetric,
                        DK_ATOMIC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Backward over one block of query rows (recomputes each logits tile once).

    supcon: dS_ij = g_i (exp(s_ij - lse_i)[valid] - [pos]/npos_i)              (+ the same per column, symmetric)
    pml:    dS_ip = -g_i sigmoid(lse_i - s_ip) (pos);  dS_in = g_i c_i exp(s_in - lse_i) (valid negatives)
    dq = scale dS [K; bank];  dk = scale dS^T Q (atomics if DK_ATOMIC, else _infonce_bwd_dk_kernel);
    dscale = sum_ij dS_ij q_i.k_j  (one partial per program)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    dscale = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        ds, qk = _infonce_ds_tile(q_ptr, k_ptr, scale, rows, cols, N, M, D, ql_ptr, kl_ptr, has_labels,
                                  exclude_self, in_batch_neg, row_stats_ptr, col_stats_ptr, g_row_ptr, g_col_ptr,
                                  coef_ptr, False, pml, symmetric, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        dscale += tl.sum(ds * qk, 1)
        _accumulate_grads(ds * scale, q_ptr, k_ptr, dq_ptr, dk_ptr, rows, cols, N, M, D, True, DK_ATOMIC, True,
                          BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
    for c0 in range(0, K, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        ds, qk = _infonce_ds_tile(q_ptr, bank_ptr, scale, rows, cols, N, K, D, ql_ptr, kl_ptr, has_labels,
                                  exclude_self, in_batch_neg, row_stats_ptr, col_stats_ptr, g_row_ptr, g_col_ptr,
                                  coef_ptr, True, pml, 0, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        dscale += tl.sum(ds * qk, 1)
        _accumulate_grads(ds * scale, q_ptr, bank_ptr, dq_ptr, dbank_ptr, rows, cols, N, K, D, True, DK_ATOMIC,
                          True, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
    tl.store(dscale_part_ptr + pid, tl.sum(dscale, 0))


@triton.jit
def _infonce_bwd_dk_kernel(q_ptr, keys_ptr, scale_ptr, ql_ptr, kl_ptr, row_stats_ptr, col_stats_ptr,
                           g_row_ptr, g_col_ptr, coef_ptr, dkeys_ptr,
                           N, n_cols, D, has_labels, exclude_self, in_batch_neg, is_bank, pml, symmetric,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Deterministic dK (or dbank): one program per block of keys loops over all query blocks;
    dk_j = scale sum_i dS_ij q_i with dS as in _infonce_bwd_kernel.  No atomics."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        ds, qk = _infonce_ds_tile(q_ptr, keys_ptr, scale, rows, cols, N, n_cols, D, ql_ptr, kl_ptr, has_labels,
                                  exclude_self, in_batch_neg, row_stats_ptr, col_stats_ptr, g_row_ptr, g_col_ptr,
                                  coef_ptr, is_bank, pml, symmetric, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        _accumulate_grads(ds * scale, q_ptr, keys_ptr, dkeys_ptr, dkeys_ptr, rows, cols, N, n_cols, D, False, True,
                          False, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)


# ----------------------------------------------------------------------------------------------- SigLIP
@triton.jit
def _siglip_ds_tile(q_ptr, k_ptr, scale, bias, g_row_ptr, rows, cols, N, M, D,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """(dZ, Q K^T) of one tile: dZ_ij = -g_i y_ij sigmoid(-y_ij z_ij), z = scale q.k + bias."""
    qk = _qk_tile(q_ptr, k_ptr, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
    z = scale * qk + bias
    y = tl.where(rows[:, None] == cols[None, :], 1.0, -1.0)
    inb = (rows < N)[:, None] & (cols < M)[None, :]
    g = tl.load(g_row_ptr + rows, mask=rows < N, other=0.0)
    dz = tl.where(inb, -g[:, None] * y * tl.sigmoid(-y * z), 0.0)
    return dz, qk


@triton.jit
def _siglip_fwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, row_loss_ptr, N, M, D,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """row_loss_i = -sum_j log sigmoid(y_ij z_ij), z_ij = scale q_i.k_j + bias, y_ii = 1 else -1.
    -log sigmoid(x) = softplus(-x).  Gradient: see _siglip_bwd_kernel."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        z = scale * _qk_tile(q_ptr, k_ptr, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST) + bias
        y = tl.where(rows[:, None] == cols[None, :], 1.0, -1.0)
        inb = (rows < N)[:, None] & (cols < M)[None, :]
        loss += tl.sum(tl.where(inb, _softplus(-y * z), 0.0), 1)
    tl.store(row_loss_ptr + rows, loss, mask=rows < N)


@triton.jit
def _siglip_bwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, g_row_ptr, dq_ptr, dk_ptr, dscale_part_ptr,
                       dbias_part_ptr, N, M, D, DK_ATOMIC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """dZ_ij = -g_i y_ij sigmoid(-y_ij z_ij);  dq = scale dZ K;  dk = scale dZ^T Q (atomics if DK_ATOMIC);
    dscale = sum dZ_ij q_i.k_j;  dbias = sum dZ_ij (one partial per program).  3 matmul-equivalents."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    dscale = tl.zeros((BLOCK_N,), tl.float32)
    dbias = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        dz, qk = _siglip_ds_tile(q_ptr, k_ptr, scale, bias, g_row_ptr, rows, cols, N, M, D,
                                 BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        dscale += tl.sum(dz * qk, 1)
        dbias += tl.sum(dz, 1)
        _accumulate_grads(dz * scale, q_ptr, k_ptr, dq_ptr, dk_ptr, rows, cols, N, M, D, True, DK_ATOMIC, True,
                          BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
    tl.store(dscale_part_ptr + pid, tl.sum(dscale, 0))
    tl.store(dbias_part_ptr + pid, tl.sum(dbias, 0))


@triton.jit
def _siglip_bwd_dk_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, g_row_ptr, dk_ptr, N, M, D,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Deterministic dk_j = scale sum_i dZ_ij q_i: one program per key block, no atomics."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        dz, qk = _siglip_ds_tile(q_ptr, k_ptr, scale, bias, g_row_ptr, rows, cols, N, M, D,
                                 BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)
        _accumulate_grads(dz * scale, q_ptr, k_ptr, dk_ptr, dk_ptr, rows, cols, N, M, D, False, True, False,
                          BLOCK_N, BLOCK_M, BLOCK_D, FP32_DOT, UPCAST)


# ----------------------------------------------------------------------------------------------- configs
# (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) per input precision ("fp32" uses 3-pass tf32 dots, which
# need more registers); the first entry is the fixed default on GPU.  Every entry compiles for sm_80 and
# sm_90a without register spills (tests/test_aot_compile.py).
FWD_CONFIGS = {"16bit": [(64, 64, 64, 8, 3)], "fp32": [(64, 32, 32, 4, 3)]}
BWD_CONFIGS = {"16bit": [(32, 64, 64, 8, 2)], "fp32": [(32, 32, 32, 4, 2)]}
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "16bit", torch.float16: "16bit"}
COL_REDUCE_BLOCK = 256
INTERPRET_TILE = (64, 64, 64)  # few, large tiles keep the interpreter fast
_MIN_BLOCK_N = min(c[0] for cfgs in (*FWD_CONFIGS.values(), *BWD_CONFIGS.values(), [INTERPRET_TILE]) for c in cfgs)
# the forward kernel is only ever launched with a FWD_CONFIGS (or the interpreter) tile: sizes its column partials
_MIN_FWD_BLOCK_N = min(c[0] for cfgs in (*FWD_CONFIGS.values(), [INTERPRET_TILE]) for c in cfgs)
# Symmetric forward: the column partial buffer (see the module docstring) is used only while its size stays within
# max(COL_PARTIAL_BUDGET_BYTES, COL_PARTIAL_INPUT_RATIO x bytes of q and k); beyond that the column pass runs
# (one more matmul-equivalent, no workspace).  Set both to 0 to force the column pass (tests do).
COL_PARTIAL_BUDGET_BYTES = 32 * 2 ** 20
COL_PARTIAL_INPUT_RATIO = 1.0


def _tconfigs(cfgs):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bm, bd, w, s in cfgs]


_KEY = ["N", "M", "D"]
_tuned = {}
for _p in ("16bit", "fp32"):
    _tuned.update({
        ("infonce_fwd", _p): triton.autotune(_tconfigs(FWD_CONFIGS[_p]), key=["N", "M", "K", "D"])(_infonce_fwd_kernel),
        ("infonce_bwd", _p): triton.autotune(_tconfigs(BWD_CONFIGS[_p]), key=["N", "M", "K", "D"],
                                             reset_to_zero=["dq_ptr", "dk_ptr", "dbank_ptr"])(_infonce_bwd_kernel),
        ("siglip_fwd", _p): triton.autotune(_tconfigs(FWD_CONFIGS[_p]), key=_KEY)(_siglip_fwd_kernel),
        ("siglip_bwd", _p): triton.autotune(_tconfigs(BWD_CONFIGS[_p]), key=_KEY,
                                            reset_to_zero=["dq_ptr", "dk_ptr"])(_siglip_bwd_kernel),
    })
_plain = {"infonce_fwd": (_infonce_fwd_kernel, FWD_CONFIGS), "infonce_bwd": (_infonce_bwd_kernel, BWD_CONFIGS),
          "infonce_pml_coef": (_infonce_pml_coef_kernel, BWD_CONFIGS), "siglip_fwd": (_siglip_fwd_kernel, FWD_CONFIGS),
          "siglip_bwd": (_siglip_bwd_kernel, BWD_CONFIGS)}


def _block_d(D: int, bd: int) -> int:
    return max(16, min(bd, triton.next_power_of_2(D)))


def _launch(name, n_rows, D, deterministic, args, **const):
    """Launch kernel ``name`` over row blocks: autotuned, or the fixed default (interpreter/deterministic)."""
    prec = "fp32" if const["FP32_DOT"] else "16bit"
    if _autotuning(deterministic) and (name, prec) in _tuned:
        tuner = _tuned[(name, prec)]
        tuner[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),)](*args, **const)
        return tuner.best_config.kwargs["BLOCK_N"]
    kernel, cfgs = _plain[name]
    if _interpreting():
        bn, bm, bd, w, s = (*INTERPRET_TILE, 4, 1)
        bd = _block_d(D, bd)
    else:
        bn, bm, bd, w, s = cfgs[prec][0]
    kernel[(triton.cdiv(n_rows, bn),)](*args, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=s, **const)
    return bn


def _dk_tiles(D, flags):
    if _interpreting():
        return INTERPRET_TILE[0], INTERPRET_TILE[1], _block_d(D, INTERPRET_TILE[2]), 4, 1
    return BWD_CONFIGS["fp32" if flags["FP32_DOT"] else "16bit"][0]


def _dtype_flags(t: torch.Tensor):
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {t.dtype}")
    return {"FP32_DOT": t.dtype == torch.float32, "UPCAST": _interpreting()}


def _check_int32_offsets(d, *rows):
    """Tile offsets are int32 (64-bit offsets per element doubled the register use and spilled)."""
    if max(rows) * d >= 2 ** 31:
        raise ValueError(f"the Triton kernels use 32-bit offsets: rows x D must stay below 2**31, got {max(rows)} x {d}")


def _kernel_input(t):
    """Contiguous kernel input; float64 (gradcheck, CPU debugging) is computed in float32 -- the
    outputs are float32 by contract, and the gradients are cast back to float64."""
    if t is None:
        return None
    if t.dtype == torch.float64:
        t = t.float()
    return t.contiguous()


def _scalar(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(1).to(device=like.device, dtype=torch.float32).contiguous()


def _labels(q_labels, k_labels, q):
    if q_labels is None:
        dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
        return dummy, dummy, 0
    return q_labels.to(torch.int64).contiguous(), k_labels.to(torch.int64).contiguous(), 1


# ----------------------------------------------------------------------------------------------- launchers
def infonce_fwd_workspace(n, m, d, itemsize, symmetric):
    """(path, bytes): how ``infonce_fwd`` computes the column losses of an (n, d) x (m, d) call with inputs of
    ``itemsize`` bytes per element, and the workspace it allocates beyond its outputs (12 (n + m) bytes).

    path "rows": no column losses (not symmetric), no workspace.
    path "partials": the (cdiv(n, BLOCK_N), 4, m) fp32 column partial buffer, 16 cdiv(n, BLOCK_N) m bytes
    (BLOCK_N >= 64: about n m / 4 bytes), chosen while it is at most
    max(COL_PARTIAL_BUDGET_BYTES, COL_PARTIAL_INPUT_RATIO (n + m) d itemsize).
    path "column_pass": the forward kernel once more with the roles of q and k swapped, no workspace."""
    if not symmetric:
        return "rows", 0
    part = 16 * triton.cdiv(n, _MIN_FWD_BLOCK_N) * m
    budget = max(COL_PARTIAL_BUDGET_BYTES, COL_PARTIAL_INPUT_RATIO * (n + m) * d * itemsize)
    return ("partials", part) if part <= budget else ("column_pass", 0)


def _infonce_inputs(q, k, bank, scale, q_labels, k_labels):
    """Kernel-ready inputs shared by the InfoNCE forward and backward launchers:
    (q, k, bank or q as a dummy pointer, scale, q_labels, k_labels, has_labels, dtype flags)."""
    q, k = _kernel_input(q), _kernel_input(k)
    kb = 0 if bank is None else bank.shape[0]
    bank_t = _kernel_input(bank) if kb else q
    _check_int32_offsets(q.shape[1], q.shape[0], k.shape[0], kb)
    ql, kl, has_labels = _labels(q_labels, k_labels, q)
    return q, k, bank_t, _scalar(scale, q), ql, kl, has_labels, _dtype_flags(q)


def infonce_fwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric):
    """Fused InfoNCE forward: (row_loss (N,), col_loss (M,) or (0,), row_stats (N, 2), col_stats (M, 2) or (0, 2)).

    Symmetric: the column statistics come from the partial buffer or from the column pass, whichever
    ``infonce_fwd_workspace`` picks for this shape (both deterministic, equal up to fp32 rounding)."""
    q, k, bank_t, sc, ql, kl, has_labels, flags = _infonce_inputs(q, k, bank, scale, q_labels, k_labels)
    n, d = q.shape
    m = k.shape[0]
    kb = 0 if bank is None else bank.shape[0]
    dev = q.device
    ex, ibn = int(bool(exclude_self)), int(bool(in_batch_negatives))
    path, _ = infonce_fwd_workspace(n, m, d, q.element_size(), symmetric)
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    row_stats = torch.empty(n, 2, dtype=torch.float32, device=dev)
    if path == "partials":
        part = torch.empty(triton.cdiv(n, _MIN_FWD_BLOCK_N), 4, m, dtype=torch.float32, device=dev)  # rows read back are written
    else:
        part = row_loss  # unused
    block_n = _launch("infonce_fwd", n, d, None,
            (q, k, bank_t, sc, ql, kl, row_loss, row_stats, part, n, m, kb, d, has_labels,
             ex, ibn, int(bool(pml)), int(path == "partials")),
            **flags)
    if path == "rows":
        return row_loss, row_loss.new_zeros(0), row_stats, row_stats.new_zeros(0, 2)
    col_loss = torch.empty(m, dtype=torch.float32, device=dev)
    col_stats = torch.empty(m, 2, dtype=torch.float32, device=dev)
    if path == "partials":
        # only the rows written by the launched tile size (autotuning may have written more with other tiles)
        _infonce_col_reduce_kernel[(triton.cdiv(m, COL_REDUCE_BLOCK),)](
            part, col_loss, col_stats, m, triton.cdiv(n, block_n), BLOCK_C=COL_REDUCE_BLOCK)
    else:
        # column pass: col_loss_j / col_stats_j of the contract are the row loss / stats of the transposed problem
        # (keys as queries, q_labels and k_labels swapped; the masks are symmetric in (i, j)), supcon, no bank
        _launch("infonce_fwd", m, d, None,
                (k, q, k, sc, kl, ql, col_loss, col_stats, col_loss, m, n, 0, d, has_labels, ex, ibn, 0, 0),
                **flags)
    return row_loss, col_loss, row_stats, col_stats


def infonce_bwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric,
                row_stats, col_stats, g_row, g_col, deterministic=None):
    """Fused InfoNCE backward: (dq, dk, dbank or None, dscale 0-d float32)."""
    det = _deterministic(deterministic)
    dtypes = (q.dtype, k.dtype, None if bank is None else bank.dtype)
    q, k, bank_t, sc, ql, kl, has_labels, flags = _infonce_inputs(q, k, bank, scale, q_labels, k_labels)
    n, d = q.shape
    m = k.shape[0]
    kb = 0 if bank is None else bank.shape[0]
    dev = q.device
    row_stats = row_stats.to(torch.float32).contiguous()
    g_row = g_row.to(torch.float32).contiguous()
    if symmetric:
        col_stats = col_stats.to(torch.float32).contiguous()
        g_col = g_col.to(torch.float32).contiguous()
    else:
        col_stats, g_col = row_stats, g_row  # unused
    ex, ibn = int(bool(exclude_self)), int(bool(in_batch_negatives))
    if pml:
        coef = torch.empty(n, dtype=torch.float32, device=dev)
        _launch("infonce_pml_coef", n, d, det, (q, k, sc, ql, kl, row_stats, coef, n, m, d, has_labels, ex, ibn),
                **flags)
    else:
        coef = g_row  # unused
    dq = torch.zeros(n, d, dtype=torch.float32, device=dev)
    dk = torch.zeros(m, d, dtype=torch.float32, device=dev)
    dbank = torch.zeros(max(kb, 1), d, dtype=torch.float32, device=dev)
    dscale_part = torch.zeros(triton.cdiv(n, _MIN_BLOCK_N), dtype=torch.float32, device=dev)
    _launch("infonce_bwd", n, d, det,
            (q, k, bank_t, sc, ql, kl, row_stats, col_stats, g_row, g_col, coef, dq, dk, dbank, dscale_part,
             n, m, kb, d, has_labels, ex, ibn, int(bool(pml)), int(bool(symmetric))),
            DK_ATOMIC=not det, **flags)
    if det:
        bn, bm, bd, w, s = _dk_tiles(d, flags)
        for keys, dkeys, ncols, is_bank in ((k, dk, m, False), (bank_t, dbank, kb, True)):
            if ncols == 0:
                continue
            _infonce_bwd_dk_kernel[(triton.cdiv(ncols, bm),)](
                q, keys, sc, ql, kl, row_stats, col_stats, g_row, g_col, coef, dkeys, n, ncols, d, has_labels, ex,
                ibn, int(is_bank), int(bool(pml)), int(bool(symmetric) and not is_bank),
                BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=s, **flags)
    dbank_out = dbank[:kb].to(dtypes[2]) if kb else None
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dbank_out, dscale_part.sum()


def siglip_fwd(q, k, scale, bias):
    """Fused SigLIP forward: row_loss (N,) float32 (the loss is row_loss.sum() / N)."""
    q, k = _kernel_input(q), _kernel_input(k)
    n, d = q.shape
    m = k.shape[0]
    _check_int32_offsets(d, n, m)
    row_loss = torch.empty(n, dtype=torch.float32, device=q.device)
    _launch("siglip_fwd", n, d, None, (q, k, _scalar(scale, q), _scalar(bias, q), row_loss, n, m, d),
            **_dtype_flags(q))
    return row_loss


def siglip_bwd(q, k, scale, bias, g_row, deterministic=None):
    """Fused SigLIP backward: (dq, dk, dscale 0-d float32, dbias 0-d float32)."""
    det = _deterministic(deterministic)
    dtypes = (q.dtype, k.dtype)
    q, k = _kernel_input(q), _kernel_input(k)
    n, d = q.shape
    m = k.shape[0]
    _check_int32_offsets(d, n, m)
    flags = _dtype_flags(q)
    sc, b = _scalar(scale, q), _scalar(bias, q)
    g_row = g_row.to(torch.float32).contiguous()
    dq = torch.zeros(n, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(m, d, dtype=torch.float32, device=q.device)
    r = triton.cdiv(n, _MIN_BLOCK_N)
    dscale_part = torch.zeros(r, dtype=torch.float32, device=q.device)
    dbias_part = torch.zeros(r, dtype=torch.float32, device=q.device)
    _launch("siglip_bwd", n, d, det, (q, k, sc, b, g_row, dq, dk, dscale_part, dbias_part, n, m, d),
            DK_ATOMIC=not det, **flags)
    if det:
        bn, bm, bd, w, s = _dk_tiles(d, flags)
        _siglip_bwd_dk_kernel[(triton.cdiv(m, bm),)](q, k, sc, b, g_row, dk, n, m, d, BLOCK_N=bn, BLOCK_M=bm,
                                                     BLOCK_D=bd, num_warps=w, num_stages=s, **flags)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dscale_part.sum(), dbias_part.sum()


# ----------------------------------------------------------------------------------------------- AOT list
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MOD = __name__


def _sig(kernel_args, types, constexprs):
    return {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in kernel_args}


def _aot_configs():
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        fp32 = dt == "fp32"
        ptr_in = {p: f"*{dt}" for p in ("q_ptr", "k_ptr", "bank_ptr", "keys_ptr")}
        f32p = {p: "*fp32" for p in ("scale_ptr", "bias_ptr", "row_loss_ptr", "row_stats_ptr", "col_part_ptr",
                                     "col_stats_ptr", "g_row_ptr", "g_col_ptr", "coef_ptr", "dq_ptr", "dk_ptr",
                                     "dbank_ptr", "dkeys_ptr", "dscale_part_ptr", "dbias_part_ptr")}
        types = {**ptr_in, **f32p, "ql_ptr": "*i64", "kl_ptr": "*i64"}
        base = {"FP32_DOT": fp32, "UPCAST": False}
        jobs = []
        prec = "fp32" if fp32 else "16bit"
        for bn, bm, bd, w, s in FWD_CONFIGS[prec]:
            tile = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}
            jobs.append((_infonce_fwd_kernel, tile, w, s))
            jobs.append((_siglip_fwd_kernel, tile, w, s))
        for i, (bn, bm, bd, w, s) in enumerate(BWD_CONFIGS[prec]):
            tile = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}
            for atomic in ((True, False) if i == 0 else (True,)):  # deterministic mode uses the default tile
                jobs.append((_infonce_bwd_kernel, {"DK_ATOMIC": atomic, **tile}, w, s))
            if i == 0:
                jobs.append((_infonce_bwd_dk_kernel, tile, w, s))
                jobs.append((_infonce_pml_coef_kernel, tile, w, s))
            for atomic in ((True, False) if i == 0 else (True,)):
                jobs.append((_siglip_bwd_kernel, {"DK_ATOMIC": atomic, **tile}, w, s))
            if i == 0:
                jobs.append((_siglip_bwd_dk_kernel, tile, w, s))
        for fn, cx, w, s in jobs:
            fn_name = fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__
            args = list(fn.arg_names)
            cx = {**base, **cx}
            out.append(AotConfig(f"{_MOD}:{fn_name}", _sig(args, types, cx), cx, w, s, divisible_by_16=("D",)))
    out.append(AotConfig(f"{_MOD}:_infonce_col_reduce_kernel",
                         {"col_part_ptr": "*fp32", "col_loss_ptr": "*fp32", "col_stats_ptr": "*fp32", "M": "i32",
                          "R": "i32", "BLOCK_C": "constexpr"}, {"BLOCK_C": COL_REDUCE_BLOCK}, 4, 1))
    return out


AOT_CONFIGS = _aot_configs()
