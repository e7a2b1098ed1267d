"""Triton kernels for Dispersive Loss (Wang & He 2025) and uniformity (Wang & Isola 2020).

Math (per group g; Z is (B, M), one sample per row; METHODS.md section 2).  The self-pairs are constants:
d_ii = 0 and cos_ii = s_i / max(n_i, 1e-12)^2 (= 1 for every non-zero row); they enter the loss but are never
differentiated (through s_i + s_i - 2 z_i.z_i their rounding noise would swamp the gradient near the floor).

  Gram regime (B <= 512, M huge; bandwidth bound):
    Gram  S = Z Z^T (B x B) by split-K, s_i = S_ii, r_ij = s_i + s_j - 2 S_ij (i != j), r_ii = 0,
    d_ij = max(r_ij, 0) / M.  Per row i the epilogue forms a row value v_i and an unscaled weight row Wh_i.:
      infonce_l2:     e_ij = exp(-d_ij / tau) (<= 1, e_ii = 1, so no running max is needed), v_i = sum_j e_ij,
                      L = log(sum_i v_i) - 2 log B,   A_ij = e_ij [r_ij >= 0] (i != j),
                      Wh = 4 (diag(rowsum A) - A),    W = g * (-1 / (tau M S)) * Wh,  S = sum_i v_i
      hinge:          h_ij = max(0, margin - d_ij), v_i = sum_j h_ij^2, L = S / B^2,
                      A_ij = h_ij [r_ij >= 0] (i != j), Wh as above,  W = g * (-2 / (B^2 M)) * Wh
      infonce_cosine: n_i = max(sqrt(s_i), 1e-12), cos_ij = S_ij / (n_i n_j), e_ij = exp((cos_ij - 1) / tau),
                      v_i = sum_j e_ij, L = log S + 1/tau - 2 log B,
                      Wh_ij = 2 e_ij / (n_i n_j) (i != j), Wh_ii = -2 [sqrt(s_i) > 1e-12] sum_{j!=i} e_ij cos_ij / n_i^2,
                      W = g * (1 / (tau S)) * Wh
      covariance:     Zn = batchnorm(Z) (per column m: mean mu_m, biased var v_m, rstd_m = (v_m+eps)^-1/2),
                      Sn = Zn Zn^T, v_i = sum_j Sn_ij^2, L = S / B^2 - sum_m c_m^2 (c_m = v_m rstd_m^2), Wh = Sn,
                      W' = g * (4 / B^2) * Wh, dg = -4 g / B
    The backward is dZ = W Z in one pass over Z (covariance: dZn = W' Zn + dg c_m Zn, then per column the
    batch-norm backward dZ = rstd (dZn - mean_b dZn - Zn mean_b(dZn Zn))).
    16-bit Z: Wh is stored per row as hi + lo in Z's dtype, scaled by a power of two 2^e_i (rowscale_i) so that
    fp16 neither overflows nor underflows; Z is exact in its own dtype, so dZ = g gscale rowscale_i (Wh_hi + Wh_lo) Z
    is two 16-bit tensor-core products with fp32 accumulation ("only W split", ~16 significant bits of W).
    fp32 Z: Wh in fp32, one tf32x3 product (both operands split).  fp64 (gradcheck): ieee.

  Kernels of the Gram regime and their per-tile cost (bf16, sm_90 configs of _CFG; "bytes" are what one tile
  step loads, from L2 / HBM):
    _gram_partial_kernel   (BLOCK_B=128)^2 output tile, one K step of BLOCK_K=64:
                           2*128*128*64 = 2.10 MFLOP per 2*128*64*2 = 32 KiB (diagonal tiles load one block:
                           16 KiB) = 64 (128) FLOP/B.  Only the T(T+1)/2 upper tiles run (T = cdiv(B, 128));
                           the off-diagonal ones also store their transpose, so each split writes a full B x B
                           fp32 partial; B = 256: 3 tiles, each K slice of Z is loaded 2x (from L2), read 1x from HBM.
    _gram_epilogue_kernel  BLOCK_R rows x all B columns: sum of the split-K partials (BLOCK_S splits per step),
                           the variant's loss row values v_i and, if a gradient is wanted, the weight rows Wh_i
                           (hi/lo, rowscale); ~20 FLOP per B x B entry, reads splits*BLOCK_R*B*4 bytes.
    _gram_loss_kernel      one program per group: L and gscale from the B row values (+ sum_m c_m^2).
    _colstats_kernel       covariance only: per column mean / rstd and the partial sums of c_m^2.
    _stream_wz_kernel      (BLOCK_I=128 rows of dZ) x (BLOCK_K=64 columns) per K step, the full B as the
                           reduction: 2 passes (hi, lo) x 2*128*B*64 = 8.4 MFLOP (B = 256) per B*64*2 = 32 KiB
                           of Z loaded + 16 KiB of dZ stored (256 FLOP/B); W's 128 x B hi/lo rows are loaded once
                           per program (128 KiB, held in shared memory: 208 KiB in all), which loops over a long K
                           range (k_per_split: one wave of programs); B > 256 (and fp32 on sm_80) streams W in
                           BLOCK_JC-column chunks at every K step instead.
    _stream_wz_cov_kernel  all B rows x BLOCK_K columns, W' (fp32) streamed in BLOCK_J chunks (tf32x3).

  Many-samples regime (N up to 1e6, M <= ~1024): a flash-attention-like tiled N^2 reduction.
    MODE 0 (l2 / uniformity): logit_ij = -alpha max(r_ij, 0); MODE 1 (cosine on normalised rows):
    logit_ij = alpha x_i.x_j; MODE 2 (hinge): h_ij = max(0, margin - alpha max(r_ij, 0))^2.
    Forward (``_pairs_fwd_kernel``) keeps a running max / sum per row (online log-sum-exp; hinge: plain row sum)
    and writes one value per row; L = logsumexp(rows) - log(count) in the launcher.
    Backward (``_pairs_bwd_kernel``) recomputes the tiles: with P_ij = g exp(logit_ij - L - log count),
      MODE 0/2: c_ij = dL/dr_ij, dx_i = 4 (rowsum(c)_i x_i - (c X)_i)
      MODE 1:   c_ij = alpha P_ij,  dx_i = 2 (c X)_i          (c is symmetric, so one row pass suffices)
    c_ii = 0 (the self-pair is a constant).  Uniformity: MODE 0, alpha = t, diagonal excluded, count = N (N - 1).
    Per tile (BLOCK_N=64, BLOCK_D=32, 16-bit): forward 2*64*64*32 = 262 kFLOP per 2*64*32*2 = 8 KiB (32 FLOP/B);
    backward the same plus 2*64*64*BLOCK_DO for the c X product.

Every kernel takes the group index as a grid axis: grouped input (G, B, M) runs in one launch.  Offsets inside a
group are int32: the launchers raise ValueError when a group has 2**31 elements or more.
Accumulation is fp32 (fp64 for fp64 input, used by gradcheck).  Row norms are the Gram diagonal (no extra pass).
Clamps are written as ``where(x < 0, 0, x)`` so that a NaN propagates (``tl.maximum`` returns the other operand).

Known costs:
  * the split-K partial Grams ((G, splits, B, B) fp32, splits ~ #SMs / tiles) are written and read once more;
    B = 256 on 132 SMs: 44 splits = 11.5 MB against 151 MB of Z (mostly served from L2);
  * the two-pass (hi, lo) backward does 2 x 2 B^2 M FLOP: at B = 256 it is compute bound (~98 us at 790 TFLOP/s
    against 63 us of HBM traffic); one pass would be memory bound but keep only bf16's 8 bits of W;
  * covariance backward streams W' (B^2 fp32) per BLOCK_K columns from L2 (B = 256: 256 KiB per 64 columns);
  * the tiled backward splits the output columns in BLOCK_DO = 16..32 wide programs, each recomputing its
    logits tiles: cdiv(M, BLOCK_DO) x the forward's dot products (fine for M <= 64, costly for M ~ 1024).

Workarounds (dated):
  * 2026-11-24: the Triton interpreter multiplies raw bits in bf16 ``tl.dot`` (triton issue 11584):
    ``UPCAST`` casts dot operands to fp32, set by the launchers only when TRITON_INTERPRET=1.
  * 2026-11-24: fp32 operands use ``input_precision="tf32x3"`` (``PREC``): plain tf32 loses the
    cancellation in s_i + s_j - 2 z_i.z_j; ieee fp32 would make the Gram compute bound on H100.
  * 2026-12-01: Triton takes Python floats as fp32 scalars; tau and margin travel as (hi, lo) fp32 pairs so that
    the float64 path (gradcheck) keeps them exact.
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
VARIANT_CODE = {"infonce_l2": 0, "infonce_cosine": 1, "hinge": 2, "covariance": 3}
NORM_EPS = 1e-12            # F.normalize's clamp of the row norm (cosine variant)


# ----------------------------------------------------------------------------------------------- Gram regime
@triton.jit
def _gram_tile(zg, mean_g, rstd_g, offs_i, offs_j, mi, mj, k0, k_end, stride_zb, ACC: tl.constexpr,
               SAME: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    """sum_k z_ik z_jk over [k0, k_end) for one (BLOCK_B, BLOCK_B) tile; SAME: a diagonal tile (one load)."""
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=ACC)
    for k in range(k0, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mk = offs_k < k_end
        a = tl.load(zg + offs_i[:, None] * stride_zb + offs_k[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        if NORMALIZE:
            mu = tl.load(mean_g + offs_k, mask=mk, other=0.0)
            rs = tl.load(rstd_g + offs_k, mask=mk, other=0.0)
            a = tl.where(mi[:, None] & mk[None, :], (a.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
        if SAME:
            b = a
        else:
            b = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :],
                        other=0.0)
            if NORMALIZE:
                b = tl.where(mj[:, None] & mk[None, :], (b.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # (BLOCK_B, BLOCK_K) @ (BLOCK_K, BLOCK_B) -> (BLOCK_B, BLOCK_B)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _gram_partial_kernel(z_ptr, part_ptr, stats_ptr, B, M, stride_zg, stride_zb, k_per_split, n_tiles,
                         NORMALIZE: tl.constexpr, USE_ATOMIC: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Partial Gram of one (upper tile, K slice, group): part[g, split, i, j] = sum_{k in slice} z_ik z_jk.

    Program 0 of the grid runs the T (T + 1) / 2 upper tiles (ti <= tj) of T = n_tiles row blocks, fastest, so
    that the tiles of one K slice run together and share its loads in L2.  An off-diagonal tile also stores its
    transpose: each split holds the full B x B partial.  USE_ATOMIC: relaxed fp32 atomics into part[g, 0].
    NORMALIZE: z is batch-normalised on the fly with per-column mean / rstd (covariance variant)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    # upper tile number pid_t -> (ti, tj): row t starts at t T - t (t - 1) / 2
    ti = pid_t * 0
    for t in range(1, n_tiles):
        ti = tl.where(pid_t >= t * n_tiles - (t * (t - 1)) // 2, t, ti)
    tj = ti + pid_t - (ti * n_tiles - (ti * (ti - 1)) // 2)
    offs_i = ti * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tj * BLOCK_B + tl.arange(0, BLOCK_B)
    mi = offs_i < B
    mj = offs_j < B
    zg = z_ptr + g.to(tl.int64) * stride_zg
    mean_g = stats_ptr + g.to(tl.int64) * 2 * M          # stats (G, 2, M): column mean, rstd
    rstd_g = mean_g + M
    k0 = split * k_per_split
    k_end = tl.minimum(k0 + k_per_split, M)
    if ti == tj:
        acc = _gram_tile(zg, mean_g, rstd_g, offs_i, offs_j, mi, mj, k0, k_end, stride_zb, ACC, True, NORMALIZE,
                         BLOCK_B, BLOCK_K, UPCAST, PREC)
    else:
        acc = _gram_tile(zg, mean_g, rstd_g, offs_i, offs_j, mi, mj, k0, k_end, stride_zb, ACC, False, NORMALIZE,
                         BLOCK_B, BLOCK_K, UPCAST, PREC)
    if USE_ATOMIC:
        base = part_ptr + g.to(tl.int64) * B * B
    else:
        base = part_ptr + (g.to(tl.int64) * tl.num_programs(1) + split) * B * B
    m_ij = mi[:, None] & mj[None, :]
    if USE_ATOMIC:
        tl.atomic_add(base + offs_i[:, None] * B + offs_j[None, :], acc, mask=m_ij, sem="relaxed")
    else:
        tl.store(base + offs_i[:, None] * B + offs_j[None, :], acc, mask=m_ij)
    if ti != tj:
        acc_t = tl.trans(acc)
        m_ji = mj[:, None] & mi[None, :]
        if USE_ATOMIC:
            tl.atomic_add(base + offs_j[:, None] * B + offs_i[None, :], acc_t, mask=m_ji, sem="relaxed")
        else:
            tl.store(base + offs_j[:, None] * B + offs_i[None, :], acc_t, mask=m_ji)


@triton.jit
def _colstats_kernel(z_ptr, stats_ptr, csq_ptr, B, M, stride_zg, stride_zb, eps,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-column batch statistics of one (K slice, group): mean_m, rstd_m = (var_m + eps)^-1/2 (biased var),
    and csq[g, slice] = sum_m c_m^2 over the slice (c_m = var_m / (var_m + eps)).
    Two sweeps over the (B, BLOCK_K) slice (the second one hits L2)."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < M
    zg = z_ptr + g.to(tl.int64) * stride_zg
    s = tl.zeros((BLOCK_K,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        x = tl.load(zg + offs_b[:, None] * stride_zb + offs_k[None, :], mask=(offs_b < B)[:, None] & mk[None, :],
                    other=0.0)
        s += tl.sum(x.to(ACC), 0)
    mu = s / B
    v = tl.zeros((BLOCK_K,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        msk = (offs_b < B)[:, None] & mk[None, :]
        x = tl.load(zg + offs_b[:, None] * stride_zb + offs_k[None, :], mask=msk, other=0.0)
        dx = tl.where(msk, x.to(ACC) - mu[None, :], 0.0)
        v += tl.sum(dx * dx, 0)
    var = v / B
    rstd = 1.0 / tl.sqrt(var + eps)
    c = var * rstd * rstd
    tl.store(stats_ptr + g.to(tl.int64) * 2 * M + offs_k, mu, mask=mk)
    tl.store(stats_ptr + g.to(tl.int64) * 2 * M + M + offs_k, rstd, mask=mk)
    tl.store(csq_ptr + g * tl.num_programs(0) + pid_k, tl.sum(tl.where(mk, c * c, 0.0), 0))


@triton.jit
def _gram_epilogue_kernel(part_ptr, rowval_ptr, w_ptr, scale_ptr, B, M, n_splits, inv_tau_hi, inv_tau_lo,
                          margin_hi, margin_lo, VARIANT: tl.constexpr, NEED_W: tl.constexpr, SPLIT_W: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Rows [pid BLOCK_R, +BLOCK_R) of one group: split-K sum of the partial Grams, the loss row values v_i and
    (NEED_W) the weight rows Wh_i of the kernels' docstring.  VARIANT: 0 l2, 1 cosine, 2 hinge, 3 covariance.

    w_ptr: (G, 2, B, B) hi / lo in Z's 16-bit dtype (SPLIT_W, each row scaled by 1 / rowscale_i) or
    (G, 1, B, B) in the accumulation dtype; scale_ptr: (G, 1 + B), this kernel writes rowscale_i to [1 + i]."""
    ACC: tl.constexpr = rowval_ptr.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mr = rows < B
    mc = cols < B
    pg = part_ptr + g.to(tl.int64) * n_splits * B * B
    sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    s_c = tl.zeros((BLOCK_C,), dtype=ACC)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        ms = ss < n_splits
        x = tl.load(pg + ss[:, None, None] * B * B + rows[None, :, None] * B + cols[None, None, :],
                    mask=ms[:, None, None] & mr[None, :, None] & mc[None, None, :], other=0.0)
        sq += tl.sum(x, 0)
        xd = tl.load(pg + ss[:, None] * B * B + cols[None, :] * (B + 1), mask=ms[:, None] & mc[None, :], other=0.0)
        s_c += tl.sum(xd, 0)
    eye = rows[:, None] == cols[None, :]
    valid = mr[:, None] & mc[None, :]
    s_r = tl.sum(tl.where(eye, s_c[None, :], 0.0), 1)          # exact: one non-zero term per row
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    margin = tl.cast(margin_hi, ACC) + tl.cast(margin_lo, ACC)
    if VARIANT == 3:
        val = tl.where(valid, sq * sq, 0.0)
        wv = tl.where(valid, sq, 0.0)
    elif VARIANT == 1:
        nr_raw = tl.sqrt(s_r)
        n_r = tl.where(nr_raw < 1e-12, 1e-12, nr_raw)             # NaN-propagating clamp
        n_c = tl.sqrt(s_c)
        n_c = tl.where(n_c < 1e-12, 1e-12, n_c)
        cos = sq / (n_r[:, None] * n_c[None, :])
        cos = tl.where(eye, (s_r / (n_r * n_r))[:, None], cos)   # the constant cos_ii
        e = tl.where(valid, tl.exp((cos - 1.0) * inv_tau), 0.0)
        val = e
        eo = tl.where(eye, 0.0, e)
        hd = -2.0 * tl.sum(eo * cos, 1) / (n_r * n_r)
        hd = tl.where(nr_raw > 1e-12, hd, 0.0)
        wv = tl.where(eye, hd[:, None], 2.0 * eo / (n_r[:, None] * n_c[None, :]))
    else:
        r = s_r[:, None] + s_c[None, :] - 2.0 * sq
        r = tl.where(eye, 0.0, r)                                  # the constant d_ii = 0
        d = tl.where(r < 0.0, 0.0, r) / M
        if VARIANT == 0:
            e = tl.exp(-d * inv_tau)
            val = tl.where(valid, e, 0.0)
            a = e
        else:
            h = margin - d
            h = tl.where(h < 0.0, 0.0, h)
            val = tl.where(valid, h * h, 0.0)
            a = h
        a = tl.where(valid & (rows[:, None] != cols[None, :]) & ~(r < 0.0), a, 0.0)   # NaN r is kept
        wv = tl.where(eye, 4.0 * tl.sum(a, 1)[:, None], -4.0 * a)
    tl.store(rowval_ptr + g.to(tl.int64) * B + rows, tl.sum(val, 1), mask=mr)
    if NEED_W:
        WDT: tl.constexpr = w_ptr.dtype.element_ty
        m_w = mr[:, None] & mc[None, :]
        if SPLIT_W:
            wg = w_ptr + g.to(tl.int64) * 2 * B * B
            mx = tl.max(tl.abs(wv), 1)
            bits = mx.to(tl.int32, bitcast=True) & 0x7F800000       # 2^floor(log2 max|Wh_i.|), exact
            rsc = tl.where((bits > 0) & (bits < 0x7F800000), bits.to(tl.float32, bitcast=True), 1.0)
            v = wv / rsc[:, None]
            hi = v.to(WDT)
            lo = (v - hi.to(ACC)).to(WDT)
            tl.store(wg + rows[:, None] * B + cols[None, :], hi, mask=m_w)
            tl.store(wg + B * B + rows[:, None] * B + cols[None, :], lo, mask=m_w)
            tl.store(scale_ptr + g.to(tl.int64) * (B + 1) + 1 + rows, rsc, mask=mr)
        else:
            wg = w_ptr + g.to(tl.int64) * B * B
            tl.store(wg + rows[:, None] * B + cols[None, :], wv.to(WDT), mask=m_w)
            tl.store(scale_ptr + g.to(tl.int64) * (B + 1) + 1 + rows, tl.full((BLOCK_R,), 1.0, ACC), mask=mr)


