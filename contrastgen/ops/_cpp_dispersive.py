"""CPU (C++/OpenMP) launchers of the dispersive-family kernels (``csrc/dispersive.cpp``).

The launcher contract shared with ``contrastgen.kernels.dispersive`` (``contrastgen/ops/dispersive.py`` wraps it
in custom ops): ``gram_forward``, ``gram_backward``, ``w_layout``, ``pairs_fwd``, ``pairs_bwd``.  Here the Gram
path is the split-K Gram (C++ ``gram`` / ``colstats``, or the BLAS for float32 / float64: see ``PRODUCTS``) + the
B x B epilogue in PyTorch (``gram_epilogue``: tiny next to the Gram) + the streamed dZ = W Z (C++ ``stream_wz``
or the BLAS).  Outputs are computed in the accumulation dtype
(float64 for float64 input, else float32) and gradients are cast back to the input dtype.  bf16 / fp16 inputs
travel as int16 bits (the C++ side converts).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import cpp_extension

_ext = cpp_extension("dispersive")
_CPP_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_dispersive is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at "
                           "install time)")
    return _ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np_view(t: Tensor):
    """Zero-copy numpy view; bf16 / fp16 travel as int16 bits (the C++ side converts)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def gram(z: Tensor, *, normalize: tuple | None = None, deterministic: bool = True) -> Tensor:
    """Z Z^T of z (G, B, M) -> (G, B, B), accumulation dtype; normalize=(mean, rstd): of the batch-normalised Z.
    (Always deterministic on the CPU: ``deterministic`` is accepted for the launcher signature.)"""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    out = torch.empty((G, B, B), dtype=acc)
    if normalize is None:
        mean = rstd = torch.empty((G, 0), dtype=acc)
    else:
        mean, rstd = (t.to(acc).contiguous() for t in normalize)
    _need_ext().gram(_np_view(z), _CPP_DTYPE[z.dtype], G, B, M, _np_view(mean), _np_view(rstd),
                     normalize is not None, out.numpy())
    return out


def colstats(z: Tensor, eps: float):
    """Per-column batch mean and rstd = (biased var + eps)^-1/2 of z (G, B, M) -> two (G, M) tensors."""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    mean = torch.empty((G, M), dtype=acc)
    rstd = torch.empty((G, M), dtype=acc)
    _need_ext().colstats(_np_view(z), _CPP_DTYPE[z.dtype], G, B, M, float(eps), mean.numpy(), rstd.numpy())
    return mean, rstd


def stream_wz(w: Tensor, z: Tensor, *, cov: tuple | None = None, eps: float = 0.0) -> Tensor:
    """dZ = W Z for W (G, B, B), z (G, B, M) -> (G, B, M) in z's dtype (cov: the covariance variant's
    batch-norm backward, see kernels/dispersive.py)."""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    w = w.to(acc).contiguous()
    dz = torch.empty((G, B, M), dtype=acc)
    if cov is None:
        mean = rstd = dg = torch.empty((G, 0), dtype=acc)
    else:
        mean, rstd, dg = (t.to(acc).contiguous() for t in cov)
    _need_ext().stream_wz(w.numpy(), _np_view(z), _CPP_DTYPE[z.dtype], G, B, M, _np_view(mean), _np_view(rstd),
                          _np_view(dg), cov is not None, float(eps), dz.numpy())
    return dz.to(z.dtype)


def pairs_fwd(x: Tensor, mode: int, alpha: float, margin: float = 0.0, exclude_diag: bool = False) -> Tensor:
    """Per-row log-sum-exp (modes 0, 1) or hinge row sums (mode 2) of x (G, N, D) -> (G, N), accumulation dtype."""
    x = x.contiguous()
    G, N, D = x.shape
    out = torch.empty((G, N), dtype=_acc_dtype(x.dtype))
    _need_ext().pairs_fwd(_np_view(x), _CPP_DTYPE[x.dtype], G, N, D, int(mode), float(alpha), float(margin),
                          bool(exclude_diag), out.numpy())
    return out


def pairs_bwd(x: Tensor, lse: Tensor, gout: Tensor, mode: int, alpha: float, margin: float = 0.0,
              hscale: float = 0.0, exclude_diag: bool = False) -> Tensor:
    """dx (G, N, D) in x's dtype; lse (G,) total log-sum-exp (modes 0/1), gout (G,) upstream gradient."""
    x = x.contiguous()
    G, N, D = x.shape
    acc = _acc_dtype(x.dtype)
    dx = torch.empty((G, N, D), dtype=acc)
    _need_ext().pairs_bwd(_np_view(x), _CPP_DTYPE[x.dtype], G, N, D, _np_view(lse.to(acc)), _np_view(gout.to(acc)),
                          int(mode), float(alpha), float(margin), float(hscale), bool(exclude_diag), dx.numpy())
    return dx.to(x.dtype)


# ------------------------------------------------------------------------------------------- Gram path
def w_layout(dtype, variant: str, need_w: bool):
    """(planes, dtype) of gram_forward's weight tensor (G, planes, B, B): one fp32 / fp64 plane, or none."""
    return (1 if need_w else 0), _acc_dtype(dtype)


