"""Fused Triton kernels for PatchNCE (CUT), every layer in one launch per direction.

Math (METHODS.md section 3; the spec is ``contrastgen/reference/patchnce.py``)
-------------------------------------------------------------------------------
Layer l holds queries q and keys k of shape (N_l, C_l), N_l = G n_l: G groups (the B images, or one group with
``all_negatives_from_minibatch``) of n_l patches each.  Inside a group, with s_ij = q_i . k_j and x = s / tau:

    logits_i = [x_ii, x_ij (j != i), -10 / tau]      (CUT's diagonal fill: the -10 entry replaces x_ii among the
                                                      negatives, so the row holds every x_ij once plus the fill)
    loss_i   = lse_i - x_ii,      lse_i = log(sum_j exp(x_ij) + exp(-10 / tau))
    loss_l   = mean_i loss_i;     output: (loss_l)_l, or their mean over layers (CUT)

Gradients (g_l the upstream weight of layer l, w_l = g_l / N_l, divided by L for the mean over layers;
P_ij = exp(x_ij - lse_i), the fill entry takes no gradient):

    dL/dq_i = w_l / tau (sum_j P_ij k_j - k_i)          (FlashAttention-forward shape: "attention" with V = K)
    dL/dk_j = w_l / tau (sum_i P_ij q_i - q_j)
    dL/dtau = -1/tau sum_l w_l sum_i (E_P[x]_i - x_ii)  (E over the row's entries, the fill included)

Design
------
* Forward (``_patchnce_fwd_kernel``): one program per (layer, group, BLOCK_M query rows).  The
  query block stays on chip; each key tile K_j (BLOCK_N x C) is loaded once and used twice: S = Q K_j^T, then
  the online log-sum-exp (running max m, sum l, rescale alpha = exp(m_old - m_new)) and the on-chip accumulator
  O += P K_j.  At the end O / l = sum_j P_ij k_j, so the forward also produces the query gradient up to the
  per-layer upstream weight (``gq = (O / l - k_i) / tau``, fp32) when a query needs a gradient (NEED_DQ): the
  loss and dq cost 2 matmul-equivalents in all, and the backward only scales gq.  Channel modes (constexpr
  ON_CHIP): "single" keeps Q and O in registers (16-bit inputs with C_max <= 256, fp32 with C_max <= 32);
  "multi" (larger C, e.g. UNet decoder features, and fp32, whose 3-pass tf32 products need ~3x the registers and
  spilled with a 256-channel tile) reloads Q in BLOCK_C chunks for S and keeps O unnormalised in the program's
  own fp32 rows of gq, rescaled there chunk by chunk (read-modify-write, L2-resident, a CTA barrier per tile):
  still 2 matmul-equivalents.
* Backward (``_patchnce_bwd_kernel``, one launch): programs [0, n_dk) are the key ("column") kernel when a key
  needs a gradient (NEED_DK; CUT detaches the keys, so by default there are none): one program per block of
  BLOCK_N keys loops over the query tiles of its group, recomputes S^T, P^T = exp(x^T - lse) from the saved row
  lse, and accumulates dK += (P - I)^T Q on chip ("multi": in an fp32 scratch buffer, as the forward)
  (FlashAttention-2's column pass: no atomics, deterministic).
  The remaining programs scale gq by w_l into dq (NEED_DQ).
* Layers: up to MAX_LAYERS per launch, passed as scalar arguments (pointers Q_l, K_l, channels C_l, group
  size n_l) and selected per program by its layer id: no packing copy, no pointer table, no host-to-device
  copy; more layers are split over several launches by the launcher.  The loss partials of each program are
  written (pre-scaled by 1 / (N_l [L])) into an (L, max programs) buffer whose idle slots store 0, so the loss
  is one ``sum`` over it; the dtau partials likewise.
* Non-finite input: the running max may drop a NaN (tl.maximum) but exp(NaN - m) = NaN enters the sum, so any
  NaN or Inf in a row's logits gives a NaN/Inf lse, loss and gradient row, as in the float64 reference; the
  fill entry (initial m = -10/tau, l = 1) keeps m finite, so a masked (-inf) logit never forms -inf - -inf.
* Dtypes: fp32 / bf16 / fp16 inputs, fp32 accumulation; fp32 products use ``input_precision="tf32x3"``
  (near-fp32 accuracy on tensor cores), 16-bit P tiles are rounded to the input dtype for the second product
  (as FlashAttention does); under the interpreter UPCAST computes every product in fp32 (dated notes below).

Constexpr mode flags (each one a separate compiled specialisation; the launchers set them from the inputs)
-------------------------------------------------------------------------------------------------------------
  NEED_DQ   forward: accumulate O = sum_j P_ij k_j and write gq (a query needs a gradient); backward: run the
            dq-scaling programs.                                                           (both kernels)
  NEED_LSE  forward: store the row lse for the key pass (only with key gradients).         (forward)
  NEED_DT   forward: accumulate sum_j P_ij x_ij for dL/dtau (a temperature tensor with requires_grad).
  NEED_DK   backward: run the key ("column") programs [0, n_dk) (detach_key=False).        (backward)
  MEAN      backward: one upstream scalar for the mean over layers (else one per layer, reduction "none"/"sum").
  TAU_PTR   read tau from a 1-element device tensor (no host sync) instead of the float argument.
  ON_CHIP   "single" channel mode (accumulator in registers) vs "multi" (fp32 scratch rows, BLOCK_C chunks).
  FP32_DOT  fp32 inputs: products with input_precision="tf32x3"; 16-bit inputs: native bf16/fp16 MMA.
  UPCAST    interpreter only (TRITON_INTERPRET=1): dot operands converted to fp32 (see the dated notes).
  BLOCK_M / BLOCK_N / BLOCK_C, SCALE_BLOCK: tile sizes (FWD_CONFIGS / BWD_CONFIGS per architecture, below).

Cost per tile (one BLOCK_M x BLOCK_N tile of one group, C = C_l channels, b = input itemsize)
--------------------------------------------------------------------------------------------
                           FLOPs                     bytes read (+ written) per tile
  fwd, ON_CHIP             2 BM BN C (S = Q K^T)     BN C b (the key tile, used for S and for O)
      + NEED_DQ            + 2 BM BN C (O += P K)
  fwd, multi               2 BM BN C                 BN C b + BM C b (Q chunks reloaded for S)
      + NEED_DQ            + 2 BM BN C               + BN C b (K chunks again) + 4 BM C (+ 4 BM C): the fp32 O rows
                                                     read-modify-written (L2-resident, the program's own rows)
  bwd key pass, ON_CHIP    4 BN BM C (S^T, dK += ..) BM C b + 4 BM (query tile, lse)
  bwd key pass, multi      4 BN BM C                 2 BM C b + 4 BM + 4 BN C (+ 4 BN C) (fp32 dK rows, RMW)
  bwd dq scaling           1 per element             4 (+ b) per element (gq in, dq out); no tiles
  Once per program: fwd loads the query block (BM C b), writes gq (4 BM C), lse (4 BM) and one loss partial;
  the key pass loads its key block (BN C b) and writes dk (BN C b).
  Arithmetic intensity of the ON_CHIP forward with NEED_DQ: 4 BM BN C / (BN C b) = 4 BM / b FLOP/byte of L2
  traffic (BM = 64: 128 for bf16, 64 for fp32), so the loop is tensor-core bound, not bandwidth bound.
  Whole layer (G groups of n patches, N = G n): forward 4 G n^2 C FLOPs with NEED_DQ (2 G n^2 C without), key
  traffic G n (n / BM) C b bytes (every row block of a group streams the group's keys); key pass 4 G n^2 C more.
  CUT default (keys detached): 2 matmul-equivalents for fwd+bwd, as many as the dense reference's S and dQ
  products (which add ~10 kernels per layer and O(G n^2) memory); with key gradients 4 against the dense 3 (the
  key pass recomputes S).

Dated notes on workarounds
--------------------------
* 2026-12-01: the Triton interpreter computes bf16 ``tl.dot`` wrongly (it multiplies raw bits, upstream triton
  issue 11584, not fixed in 3.8): under TRITON_INTERPRET=1 the constexpr UPCAST converts dot operands to fp32.
  Never set on a GPU.
* 2026-12-01: fp32 inputs keep the accumulator on chip only up to FP32_ON_CHIP_MAX_C = 32 channels: tf32x3
  products hold ~3x the operand registers, and a 256-channel fp32 tile spilled (ptxas -v), so
  fp32 with C > 32 takes the "multi" mode.
* 2026-12-01: sm_80 fp32 key pass with 4 warps spilled 32 bytes (255 registers); 8 warps use 166 (BWD_CONFIGS).
  sm_90 fp32 key pass: 32-row tiles (BLOCK_N = 32) compiled to HMMA (mma.sync), so BLOCK_N = 64 there (HGMMA).
* 2026-12-01: "multi" mode: ``tl.debug_barrier()`` after each tile's read-modify-write of the fp32 O / dK rows,
  since the next tile's loads of those rows come from other threads of the CTA (no cross-program sharing, so no
  atomics at all: the SASS has no ATOM/RED, hence no fences; tests/test_aot_compile.py checks).
* 2026-12-01: outputs that a specialisation does not need are 1-element dummies, not null pointers: the launcher
  checks pointer arguments, and the dtype of the dummy keeps the compiled signature that AOT_CONFIGS lists.
* 2026-12-01: G, max_rb, L, max_cb, n_dk and total_elems are ``do_not_specialize``: Triton would otherwise
  specialise G = 1 (SinCUT) and multiples of 16 as different kernels, one per batch size.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

MAX_LAYERS = 8                 # layers per launch (scalar-argument slots); more are split over launches
SINGLE_CHUNK_MAX_C = 256       # up to this many channels the dq / dk accumulator is one on-chip tile
MULTI_CHUNK_BLOCK_C = 128      # channel chunk beyond that (16-bit inputs)
FP32_ON_CHIP_MAX_C = 32        # fp32 (3-pass tf32 products need ~3x the registers): on chip only up to 32 channels
FP32_BLOCK_C = 32              # fp32 channel chunk beyond that
SCALE_BLOCK = 1024             # elements per dq-scaling program
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FILL = tl.constexpr(-10.0)     # CUT's diagonal fill value (before the division by tau)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation: a (M, K), b (K, N), acc (M, N) fp32 (the call sites give the shapes)."""
    if UPCAST:  # 2026-12-01: interpreter bf16 tl.dot bug (triton issue 11584): compute in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)  # (M, K) x (K, N) -> (M, N)
    elif FP32_DOT:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")  # (M, K) x (K, N) -> (M, N)
    else:
        acc = tl.dot(a, b, acc)  # (M, K) x (K, N) -> (M, N)
    return acc