@triton.jit
def _gram_loss_kernel(rowval_ptr, csq_ptr, loss_ptr, scale_ptr, B, M, n_csq, inv_tau_hi, inv_tau_lo,
                      VARIANT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One group: L from the row values (S = sum_i v_i) and gscale (W = g gscale rowscale_i Wh_i.)."""
    ACC: tl.constexpr = rowval_ptr.dtype.element_ty
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    tot = tl.sum(tl.load(rowval_ptr + g.to(tl.int64) * B + cols, mask=cols < B, other=0.0), 0)
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    bf = tl.cast(B, ACC)
    if VARIANT == 0:
        loss = tl.log(tot) - 2.0 * tl.log(bf)
        gs = -inv_tau / (tot * M)
    elif VARIANT == 1:
        loss = tl.log(tot) + inv_tau - 2.0 * tl.log(bf)
        gs = inv_tau / tot
    elif VARIANT == 2:
        loss = tot / (bf * bf)
        gs = -2.0 / (bf * bf * M)
    else:
        cs = tl.zeros((BLOCK_Q,), dtype=ACC)
        for q0 in range(0, n_csq, BLOCK_Q):
            qq = q0 + tl.arange(0, BLOCK_Q)
            cs += tl.load(csq_ptr + g.to(tl.int64) * n_csq + qq, mask=qq < n_csq, other=0.0)
        loss = tot / (bf * bf) - tl.sum(cs, 0)
        gs = 4.0 / (bf * bf)
    tl.store(loss_ptr + g, loss)
    # + 0 L: a non-finite loss makes every gradient entry of the group non-finite (no half-finite gradients)
    tl.store(scale_ptr + g.to(tl.int64) * (B + 1), gs + 0.0 * loss)


@triton.jit
def _stream_wz_kernel(w_ptr, scale_ptr, gout_ptr, z_ptr, dz_ptr, B, M, stride_zg, stride_zb, k_per_split,
                      SPLIT_W: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_JC: tl.constexpr,
                      BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dZ[g, rows, kslice] = g gscale rowscale_i (W_hi + W_lo)[rows, :] @ Z[g, :, kslice] for BLOCK_I rows of one
    group and a K range of k_per_split columns (BLOCK_K per step).  BLOCK_J >= B is the whole reduction; with
    BLOCK_JC == BLOCK_J the W rows are loaded once per program (held across the K loop), with BLOCK_JC < BLOCK_J
    (large B) they are streamed in BLOCK_JC chunks at every K step."""
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < B
    if SPLIT_W:
        wg = w_ptr + g.to(tl.int64) * 2 * B * B
    else:
        wg = w_ptr + g.to(tl.int64) * B * B
    sg = scale_ptr + g.to(tl.int64) * (B + 1)
    coef = tl.load(gout_ptr + g).to(ACC) * tl.load(sg) * tl.load(sg + 1 + offs_i, mask=mi, other=0.0)
    zg = z_ptr + g.to(tl.int64) * stride_zg
    dzg = dz_ptr + g.to(tl.int64) * B * M
    k0 = pid_k * k_per_split
    k_end = tl.minimum(k0 + k_per_split, M)
    if BLOCK_JC == BLOCK_J:
        offs_j = tl.arange(0, BLOCK_J)
        mj = offs_j < B
        w_hi = tl.load(wg + offs_i[:, None] * B + offs_j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
        if SPLIT_W:
            w_lo = tl.load(wg + B * B + offs_i[:, None] * B + offs_j[None, :], mask=mi[:, None] & mj[None, :],
                           other=0.0)
        if UPCAST:
            w_hi = w_hi.to(tl.float32)
            if SPLIT_W:
                w_lo = w_lo.to(tl.float32)
        for k in range(k0, k_end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mk = offs_k < k_end
            z = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
            if UPCAST:
                z = z.to(tl.float32)
            # (BLOCK_I, BLOCK_J) @ (BLOCK_J, BLOCK_K) -> (BLOCK_I, BLOCK_K)
            acc = tl.dot(w_hi, z, input_precision=PREC, out_dtype=ACC)
            if SPLIT_W:
                # (BLOCK_I, BLOCK_J) @ (BLOCK_J, BLOCK_K) -> (BLOCK_I, BLOCK_K)
                acc = tl.dot(w_lo, z, acc, input_precision=PREC, out_dtype=ACC)
            tl.store(dzg + offs_i[:, None] * M + offs_k[None, :], (acc * coef[:, None]).to(dz_ptr.dtype.element_ty),
                     mask=mi[:, None] & mk[None, :])
    else:
        for k in range(k0, k_end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mk = offs_k < k_end
            acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=ACC)
            for j0 in range(0, B, BLOCK_JC):
                offs_j = j0 + tl.arange(0, BLOCK_JC)
                mj = offs_j < B
                w_hi = tl.load(wg + offs_i[:, None] * B + offs_j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
                z = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :],
                            other=0.0)
                if UPCAST:
                    w_hi = w_hi.to(tl.float32)
                    z = z.to(tl.float32)
                # (BLOCK_I, BLOCK_JC) @ (BLOCK_JC, BLOCK_K) -> (BLOCK_I, BLOCK_K)
                acc = tl.dot(w_hi, z, acc, input_precision=PREC, out_dtype=ACC)
                if SPLIT_W:
                    w_lo = tl.load(wg + B * B + offs_i[:, None] * B + offs_j[None, :], mask=mi[:, None] & mj[None, :],
                                   other=0.0)
                    if UPCAST:
                        w_lo = w_lo.to(tl.float32)
                    # (BLOCK_I, BLOCK_JC) @ (BLOCK_JC, BLOCK_K) -> (BLOCK_I, BLOCK_K)
                    acc = tl.dot(w_lo, z, acc, input_precision=PREC, out_dtype=ACC)
            tl.store(dzg + offs_i[:, None] * M + offs_k[None, :], (acc * coef[:, None]).to(dz_ptr.dtype.element_ty),
                     mask=mi[:, None] & mk[None, :])


@triton.jit
def _stream_wz_cov_kernel(w_ptr, scale_ptr, gout_ptr, z_ptr, dz_ptr, stats_ptr, B, M, stride_zg, stride_zb,
                          eps, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                          PREC: tl.constexpr):
    """Covariance backward of one (K slice, group), all B rows: T = coef W' Zn + dg c_m Zn, then the batch-norm
    backward dZ = rstd (T - mean_b T - Zn mean_b(T Zn)); T stays in registers (fp32)."""
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < M
    offs_b = tl.arange(0, BLOCK_B)
    mb = offs_b < B
    zg = z_ptr + g.to(tl.int64) * stride_zg
    wg = w_ptr + g.to(tl.int64) * B * B
    mu = tl.load(stats_ptr + g.to(tl.int64) * 2 * M + offs_k, mask=mk, other=0.0)
    rs = tl.load(stats_ptr + g.to(tl.int64) * 2 * M + M + offs_k, mask=mk, other=0.0)
    coef = tl.load(gout_ptr + g).to(ACC) * tl.load(scale_ptr + g.to(tl.int64) * (B + 1))   # g 4 / B^2
    cdiag = -coef * B * (1.0 - eps * rs * rs)                                              # dg c_m, dg = -4 g / B
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for j0 in range(0, B, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < B
        w = tl.load(wg + offs_b[:, None] * B + offs_j[None, :], mask=mb[:, None] & mj[None, :], other=0.0)
        zj = tl.load(zg + offs_j[:, None] * stride_zb + offs_k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        znj = tl.where(mj[:, None] & mk[None, :], (zj.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
        # (BLOCK_B, BLOCK_J) @ (BLOCK_J, BLOCK_K) -> (BLOCK_B, BLOCK_K)
        acc = tl.dot(w, znj, acc, input_precision=PREC, out_dtype=ACC)
    msk = mb[:, None] & mk[None, :]
    zi = tl.load(zg + offs_b[:, None] * stride_zb + offs_k[None, :], mask=msk, other=0.0)
    zn = tl.where(msk, (zi.to(ACC) - mu[None, :]) * rs[None, :], 0.0)
    t = tl.where(msk, acc * coef + cdiag[None, :] * zn, 0.0)
    m1 = tl.sum(t, 0) / B
    m2 = tl.sum(t * zn, 0) / B
    dx = rs[None, :] * (t - m1[None, :] - zn * m2[None, :])
    tl.store(dz_ptr + g.to(tl.int64) * B * M + offs_b[:, None] * M + offs_k[None, :], dx.to(dz_ptr.dtype.element_ty),
             mask=msk)


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
    si = tl.load(sq_ptr + g.to(tl.int64) * N + offs_i, mask=mi, other=0.0)
    m_run = tl.full((BLOCK_N,), -float("inf"), dtype=ACC)
    l_run = tl.zeros((BLOCK_N,), dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        mj = offs_j < N
        dot = _pair_dots(xg, offs_i, offs_j, mi, mj, D, stride_xn, ACC, BLOCK_N, BLOCK_D, UPCAST, PREC)
        sj = tl.load(sq_ptr + g.to(tl.int64) * N + offs_j, mask=mj, other=0.0)
        valid = mi[:, None] & mj[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (offs_i[:, None] != offs_j[None, :])
        if MODE == 1:
            logit = alpha * dot
        else:
            r = si[:, None] + sj[None, :] - 2.0 * dot
            if not EXCLUDE_DIAG:
                r = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, r)     # the constant d_ii = 0
            r = tl.where(r < 0.0, 0.0, r)                                      # NaN-propagating clamp
            logit = -alpha * r
        if MODE == 2:
            h = margin + logit
            h = tl.where(h < 0.0, 0.0, h)
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
    tl.store(out_ptr + g.to(tl.int64) * N + offs_i, res, mask=mi)


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
    si = tl.load(sq_ptr + g.to(tl.int64) * N + offs_i, mask=mi, other=0.0)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        mj = offs_j < N
        dot = _pair_dots(xg, offs_i, offs_j, mi, mj, D, stride_xn, ACC, BLOCK_N, BLOCK_D, UPCAST, PREC_X)
        sj = tl.load(sq_ptr + g.to(tl.int64) * N + offs_j, mask=mj, other=0.0)
        valid = mi[:, None] & mj[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (offs_i[:, None] != offs_j[None, :])
        if MODE == 1:
            c = alpha * gout * tl.exp(alpha * dot - lse)
        else:
            rr = si[:, None] + sj[None, :] - 2.0 * dot
            r = tl.where(rr < 0.0, 0.0, rr)                                    # NaN-propagating clamp
            if MODE == 0:
                c = -alpha * gout * tl.exp(-alpha * r - lse)
            else:
                hh = margin - alpha * r
                c = -2.0 * hscale * alpha * gout * tl.where(hh < 0.0, 0.0, hh)
            c = tl.where(rr < 0.0, 0.0, c)
        # the self-pair is a constant (d_ii = 0, cos_ii = 1): no gradient through it
        c = tl.where(valid & (offs_i[:, None] != offs_j[None, :]), c, 0.0)
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
# GPU launch configurations per architecture (sm_80: mma.sync; sm_90: wgmma, so every product has >= 64 rows per
# warpgroup), shared by the launchers and AOT_CONFIGS (every shipped config is AOT-checked for zero spills and,
# on sm_90, for HGMMA only).  Chosen 2026-12-01 from the AOT numbers (registers / spills / shared memory) of
# Triton 3.8 and 3.6.  Keys: (kernel, "fp32" | "16", flag) -> (constexprs, num_warps, num_stages).
_CFG = {
    90: {
        ("gram", "16", False, "small"): (dict(BLOCK_B=64, BLOCK_K=64), 4, 4),     # B <= 64: one 64-row tile
        ("gram", "16", False, "mid"): (dict(BLOCK_B=128, BLOCK_K=64), 8, 4),
        ("gram", "16", False, "large"): (dict(BLOCK_B=128, BLOCK_K=64), 8, 4),
        ("gram", "fp32", False, "small"): (dict(BLOCK_B=64, BLOCK_K=32), 4, 3),
        ("gram", "fp32", False, "mid"): (dict(BLOCK_B=128, BLOCK_K=32), 8, 3),
        ("gram", "fp32", False, "large"): (dict(BLOCK_B=128, BLOCK_K=32), 8, 3),
        ("gram", "16", True): (dict(BLOCK_B=64, BLOCK_K=32), 4, 3),        # normalised on the fly: fp32 operands
        ("gram", "fp32", True): (dict(BLOCK_B=64, BLOCK_K=32), 4, 3),
        ("wz", "16", "small"): (dict(BLOCK_I=64, BLOCK_K=64), 4, 3),        # B <= 64
        ("wz", "16", "mid"): (dict(BLOCK_I=128, BLOCK_K=64), 8, 2),         # B <= 256
        ("wz", "16", "large"): (dict(BLOCK_I=128, BLOCK_K=64, BLOCK_JC=64), 8, 3),   # B <= 512: W streamed
        ("wz", "fp32", "small"): (dict(BLOCK_I=64, BLOCK_K=64), 4, 2),
        ("wz", "fp32", "mid"): (dict(BLOCK_I=64, BLOCK_K=16), 8, 2),
        ("wz", "fp32", "large"): (dict(BLOCK_I=64, BLOCK_K=64, BLOCK_JC=32), 4, 2),
        ("wzcov", "16", "small"): (dict(BLOCK_J=32, BLOCK_K=64), 4, 2),
        ("wzcov", "16", "mid"): (dict(BLOCK_J=32, BLOCK_K=32), 8, 2),
        ("wzcov", "16", "large"): (dict(BLOCK_J=16, BLOCK_K=16), 8, 2),
        ("wzcov", "fp32", "small"): (dict(BLOCK_J=32, BLOCK_K=64), 4, 2),
        ("wzcov", "fp32", "mid"): (dict(BLOCK_J=32, BLOCK_K=32), 8, 2),
        ("wzcov", "fp32", "large"): (dict(BLOCK_J=16, BLOCK_K=16), 8, 2),
        ("pf", "fp32", 0): (dict(BLOCK_N=64, BLOCK_D=16), 4, 2),
        ("pf", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16), 4, 2),
        ("pf", "fp32", 2): (dict(BLOCK_N=64, BLOCK_D=16), 4, 2),
        ("pf", "16", 0): (dict(BLOCK_N=64, BLOCK_D=32), 4, 2),
        ("pf", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32), 4, 2),
        ("pf", "16", 2): (dict(BLOCK_N=64, BLOCK_D=32), 4, 2),
        ("pb", "fp32", 0): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "fp32", 2): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "16", 0): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32, BLOCK_DO=32), 4, 2),
        ("pb", "16", 2): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
    },
    80: {
        ("gram", "16", False, "small"): (dict(BLOCK_B=64, BLOCK_K=32), 4, 3),
        ("gram", "16", False, "mid"): (dict(BLOCK_B=128, BLOCK_K=32), 8, 3),
        ("gram", "16", False, "large"): (dict(BLOCK_B=128, BLOCK_K=32), 8, 3),
        ("gram", "fp32", False, "small"): (dict(BLOCK_B=64, BLOCK_K=16), 4, 3),
        ("gram", "fp32", False, "mid"): (dict(BLOCK_B=64, BLOCK_K=16), 4, 3),
        ("gram", "fp32", False, "large"): (dict(BLOCK_B=64, BLOCK_K=16), 4, 3),
        ("gram", "16", True): (dict(BLOCK_B=64, BLOCK_K=16), 4, 3),
        ("gram", "fp32", True): (dict(BLOCK_B=64, BLOCK_K=16), 4, 3),
        ("wz", "16", "small"): (dict(BLOCK_I=64, BLOCK_K=64), 4, 3),
        ("wz", "16", "mid"): (dict(BLOCK_I=64, BLOCK_K=32), 8, 2),
        ("wz", "16", "large"): (dict(BLOCK_I=64, BLOCK_K=64, BLOCK_JC=32), 4, 3),
        ("wz", "fp32", "small"): (dict(BLOCK_I=32, BLOCK_K=64), 4, 2),
        ("wz", "fp32", "mid"): (dict(BLOCK_I=64, BLOCK_K=32, BLOCK_JC=16), 4, 2),   # held W spills on 3.6
        ("wz", "fp32", "large"): (dict(BLOCK_I=64, BLOCK_K=32, BLOCK_JC=16), 4, 2),
        ("wzcov", "16", "small"): (dict(BLOCK_J=32, BLOCK_K=64), 4, 2),
        ("wzcov", "16", "mid"): (dict(BLOCK_J=16, BLOCK_K=32), 8, 2),
        ("wzcov", "16", "large"): (dict(BLOCK_J=16, BLOCK_K=16), 8, 2),
        ("wzcov", "fp32", "small"): (dict(BLOCK_J=32, BLOCK_K=64), 4, 2),
        ("wzcov", "fp32", "mid"): (dict(BLOCK_J=16, BLOCK_K=32), 8, 2),
        ("wzcov", "fp32", "large"): (dict(BLOCK_J=16, BLOCK_K=16), 8, 2),
        ("pf", "fp32", 0): (dict(BLOCK_N=64, BLOCK_D=16), 8, 2),
        ("pf", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16), 4, 2),
        ("pf", "fp32", 2): (dict(BLOCK_N=64, BLOCK_D=16), 8, 2),
        ("pf", "16", 0): (dict(BLOCK_N=64, BLOCK_D=32), 8, 2),
        ("pf", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32), 8, 2),
        ("pf", "16", 2): (dict(BLOCK_N=64, BLOCK_D=32), 8, 2),
        ("pb", "fp32", 0): (dict(BLOCK_N=32, BLOCK_D=32, BLOCK_DO=32), 4, 2),
        ("pb", "fp32", 1): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "fp32", 2): (dict(BLOCK_N=32, BLOCK_D=32, BLOCK_DO=16), 4, 2),
        ("pb", "16", 0): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
        ("pb", "16", 1): (dict(BLOCK_N=64, BLOCK_D=32, BLOCK_DO=32), 8, 2),
        ("pb", "16", 2): (dict(BLOCK_N=64, BLOCK_D=16, BLOCK_DO=16), 4, 2),
    },
}
_COLSTATS = (dict(BLOCK_B=32, BLOCK_K=64), 4, 2)          # no products: one config for both architectures

