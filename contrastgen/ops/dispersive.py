"""Fused Dispersive Loss and uniformity: custom ops and backend registration.

Call chain: kernels (``contrastgen.kernels.dispersive`` for Triton, ``contrastgen._cpp_dispersive`` for C++)
-> primitives below (``gram``, ``colstats``, ``stream_wz``, ``pairs_fwd``, ``pairs_bwd``) -> custom ops
``contrastgen::dispersive_fwd`` / ``contrastgen::dispersive_bwd`` and ``contrastgen::uniformity_fwd`` /
``contrastgen::uniformity_bwd`` (``backend`` argument: "triton" or "cpp") -> registered implementations of
``"dispersive_loss"`` and ``"uniformity"`` -> public ``contrastgen.dispersive_loss`` / ``contrastgen.uniformity``.

Two regimes (METHODS.md section 2), picked by shape in :func:`choose_path`:
  * "gram": B <= GRAM_PATH_MAX_B and M >= GRAM_PATH_MIN_RATIO * B (and always for covariance): split-K Gram
    (one read of Z), a B x B epilogue in PyTorch (loss, weight matrix W), backward dZ = W Z streamed.
  * "tiled": flash-attention-like online log-sum-exp over (B x B) tiles, O(B M) memory, tiles recomputed
    in the backward.
The math of each variant and its gradient is written at the top of ``kernels/dispersive.py``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import launcher

# Path switch (module attributes: tests override them).
GRAM_PATH_MAX_B = 512
GRAM_PATH_MIN_RATIO = 4
BN_EPS = 1e-5               # batch-norm epsilon of the covariance variant (dispersive_loss_ref's default)
DETERMINISTIC_GRAM = True   # Triton: partial Grams summed in a fixed order (False: fp32 atomics)

MODE_L2, MODE_DOT, MODE_HINGE = 0, 1, 2
VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def choose_path(b: int, m: int, variant: str) -> str:
    if variant == "covariance":
        return "gram"     # needs per-column batch statistics: only the Gram path has them
    return "gram" if (b <= GRAM_PATH_MAX_B and m >= GRAM_PATH_MIN_RATIO * b) else "tiled"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prims(backend: str):
    """The launcher module of ``backend`` (``contrastgen.kernels.dispersive`` or ``contrastgen.ops._cpp_dispersive``):
    the primitives ``gram``, ``colstats``, ``stream_wz``, ``pairs_fwd``, ``pairs_bwd`` with one signature."""
    return launcher("dispersive", backend)


# ------------------------------------------------------------------------------------------- B x B epilogue
def _sqdist_from_gram(gram: Tensor):
    s = torch.diagonal(gram, dim1=-2, dim2=-1)
    r = s[..., :, None] + s[..., None, :] - 2.0 * gram
    return r, s


def gram_loss(gram: Tensor, variant: str, tau: float, margin: float, m: int, stats: Tensor) -> Tensor:
    """Loss (G,) from the Gram (G, B, B) (the batch-normalised Gram for covariance; stats (G, 2, M) = mean, rstd)."""
    b = gram.shape[-1]
    if variant == "covariance":
        c = 1.0 - BN_EPS * stats[:, 1] * stats[:, 1]              # C_mm = var / (var + eps)
        return gram.pow(2).sum((-1, -2)) / (b * b) - c.pow(2).sum(-1)
    if variant == "infonce_cosine":
        s = torch.diagonal(gram, dim1=-2, dim2=-1)
        n = s.sqrt().clamp_min(1e-12)
        cos = gram / (n[..., :, None] * n[..., None, :])
        return torch.logsumexp((cos / tau).flatten(1), -1) - 2.0 * math.log(b)
    r, _ = _sqdist_from_gram(gram)
    d = r.clamp_min(0.0) / m
    if variant == "hinge":
        return F.relu(margin - d).pow(2).mean((-1, -2))
    return torch.logsumexp((-d / tau).flatten(1), -1) - 2.0 * math.log(b)


def gram_weights(gram: Tensor, loss: Tensor, grad: Tensor, variant: str, tau: float, margin: float, m: int) -> Tensor:
    """W (G, B, B) with dZ = W Z (for covariance: W' of dZn = W' Zn + dg c Zn, see the kernels' docstring)."""
    b = gram.shape[-1]
    g = grad.to(gram.dtype)[:, None, None]
    if variant == "covariance":
        return g * (4.0 / (b * b)) * gram
    if variant == "infonce_cosine":
        s = torch.diagonal(gram, dim1=-2, dim2=-1)
        sq = s.sqrt()
        n = sq.clamp_min(1e-12)
        inv = 1.0 / (n[..., :, None] * n[..., None, :])
        cos = gram * inv
        p = g * torch.softmax((cos / tau).flatten(1), -1).view_as(gram) / tau       # dL/dcos
        h = -(((p + p.transpose(-1, -2)) * cos).sum(-1) / (2.0 * n * n)) * (sq > 1e-12)  # dL/ds
        return 2.0 * p * inv + torch.diag_embed(2.0 * h)
    r, _ = _sqdist_from_gram(gram)
    d = r.clamp_min(0.0) / m
    if variant == "hinge":
        a = g * (-2.0 / (b * b * m)) * F.relu(margin - d)
    else:
        lse = loss.to(gram.dtype)[:, None, None] + 2.0 * math.log(b)
        a = g * (-1.0 / (tau * m)) * torch.exp(-d / tau - lse)
    a = torch.where(r >= 0, a, torch.zeros_like(a))                                  # dL/dr
    return 4.0 * (torch.diag_embed(a.sum(-1)) - a)


def _tiled_params(variant: str, tau: float, margin: float, b: int, m: int):
    """(mode, alpha, margin, hscale) of the tiled kernels (cosine: the input is already normalised)."""
    if variant == "infonce_l2":
        return MODE_L2, 1.0 / (tau * m), 0.0, 0.0
    if variant == "infonce_cosine":
        return MODE_DOT, 1.0 / tau, 0.0, 0.0
    if variant == "hinge":
        return MODE_HINGE, 1.0 / m, margin, 1.0 / (b * b)
    raise ValueError(f"variant {variant!r} has no tiled path")


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("contrastgen::dispersive_fwd", mutates_args=())
def dispersive_fwd(z: Tensor, variant: str, tau: float, margin: float, backend: str, path: str
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """z (G, B, M) -> (loss (G,), aux, stats), accumulation dtype.

    path "gram": aux = Gram (G, B, B), stats = (G, 2, M) column mean / rstd (covariance) or (G, 0, 0).
    path "tiled": aux = per-row log-sum-exp or hinge sums (G, B), stats (G, 0, 0); for infonce_cosine z must
    be row-normalised already."""
    P = _prims(backend)
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    empty = torch.zeros((G, 0, 0), dtype=acc, device=z.device)
    if path == "gram":
        if variant == "covariance":
            mean, rstd = P.colstats(z, BN_EPS)
            gram = P.gram(z, normalize=(mean, rstd), deterministic=DETERMINISTIC_GRAM)
            stats = torch.stack([mean, rstd], 1)
        else:
            gram = P.gram(z, deterministic=DETERMINISTIC_GRAM)
            stats = empty
        return gram_loss(gram, variant, tau, margin, M, stats), gram, stats
    mode, alpha, mg, hscale = _tiled_params(variant, tau, margin, B, M)
    rows = P.pairs_fwd(z, mode, alpha, mg, False)
    loss = rows.sum(-1) * hscale if mode == MODE_HINGE else torch.logsumexp(rows, -1) - 2.0 * math.log(B)
    return loss, rows, empty


@dispersive_fwd.register_fake
def _(z, variant, tau, margin, backend, path):
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    loss = z.new_empty((G,), dtype=acc)
    if path == "gram":
        stats = z.new_empty((G, 2, M) if variant == "covariance" else (G, 0, 0), dtype=acc)
        return loss, z.new_empty((G, B, B), dtype=acc), stats
    return loss, z.new_empty((G, B), dtype=acc), z.new_empty((G, 0, 0), dtype=acc)


@torch.library.custom_op("contrastgen::dispersive_bwd", mutates_args=())
def dispersive_bwd(grad: Tensor, z: Tensor, loss: Tensor, aux: Tensor, stats: Tensor, variant: str, tau: float,
                   margin: float, backend: str, path: str) -> Tensor:
    """dL/dz (G, B, M) in z's dtype for the upstream gradient grad (G,)."""
    P = _prims(backend)
    G, B, M = z.shape
    if path == "gram":
        w = gram_weights(aux, loss, grad, variant, tau, margin, M)
        if variant == "covariance":
            dg = grad.to(aux.dtype) * (-4.0 / B)
            return P.stream_wz(w, z, cov=(stats[:, 0], stats[:, 1], dg), eps=BN_EPS)
        return P.stream_wz(w, z)
    mode, alpha, mg, hscale = _tiled_params(variant, tau, margin, B, M)
    lse = torch.logsumexp(aux, -1) if mode != MODE_HINGE else torch.zeros_like(loss)
    return P.pairs_bwd(z, lse, grad, mode, alpha, mg, hscale, False)


@dispersive_bwd.register_fake
def _(grad, z, loss, aux, stats, variant, tau, margin, backend, path):
    return torch.empty_like(z)


def _dispersive_setup(ctx, inputs, output):
    z, variant, tau, margin, backend, path = inputs
    loss, aux, stats = output
    ctx.save_for_backward(z, loss, aux, stats)
    ctx.args = (variant, tau, margin, backend, path)


def _dispersive_backward(ctx, grad_loss, grad_aux, grad_stats):
    z, loss, aux, stats = ctx.saved_tensors
    variant, tau, margin, backend, path = ctx.args
    dz = dispersive_bwd(grad_loss.contiguous(), z, loss, aux, stats, variant, tau, margin, backend, path)
    return dz, None, None, None, None, None


dispersive_fwd.register_autograd(_dispersive_backward, setup_context=_dispersive_setup)


@torch.library.custom_op("contrastgen::uniformity_fwd", mutates_args=())
def uniformity_fwd(x: Tensor, t: float, backend: str) -> Tuple[Tensor, Tensor]:
    """x (N, D) -> (loss 0-d, per-row log-sum-exp (N,)), accumulation dtype; diagonal excluded."""
    n = x.shape[0]
    rows = _prims(backend).pairs_fwd(x.unsqueeze(0), MODE_L2, t, 0.0, True)[0]
    return torch.logsumexp(rows, 0) - math.log(n * (n - 1)), rows


@uniformity_fwd.register_fake
def _(x, t, backend):
    acc = _acc_dtype(x.dtype)
    return x.new_empty((), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)


@torch.library.custom_op("contrastgen::uniformity_bwd", mutates_args=())
def uniformity_bwd(grad: Tensor, x: Tensor, rows: Tensor, t: float, backend: str) -> Tensor:
    lse = torch.logsumexp(rows, 0).reshape(1)
    return _prims(backend).pairs_bwd(x.unsqueeze(0), lse, grad.reshape(1), MODE_L2, t, 0.0, 0.0, True)[0]


@uniformity_bwd.register_fake
def _(grad, x, rows, t, backend):
    return torch.empty_like(x)


def _uniformity_setup(ctx, inputs, output):
    x, t, backend = inputs
    ctx.save_for_backward(x, output[1])
    ctx.args = (t, backend)


def _uniformity_backward(ctx, grad_loss, grad_rows):
    x, rows = ctx.saved_tensors
    t, backend = ctx.args
    return uniformity_bwd(grad_loss.contiguous(), x, rows, t, backend), None, None


uniformity_fwd.register_autograd(_uniformity_backward, setup_context=_uniformity_setup)


# ------------------------------------------------------------------------------------------------- cores
def dispersive_core(backend: str, z3: Tensor, variant: str, tau: float, margin: float) -> Tensor:
    """Loss (G,) of z3 (G, B, M) on a fused ``backend``, float32 (float64 for float64 input)."""
    G, B, M = z3.shape
    path = choose_path(B, M, variant)
    z = z3.contiguous()
    if path == "tiled" and variant == "infonce_cosine":
        z = F.normalize(z.to(_acc_dtype(z.dtype)), dim=-1)
    loss, _, _ = torch.ops.contrastgen.dispersive_fwd(z, variant, float(tau), float(margin), backend, path)
    return loss.float() if loss.dtype != torch.float64 else loss


def uniformity_core(backend: str, x: Tensor, t: float) -> Tensor:
    """Uniformity (0-d) of x (N, D) on a fused ``backend``, float32 (float64 for float64 input)."""
    loss, _ = torch.ops.contrastgen.uniformity_fwd(x.contiguous(), float(t), backend)
    return loss.float() if loss.dtype != torch.float64 else loss
