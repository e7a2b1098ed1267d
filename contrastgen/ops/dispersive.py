"""Fused Dispersive Loss and uniformity: custom ops and backend registration.

Call chain: kernels (``contrastgen.kernels.dispersive`` for Triton, ``contrastgen._cpp_dispersive`` for C++)
-> launchers (``gram_forward``, ``gram_backward``, ``pairs_fwd``, ``pairs_bwd``) -> custom ops
``contrastgen::dispersive_fwd`` / ``contrastgen::dispersive_bwd`` and ``contrastgen::uniformity_fwd`` /
``contrastgen::uniformity_bwd`` (``backend`` argument: "triton" or "cpp") -> registered implementations of
``"dispersive_loss"`` and ``"uniformity"`` -> public ``contrastgen.dispersive_loss`` / ``contrastgen.uniformity``.

Two regimes (METHODS.md section 2), picked by shape in :func:`choose_path`:
  * "gram": B <= GRAM_PATH_MAX_B and M >= GRAM_PATH_MIN_RATIO * B (and always for covariance): split-K Gram
    (one read of Z), a B x B epilogue (loss and the weight matrix W of dZ = W Z; Triton: fused kernels, C++: the
    PyTorch epilogue in ``_cpp_dispersive.py``), backward dZ = W Z streamed (one read of Z, one write of dZ).
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
    the functions ``gram_forward``, ``gram_backward``, ``w_layout``, ``pairs_fwd``, ``pairs_bwd`` with one signature."""
    return launcher("dispersive", backend)


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
PATHS = ("gram", "tiled")


def _check_op_args(variant: str, path: str, backend: str) -> None:
    """The custom ops are public through torch.ops: an unknown variant / path / backend raises."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if backend not in ("triton", "cpp"):
        raise ValueError(f"backend must be 'triton' or 'cpp', got {backend!r}")
    if path == "tiled" and variant == "covariance":
        raise ValueError("variant='covariance' has no tiled path (it needs per-column batch statistics)")


def _empty_state(z: Tensor, acc: torch.dtype):
    G, B, _ = z.shape
    return (z.new_empty((G, 0, B, B), dtype=acc), z.new_empty((G, 0), dtype=acc), z.new_empty((G, 0, 0), dtype=acc))


@torch.library.custom_op("contrastgen::dispersive_fwd", mutates_args=())
def dispersive_fwd(z: Tensor, variant: str, tau: float, margin: float, backend: str, path: str, need_w: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """z (G, B, M) -> (loss (G,), rows (G, B), w, scales, stats); loss / rows / scales / stats in the
    accumulation dtype.

    path "gram": rows = the loss row values v_i, w (G, planes, B, B) = the weight rows of dZ = W Z (planes = 0
    without need_w; see the launcher's ``w_layout``), scales (G, 1 + B) = (gscale, rowscale_i), stats (G, 2, M)
    column mean / rstd for covariance else (G, 0, 0).  path "tiled": rows = per-row log-sum-exp or hinge sums,
    w / scales / stats empty; for infonce_cosine z must be row-normalised already."""
    _check_op_args(variant, path, backend)
    P = _prims(backend)
    G, B, M = z.shape
    if path == "gram":
        return P.gram_forward(z, variant, tau, margin, BN_EPS, need_w, DETERMINISTIC_GRAM)
    mode, alpha, mg, hscale = _tiled_params(variant, tau, margin, B, M)
    rows = P.pairs_fwd(z, mode, alpha, mg, False)
    loss = rows.sum(-1) * hscale if mode == MODE_HINGE else torch.logsumexp(rows, -1) - 2.0 * math.log(B)
    return (loss, rows, *_empty_state(z, _acc_dtype(z.dtype)))


@dispersive_fwd.register_fake
def _(z, variant, tau, margin, backend, path, need_w):
    _check_op_args(variant, path, backend)
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    loss, rows = z.new_empty((G,), dtype=acc), z.new_empty((G, B), dtype=acc)
    if path == "gram":
        planes, wdt = _prims(backend).w_layout(z.dtype, variant, need_w)
        stats = z.new_empty((G, 2, M) if variant == "covariance" else (G, 0, 0), dtype=acc)
        return loss, rows, z.new_empty((G, planes, B, B), dtype=wdt), z.new_empty((G, B + 1), dtype=acc), stats
    return (loss, rows, *_empty_state(z, acc))


@torch.library.custom_op("contrastgen::dispersive_bwd", mutates_args=())
def dispersive_bwd(grad: Tensor, z: Tensor, loss: Tensor, rows: Tensor, w: Tensor, scales: Tensor, stats: Tensor,
                   variant: str, tau: float, margin: float, backend: str, path: str) -> Tensor:
    """dL/dz (G, B, M) in z's dtype for the upstream gradient grad (G,)."""
    _check_op_args(variant, path, backend)
    P = _prims(backend)
    G, B, M = z.shape
    if path == "gram":
        return P.gram_backward(grad, z, w, scales, stats, variant, BN_EPS)
    mode, alpha, mg, hscale = _tiled_params(variant, tau, margin, B, M)
    lse = torch.logsumexp(rows, -1) if mode != MODE_HINGE else torch.zeros_like(loss)
    gout = grad * (0.0 * loss + 1.0)      # a non-finite loss makes every gradient entry of its group non-finite
    return P.pairs_bwd(z, lse, gout, mode, alpha, mg, hscale, False)


@dispersive_bwd.register_fake
def _(grad, z, loss, rows, w, scales, stats, variant, tau, margin, backend, path):
    _check_op_args(variant, path, backend)
    return torch.empty_like(z)


def _dispersive_setup(ctx, inputs, output):
    z, variant, tau, margin, backend, path, need_w = inputs
    ctx.save_for_backward(z, *output)
    ctx.args = (variant, tau, margin, backend, path)


def _dispersive_backward(ctx, grad_loss, *_):
    z, loss, rows, w, scales, stats = ctx.saved_tensors
    variant, tau, margin, backend, path = ctx.args
    dz = dispersive_bwd(grad_loss.contiguous(), z, loss, rows, w, scales, stats, variant, tau, margin, backend, path)
    return dz, None, None, None, None, None, None


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
    gout = grad.reshape(1) * (0.0 * lse + 1.0)     # non-finite loss -> no finite gradient entry
    return _prims(backend).pairs_bwd(x.unsqueeze(0), lse, gout, MODE_L2, t, 0.0, 0.0, True)[0]


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
    need_w = z.requires_grad and torch.is_grad_enabled()       # no weight matrix for a forward-only call
    loss = torch.ops.contrastgen.dispersive_fwd(z, variant, float(tau), float(margin), backend, path, need_w)[0]
    return loss.float() if loss.dtype != torch.float64 else loss


def uniformity_core(backend: str, x: Tensor, t) -> Tensor:
    """Uniformity (0-d) of x (N, D) on a fused ``backend``, float32 (float64 for float64 input).

    t: a float, or a one-element tensor (differentiable): the loss depends on t and x only through t ||x_i - x_j||^2,
    so it is computed as the loss of sqrt(t) x at t = 1 (in the accumulation dtype) and autograd carries the
    gradient to both (no host read of t)."""
    if isinstance(t, Tensor):
        acc = _acc_dtype(x.dtype)
        x = x.to(acc) * t.reshape(()).to(device=x.device, dtype=acc).sqrt()
        t = 1.0
    loss, _ = torch.ops.contrastgen.uniformity_fwd(x.contiguous(), float(t), backend)
    return loss.float() if loss.dtype != torch.float64 else loss
