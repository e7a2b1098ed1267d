"""Contrastive losses across processes (``torch.distributed``; tested with gloo on CPU).

Each rank holds its local batch of (image, text) features.  Features are all-gathered with autograd
(``torch.distributed.nn.functional.all_gather``: its backward sums the gradients of every rank and
returns each rank its slice), so after ``loss.backward()`` each rank's feature gradient is
``world_size`` times the gradient of the global loss -- exactly what DDP's gradient averaging expects
(the same convention as OpenCLIP's ``ClipLoss(gather_with_grad=True)``).

* ``local_loss=False``: every rank computes the loss of the whole gathered batch (N = world * n queries).
* ``local_loss=True``: each rank computes only its own n rows and n columns against all N keys
  (O(n N D) work per rank instead of O(N^2 D)); the mean over ranks equals the global loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import ops
from .ops import _validate as V


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's slice."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x, group=group), 0)


def _rank_world(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def clip_loss_distributed(image, text, logit_scale, logit_bias=None, *, local_loss: bool = False, group=None,
                          backend=None):
    """OpenCLIP-style distributed CLIP loss; every rank must pass the same local batch size."""
    V.check_tensor("image", image, ndim=2)
    V.check_tensor("text", text, ndim=2)
    if image.shape != text.shape:
        raise ValueError(f"image and text must have the same shape (n, D): image {tuple(image.shape)}, "
                         f"text {tuple(text.shape)}")
    rank, world = _rank_world(group)
    all_image, all_text = all_gather_with_grad(image, group), all_gather_with_grad(text, group)
    if not local_loss or world == 1:
        return ops.clip_loss(all_image, all_text, logit_scale, logit_bias, backend=backend)
    n = image.shape[0]
    if all_image.shape[0] != n * world:
        raise ValueError(f"every rank must hold the same batch size; rank {rank} has {n}, gathered {all_image.shape[0]}")
    logit_scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
    temperature = 1.0 / logit_scale
    own = torch.arange(n, device=image.device) + rank * n       # global index of this rank's pairs
    every = torch.arange(n * world, device=image.device)
    kw = dict(temperature=temperature, labels=own, key_labels=every, positives="supcon", backend=backend)
    loss = 0.5 * (ops.info_nce(image, all_text, **kw) + ops.info_nce(text, all_image, **kw))
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        loss = loss + 0.0 * logit_bias.sum()
    return loss
