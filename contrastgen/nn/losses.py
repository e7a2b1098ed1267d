"""``torch.nn.Module`` wrappers of the losses (hyper-parameters and learnable scales held as state)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class InfoNCELoss(nn.Module):
    """:func:`contrastgen.info_nce` with fixed options; ``forward(query, key=None, labels=None, key_labels=None, negatives=None)``."""

    def __init__(self, temperature=0.07, positives="diagonal", symmetric=False, in_batch_negatives=None,
                 reduction="mean", backend=None):
        super().__init__()
        self.temperature, self.positives, self.symmetric = temperature, positives, symmetric
        self.in_batch_negatives, self.reduction, self.backend = in_batch_negatives, reduction, backend

    def forward(self, query, key=None, labels=None, key_labels=None, negatives=None):
        return ops.info_nce(query, key, temperature=self.temperature, labels=labels, key_labels=key_labels,
                            positives=self.positives, negatives=negatives, in_batch_negatives=self.in_batch_negatives,
                            symmetric=self.symmetric, reduction=self.reduction, backend=self.backend)


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
    def __init__(self, temperature=0.5, backend=None):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, z1, z2):
        return ops.nt_xent(z1, z2, temperature=self.temperature, backend=self.backend)


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