@triton.jit
def _inv_tau(tau_ptr, tau_val, TAU_PTR: tl.constexpr):
    """1 / tau: from a device scalar (a temperature tensor, no host sync) or from the float argument."""
    if TAU_PTR:
        tau = tl.load(tau_ptr).to(tl.float32)
    else:
        tau = tau_val
    return 1.0 / tau


@triton.jit
def _sel(l, a0, a1, a2, a3, a4, a5, a6, a7):
    """The argument of layer slot ``l`` (scalars or pointers)."""
    r = a0
    if l == 1:
        r = a1
    if l == 2:
        r = a2
    if l == 3:
        r = a3
    if l == 4:
        r = a4
    if l == 5:
        r = a5
    if l == 6:
        r = a6
    if l == 7:
        r = a7
    return r


@triton.jit
def _offsets(l, G, C0, C1, C2, C3, C4, C5, C6, C7, P0, P1, P2, P3, P4, P5, P6, P7):
    """(row offset, element offset) of layer ``l`` in the flat per-row / per-element buffers:
    sum over earlier slots of N_s = G n_s and of N_s C_s (unused slots have n_s = C_s = 0)."""
    rows = ((l > 0) * P0 + (l > 1) * P1 + (l > 2) * P2 + (l > 3) * P3 + (l > 4) * P4 + (l > 5) * P5
            + (l > 6) * P6) * G
    elems = ((l > 0) * P0 * C0 + (l > 1) * P1 * C1 + (l > 2) * P2 * C2 + (l > 3) * P3 * C3 + (l > 4) * P4 * C4
             + (l > 5) * P5 * C5 + (l > 6) * P6 * C6) * G
    return rows, elems


