"""CoDE (Contrastive Deepfake Embeddings, Baraldi et al., ECCV 2024; aimagelab/CoDE) on the fused InfoNCE op.

The official loss (``src/losses/function_loss.py`` ``info_nce`` and ``src/engine.py``): every embedding is
L2-normalised, and for a query q_i with positive p_i and negatives n_j

    l_i = CE([q_i . p_i, q_i . n_1, ..., q_i . n_M] / tau, target 0),   tau = 0.1,   mean over i,

where the M negatives are one (M, D) set shared by all queries (``negative_mode="unpaired"``, what CoDE trains
with) or each query's own (N, M, D) set (``negative_mode="paired"``).  The in-batch keys other than p_i are not
negatives.  CoDE combines four such terms per batch, a global one and a local-crop one per branch:

    real = 1/2 [ l(real, aug_real; aug_fake)  +  l(local_real, global_real; global_fake) ]
    fake = 1/2 [ l(fake, aug_fake; aug_real)  +  l(local_fake, global_fake; global_real) ]
    loss = real + fake

Each term is one call of :func:`contrastgen.info_nce` (``similarity="cosine"``, ``in_batch_negatives=False``, the
negative bank passed as ``negatives``, so it is read in place and shared by the queries inside the kernel).
Note: the official ``train_one_epoch`` adds ``contrastive_loss_real`` twice (and never the fake term) outside
``no_sync``; this module returns real + fake, the sum the paper and the ``no_sync`` branch use.

Numerics: with a bank and tau = 0.1 the float32 loss is ill-conditioned (logits up to 10, and the positive's
share of the softmax near 1 late in training), so its float32 error is compared against a float64 evaluation of the
official function, under the 2x-PyTorch-error rule, not a fixed tolerance.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .. import ops

NEGATIVE_MODES = ("unpaired", "paired")


def code_info_nce(query, positive, negatives, *, temperature=0.1, negative_mode="unpaired", reduction="mean",
                  backend=None):
    """CoDE's ``info_nce(query, positive_key, negative_keys)`` on the fused op (cosine, in-batch keys not negatives).

    query, positive (N, D); negatives (M, D) for ``negative_mode="unpaired"`` or (N, M, D) for ``"paired"``."""
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"negative_mode must be one of {NEGATIVE_MODES}, got {negative_mode!r}")
    want = 2 if negative_mode == "unpaired" else 3
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != want:
        shape = tuple(negatives.shape) if isinstance(negatives, torch.Tensor) else type(negatives).__name__
        raise ValueError(f"negative_mode={negative_mode!r} needs negatives of {want} dimensions "
                         f"({'(M, D)' if want == 2 else '(N, M, D)'}), got {shape}")
    return ops.info_nce(query, positive, negatives=negatives, temperature=temperature, in_batch_negatives=False,
                        similarity="cosine", reduction=reduction, backend=backend)


class CoDELoss(nn.Module):
    """CoDE's global-local contrastive loss (real and fake branches), ``temperature=0.1``.

    ``forward(real, fake, aug_real, aug_fake, local_real, global_real, local_fake, global_fake)``: eight (B, D)
    embedding batches (the model's outputs for the real images, the generated ones, their augmentations, and the
    DINO-style global / local crops).  Returns ``(loss, {"real": ..., "fake": ...})``; four fused calls, each
    with its (B, D) negative batch as the shared bank.  :meth:`term` is one official ``info_nce`` call and also
    takes per-query negatives (B, M, D) (``negative_mode="paired"``).
    """

    def __init__(self, temperature: float = 0.1, backend=None):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def extra_repr(self):
        return f"temperature={self.temperature}"

    def term(self, query, positive, negatives):
        """``l(query, positive; negatives)``: negatives (M, D) shared, or (N, M, D) per query."""
        mode = "paired" if isinstance(negatives, torch.Tensor) and negatives.dim() == 3 else "unpaired"
        return code_info_nce(query, positive, negatives, temperature=self.temperature, negative_mode=mode,
                             backend=self.backend)

    def forward(self, real, fake, aug_real, aug_fake, local_real, global_real, local_fake,
                global_fake) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        real_loss = 0.5 * (self.term(real, aug_real, aug_fake) + self.term(local_real, global_real, global_fake))
        fake_loss = 0.5 * (self.term(fake, aug_fake, aug_real) + self.term(local_fake, global_fake, global_real))
        return real_loss + fake_loss, {"real": real_loss, "fake": fake_loss}
