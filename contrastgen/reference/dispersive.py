"""Dense PyTorch references for Dispersive Loss, uniformity and alignment (METHODS.md section 2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sqdist(z: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances ``||z_i||^2 + ||z_j||^2 - 2 z_i.z_j`` clamped at 0, (..., B, B).

    The diagonal is the constant 0 (not differentiated): through ``||z_i||^2 + ||z_i||^2 - 2 z_i.z_i`` its rounding
    noise would dominate the gradient near the loss' floor (METHODS.md section 2)."""
    sq = (z * z).sum(-1)
    r = (sq[..., :, None] + sq[..., None, :] - 2.0 * (z @ z.transpose(-1, -2))).clamp_min(0.0)
    eye = torch.eye(z.shape[-2], dtype=torch.bool, device=z.device)
    return torch.where(eye, r.new_zeros(()), r)


def dispersive_loss_ref(z: torch.Tensor, *, variant: str = "infonce_l2", tau: float = 0.5, margin: float = 1.0,
                        grouped: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Dispersive Loss of B samples, each flattened to M features.

    * ``infonce_l2``: ``d_ij = ||z_i - z_j||^2 / M``; ``L = log((1/B^2) sum_ij exp(-d_ij / tau))`` (diagonal included,
      as the constant d_ii = 0).
    * ``infonce_cosine``: ``d_ij = -cos(z_i, z_j)``; same log-mean-exp (cos_ii = 1 a constant).
    * ``hinge``: ``L = mean_ij max(0, margin - d_ij)^2`` with the l2 ``d_ij`` (diagonal included).
    * ``covariance``: features batch-normalised (biased variance, ``eps``), ``C = Zn^T Zn / B``,
      ``L = sum_{m != n} C_mn^2`` -- computed through the B x B Gram, never the M x M covariance.

    ``z``: (B, ...) -> scalar, or with ``grouped=True`` (G, B, ...) -> (G,).
    """
    if not grouped:
        return dispersive_loss_ref(z.unsqueeze(0), variant=variant, tau=tau, margin=margin, grouped=True, eps=eps)[0]
    g, b = z.shape[0], z.shape[1]
    x = z.reshape(g, b, -1)
    m = x.shape[-1]
    if variant in ("infonce_l2", "hinge"):
        d = _sqdist(x) / m
        if variant == "hinge":
            return F.relu(margin - d).pow(2).mean((-1, -2))
        return torch.logsumexp((-d / tau).reshape(g, -1), dim=-1) - 2.0 * math.log(b)
    if variant == "infonce_cosine":
        xn = F.normalize(x, dim=-1)
        cos = xn @ xn.transpose(-1, -2)
        # cos_ii = ||xn_i||^2 (1 for every non-zero row) is a constant: no gradient through the self-pair
        eye = torch.eye(b, dtype=torch.bool, device=x.device)
        cos = torch.where(eye, (xn * xn).sum(-1).detach()[..., :, None], cos)
        return torch.logsumexp((cos / tau).reshape(g, -1), dim=-1) - 2.0 * math.log(b)
    if variant == "covariance":
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        xn = (x - mu) / torch.sqrt(var + eps)
        gram = xn @ xn.transpose(-1, -2)                      # (G, B, B): ||C||_F^2 = ||Gram||_F^2 / B^2
        diag = xn.pow(2).sum(1) / b                           # (G, M): C_mm
        return (gram.pow(2).sum((-1, -2)) / (b * b)) - diag.pow(2).sum(-1)
    raise ValueError(f"unknown variant {variant!r}")


def uniformity_ref(x: torch.Tensor, *, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola: ``L = log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (x is not normalised here)."""
    n = x.shape[0]
    d = _sqdist(x.reshape(n, -1))
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    logits = (-t * d).masked_fill(eye, float("-inf"))          # no boolean indexing: works on meta tensors
    return torch.logsumexp(logits.reshape(-1), dim=0) - math.log(n * (n - 1))


def alignment_ref(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola: ``L = mean_i ||x_i - y_i||^alpha``."""
    return (x - y).reshape(x.shape[0], -1).norm(dim=1).pow(alpha).mean()
