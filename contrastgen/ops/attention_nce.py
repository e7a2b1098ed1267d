"""Fused CONFORM attention-map contrastive loss: custom ops and their registration.

Call chain: ``_attention_nce_fwd_kernel`` / ``_attention_nce_bwd_kernel`` (Triton, ``contrastgen.kernels.attention_nce``)
or ``attention_nce_fwd`` / ``attention_nce_bwd`` of ``contrastgen._cpp_attention_nce`` (C++) -> launchers (same
signatures on both backends) -> custom ops ``contrastgen::attention_nce_fwd`` / ``contrastgen::attention_nce_bwd``
(this module: fake and autograd registrations) -> :func:`attention_nce_core` -> public
``contrastgen.attention_nce`` (``contrastgen/ops/api.py``, which validates and sends float64 to the reference).

One launch per direction for a whole batch of prompts (one program / OpenMP iteration per prompt).  The token
groups are packed on the host into ``tokens`` / ``labels`` (B, KP) int32 (KP = max(16, next power of two of the
largest token count), label -1 = padding) and ``kinds`` (B,) (0 NT-Xent, 1 contrastive: ``"ntxent_contrastive"``
is resolved per prompt, as the official code does per call).  The math is at the top of
``kernels/attention_nce.py``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..reference.attention import per_prompt_groups
from ._backends import launcher

LOSS_NTXENT, LOSS_CONTRASTIVE, LOSS_PER_PROMPT = 0, 1, 2


def smoothing_weights(smoothing: str, kernel_size: int, sigma: float) -> List[float]:
    """1-D weights (sum 1) of the separable smoothing kernel: the reference's 2-D kernel is their outer product."""
    if smoothing == "none":
        return [1.0]
    mu = (kernel_size - 1) / 2
    if smoothing == "conform":
        w = [math.exp(-(((x - mu) / (2 * sigma)) ** 2)) for x in range(kernel_size)]
    elif smoothing == "gaussian":
        w = [math.exp(-((x - mu) ** 2) / (2 * sigma ** 2)) for x in range(kernel_size)]
    else:
        raise ValueError(f"smoothing must be 'conform', 'gaussian' or 'none', got {smoothing!r}")
    s = sum(w)
    return [v / s for v in w]


