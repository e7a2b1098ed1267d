"""CONFORM's contrastive loss over cross-attention maps (METHODS.md section 4), PyTorch reference."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .infonce import info_nce_ref


def smoothing_kernel(kind: str | None, *, size: int = 3, sigma: float = 0.5, dtype=torch.float32, device=None):
    """The 2-D 3x3 smoothing kernel.  ``"conform"``: the official (Attend-and-Excite) kernel
    ``prod_d exp(-((x - mu) / (2 sigma))^2)`` normalised to sum 1 (1-D ~ [0.212, 0.576, 0.212]);
    ``"gaussian"``: a true Gaussian ``exp(-(x - mu)^2 / (2 sigma^2))``; ``None``: no smoothing."""
    if kind is None:
        return None
    x = torch.arange(size, dtype=torch.float64)
    mu = (size - 1) / 2
    if kind == "conform":
        w = torch.exp(-(((x - mu) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    elif kind == "gaussian":
        w = torch.exp(-((x - mu) ** 2) / (2 * sigma**2))
    else:
        raise ValueError(f"smoothing must be 'conform', 'gaussian' or None, got {kind!r}")
    k2 = w[:, None] * w[None, :]
    return (k2 / k2.sum()).to(dtype=dtype, device=device)


def _token_maps(maps: torch.Tensor, tokens: Sequence[int], softmax_normalize: bool, smoothing) -> torch.Tensor:
    """(H, W, 77) -> (len(tokens), H*W): slice tokens 1..75, optional softmax, smooth, flatten."""
    a = maps[:, :, 1:-1]
    if softmax_normalize:
        a = torch.softmax(a * 100.0, dim=-1)
    idx = torch.as_tensor([t - 1 for t in tokens], device=maps.device)
    sel = a.index_select(-1, idx).permute(2, 0, 1)[:, None]            # (T, 1, H, W)
    kernel = smoothing_kernel(smoothing, dtype=maps.dtype, device=maps.device)
    if kernel is not None:
        sel = F.conv2d(F.pad(sel, (1, 1, 1, 1), mode="reflect"), kernel[None, None])
    return sel.flatten(1)


def _pml_contrastive(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """pytorch-metric-learning ContrastiveLoss with cosine similarity (pos_margin=1, neg_margin=0):
    mean of the non-zero ``relu(1 - s)`` over positive pairs plus that of ``relu(s)`` over negative pairs."""
    e = F.normalize(emb, dim=1)
    s = e @ e.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_l = F.relu(1.0 - s[same & ~eye])
    neg_l = F.relu(s[~same])

    def avg_nonzero(x):
        nz = (x > 0).sum()
        return torch.where(nz > 0, x.sum() / nz.clamp_min(1), x.sum() * 0.0)

    return avg_nonzero(pos_l) + avg_nonzero(neg_l)


def attention_nce_ref(maps: torch.Tensor, token_groups: Sequence[Sequence[int]], *, prev_maps=None,
                      temperature: float = 0.5, softmax_normalize: bool = False, smoothing: str | None = "conform",
                      loss: str = "ntxent") -> torch.Tensor:
    """CONFORM: maps (H, W, 77) -> scalar, or (B, H, W, 77) -> (B,).

    Every token of ``token_groups`` (1-based prompt indices counting the start token) gives one
    embedding (its smoothed map), labelled by its group; ``prev_maps`` (same shape, no gradient)
    add one more embedding per token with the same label.  Loss: PML NT-Xent with cosine
    similarity (``"ntxent"``) or PML's contrastive loss (``"contrastive"``)."""
    if maps.dim() == 4:
        outs = [attention_nce_ref(maps[b], token_groups, prev_maps=None if prev_maps is None else prev_maps[b],
                                  temperature=temperature, softmax_normalize=softmax_normalize,
                                  smoothing=smoothing, loss=loss) for b in range(maps.shape[0])]
        return torch.stack(outs)
    tokens = [t for g in token_groups for t in g]
    labels = torch.as_tensor([gi for gi, g in enumerate(token_groups) for _ in g], device=maps.device)
    emb = _token_maps(maps, tokens, softmax_normalize, smoothing)
    if prev_maps is not None:
        emb = torch.cat([emb, _token_maps(prev_maps.detach(), tokens, softmax_normalize, smoothing)], 0)
        labels = torch.cat([labels, labels])
    if loss == "contrastive":
        return _pml_contrastive(emb, labels)
    e = F.normalize(emb, dim=1)
    return info_nce_ref(e, None, temperature=temperature, labels=labels, positives="pml")