# Tests set these to run the GPU tile sizes of _CFG[INTERPRET_ARCH] under the interpreter (small shapes only).
INTERPRET_WITH_GPU_CONFIGS = False
INTERPRET_ARCH = 90
_INTERPRET_SMS = 2                                       # "SMs" of the interpreter: a few split-K programs


def _cls(dtype) -> str:
    return "16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


def _size_class(b: int) -> str:
    return "small" if b <= 64 else ("mid" if b <= 256 else "large")


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(dtype) -> bool:
    return _INTERPRET and dtype in (torch.bfloat16, torch.float16)


def _prec(dtype) -> str:
    """tf32x3 for fp32 operands, ieee for fp64 (exact) and 16-bit operands (the tensor cores' own products)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _rowmajor(z: torch.Tensor) -> torch.Tensor:
    """(G, B, M) with unit stride along M (any G / B strides are passed to the kernels)."""
    return z if z.stride(-1) == 1 else z.contiguous()


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _interp_block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _arch(device) -> int | None:
    """90 (Hopper and newer), 80 (Ampere / Ada), or None: the interpreter's own few-large-tiles configs."""
    if _INTERPRET:
        return INTERPRET_ARCH if INTERPRET_WITH_GPU_CONFIGS else None
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _num_sms(device) -> int:
    if _INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_int32(what: str, rows: int, cols: int, stride: int | None = None) -> None:
    """Offsets inside one group are int32 (the group offset is int64): refuse what would overflow."""
    if rows * max(cols, stride or 0) >= 2 ** 31:
        raise ValueError(f"the dispersive Triton kernels use 32-bit offsets within a group: {what} of "
                         f"{rows} x {cols} (row stride {stride or cols}) has 2**31 elements or more; split the "
                         "batch into groups (grouped=True) or use backend='cpp'")