def _n_cols(tokens: Tensor, prev: Optional[Tensor]) -> int:
    return tokens.shape[1] * (2 if prev is not None else 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("contrastgen::attention_nce_fwd", mutates_args=())
def attention_nce_fwd(maps: Tensor, prev: Optional[Tensor], tokens: Tensor, labels: Tensor, kinds: Tensor,
                      temperature: float, softmax_normalize: bool, smoothing: str, kernel_size: int, sigma: float,
                      spatial_softmax: bool, loss_mode: int, backend: str
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """maps (B, H, W, T) -> (loss (B,), X (B, H*W, N), Gram (B, N, N), stats (B, 2, N), Y), accumulation dtype;
    Y (B, H*W, T) the token softmax, saved by the backends that reuse it in the backward (cpp), else (B, 0, T)."""
    w = smoothing_weights(smoothing, kernel_size, sigma)
    return launcher("attention_nce", backend).attention_nce_fwd(
        maps, prev, tokens, labels, kinds, w, temperature, softmax_normalize, smoothing != "none", spatial_softmax,
        loss_mode)


@attention_nce_fwd.register_fake
def _(maps, prev, tokens, labels, kinds, temperature, softmax_normalize, smoothing, kernel_size, sigma,
      spatial_softmax, loss_mode, backend):
    B, H, W, _ = maps.shape
    n = _n_cols(tokens, prev)
    acc = _acc_dtype(maps.dtype)
    T = maps.shape[-1]
    ny = H * W if (softmax_normalize and backend == "cpp") else 0
    return (maps.new_empty((B,), dtype=acc), maps.new_empty((B, H * W, n), dtype=acc),
            maps.new_empty((B, n, n), dtype=acc), maps.new_empty((B, 2, n), dtype=acc),
            maps.new_empty((B, ny, T), dtype=acc))


@torch.library.custom_op("contrastgen::attention_nce_bwd", mutates_args=())
def attention_nce_bwd(grad: Tensor, maps: Tensor, prev: Optional[Tensor], tokens: Tensor, labels: Tensor,
                      kinds: Tensor, loss: Tensor, xbuf: Tensor, gram: Tensor, stats: Tensor, ybuf: Tensor,
                      temperature: float, softmax_normalize: bool, smoothing: str, kernel_size: int, sigma: float, spatial_softmax: bool,
                      loss_mode: int, backend: str) -> Tensor:
    """d loss / d maps (B, H, W, T) in maps' dtype for the upstream gradient ``grad`` (B,)."""
    w = smoothing_weights(smoothing, kernel_size, sigma)
    d = launcher("attention_nce", backend).attention_nce_bwd(
        grad, maps, prev, tokens, labels, kinds, w, loss, xbuf, gram, stats, ybuf, temperature, softmax_normalize,
        smoothing != "none", spatial_softmax, loss_mode)
    return d.to(maps.dtype)


@attention_nce_bwd.register_fake
def _(grad, maps, prev, tokens, labels, kinds, loss, xbuf, gram, stats, ybuf, temperature, softmax_normalize,
      smoothing, kernel_size, sigma, spatial_softmax, loss_mode, backend):
    return torch.empty_like(maps)


def _setup(ctx, inputs, output):
    maps, prev, tokens, labels, kinds, *opts = inputs
    loss, xbuf, gram, stats, ybuf = output
    ctx.save_for_backward(maps, prev, tokens, labels, kinds, loss, xbuf, gram, stats, ybuf)
    ctx.opts = tuple(opts)
    ctx.mark_non_differentiable(xbuf, gram, stats, ybuf)


def _backward(ctx, g_loss, _g_xbuf, _g_gram, _g_stats, _g_ybuf):
    maps, prev, tokens, labels, kinds, loss, xbuf, gram, stats, ybuf = ctx.saved_tensors
    dmaps = None
    if ctx.needs_input_grad[0]:
        if g_loss is None:
            g_loss = torch.zeros_like(loss)
        dmaps = torch.ops.contrastgen.attention_nce_bwd(g_loss.contiguous(), maps, prev, tokens, labels, kinds, loss,
                                                        xbuf, gram, stats, ybuf, *ctx.opts)
    return (dmaps,) + (None,) * 12


attention_nce_fwd.register_autograd(_backward, setup_context=_setup)


# -------------------------------------------------------------------------------------------------- core
def pack_groups(token_groups, batch: int, loss: str, device) -> Tuple[Tensor, Tensor, Tensor, int]:
    """(tokens (B, KP) int32, labels (B, KP) int32 (-1 = padding), kinds (B,) int32, loss_mode)."""
    groups = per_prompt_groups(token_groups, batch)
    k_max = max(sum(len(g) for g in gs) for gs in groups)
    kp = max(16, 1 << (k_max - 1).bit_length())
    tokens = [[0] * kp for _ in range(batch)]
    labels = [[-1] * kp for _ in range(batch)]
    kinds = []
    for b, gs in enumerate(groups):
        i = 0
        for gi, g in enumerate(gs):
            for t in g:
                tokens[b][i], labels[b][i] = int(t), gi
                i += 1
        if loss == "ntxent_contrastive":
            kinds.append(LOSS_NTXENT if len(gs[0]) > 1 else LOSS_CONTRASTIVE)
        else:
            kinds.append(LOSS_NTXENT if loss == "ntxent" else LOSS_CONTRASTIVE)
    mode = kinds[0] if len(set(kinds)) == 1 else LOSS_PER_PROMPT
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(tokens), as_t(labels), as_t(kinds), mode


def attention_nce_core(backend: str, maps: Tensor, token_groups, prev_maps: Optional[Tensor], temperature: float,
                       softmax_normalize: bool, smoothing: Optional[str], kernel_size: int, sigma: float,
                       softmax_normalize_attention_maps: bool, loss: str) -> Tensor:
    """The loss of (H, W, T) maps (scalar) or (B, H, W, T) maps ((B,)) on a fused ``backend``, in maps' dtype."""
    squeeze = maps.dim() == 3
    m4 = (maps.unsqueeze(0) if squeeze else maps).contiguous()
    p4 = None
    if prev_maps is not None:
        p4 = (prev_maps.unsqueeze(0) if squeeze else prev_maps).detach().contiguous()
    tokens, labels, kinds, mode = pack_groups(token_groups, m4.shape[0], loss, maps.device)
    out = torch.ops.contrastgen.attention_nce_fwd(
        m4, p4, tokens, labels, kinds, float(temperature), bool(softmax_normalize), smoothing or "none",
        int(kernel_size) if smoothing else 1, float(sigma), bool(softmax_normalize_attention_maps), mode, backend)[0]
    out = out.to(maps.dtype)
    return out[0] if squeeze else out
