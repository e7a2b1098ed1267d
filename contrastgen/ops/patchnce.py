"""Fused PatchNCE (CUT): custom ops and the core called by ``contrastgen.patch_nce``.

Call chain: kernels (``contrastgen.kernels.patchnce`` for Triton, ``contrastgen._cpp_patchnce`` through
``contrastgen.ops._cpp_patchnce`` for C++; one launch / call per direction for every layer) -> custom ops
``contrastgen::patchnce_fwd`` / ``contrastgen::patchnce_bwd`` (``backend`` argument: "triton" or "cpp"; fake
kernels and autograd registered) -> :func:`patch_nce_core` -> public ``contrastgen.patch_nce`` ->
``contrastgen.methods.patchnce.PatchNCELoss``.

The math and the kernel design are written at the top of ``kernels/patchnce.py``.  The forward computes, with
the loss, the query gradient up to the upstream weight (``gq``: FlashAttention-forward style, 2 matmul-
equivalents for loss and dq); the backward scales it and, only when a key needs a gradient, runs the key
(column) pass.  Nothing is computed for gradients nobody asked for: the core passes ``need_dq`` / ``need_dk`` /
``need_dt`` from ``requires_grad`` and ``torch.is_grad_enabled()``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._backends import launcher


def _acc_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """Dtype of the loss and saved statistics: float64 only for float64 input on the C++ backend (the Triton
    kernels compute float64 input in float32)."""
    return torch.float64 if (dtype == torch.float64 and backend == "cpp") else torch.float32


def _tau(temperature: float, temperature_t: Optional[Tensor]):
    return temperature_t if temperature_t is not None else temperature


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("contrastgen::patchnce_fwd", mutates_args=())
def patchnce_fwd(q: List[Tensor], k: List[Tensor], groups: int, temperature: float, temperature_t: Optional[Tensor],
                 mean_layers: bool, need_dq: bool, need_lse: bool, need_dt: bool, backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k: lists of (N_l, C_l) per layer (N_l = groups n_l), one dtype.  Returns, in the accumulation dtype:
    loss () (mean over layers) or (L,); lse (sum N_l,) or (0,); gq (sum N_l C_l,) or (0,) (dL_l/dq = gq / N_l);
    dtl (L,) or (0,) with -dtl.sum() / tau = dL/dtau (for the upstream weight 1 of every output)."""
    part, dpart, lse, gq = launcher("patch_nce", backend).patchnce_fwd(
        q, k, groups, _tau(temperature, temperature_t), mean_layers, need_dq, need_lse, need_dt)
    loss = part.sum() if mean_layers else part.sum(1)
    dtl = dpart.sum(1) if need_dt else dpart
    return loss, lse, gq, dtl


@patchnce_fwd.register_fake
def _(q, k, groups, temperature, temperature_t, mean_layers, need_dq, need_lse, need_dt, backend):
    acc = _acc_dtype(q[0].dtype, backend)
    L = len(q)
    loss = q[0].new_empty(() if mean_layers else (L,), dtype=acc)
    lse = q[0].new_empty((sum(x.shape[0] for x in q) if need_lse else 0,), dtype=acc)
    gq = q[0].new_empty((sum(x.numel() for x in q) if need_dq else 0,), dtype=acc)
    dtl = q[0].new_empty((L if need_dt else 0,), dtype=acc)
    return loss, lse, gq, dtl


