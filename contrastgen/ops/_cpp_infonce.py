"""CPU (C++/OpenMP) implementation of the InfoNCE / SigLIP core contract (``contrastgen/reference/core.py``).

Plain functions on tensors (no autograd); ``contrastgen/ops/infonce.py`` wraps them in custom ops.

Design (2026-11-24, measured on the shared 2-core Zen4 AVX-512 machine with ``benches/cpu_infonce.py``): rows
are processed in blocks of B queries; per block

    forward:   S = Q_blk K^T                      (B x C, C = M + bank rows; one reused buffer)
               C++ epilogue (csrc/infonce.cpp): row lse / positives / loss and, for ``symmetric``, the column
               (max, sum exp) merged across blocks in the same pass          -> 1 GEMM
    backward:  S = Q_blk K^T  (recomputed); the C++ epilogue overwrites it with scale * dS (rows and columns,
               from the saved lse) and returns sum dS * S for dscale;
               dQ_blk = (scale dS) K,  dK += (scale dS)^T Q_blk               -> 3 GEMMs

so 4 GEMM-equivalents and O(B*C + N*D) extra memory (never N x M).  The logits product S = Q_blk K^T runs
either through MKL (torch.matmul, ``PRODUCT = "blas"``) or through the extension's register-blocked AVX-512
micro-kernel over keys packed once per call (``PRODUCT = "avx512"``, route (b)); the micro-kernel beat MKL's
sgemm on this product here (193 vs 146 GFLOP/s for the full N = 8192, D = 256 pass with 2 threads on the idle
machine; 59 vs 47 under load ~5), so it is the default where the extension was built with AVX-512.  dQ and dK
stay in MKL (189 and 173 GFLOP/s idle; a hand kernel for those needs BLIS-style packing of dS and was not
attempted).  Idle totals at N = 8192, D = 256: 0.81 s fwd+bwd (epilogues 32 + 19 ms) vs 2.46 s for the
dense reference with autograd, 56 MiB extra peak vs 1.3 GiB.  In the symmetric CLIP case the epilogues
use one exponential per logit for both directions (row and column exponentials differ by a rank-1 factor;
guarded so that it is only used when no term can under/overflow; csrc/infonce.cpp ``factored``).

Dtypes: float32 is computed as is.  bfloat16 / float16 inputs are converted to float32 (keys once, O(M*D);
queries per block) before the products, which accumulate in float32 and feed the float32 epilogue; float64
inputs given to this launcher are computed in float32 as well (the public API never sends them here: it runs
float64 on the float64 reference).  dq / dk / dbank are returned in the input dtypes, losses and stats in float32.

Accuracy (2026-12-01, issue 9 item 4): the forward computes losses max-shifted and, with one positive,
positive-relative (log1p form); the backward renormalises every row's softmax in the row (free: the exponentials
are needed anyway), and for symmetric columns whose stored float32 lse exceeds COL_NORM_LSE in magnitude runs a
pre-pass (one more logits product) that renormalises the columns too.  Non-finite features propagate
(csrc/infonce.cpp "Non-finite logits"): a NaN row poisons its whole gradient row.

Determinism: bitwise reproducible run to run and process to process at a fixed thread count (measured,
N = 2048, D = 128, every mode); across thread counts the losses stayed bitwise equal and the gradients differed
by <= 1e-6 relative (MKL's dQ / dK products and the per-thread column partials depend on the row partition).
"""
from __future__ import annotations

import torch

from ._backends import cpp_extension

_ext = cpp_extension("infonce")

# Row block B: at most MAX_BLOCK_ROWS rows and BLOCK_ELEMS floats (32 MiB) of logits, and at least 8 blocks
# once N >= 512 (so that the buffer stays ~1/8 of an N x M matrix on small problems).  On the shared 2-core
# machine B = 1024 at N = 8192 measured fastest (fewer OpenMP fork/joins per call; benches/cpu_infonce.py).
BLOCK_ELEMS = 1 << 23
MAX_BLOCK_ROWS = 1024
# How S = Q_blk K^T is computed: "avx512" (the extension's register-blocked micro-kernel over keys packed once
# per call, csrc/infonce.cpp qkt_block) or "blas" (torch.matmul -> MKL).  See the module doc for the measurement.
PRODUCT = "avx512" if (_ext is not None and _ext.has_avx512_product()) else "blas"
_EMPTY_I64 = torch.zeros(0, dtype=torch.int64)
_EMPTY_F32 = torch.zeros(0, dtype=torch.float32)


