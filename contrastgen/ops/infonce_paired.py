"""Custom ops for InfoNCE with per-query negatives (``contrastgen.info_nce(..., negatives=(N, M, D))``).

Call chain: ``_paired_fwd_kernel`` / ``_paired_bwd_kernel`` (Triton, ``contrastgen.kernels.infonce_paired``) or
``paired_fwd`` / ``paired_bwd`` in ``contrastgen.ops._cpp_infonce_paired`` (C++) -> custom ops
``contrastgen::infonce_paired_fwd`` / ``contrastgen::infonce_paired_bwd`` (this module) -> ``infonce_paired_core``
-> public ``contrastgen.info_nce`` (``contrastgen/ops/api.py``, the 3-D ``negatives`` branch).

Row i of the loss has two groups of columns: the in-batch keys (diagonal or label positives, ``key=None``
self-exclusion, ``in_batch_negatives``: the InfoNCE core's contract, ``contrastgen/reference/core.py``) and the
row's own M negatives (always valid, never positive: the per-query op, ``contrastgen/reference/infonce_paired.py``).
The two are different problems -- the in-batch logits are a GEMM, the per-query ones a bandwidth-bound batched
mat-vec -- so each runs its own kernel and only their per-row results are merged here (O(N) work):

    forward   (row_ib_i, lse_ib_i, npos_i) = InfoNCE core;   lse_p_i = per-query op
              lse_i = logaddexp(lse_ib_i, lse_p_i);  loss_i = row_ib_i + softplus(lse_p_i - lse_ib_i)   (npos_i > 0)
    backward  both kernels take their softmax against the merged lse_i: the core's backward is called with
              row_stats = [lse_i, npos_i] and ``external_stats=True`` (the C++ backward then does not renormalise
              the row against its in-batch keys alone), so its dS_ij = g_i (exp(s_ij - lse_i)[valid] -
              [pos] / npos_i), and the per-query op's dS_ij = g_i exp(s_ij - lse_i): together exactly the gradient
              of the merged row.

Fast path (CoDE ``negative_mode="paired"``, MoCo-style pairs): diagonal positives with ``in_batch_negatives=False``
have one in-batch column per row, s_ii = scale q_i . k_i, computed here as a row dot product (O(N D)) instead of
an N x N product in the core.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import launcher


def _empty(like: Tensor, *shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _diag_logits(q: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    return scale * (q.float() * k.float()).sum(1)


@torch.library.custom_op("contrastgen::infonce_paired_fwd", mutates_args=())
def infonce_paired_fwd(q: Tensor, k: Tensor, negs: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                       k_labels: Optional[Tensor], exclude_self: bool, in_batch_negatives: bool, save_logits: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (row_loss (N,), row_stats (N, 2) = [lse of the whole row, npos], logits (N, M) or (0, M)), float32."""
    if _diag_only(q_labels, in_batch_negatives, exclude_self):
        lse_ib = _diag_logits(q, k, scale)
        row_ib = torch.zeros_like(lse_ib)
        npos = torch.ones_like(lse_ib)
    else:
        row_ib, _, st, _ = launcher("infonce", backend).infonce_fwd(q, k, None, scale, q_labels, k_labels, exclude_self,
                                                                    in_batch_negatives, False, False)
        lse_ib, npos = st[:, 0], st[:, 1]
    lse_p, logits = launcher("infonce_paired", backend).paired_fwd(q, negs, scale, save_logits)
    lse = torch.logaddexp(lse_ib, lse_p)
    row = torch.where(npos > 0, row_ib + F.softplus(lse_p - lse_ib), torch.zeros_like(row_ib))
    return row, torch.stack([lse, npos], 1), logits


@infonce_paired_fwd.register_fake
def _(q, k, negs, scale, q_labels, k_labels, exclude_self, in_batch_negatives, save_logits, backend):
    n, m = q.shape[0], negs.shape[1]
    return _empty(q, n), _empty(q, n, 2), _empty(q, n if save_logits else 0, m)


def _diag_only(q_labels, in_batch_negatives, exclude_self) -> bool:
    return q_labels is None and not in_batch_negatives and not exclude_self


