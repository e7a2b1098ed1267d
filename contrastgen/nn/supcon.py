"""Supervised contrastive loss with the semantics of the original code (HobbitLong/SupContrast, ``losses.py``)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class SupConLoss(nn.Module):
    """SupCon (Khosla et al. 2020) as in HobbitLong/SupContrast; SimCLR's loss when neither labels nor mask is given.

    ``forward(features, labels=None, mask=None)``: features (bsz, n_views, ...) (flattened to (bsz, n_views, D)),
    used as given -- SupContrast L2-normalises them in the model, not in the loss.  The contrast set is every view
    of every sample, ``cat(unbind(features, 1))``; anchors are the same set (``contrast_mode="all"``) or the first
    view only (``"one"``).  For anchor a with positives P(a) (same label or ``mask[i, j] != 0``, self excluded) and
    A(a) = the contrast set without a itself::

        l_a = -(temperature / base_temperature) * (1 / |P(a)|) sum_{p in P(a)} log( e^{s_ap} / sum_{c in A(a)} e^{s_ac} )

    with ``s = anchor . contrast / temperature``; the loss is the mean of l_a over **all** anchors, an anchor
    without a positive contributing 0 (the current SupContrast code: ``|P(a)|`` clamped to 1).  An explicit
    ``mask`` (bsz, bsz) may be asymmetric and weighted (``sum_p mask_ap log_prob_ap / sum_p mask_ap``, the sum of
    weights clamped to 1 below 1e-6), as in the original.

    The labels path (and SimCLR) runs the fused InfoNCE core (``positives="supcon"``, queries = keys, self
    excluded; O(N) memory); ``contrast_mode="one"`` takes the first-view rows of that call (the rows of the other
    views are computed too: n_views times the work of the anchors alone).  The ``mask=`` path builds the
    (anchors x contrast) logits densely in PyTorch -- the mask itself is already O(bsz^2).

    Differences from pytorch-metric-learning's ``SupConLoss``:
      * PML takes flat embeddings (N, D) with one label per row; this takes (bsz, n_views, ...) and one label
        per sample (``SupConLoss`` of PML on ``cat(unbind(features, 1))`` with labels repeated n_views times).
      * PML normalises the embeddings (``CosineSimilarity``); this does not (normalise them yourself, as
        SupContrast's models do).
      * temperature 0.07 and the factor ``temperature / base_temperature`` (PML: temperature 0.1, no factor).
      * anchors without a positive count as 0 in the mean; PML's ``AvgNonZeroReducer`` leaves them out (and any
        anchor whose loss is exactly 0).
      * a batch of one class (no negatives at all) gives the loss above; PML returns 0 when no negative pair exists.
      * ``contrast_mode="one"`` and an explicit ``mask=`` (PML has neither; it has miners / ``indices_tuple``).
      * the log-sum-exp is exact; PML subtracts the row max and adds ``small_val`` to the positive count.
    """

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07, backend=None):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        for name, v in (("temperature", temperature), ("base_temperature", base_temperature)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name} must be a positive float, got {v!r}")
        self.temperature, self.contrast_mode = float(temperature), contrast_mode
        self.base_temperature, self.backend = float(base_temperature), backend

    def extra_repr(self):
        return (f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
                f"base_temperature={self.base_temperature}")

    def forward(self, features, labels=None, mask=None):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() < 3:
            raise ValueError(f"features must be [bsz, n_views, ...] (at least 3 dimensions), got shape "
                             f"{tuple(features.shape)}")
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        bsz, views = features.shape[0], features.shape[1]
        f = features.reshape(bsz, views, -1)
        contrast = f.transpose(0, 1).reshape(views * bsz, f.shape[-1])        # cat(unbind(f, 1)): view-major
        factor = self.temperature / self.base_temperature
        if mask is not None:
            return factor * self._masked(f, contrast, mask)
        if labels is None:
            labels = torch.arange(bsz, device=features.device)
        elif not isinstance(labels, torch.Tensor) or labels.reshape(-1).shape[0] != bsz:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape ({bsz},) (one per sample), got {shape}")
        row = ops.info_nce(contrast, None, labels=labels.reshape(-1).repeat(views), positives="supcon",
                           temperature=self.temperature, reduction="none", backend=self.backend)
        if self.contrast_mode == "one":
            row = row[:bsz]
        return factor * row.mean()

    def _masked(self, f, contrast, mask):
        bsz, views = f.shape[0], f.shape[1]
        if not isinstance(mask, torch.Tensor) or mask.shape != (bsz, bsz):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape ({bsz}, {bsz}), got {shape}")
        anchor_count = views if self.contrast_mode == "all" else 1
        anchor = contrast if self.contrast_mode == "all" else f[:, 0]
        logits = anchor @ contrast.T / self.temperature
        na = anchor.shape[0]
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[torch.arange(na), torch.arange(na)] = True
        lse = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
        w = mask.to(logits.dtype).repeat(anchor_count, views).masked_fill(self_mask, 0.0)
        count = w.sum(1)
        count = torch.where(count < 1e-6, torch.ones_like(count), count)
        mean_log_prob = (w * (logits - lse)).sum(1) / count
        return -mean_log_prob.mean()