def available() -> bool:
    """True when the compiled extension ``contrastgen._cpp_infonce`` can be imported."""
    return _ext is not None


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_infonce is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at install "
                           "time); reinstall with `pip install --no-build-isolation -e .`")
    return _ext


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _f32(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors, {name} is on {t.device}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    return t.detach().to(torch.float32).contiguous()


def _scalar(t, name: str) -> float:
    # the scale / bias are hyper-parameters or learned scalars: reading them on the host is allowed
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(t.shape)}")
        return float(t.detach().reshape(()).to(torch.float64))
    return float(t)


def _labels(t, n: int, name: str) -> torch.Tensor:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.detach().to(torch.int64).contiguous()


def _block_rows(n: int, c: int) -> int:
    return max(1, min(n, MAX_BLOCK_ROWS, BLOCK_ELEMS // max(c, 1), max(64, n // 8)))


def _prepare(q, k, bank, q_labels, k_labels):
    qf, kf = _f32(q, "q"), _f32(k, "k")
    if kf.shape[1] != qf.shape[1]:
        raise ValueError(f"q and k must have the same feature dimension: {tuple(q.shape)} vs {tuple(k.shape)}")
    kb = 0
    keys = kf
    if bank is not None and bank.shape[0] > 0:
        bf = _f32(bank, "bank")
        if bf.shape[1] != qf.shape[1]:
            raise ValueError(f"bank must have the feature dimension of q: {tuple(bank.shape)} vs {tuple(q.shape)}")
        kb = bf.shape[0]
        keys = torch.cat([kf, bf], 0)
    has_labels = q_labels is not None
    if has_labels != (k_labels is not None):
        raise ValueError("q_labels and k_labels must both be given or both be None")
    ql = _labels(q_labels, qf.shape[0], "q_labels") if has_labels else _EMPTY_I64
    kl = _labels(k_labels, kf.shape[0], "k_labels") if has_labels else _EMPTY_I64
    return qf, keys, kf.shape[0], kb, has_labels, ql, kl


def _logits_product(qf: torch.Tensor, keys: torch.Tensor):
    """-> fill(i0, s): s (b, C) <- qf[i0:i0+b] @ keys^T, by PRODUCT."""
    if PRODUCT == "avx512" and _ext is not None and _ext.has_avx512_product() and keys.shape[1] > 0:
        panels = torch.empty((keys.shape[0] + 31) // 32, keys.shape[1], 32, dtype=torch.float32)
        _ext.pack_keys(keys.numpy(), panels.numpy())
        qn, pn = qf.numpy(), panels.numpy()
        return lambda i0, s: _ext.qkt_block(qn, i0, pn, s.numpy())
    keys_t = keys.T
    return lambda i0, s: torch.matmul(qf[i0:i0 + s.shape[0]], keys_t, out=s)


def _check_flags(exclude_self, symmetric, pml, kb, n, m):
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs q and k to be the same set (N == M), got N={n}, M={m}")
    if symmetric and (pml or kb or exclude_self):
        raise ValueError("symmetric needs supcon positives (pml=False), no bank and exclude_self=False")


# ---------------------------------------------------------------------------------------------- InfoNCE
# The symmetric backward renormalises the column softmax with a pre-pass (one extra logits product and one
# exponential per logit, csrc/infonce.cpp infonce_col_norm_block) when the stored float32 column lse is too coarse
# for that: half an ulp of |lse| is 6e-8 |lse| of relative error in every column term, which at |lse| = 1e4 (logit
# scale 1e4) is 40x PyTorch's own error (issue 9 item 4).  Below this bound (CLIP's logit scale is clamped at 100)
# the stored lse is used as is and the backward costs 3 products.  Rows are always renormalised in the row, free.
COL_NORM_LSE = 128.0


def infonce_fwd(q, k, bank, scale, q_labels, k_labels, exclude_self: bool, in_batch_negatives: bool, pml: bool,
                symmetric: bool):
    """-> (row_loss (N,), col_loss (M,) or (0,), row_stats (N, 2), col_stats (M, 2) or (0, 2)), all float32."""
    ext = _need_ext()
    qf, keys, m, kb, has_labels, ql, kl = _prepare(q, k, bank, q_labels, k_labels)
    n, c = qf.shape[0], keys.shape[0]
    _check_flags(exclude_self, symmetric, pml, kb, n, m)
    sc = _scalar(scale, "scale")
    row_loss = torch.empty(n, dtype=torch.float32)
    row_stats = torch.empty(n, 2, dtype=torch.float32)
    col_state = torch.zeros(5, m if symmetric else 0, dtype=torch.float64)  # [max, sum non-pos, sum pos, possum, npos]
    col_state[0].fill_(float("-inf"))
    bsz = _block_rows(n, c)
    buf = torch.empty(bsz * c, dtype=torch.float32)
    fill = _logits_product(qf, keys)
    rl, rs, cs, qln, kln = row_loss.numpy(), row_stats.numpy(), col_state.numpy(), ql.numpy(), kl.numpy()
    for i0 in range(0, n, bsz):
        b = min(bsz, n - i0)
        s = buf[: b * c].view(b, c)
        fill(i0, s)
        ext.infonce_fwd_block(s.numpy(), sc, i0, m, qln, kln, has_labels, bool(exclude_self),
                              bool(in_batch_negatives), bool(pml), bool(symmetric), rl[i0:i0 + b], rs[i0:i0 + b],
                              cs)
    if not symmetric:
        return row_loss, torch.zeros(0, dtype=torch.float32), row_stats, torch.zeros(0, 2, dtype=torch.float32)
    col_loss = torch.empty(m, dtype=torch.float32)
    col_stats = torch.empty(m, 2, dtype=torch.float32)
    ext.infonce_col_finalize(cs, col_loss.numpy(), col_stats.numpy())
    return row_loss, col_loss, row_stats, col_stats


def _column_terms(ext, fill, n, m, bsz, buf, sc, ql, kl, has_labels, in_batch_negatives, col_stats, g_col,
                  renormalize: bool = True):
    """The per-column inputs of the symmetric backward epilogue (see csrc infonce_bwd_impl):
    (col_lse, col_w, col_pk, col_pc, col_cb, col_ref)."""
    cst = col_stats.detach().to(torch.float32)
    gc = g_col.detach().to(torch.float32)
    if cst.shape != (m, 2) or gc.shape != (m,):
        raise ValueError(f"col_stats must be ({m}, 2) and g_col ({m},), got {tuple(cst.shape)}, {tuple(gc.shape)}")
    lse, npos = cst[:, 0], cst[:, 1]
    live = npos > 0
    gc = torch.where(live, gc, 0.0).double()
    col_lse = torch.where(live, lse, float("inf")).contiguous()  # dead columns give exact zeros
    one = npos == 1
    finite_live = lse[live]
    if renormalize and finite_live.numel() and float(finite_live.abs().nan_to_num(0.0).max()) > COL_NORM_LSE:
        acc = torch.zeros(2, m, dtype=torch.float64)
        an, cl = acc.numpy(), col_lse.numpy()
        for i0 in range(0, n, bsz):
            b = min(bsz, n - i0)
            s = buf[: b * m].view(b, m)
            fill(i0, s)
            ext.infonce_col_norm_block(s.numpy(), sc, i0, ql, kl, has_labels, bool(in_batch_negatives), cl, an)
        tot = acc[0] + acc[1]
        w = torch.where(live, gc / tot, 0.0)
        pk = torch.where(one, 0.0, 1.0)
        pc = torch.where(one, w * acc[0], gc / npos.double().clamp_min(1))  # one positive: -g_col T_np / T
    else:
        w = gc
        pk = torch.ones(m, dtype=torch.float64)
        pc = gc / npos.double().clamp_min(1)
    # one-exponential backward (csrc `factored`): col_cb_j = col_w_j exp(R - lsec_j), R = min lsec_j over the
    # columns that carry a gradient (inf when there is none: the kernel then never factors; NaN when a column's
    # lse is NaN, so that the NaN reaches every row through the two-exponential path)
    grad_cols = live & (gc != 0) & ~(lse <= -1e30)
    lsec64 = lse.double()
    if bool(torch.isnan(lsec64[live]).any()):
        col_ref = float("nan")
    else:
        col_ref = float(lsec64[grad_cols].min()) if bool(grad_cols.any()) else float("inf")
    cb = torch.where(grad_cols, w * torch.exp(col_ref - lsec64), 0.0) if col_ref == col_ref else torch.zeros(m)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    return col_lse, f32(w), f32(pk), f32(pc), f32(cb), col_ref


def infonce_bwd(q, k, bank, scale, q_labels, k_labels, exclude_self: bool, in_batch_negatives: bool, pml: bool,
                symmetric: bool, row_stats, col_stats, g_row, g_col, needs_dq: bool = True, needs_dk: bool = True,
                needs_dbank: bool = True, deterministic=None, external_stats: bool = False):
    """-> (dq like q or None, dk like k or None, dbank like bank or None, dscale 0-d float32).

    ``needs_dq`` / ``needs_dk`` / ``needs_dbank``: the products of gradients nobody asked for are skipped (a MoCo
    bank without grad: no dbank product).  ``deterministic`` is accepted for the launcher contract: this backend
    is deterministic for a given thread count either way (README, Numerics).  ``external_stats``: the stats were
    merged over more keys than ``k`` (a ring block of ``contrastgen.distributed``, the in-batch part of the
    per-query-negatives op), so neither rows nor columns are renormalised against this call's keys (not pml;
    diagonal positives run the label path with index labels, which has that mode)."""
    ext = _need_ext()
    if external_stats and q_labels is None:
        q_labels = torch.arange(q.shape[0], dtype=torch.int64)
        k_labels = torch.arange(k.shape[0], dtype=torch.int64)
    qf, keys, m, kb, has_labels, ql, kl = _prepare(q, k, bank, q_labels, k_labels)
    n, c, d = qf.shape[0], keys.shape[0], qf.shape[1]
    _check_flags(exclude_self, symmetric, pml, kb, n, m)
    if external_stats and pml:
        raise ValueError("external_stats=True needs pml=False")
    needs_dbank = bool(needs_dbank) and kb > 0
    sc = _scalar(scale, "scale")
    rstats = row_stats.detach().to(torch.float32).contiguous()
    g = g_row.detach().to(torch.float32).contiguous()
    if rstats.shape != (n, 2) or g.shape != (n,):
        raise ValueError(f"row_stats must be ({n}, 2) and g_row ({n},), got {tuple(rstats.shape)}, {tuple(g.shape)}")
    bsz = _block_rows(n, c)
    buf = torch.empty(bsz * c, dtype=torch.float32)
    fill = _logits_product(qf, keys)
    qln, kln = ql.numpy(), kl.numpy()
    if symmetric:
        cols = _column_terms(ext, fill, n, m, bsz, buf, sc, qln, kln, has_labels, in_batch_negatives, col_stats, g_col,
                             renormalize=not external_stats)
        cl, cw, cpk, cpc, ccb = (t.numpy() for t in cols[:5])
        col_ref = cols[5]
    else:
        cl = cw = cpk = cpc = ccb = _EMPTY_F32.numpy()
        col_ref = float("inf")
    dq = torch.empty(n, d, dtype=torch.float32) if needs_dq else None
    # dK rows: [0, m) for dk, [m, c) for dbank; only the needed range is accumulated
    k0, k1 = (0 if needs_dk else m), (c if needs_dbank else m)
    dkeys = torch.zeros(max(k1 - k0, 0), d, dtype=torch.float32) if k1 > k0 else None
    rsn, gn = rstats.numpy(), g.numpy()
    # label / exclude_self / bank-only rows (not pml, not symmetric): dscale = sum_ij dS_ij q_i.k_j is taken from the
    # products, sum_i q_i . dq_i / scale (O(N D)), which spares the epilogue three reductions per logit
    fast = not has_labels and not exclude_self and in_batch_negatives and not pml
    from_products = needs_dq and not fast and not pml and not symmetric and sc != 0.0
    dscale = 0.0
    for i0 in range(0, n, bsz):
        b = min(bsz, n - i0)
        s = buf[: b * c].view(b, c)
        fill(i0, s)
        dscale += ext.infonce_bwd_block(s.numpy(), sc, i0, m, qln, kln, has_labels, bool(exclude_self),
                                        bool(in_batch_negatives), bool(pml), bool(symmetric), rsn[i0:i0 + b],
                                        gn[i0:i0 + b], cl, cw, cpk, cpc, ccb, col_ref, not from_products,
                                        not external_stats)
        if dq is not None:
            torch.matmul(s, keys, out=dq[i0:i0 + b])             # (b, C) @ (C, D): dQ_blk = scale dS K
        if dkeys is not None:
            dkeys.addmm_(s[:, k0:k1].T, qf[i0:i0 + b])            # (C', b) @ (b, D): dK += scale dS^T Q_blk
    if from_products:
        dscale = float(torch.dot(qf.reshape(-1).double(), dq.reshape(-1).double())) / sc
    dk = dbank = None
    if needs_dk:
        # with a bank, copy so that dk and dbank do not share storage (custom-op outputs must not alias)
        dk = dkeys[:m].to(k.dtype, copy=needs_dbank)
    if needs_dbank:
        dbank = dkeys[m - k0:].to(bank.dtype, copy=True)
    return (None if dq is None else dq.to(q.dtype)), dk, dbank, torch.tensor(dscale, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- SigLIP
def siglip_fwd(q, k, scale, bias):
    """-> row_loss (N,) float32: sum_j -log sigmoid(y_ij (scale q_i.k_j + bias))."""
    ext = _need_ext()
    qf, kf = _f32(q, "q"), _f32(k, "k")
    if kf.shape[1] != qf.shape[1]:
        raise ValueError(f"q and k must have the same feature dimension: {tuple(q.shape)} vs {tuple(k.shape)}")
    sc, bi = _scalar(scale, "scale"), _scalar(bias, "bias")
    n, c = qf.shape[0], kf.shape[0]
    row_loss = torch.empty(n, dtype=torch.float32)
    bsz = _block_rows(n, c)
    buf = torch.empty(bsz * c, dtype=torch.float32)
    fill = _logits_product(qf, kf)
    rl = row_loss.numpy()
    for i0 in range(0, n, bsz):
        b = min(bsz, n - i0)
        s = buf[: b * c].view(b, c)
        fill(i0, s)
        ext.siglip_fwd_block(s.numpy(), sc, bi, i0, rl[i0:i0 + b])
    return row_loss


def siglip_bwd(q, k, scale, bias, g_row, needs_dq: bool = True, needs_dk: bool = True, deterministic=None):
    """-> (dq like q or None, dk like k or None, dscale 0-d float32, dbias 0-d float32); the products of
    gradients not needed are skipped."""
    ext = _need_ext()
    qf, kf = _f32(q, "q"), _f32(k, "k")
    if kf.shape[1] != qf.shape[1]:
        raise ValueError(f"q and k must have the same feature dimension: {tuple(q.shape)} vs {tuple(k.shape)}")
    sc, bi = _scalar(scale, "scale"), _scalar(bias, "bias")
    n, c, d = qf.shape[0], kf.shape[0], qf.shape[1]
    g = g_row.detach().to(torch.float32).contiguous()
    if g.shape != (n,):
        raise ValueError(f"g_row must have shape ({n},), got {tuple(g.shape)}")
    dq = torch.empty(n, d, dtype=torch.float32) if needs_dq else None
    dk = torch.zeros(c, d, dtype=torch.float32) if needs_dk else None
    bsz = _block_rows(n, c)
    buf = torch.empty(bsz * c, dtype=torch.float32)
    gn = g.numpy()
    fill = _logits_product(qf, kf)
    dscale = dbias = 0.0
    for i0 in range(0, n, bsz):
        b = min(bsz, n - i0)
        s = buf[: b * c].view(b, c)
        fill(i0, s)
        ds, db = ext.siglip_bwd_block(s.numpy(), sc, bi, i0, gn[i0:i0 + b])
        dscale += ds
        dbias += db
        if dq is not None:
            torch.matmul(s, kf, out=dq[i0:i0 + b])
        if dk is not None:
            dk.addmm_(s.T, qf[i0:i0 + b])
    return ((None if dq is None else dq.to(q.dtype)), (None if dk is None else dk.to(k.dtype)),
            torch.tensor(dscale, dtype=torch.float32), torch.tensor(dbias, dtype=torch.float32))