@torch.library.custom_op("contrastgen::infonce_paired_bwd", mutates_args=())
def infonce_paired_bwd(q: Tensor, k: Tensor, negs: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                       k_labels: Optional[Tensor], exclude_self: bool, in_batch_negatives: bool, row_stats: Tensor,
                       logits: Tensor, g_row: Tensor, need_dq: bool, need_dk: bool, need_dnegs: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dnegs, dscale); a gradient nobody asked for is an empty tensor (and is not computed)."""
    lse, npos = row_stats[:, 0], row_stats[:, 1]
    g = torch.where(npos > 0, g_row.float(), torch.zeros_like(g_row, dtype=torch.float32))
    dq = dk = None
    if _diag_only(q_labels, in_batch_negatives, exclude_self):
        s_pos = _diag_logits(q, k, scale)
        ds = g * torch.expm1(s_pos - lse)                       # g (p_pos - 1), p_pos = exp(s_pos - lse)
        if need_dq:
            dq = (scale * ds)[:, None] * k.float()
        if need_dk:
            dk = ((scale * ds)[:, None] * q.float()).to(k.dtype)
        dscale = (ds * s_pos).sum() / scale
    else:   # the core's backward, its softmax taken against the merged lse (row_stats, external to its keys)
        dq, dk, _, dscale = launcher("infonce", backend).infonce_bwd(
            q, k, None, scale, q_labels, k_labels, exclude_self, in_batch_negatives, False, False, row_stats,
            _empty(q, 0, 2), g, _empty(q, 0), external_stats=True)
    dq_p, dnegs, dscale_p = launcher("infonce_paired", backend).paired_bwd(q, negs, scale, logits, lse, g, need_dq,
                                                                           need_dnegs)
    if need_dq:
        dq = (dq.float() + dq_p.float()).to(q.dtype)
    else:
        dq = q.new_empty(0)
    dk = dk.to(k.dtype) if need_dk else k.new_empty(0)
    dnegs = dnegs if need_dnegs else negs.new_empty(0)
    return dq, dk, dnegs, (dscale.float() + dscale_p.float()).reshape(())


@infonce_paired_bwd.register_fake
def _(q, k, negs, scale, q_labels, k_labels, exclude_self, in_batch_negatives, row_stats, logits, g_row, need_dq,
      need_dk, need_dnegs, backend):
    return (torch.empty_like(q) if need_dq else q.new_empty(0), torch.empty_like(k) if need_dk else k.new_empty(0),
            torch.empty_like(negs) if need_dnegs else negs.new_empty(0), _empty(q))


def _setup_context(ctx, inputs, output):
    q, k, negs, scale, q_labels, k_labels, exclude_self, in_batch_negatives, save_logits, backend = inputs
    _, row_stats, logits = output
    ctx.save_for_backward(q, k, negs, scale, q_labels, k_labels, row_stats, logits)
    ctx.flags = (exclude_self, in_batch_negatives, backend)
    ctx.scale_dtype = scale.dtype
    ctx.mark_non_differentiable(row_stats, logits)


def _backward(ctx, g_row, _g_stats, _g_logits):
    q, k, negs, scale, q_labels, k_labels, row_stats, logits = ctx.saved_tensors
    exclude_self, in_batch_negatives, backend = ctx.flags
    need_q, need_k, need_n, need_s = ctx.needs_input_grad[:4]
    if logits.shape[0] != q.shape[0]:
        raise RuntimeError("infonce_paired_fwd ran with save_logits=False (no input required a gradient then), so it "
                           "cannot be differentiated")
    if g_row is None:
        g_row = q.new_zeros(q.shape[0], dtype=torch.float32)
    dq, dk, dnegs, dscale = torch.ops.contrastgen.infonce_paired_bwd(
        q, k, negs, scale, q_labels, k_labels, exclude_self, in_batch_negatives, row_stats, logits, g_row.float(),
        bool(need_q), bool(need_k), bool(need_n), backend)
    return (dq if need_q else None, dk if need_k else None, dnegs if need_n else None,
            dscale.to(ctx.scale_dtype) if need_s else None, None, None, None, None, None, None)


infonce_paired_fwd.register_autograd(_backward, setup_context=_setup_context)


def infonce_paired_core(backend: str, q, k, negs, scale, q_labels, k_labels, exclude_self, in_batch_negatives):
    """(row_loss (N,), row_stats (N, 2)) of InfoNCE with per-query negatives on a fused ``backend``."""
    save = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, negs, scale))
    row, stats, _ = torch.ops.contrastgen.infonce_paired_fwd(q, k, negs, scale.reshape(()).float(), q_labels, k_labels,
                                                             bool(exclude_self), bool(in_batch_negatives), bool(save),
                                                             backend)
    return row, stats