@torch.library.custom_op("contrastgen::patchnce_bwd", mutates_args=())
def patchnce_bwd(grad: Tensor, q: List[Tensor], k: List[Tensor], groups: int, temperature: float,
                 temperature_t: Optional[Tensor], mean_layers: bool, lse: Tensor, gq: Tensor, need_dq: bool,
                 need_dk: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(dq flat (sum N_l C_l,) in q's dtype or (0,), dk flat in k's dtype or (0,)) for the upstream ``grad``
    (0-d with ``mean_layers``, else (L,))."""
    return launcher("patch_nce", backend).patchnce_bwd(
        grad, q, k, groups, _tau(temperature, temperature_t), mean_layers, lse, gq, need_dq, need_dk, q[0].dtype,
        k[0].dtype)


@patchnce_bwd.register_fake
def _(grad, q, k, groups, temperature, temperature_t, mean_layers, lse, gq, need_dq, need_dk, backend):
    n = sum(x.numel() for x in q)
    return q[0].new_empty((n if need_dq else 0,)), k[0].new_empty((n if need_dk else 0,))


def _setup(ctx, inputs, output):
    q, k, groups, temperature, temperature_t, mean_layers, need_dq, need_lse, need_dt, backend = inputs
    _, lse, gq, dtl = output
    ctx.n_q, ctx.n_k = len(q), len(k)
    ctx.shapes = [tuple(x.shape) for x in q]
    saved = list(q) + list(k) + [lse, gq, dtl] + ([temperature_t] if temperature_t is not None else [])
    ctx.save_for_backward(*saved)
    ctx.args = (groups, temperature, temperature_t is not None, mean_layers, need_dq, need_lse, need_dt, backend)
    # lse, gq and dtl are statistics for the backward, never used downstream: without this, autograd would fill a
    # zero gradient the size of the queries for gq on every backward (measured: ~15% of the CUT B = 1 step on CPU)
    ctx.set_materialize_grads(False)


def _split(flat: Tensor, shapes) -> List[Tensor]:
    sizes = [s[0] * s[1] for s in shapes]
    return [v.view(s) for v, s in zip(torch.split(flat, sizes), shapes)]


def _backward(ctx, grad_loss, grad_lse, grad_gq, grad_dtl):
    groups, temperature, has_t, mean_layers, need_dq, need_dk, need_dt, backend = ctx.args
    saved = ctx.saved_tensors
    q, k = list(saved[:ctx.n_q]), list(saved[ctx.n_q:ctx.n_q + ctx.n_k])
    lse, gq, dtl = saved[ctx.n_q + ctx.n_k:ctx.n_q + ctx.n_k + 3]
    temperature_t = saved[-1] if has_t else None
    if grad_loss is None:     # (gradients are not materialised) only the saved statistics reached the output
        return [None] * ctx.n_q, [None] * ctx.n_k, None, None, None, None, None, None, None, None
    grad_loss = grad_loss.contiguous()
    dq_list, dk_list, dt = [None] * ctx.n_q, [None] * ctx.n_k, None   # list inputs take lists of gradients
    if need_dq or need_dk:
        dq, dk = patchnce_bwd(grad_loss, q, k, groups, temperature, temperature_t, mean_layers, lse, gq, need_dq,
                              need_dk, backend)
        if need_dq:
            dq_list = _split(dq, ctx.shapes)
        if need_dk:
            dk_list = _split(dk, ctx.shapes)
    if need_dt:
        tau = temperature_t.reshape(()).to(dtl.dtype)
        g = grad_loss.to(dtl.dtype)
        dt = (-(dtl * g).sum() if not mean_layers else -(dtl.sum() * g)) / tau
        dt = dt.to(temperature_t.dtype).reshape(temperature_t.shape)
    return dq_list, dk_list, None, None, dt, None, None, None, None, None


patchnce_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------- core
def patch_nce_core(backend: str, query: Sequence[Tensor], key: Sequence[Tensor], temperature,
                   all_negatives_from_minibatch: bool, detach_key: bool, reduction: str) -> Tensor:
    """PatchNCE of validated layer lists (each (B, P_l, C_l), one B, dtype and device) on a fused ``backend``:
    the mean over layers (``reduction="mean"``), their sum ("sum") or the (L,) per-layer losses ("none"), in the
    accumulation dtype (float32; float64 for float64 input on the C++ backend)."""
    B = query[0].shape[0]
    groups = 1 if all_negatives_from_minibatch else B
    qs = [q.reshape(-1, q.shape[-1]) for q in query]
    ks = [(k.detach() if detach_key else k).reshape(-1, k.shape[-1]) for k in key]
    grad_on = torch.is_grad_enabled()
    temperature_t = temperature if isinstance(temperature, Tensor) else None
    need_dq = grad_on and any(q.requires_grad for q in qs)
    need_dk = grad_on and not detach_key and any(k.requires_grad for k in ks)
    need_dt = grad_on and temperature_t is not None and temperature_t.requires_grad
    tau = 1.0 if temperature_t is not None else float(temperature)
    loss, _, _, _ = torch.ops.contrastgen.patchnce_fwd(qs, ks, groups, tau, temperature_t, reduction == "mean",
                                                       need_dq, need_dk, need_dt, backend)
    return loss.sum() if reduction == "sum" else loss
