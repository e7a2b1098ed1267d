"""Fused Triton kernels for CONFORM's contrastive loss over cross-attention maps (METHODS.md section 4).

One program per prompt does the whole forward (``_attention_nce_fwd_kernel``), one program per prompt the whole
backward (``_attention_nce_bwd_kernel``): one launch per direction for a batch of B prompts, instead of the
dozens of small PyTorch ops of the reference (``contrastgen.reference.attention_nce_ref``, the spec).

Math (per prompt; A = maps (H, W, T), T = 77; K tokens t_k with group labels y_k, padded to KP columns)
-----------------------------------------------------------------------------------------------------
  X[p, k]   = A[p, t_k]                     or, SOFTMAX:  exp(100 A[p, t_k] - m_p) / l_p,
              m_p = max_{1<=c<=T-2} 100 A[p, c],  l_p = sum_{1<=c<=T-2} exp(100 A[p, c] - m_p)
  Xs        = S X                             S (Ho Wo x H W) = Sh (x) Sw, Sh[i, y] = sum_d w_d [refl(i+d-PAD) = y]
              (SMOOTH: reflect pad PAD = 1, KS taps, separable weights w; else S = I, Ho = H)
  E[:, k]   = Xs[:, k]                        or, SPATIAL: softmax over positions of 100 Xs[:, k] (stats M_k, L_k)
  columns KP..2KP-1: the same for the previous-step maps (HAS_PREV; labels repeated, no gradient)
  U         = E^T E  (N x N, N = KP (x2)),  n_k = sqrt(U_kk),  cos_ij = U_ij / (max(n_i, eps) max(n_j, eps))
  NT-Xent (LOSS 0, PML convention): s = cos / tau; for ordered positive pairs (i != j, y_i = y_j):
              loss = mean_{(i,j) pos} softplus(lse_{n: y_n != y_i} s_in - s_ij)            (0 without pairs)
  contrastive (LOSS 1): mean of the non-zero relu(1 - cos) over positive pairs + that of relu(cos) over negatives
  LOSS 2: per-prompt choice (``kinds``: the official "ntxent_contrastive" switch)
Backward: dL/dU (N x N) in the epilogue (through cos and the norms), dE = E (dU + dU^T), through the spatial
softmax (its column sums from U: sum_o dE_ok E_ok = (U (dU + dU^T))_kk), dX = S^T dXs, then through the token
softmax, dA[p, c] = 100 y_pc (g_pc - sum_k g_pk y_p,t_k), with g scattered to the token channels by a one-hot
product.  Non-finite rule: a prompt whose loss (or upstream gradient) is not finite gets NaN in its whole dA.

Phases and scratch (per program): the forward writes X (H W x N) to ``xbuf`` (saved for the backward) and reads
it back after a ``tl.debug_barrier`` (CTA-wide: global writes of the program are visible to all its threads);
the backward writes dXs (Ho Wo x N) to a scratch buffer the same way.  The smoothing products only visit the
input rows an output block reads (a band of KS + 1 image rows).

Work per prompt at SD-1.5 shapes (H = W = 16, T = 77, N = 32 with previous maps, KS = 3):
  forward : loads 256 x 77 x 4 B = 79 KB of maps (SOFTMAX; else 256 x N gathers), writes/reads X (32 KB);
            smoothing 2 (Ho Wo) (band ~ 6 W) N ~ 0.8 MFLOP per program (tiles (BLOCK_O x BLOCK_P) x (BLOCK_P x N),
            2 BLOCK_O BLOCK_P N FLOP each), Gram 2 (Ho Wo) N^2 = 0.5 MFLOP; epilogue O(N^2).
  backward: the same plus dE (2 Ho Wo N^2), S^T dXs (as the smoothing) and the one-hot scatter
            (2 BLOCK_P N TP per tile, TP = 128): ~3 MFLOP, writes 79 KB of dA.
The kernel is latency-bound (a few microseconds per program); every product is a small fp32 ``tl.dot`` with
``input_precision="ieee"`` (exact fp32 products: the x100 softmaxes amplify rounding, and the one-hot scatter
must be exact).  16-bit maps are converted to fp32 on load, so no 16-bit ``tl.dot`` runs (the interpreter's
bf16 ``tl.dot`` bug, triton issue 11584, does not apply; 2026-12-01).  No atomics.
"""
from __future__ import annotations