_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _jit_fn(kernel):
    """The function object with ``arg_names`` under a JITFunction / InterpretedFunction."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _kname(kernel) -> str:
    f = kernel
    while hasattr(f, "fn"):
        f = f.fn
    return f.__name__


class _Launch:
    """One kernel launch: grid, pointer dtypes, scalar values, constexprs, warps / stages.  ``run`` launches it;
    ``aot`` is the matching AotConfig (integer scalars specialised as Triton does: == 1 -> constexpr,
    multiples of 16 -> divisible_by_16; pointers 16-byte aligned), so AOT_CONFIGS are built from the launchers'
    own plans."""

    def __init__(self, kernel, grid, ptrs, scalars, constexprs, num_warps, num_stages):
        self.kernel, self.grid, self.ptrs, self.scalars = kernel, tuple(grid), ptrs, scalars
        self.constexprs, self.num_warps, self.num_stages = constexprs, num_warps, num_stages

    def run(self, **tensors):
        self.kernel[self.grid](**tensors, **self.scalars, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def aot(self, archs) -> AotConfig:
        names = list(_jit_fn(self.kernel).arg_names)
        sig, cx, div = {}, {}, []
        for name in names:
            if name in self.ptrs:
                sig[name] = "*" + _DT[self.ptrs[name]]
            elif name in self.scalars:
                v = self.scalars[name]
                if isinstance(v, float):
                    sig[name] = "fp32"
                elif v == 1:
                    sig[name], cx[name] = "constexpr", 1
                else:
                    sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                    if v % 16 == 0:
                        div.append(name)
            else:
                sig[name], cx[name] = "constexpr", self.constexprs[name]
        if "UPCAST" in cx:
            cx["UPCAST"] = False          # an interpreter-only flag
        return AotConfig(kernel=f"{__name__}:{_kname(self.kernel)}", signature=sig, constexprs=cx, num_warps=self.num_warps,
                         num_stages=self.num_stages, divisible_by_16=tuple(div), archs=tuple(archs))


def _split_f32(x: float):
    """(hi, lo) fp32 pair with hi + lo == x to ~2^-48 (Triton passes Python floats as fp32)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ Gram-regime plans
