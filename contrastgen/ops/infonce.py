"""Custom ops for the fused InfoNCE / SigLIP cores and their backend registration.

Call chain: ``_infonce_fwd_kernel`` (Triton, ``contrastgen.kernels.infonce``) or ``infonce_fwd`` in
``contrastgen.ops._cpp_infonce`` (C++) -> custom op ``contrastgen::infonce_fwd`` (this module, with its
fake and autograd registrations) -> the registered core ``infonce_core`` -> public ``contrastgen.info_nce``
/ ``clip_loss`` / ``nt_xent`` (``contrastgen/ops/api.py``).  Same for SigLIP.

Every op takes a ``backend`` string ("triton" or "cpp"); the launcher module of each backend comes from the
backend table (``contrastgen/ops/_backends.py``) and has the signatures of ``contrastgen/reference/core.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backends import launcher


def _f32(*shape, like: Tensor) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _stats_columns(op: str, backend: str) -> int:
    """Width of the row/col stats of ``backend`` (contract: >= 2; a launcher module may declare STATS_COLUMNS)."""
    return int(getattr(launcher(op, backend), "STATS_COLUMNS", 2))


def _grad_or_empty(g: Optional[Tensor], like: Tensor, needed: bool) -> Tensor:
    """Custom-op outputs cannot be None: a gradient nobody asked for is an empty (0, D) tensor."""
    if needed and g is not None:
        return g
    return like.new_zeros(0, like.shape[1])


# ----------------------------------------------------------------------------------------------- InfoNCE
@torch.library.custom_op("contrastgen::infonce_fwd", mutates_args=())
def infonce_fwd(q: Tensor, k: Tensor, bank: Optional[Tensor], scale: Tensor, q_labels: Optional[Tensor],
                k_labels: Optional[Tensor], exclude_self: bool, in_batch_negatives: bool, pml: bool, symmetric: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    row, col, row_stats, col_stats = launcher("infonce", backend).infonce_fwd(q, k, bank, scale, q_labels, k_labels, exclude_self,
                                                                in_batch_negatives, pml, symmetric)
    return row, col, row_stats, col_stats


@infonce_fwd.register_fake
def _(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric, backend):
    n, m = q.shape[0], k.shape[0]
    mc = m if symmetric else 0
    w = _stats_columns("infonce", backend)
    return _f32(n, like=q), _f32(mc, like=q), _f32(n, w, like=q), _f32(mc, w, like=q)


@torch.library.custom_op("contrastgen::infonce_bwd", mutates_args=())
def infonce_bwd(q: Tensor, k: Tensor, bank: Optional[Tensor], scale: Tensor, q_labels: Optional[Tensor],
                k_labels: Optional[Tensor], exclude_self: bool, in_batch_negatives: bool, pml: bool, symmetric: bool,
                row_stats: Tensor, col_stats: Tensor, g_row: Tensor, g_col: Tensor, backend: str,
                needs_dq: bool = True, needs_dk: bool = True, needs_dbank: bool = True,
                external_stats: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dbank, dscale); a gradient that is not needed (and dbank without a bank) is an empty
    (0, D) tensor.  ``external_stats``: row/col stats merged over more keys than ``k`` (the ring blocks of
    ``contrastgen.distributed``): the softmax is taken against them as given (labels rows, not pml)."""
    dq, dk, dbank, dscale = launcher("infonce", backend).infonce_bwd(
        q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric, row_stats, col_stats,
        g_row, g_col, needs_dq=needs_dq, needs_dk=needs_dk, needs_dbank=needs_dbank, external_stats=external_stats)
    return (_grad_or_empty(dq, q, needs_dq), _grad_or_empty(dk, k, needs_dk),
            _grad_or_empty(dbank, q, needs_dbank and bank is not None), dscale.reshape(()).to(torch.float32))


@infonce_bwd.register_fake
def _(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric, row_stats, col_stats,
      g_row, g_col, backend, needs_dq=True, needs_dk=True, needs_dbank=True, external_stats=False):
    dbank = torch.empty_like(bank) if bank is not None and needs_dbank else q.new_empty(0, q.shape[1])
    dq = torch.empty_like(q) if needs_dq else q.new_empty(0, q.shape[1])
    dk = torch.empty_like(k) if needs_dk else k.new_empty(0, k.shape[1])
    return dq, dk, dbank, _f32(like=q)