import os
from typing import List

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

NEG = tl.constexpr(-1.0e30)
EPS = tl.constexpr(1e-12)      # F.normalize's eps
BIG = tl.constexpr(3.0e38)     # |x| < BIG <=> finite

# per-architecture configs: (BLOCK_O, BLOCK_P, num_warps); the interpreter uses few, large tiles (fast on CPU)
CONFIGS = {90: (64, 32, 4), 80: (32, 32, 4)}
INTERPRETER_CONFIG = (256, 128, 4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _reflect(r, n):
    r = tl.where(r < 0, -r, r)
    return tl.where(r > n - 1, 2 * (n - 1) - r, r)


@triton.jit
def _smoothing_tile(w_ptr, o, p, H, W, Wo, HWo, HW, KS: tl.constexpr, PAD: tl.constexpr):
    """S[o, p] (BLOCK_O, BLOCK_P) of the separable reflect-padded smoothing; 0 outside the maps."""
    i = o // Wo
    j = o % Wo
    y = p // W
    x = p % W
    sh = tl.zeros((o.shape[0], p.shape[0]), dtype=tl.float32)
    sw = tl.zeros((o.shape[0], p.shape[0]), dtype=tl.float32)
    for d in tl.static_range(KS):
        wd = tl.load(w_ptr + d)
        r = _reflect(i + d - PAD, H)
        c = _reflect(j + d - PAD, W)
        sh += tl.where(r[:, None] == y[None, :], wd, 0.0)
        sw += tl.where(c[:, None] == x[None, :], wd, 0.0)
    inside = (o[:, None] < HWo) & (p[None, :] < HW)
    return tl.where(inside, sh * sw, 0.0)


@triton.jit
def _smoothed_block(xbuf, w_ptr, o0, H, W, Ho, Wo, HWo, HW,
                    N_COLS: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr, SMOOTH: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    """Xs[o0 : o0 + BLOCK_O, :] (BLOCK_O, N_COLS) = S X, X read from the program's xbuf (HW x N_COLS)."""
    o = o0 + tl.arange(0, BLOCK_O)
    cols = tl.arange(0, N_COLS)
    if SMOOTH:
        acc = tl.zeros((BLOCK_O, N_COLS), dtype=tl.float32)
        i0 = o0 // Wo
        i1 = tl.minimum(Ho - 1, (o0 + BLOCK_O - 1) // Wo)
        y_lo = tl.maximum(0, tl.minimum(i0 - PAD, H - 1 - PAD))
        y_hi = tl.minimum(H - 1, i1 + KS - 1 - PAD)
        p_start = (y_lo * W) // BLOCK_P * BLOCK_P
        for p0 in range(p_start, (y_hi + 1) * W, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            s = _smoothing_tile(w_ptr, o, p, H, W, Wo, HWo, HW, KS, PAD)
            xt = tl.load(xbuf + p[:, None] * N_COLS + cols[None, :], mask=(p < HW)[:, None], other=0.0)
            acc = tl.dot(s, xt, acc, input_precision="ieee")   # (BLOCK_O, BLOCK_P) x (BLOCK_P, N_COLS)
    else:
        acc = tl.load(xbuf + o[:, None] * N_COLS + cols[None, :], mask=(o < HWo)[:, None], other=0.0)
    return acc


@triton.jit
def _columns(lab_ptr, KP: tl.constexpr, N_COLS: tl.constexpr):
    """Column index, its label and whether it is a real token (padding: label -1).  Columns >= KP (present only
    with previous maps, N_COLS = 2 KP) repeat the labels."""
    cols = tl.arange(0, N_COLS)
    lab = tl.load(lab_ptr + cols % KP)
    return cols, lab, lab >= 0


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _loss_and_dgram(U, lab, valid, inv_tau, kind, g, N_COLS: tl.constexpr, LOSS: tl.constexpr,
                    WANT_GRAD: tl.constexpr):
    """(loss, dL/dU * g) of one prompt from its Gram U (N_COLS, N_COLS); see the module docstring."""
    idx = tl.arange(0, N_COLS)
    eye = idx[:, None] == idx[None, :]
    d_r = tl.sum(tl.where(eye, U, 0.0), axis=1)
    d_c = tl.sum(tl.where(eye, U, 0.0), axis=0)
    n_r = tl.sqrt(tl.maximum(d_r, 0.0))
    n_c = tl.sqrt(tl.maximum(d_c, 0.0))
    m_r = tl.maximum(n_r, EPS)
    m_c = tl.maximum(n_c, EPS)
    cos = U / (m_r[:, None] * m_c[None, :])
    both = valid[:, None] & valid[None, :]
    same = lab[:, None] == lab[None, :]
    pos = both & same & (~eye)
    neg = both & (~same)
    bad = tl.sum(tl.where(valid & ~(tl.abs(d_r) < BIG), 1, 0), axis=0) > 0
    # NT-Xent (PML)
    s = cos * inv_tau
    mx = tl.max(tl.where(neg, s, NEG), axis=1)
    has_neg = mx > NEG
    mx_safe = tl.where(has_neg, mx, 0.0)
    sum_neg = tl.sum(tl.where(neg, tl.exp(s - mx_safe[:, None]), 0.0), axis=1)
    lse = tl.where(has_neg, mx_safe + tl.log(tl.where(has_neg, sum_neg, 1.0)), NEG)
    xpos = lse[:, None] - s
    n_pos = tl.sum(tl.sum(tl.where(pos, 1.0, 0.0), axis=1), axis=0)
    scale_nt = tl.where(n_pos > 0, 1.0 / tl.maximum(n_pos, 1.0), 0.0)
    loss_nt = tl.sum(tl.sum(tl.where(pos, _softplus(xpos), 0.0), axis=1), axis=0) * scale_nt
    # contrastive (PML, cosine, pos_margin 1, neg_margin 0)
    pv = tl.where(pos, tl.maximum(1.0 - cos, 0.0), 0.0)
    nv = tl.where(neg, tl.maximum(cos, 0.0), 0.0)
    pn = tl.sum(tl.sum(tl.where(pv > 0, 1.0, 0.0), axis=1), axis=0)
    nn = tl.sum(tl.sum(tl.where(nv > 0, 1.0, 0.0), axis=1), axis=0)
    n_neg = tl.sum(tl.sum(tl.where(neg, 1.0, 0.0), axis=1), axis=0)
    loss_c = (tl.sum(tl.sum(pv, axis=1), axis=0) / tl.maximum(pn, 1.0)
              + tl.sum(tl.sum(nv, axis=1), axis=0) / tl.maximum(nn, 1.0))
    if LOSS == 0:
        is_nt = True
    elif LOSS == 1:
        is_nt = False
    else:
        is_nt = kind == 0
    loss = tl.where(is_nt, loss_nt, loss_c)
    terms = tl.where(is_nt, n_pos, n_pos + n_neg)
    loss = tl.where(bad & (terms > 0), float("nan"), loss)
    dU = tl.zeros((N_COLS, N_COLS), dtype=tl.float32)
    if WANT_GRAD:
        sg = tl.where(pos & has_neg[:, None], 1.0 / (1.0 + tl.exp(tl.minimum(-xpos, 80.0))), 0.0) * scale_nt
        c_i = tl.sum(sg, axis=1)
        p_neg = tl.exp(tl.minimum(s - lse[:, None], 0.0))          # <= 1 where neg (lse >= every s_in)
        d_nt = tl.where(neg, c_i[:, None] * p_neg, 0.0) * inv_tau - sg * inv_tau
        d_ct = (tl.where(pos & (1.0 - cos > 0), -1.0 / tl.maximum(pn, 1.0), 0.0)
                + tl.where(neg & (cos > 0), 1.0 / tl.maximum(nn, 1.0), 0.0))
        dcos = tl.where(is_nt, d_nt, d_ct) * g
        dU = dcos / (m_r[:, None] * m_c[None, :])
        dc_cos = dcos * cos
        dm = -(tl.sum(dc_cos, axis=1) + tl.sum(dc_cos, axis=0)) / m_r
        dU += tl.where(eye & (n_r > EPS)[:, None], (dm / (2.0 * tl.maximum(n_r, EPS)))[:, None], 0.0)
    return loss, dU


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _attention_nce_fwd_kernel(maps_ptr, prev_ptr, tok_ptr, lab_ptr, kind_ptr, w_ptr,
                              loss_ptr, xbuf_ptr, gram_ptr, stats_ptr,
                              H, W, T, Ho, Wo, inv_tau,
                              KP: tl.constexpr, N_COLS: tl.constexpr, TP: tl.constexpr, KS: tl.constexpr,
                              PAD: tl.constexpr, HAS_PREV: tl.constexpr, SOFTMAX: tl.constexpr,
                              SMOOTH: tl.constexpr, SPATIAL: tl.constexpr, LOSS: tl.constexpr,
                              BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    """One prompt: loss, X (saved), U and the spatial-softmax stats.  Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    HW = H * W
    HWo = Ho * Wo
    cols, lab, valid = _columns(lab_ptr + b * KP, KP, N_COLS)
    tok = tl.load(tok_ptr + b * KP + cols % KP)
    is_prev = cols >= KP
    xbuf = xbuf_ptr + b * HW * N_COLS
    a_cur = maps_ptr + b * HW * T
    a_prev = prev_ptr + b * HW * T
    ch = tl.arange(0, TP)
    ch_ok = (ch >= 1) & (ch < T - 1)
    # phase A: token values X -> xbuf
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < HW
        take_cur = pm[:, None] & (valid & ~is_prev)[None, :]
        x = tl.load(a_cur + p[:, None] * T + tok[None, :], mask=take_cur, other=0.0).to(tl.float32)
        if SOFTMAX:
            row = tl.load(a_cur + p[:, None] * T + ch[None, :], mask=pm[:, None] & ch_ok[None, :],
                          other=float("-inf")).to(tl.float32) * 100.0
            m = tl.where(pm, tl.max(row, axis=1), 0.0)
            l = tl.where(pm, tl.sum(tl.exp(row - m[:, None]), axis=1), 1.0)
            x = tl.where(take_cur, tl.exp(x * 100.0 - m[:, None]) / l[:, None], 0.0)
        if HAS_PREV:
            take_prev = pm[:, None] & (valid & is_prev)[None, :]
            xp = tl.load(a_prev + p[:, None] * T + tok[None, :], mask=take_prev, other=0.0).to(tl.float32)
            if SOFTMAX:
                row = tl.load(a_prev + p[:, None] * T + ch[None, :], mask=pm[:, None] & ch_ok[None, :],
                              other=float("-inf")).to(tl.float32) * 100.0
                m = tl.where(pm, tl.max(row, axis=1), 0.0)
                l = tl.where(pm, tl.sum(tl.exp(row - m[:, None]), axis=1), 1.0)
                xp = tl.where(take_prev, tl.exp(xp * 100.0 - m[:, None]) / l[:, None], 0.0)
            x = tl.where(is_prev[None, :], xp, x)
        tl.store(xbuf + p[:, None] * N_COLS + cols[None, :], x, mask=pm[:, None])
    tl.debug_barrier()
    # phase B: smoothing, (spatial softmax), Gram
    M = tl.zeros((N_COLS,), dtype=tl.float32)
    L = tl.full((N_COLS,), 1.0, dtype=tl.float32)
    if SPATIAL:
        M = tl.full((N_COLS,), float("-inf"), dtype=tl.float32)
        L = tl.zeros((N_COLS,), dtype=tl.float32)
        for o0 in range(0, HWo, BLOCK_O):
            xs = _smoothed_block(xbuf, w_ptr, o0, H, W, Ho, Wo, HWo, HW, N_COLS, KS, PAD, SMOOTH, BLOCK_O, BLOCK_P)
            om = (o0 + tl.arange(0, BLOCK_O)) < HWo
            z = tl.where(om[:, None], xs * 100.0, float("-inf"))
            m_new = tl.maximum(M, tl.max(z, axis=0))
            L = L * tl.exp(M - m_new) + tl.sum(tl.exp(z - m_new[None, :]), axis=0)
            M = m_new
    U = tl.zeros((N_COLS, N_COLS), dtype=tl.float32)
    for o0 in range(0, HWo, BLOCK_O):
        e = _smoothed_block(xbuf, w_ptr, o0, H, W, Ho, Wo, HWo, HW, N_COLS, KS, PAD, SMOOTH, BLOCK_O, BLOCK_P)
        if SPATIAL:
            om = (o0 + tl.arange(0, BLOCK_O)) < HWo
            e = tl.where(om[:, None], tl.exp(e * 100.0 - M[None, :]) / L[None, :], 0.0)
        U = tl.dot(tl.trans(e), e, U, input_precision="ieee")   # (N_COLS, BLOCK_O) x (BLOCK_O, N_COLS)
    kind = tl.load(kind_ptr + b)
    loss, _ = _loss_and_dgram(U, lab, valid, inv_tau, kind, 1.0, N_COLS, LOSS, False)
    tl.store(loss_ptr + b, loss)
    tl.store(gram_ptr + b * N_COLS * N_COLS + cols[:, None] * N_COLS + cols[None, :], U)
    tl.store(stats_ptr + b * 2 * N_COLS + cols, M)
    tl.store(stats_ptr + b * 2 * N_COLS + N_COLS + cols, L)


@triton.jit
def _attention_nce_bwd_kernel(grad_ptr, maps_ptr, tok_ptr, lab_ptr, kind_ptr, w_ptr,
                              loss_ptr, xbuf_ptr, gram_ptr, stats_ptr, dxs_ptr, dmaps_ptr,
                              H, W, T, Ho, Wo, inv_tau,
                              KP: tl.constexpr, N_COLS: tl.constexpr, TP: tl.constexpr, KS: tl.constexpr,
                              PAD: tl.constexpr, HAS_PREV: tl.constexpr, SOFTMAX: tl.constexpr,
                              SMOOTH: tl.constexpr, SPATIAL: tl.constexpr, LOSS: tl.constexpr,
                              BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    """One prompt: dmaps (H W x T) for the upstream gradient grad[b].  Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    HW = H * W
    HWo = Ho * Wo
    cols, lab, valid = _columns(lab_ptr + b * KP, KP, N_COLS)
    tok = tl.load(tok_ptr + b * KP + cols % KP)
    is_prev = cols >= KP
    g = tl.load(grad_ptr + b)
    lossb = tl.load(loss_ptr + b)
    bad = ~((tl.abs(g) < BIG) & (tl.abs(lossb) < BIG))
    U = tl.load(gram_ptr + b * N_COLS * N_COLS + cols[:, None] * N_COLS + cols[None, :])
    kind = tl.load(kind_ptr + b)
    _, dU = _loss_and_dgram(U, lab, valid, inv_tau, kind, g, N_COLS, LOSS, True)
    Gt = dU + tl.trans(dU)
    Gt = tl.where((cols < KP)[None, :], Gt, 0.0)             # gradient only for the current maps' columns
    xbuf = xbuf_ptr + b * HW * N_COLS
    dxs = dxs_ptr + b * HWo * N_COLS
    M = tl.load(stats_ptr + b * 2 * N_COLS + cols)
    L = tl.load(stats_ptr + b * 2 * N_COLS + N_COLS + cols)
    if SPATIAL:
        UG = tl.dot(U, Gt, input_precision="ieee")              # (N_COLS, N_COLS) x (N_COLS, N_COLS)
        idx = tl.arange(0, N_COLS)
        colsum = tl.sum(tl.where(idx[:, None] == idx[None, :], UG, 0.0), axis=0)
    # phase 1: dXs -> scratch
    for o0 in range(0, HWo, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        om = o < HWo
        e = _smoothed_block(xbuf, w_ptr, o0, H, W, Ho, Wo, HWo, HW, N_COLS, KS, PAD, SMOOTH, BLOCK_O, BLOCK_P)
        if SPATIAL:
            e = tl.where(om[:, None], tl.exp(e * 100.0 - M[None, :]) / L[None, :], 0.0)
        de = tl.dot(e, Gt, input_precision="ieee")              # (BLOCK_O, N_COLS) x (N_COLS, N_COLS)
        if SPATIAL:
            de = 100.0 * e * (de - colsum[None, :])
        tl.store(dxs + o[:, None] * N_COLS + cols[None, :], de, mask=om[:, None])
    tl.debug_barrier()
    # phase 2: dX = S^T dXs, through the token softmax, into dmaps
    ch = tl.arange(0, TP)
    ch_ok = (ch >= 1) & (ch < T - 1)
    onehot = tl.where((tok[:, None] == ch[None, :]) & (valid & ~is_prev)[:, None], 1.0, 0.0)   # (N_COLS, TP)
    a_cur = maps_ptr + b * HW * T
    out = dmaps_ptr + b * HW * T
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < HW
        if SMOOTH:
            dx = tl.zeros((BLOCK_P, N_COLS), dtype=tl.float32)
            y0 = p0 // W
            y1 = tl.minimum(H - 1, (p0 + BLOCK_P - 1) // W)
            for o0 in range(0, HWo, BLOCK_O):
                i0 = o0 // Wo
                i1 = tl.minimum(Ho - 1, (o0 + BLOCK_O - 1) // Wo)
                y_lo = tl.maximum(0, tl.minimum(i0 - PAD, H - 1 - PAD))
                y_hi = tl.minimum(H - 1, i1 + KS - 1 - PAD)
                if (y_lo <= y1) & (y_hi >= y0):                  # this output block reads these rows
                    o = o0 + tl.arange(0, BLOCK_O)
                    s = _smoothing_tile(w_ptr, o, p, H, W, Wo, HWo, HW, KS, PAD)
                    dt = tl.load(dxs + o[:, None] * N_COLS + cols[None, :], mask=(o < HWo)[:, None], other=0.0)
                    dx = tl.dot(tl.trans(s), dt, dx, input_precision="ieee")   # (BLOCK_P, BLOCK_O) x (BLOCK_O, N_COLS)
        else:
            dx = tl.load(dxs + p[:, None] * N_COLS + cols[None, :], mask=pm[:, None], other=0.0)
        gfull = tl.dot(dx, onehot, input_precision="ieee")      # (BLOCK_P, N_COLS) x (N_COLS, TP): exact scatter
        if SOFTMAX:
            row = tl.load(a_cur + p[:, None] * T + ch[None, :], mask=pm[:, None] & ch_ok[None, :],
                          other=float("-inf")).to(tl.float32) * 100.0
            m = tl.where(pm, tl.max(row, axis=1), 0.0)
            ex = tl.exp(row - m[:, None])
            l = tl.where(pm, tl.sum(ex, axis=1), 1.0)
            y = ex / l[:, None]
            gy = tl.sum(gfull * y, axis=1)
            da = 100.0 * y * (gfull - gy[:, None])
            da = tl.where(ch_ok[None, :], da, 0.0)
        else:
            da = gfull
        da = tl.where(bad, float("nan"), da)
        tl.store(out + p[:, None] * T + ch[None, :], da.to(dmaps_ptr.dtype.element_ty),
                 mask=pm[:, None] & (ch < T)[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _config(device: torch.device):
    if _interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    major, minor = torch.cuda.get_device_capability(device)
    return CONFIGS[90] if major >= 9 else CONFIGS[80]


def _check(maps: torch.Tensor):
    if maps.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton attention_nce kernel takes float32 / float16 / bfloat16 maps, got {maps.dtype} "
                        "(float64 runs the reference at the public API)")


def _flags(maps, prev, tokens, smooth, weights):
    B, H, W, T = maps.shape
    KP = tokens.shape[1]
    n_cols = KP * (2 if prev is not None else 1)
    ks = len(weights) if smooth else 1
    pad = 1 if smooth else 0
    Ho, Wo = H + 2 * pad - ks + 1, W + 2 * pad - ks + 1
    tp = max(16, triton.next_power_of_2(T))
    w = torch.tensor(weights if smooth else [1.0], dtype=torch.float32, device=maps.device)
    return B, H, W, T, KP, n_cols, ks, pad, Ho, Wo, tp, w


def attention_nce_fwd(maps, prev, tokens, labels, kinds, weights, temperature, softmax_normalize, smooth,
                      spatial_softmax, loss_mode):
    """Same contract as ``contrastgen.ops._cpp_attention_nce.attention_nce_fwd``; outputs float32.  The token
    softmax is recomputed in the backward (cheap on the GPU), so the saved Y is empty (B, 0, T)."""
    _check(maps)
    B, H, W, T, KP, n_cols, ks, pad, Ho, Wo, tp, w = _flags(maps, prev, tokens, smooth, weights)
    maps = maps.contiguous()
    prev_t = prev.contiguous() if prev is not None else maps
    dev = maps.device
    loss = torch.empty(B, dtype=torch.float32, device=dev)
    xbuf = torch.empty(B, H * W, n_cols, dtype=torch.float32, device=dev)
    gram = torch.empty(B, n_cols, n_cols, dtype=torch.float32, device=dev)
    stats = torch.empty(B, 2, n_cols, dtype=torch.float32, device=dev)
    bo, bp, nw = _config(dev)
    _attention_nce_fwd_kernel[(B,)](
        maps, prev_t, tokens.to(torch.int32).contiguous(), labels.to(torch.int32).contiguous(),
        kinds.to(torch.int32).contiguous(), w, loss, xbuf, gram, stats, H, W, T, Ho, Wo, 1.0 / float(temperature),
        KP=KP, N_COLS=n_cols, TP=tp, KS=ks, PAD=pad, HAS_PREV=prev is not None, SOFTMAX=bool(softmax_normalize),
        SMOOTH=bool(smooth), SPATIAL=bool(spatial_softmax), LOSS=int(loss_mode), BLOCK_O=bo, BLOCK_P=bp,
        num_warps=nw, num_stages=1)
    return loss, xbuf, gram, stats, torch.empty(B, 0, T, dtype=torch.float32, device=dev)


def attention_nce_bwd(grad, maps, prev, tokens, labels, kinds, weights, loss, xbuf, gram, stats, ybuf, temperature,
                      softmax_normalize, smooth, spatial_softmax, loss_mode):
    """d loss / d maps (B, H, W, T) float32."""
    _check(maps)
    B, H, W, T, KP, n_cols, ks, pad, Ho, Wo, tp, w = _flags(maps, prev, tokens, smooth, weights)
    maps = maps.contiguous()
    dev = maps.device
    dmaps = torch.empty(B, H, W, T, dtype=torch.float32, device=dev)
    dxs = torch.empty(B, Ho * Wo, n_cols, dtype=torch.float32, device=dev)
    bo, bp, nw = _config(dev)
    _attention_nce_bwd_kernel[(B,)](
        grad.float().contiguous(), maps, tokens.to(torch.int32).contiguous(), labels.to(torch.int32).contiguous(),
        kinds.to(torch.int32).contiguous(), w, loss.float().contiguous(), xbuf.float().contiguous(),
        gram.float().contiguous(), stats.float().contiguous(), dxs, dmaps, H, W, T, Ho, Wo,
        1.0 / float(temperature), KP=KP, N_COLS=n_cols, TP=tp, KS=ks, PAD=pad, HAS_PREV=prev is not None,
        SOFTMAX=bool(softmax_normalize), SMOOTH=bool(smooth), SPATIAL=bool(spatial_softmax), LOSS=int(loss_mode),
        BLOCK_O=bo, BLOCK_P=bp, num_warps=nw, num_stages=1)
    return dmaps


# ------------------------------------------------------------------------------------------------- AOT
def _aot_configs() -> List[AotConfig]:
    """Per architecture config, forward and backward of the SD-1.5 pipeline's specialization (T = 77 -> TP = 128,
    KP = 16 with previous maps -> N_COLS = 32, KS = 3, token softmax, NT-Xent; fp32 maps) and of the
    register-heaviest one (both softmaxes, per-prompt loss; bf16 maps).  Other flag / size combinations are
    specializations of the same code with fewer live tiles (all 44 combinations of flags x dtype compiled with 0
    spills on 2026-12-01; listing them all would make the CPU CI's compile test take minutes)."""
    mod = "contrastgen.kernels.attention_nce"
    flag_sets = [("fp32", dict(HAS_PREV=True, SOFTMAX=True, SPATIAL=False, LOSS=0)),
                 ("bf16", dict(HAS_PREV=True, SOFTMAX=True, SPATIAL=True, LOSS=2))]
    common = {"H": "i32", "W": "i32", "T": "i32", "Ho": "i32", "Wo": "i32", "inv_tau": "fp32"}
    cxs = {k: "constexpr" for k in ("KP", "N_COLS", "TP", "KS", "PAD", "HAS_PREV", "SOFTMAX", "SMOOTH", "SPATIAL",
                                    "LOSS", "BLOCK_O", "BLOCK_P")}
    out = []
    for arch, (bo, bp, nw) in CONFIGS.items():
        for dt, fl in flag_sets:
            cx = dict(KP=16, N_COLS=32, TP=128, KS=3, PAD=1, SMOOTH=True, BLOCK_O=bo, BLOCK_P=bp, **fl)
            fwd_sig = {"maps_ptr": f"*{dt}", "prev_ptr": f"*{dt}", "tok_ptr": "*i32", "lab_ptr": "*i32",
                       "kind_ptr": "*i32", "w_ptr": "*fp32", "loss_ptr": "*fp32", "xbuf_ptr": "*fp32",
                       "gram_ptr": "*fp32", "stats_ptr": "*fp32", **common, **cxs}
            bwd_sig = {"grad_ptr": "*fp32", "maps_ptr": f"*{dt}", "tok_ptr": "*i32", "lab_ptr": "*i32",
                       "kind_ptr": "*i32", "w_ptr": "*fp32", "loss_ptr": "*fp32", "xbuf_ptr": "*fp32",
                       "gram_ptr": "*fp32", "stats_ptr": "*fp32", "dxs_ptr": "*fp32", "dmaps_ptr": "*fp32",
                       **common, **cxs}
            for name, sig in (("_attention_nce_fwd_kernel", fwd_sig), ("_attention_nce_bwd_kernel", bwd_sig)):
                out.append(AotConfig(kernel=f"{mod}:{name}", signature=sig, constexprs=dict(cx), num_warps=nw,
                                     num_stages=1, divisible_by_16=("H", "W", "Ho", "Wo"), archs=(arch,)))
    return out


AOT_CONFIGS = _aot_configs()
