"""``torch.nn.Module`` wrappers of the losses (hyper-parameters and learnable scales held as state)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class InfoNCELoss(nn.Module):
    """:func:`contrastgen.info_nce` as a module, with pytorch-metric-learning's defaults: cosine similarity (query,
    key and negatives are L2-normalised inside) and temperature 0.07.

    ``forward(query, key=None, labels=None, key_labels=None, negatives=None)``.  ``positives=None`` picks the
    diagonal when no labels are given and PML's multi-positive convention (``"pml"``) when they are; pass
    ``"diagonal"``, ``"supcon"`` or ``"pml"`` to fix it.  ``negatives``: a shared (K, D) bank, (N, K, D) per-query
    negatives, or a :class:`contrastgen.nn.MoCoQueue`.  ``similarity="dot"`` uses the features as given.
    """

    def __init__(self, temperature=0.07, similarity="cosine", positives=None, symmetric=False,
                 in_batch_negatives=None, reduction="mean", backend=None):
        super().__init__()
        self.temperature, self.similarity, self.positives, self.symmetric = temperature, similarity, positives, symmetric
        self.in_batch_negatives, self.reduction, self.backend = in_batch_negatives, reduction, backend

    def forward(self, query, key=None, labels=None, key_labels=None, negatives=None):
        positives = self.positives or ("diagonal" if labels is None else "pml")
        return ops.info_nce(query, key, temperature=self.temperature, labels=labels, key_labels=key_labels,
                            positives=positives, negatives=negatives, in_batch_negatives=self.in_batch_negatives,
                            symmetric=self.symmetric, reduction=self.reduction, similarity=self.similarity,
                            backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, similarity={self.similarity!r}, positives={self.positives!r}"


class ClipLoss(nn.Module):
    """CLIP loss with a learnable log-scale ``theta`` (init ln(1/0.07)); ``logit_scale = exp(theta)``.
    Call :meth:`clamp_` after each optimizer step to keep ``theta <= ln(100)`` as CLIP does."""

    def __init__(self, init_scale=1 / 0.07, max_scale=100.0, learn_bias=False, backend=None):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(0.0)) if learn_bias else None
        self.max_log_scale, self.backend = math.log(max_scale), backend

    @torch.no_grad()
    def clamp_(self):
        self.log_scale.clamp_(max=self.max_log_scale)

    def forward(self, image, text):
        return ops.clip_loss(image, text, self.log_scale.exp(), self.bias, backend=self.backend)


class SigLipLoss(nn.Module):
    """SigLIP loss with learnable ``logit_scale = exp(theta)`` (init 10) and ``logit_bias`` (init -10)."""

    def __init__(self, init_scale=10.0, init_bias=-10.0, backend=None):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.backend = backend

    def forward(self, image, text):
        return ops.siglip_loss(image, text, self.log_scale.exp(), self.bias, backend=self.backend)


class NTXentLoss(nn.Module):
    """pytorch-metric-learning's ``NTXentLoss`` on the fused op: ``forward(embeddings, labels, ref_emb=None,
    ref_labels=None)``, cosine similarity, temperature 0.07; for each positive pair (a, p)
    ``l_ap = -log(e^{s_ap} / (e^{s_ap} + sum_{n: y_n != y_a} e^{s_an}))``, mean over positive pairs, 0 without any.
    Without ``ref_emb`` the embeddings are compared with each other (self-pairs excluded); with it, with ``ref_emb``.

    SimCLR's two-view loss is the special case ``NTXentLoss(0.5)(torch.cat([z1, z2]), torch.arange(n).repeat(2))``
    (= :func:`contrastgen.nt_xent`).  Not supported: PML's ``indices_tuple`` / miners, distances other than
    cosine / dot (``similarity="dot"``), reducers other than the mean over positive pairs.
    """

    def __init__(self, temperature=0.07, similarity="cosine", backend=None):
        super().__init__()
        self.temperature, self.similarity, self.backend = temperature, similarity, backend

    def forward(self, embeddings, labels=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("NTXentLoss needs labels (N,) for the embeddings (SimCLR: torch.arange(n).repeat(2) for "
                             "two views concatenated)")
        if ref_emb is not None and ref_labels is None:
            raise ValueError(f"ref_emb of shape {tuple(ref_emb.shape)} needs ref_labels")
        if ref_emb is None and ref_labels is not None:
            raise ValueError("ref_labels is given without ref_emb")
        return ops.info_nce(embeddings, ref_emb, temperature=self.temperature, labels=labels, key_labels=ref_labels,
                            positives="pml", similarity=self.similarity, backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, similarity={self.similarity!r}"


class DispersiveLoss(nn.Module):
    def __init__(self, variant="infonce_l2", tau=0.5, margin=1.0, grouped=False, backend=None):
        super().__init__()
        self.variant, self.tau, self.margin, self.grouped, self.backend = variant, tau, margin, grouped, backend

    def forward(self, z):
        return ops.dispersive_loss(z, variant=self.variant, tau=self.tau, margin=self.margin, grouped=self.grouped,
                                   backend=self.backend)


class UniformityLoss(nn.Module):
    def __init__(self, t=2.0, backend=None):
        super().__init__()
        self.t, self.backend = t, backend

    def forward(self, x):
        return ops.uniformity(x, t=self.t, backend=self.backend)


class PatchNCELoss(nn.Module):
    def __init__(self, temperature=0.07, all_negatives_from_minibatch=False, detach_key=True, backend=None):
        super().__init__()
        self.temperature, self.all_negatives_from_minibatch = temperature, all_negatives_from_minibatch
        self.detach_key, self.backend = detach_key, backend

    def forward(self, query, key):
        return ops.patch_nce(query, key, temperature=self.temperature,
                             all_negatives_from_minibatch=self.all_negatives_from_minibatch,
                             detach_key=self.detach_key, backend=self.backend)


class AttentionNCELoss(nn.Module):
    def __init__(self, token_groups, temperature=0.5, softmax_normalize=False, smoothing="conform", loss="ntxent",
                 backend=None):
        super().__init__()
        self.token_groups, self.temperature, self.softmax_normalize = token_groups, temperature, softmax_normalize
        self.smoothing, self.loss, self.backend = smoothing, loss, backend

    def forward(self, maps, prev_maps=None):
        return ops.attention_nce(maps, self.token_groups, prev_maps=prev_maps, temperature=self.temperature,
                                 softmax_normalize=self.softmax_normalize, smoothing=self.smoothing, loss=self.loss,
                                 backend=self.backend)
