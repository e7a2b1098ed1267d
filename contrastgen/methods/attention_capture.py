"""Capture what guidance losses need from a diffusers UNet without giving up fused attention.

CONFORM's official pipeline swaps every attention layer's processor for one that materialises the full
probability matrix ``softmax(Q K^T / sqrt(d))`` (the 4096 x 4096 self-attention at a 64 x 64 latent included,
kept for the backward) only to read five 16 x 16 cross-attention maps.  :class:`UNetCapture` instead

* leaves every layer's output to ``F.scaled_dot_product_attention`` (the layers it does not target keep their
  own processor object, untouched; the targeted ones run :class:`CaptureAttnProcessor`, whose output is
  computed by the same operations as diffusers' ``AttnProcessor2_0`` and equals it);
* computes, only for the cross-attention layers whose query count is ``resolution[0] * resolution[1]`` and
  only for the batch rows asked for (``rows``: e.g. the conditional half of a classifier-free-guidance
  batch), the probabilities from the Q and K the processor already has, in float32, summed over heads at
  once: nothing of shape (heads, queries, keys) outlives the layer, no self-attention probability is ever
  formed, and gradients flow to the latent through Q and K;
* averages over heads and layers exactly as the official ``AttentionStore.aggregate_attention`` does (one
  mean over all (layer, head) pairs, so layers with different head counts weigh like the official code);
* optionally records the outputs of named UNet modules (e.g. decoder blocks ``"up_blocks.1"``) with forward
  hooks, for feature-space losses (PatchNCE-style guidance reuses this class);
* optionally stops the UNet forward as soon as everything asked for has been captured
  (:meth:`UNetCapture.forward` with ``early_exit=True``): a guidance step that only needs the 16 x 16 maps
  of ``up_blocks.1`` never runs the 32 x 32 and 64 x 64 decoder blocks.  Gradients of the captured tensors are
  the same as with the full forward (nothing after the last captured layer influences them).

Usage::

    cap = UNetCapture(unet, resolution=(16, 16))
    with cap:                                        # installs the processors / hooks, restores on exit
        cap.reset(rows=slice(None))
        cap.forward(latents, t, encoder_hidden_states=cond, early_exit=True)
        maps = cap.maps()                            # (rows, 16, 16, 77), differentiable
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class StopForward(Exception):
    """Raised inside the UNet forward once every requested capture is complete (early exit)."""


def _rows_of(rows, batch: int):
    if rows is None:
        return slice(None)
    if isinstance(rows, str):
        if rows == "all":
            return slice(None)
        if rows in ("cond", "uncond"):
            if batch % 2:
                raise ValueError(f"rows={rows!r} needs a classifier-free-guidance batch (even size), got batch {batch}")
            half = batch // 2
            return slice(half, batch) if rows == "cond" else slice(0, half)
        raise ValueError(f"rows must be None, 'all', 'cond', 'uncond', a slice or a sequence of indices, got {rows!r}")
    return rows


class CaptureAttnProcessor:
    """Cross-attention processor: the layer's output by ``scaled_dot_product_attention`` (the operations of
    diffusers' ``AttnProcessor2_0``, so the output is the same), plus, when the owning :class:`UNetCapture`
    asks for it, the head-summed attention probabilities of the selected batch rows."""

    def __init__(self, capture: "UNetCapture", name: str, fallback):
        self.capture = capture
        self.name = name
        self.fallback = fallback   # the processor the layer had; used when nothing is captured from this call

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        cap = self.capture
        n_query = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if not cap.wants(n_query) or encoder_hidden_states is None:
            if temb is not None:
                kwargs["temb"] = temb
            return self.fallback(attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # the maps: float32 probabilities of the selected rows only, summed over heads right away
        sel = _rows_of(cap.rows, batch_size)
        q_sel, k_sel = query[sel].float(), key[sel].float()
        scores = torch.matmul(q_sel, k_sel.transpose(-1, -2)) * attn.scale        # (b, heads, Nq, Nk)
        if attention_mask is not None:
            scores = scores + attention_mask[sel].float()
        cap._add_maps(scores.softmax(-1).sum(1), attn.heads)                       # (b, Nq, Nk)
        del scores

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        cap._layer_done()
        return hidden_states


class UNetCapture:
    """Cross-attention maps at one resolution (head- and layer-averaged) and named module outputs of a UNet.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model whose cross-attention layers are diffusers
            ``Attention`` modules).
        resolution: (h, w) of the maps: cross-attention layers with h * w queries are captured; None: no maps.
        features: names of submodules (``dict(unet.named_modules())`` keys) whose outputs are recorded.
        layers: optional filter on the attention modules' names (substrings); None: every cross-attention layer
            at ``resolution`` (the official CONFORM choice).
    """

    def __init__(self, unet: torch.nn.Module, resolution: Optional[Tuple[int, int]] = (16, 16),
                 features: Sequence[str] = (), layers: Optional[Iterable[str]] = None):
        self.unet = unet
        if resolution is not None:
            if len(resolution) != 2 or any(int(r) <= 0 for r in resolution):
                raise ValueError(f"resolution must be (h, w) with positive sizes, got {resolution!r}")
            resolution = (int(resolution[0]), int(resolution[1]))
        self.resolution = resolution
        self.feature_names = tuple(features)
        self.layer_filter = None if layers is None else tuple(layers)
        modules = dict(unet.named_modules())
        missing = [f for f in self.feature_names if f not in modules]
        if missing:
            raise ValueError(f"features {missing} are not modules of the UNet (e.g. 'up_blocks.1', 'mid_block')")
        self._installed = False
        self._originals: Dict[str, object] = {}
        self._hooks = []
        self.rows = None
        self.enabled = True
        self.expected_layers: Optional[int] = None   # learnt from the first complete forward
        self.reset()

    # ------------------------------------------------------------------ install / remove
    def _cross_attention_modules(self):
        for name, mod in self.unet.named_modules():
            if getattr(mod, "is_cross_attention", False) and hasattr(mod, "set_processor"):
                if self.layer_filter is None or any(s in name for s in self.layer_filter):
                    yield name, mod

    def install(self) -> "UNetCapture":
        if self._installed:
            return self
        if self.resolution is not None:
            for name, mod in self._cross_attention_modules():
                self._originals[name] = mod.processor
                mod.set_processor(CaptureAttnProcessor(self, name, mod.processor))
        modules = dict(self.unet.named_modules())
        for fname in self.feature_names:
            self._hooks.append(modules[fname].register_forward_hook(self._feature_hook(fname)))
        self._installed = True
        return self

    def remove(self) -> None:
        if not self._installed:
            return
        modules = dict(self.unet.named_modules())
        for name, proc in self._originals.items():
            modules[name].set_processor(proc)
        self._originals.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._installed = False

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()
        return False

    # ------------------------------------------------------------------ state of one forward
    def reset(self, rows=None, enabled: bool = True) -> None:
        """Start a new forward: ``rows`` (None/'all', 'cond', 'uncond', a slice or indices) selects the batch rows
        whose maps are computed; ``enabled=False`` captures nothing (every layer runs its own processor)."""
        self.rows = rows
        self.enabled = enabled
        self._sum: Optional[Tensor] = None
        self._heads = 0
        self._layers = 0
        self.features: Dict[str, Tensor] = {}
        self._early_exit = False

    def wants(self, n_query: int) -> bool:
        return (self.enabled and self.resolution is not None
                and n_query == self.resolution[0] * self.resolution[1])

    def _add_maps(self, probs_head_sum: Tensor, heads: int) -> None:
        self._sum = probs_head_sum if self._sum is None else self._sum + probs_head_sum
        self._heads += heads

    def _layer_done(self) -> None:
        self._layers += 1
        self._maybe_stop()

    def _feature_hook(self, name):
        def hook(module, args, output):
            if self.enabled:
                self.features[name] = output[0] if isinstance(output, tuple) else output
                self._maybe_stop()
        return hook

    def _complete(self) -> bool:
        maps_done = (self.resolution is None or
                     (self.expected_layers is not None and self._layers >= self.expected_layers))
        return maps_done and all(f in self.features for f in self.feature_names)

    def _maybe_stop(self) -> None:
        if self._early_exit and self._complete():
            raise StopForward()

    @property
    def n_layers(self) -> int:
        """Number of cross-attention layers captured by the last forward."""
        return self._layers

    def maps(self) -> Tensor:
        """(rows, h, w, keys) float32: the probabilities averaged over every captured (layer, head) pair."""
        if self._sum is None:
            raise RuntimeError(f"no cross-attention layer with {self.resolution[0]}x{self.resolution[1]} queries ran "
                               "during the last forward; pass the resolution of an existing layer "
                               "(SD 1.x at 512x512: (16, 16))" if self.resolution else "UNetCapture(resolution=None)")
        b, nq, nk = self._sum.shape
        return (self._sum / self._heads).view(b, self.resolution[0], self.resolution[1], nk)

    # ------------------------------------------------------------------ running the UNet
    def count_layers(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, **unet_kwargs) -> int:
        """Learn how many cross-attention layers run at ``resolution`` with one forward under ``no_grad`` (no
        activations kept), so that the next :meth:`forward` with ``early_exit=True`` can already stop early:
        without it the first early-exit forward runs the whole UNet with autograd to count them, and that full
        forward is the guidance's peak memory.  Returns the count."""
        if not self._installed:
            raise RuntimeError("UNetCapture.count_layers needs install() (or `with capture:`) first")
        if self.resolution is None:
            return 0
        with torch.no_grad():
            self.reset(rows=slice(0, 1), enabled=True)
            self._early_exit = False
            self.unet(sample[:1], timestep, encoder_hidden_states=encoder_hidden_states[:1], **unet_kwargs)
        self.expected_layers = self._layers
        self.reset()
        return self.expected_layers

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, *, rows=None, early_exit: bool = True,
                **unet_kwargs):
        """Run the UNet with capture.  Returns its output, or None when it stopped early (``early_exit=True`` and
        every capture complete before the end; the first call runs to the end to count the layers unless
        :meth:`count_layers` ran first)."""
        if not self._installed:
            raise RuntimeError("UNetCapture.forward needs install() (or `with capture:`) first")
        self.reset(rows=rows, enabled=True)
        self._early_exit = early_exit and (self.resolution is None or self.expected_layers is not None)
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)
        except StopForward:
            return None
        finally:
            self._early_exit = False
        if self.resolution is not None:
            self.expected_layers = self._layers
        return out