def gram_epilogue(gram: Tensor, variant: str, tau: float, margin: float, m: int, stats: Tensor, eps: float,
                  need_w: bool):
    """(loss (G,), row values (G, B), W (G, planes, B, B) for g = 1, scales (G, 1 + B) = ones) from the Gram
    (G, B, B) (the batch-normalised Gram for covariance; stats (G, 2, M) = column mean, rstd).

    The self-pairs are constants: d_ii = 0, cos_ii = s_i / max(n_i, 1e-12)^2, and they get no gradient (see
    kernels/dispersive.py).  Clamps propagate NaN (``where(x < 0, 0, x)``, ``clamp_min``)."""
    G, b, _ = gram.shape
    eye = torch.eye(b, dtype=torch.bool, device=gram.device)
    zero = gram.new_zeros(())
    if variant == "covariance":
        c = 1.0 - eps * stats[:, 1] * stats[:, 1]                 # C_mm = var / (var + eps)
        rows = gram.pow(2).sum(-1)
        loss = rows.sum(-1) / (b * b) - c.pow(2).sum(-1)
        w = (4.0 / (b * b)) * gram
    elif variant == "infonce_cosine":
        s = torch.diagonal(gram, dim1=-2, dim2=-1)
        sq = s.sqrt()
        n = sq.clamp_min(1e-12)
        inv = 1.0 / (n[..., :, None] * n[..., None, :])
        cos = torch.where(eye, (s / (n * n))[..., :, None], gram * inv)
        logits = cos / tau
        rows = torch.exp(logits - 1.0 / tau).sum(-1)                                    # v_i (cos_ii = 1)
        loss = torch.logsumexp(logits.flatten(1), -1) - 2.0 * math.log(b)
        w = None
        if need_w:
            lse = loss[:, None, None] + 2.0 * math.log(b)
            p = torch.where(eye, zero, torch.exp(logits - lse) / tau)                 # dL/dcos, i != j
            h = -((p * cos).sum(-1) / (n * n)) * (sq > 1e-12)                           # dL/ds_i / 2
            w = 2.0 * p * inv + torch.diag_embed(2.0 * h)
    else:
        s = torch.diagonal(gram, dim1=-2, dim2=-1)
        r = torch.where(eye, zero, s[..., :, None] + s[..., None, :] - 2.0 * gram)
        d = r.clamp_min(0.0) / m
        w = None
        if variant == "hinge":
            h = F.relu(margin - d)
            rows = h.pow(2).sum(-1)
            loss = rows.sum(-1) / (b * b)
            a = (-2.0 / (b * b * m)) * h
        else:
            logits = -d / tau
            rows = torch.exp(logits).sum(-1)                                              # v_i (d_ii = 0)
            loss = torch.logsumexp(logits.flatten(1), -1) - 2.0 * math.log(b)
            a = (-1.0 / (tau * m)) * torch.exp(logits - (loss[:, None, None] + 2.0 * math.log(b)))
        if need_w:
            a = torch.where(eye | (r < 0), zero, a)                                  # dL/dr_ij, i != j
            w = 4.0 * (torch.diag_embed(a.sum(-1)) - a)
    w = w[:, None] if need_w else gram.new_empty((G, 0, b, b))
    scales = gram.new_ones((G, b + 1))
    scales[:, 0] += 0.0 * loss            # a non-finite loss makes every gradient entry of its group non-finite
    return loss, rows, w, scales


# Which code does the two B x B x M products of the Gram path (Z Z^T forward, W Z backward):
#   "auto": torch.matmul (the BLAS torch links) for float32 / float64 input outside the covariance variant, the C++
#           loops otherwise (they convert bf16 / fp16 and batch-normalise on the fly, with no B x M float copy).
#           Measured 2026-12-01 (Sapphire Rapids, 2 threads): the BLAS products are ~4x faster than the C++ 4 x 4
#           register tiles at B = 64, M = 262,144 (benches/cpu_dispersive.py, providers cpp / cpp_loops).
#   "cpp":  always the C++ loops;  "blas": always torch.matmul (16-bit input upcast, covariance's Zn materialised).
PRODUCTS = "auto"


def _blas_products(dtype, variant: str) -> bool:
    if PRODUCTS == "auto":
        return dtype in (torch.float32, torch.float64) and variant != "covariance"
    return PRODUCTS == "blas"


def gram_forward(z: Tensor, variant: str, tau: float, margin: float, eps: float, need_w: bool,
                 deterministic: bool = True):
    """(loss, row values, W, scales, stats) of the Gram path; the same contract as the Triton launcher."""
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    blas = _blas_products(z.dtype, variant)
    if variant == "covariance":
        mean, rstd = colstats(z, eps)
        if blas:
            zn = (z.to(acc) - mean[:, None, :]) * rstd[:, None, :]
            g = torch.matmul(zn, zn.transpose(-1, -2))
        else:
            g = gram(z, normalize=(mean, rstd))
        stats = torch.stack([mean, rstd], 1)
    else:
        g = torch.matmul(z.to(acc), z.to(acc).transpose(-1, -2)) if blas else gram(z)
        stats = torch.empty((G, 0, 0), dtype=acc)
    loss, rows, w, scales = gram_epilogue(g, variant, tau, margin, M, stats, eps, need_w)
    return loss, rows, w, scales, stats


def gram_backward(grad: Tensor, z: Tensor, w: Tensor, scales: Tensor, stats: Tensor, variant: str, eps: float) -> Tensor:
    """dL/dz for the upstream gradient grad (G,): dZ = (grad gscale rowscale_i W_i.) Z (+ the covariance
    batch-norm backward)."""
    if w.shape[1] == 0:
        raise RuntimeError("dispersive_bwd: the forward ran without need_w (no weight matrix was saved)")
    G, B, M = z.shape
    g = grad.to(w.dtype)
    wm = w[:, 0] * (g * scales[:, 0])[:, None, None] * scales[:, 1:, None]
    if variant == "covariance":
        return stream_wz(wm, z, cov=(stats[:, 0], stats[:, 1], g * (-4.0 / B)), eps=eps)
    if _blas_products(z.dtype, variant):
        return torch.matmul(wm, z.to(wm.dtype)).to(z.dtype)
    return stream_wz(wm, z)