def _plan_colstats(G, B, M, zdt, arch, stride_zg, stride_zb, eps):
    cx, w, st = _COLSTATS
    if arch is None:
        cx = dict(BLOCK_B=64, BLOCK_K=128)
    acc = _acc_torch(zdt)
    return _Launch(_colstats_kernel, (triton.cdiv(M, cx["BLOCK_K"]), G), {"z_ptr": zdt, "stats_ptr": acc, "csq_ptr": acc},
                   dict(B=B, M=M, stride_zg=stride_zg, stride_zb=stride_zb, eps=float(eps)), dict(cx), w, st)


def _plan_gram(G, B, M, zdt, arch, n_sm, stride_zg, stride_zb, normalize, deterministic, splits=None):
    acc = _acc_torch(zdt)
    if arch is None:
        cx, w, st = dict(BLOCK_B=_interp_block(B), BLOCK_K=64), 4, 1
    else:
        key = ("gram", _cls(zdt), True) if normalize else ("gram", _cls(zdt), False, _size_class(B))
        cx, w, st = _CFG[arch][key]
    bb, bk = cx["BLOCK_B"], cx["BLOCK_K"]
    T = triton.cdiv(B, bb)
    n_tri = T * (T + 1) // 2
    if splits is None:          # one wave of programs (a split-K slice of >= 4 K steps each)
        splits = max(1, min(triton.cdiv(n_sm, G * n_tri), triton.cdiv(M, 4 * bk), 4096))
    k_per = triton.cdiv(triton.cdiv(M, splits), bk) * bk
    splits = triton.cdiv(M, k_per)
    prec = _prec(acc if normalize else zdt)
    cxf = dict(NORMALIZE=normalize, USE_ATOMIC=not deterministic, **cx, UPCAST=_upcast(zdt), PREC=prec)
    launch = _Launch(_gram_partial_kernel, (n_tri, splits, G), {"z_ptr": zdt, "part_ptr": acc, "stats_ptr": acc},
                     dict(B=B, M=M, stride_zg=stride_zg, stride_zb=stride_zb, k_per_split=k_per, n_tiles=T), cxf, w, st)
    return launch, (1 if not deterministic else splits)


