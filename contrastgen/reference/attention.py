"""CONFORM's contrastive loss over cross-attention maps (METHODS.md section 4), PyTorch reference."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .infonce import info_nce_ref


def smoothing_kernel(kind: str | None, *, size: int = 3, sigma: float = 0.5, dtype=torch.float32, device=None):
    """The 2-D ``size`` x ``size`` smoothing kernel (sum 1).  ``"conform"``: the official (Attend-and-Excite) kernel
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


def _token_maps(maps: torch.Tensor, tokens: Sequence[int], softmax_normalize: bool, smoothing, kernel_size: int = 3,
                sigma: float = 0.5, softmax_normalize_attention_maps: bool = False) -> torch.Tensor:
    """(H, W, T) -> (len(tokens), H'*W'): slice tokens 1..T-2, optional softmax over tokens of 100 A, smooth, flatten,
    optional softmax over positions of 100 x.  As the official code the smoothing reflect-pads by 1 whatever the
    kernel size, so H' = H + 3 - kernel_size (H for the default 3); everything is computed on copies (the official
    code scales the cached previous maps in place)."""
    a = maps[:, :, 1:-1]
    if softmax_normalize:
        a = torch.softmax(a * 100.0, dim=-1)
    idx = torch.as_tensor([t - 1 for t in tokens], device=maps.device)
    sel = a.index_select(-1, idx).permute(2, 0, 1)[:, None]            # (T, 1, H, W)
    kernel = smoothing_kernel(smoothing, size=kernel_size, sigma=sigma, dtype=maps.dtype, device=maps.device)
    if kernel is not None:
        sel = F.conv2d(F.pad(sel, (1, 1, 1, 1), mode="reflect"), kernel[None, None])
    sel = sel.flatten(1)
    if softmax_normalize_attention_maps:
        sel = torch.softmax(sel * 100.0, dim=-1)
    return sel


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


def per_prompt_groups(token_groups, batch: int):
    """Per-prompt token groups: ``token_groups`` shared by all prompts ([[2, 3], [6, 7]]) or one list per prompt
    ([[[2, 3], [6, 7]], [[2], [5]]]); returns a list of ``batch`` group lists."""
    if token_groups and token_groups[0] and isinstance(token_groups[0][0], (list, tuple)):
        return [list(map(list, g)) for g in token_groups]
    return [list(map(list, token_groups))] * batch


def attention_nce_ref(maps: torch.Tensor, token_groups, *, prev_maps=None,
                      temperature: float = 0.5, softmax_normalize: bool = False, smoothing: str | None = "conform",
                      kernel_size: int = 3, sigma: float = 0.5, softmax_normalize_attention_maps: bool = False,
                      loss: str = "ntxent") -> torch.Tensor:
    """CONFORM: maps (H, W, 77) -> scalar, or (B, H, W, 77) -> (B,).

    Every token of ``token_groups`` (1-based prompt indices counting the start token) gives one
    embedding (its smoothed map), labelled by its group; ``prev_maps`` (same shape, no gradient)
    add one more embedding per token with the same label.  For (B, H, W, 77) maps ``token_groups`` is either
    shared by every prompt or a list of B group lists.  Loss: PML NT-Xent with cosine similarity
    (``"ntxent"``), PML's contrastive loss (``"contrastive"``), or ``"ntxent_contrastive"`` (the official
    switch: NT-Xent when the first group has more than one token, else the contrastive loss).
    ``kernel_size`` / ``sigma``: of the smoothing (official: the map is reflect-padded by 1 for any size);
    ``softmax_normalize_attention_maps``: softmax over positions of 100 x each smoothed map (official option)."""
    if maps.dim() == 4:
        groups = per_prompt_groups(token_groups, maps.shape[0])
        outs = [attention_nce_ref(maps[b], groups[b], prev_maps=None if prev_maps is None else prev_maps[b],
                                  temperature=temperature, softmax_normalize=softmax_normalize,
                                  smoothing=smoothing, kernel_size=kernel_size, sigma=sigma,
                                  softmax_normalize_attention_maps=softmax_normalize_attention_maps, loss=loss)
                for b in range(maps.shape[0])]
        return torch.stack(outs)
    if loss == "ntxent_contrastive":
        loss = "ntxent" if len(token_groups[0]) > 1 else "contrastive"
    tokens = [t for g in token_groups for t in g]
    labels = torch.as_tensor([gi for gi, g in enumerate(token_groups) for _ in g], device=maps.device)
    opts = (softmax_normalize, smoothing, kernel_size, sigma, softmax_normalize_attention_maps)
    emb = _token_maps(maps, tokens, *opts)
    if prev_maps is not None:
        emb = torch.cat([emb, _token_maps(prev_maps.detach(), tokens, *opts)], 0)
        labels = torch.cat([labels, labels])
    if loss == "contrastive":
        return _pml_contrastive(emb, labels)
    e = F.normalize(emb, dim=1)
    return info_nce_ref(e, None, temperature=temperature, labels=labels, positives="pml")