@triton.jit
def _s_tile(q, q_ptr, k_ptr, grow, gcol, rmask, colmask, C,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ON_CHIP: tl.constexpr,
            FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """S = Q[grow] K[gcol]^T (BLOCK_M, BLOCK_N) fp32.  ON_CHIP: q is the resident (BLOCK_M, BLOCK_C >= C) query
    block and the key tile is returned for the second product; else chunked over C (query chunks reloaded)."""
    offs_c = tl.arange(0, BLOCK_C)
    if ON_CHIP:
        k = tl.load(k_ptr + gcol[:, None] * C + offs_c[None, :], mask=colmask[:, None] & (offs_c < C)[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_C)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_C) x (BLOCK_C, BLOCK_N)
    else:
        k = tl.zeros((BLOCK_N, BLOCK_C), k_ptr.dtype.element_ty)  # unused
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cm = (c0 + offs_c) < C
            qa = tl.load(q_ptr + grow[:, None] * C + (c0 + offs_c)[None, :], mask=rmask[:, None] & cm[None, :],
                         other=0.0)  # (BLOCK_M, BLOCK_C)
            ka = tl.load(k_ptr + gcol[:, None] * C + (c0 + offs_c)[None, :], mask=colmask[:, None] & cm[None, :],
                         other=0.0)  # (BLOCK_N, BLOCK_C)
            s = _dot(qa, tl.trans(ka), s, FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_C) x (BLOCK_C, BLOCK_N)
    return s, k


# ----------------------------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["G", "max_rb"])
def _patchnce_fwd_kernel(Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7, K0, K1, K2, K3, K4, K5, K6, K7,
                         C0, C1, C2, C3, C4, C5, C6, C7, P0, P1, P2, P3, P4, P5, P6, P7,
                         G, max_rb, tau_ptr, tau_val, part_ptr, dpart_ptr, lse_ptr, gq_ptr, mean_div,
                         TAU_PTR: tl.constexpr, NEED_DQ: tl.constexpr, NEED_LSE: tl.constexpr, NEED_DT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ON_CHIP: tl.constexpr,
                         FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Program (layer, group, row block): loss partial, lse, gq = (sum_j P_ij k_j - k_i) / tau, dtau partial.
    Grid: (L * max_rb,), max_rb = max_l G cdiv(n_l, BLOCK_M); idle slots store 0.
    ON_CHIP: the (BLOCK_M, BLOCK_C >= C) accumulator O lives in registers.  Else O is kept, unnormalised, in this
    program's own rows of gq (fp32) and rescaled there chunk by chunk (read-modify-write, a CTA barrier per tile)."""
    slot = tl.program_id(0)
    layer = slot // max_rb
    rb = slot % max_rb
    C = _sel(layer, C0, C1, C2, C3, C4, C5, C6, C7)
    n = _sel(layer, P0, P1, P2, P3, P4, P5, P6, P7)
    q_ptr = _sel(layer, Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7)
    k_ptr = _sel(layer, K0, K1, K2, K3, K4, K5, K6, K7)
    nrb = tl.cdiv(n, BLOCK_M)
    if rb < G * nrb:
        rowoff, eloff = _offsets(layer, G, C0, C1, C2, C3, C4, C5, C6, C7, P0, P1, P2, P3, P4, P5, P6, P7)
        grp = rb // nrb
        rows = (rb % nrb) * BLOCK_M + tl.arange(0, BLOCK_M)   # within the group
        rmask = rows < n
        grow = grp * n + rows                                  # within the layer
        inv_tau = _inv_tau(tau_ptr, tau_val, TAU_PTR)
        s2 = inv_tau * LOG2E                                   # logits in base 2: x2 = s / tau * log2(e)
        fill2 = FILL * s2
        m = tl.zeros((BLOCK_M,), tl.float32) + fill2           # the fill entry starts the online lse
        l = tl.zeros((BLOCK_M,), tl.float32) + 1.0
        ax = tl.zeros((BLOCK_M,), tl.float32) + fill2          # sum exp(x2 - m) x2 (for dtau)
        pos = tl.zeros((BLOCK_M,), tl.float32)                 # x2_ii
        offs_c = tl.arange(0, BLOCK_C)
        grow_c = eloff + grow[:, None] * C                     # row starts in the flat gq buffer
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        if ON_CHIP:
            q = tl.load(q_ptr + grow[:, None] * C + offs_c[None, :], mask=rmask[:, None] & (offs_c < C)[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_C), resident
        else:
            q = tl.zeros((BLOCK_M, BLOCK_C), q_ptr.dtype.element_ty)  # unused
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            colmask = cols < n
            gcol = grp * n + cols
            s, k = _s_tile(q, q_ptr, k_ptr, grow, gcol, rmask, colmask, C, BLOCK_M, BLOCK_N, BLOCK_C, ON_CHIP,
                           FP32_DOT, UPCAST)
            x = tl.where(colmask[None, :], s * s2, float("-inf"))
            pos += tl.sum(tl.where(cols[None, :] == rows[:, None], x, 0.0), 1)
            m_new = tl.maximum(m, tl.max(x, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(x - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if NEED_DT:
                ax = ax * alpha + tl.sum(p * tl.where(colmask[None, :], x, 0.0), 1)
            if NEED_DQ:
                if ON_CHIP:
                    acc = acc * alpha[:, None]
                    acc = _dot(p.to(k.dtype), k, acc, FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_C)
                else:
                    for cc0 in range(0, C, BLOCK_C):
                        ch = cc0 + offs_c
                        om = rmask[:, None] & (ch < C)[None, :]
                        o = tl.load(gq_ptr + grow_c + ch[None, :], mask=om & (c0 > 0), other=0.0)
                        kc = tl.load(k_ptr + gcol[:, None] * C + ch[None, :], mask=colmask[:, None] & (ch < C)[None, :],
                                     other=0.0)  # (BLOCK_N, BLOCK_C)
                        o = _dot(p.to(kc.dtype), kc, o * alpha[:, None], FP32_DOT, UPCAST)  # (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_C)
                        tl.store(gq_ptr + grow_c + ch[None, :], o, mask=om)
                    tl.debug_barrier()  # the next tile's loads read these rows from other threads of the CTA
            m = m_new
        if NEED_DQ:
            if ON_CHIP:
                cm = rmask[:, None] & (offs_c < C)[None, :]
                kd = tl.load(k_ptr + grow[:, None] * C + offs_c[None, :], mask=cm, other=0.0).to(tl.float32)
                tl.store(gq_ptr + grow_c + offs_c[None, :], (acc / l[:, None] - kd) * inv_tau, mask=cm)
            else:
                for cc0 in range(0, C, BLOCK_C):
                    ch = cc0 + offs_c
                    cm = rmask[:, None] & (ch < C)[None, :]
                    o = tl.load(gq_ptr + grow_c + ch[None, :], mask=cm, other=0.0)
                    kd = tl.load(k_ptr + grow[:, None] * C + ch[None, :], mask=cm, other=0.0).to(tl.float32)
                    tl.store(gq_ptr + grow_c + ch[None, :], (o / l[:, None] - kd) * inv_tau, mask=cm)
        lse2 = m + tl.log2(l)
        loss = (lse2 - pos) * LN2
        wrow = 1.0 / (G * n * mean_div)
        tl.store(part_ptr + slot, tl.sum(tl.where(rmask, loss, 0.0), 0) * wrow)
        if NEED_LSE:
            tl.store(lse_ptr + rowoff + grow, lse2 * LN2, mask=rmask)
        if NEED_DT:
            dlt = (ax / l - pos) * LN2
            tl.store(dpart_ptr + slot, tl.sum(tl.where(rmask, dlt, 0.0), 0) * wrow)
    else:
        tl.store(part_ptr + slot, 0.0)
        if NEED_DT:
            tl.store(dpart_ptr + slot, 0.0)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["G", "L", "max_cb", "n_dk", "total_elems"])
def _patchnce_bwd_kernel(Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7, K0, K1, K2, K3, K4, K5, K6, K7,
                         C0, C1, C2, C3, C4, C5, C6, C7, P0, P1, P2, P3, P4, P5, P6, P7,
                         G, L, max_cb, n_dk, total_elems, tau_ptr, tau_val, g_ptr, lse_ptr, gq_ptr, dq_ptr, dk_ptr,
                         dkacc_ptr, mean_div,
                         TAU_PTR: tl.constexpr, MEAN: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ON_CHIP: tl.constexpr,
                         SCALE_BLOCK: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Programs [0, n_dk): dK of one (layer, group, block of BLOCK_N keys),
    dk_j = w_l / tau sum_i (P_ij - [i = j]) q_i with P from the saved lse; n_dk = L max_cb (0 without NEED_DK).
    ON_CHIP: the (BLOCK_N, BLOCK_C >= C) accumulator lives in registers; else in this program's rows of the fp32
    ``dkacc`` buffer (read-modify-write, a CTA barrier per tile).  Programs [n_dk, ...): dq = w_l gq over
    SCALE_BLOCK elements of the flat gq buffer."""
    pid = tl.program_id(0)
    if NEED_DK and pid < n_dk:
        layer = pid // max_cb
        cb = pid % max_cb
        C = _sel(layer, C0, C1, C2, C3, C4, C5, C6, C7)
        n = _sel(layer, P0, P1, P2, P3, P4, P5, P6, P7)
        q_ptr = _sel(layer, Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7)
        k_ptr = _sel(layer, K0, K1, K2, K3, K4, K5, K6, K7)
        ncb = tl.cdiv(n, BLOCK_N)
        if cb < G * ncb:
            rowoff, eloff = _offsets(layer, G, C0, C1, C2, C3, C4, C5, C6, C7, P0, P1, P2, P3, P4, P5, P6, P7)
            grp = cb // ncb
            cols = (cb % ncb) * BLOCK_N + tl.arange(0, BLOCK_N)   # keys, within the group
            colmask = cols < n
            gcol = grp * n + cols
            gcol_c = eloff + gcol[:, None] * C
            inv_tau = _inv_tau(tau_ptr, tau_val, TAU_PTR)
            s2 = inv_tau * LOG2E
            offs_c = tl.arange(0, BLOCK_C)
            if MEAN:
                g = tl.load(g_ptr).to(tl.float32)
            else:
                g = tl.load(g_ptr + layer).to(tl.float32)
            w = g / (G * n * mean_div) * inv_tau
            if ON_CHIP:
                k = tl.load(k_ptr + gcol[:, None] * C + offs_c[None, :],
                            mask=colmask[:, None] & (offs_c < C)[None, :], other=0.0)  # (BLOCK_N, BLOCK_C), resident
            else:
                k = tl.zeros((BLOCK_N, BLOCK_C), k_ptr.dtype.element_ty)  # unused
            acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
            for r0 in range(0, n, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                rmask = rows < n
                grow = grp * n + rows
                # S^T = K Q^T: the forward's tile with the roles swapped
                st, qt = _s_tile(k, k_ptr, q_ptr, gcol, grow, colmask, rmask, C, BLOCK_N, BLOCK_M, BLOCK_C, ON_CHIP,
                                 FP32_DOT, UPCAST)
                lse2 = tl.load(lse_ptr + rowoff + grow, mask=rmask, other=0.0) * LOG2E
                pt = tl.exp2(st * s2 - lse2[None, :])
                pt = tl.where(rmask[None, :] & colmask[:, None], pt, 0.0)
                dt = pt - (cols[:, None] == rows[None, :]).to(tl.float32)
                if ON_CHIP:
                    acc = _dot(dt.to(qt.dtype), qt, acc, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_M) x (BLOCK_M, BLOCK_C)
                else:
                    for cc0 in range(0, C, BLOCK_C):
                        ch = cc0 + offs_c
                        om = colmask[:, None] & (ch < C)[None, :]
                        a = tl.load(dkacc_ptr + gcol_c + ch[None, :], mask=om & (r0 > 0), other=0.0)
                        qc = tl.load(q_ptr + grow[:, None] * C + ch[None, :], mask=rmask[:, None] & (ch < C)[None, :],
                                     other=0.0)  # (BLOCK_M, BLOCK_C)
                        a = _dot(dt.to(qc.dtype), qc, a, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_M) x (BLOCK_M, BLOCK_C)
                        tl.store(dkacc_ptr + gcol_c + ch[None, :], a, mask=om)
                    tl.debug_barrier()
            if ON_CHIP:
                om = colmask[:, None] & (offs_c < C)[None, :]
                tl.store(dk_ptr + gcol_c + offs_c[None, :], (acc * w).to(dk_ptr.dtype.element_ty), mask=om)
            else:
                for cc0 in range(0, C, BLOCK_C):
                    ch = cc0 + offs_c
                    om = colmask[:, None] & (ch < C)[None, :]
                    a = tl.load(dkacc_ptr + gcol_c + ch[None, :], mask=om, other=0.0)
                    tl.store(dk_ptr + gcol_c + ch[None, :], (a * w).to(dk_ptr.dtype.element_ty), mask=om)
    if NEED_DQ and pid >= n_dk:
        e = (pid - n_dk).to(tl.int64) * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
        emask = e < total_elems
        # layer of each element: the slot whose range [cumulative N C before it, + N_s C_s) holds it
        wv = tl.zeros((SCALE_BLOCK,), tl.float32)
        bound = 0
        for s in tl.static_range(8):
            Cs = _sel(s, C0, C1, C2, C3, C4, C5, C6, C7)
            ns = _sel(s, P0, P1, P2, P3, P4, P5, P6, P7)
            if s < L:
                if MEAN:
                    gs = tl.load(g_ptr).to(tl.float32)
                else:
                    gs = tl.load(g_ptr + s).to(tl.float32)
                ws = gs / (G * ns * mean_div)
                inside = (e >= bound) & (e < bound + G * ns * Cs)
                wv = tl.where(inside, ws, wv)
            bound += G * ns * Cs
        gq = tl.load(gq_ptr + e, mask=emask, other=0.0)
        tl.store(dq_ptr + e, (gq * wv).to(dq_ptr.dtype.element_ty), mask=emask)


# ----------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (architecture, input precision, channel mode).  Channel modes:
# "single": the accumulator is one on-chip (rows, BLOCK_C) tile, BLOCK_C = next_pow2(C_max) >= 16, up to
# SINGLE_CHUNK_MAX_C channels for 16-bit inputs and FP32_ON_CHIP_MAX_C for fp32; "multi": read-modify-write of the
# program's own fp32 rows in BLOCK_C chunks (MULTI_CHUNK_BLOCK_C, FP32_BLOCK_C).  sm_90: 64-row tiles, so every
# product is a wgmma (m64); sm_80: mma.sync.  Every entry compiles without register spills
# (tests/test_aot_compile.py; measured with ``python -m contrastgen.kernels._aot --arch 90 --pretty``).
FWD_CONFIGS = {
    (90, "16bit", "single"): (64, 64, 8, 2), (90, "16bit", "multi"): (64, 64, 8, 2),
    (90, "fp32", "single"): (64, 32, 4, 2), (90, "fp32", "multi"): (64, 32, 4, 2),
    (80, "16bit", "single"): (64, 64, 8, 2), (80, "16bit", "multi"): (64, 64, 8, 2),
    (80, "fp32", "single"): (64, 32, 4, 2), (80, "fp32", "multi"): (64, 32, 4, 2),
}
# key pass: its products have BLOCK_N rows, so 64 on sm_90 (BLOCK_N = 32 compiled to HMMA, not HGMMA); sm_80 fp32:
# 4 warps spilled 32 bytes (255 registers), 8 warps use 166
BWD_CONFIGS = {**FWD_CONFIGS, (90, "fp32", "single"): (64, 64, 8, 2), (90, "fp32", "multi"): (64, 64, 8, 2),
               (80, "fp32", "single"): (64, 32, 8, 2), (80, "fp32", "multi"): (64, 32, 8, 2)}
INTERPRET_TILE = (64, 64)       # few, large tiles keep the interpreter fast
_PREC = {torch.float32: "fp32", torch.bfloat16: "16bit", torch.float16: "16bit"}


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    major, _ = torch.cuda.get_device_capability(device_index)
    return 90 if major >= 9 else 80


def _block_c(c_max: int, prec: str):
    """(BLOCK_C, ON_CHIP, mode) for the largest channel count of a launch."""
    on_chip_max = SINGLE_CHUNK_MAX_C if prec == "16bit" else FP32_ON_CHIP_MAX_C
    if c_max <= on_chip_max:
        return max(16, triton.next_power_of_2(c_max)), True, "single"
    return (MULTI_CHUNK_BLOCK_C if prec == "16bit" else FP32_BLOCK_C), False, "multi"


def launch_tiles(table, arch: int, dtype: torch.dtype, c_max: int):
    """(BLOCK_M, BLOCK_N, BLOCK_C, ON_CHIP, num_warps, num_stages) the launchers use on ``arch`` (80 or 90) for
    inputs of ``dtype`` whose largest layer has ``c_max`` channels (``table``: FWD_CONFIGS or BWD_CONFIGS)."""
    prec = _PREC[dtype]
    bc, on_chip, mode = _block_c(c_max, prec)
    bm, bn, w, s = table[(arch, prec, mode)]
    return bm, bn, bc, on_chip, w, s


def _tiles(table, t: torch.Tensor, c_max: int):
    if _interpreting():
        bc, on_chip, _ = _block_c(c_max, _PREC[t.dtype])
        return (*INTERPRET_TILE, bc, on_chip, 4, 1)
    return launch_tiles(table, _arch(t.device.index or 0), t.dtype, c_max)


def _dtype_flags(t: torch.Tensor):
    if t.dtype not in _PREC:
        raise TypeError(f"the Triton PatchNCE kernels take float32, bfloat16 or float16 inputs, got {t.dtype}")
    return {"FP32_DOT": t.dtype == torch.float32, "UPCAST": _interpreting()}


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (N, C) input; float64 (gradcheck, CPU debugging) is computed in float32."""
    if t.dtype == torch.float64:
        t = t.float()
    return t.contiguous()


def _check_int32_offsets(qs, groups):
    total = sum(q.numel() for q in qs)
    if total >= 2 ** 31:
        raise ValueError(f"the Triton PatchNCE kernels use 32-bit offsets: the layers hold {total} elements in all, "
                         "more than 2**31 - 1; split the layers over several calls")


def _slots(qs, ks, groups):
    """The per-layer scalar arguments of one launch of <= MAX_LAYERS layers: 8 Q, 8 K, 8 C, 8 n (unused slots
    repeat layer 0's pointers with C = n = 0)."""
    L = len(qs)
    q_args = list(qs) + [qs[0]] * (MAX_LAYERS - L)
    k_args = list(ks) + [ks[0]] * (MAX_LAYERS - L)
    c_args = [q.shape[1] for q in qs] + [0] * (MAX_LAYERS - L)
    n_args = [q.shape[0] // groups for q in qs] + [0] * (MAX_LAYERS - L)
    return q_args, k_args, c_args, n_args


def _tau_args(tau, dev):
    """(tensor, float, TAU_PTR): a temperature tensor is read on the device (no host sync), a float is passed
    by value."""
    if isinstance(tau, torch.Tensor):
        return tau.detach().reshape(1).to(device=dev, dtype=torch.float32).contiguous(), 1.0, True
    return None, float(tau), False


def _chunks(L):
    return [(s, min(L, s + MAX_LAYERS)) for s in range(0, L, MAX_LAYERS)]


# ----------------------------------------------------------------------------------------------- launchers
def _out(n, dtype, dev, needed):
    """An output buffer of n elements, or (not needed) a 1-element dummy: a real allocation, so that the kernel's
    unused pointer argument is never null (the launcher checks pointers) and keeps its dtype (AOT_CONFIGS)."""
    return torch.empty(n if needed else 1, dtype=dtype, device=dev)


def patchnce_fwd(qs, ks, groups, tau, mean_layers, need_dq, need_lse, need_dt):
    """Fused PatchNCE forward over every layer.

    qs, ks: lists of (N_l, C_l) tensors (N_l = groups n_l), one dtype; tau: a float or a 1-element tensor.
    Returns (part (L, R), dpart (L, R) or (0,), lse (sum N_l,) or (0,), gq (sum N_l C_l,) or (0,)), fp32, where
    part.sum(1) is the per-layer loss (part.sum() the mean over layers with ``mean_layers``) and dpart the same
    for sum_i (E_P[x] - x_ii) / N_l."""
    qs = [_kernel_input(q) for q in qs]
    ks = [_kernel_input(k) for k in ks]
    _check_int32_offsets(qs, groups)
    L = len(qs)
    dev = qs[0].device
    flags = _dtype_flags(qs[0])
    tau_t, tau_v, tau_flag = _tau_args(tau, dev)
    c_max = max(q.shape[1] for q in qs)
    bm, bn, bc, on_chip, w, s = _tiles(FWD_CONFIGS, qs[0], c_max)
    max_rb = max(groups * triton.cdiv(q.shape[0] // groups, bm) for q in qs)
    f32 = torch.float32
    part = torch.empty(L, max_rb, dtype=f32, device=dev)
    dpart = _out(L * max_rb, f32, dev, need_dt).view(-1, max_rb) if need_dt else _out(0, f32, dev, False)
    lse = _out(sum(q.shape[0] for q in qs), f32, dev, need_lse)
    gq = _out(sum(q.numel() for q in qs), f32, dev, need_dq)
    row0 = el0 = 0
    for a, b in _chunks(L):
        q_args, k_args, c_args, n_args = _slots(qs[a:b], ks[a:b], groups)
        _patchnce_fwd_kernel[((b - a) * max_rb,)](
            *q_args, *k_args, *c_args, *n_args, groups, max_rb, tau_t if tau_flag else part, tau_v, part[a:],
            dpart[a:] if need_dt else dpart, lse[row0:] if need_lse else lse, gq[el0:] if need_dq else gq,
            float(L if mean_layers else 1),
            TAU_PTR=tau_flag, NEED_DQ=need_dq, NEED_LSE=need_lse, NEED_DT=need_dt, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_C=bc, ON_CHIP=on_chip, num_warps=w, num_stages=s, **flags)
        row0 += sum(q.shape[0] for q in qs[a:b])
        el0 += sum(q.numel() for q in qs[a:b])
    return (part, dpart if need_dt else part.new_empty(0), lse if need_lse else part.new_empty(0),
            gq if need_dq else part.new_empty(0))


def patchnce_bwd(grad, qs, ks, groups, tau, mean_layers, lse, gq, need_dq, need_dk, q_dtype, k_dtype):
    """Fused PatchNCE backward: (dq flat (sum N_l C_l,) in ``q_dtype`` or (0,), dk flat in ``k_dtype`` or (0,)).

    grad: the upstream gradient, 0-d (``mean_layers``) or (L,)."""
    qs = [_kernel_input(q) for q in qs]
    ks = [_kernel_input(k) for k in ks]
    L = len(qs)
    dev = qs[0].device
    flags = _dtype_flags(qs[0])
    tau_t, tau_v, tau_flag = _tau_args(tau, dev)
    g = grad.detach().reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
    c_max = max(q.shape[1] for q in qs)
    bm, bn, bc, on_chip, w, s = _tiles(BWD_CONFIGS, qs[0], c_max)
    max_cb = max(groups * triton.cdiv(q.shape[0] // groups, bn) for q in qs)
    total = sum(q.numel() for q in qs)
    dq = _out(total, qs[0].dtype, dev, need_dq)
    dk = _out(total, ks[0].dtype, dev, need_dk)
    dkacc = _out(total, torch.float32, dev, need_dk and not on_chip)   # the "multi" mode's fp32 accumulator
    lse = lse if need_dk else _out(0, torch.float32, dev, False)
    gq = gq if need_dq else _out(0, torch.float32, dev, False)
    row0 = el0 = 0
    for a, b in _chunks(L):
        q_args, k_args, c_args, n_args = _slots(qs[a:b], ks[a:b], groups)
        elems = sum(q.numel() for q in qs[a:b])
        n_dk = (b - a) * max_cb if need_dk else 0
        n_scale = triton.cdiv(elems, SCALE_BLOCK) if need_dq else 0
        if n_dk + n_scale > 0:
            _patchnce_bwd_kernel[(n_dk + n_scale,)](
                *q_args, *k_args, *c_args, *n_args, groups, b - a, max_cb, n_dk, elems, tau_t if tau_flag else g,
                tau_v, g if mean_layers else g[a:], lse[row0:] if need_dk else lse, gq[el0:] if need_dq else gq,
                dq[el0:] if need_dq else dq, dk[el0:] if need_dk else dk,
                dkacc[el0:] if (need_dk and not on_chip) else dkacc, float(L if mean_layers else 1),
                TAU_PTR=tau_flag, MEAN=mean_layers, NEED_DQ=need_dq, NEED_DK=need_dk, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_C=bc, ON_CHIP=on_chip, SCALE_BLOCK=SCALE_BLOCK, num_warps=w, num_stages=s, **flags)
        row0 += sum(q.shape[0] for q in qs[a:b])
        el0 += elems
    dq = dq.to(q_dtype) if need_dq else dq.new_empty(0, dtype=q_dtype)
    dk = dk.to(k_dtype) if need_dk else dk.new_empty(0, dtype=k_dtype)
    return dq, dk


# ----------------------------------------------------------------------------------------------- AOT list
# The specializations the launchers build for the benchmark shapes (contrastgen/bench/cases.py: patch_nce, patch_nce/minibatch,
# patch_nce/key_grads, patch_nce/i2i): a float temperature (TAU_PTR=False), every channel count and group size a
# multiple of 16 (the unused slots pass 0), the loss averaged over layers (MEAN); C_max = 256 -> the "single"
# channel tile 256, C_max = 1280 (i2i, UNet decoder features) -> "multi".  G, max_rb, L, max_cb, n_dk, total_elems
# are not specialised (do_not_specialize), so one compiled kernel serves every batch size.
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MOD = __name__


def _signature(fn, dt, grad_dt=None):
    names = list(fn.arg_names)
    sig = {}
    for a in names:
        if a[0] in "QK" and a[1:].isdigit():
            sig[a] = f"*{dt}"
        elif a in ("dq_ptr", "dk_ptr"):  # outputs in the input dtype
            sig[a] = f"*{grad_dt or dt}"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32"
        elif a in ("tau_val", "mean_div"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def _aot_configs():
    out = []
    slots = tuple(f"{p}{i}" for p in "CP" for i in range(MAX_LAYERS))
    seen = set()
    for arch in (80, 90):
        for dt, torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            prec = _PREC[torch_dt]
            base = {"TAU_PTR": False, "FP32_DOT": dt == "fp32", "UPCAST": False}
            for c_max, key_grads in ((256, False), (256, True), (1280, False)):   # CUT / SinCUT, key_grads, i2i
                if c_max == 1280 and dt == "fp16":
                    continue
                bc, on_chip, _ = _block_c(c_max, prec)
                if (arch, dt, bc, on_chip, key_grads) in seen:
                    continue
                seen.add((arch, dt, bc, on_chip, key_grads))
                for fn, table, cx in (
                        (_patchnce_fwd_kernel, FWD_CONFIGS, {"NEED_DQ": True, "NEED_LSE": key_grads, "NEED_DT": False}),
                        (_patchnce_bwd_kernel, BWD_CONFIGS, {"MEAN": True, "NEED_DQ": True, "NEED_DK": key_grads,
                                                             "SCALE_BLOCK": SCALE_BLOCK})):
                    bm, bn, bc, on_chip, w, s = launch_tiles(table, arch, torch_dt, c_max)
                    cx = {**base, **cx, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "ON_CHIP": on_chip}
                    sig = _signature(fn, dt)
                    sig.update({k: "constexpr" for k in cx})
                    out.append(AotConfig(f"{_MOD}:{fn.fn.__name__ if hasattr(fn, 'fn') else fn.__name__}", sig, cx,
                                         w, s, divisible_by_16=slots, archs=(arch,)))
    return out


AOT_CONFIGS = _aot_configs()