def _plan_epilogue(G, B, M, zdt, arch, n_parts, variant, need_w, tau, margin):
    acc = _acc_torch(zdt)
    bp = _pow2(B)
    split_w = need_w and zdt in (torch.bfloat16, torch.float16) and variant != "covariance"
    if arch is None:
        br, bs, w = min(bp, 64), triton.next_power_of_2(n_parts), 4
    else:
        br = 2 if bp >= 128 else 4
        bs = max(1, min(triton.next_power_of_2(n_parts), 8192 // (br * bp)))
        w = 8 if bs * br * bp >= 4096 else 4
    it_hi, it_lo = _split_f32(1.0 / tau)
    m_hi, m_lo = _split_f32(margin)
    wdt = (zdt if split_w else acc)
    return _Launch(_gram_epilogue_kernel, (triton.cdiv(B, br), G),
                   {"part_ptr": acc, "rowval_ptr": acc, "w_ptr": wdt, "scale_ptr": acc},
                   dict(B=B, M=M, n_splits=n_parts, inv_tau_hi=it_hi, inv_tau_lo=it_lo, margin_hi=m_hi,
                        margin_lo=m_lo),
                   dict(VARIANT=VARIANT_CODE[variant], NEED_W=need_w, SPLIT_W=split_w, BLOCK_R=br, BLOCK_C=bp,
                        BLOCK_S=bs), w, 1), split_w


def _plan_loss(G, B, M, zdt, n_csq, variant, tau):
    acc = _acc_torch(zdt)
    it_hi, it_lo = _split_f32(1.0 / tau)
    bq = min(1024, triton.next_power_of_2(max(n_csq, 1)))
    return _Launch(_gram_loss_kernel, (G,), {"rowval_ptr": acc, "csq_ptr": acc, "loss_ptr": acc, "scale_ptr": acc},
                   dict(B=B, M=M, n_csq=n_csq, inv_tau_hi=it_hi, inv_tau_lo=it_lo),
                   dict(VARIANT=VARIANT_CODE[variant], BLOCK_C=_pow2(B), BLOCK_Q=bq), 4, 1)


def _plan_wz(G, B, M, zdt, arch, n_sm, stride_zg, stride_zb, split_w):
    acc = _acc_torch(zdt)
    bp = _pow2(B)
    if arch is None:
        cx, w, st = dict(BLOCK_I=min(bp, 64), BLOCK_K=64), 4, 1
    else:
        cx, w, st = _CFG[arch][("wz", _cls(zdt), _size_class(B))]
    cx = dict(cx)
    bi, bk = cx["BLOCK_I"], cx["BLOCK_K"]
    cx["BLOCK_JC"] = min(cx.get("BLOCK_JC", bp), bp)
    n_i = triton.cdiv(B, bi)
    splits = max(1, min(triton.cdiv(n_sm, G * n_i), triton.cdiv(M, 2 * bk)))
    k_per = triton.cdiv(triton.cdiv(M, splits), bk) * bk
    splits = triton.cdiv(M, k_per)
    wdt = zdt if split_w else acc
    return _Launch(_stream_wz_kernel, (n_i, splits, G),
                   {"w_ptr": wdt, "scale_ptr": acc, "gout_ptr": acc, "z_ptr": zdt, "dz_ptr": zdt},
                   dict(B=B, M=M, stride_zg=stride_zg, stride_zb=stride_zb, k_per_split=k_per),
                   dict(SPLIT_W=split_w, BLOCK_I=bi, BLOCK_J=bp, BLOCK_JC=cx["BLOCK_JC"], BLOCK_K=bk,
                        UPCAST=_upcast(zdt),
                        PREC="ieee" if split_w else _prec(zdt)), w, st)


def _plan_wz_cov(G, B, M, zdt, arch, stride_zg, stride_zb, eps):
    acc = _acc_torch(zdt)
    bp = _pow2(B)
    if arch is None:
        cx, w, st = dict(BLOCK_J=min(bp, 64), BLOCK_K=64), 4, 1
    else:
        cx, w, st = _CFG[arch][("wzcov", _cls(zdt), _size_class(B))]
    return _Launch(_stream_wz_cov_kernel, (triton.cdiv(M, cx["BLOCK_K"]), G),
                   {"w_ptr": acc, "scale_ptr": acc, "gout_ptr": acc, "z_ptr": zdt, "dz_ptr": zdt, "stats_ptr": acc},
                   dict(B=B, M=M, stride_zg=stride_zg, stride_zb=stride_zb, eps=float(eps)),
                   dict(BLOCK_B=bp, **cx, PREC=_prec(acc)), w, st)


def _gram_plans(G, B, M, zdt, arch, n_sm, variant, tau, margin, eps, need_w, deterministic,
                stride_zg=None, stride_zb=None):
    """Every launch of the Gram path (forward, and backward if need_w) for this shape: the launchers run
    these, AOT_CONFIGS compiles them."""
    stride_zb = M if stride_zb is None else stride_zb
    stride_zg = B * M if stride_zg is None else stride_zg
    cov = variant == "covariance"
    plans = {}
    if cov:
        plans["colstats"] = _plan_colstats(G, B, M, zdt, arch, stride_zg, stride_zb, eps)
    plans["gram"], n_parts = _plan_gram(G, B, M, zdt, arch, n_sm, stride_zg, stride_zb, cov, deterministic)
    plans["epilogue"], split_w = _plan_epilogue(G, B, M, zdt, arch, n_parts, variant, need_w, tau, margin)
    n_csq = plans["colstats"].grid[0] if cov else 1
    plans["loss"] = _plan_loss(G, B, M, zdt, n_csq, variant, tau)
    if need_w:
        if cov:
            plans["wz"] = _plan_wz_cov(G, B, M, zdt, arch, stride_zg, stride_zb, eps)
        else:
            plans["wz"] = _plan_wz(G, B, M, zdt, arch, n_sm, stride_zg, stride_zb, split_w)
    return plans, split_w


# ------------------------------------------------------------------------------------------ Gram-regime launchers
def w_layout(dtype, variant: str, need_w: bool):
    """(planes, dtype) of the weight tensor (G, planes, B, B) that gram_forward returns (register_fake uses it)."""
    if not need_w:
        return 0, _acc_torch(dtype)
    if dtype in (torch.bfloat16, torch.float16) and variant != "covariance":
        return 2, dtype
    return 1, _acc_torch(dtype)


def gram_forward(z: torch.Tensor, variant: str, tau: float, margin: float, eps: float, need_w: bool,
                 deterministic: bool = True):
    """Gram-path forward of z (G, B, M): (loss (G,), row values (G, B), W (G, planes, B, B), scales (G, 1 + B)
    = (gscale, rowscale_i), stats (G, 2, M) column mean / rstd for covariance else (G, 0, 0)); see the module
    docstring.  W / rowscale are only written with need_w."""
    z = _rowmajor(z)
    G, B, M = z.shape
    _check_int32("z", B, M, z.stride(1))
    acc = _acc_torch(z.dtype)
    dev = z.device
    plans, split_w = _gram_plans(G, B, M, z.dtype, _arch(dev), _num_sms(dev), variant, tau, margin, eps, need_w,
                                 deterministic, z.stride(0), z.stride(1))
    cov = variant == "covariance"
    if cov:
        stats = torch.empty((G, 2, M), device=dev, dtype=acc)
        csq = torch.empty((G, plans["colstats"].grid[0]), device=dev, dtype=acc)
        plans["colstats"].run(z_ptr=z, stats_ptr=stats, csq_ptr=csq)
    else:
        stats = torch.empty((G, 0, 0), device=dev, dtype=acc)
        csq = torch.empty((G, 1), device=dev, dtype=acc)
    n_parts = plans["gram"].grid[1] if deterministic else 1
    alloc = torch.empty if deterministic else torch.zeros
    part = alloc((G, n_parts, B, B), device=dev, dtype=acc)
    plans["gram"].run(z_ptr=z, part_ptr=part, stats_ptr=stats if cov else part)
    planes, wdt = w_layout(z.dtype, variant, need_w)
    w = torch.empty((G, planes, B, B), device=dev, dtype=wdt)
    rowval = torch.empty((G, B), device=dev, dtype=acc)
    scales = torch.empty((G, B + 1), device=dev, dtype=acc)
    plans["epilogue"].run(part_ptr=part, rowval_ptr=rowval, w_ptr=w if need_w else rowval, scale_ptr=scales)
    loss = torch.empty((G,), device=dev, dtype=acc)
    plans["loss"].run(rowval_ptr=rowval, csq_ptr=csq, loss_ptr=loss, scale_ptr=scales)
    return loss, rowval, w, scales, stats


def gram_backward(grad: torch.Tensor, z: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, stats: torch.Tensor,
                  variant: str, eps: float) -> torch.Tensor:
    """dL/dz (G, B, M) in z's dtype for the upstream gradient grad (G,), from gram_forward's W / scales / stats."""
    z = _rowmajor(z)
    G, B, M = z.shape
    _check_int32("z", B, M, z.stride(1))
    if w.shape[1] == 0:
        raise RuntimeError("dispersive_bwd: the forward ran without need_w (no weight matrix was saved)")
    acc = _acc_torch(z.dtype)
    dev = z.device
    gout = grad.to(acc).contiguous()
    dz = torch.empty((G, B, M), device=dev, dtype=z.dtype)
    if variant == "covariance":
        _plan_wz_cov(G, B, M, z.dtype, _arch(dev), z.stride(0), z.stride(1), eps).run(
            w_ptr=w, scale_ptr=scales, gout_ptr=gout, z_ptr=z, dz_ptr=dz, stats_ptr=stats)
    else:
        _plan_wz(G, B, M, z.dtype, _arch(dev), _num_sms(dev), z.stride(0), z.stride(1), w.shape[1] == 2).run(
            w_ptr=w, scale_ptr=scales, gout_ptr=gout, z_ptr=z, dz_ptr=dz)
    return dz


def gram(z: torch.Tensor, *, normalize: bool = False, eps: float = 1e-5, splits: int | None = None,
         deterministic: bool = True) -> torch.Tensor:
    """The Gram matrices Z Z^T of z (G, B, M) -> (G, B, B), accumulation dtype (normalize: of the batch-normalised
    Z, as the covariance variant uses).  A test / debugging helper: the losses use gram_forward."""
    z = _rowmajor(z)
    G, B, M = z.shape
    _check_int32("z", B, M, z.stride(1))
    acc = _acc_torch(z.dtype)
    stats = torch.empty((G, 2, M), device=z.device, dtype=acc)
    if normalize:
        cs = _plan_colstats(G, B, M, z.dtype, _arch(z.device), z.stride(0), z.stride(1), eps)
        cs.run(z_ptr=z, stats_ptr=stats, csq_ptr=torch.empty((G, cs.grid[0]), device=z.device, dtype=acc))
    plan, n_parts = _plan_gram(G, B, M, z.dtype, _arch(z.device), _num_sms(z.device), z.stride(0), z.stride(1),
                               normalize, deterministic, splits)
    part = (torch.empty if deterministic else torch.zeros)((G, n_parts, B, B), device=z.device, dtype=acc)
    plan.run(z_ptr=z, part_ptr=part, stats_ptr=stats)
    return part.sum(1)


# ------------------------------------------------------------------------------------------ tiled-regime plans
def _row_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms (G, N) in the accumulation dtype (one extra read of X: O(N M), negligible here)."""
    xa = x.to(_acc_torch(x.dtype))
    return (xa * xa).sum(-1).contiguous()


def _plan_pairs_fwd(G, N, D, xdt, arch, stride_xg, stride_xn, mode, alpha, margin, exclude_diag):
    acc = _acc_torch(xdt)
    if arch is None:
        cx, w, st = dict(BLOCK_N=_interp_block(N), BLOCK_D=_interp_block(D, 16, 128)), 4, 1
    else:
        cx, w, st = _CFG[arch][("pf", _cls(xdt), mode)]
    return _Launch(_pairs_fwd_kernel, (triton.cdiv(N, cx["BLOCK_N"]), G), {"x_ptr": xdt, "sq_ptr": acc, "out_ptr": acc},
                   dict(N=N, D=D, stride_xg=stride_xg, stride_xn=stride_xn, alpha=float(alpha), margin=float(margin)),
                   dict(MODE=mode, EXCLUDE_DIAG=exclude_diag, **cx, UPCAST=_upcast(xdt), PREC=_prec(xdt)), w, st)


def _plan_pairs_bwd(G, N, D, xdt, arch, stride_xg, stride_xn, mode, alpha, margin, hscale, exclude_diag):
    acc = _acc_torch(xdt)
    if arch is None:
        bd = _interp_block(D, 16, 128)
        cx, w, st = dict(BLOCK_N=_interp_block(N), BLOCK_D=bd, BLOCK_DO=bd), 4, 1
    else:
        cx, w, st = _CFG[arch][("pb", _cls(xdt), mode)]
    return _Launch(_pairs_bwd_kernel, (triton.cdiv(N, cx["BLOCK_N"]), triton.cdiv(D, cx["BLOCK_DO"]), G),
                   {"x_ptr": xdt, "sq_ptr": acc, "dx_ptr": xdt, "lse_ptr": acc, "gout_ptr": acc},
                   dict(N=N, D=D, stride_xg=stride_xg, stride_xn=stride_xn, alpha=float(alpha), margin=float(margin),
                        hscale=float(hscale)),
                   dict(MODE=mode, EXCLUDE_DIAG=exclude_diag, **cx, UPCAST=_upcast(xdt), PREC_X=_prec(xdt),
                        PREC=_prec(acc)), w, st)


def pairs_fwd(x: torch.Tensor, mode: int, alpha: float, margin: float = 0.0, exclude_diag: bool = False) -> torch.Tensor:
    """Per-row log-sum-exp (modes 0, 1) or hinge row sums (mode 2) of x (G, N, D) -> (G, N), accumulation dtype."""
    x = _rowmajor(x)
    G, N, D = x.shape
    _check_int32("x", N, D, x.stride(1))
    out = torch.empty((G, N), device=x.device, dtype=_acc_torch(x.dtype))
    _plan_pairs_fwd(G, N, D, x.dtype, _arch(x.device), x.stride(0), x.stride(1), mode, alpha, margin,
                    exclude_diag).run(x_ptr=x, sq_ptr=_row_sq(x), out_ptr=out)
    return out


def pairs_bwd(x: torch.Tensor, lse: torch.Tensor, gout: torch.Tensor, mode: int, alpha: float, margin: float = 0.0,
              hscale: float = 0.0, exclude_diag: bool = False) -> torch.Tensor:
    """dx (G, N, D) in x's dtype; lse (G,) total log-sum-exp (modes 0/1), gout (G,) upstream gradient."""
    x = _rowmajor(x)
    G, N, D = x.shape
    _check_int32("x", N, D, x.stride(1))
    acc_t = _acc_torch(x.dtype)
    dx = torch.empty((G, N, D), device=x.device, dtype=x.dtype)
    _plan_pairs_bwd(G, N, D, x.dtype, _arch(x.device), x.stride(0), x.stride(1), mode, alpha, margin, hscale,
                    exclude_diag).run(x_ptr=x, sq_ptr=_row_sq(x), dx_ptr=dx, lse_ptr=lse.to(acc_t).contiguous(),
                                      gout_ptr=gout.to(acc_t).contiguous())
    return dx


# ------------------------------------------------------------------------------------------ AOT configurations
# The shapes the launchers are compiled for ahead of time: the CUDA benchmark registry (benches/cases.py:
# dispersive_loss/huge_dim B in {32..256} x M = 294,912, its check shape, dispersive_loss/many_samples and
# uniformity) and tests/test_cuda_dispersive.py.  SMs: H100 / H200 132, A100 108.
SM_COUNT = {90: 132, 80: 108}
HEADLINE = dict(G=1, B=256, M=294_912)
GRAM_SHAPES = [dict(G=1, B=b, M=294_912) for b in (32, 64, 128, 256)] + [dict(G=1, B=9, M=1000),
                                                                          dict(G=2, B=256, M=147_456)]
LARGEST_GRAM = dict(G=1, B=512, M=294_912)     # GRAM_PATH_MAX_B: the "large" configs, compiled though not benched
TILED_SHAPES = {"many_samples": [dict(G=1, N=n, D=64) for n in (4096, 16384, 65536)] + [dict(G=1, N=67, D=24)],
                "uniformity": [dict(G=1, N=n, D=128) for n in (4096, 16384, 65536)] + [dict(G=1, N=67, D=24)],
                "forced_tiled": [dict(G=2, N=256, D=2048)]}
_VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
_TILED_MODE = {"infonce_l2": MODE_L2, "infonce_cosine": MODE_DOT, "hinge": MODE_HINGE}


def _aot_configs():
    """One AotConfig per specialization the launchers build for the shapes above: every Gram-path launch of
    infonce_l2 in bfloat16 (the benchmarks' dtype) at GRAM_SHAPES; at HEADLINE also float32 / float16, every
    variant and the atomic (non-deterministic) Gram; at LARGEST_GRAM (bf16 / fp32, l2 / covariance) so that the
    B > 256 tiles are compiled too; the tiled kernels at TILED_SHAPES (bfloat16; float32 too for the headline
    N = 65,536 and the tests' forced-tiled shape)."""
    cfgs = {}

    def add(launch, arch):
        c = launch.aot((arch,))
        key = (c.kernel, tuple(c.signature.items()), tuple(sorted(c.constexprs.items(), key=str)), c.num_warps,
               c.num_stages, c.divisible_by_16)
        if key in cfgs:
            old = cfgs[key]
            cfgs[key] = AotConfig(old.kernel, old.signature, old.constexprs, old.num_warps, old.num_stages,
                                  old.divisible_by_16, tuple(sorted(set(old.archs) | {arch})))
        else:
            cfgs[key] = c

    cases = [(s, torch.bfloat16, "infonce_l2", True) for s in GRAM_SHAPES]
    cases += [(HEADLINE, dt, "infonce_l2", True) for dt in (torch.float32, torch.float16)]
    cases += [(HEADLINE, dt, v, True) for dt in (torch.bfloat16, torch.float32) for v in _VARIANTS[1:]]
    cases += [(s, torch.bfloat16, v, True) for s in GRAM_SHAPES[-1:] for v in _VARIANTS[1:]]
    cases += [(HEADLINE, torch.bfloat16, v, False) for v in ("infonce_l2", "covariance")]
    cases += [(LARGEST_GRAM, dt, v, True) for dt in (torch.bfloat16, torch.float32) for v in ("infonce_l2", "covariance")]
    for arch in (80, 90):
        for s, dt, variant, det in cases:
            plans, _ = _gram_plans(s["G"], s["B"], s["M"], dt, arch, SM_COUNT[arch], variant, 0.5, 1.0, 1e-5, True,
                                   det)
            for p in plans.values():
                add(p, arch)
        tiled = [(s, torch.bfloat16, MODE_L2, False) for s in TILED_SHAPES["many_samples"]]
        tiled += [(s, torch.bfloat16, MODE_L2, True) for s in TILED_SHAPES["uniformity"]]
        tiled += [(s, dt, m, False) for s in TILED_SHAPES["forced_tiled"] for dt in (torch.bfloat16, torch.float32)
                  for m in (MODE_L2, MODE_DOT, MODE_HINGE)]
        tiled += [(TILED_SHAPES[k][2], torch.float32, MODE_L2, k == "uniformity") for k in ("many_samples", "uniformity")]
        for s, dt, mode, excl in tiled:
            add(_plan_pairs_fwd(s["G"], s["N"], s["D"], dt, arch, s["N"] * s["D"], s["D"], mode, 0.5, 1.0, excl), arch)
            add(_plan_pairs_bwd(s["G"], s["N"], s["D"], dt, arch, s["N"] * s["D"], s["D"], mode, 0.5, 1.0, 0.5, excl),
                arch)
    return list(cfgs.values())


AOT_CONFIGS = _aot_configs()


# ------------------------------------------------------------------------------------------------ roofline
HBM_BYTES_PER_S = 4.8e12          # H200 HBM3e


def roofline_model(case: str) -> list:
    """Per-kernel FLOP / byte counts of the launches of ``case`` on sm_90 (H200, 132 SMs), for
    ``python -m contrastgen.kernels.roofline``.  Case "dispersive_b256_m294912_bf16": infonce_l2, B = 256,
    M = 294,912, bfloat16, forward + backward (the minimal traffic: Z read once forward, Z read + dZ written
    backward).  hbm_bytes assume each K slice of Z comes from HBM once (the tiles / row blocks that share it run
    together, program axis 0 fastest) and that the small buffers (partial Grams, W) are also counted once;
    l2_bytes count every load and store the programs issue."""
    if case != "dispersive_b256_m294912_bf16":
        raise ValueError(f"roofline_model: unknown case {case!r} (known: 'dispersive_b256_m294912_bf16')")
    G, B, M = HEADLINE["G"], HEADLINE["B"], HEADLINE["M"]
    dt, arch = torch.bfloat16, 90
    plans, split_w = _gram_plans(G, B, M, dt, arch, SM_COUNT[arch], "infonce_l2", 0.5, 1.0, 1e-5, True, True)
    esz = 2
    z_bytes = G * B * M * esz
    rows = []

    def row(name, extra, flops, hbm, l2, note):
        p = plans[name]
        ctas = int(math.prod(p.grid))
        rows.append(dict(kernel=_kname(p.kernel), aot_config=p.aot((arch,)), ctas=ctas, flops=float(flops), hbm_bytes=float(hbm),
                         l2_bytes=float(l2), note=note, **extra))

    g = plans["gram"]
    bb, T = g.constexprs["BLOCK_B"], g.scalars["n_tiles"]
    n_tri, splits = g.grid[0], g.grid[1]
    n_diag, n_off = T, n_tri - T
    part_bytes = G * splits * B * B * 4
    tile_loads = (n_diag * 1 + n_off * 2) * bb * M * esz * G          # one block per diagonal tile, two otherwise
    row("gram", {"phase": "fwd"}, n_tri * 2.0 * bb * bb * M * G, z_bytes + part_bytes, tile_loads + part_bytes,
        f"{n_tri} upper {bb}x{bb} tiles x {splits} K splits ({g.scalars['k_per_split']} columns each); each K slice "
        f"of Z loaded {tile_loads / z_bytes:.1f}x (L2), once from HBM; partials {part_bytes / 1e6:.1f} MB")
    e = plans["epilogue"]
    w_bytes = G * (2 if split_w else 1) * B * B * (esz if split_w else 4)
    row("epilogue", {"phase": "fwd"}, 25.0 * G * B * B, part_bytes + w_bytes, part_bytes + w_bytes,
        f"{e.constexprs['BLOCK_R']} rows per program; split-K sum, l2 loss rows, W hi/lo rows + rowscale "
        "(~25 FLOP per entry, not tensor-core work)")
    row("loss", {"phase": "fwd"}, 2.0 * G * B, G * B * 4, G * B * 4, "one program per group: L and gscale")
    wz = plans["wz"]
    bi, bk = wz.constexprs["BLOCK_I"], wz.constexprs["BLOCK_K"]
    n_i, splits_k = wz.grid[0], wz.grid[1]
    passes = 2 if split_w else 1
    w_loads = n_i * splits_k * bi * B * passes * esz * G
    row("wz", {"phase": "bwd"}, passes * 2.0 * B * B * M * G, 2 * z_bytes + w_bytes, n_i * z_bytes + z_bytes + w_loads,
        f"{n_i} row blocks of {bi} x {splits_k} K ranges of {wz.scalars['k_per_split']} columns; {passes} bf16 "
        f"passes (W hi, lo) with fp32 accumulation; Z loaded {n_i}x (L2), W rows once per program "
        f"({w_loads / 1e6:.1f} MB)")
    return rows