def _infonce_setup_context(ctx, inputs, output):
    q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric, backend = inputs
    _, _, row_stats, col_stats = output
    ctx.save_for_backward(q, k, bank, scale, q_labels, k_labels, row_stats, col_stats)
    ctx.flags = (exclude_self, in_batch_negatives, pml, symmetric, backend)
    ctx.scale_dtype = scale.dtype
    ctx.mark_non_differentiable(row_stats, col_stats)


def _infonce_backward(ctx, g_row, g_col, _g_row_stats, _g_col_stats):
    q, k, bank, scale, q_labels, k_labels, row_stats, col_stats = ctx.saved_tensors
    exclude_self, in_batch_negatives, pml, symmetric, backend = ctx.flags
    n, m = q.shape[0], k.shape[0]
    if g_row is None:
        g_row = q.new_zeros(n, dtype=torch.float32)
    if g_col is None:
        g_col = q.new_zeros(m if symmetric else 0, dtype=torch.float32)
    needs_dq, needs_dk, needs_dbank = ctx.needs_input_grad[:3]
    dq, dk, dbank, dscale = torch.ops.contrastgen.infonce_bwd(
        q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric, row_stats, col_stats,
        g_row.float(), g_col.float(), backend, needs_dq, needs_dk, needs_dbank and bank is not None)
    return (dq if needs_dq else None, dk if needs_dk else None,
            dbank if bank is not None and needs_dbank else None, dscale.to(ctx.scale_dtype),
            None, None, None, None, None, None, None)


infonce_fwd.register_autograd(_infonce_backward, setup_context=_infonce_setup_context)


# ----------------------------------------------------------------------------------------------- SigLIP
@torch.library.custom_op("contrastgen::siglip_fwd", mutates_args=())
def siglip_fwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    return launcher("siglip", backend).siglip_fwd(q, k, scale, bias)


@siglip_fwd.register_fake
def _(q, k, scale, bias, backend):
    return _f32(q.shape[0], like=q)


@torch.library.custom_op("contrastgen::siglip_bwd", mutates_args=())
def siglip_bwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, g_row: Tensor, backend: str,
               needs_dq: bool = True, needs_dk: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dscale, dbias = launcher("siglip", backend).siglip_bwd(q, k, scale, bias, g_row, needs_dq=needs_dq,
                                                                    needs_dk=needs_dk)
    return (_grad_or_empty(dq, q, needs_dq), _grad_or_empty(dk, k, needs_dk), dscale.reshape(()).to(torch.float32),
            dbias.reshape(()).to(torch.float32))


@siglip_bwd.register_fake
def _(q, k, scale, bias, g_row, backend, needs_dq=True, needs_dk=True):
    dq = torch.empty_like(q) if needs_dq else q.new_empty(0, q.shape[1])
    dk = torch.empty_like(k) if needs_dk else k.new_empty(0, k.shape[1])
    return dq, dk, _f32(like=q), _f32(like=q)


def _siglip_setup_context(ctx, inputs, output):
    q, k, scale, bias, backend = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.backend = backend
    ctx.dtypes = (scale.dtype, bias.dtype)


def _siglip_backward(ctx, g_row):
    q, k, scale, bias = ctx.saved_tensors
    if g_row is None:
        g_row = q.new_zeros(q.shape[0], dtype=torch.float32)
    needs_dq, needs_dk = ctx.needs_input_grad[:2]
    dq, dk, dscale, dbias = torch.ops.contrastgen.siglip_bwd(q, k, scale, bias, g_row.float(), ctx.backend,
                                                             needs_dq, needs_dk)
    return (dq if needs_dq else None, dk if needs_dk else None, dscale.to(ctx.dtypes[0]), dbias.to(ctx.dtypes[1]),
            None)


siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)


# ----------------------------------------------------------------------------------------------- cores
def infonce_core(backend: str, q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric):
    """The InfoNCE core of the contract on a fused ``backend``: (row_loss, col_loss, row_stats, col_stats)."""
    if bank is not None and bank.shape[0] == 0:
        bank = None
    return torch.ops.contrastgen.infonce_fwd(q, k, bank, scale.reshape(()).float(), q_labels, k_labels,
                                             bool(exclude_self), bool(in_batch_negatives), bool(pml),
                                             bool(symmetric), backend)


def siglip_core(backend: str, q, k, scale, bias):
    """The SigLIP core of the contract on a fused ``backend``: row_loss (N,)."""
    return torch.ops.contrastgen.siglip_fwd(q, k, scale.reshape(()).float(), bias.reshape(()).float(), backend)