# ----------------------------------------------------------------------------------------- the baseline
class _MaterializingProcessor:
    def __init__(self, capture: "MaterializingCapture"):
        self.capture = capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        # the official CONFORM processor's computation: full probabilities for every layer, kept for the backward
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        encoder_hidden_states = encoder_hidden_states if is_cross else hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)       # (batch * heads, Nq, Nk)
        self.capture._store(probs, is_cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class MaterializingCapture:
    """The official CONFORM capture, for comparison (tests and benchmarks): every attention layer of the UNet
    runs ``attn.get_attention_scores`` + ``bmm`` (all probability matrices materialised and kept for the
    backward); the cross-attention probabilities with ``resolution`` queries are averaged over all (layer,
    head) pairs of all batch rows (the official code calls the UNet with one prompt at a time)."""

    def __init__(self, unet, resolution=(16, 16)):
        self.unet = unet
        self.resolution = tuple(resolution)
        self._originals = None
        self.reset()

    def reset(self):
        self._probs = []

    def _store(self, probs, is_cross):
        if is_cross and probs.shape[1] == self.resolution[0] * self.resolution[1]:
            self._probs.append(probs)

    def __enter__(self):
        self._originals = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(_MaterializingProcessor(self))
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self._originals))
        return False

    def maps(self) -> Tensor:
        """(h, w, keys): the official ``aggregate_attention`` (mean over every stored (batch * head) slice)."""
        out = torch.cat([p.reshape(-1, self.resolution[0], self.resolution[1], p.shape[-1]) for p in self._probs])
        return out.sum(0) / out.shape[0]


class FrozenParams:
    """Context manager: the parameters of ``module`` do not require grad inside the block, so a guidance
    gradient goes to the latent only (ConformPipeline, ContrastiveEditPipeline)."""

    def __init__(self, module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False
