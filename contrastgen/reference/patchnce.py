"""PatchNCE (CUT, METHODS.md section 3), dense PyTorch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _patch_nce_layer(q: torch.Tensor, k: torch.Tensor, temperature: float, all_negatives_from_minibatch: bool,
                     detach_key: bool) -> torch.Tensor:
    if detach_key:
        k = k.detach()
    b, p, c = q.shape
    l_pos = (q * k).sum(-1).reshape(b * p, 1)
    groups = 1 if all_negatives_from_minibatch else b
    qg, kg = q.reshape(groups, -1, c), k.reshape(groups, -1, c)
    npatch = qg.shape[1]
    l_neg = qg @ kg.transpose(1, 2)                        # (groups, npatch, npatch)
    eye = torch.eye(npatch, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(eye, -10.0).reshape(-1, npatch)
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction="none").mean()


def patch_nce_ref(query, key, *, temperature: float = 0.07, all_negatives_from_minibatch: bool = False,
                  detach_key: bool = True) -> torch.Tensor:
    """CUT's PatchNCELoss, averaged over patches, then over layers.

    ``query``/``key``: (B, P, C) features (already L2-normalised, as CUT's sampler does), or equal-length
    lists of them, one per layer (C may differ).  Per image: ``l_pos_i = q_i.k_i``, ``l_neg = q k^T``
    with its diagonal set to -10, logits ``[l_pos_i, l_neg_i] / T``, cross-entropy with target 0.
    ``all_negatives_from_minibatch`` makes the whole batch one group (SinCUT).  CUT detaches the keys;
    ``detach_key=False`` lets them receive a gradient.
    """
    if isinstance(query, torch.Tensor):
        query, key = [query], [key]
    losses = [_patch_nce_layer(q, k, temperature, all_negatives_from_minibatch, detach_key) for q, k in zip(query, key)]
    return torch.stack(losses).mean()
