"""Dense PyTorch references for the CLIP / InfoNCE family (METHODS.md section 1).

These materialize the N x M logits and are the specification every fused
kernel is tested against.  They do no input validation: the public API in
``contrastgen.ops`` validates before dispatching here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss_ref(image: torch.Tensor, text: torch.Tensor, logit_scale, logit_bias=None) -> torch.Tensor:
    """OpenCLIP ``ClipLoss``: ``L = (CE(s I T^T + b, arange) + CE((s I T^T + b)^T, arange)) / 2``.

    ``logit_scale`` is the multiplier, already exponentiated.  A bias shifts every logit of a
    row equally, so it cancels in the softmax; it is kept so that it receives its (zero) gradient."""
    logits = logit_scale * (image @ text.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_loss_ref(image: torch.Tensor, text: torch.Tensor, logit_scale, logit_bias) -> torch.Tensor:
    """OpenCLIP ``SigLipLoss``: ``L = -(1/N) sum_ij log sigmoid(y_ij (s x_i . y_j + b))``, y_ii = +1, else -1."""
    logits = logit_scale * (image @ text.T) + logit_bias
    n, m = logits.shape
    y = -torch.ones(n, m, dtype=logits.dtype, device=logits.device)
    y.diagonal().fill_(1.0)
    return -F.logsigmoid(y * logits).sum() / n


def _reduce(per_anchor: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / count.clamp_min(1).to(per_anchor.dtype)


def info_nce_ref(query, key=None, *, temperature=0.07, labels=None, key_labels=None, positives="diagonal",
                 negatives=None, in_batch_negatives=None, symmetric=False, reduction="mean"):
    """General InfoNCE.

    ``s_ij = q_i . k_j / temperature``.  Positives: the diagonal (``positives="diagonal"``) or equal
    labels (``"supcon"``, ``"pml"``).  ``key=None`` uses the queries as keys and excludes self-pairs.
    ``negatives``: an (M, D) bank of extra negative keys shared by all queries; with a bank, the
    in-batch keys other than the positives are negatives only if ``in_batch_negatives=True``.

    * supcon (and diagonal): ``l_i = lse_{j valid} s_ij - mean_{p in P_i} s_ip``; anchors without a
      positive give 0 and are left out of the mean.  ``reduction="none"`` returns ``l`` per anchor.
    * pml (pytorch-metric-learning NTXentLoss): for each positive pair
      ``l_ap = -log(e^{s_ap} / (e^{s_ap} + sum_{n negative} e^{s_an}))``; the mean is over positive
      pairs (0 when there are none); ``reduction="none"`` returns the per-anchor sum over its pairs.
    * ``symmetric=True`` (diagonal/supcon, no bank): the mean of the row (query->key) and column
      (key->query) losses; with ``reduction="none"`` the per-sample mean of the two (N == M).
    """
    self_mode = key is None
    if self_mode:
        key = query
        key_labels = labels
    elif key_labels is None:
        key_labels = labels
    if in_batch_negatives is None:
        in_batch_negatives = negatives is None
    n, m = query.shape[0], key.shape[0]
    dev = query.device
    logits = (query @ key.T) / temperature
    if positives == "diagonal":
        pos = torch.eye(n, m, dtype=torch.bool, device=dev)
    else:
        pos = labels.view(-1, 1) == key_labels.view(1, -1)
    valid = torch.ones(n, m, dtype=torch.bool, device=dev)
    if self_mode:
        valid &= ~torch.eye(n, m, dtype=torch.bool, device=dev)
    pos &= valid
    if not in_batch_negatives:
        valid &= pos
    # A finite "minus infinity": an anchor with an empty set then gets lse = -huge (not NaN) and
    # zero gradients, e.g. N = 1 with self-exclusion, or pml with no negatives.
    neg_inf = torch.finfo(logits.dtype).min
    if negatives is not None:
        bank = (query @ negatives.T) / temperature
        all_logits = torch.cat([logits, bank], 1)
        all_valid = torch.cat([valid, torch.ones_like(bank, dtype=torch.bool)], 1)
        all_pos = torch.cat([pos, torch.zeros_like(bank, dtype=torch.bool)], 1)
    else:
        all_logits, all_valid, all_pos = logits, valid, pos
    npos = all_pos.sum(1)
    if positives == "pml":
        negmask = all_valid & ~all_pos
        neg_lse = torch.logsumexp(all_logits.masked_fill(~negmask, neg_inf), dim=1, keepdim=True)
        pair = F.softplus(neg_lse - all_logits)  # = -log(e^s_ap / (e^s_ap + sum_neg e^s_an))
        pair = torch.where(all_pos, pair, torch.zeros_like(pair))
        per_anchor = pair.sum(1)
        return _reduce(per_anchor, npos.sum(), reduction)
    lse = torch.logsumexp(all_logits.masked_fill(~all_valid, neg_inf), dim=1)
    pos_mean = torch.where(all_pos, all_logits, torch.zeros_like(all_logits)).sum(1) / npos.clamp_min(1)
    row = torch.where(npos > 0, lse - pos_mean, torch.zeros_like(lse))
    if not symmetric:
        return _reduce(row, (npos > 0).sum(), reduction)
    lse_c = torch.logsumexp(logits.masked_fill(~valid, neg_inf), dim=0)
    npos_c = pos.sum(0)
    pos_mean_c = torch.where(pos, logits, torch.zeros_like(logits)).sum(0) / npos_c.clamp_min(1)
    col = torch.where(npos_c > 0, lse_c - pos_mean_c, torch.zeros_like(lse_c))
    if reduction == "none":
        return 0.5 * (row + col)
    return 0.5 * (_reduce(row, (npos > 0).sum(), reduction) + _reduce(col, (npos_c > 0).sum(), reduction))


def nt_xent_ref(z1: torch.Tensor, z2: torch.Tensor, temperature=0.5) -> torch.Tensor:
    """SimCLR NT-Xent: 2N views, cosine similarity / temperature, self excluded, positive = the other view."""
    z = F.normalize(torch.cat([z1, z2], 0), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)
