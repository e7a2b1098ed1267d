"""DCR's diffusion-based contrastive loss (boyuh/DCR, ``train_*_stage1.py``) on the fused InfoNCE op.

DCR trains a CLIP vision encoder through a (frozen or tuned) diffusion UNet: for a batch of B images the UNet
predicts, for image i's noised latent, its denoising target conditioned on every image j's CLIP features,
``pred_pairs[i, j] = eps_theta(x_t^i, t_i, c_j)``, on an augmented ("plus") condition of image i,
``pred_pos[i] = eps_theta(x_t^i, t_i, c_i^+)``, and the regression target ``target[i]`` (the velocity v_i in the
official code).  Everything is flattened and L2-normalised; anchor ``a_i = pred_pairs[i, i]``, positives ``p_i`` and
``v_i``, negatives ``pred_pairs[i, j]`` for j != i::

    Den_i = e^{a_i.p_i / tau} + e^{a_i.v_i / tau} + sum_{j != i} e^{a_i.eps_ij / tau}
    L = mean_i 1/2 [ -log(e^{a_i.p_i / tau} / Den_i) - log(e^{a_i.v_i / tau} / Den_i) ]       tau = 0.1

= mean_i [ lse_i - (a_i.p_i + a_i.v_i) / (2 tau) ]: an InfoNCE with two positives per anchor (supcon convention)
and per-anchor negatives.  :class:`DCRLoss` computes it with one fused call, ``info_nce(a, key=[p; v],
labels=arange(B), key_labels=[arange(B); arange(B)], positives="supcon", negatives=eps_offdiag (B, B-1, D),
in_batch_negatives=False)``: the two positives come from the InfoNCE core, the B - 1 negatives of each anchor
from the per-query negatives kernel (the official code's ``einsum("bd,bkd->bk")`` and its B x B logits; no
Python loop over i).  Unlike the official code, which exponentiates the logits directly, the log-sum-exp is
stabilised (the two agree wherever the official one does not overflow: |logit| <= 1 / tau = 10 here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def _offdiag_index(b: int, device) -> torch.Tensor:
    """(B, B-1) column indices j != i of each row i, in increasing order (static shapes: compile friendly)."""
    k = torch.arange(b - 1, device=device)[None, :]
    return k + (k >= torch.arange(b, device=device)[:, None]).to(k.dtype)


class DCRLoss(nn.Module):
    """``loss(pred_pairs, pred_pos, target)``: pred_pairs (B, B, ...) with [i, j] the prediction for image i's
    latent conditioned on image j, pred_pos (B, ...), target (B, ...); flattened and L2-normalised inside.
    ``temperature=0.1`` as the official code.  ``reduction="none"`` returns the (B,) per-anchor losses."""

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", backend=None):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def extra_repr(self):
        return f"temperature={self.temperature}"

    def forward(self, pred_pairs: torch.Tensor, pred_pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for name, t in (("pred_pairs", pred_pairs), ("pred_pos", pred_pos), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if pred_pairs.dim() < 3 or pred_pairs.shape[0] != pred_pairs.shape[1]:
            raise ValueError(f"pred_pairs must be (B, B, ...) ([i, j] = image i's latent conditioned on image j), got "
                             f"shape {tuple(pred_pairs.shape)}")
        b = pred_pairs.shape[0]
        if pred_pos.shape != pred_pairs.shape[:1] + pred_pairs.shape[2:] or target.shape != pred_pos.shape:
            raise ValueError(f"pred_pos and target must be (B, ...) = {tuple(pred_pairs.shape[:1] + pred_pairs.shape[2:])} "
                             f"for pred_pairs of shape {tuple(pred_pairs.shape)}; got pred_pos {tuple(pred_pos.shape)}, "
                             f"target {tuple(target.shape)}")
        flat = pred_pairs.reshape(b, b, -1)
        rows = torch.arange(b, device=flat.device)
        anchor = F.normalize(flat[rows, rows], dim=-1)
        key = F.normalize(torch.cat([pred_pos.reshape(b, -1), target.reshape(b, -1)], 0).to(flat.dtype), dim=-1)
        labels = rows
        key_labels = rows.repeat(2)
        negatives = None
        if b > 1:
            negatives = F.normalize(flat[rows[:, None], _offdiag_index(b, flat.device)], dim=-1)   # (B, B-1, D)
        return ops.info_nce(anchor, key, labels=labels, key_labels=key_labels, positives="supcon",
                            negatives=negatives, in_batch_negatives=False, temperature=self.temperature,
                            reduction=self.reduction, backend=self.backend)
