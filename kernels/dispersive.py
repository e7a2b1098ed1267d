"""Triton kernels for Dispersive Loss (Wang & He 2025) and uniformity (Wang & Isola 2020).

Math (per group g; Z is (B, M), one sample per row; METHODS.md section 2):

  Gram regime (B <= 512, M huge; bandwidth bound):
    Gram  S = Z Z^T (B x B) by split-K (``_gram_partial_kernel``), s_i = S_ii,
    r_ij = s_i + s_j - 2 S_ij,  d_ij = max(r_ij, 0) / M.
    infonce_l2:     L = log(1/B^2 sum_ij exp(-d_ij/tau)),   dL/dr_ij = -p_ij/(tau M) [r_ij >= 0], p = softmax(-d/tau)
    hinge:          L = 1/B^2 sum_ij max(0, margin - d_ij)^2, dL/dr_ij = -2 max(0, margin - d_ij)/(B^2 M) [r_ij >= 0]
    infonce_cosine: L = log(1/B^2 sum_ij exp(S_ij/(n_i n_j tau))), n_i = sqrt(s_i)
    covariance:     Zn = batchnorm(Z) (per column m: mean mu_m, biased var v_m, rstd_m = (v_m+eps)^-1/2),
                    Sn = Zn Zn^T, L = ||Sn||_F^2/B^2 - sum_m c_m^2, c_m = v_m rstd_m^2.
    The B x B epilogue (loss, and W = dL/dS + dL/dS^T + 2 diag(dL/ds)) is tiny and runs in PyTorch
    (contrastgen/ops/dispersive.py); for l2/hinge W = 4 (diag(rowsum A) - A) with A_ij = dL/dr_ij.
    Backward dZ = W Z streamed in one pass over Z (``_stream_wz_kernel``: read Z once, write dZ once).
    Covariance backward: dZn = W' Zn + dg c_m Zn (W' = 4 g/B^2 Sn, dg = -4 g/B), then per column the
    batch-norm backward dZ = rstd (dZn - mean_b dZn - Zn mean_b(dZn Zn)); the column sums need all B rows of
    a column, so each program owns a column slice and all B rows (two sweeps over its slice).

  Many-samples regime (N up to 1e6, M <= ~1024): a flash-attention-like tiled N^2 reduction.
    MODE 0 (l2 / uniformity): logit_ij = -alpha max(r_ij, 0); MODE 1 (cosine on normalised rows):
    logit_ij = alpha x_i.x_j; MODE 2 (hinge): h_ij = max(0, margin - alpha max(r_ij, 0))^2.
    Forward (``_pairs_fwd_kernel``) keeps a running max / sum per row (online log-sum-exp; hinge: plain row sum)
    and writes one value per row; L = logsumexp(rows) - log(count) in the launcher.
    Backward (``_pairs_bwd_kernel``) recomputes the tiles: with P_ij = g exp(logit_ij - L - log count),
      MODE 0/2: c_ij = dL/dr_ij, dx_i = 4 (rowsum(c)_i x_i - (c X)_i)
      MODE 1:   c_ij = alpha P_ij,  dx_i = 2 (c X)_i          (c is symmetric, so one row pass suffices)
    Uniformity: MODE 0, alpha = t, diagonal excluded, count = N (N - 1).

Every kernel takes the group index as a grid axis: grouped input (G, B, M) runs in one launch.
Accumulation is fp32 (fp64 for fp64 input, used by gradcheck).  Row norms are the Gram diagonal (no extra pass).

Known costs (GPU tile sizes in ``_CFG``, bounded by zero register spills on sm_80 / sm_90a):
  * the Gram kernel tiles B in 64-row blocks: with T = cdiv(B, 64) row blocks each K slice of Z is read by
    T programs (B <= 64: once; B = 256: up to 4 times, partly from L2);
  * the tiled backward splits the output columns in BLOCK_DO = 16..32 wide programs, each recomputing its
    logits tiles: cdiv(M, BLOCK_DO) x the forward's dot products (fine for M <= 64, costly for M ~ 1024).

Workarounds (dated):
  * 2026-11-24: the Triton interpreter multiplies raw bits in bf16 ``tl.dot`` (triton issue 11584):
    ``UPCAST`` casts dot operands to fp32, set by the launchers only when TRITON_INTERPRET=1.
  * 2026-11-24: fp32 operands use ``input_precision="tf32x3"`` (``PREC``): plain tf32 loses the
    cancellation in s_i + s_j - 2 z_i.z_j; ieee fp32 would make the Gram compute bound on H100.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODE_L2, MODE_DOT, MODE_HINGE = 0, 1, 2


# ----------------------------------------------------------------------------------------------- Gram regime
@triton.jit
def _gram_partial_kernel(z_ptr, out_ptr, mean_ptr, rstd_ptr, B, M, stride_zg, stride_zb, k_per_split, n_tiles,
                         NORMALIZE: tl.constexpr, USE_ATOMIC: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Partial Gram of one (row tile, col tile, K slice, group): out[g, split, i, j] = sum_k z_ik z_jk.

    Only tiles with tile_j >= tile_i are computed (the Gram is symmetric; the launcher mirrors).
    NORMALIZE: z is batch-normalised on the fly with per-column mean / rstd (covariance variant)."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    ti = pid_t // n_tiles
    tj = pid_t % n_tiles
    if tj >= ti:
        offs_i = ti * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_j = tj * BLOCK_B + tl.arange(0, BLOCK_B)
        mi = offs_i < B
        mj = offs_j < B
        zg = z_ptr + g.to(tl.int64) * stride_zg
        k0 = split * k_per_split
        k_end = tl.minimum(k0 + k_per_split, M)
        acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=ACC)
        for k in range(k0, k_end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mk = offs_k < k_end
            a = tl.load(zg + offs_i[:, None] * stride_zb + offs_k[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
            b = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
            if NORMALIZE:
                mu = tl.load(mean_ptr + g * M + offs_k, mask=mk, other=0.0)
                rs = tl.load(rstd_ptr + g * M + offs_k, mask=mk, other=0.0)
                a = tl.where(mi[:, None] & mk[None, :], (a.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
                b = tl.where(mj[:, None] & mk[None, :], (b.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            # (BLOCK_B, BLOCK_K) @ (BLOCK_K, BLOCK_B) -> (BLOCK_B, BLOCK_B)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
        if USE_ATOMIC:
            o = out_ptr + g.to(tl.int64) * B * B + offs_i[:, None] * B + offs_j[None, :]
            tl.atomic_add(o, acc, mask=mi[:, None] & mj[None, :])
        else:
            o = out_ptr + (g.to(tl.int64) * tl.num_programs(1) + split) * B * B + offs_i[:, None] * B + offs_j[None, :]
            tl.store(o, acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _colstats_kernel(z_ptr, mean_ptr, rstd_ptr, B, M, stride_zg, stride_zb, eps,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-column batch statistics of one (K slice, group): mean_m, rstd_m = (var_m + eps)^-1/2 (biased var).
    Two sweeps over the (B, BLOCK_K) slice (the second one hits L2)."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < M
    zg = z_ptr + g.to(tl.int64) * stride_zg
    s = tl.zeros((BLOCK_K,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        x = tl.load(zg + offs_b[:, None] * stride_zb + offs_k[None, :], mask=(offs_b < B)[:, None] & mk[None, :], other=0.0)
        s += tl.sum(x.to(ACC), 0)
    mu = s / B
    v = tl.zeros((BLOCK_K,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        msk = (offs_b < B)[:, None] & mk[None, :]
        x = tl.load(zg + offs_b[:, None] * stride_zb + offs_k[None, :], mask=msk, other=0.0)
        dx = tl.where(msk, x.to(ACC) - mu[None, :], 0.0)
        v += tl.sum(dx * dx, 0)
    rstd = 1.0 / tl.sqrt(v / B + eps)
    tl.store(mean_ptr + g * M + offs_k, mu, mask=mk)
    tl.store(rstd_ptr + g * M + offs_k, rstd, mask=mk)


@triton.jit
def _stream_wz_kernel(w_ptr, z_ptr, dz_ptr, mean_ptr, rstd_ptr, dg_ptr, B, M, stride_zg, stride_zb, eps,
                      COV: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dZ[g, :, kslice] = W[g] @ Z[g, :, kslice] for one (K slice, group); W is (G, B, B) in ACC dtype.

    COV: Z is batch-normalised on the fly, T = W Zn + dg c_m Zn is written, then (after a barrier) each
    tile is re-read and replaced by the batch-norm backward rstd (T - mean_b T - Zn mean_b(T Zn))."""
    ACC: tl.constexpr = w_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < M
    zg = z_ptr + g.to(tl.int64) * stride_zg
    dzg = dz_ptr + g.to(tl.int64) * B * M
    wg = w_ptr + g.to(tl.int64) * B * B
    if COV:
        mu = tl.load(mean_ptr + g * M + offs_k, mask=mk, other=0.0)
        rs = tl.load(rstd_ptr + g * M + offs_k, mask=mk, other=0.0)
        dg = tl.load(dg_ptr + g)
        cdiag = dg * (1.0 - eps * rs * rs)            # dg * c_m, c_m = var_m / (var_m + eps)
        s1 = tl.zeros((BLOCK_K,), dtype=ACC)
        s2 = tl.zeros((BLOCK_K,), dtype=ACC)
    for i0 in range(0, B, BLOCK_B):
        offs_i = i0 + tl.arange(0, BLOCK_B)
        mi = offs_i < B
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
        for j0 in range(0, B, BLOCK_B):
            offs_j = j0 + tl.arange(0, BLOCK_B)
            mj = offs_j < B
            w = tl.load(wg + offs_i[:, None] * B + offs_j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
            zj = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
            zj = zj.to(ACC)
            if COV:
                zj = tl.where(mj[:, None] & mk[None, :], (zj - mu[None, :]) * rs[None, :], 0.0)
            if UPCAST:
                zj = zj.to(tl.float32)
            # (BLOCK_B, BLOCK_B) @ (BLOCK_B, BLOCK_K) -> (BLOCK_B, BLOCK_K)
            acc = tl.dot(w, zj, acc, input_precision=PREC, out_dtype=ACC)
        msk = mi[:, None] & mk[None, :]
        if COV:
            zi = tl.load(zg + offs_i[:, None] * stride_zb + offs_k[None, :], mask=msk, other=0.0)
            zni = tl.where(msk, (zi.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
            acc += cdiag[None, :] * zni
            s1 += tl.sum(acc, 0)
            s2 += tl.sum(acc * zni, 0)
            tl.store(dzg + offs_i[:, None] * M + offs_k[None, :], acc.to(dz_ptr.dtype.element_ty), mask=msk)
        else:
            tl.store(dzg + offs_i[:, None] * M + offs_k[None, :], acc.to(dz_ptr.dtype.element_ty), mask=msk)
    if COV:
        # 2026-11-24: the second sweep re-reads what this program stored; the barrier makes the stores of
        # every thread of the CTA visible (layouts of the store and the load may differ).
        tl.debug_barrier()
        m1 = s1 / B
        m2 = s2 / B
        for i0 in range(0, B, BLOCK_B):
            offs_i = i0 + tl.arange(0, BLOCK_B)
            msk = (offs_i < B)[:, None] & mk[None, :]
            t = tl.load(dzg + offs_i[:, None] * M + offs_k[None, :], mask=msk, other=0.0).to(ACC)
            zi = tl.load(zg + offs_i[:, None] * stride_zb + offs_k[None, :], mask=msk, other=0.0)
            zni = (zi.to(ACC) - mu[None, :]) * rs[None, :]
            dx = rs[None, :] * (t - m1[None, :] - zni * m2[None, :])
            tl.store(dzg + offs_i[:, None] * M + offs_k[None, :], dx.to(dz_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------- many-samples regime
@triton.jit
def _pair_dots(x_ptr, offs_i, offs_j, mi, mj, D, stride_xn, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dot_ij = x_i . x_j for one (BLOCK_N, BLOCK_N) tile, reducing over D in BLOCK_D chunks."""
    dot = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        xi = tl.load(x_ptr + offs_i[:, None] * stride_xn + offs_d[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        xj = tl.load(x_ptr + offs_j[:, None] * stride_xn + offs_d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        if UPCAST:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        # (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_N) -> (BLOCK_N, BLOCK_N)
        dot = tl.dot(xi, tl.trans(xj), dot, input_precision=PREC, out_dtype=ACC)
    return dot


@triton.jit
def _pairs_fwd_kernel(x_ptr, sq_ptr, out_ptr, N, D, stride_xg, stride_xn, alpha, margin,
                      MODE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Per row i of one (row block, group): MODE 0/1 logsumexp_j logit_ij (online max / sum); MODE 2 sum_j h_ij."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.program_id(1)
    xg = x_ptr + g.to(tl.int64) * stride_xg
    offs_i = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mi = offs_i < N
    si = tl.load(sq_ptr + g * N + offs_i, mask=mi, other=0.0)
    m_run = tl.full((BLOCK_N,), -float("inf"), dtype=ACC)
    l_run = tl.zeros((BLOCK_N,), dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        mj = offs_j < N
        dot = _pair_dots(xg, offs_i, offs_j, mi, mj, D, stride_xn, ACC, BLOCK_N, BLOCK_D, UPCAST, PREC)
        sj = tl.load(sq_ptr + g * N + offs_j, mask=mj, other=0.0)
        valid = mi[:, None] & mj[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (offs_i[:, None] != offs_j[None, :])
        if MODE == 1:
            logit = alpha * dot
        else:
            r = tl.maximum(si[:, None] + sj[None, :] - 2.0 * dot, 0.0)
            logit = -alpha * r
        if MODE == 2:
            h = tl.maximum(margin + logit, 0.0)
            l_run += tl.sum(tl.where(valid, h * h, 0.0), 1)
        else:
            logit = tl.where(valid, logit, -float("inf"))
            m_new = tl.maximum(m_run, tl.max(logit, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
            m_run = m_new
    if MODE == 2:
        res = l_run
    else:
        res = m_run + tl.log(l_run)
    tl.store(out_ptr + g * N + offs_i, res, mask=mi)


@triton.jit
def _pairs_bwd_kernel(x_ptr, sq_ptr, dx_ptr, lse_ptr, gout_ptr, N, D, stride_xg, stride_xn, alpha, margin, hscale,
                      MODE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PREC_X: tl.constexpr,
                      PREC: tl.constexpr):
    """dx of one (row block, output column slice of width BLOCK_DO, group); tiles are recomputed.

    lse_ptr[g]: the total log-sum-exp (MODE 0/1), gout_ptr[g]: upstream gradient of group g,
    hscale: 1/B^2 (MODE 2: dL/dd_ij = -2 hscale max(0, margin - d_ij))."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2)
    xg = x_ptr + g.to(tl.int64) * stride_xg
    offs_i = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mi = offs_i < N
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mo = offs_o < D
    gout = tl.load(gout_ptr + g).to(ACC)
    lse = tl.load(lse_ptr + g).to(ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    rows = tl.zeros((BLOCK_N,), dtype=ACC)
    si = tl.load(sq_ptr + g * N + offs_i, mask=mi, other=0.0)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        mj = offs_j < N
        dot = _pair_dots(xg, offs_i, offs_j, mi, mj, D, stride_xn, ACC, BLOCK_N, BLOCK_D, UPCAST, PREC_X)
        sj = tl.load(sq_ptr + g * N + offs_j, mask=mj, other=0.0)
        valid = mi[:, None] & mj[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (offs_i[:, None] != offs_j[None, :])
        if MODE == 1:
            c = alpha * gout * tl.exp(alpha * dot - lse)
        else:
            rr = si[:, None] + sj[None, :] - 2.0 * dot
            r = tl.maximum(rr, 0.0)
            if MODE == 0:
                c = -alpha * gout * tl.exp(-alpha * r - lse)
            else:
                c = -2.0 * hscale * alpha * gout * tl.maximum(margin - alpha * r, 0.0)
            c = tl.where(rr >= 0.0, c, 0.0)
        c = tl.where(valid, c, 0.0)
        rows += tl.sum(c, 1)
        xj = tl.load(xg + offs_j[:, None] * stride_xn + offs_o[None, :], mask=mj[:, None] & mo[None, :], other=0.0)
        xj = xj.to(ACC)
        if UPCAST:
            xj = xj.to(tl.float32)
        # (BLOCK_N, BLOCK_N) @ (BLOCK_N, BLOCK_DO) -> (BLOCK_N, BLOCK_DO)
        acc = tl.dot(c, xj, acc, input_precision=PREC, out_dtype=ACC)
    msk = mi[:, None] & mo[None, :]
    if MODE == 1:
        dx = 2.0 * acc
    else:
        xi = tl.load(xg + offs_i[:, None] * stride_xn + offs_o[None, :], mask=msk, other=0.0).to(ACC)
        dx = 4.0 * (rows[:, None] * xi - acc)
    tl.store(dx_ptr + g.to(tl.int64) * N * D + offs_i[:, None] * D + offs_o[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=msk)


# --------------------------------------------------------------------------------------------------- launchers
# GPU launch configurations, shared by the launchers and AOT_CONFIGS (so every shipped config is AOT-checked).
# Chosen 2026-11-24 as the largest tiles that compile with zero register spills for both sm_80 and sm_90a
# (tf32x3 splits each fp32 operand in two, which is what bounds the tiles).  Keys: (kernel, "fp32" | "16",
# flags...) -> (constexprs, num_warps, num_stages).
_CFG = {
    ("gram", "fp32", False): (dict(BLOCK_B=64, BLOCK_K=16, PREC="tf32x3"), 4, 3),
    ("gram", "fp32", True): (dict(BLOCK_B=64, BLOCK_K=32, PREC="tf32x3"), 8, 3),       # normalised (covariance)
    ("gram", "16", False): (dict(BLOCK_B=64, BLOCK_K=32, PREC="ieee"), 8, 3),          # bf16 / fp16 tensor cores
    ("gram", "16", True): (dict(BLOCK_B=64, BLOCK_K=16, PREC="tf32x3"), 4, 3),
    ("wz", "fp32", False): (dict(BLOCK_B=32, BLOCK_K=128, PREC="tf32x3"), 8, 2),
    ("wz", "fp32", True): (dict(BLOCK_B=32, BLOCK_K=128, PREC="tf32x3"), 8, 2),
    ("wz", "16", False): (dict(BLOCK_B=32, BLOCK_K=128, PREC="tf32x3"), 8, 2),
    ("wz", "16", True): (dict(BLOCK_B=32, BLOCK_K=128, PREC="tf32x3"), 8, 2),
    ("colstats", "fp32"): (dict(BLOCK_B=32, BLOCK_K=64), 4, 2),
    ("colstats", "16"): (dict(BLOCK_B=32, BLOCK_K=64), 4, 2),
    ("pf", "fp32", 0): (dict(BLOCK_N=64, BLOCK_D=16, PREC="tf32x3"), 8, 2),
    ("pf", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16, PREC="tf32x3"), 4, 2),
    ("pf", "fp32", 2): (dict(BLOCK_N=64, BLOCK_D=16, PREC="tf32x3"), 8, 2),
    ("pf", "16", 0): (dict(BLOCK_N=64, BLOCK_D=32, PREC="ieee"), 8, 2),
    ("pf", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32, PREC="ieee"), 8, 2),
    ("pf", "16", 2): (dict(BLOCK_N=64, BLOCK_D=32, PREC="ieee"), 8, 2),
    ("pb", "fp32", 0): (dict(BLOCK_N=32, BLOCK_D=32, BLOCK_DO=32, PREC_X="tf32x3", PREC="ieee"), 4, 2),
    ("pb", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16, PREC_X="tf32x3", PREC="tf32x3"), 4, 2),
    ("pb", "fp32", 2): (dict(BLOCK_N=32, BLOCK_D=32, BLOCK_DO=32, PREC_X="tf32x3", PREC="ieee"), 4, 2),
    ("pb", "16", 0): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16, PREC_X="ieee", PREC="tf32x3"), 4, 2),
    ("pb", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32, BLOCK_DO=32, PREC_X="ieee", PREC="tf32x3"), 8, 2),
    ("pb", "16", 2): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16, PREC_X="ieee", PREC="tf32x3"), 4, 2),
}


def _cls(dtype) -> str:
    return "16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


# Tests set this to run the GPU tile sizes of _CFG under the interpreter (small shapes only).
INTERPRET_WITH_GPU_CONFIGS = False


def _config(key, dtype, interp: dict):
    """(constexprs, num_warps, num_stages): the interpreter gets few, large tiles (its time grows with the
    number of tiles); float64 (gradcheck) runs the fp32 tiles with ieee products."""
    if _INTERPRET and not INTERPRET_WITH_GPU_CONFIGS:
        cx = dict(interp)
        warps, stages = 4, 2
    else:
        cx, warps, stages = _CFG[(key[0], _cls(dtype)) + tuple(key[1:])]
        cx = dict(cx)
    if dtype == torch.float64:
        cx.update({k: "ieee" for k in ("PREC", "PREC_X") if k in cx})
    else:
        for k in ("PREC", "PREC_X"):
            cx.setdefault(k, interp.get(k))
    return cx, warps, stages


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(dtype) -> bool:
    return _INTERPRET and dtype in (torch.bfloat16, torch.float16)


def _prec(dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _rowmajor(z: torch.Tensor) -> torch.Tensor:
    """(G, B, M) with unit stride along M (any G / B strides are passed to the kernels)."""
    return z if z.stride(-1) == 1 else z.contiguous()


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _interp_block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def gram(z: torch.Tensor, *, normalize: tuple | None = None, splits: int | None = None,
         deterministic: bool = True) -> torch.Tensor:
    """Gram matrices Z Z^T of z (G, B, M) -> (G, B, B) in the accumulation dtype (split-K, symmetric tiles).

    normalize=(mean, rstd) (each (G, M)): the Gram of the batch-normalised Z (covariance variant).
    deterministic: partial Grams in a (G, splits, B, B) buffer summed in a fixed order; else fp32 atomics."""
    z = _rowmajor(z)
    G, B, M = z.shape
    acc_t = _acc_torch(z.dtype)
    norm = normalize is not None
    cx, warps, stages = _config(("gram", norm), z.dtype, dict(BLOCK_B=_interp_block(B), BLOCK_K=64,
                                                               PREC=_prec(acc_t if norm else z.dtype)))
    BB, BK = cx["BLOCK_B"], cx["BLOCK_K"]
    T = triton.cdiv(B, BB)
    n_tri = T * (T + 1) // 2
    if splits is None:
        target = 1 if _INTERPRET else 4 * _num_sms(z.device)
        splits = max(1, min(triton.cdiv(target, G * n_tri), triton.cdiv(M, 8 * BK)))
    k_per = triton.cdiv(triton.cdiv(M, splits), BK) * BK
    splits = triton.cdiv(M, k_per)
    if deterministic:
        out = torch.zeros((G, splits, B, B), device=z.device, dtype=acc_t)
    else:
        out = torch.zeros((G, B, B), device=z.device, dtype=acc_t)
    mean, rstd = (t.to(acc_t).contiguous() for t in normalize) if norm else (out, out)
    _gram_partial_kernel[(T * T, splits, G)](
        z, out, mean, rstd, B, M, z.stride(0), z.stride(1), k_per, T, NORMALIZE=norm, USE_ATOMIC=not deterministic,
        UPCAST=_upcast(z.dtype), **cx, num_warps=warps, num_stages=stages)
    upper = out.sum(1) if deterministic else out
    t = torch.arange(B, device=z.device) // BB
    written = t[:, None] <= t[None, :]
    return torch.where(written, upper, upper.transpose(-1, -2))


def colstats(z: torch.Tensor, eps: float):
    """Per-column batch mean and rstd = (biased var + eps)^-1/2 of z (G, B, M) -> two (G, M) tensors."""
    z = _rowmajor(z)
    G, B, M = z.shape
    acc_t = _acc_torch(z.dtype)
    mean = torch.empty((G, M), device=z.device, dtype=acc_t)
    rstd = torch.empty((G, M), device=z.device, dtype=acc_t)
    cx, warps, stages = _config(("colstats",), z.dtype, dict(BLOCK_B=64, BLOCK_K=128))
    cx = {k: v for k, v in cx.items() if k in ("BLOCK_B", "BLOCK_K")}
    _colstats_kernel[(triton.cdiv(M, cx["BLOCK_K"]), G)](z, mean, rstd, B, M, z.stride(0), z.stride(1), eps, **cx,
                                                         num_warps=warps, num_stages=stages)
    return mean, rstd


def stream_wz(w: torch.Tensor, z: torch.Tensor, *, cov: tuple | None = None, eps: float = 0.0) -> torch.Tensor:
    """dZ = W Z for W (G, B, B), z (G, B, M) -> (G, B, M) in z's dtype; one pass over Z.

    cov=(mean, rstd, dg): batch-normalise Z on the fly, add dg[g] c_m Zn and apply the batch-norm backward."""
    z = _rowmajor(z)
    G, B, M = z.shape
    acc_t = _acc_torch(z.dtype)
    w = w.to(acc_t).contiguous()
    dz = torch.empty((G, B, M), device=z.device, dtype=z.dtype)
    cx, warps, stages = _config(("wz", cov is not None), z.dtype,
                                dict(BLOCK_B=_interp_block(B), BLOCK_K=64, PREC=_prec(acc_t)))
    if cov is None:
        mean = rstd = dg = w
    else:
        mean, rstd, dg = (t.to(acc_t).contiguous() for t in cov)
    _stream_wz_kernel[(triton.cdiv(M, cx["BLOCK_K"]), G)](
        w, z, dz, mean, rstd, dg, B, M, z.stride(0), z.stride(1), eps, COV=cov is not None, UPCAST=_upcast(z.dtype),
        **cx, num_warps=warps, num_stages=stages)
    return dz


def _row_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms (G, N) in the accumulation dtype (one extra read of X: O(N M), negligible here)."""
    xa = x.to(_acc_torch(x.dtype))
    return (xa * xa).sum(-1).contiguous()


def pairs_fwd(x: torch.Tensor, mode: int, alpha: float, margin: float = 0.0, exclude_diag: bool = False) -> torch.Tensor:
    """Per-row log-sum-exp (modes 0, 1) or hinge row sums (mode 2) of x (G, N, D) -> (G, N), accumulation dtype."""
    x = _rowmajor(x)
    G, N, D = x.shape
    out = torch.empty((G, N), device=x.device, dtype=_acc_torch(x.dtype))
    cx, warps, stages = _config(("pf", mode), x.dtype, dict(BLOCK_N=_interp_block(N), BLOCK_D=_interp_block(D, 16, 128),
                                                             PREC=_prec(x.dtype)))
    _pairs_fwd_kernel[(triton.cdiv(N, cx["BLOCK_N"]), G)](
        x, _row_sq(x), out, N, D, x.stride(0), x.stride(1), float(alpha), float(margin), MODE=mode,
        EXCLUDE_DIAG=exclude_diag, UPCAST=_upcast(x.dtype), **cx, num_warps=warps, num_stages=stages)
    return out


def pairs_bwd(x: torch.Tensor, lse: torch.Tensor, gout: torch.Tensor, mode: int, alpha: float, margin: float = 0.0,
              hscale: float = 0.0, exclude_diag: bool = False) -> torch.Tensor:
    """dx (G, N, D) in x's dtype; lse (G,) total log-sum-exp (modes 0/1), gout (G,) upstream gradient."""
    x = _rowmajor(x)
    G, N, D = x.shape
    acc_t = _acc_torch(x.dtype)
    dx = torch.empty((G, N, D), device=x.device, dtype=x.dtype)
    bd = _interp_block(D, 16, 128)
    cx, warps, stages = _config(("pb", mode), x.dtype, dict(BLOCK_N=_interp_block(N), BLOCK_D=bd, BLOCK_DO=bd,
                                                             PREC_X=_prec(x.dtype), PREC=_prec(acc_t)))
    _pairs_bwd_kernel[(triton.cdiv(N, cx["BLOCK_N"]), triton.cdiv(D, cx["BLOCK_DO"]), G)](
        x, _row_sq(x), dx, lse.to(acc_t).contiguous(), gout.to(acc_t).contiguous(), N, D, x.stride(0), x.stride(1),
        float(alpha), float(margin), float(hscale), MODE=mode, EXCLUDE_DIAG=exclude_diag, UPCAST=_upcast(x.dtype),
        **cx, num_warps=warps, num_stages=stages)
    return dx


# ------------------------------------------------------------------------------------------ AOT configurations
def _aot_configs():
    """One AotConfig per launchable GPU configuration: every _CFG entry x input dtype x the flags that are
    compile-time constants (atomic / deterministic Gram, diagonal excluded or not)."""
    mod = "contrastgen.kernels.dispersive"
    cfgs = []
    for dt in ("fp32", "bf16", "fp16"):
        cls = "fp32" if dt == "fp32" else "16"
        for normalize, atomic in ((False, False), (True, False), (False, True), (True, True)):
            cx, w, st = _CFG[("gram", cls, normalize)]
            cfgs.append(AotConfig(
                kernel=f"{mod}:_gram_partial_kernel",
                signature={"z_ptr": f"*{dt}", "out_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                           "B": "i32", "M": "i32", "stride_zg": "i64", "stride_zb": "i32", "k_per_split": "i32",
                           "n_tiles": "i32", "NORMALIZE": "constexpr", "USE_ATOMIC": "constexpr",
                           "BLOCK_B": "constexpr", "BLOCK_K": "constexpr", "UPCAST": "constexpr", "PREC": "constexpr"},
                constexprs={"NORMALIZE": normalize, "USE_ATOMIC": atomic, **cx, "UPCAST": False},
                num_warps=w, num_stages=st))
        cx, w, st = _CFG[("colstats", cls)]
        cfgs.append(AotConfig(
            kernel=f"{mod}:_colstats_kernel",
            signature={"z_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "B": "i32", "M": "i32",
                       "stride_zg": "i64", "stride_zb": "i32", "eps": "fp32", "BLOCK_B": "constexpr",
                       "BLOCK_K": "constexpr"},
            constexprs=dict(cx), num_warps=w, num_stages=st))
        for cov in (False, True):
            cx, w, st = _CFG[("wz", cls, cov)]
            cfgs.append(AotConfig(
                kernel=f"{mod}:_stream_wz_kernel",
                signature={"w_ptr": "*fp32", "z_ptr": f"*{dt}", "dz_ptr": f"*{dt}", "mean_ptr": "*fp32",
                           "rstd_ptr": "*fp32", "dg_ptr": "*fp32", "B": "i32", "M": "i32", "stride_zg": "i64",
                           "stride_zb": "i32", "eps": "fp32", "COV": "constexpr", "BLOCK_B": "constexpr",
                           "BLOCK_K": "constexpr", "UPCAST": "constexpr", "PREC": "constexpr"},
                constexprs={"COV": cov, **cx, "UPCAST": False}, num_warps=w, num_stages=st))
        for mode in (MODE_L2, MODE_DOT, MODE_HINGE):
            for excl in ((False, True) if mode == MODE_L2 else (False,)):
                cx, w, st = _CFG[("pf", cls, mode)]
                cfgs.append(AotConfig(
                    kernel=f"{mod}:_pairs_fwd_kernel",
                    signature={"x_ptr": f"*{dt}", "sq_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "D": "i32",
                               "stride_xg": "i64", "stride_xn": "i32", "alpha": "fp32", "margin": "fp32",
                               "MODE": "constexpr", "EXCLUDE_DIAG": "constexpr", "BLOCK_N": "constexpr",
                               "BLOCK_D": "constexpr", "UPCAST": "constexpr", "PREC": "constexpr"},
                    constexprs={"MODE": mode, "EXCLUDE_DIAG": excl, **cx, "UPCAST": False}, num_warps=w,
                    num_stages=st))
                cx, w, st = _CFG[("pb", cls, mode)]
                cfgs.append(AotConfig(
                    kernel=f"{mod}:_pairs_bwd_kernel",
                    signature={"x_ptr": f"*{dt}", "sq_ptr": "*fp32", "dx_ptr": f"*{dt}", "lse_ptr": "*fp32",
                               "gout_ptr": "*fp32", "N": "i32", "D": "i32", "stride_xg": "i64", "stride_xn": "i32",
                               "alpha": "fp32", "margin": "fp32", "hscale": "fp32", "MODE": "constexpr",
                               "EXCLUDE_DIAG": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
                               "BLOCK_DO": "constexpr", "UPCAST": "constexpr", "PREC_X": "constexpr",
                               "PREC": "constexpr"},
                    constexprs={"MODE": mode, "EXCLUDE_DIAG": excl, **cx, "UPCAST": False}, num_warps=w,
                    num_stages=st))
    return cfgs


AOT_CONFIGS = _aot_configs()
