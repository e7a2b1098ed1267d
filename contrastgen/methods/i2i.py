"""Contrastive-guided image-to-image translation on diffusers' Stable Diffusion (pix2pix-zeroCon, arXiv 2503.20484;
METHODS.md section 3).  Zero-shot: no training, no fine-tuning.

The method extends pix2pix-zero (pix2pixzero/pix2pix-zero) and has no public code; this module follows the paper as
summarised in METHODS.md and pix2pix-zero's code where the paper builds on it:

1. **DDIM inversion** (:meth:`ContrastiveEditPipeline.invert`): the source image's latent ``z_0`` (VAE mean) is
   carried to ``z_T`` by the exact algebraic inverse of the deterministic (eta = 0) DDIM step, with the source
   prompt and no classifier-free guidance (pix2pix-zero).  Optional: pix2pix-zero's noise regularisation
   (auto-correlation + KL pulls on each noise prediction) and fixed-point refinement of each step (ours).
2. **Reference trajectory**: at every guided step the cross-attention maps and the sampled decoder-feature patches
   of a reference UNet call are cached (:class:`ReferenceStep`): by default from the reconstruction trajectory
   (``z_T`` denoised again with the source prompt, as pix2pix-zero's first denoising loop), or, at no extra UNet
   call, from the inversion's own calls (``reference="inversion"``).  One inversion serves any number of edits.
3. **Edit direction** (:meth:`ContrastiveEditPipeline.edit_direction`): the difference of the mean text embeddings
   (1, 77, D) of a target and a source sentence set (pix2pix-zero), the sets given by the user or built from
   :data:`TEMPLATES` around a source / target word, or simply the difference of the two prompts' embeddings.  The
   edited condition is ``c_edit = c_src + direction`` (added to every token, as pix2pix-zero).
4. **Guided denoising** (:meth:`ContrastiveEditPipeline.__call__`): from ``z_T``, at each guided step the latent
   first takes one gradient step ``z <- z - eta * grad_z L`` with

       L = w_nce * mean_layers PatchNCE(q = patches of the edited call's decoder features,
                                         k = the reference's patches at the same step and ids)
         + w_attn * sum_layers mean_(batch, heads) || M - M_ref ||^2      (sum over queries and tokens)

   (PatchNCE as ZeCon / CUT: 256 patches, ids shared by query and key and by every layer of one resolution, L2
   normalised, no MLP head, tau = 0.07, keys detached; all layers in one fused :func:`contrastgen.patch_nce` call;
   the attention loss is pix2pix-zero's ``((curr - ref) ** 2).sum((1, 2)).mean(0)`` per layer), then the usual
   classifier-free-guidance DDIM step with the edited condition (negative prompt: the source prompt).

How the UNet is observed (:class:`GuidanceCapture`): :class:`~contrastgen.methods.attention_capture.UNetCapture`
(the CONFORM capture) with forward hooks only, on the decoder modules and on the ``to_q`` / ``to_k`` projections of
the guided cross-attention layers.  Every attention layer keeps its own processor (``scaled_dot_product_attention``:
no self-attention probability is ever formed); the per-head cross-attention probabilities are recomputed, in
float32, from the hooked Q and K of the guided layers only; the forward stops after the last module needed
(early exit).  :class:`MaterializingCapture` is pix2pix-zero's way (every attention layer's probabilities
materialised and kept for the backward), kept as the baseline of the tests and benchmarks.

Defaults (``__call__`` / ``invert``) and where they come from:

======================================  ========================  ==============================================
parameter                               default                   source
======================================  ========================  ==============================================
num_inference_steps                     50                        pix2pix-zero (``--num_ddim_steps``)
guidance_scale                          5.0                       pix2pix-zero (``--negative_guidance_scale``)
negative_prompt                         the source prompt         pix2pix-zero (``negative_prompt=prompt_str``)
guidance_step_size (eta)                0.1                       pix2pix-zero (``--xa_guidance``, SGD lr); METHODS
guidance_steps                          every step                pix2pix-zero
attention_weight                        1.0                       pix2pix-zero (the loss as is)
attention_layers                        every cross-attention     pix2pix-zero (every ``attn2``)
nce_weight                              1.0                       our choice (the paper gives no value; see the
                                                                  demo's sweep in the README)
nce_layers                              every up block's output   our choice: decoder features as the issue asks,
                                                                  multi-scale as ZeCon's 5 encoder layers
num_patches, nce_temperature            256, 0.07                 ZeCon / CUT
guidance_embeds                         "edit"                    pix2pix-zero paper, Alg. 1 (the official code
                                                                  guides the negative half, i.e. "source")
reference                               "reconstruction"          pix2pix-zero (first denoising loop)
inversion: CFG                          none (scale 1)            pix2pix-zero (``guidance_scale=1``)
inversion: lambda_ac, lambda_kl         20, 20                    pix2pix-zero (``DDIMInversion.__call__``)
inversion: num_reg_steps, num_ac_rolls  5, 5                      pix2pix-zero
inversion: fixed_point_iterations       0                         plain DDIM inversion (pix2pix-zero)
VAE latent                              the posterior mean        our choice (deterministic; pix2pix-zero samples)
sentence templates                      :data:`TEMPLATES`         our choice (pix2pix-zero writes sentence sets
                                                                  with a language model: not available offline)
======================================  ========================  ==============================================

pix2pix-zero's regularisation weights were set for SD's 64 x 64 latents: its losses are means over the latent, so
their pull on each element grows as 1 / (h w).  On the demo's 16 x 16 latents they wreck the inversion (measured:
reconstruction pixel MAE 0.36 with them, 0.012 without, 0.0011 with 3 fixed-point iterations); pass
``lambda_ac=0, lambda_kl=0`` for small latents.

Nothing is downloaded: the pipeline is built from local components (``ContrastiveEditPipeline(**sd.components)``
or ``from_pretrained(local_dir, local_files_only=True)``); the source prompt comes from the user (no captioner).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.api import patch_nce
from ..reference import patch_nce_ref
from .attention_capture import FrozenParams, UNetCapture

try:  # diffusers is an optional dependency (the ``methods`` extra)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import BaseOutput
except ImportError:  # pragma: no cover - exercised only without diffusers
    StableDiffusionPipeline = object
    BaseOutput = object
    DDIMScheduler = None

# Sentence templates for edit directions built around a word (our choice: CLIP-style prompt templates; pix2pix-zero
# generates ~1000 sentences per word with a language model, which cannot be had offline).
TEMPLATES: Tuple[str, ...] = (
    "a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a close-up photo of a {}",
    "a good photo of a {}", "a bright photo of a {}", "a cropped photo of a {}", "a photo of the {}",
    "a painting of a {}", "a rendering of a {}", "a {} in the scene", "a photo of a small {}", "a photo of a large {}",
    "there is a {} in the picture", "a {} on a plain background",
)


# ---------------------------------------------------------------------------------------------- UNet layers
def cross_attention_layers(unet) -> List[str]:
    """Names of the UNet's cross-attention modules (``...attn2``), in module order."""
    return [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "to_q")]


def default_nce_layers(unet) -> List[str]:
    """Every decoder up block's output (``up_blocks.0`` ... ``up_blocks.{n-1}``)."""
    return [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def resolve_attention_layers(unet, layers) -> List[str]:
    """``None``: every cross-attention layer; else each entry names a cross-attention module exactly or is a dotted
    prefix of some (``"up_blocks.1"``: every ``attn2`` inside it)."""
    avail = cross_attention_layers(unet)
    if layers is None:
        return avail
    if isinstance(layers, str):
        layers = [layers]
    out: List[str] = []
    for name in layers:
        hits = [a for a in avail if a == name or a.startswith(name + ".")]
        if not hits:
            raise ValueError(f"attention_layers: {name!r} names no cross-attention layer of the UNet; valid: "
                             f"{avail} (or a prefix of them, e.g. 'up_blocks.1')")
        out += [h for h in hits if h not in out]
    if not out:
        raise ValueError("attention_layers is empty; pass None for every cross-attention layer, or set attention_weight=0")
    return out


def check_feature_layers(unet, layers) -> List[str]:
    """``None``: :func:`default_nce_layers`; else module names of the UNet (``dict(unet.named_modules())`` keys)."""
    if layers is None:
        return default_nce_layers(unet)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    modules = dict(unet.named_modules())
    bad = [n for n in layers if n not in modules or n == ""]
    if bad:
        raise ValueError(f"nce_layers: {bad} are not modules of the UNet; use decoder module names such as "
                         f"{default_nce_layers(unet)} or 'up_blocks.1.resnets.0'")
    if not layers:
        raise ValueError("nce_layers is empty; pass None for the default decoder layers, or set nce_weight=0")
    if len(set(layers)) != len(layers):
        raise ValueError(f"nce_layers has repeated names: {layers}")
    return layers


# ------------------------------------------------------------------------------------------ maps and patches
def head_maps(attn, query: Tensor, key: Tensor) -> Tensor:
    """Per-head cross-attention probabilities (B, heads, Nq, Nk), float32, of a diffusers ``Attention`` module from the
    outputs of its ``to_q`` (B, Nq, inner) and ``to_k`` (B, Nk, inner) projections (SD's layers: no q/k norm, no mask)."""
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        raise NotImplementedError("cross-attention layers with q/k normalisation are not supported by the hook capture")
    b, nq, inner = query.shape
    h = attn.heads
    d = inner // h
    q = query.float().view(b, nq, h, d).transpose(1, 2)
    k = key.float().view(key.shape[0], key.shape[1], h, d).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def attention_loss(maps: Tensor, ref: Tensor) -> Tensor:
    """pix2pix-zero's cross-attention guiding loss of one layer: squared difference summed over queries and tokens,
    averaged over batch and heads.  maps, ref: (B, heads, Nq, Nk)."""
    return ((maps - ref.to(device=maps.device, dtype=maps.dtype)) ** 2).sum((-1, -2)).mean()


def _flat(feat: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW, C); (B, N, C) as is."""
    if feat.dim() == 4:
        return feat.flatten(2).transpose(1, 2)
    if feat.dim() == 3:
        return feat
    raise ValueError(f"a PatchNCE layer must output (B, C, H, W) or (B, N, C) features, got shape {tuple(feat.shape)}")


def sample_patches(feat: Tensor, ids: Tensor) -> Tensor:
    """(B, P, C) float32 patches at the spatial indices ``ids``, L2-normalised as CUT (``x / (||x|| + 1e-7)``)."""
    x = _flat(feat)[:, ids].float()
    return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


def draw_patch_ids(n: int, num_patches: int, generator: Optional[torch.Generator], device) -> Tensor:
    """``min(num_patches, n)`` distinct locations out of ``n`` (CUT's ``randperm(n)[:P]``)."""
    return torch.randperm(n, generator=generator)[: min(num_patches, n)].to(device)


# -------------------------------------------------------------------------------------------------- captures
class GuidanceCapture:
    """What the guidance needs from one UNet call, fused attention kept (see the module docstring).

    Wraps a :class:`UNetCapture` with ``resolution=None`` (no processor is replaced) whose forward hooks record the
    outputs of ``nce_layers`` and of the ``to_q`` / ``to_k`` projections of ``attention_layers``.  ``run`` returns
    ({nce layer: features}, {attention layer: per-head maps (B, heads, Nq, Nk) float32})."""

    def __init__(self, unet, nce_layers: Sequence[str], attention_layers: Sequence[str]):
        self.unet = unet
        self.nce_layers = list(nce_layers)
        self.attention_layers = list(attention_layers)
        modules = dict(unet.named_modules())
        self._attn = {a: modules[a] for a in self.attention_layers}
        hooks = self.nce_layers + [f"{a}.{p}" for a in self.attention_layers for p in ("to_q", "to_k")]
        self.capture = UNetCapture(unet, resolution=None, features=hooks)

    def __enter__(self):
        self.capture.install()
        return self

    def __exit__(self, *exc):
        self.capture.remove()
        return False

    def run(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, *, early_exit: bool = True,
            rows: Optional[slice] = None, **unet_kwargs) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Any]:
        out = self.capture.forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                   early_exit=early_exit, **unet_kwargs)
        f = self.capture.features
        rows = rows or slice(None)
        feats = {n: f[n][rows] for n in self.nce_layers}
        maps = {a: head_maps(m, f[f"{a}.to_q"][rows], f[f"{a}.to_k"][rows]) for a, m in self._attn.items()}
        self.capture.reset(enabled=False)    # drop the references; later calls capture nothing
        return feats, maps, out

    def idle(self) -> None:
        """Capture nothing in the following UNet calls (the classifier-free-guidance call)."""
        self.capture.reset(enabled=False)


class _MaterializingProcessor:
    """pix2pix-zero's ``MyCrossAttnProcessor`` on every attention layer: ``get_attention_scores`` + ``bmm`` (the
    (batch * heads, Nq, Nk) probabilities materialised and kept for the backward), the guided layers' stored."""

    def __init__(self, store: "MaterializingCapture", name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if hidden_states.ndim == 4:
            raise NotImplementedError("the materialising baseline handles the UNet's token attention layers only")
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)          # (batch * heads, Nq, Nk)
        if self.name in self.store.wanted:
            self.store.maps[self.name] = probs
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class MaterializingCapture:
    """The baseline capture (pix2pix-zero's): every attention layer of the UNet materialises its probabilities; the
    guided cross-attention layers' are read back, the decoder features come from forward hooks; no early exit.
    Same ``run`` interface as :class:`GuidanceCapture`."""

    def __init__(self, unet, nce_layers: Sequence[str], attention_layers: Sequence[str]):
        self.unet = unet
        self.nce_layers = list(nce_layers)
        self.attention_layers = list(attention_layers)
        self.wanted = set(self.attention_layers)
        self.maps: Dict[str, Tensor] = {}
        self.features: Dict[str, Tensor] = {}
        self._originals = None
        self._hooks = []

    def __enter__(self):
        self._originals = dict(self.unet.attn_processors)
        procs = {k: _MaterializingProcessor(self, k[: -len(".processor")]) for k in self._originals}
        self.unet.set_attn_processor(procs)
        modules = dict(self.unet.named_modules())
        for n in self.nce_layers:
            def hook(mod, args, out, n=n):
                self.features[n] = out[0] if isinstance(out, tuple) else out
            self._hooks.append(modules[n].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self._originals))
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return False

    def run(self, sample, timestep, encoder_hidden_states, *, early_exit: bool = True, rows=None, **unet_kwargs):
        self.maps, self.features = {}, {}
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)
        modules = dict(self.unet.named_modules())
        rows = rows or slice(None)
        maps = {}
        for a in self.attention_layers:
            p = self.maps[a]
            h = modules[a].heads
            maps[a] = p.float().view(-1, h, p.shape[1], p.shape[2])[rows]
        feats = {n: self.features[n][rows] for n in self.nce_layers}
        self.maps, self.features = {}, {}
        return feats, maps, out

    def idle(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- reference cache
@dataclasses.dataclass
class ReferenceStep:
    """What the guidance compares against at one denoising step: per-head cross-attention maps {layer: (B, heads,
    Nq, Nk)}, the sampled and normalised decoder-feature patches {layer: (B, P, C) float32} and their spatial ids
    {layer: (P,)} (one draw per spatial size, shared by the layers of that size and by the query)."""
    maps: Dict[str, Tensor]
    patches: Dict[str, Tensor]
    ids: Dict[str, Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.maps, self.patches, self.ids) for t in d.values())


def make_reference(feats: Dict[str, Tensor], maps: Dict[str, Tensor], *, num_patches: int,
                   generator: Optional[torch.Generator], cache_device=None, cache_dtype=None) -> ReferenceStep:
    """Draw the patch ids (one permutation per spatial size), sample and normalise the key patches, keep the maps
    (detached, in ``cache_dtype`` on ``cache_device``)."""
    by_size: Dict[int, Tensor] = {}
    ids, patches = {}, {}
    for n, f in feats.items():
        hw = _flat(f).shape[1]
        if hw not in by_size:
            by_size[hw] = draw_patch_ids(hw, num_patches, generator, f.device)
        ids[n] = by_size[hw]
        patches[n] = sample_patches(f.detach(), ids[n]).to(cache_device or f.device)
        ids[n] = ids[n].to(cache_device or f.device)
    kept = {a: m.detach().to(device=cache_device or m.device, dtype=cache_dtype or m.dtype) for a, m in maps.items()}
    return ReferenceStep(maps=kept, patches=patches, ids=ids)


# ----------------------------------------------------------------------------------------------- the guided step
@dataclasses.dataclass
class GuidanceLosses:
    """Per-layer losses of one guided step: patch_nce (L,) in ``nce_layers`` order, attention (A,) in
    ``attention_layers`` order (None where the weight is 0), and the weighted total."""
    patch_nce: Optional[Tensor]
    attention: Optional[Tensor]
    total: Tensor

    def detach(self) -> "GuidanceLosses":
        return GuidanceLosses(*(None if x is None else x.detach() for x in (self.patch_nce, self.attention, self.total)))


def guidance_losses(feats: Dict[str, Tensor], maps: Dict[str, Tensor], reference: ReferenceStep, *,
                    nce_weight: float, attention_weight: float, temperature: float = 0.07, backend=None,
                    fused: bool = True) -> GuidanceLosses:
    """Per-layer PatchNCE over ``feats`` and attention losses over ``maps`` (each computed when given, so that a
    zero-weight term is still recorded) and the total ``nce_weight * mean_layers PatchNCE + attention_weight *
    sum_layers attention_loss`` (zero-weight terms left out).  ``fused=True``: every PatchNCE layer in one
    :func:`contrastgen.patch_nce` call (``reduction="none"``); ``fused=False``: the reference
    :func:`contrastgen.reference.patch_nce_ref` layer by layer (the baseline)."""
    nce = attn = None
    terms = []
    if feats:
        names = list(feats)
        qs = [sample_patches(feats[n], reference.ids[n].to(feats[n].device)) for n in names]
        ks = [reference.patches[n].to(qs[i].device) for i, n in enumerate(names)]
        if fused:
            nce = patch_nce(qs, ks, temperature=temperature, reduction="none", backend=backend)
        else:
            nce = torch.stack([patch_nce_ref([q], [k], temperature=temperature) for q, k in zip(qs, ks)])
        if nce_weight:
            terms.append(nce_weight * nce.mean())
    if maps:
        attn = torch.stack([attention_loss(m, reference.maps[a]) for a, m in maps.items()])
        if attention_weight:
            terms.append(attention_weight * attn.sum())
    if not terms:
        raise ValueError("nothing to guide with: nce_weight and attention_weight are both 0 (or no layers)")
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return GuidanceLosses(nce, attn, total)


def guidance_gradient(capture, latents: Tensor, timestep, encoder_hidden_states: Tensor, reference: ReferenceStep, *,
                      nce_weight: float = 1.0, attention_weight: float = 1.0, temperature: float = 0.07,
                      backend=None, fused: bool = True, early_exit: bool = True,
                      unet_kwargs: Optional[dict] = None) -> Tuple[Tensor, GuidanceLosses]:
    """One guided step's gradient: the UNet call with ``capture`` (:class:`GuidanceCapture` or the baseline
    :class:`MaterializingCapture`, installed), PatchNCE + attention loss against ``reference``, backward to the
    latent.  Returns (d total / d latents, the losses, detached)."""
    with torch.enable_grad(), FrozenParams(capture.unet):
        z = latents.detach().requires_grad_(True)
        feats, maps, _ = capture.run(z, timestep, encoder_hidden_states, early_exit=early_exit, **(unet_kwargs or {}))
        losses = guidance_losses(feats, maps, reference, nce_weight=nce_weight, attention_weight=attention_weight,
                                 temperature=temperature, backend=backend, fused=fused)
        (grad,) = torch.autograd.grad(losses.total, z)
    return grad, losses.detach()


# ---------------------------------------------------------------------------------------------------- DDIM
def _alpha(sched, t) -> Tensor:
    t = int(t)
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def _prev_timestep(sched, t) -> int:
    """The timestep diffusers' ``DDIMScheduler.step`` moves ``t`` to."""
    return int(t) - sched.config.num_train_timesteps // sched.num_inference_steps


def _to_eps(model_output: Tensor, sample: Tensor, alpha: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")


def ddim_move(sample: Tensor, eps: Tensor, alpha_from: Tensor, alpha_to: Tensor) -> Tensor:
    """The deterministic DDIM map between noise levels: ``x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from)``,
    ``x' = sqrt(a_to) x0 + sqrt(1 - a_to) eps``.  With ``a_to < a_from`` it is diffusers' ``DDIMScheduler.step``
    (eta = 0, no clipping); with ``a_to > a_from`` its exact inverse given the same ``eps``."""
    a_from = alpha_from.to(sample.device, torch.float32)
    a_to = alpha_to.to(sample.device, torch.float32)
    x, e = sample.float(), eps.float()
    x0 = (x - (1 - a_from).sqrt() * e) / a_from.sqrt()
    return (a_to.sqrt() * x0 + (1 - a_to).sqrt() * e).to(sample.dtype)


def _auto_corr_loss(x: Tensor, generator: Optional[torch.Generator], num_rolls_unused=None) -> Tensor:
    """pix2pix-zero's auto-correlation loss of a noise map (1, C, H, W): per channel and pyramid level (halved by
    average pooling down to 8 px), the squared mean of the product with a copy rolled by a random amount
    (``[0, H / 2)``, drawn from ``generator``) along each spatial axis."""
    loss = x.new_zeros(())
    for c in range(x.shape[1]):
        noise = x[:, c:c + 1]
        while True:
            h = noise.shape[2]
            r = int(torch.randint(0, max(1, h // 2), (1,), generator=generator)) if h >= 2 else 0
            loss = loss + (noise * torch.roll(noise, shifts=r, dims=2)).mean() ** 2
            loss = loss + (noise * torch.roll(noise, shifts=r, dims=3)).mean() ** 2
            if h <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def _kl_to_standard_normal(x: Tensor) -> Tensor:
    mu, var = x.mean(), x.var()
    return var + mu ** 2 - 1 - torch.log(var + 1e-7)


def regularize_noise(eps: Tensor, *, lambda_ac: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 5,
                     num_ac_rolls: int = 5, generator: Optional[torch.Generator] = None) -> Tensor:
    """pix2pix-zero's inversion regularisation of a noise prediction: ``num_reg_steps`` rounds of ``num_ac_rolls``
    gradient steps on the auto-correlation loss (step ``lambda_ac / num_ac_rolls``) and one on the KL divergence to
    N(0, 1) (step ``lambda_kl``).  Deterministic given ``generator`` (the roll amounts)."""
    if not (lambda_ac or lambda_kl) or num_reg_steps <= 0:
        return eps
    e = eps.detach().float()
    with torch.enable_grad():
        for _ in range(num_reg_steps):
            for b in range(e.shape[0]):
                eb = e[b:b + 1]
                if lambda_ac:
                    for _ in range(num_ac_rolls):
                        v = eb.detach().requires_grad_(True)
                        (g,) = torch.autograd.grad(_auto_corr_loss(v, generator), v)
                        eb = eb - lambda_ac * g / num_ac_rolls
                if lambda_kl:
                    v = eb.detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(_kl_to_standard_normal(v), v)
                    eb = eb - lambda_kl * g
                e = torch.cat([e[:b], eb.detach(), e[b + 1:]])
    return e.to(eps.dtype)


# --------------------------------------------------------------------------------------------------- outputs
@dataclasses.dataclass
class DDIMInversion:
    """Result of :meth:`ContrastiveEditPipeline.invert`.

    source_latents: z_0 (1, c, h, w); latents: z_T, the start of every edit; trajectory: z at each denoising step's
    timestep (index i = step i, ``trajectory[0]`` is z_T) if asked; reconstruction: the reference trajectory's end
    (``reference="reconstruction"``); timesteps; source_prompt / source_embeds (1, 77, D); references:
    {step: :class:`ReferenceStep`} for the cached steps; settings: what the cache was built for (layers, patches,
    reference mode, inversion options)."""
    source_latents: Tensor
    latents: Tensor
    timesteps: Tensor
    source_prompt: Optional[str]
    source_embeds: Tensor
    references: Dict[int, ReferenceStep]
    settings: Dict[str, Any]
    trajectory: Optional[List[Tensor]] = None
    reconstruction: Optional[Tensor] = None

    def cache_bytes(self) -> int:
        return sum(r.nbytes() for r in self.references.values())


@dataclasses.dataclass
class ContrastiveEditOutput(BaseOutput):
    """images; nsfw_content_detected; losses: per step a :class:`GuidanceLosses` (detached, before that step's
    update; None where nothing was computed); inversion: the :class:`DDIMInversion` used (reuse it for other
    edits); edit_direction: (1, 77, D)."""
    images: Any
    nsfw_content_detected: Optional[List[bool]] = None
    losses: Optional[List[Optional[GuidanceLosses]]] = None
    inversion: Optional[DDIMInversion] = None
    edit_direction: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------------- pipeline
def _image_hw(image) -> Tuple[int, int]:
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            return image.height, image.width
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"image: one image at a time, got a list of {len(image)}")
        return _image_hw(image[0])
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim not in (2, 3):
            raise ValueError(f"image: a numpy image must be (H, W, C) or (1, H, W, C), got shape {image.shape}")
        return image.shape[0], image.shape[1]
    if isinstance(image, Tensor):
        if image.dim() == 4:
            if image.shape[0] != 1:
                raise ValueError(f"image: one image at a time, got a batch of shape {tuple(image.shape)}")
            image = image[0]
        if image.dim() != 3:
            raise ValueError(f"image: a tensor image must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
        return image.shape[1], image.shape[2]
    raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def _check_generator(generator):
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError(f"generator: one image is edited, pass one generator (got {len(generator)})")
        generator = generator[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _steps_set(guidance_steps, n_steps: int) -> List[int]:
    if guidance_steps is None:
        return list(range(n_steps))
    if isinstance(guidance_steps, bool):
        raise TypeError("guidance_steps must be None, an int (the first k steps) or a sequence of step indices")
    if isinstance(guidance_steps, int):
        if guidance_steps < 0:
            raise ValueError(f"guidance_steps must be >= 0, got {guidance_steps}")
        return list(range(min(guidance_steps, n_steps)))
    steps = sorted({int(s) for s in guidance_steps})
    bad = [s for s in steps if not 0 <= s < n_steps]
    if bad:
        raise ValueError(f"guidance_steps {bad} are outside [0, {n_steps}) for num_inference_steps={n_steps}")
    return steps


class ContrastiveEditPipeline(StableDiffusionPipeline):
    """pix2pix-zeroCon on Stable Diffusion (SD 1.x / 2.x components); see the module docstring.

    ``pipe(image, source_prompt="a cat", target_prompt="a dog")`` inverts, builds the edit direction and runs the
    guided edit; ``inv = pipe.invert(image, "a cat")`` then ``pipe(inversion=inv, target_prompt=...)`` reuses one
    inversion (and its cached reference) for several edits, guided or not (``guided=False``)."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # ------------------------------------------------------------------ text
    def _embed(self, prompts: Sequence[str], device) -> Tensor:
        emb, _ = self.encode_prompt(list(prompts), device, 1, False)
        return emb

    def embed_sentences(self, sentences: Sequence[str], device=None) -> Tensor:
        """Mean text embedding (1, 77, D) of a sentence set (pix2pix-zero's ``load_sentence_embeddings``)."""
        if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
            raise ValueError("sentences must be a non-empty list of non-empty strings")
        device = device or self._execution_device
        chunks = [self._embed(sentences[i:i + 64], device) for i in range(0, len(sentences), 64)]
        return torch.cat(chunks).mean(0, keepdim=True)

    @torch.no_grad()
    def edit_direction(self, source_prompt: Optional[str] = None, target_prompt: Optional[str] = None, *,
                       source_sentences: Optional[Sequence[str]] = None,
                       target_sentences: Optional[Sequence[str]] = None, source_word: Optional[str] = None,
                       target_word: Optional[str] = None, templates: Sequence[str] = TEMPLATES) -> Tensor:
        """The edit direction (1, 77, D): ``mean E(target sentences) - mean E(source sentences)``.

        The sets: ``source_sentences`` / ``target_sentences`` if given; else the :data:`TEMPLATES` filled with
        ``source_word`` / ``target_word``; else the single prompts ``source_prompt`` / ``target_prompt``."""
        if (source_sentences is None) != (target_sentences is None):
            raise ValueError("pass both source_sentences and target_sentences, or neither")
        if (source_word is None) != (target_word is None):
            raise ValueError("pass both source_word and target_word, or neither")
        if source_sentences is not None:
            src, tgt = list(source_sentences), list(target_sentences)
        elif source_word is not None:
            if not templates or not all("{}" in t for t in templates):
                raise ValueError("templates must be a non-empty list of strings with one '{}' for the word")
            src = [t.format(source_word) for t in templates]
            tgt = [t.format(target_word) for t in templates]
        else:
            if not source_prompt or not target_prompt:
                raise ValueError("the edit direction needs source and target: pass source_prompt and target_prompt, "
                                 "source_sentences and target_sentences, source_word and target_word, or "
                                 "edit_direction")
            src, tgt = [source_prompt], [target_prompt]
        return self.embed_sentences(tgt) - self.embed_sentences(src)

    # ------------------------------------------------------------------ image
    def _check_image(self, image) -> None:
        h, w = _image_hw(image)
        if h % 8 or w % 8:
            raise ValueError(f"image size {w}x{h} (width x height) must be a multiple of 8 in both sides (the VAE "
                             f"and UNet strides); resize or crop it, e.g. to {w // 8 * 8}x{h // 8 * 8}")
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"image size {w}x{h} must be a multiple of the VAE factor {self.vae_scale_factor}")

    @torch.no_grad()
    def encode_image(self, image) -> Tensor:
        """z_0 = scaling_factor * (VAE posterior mean) of one image (PIL, numpy (H, W, C) in [0, 1], or a tensor
        (C, H, W) / (1, C, H, W) in [-1, 1]); sides must be multiples of 8."""
        self._check_image(image)
        h, w = _image_hw(image)
        device = self._execution_device
        x = self.image_processor.preprocess(image, height=h, width=w).to(device=device, dtype=self.vae.dtype)
        enc = self.vae.encode(x)
        dist = enc.latent_dist if hasattr(enc, "latent_dist") else enc[0]
        z = dist.mode() if hasattr(dist, "mode") else dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def _scheduler(self, num_inference_steps: int, device):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        sched = DDIMScheduler.from_config(self.scheduler.config)   # the deterministic DDIM schedule of this model
        sched.set_timesteps(num_inference_steps, device=device)
        return sched

    def _eps(self, sched, z, t, embeds, capture=None, **unet_kw):
        out = self.unet(z, t, encoder_hidden_states=embeds, return_dict=False, **unet_kw)[0]
        return _to_eps(out, z, _alpha(sched, t).to(z.device), sched.config.prediction_type)

    # ------------------------------------------------------------------ inversion
    @torch.no_grad()
    def invert(self, image=None, source_prompt: Optional[str] = None, *, source_latents: Optional[Tensor] = None,
               source_embeds: Optional[Tensor] = None, num_inference_steps: int = 50,
               generator: Optional[torch.Generator] = None, reference: Optional[str] = "reconstruction",
               nce_layers: Optional[Sequence[str]] = None, attention_layers: Optional[Sequence[str]] = None,
               num_patches: int = 256, cache_steps=None, cache_device=None, cache_dtype=None,
               lambda_ac: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 5, num_ac_rolls: int = 5,
               fixed_point_iterations: int = 0, return_trajectory: bool = False,
               cross_attention_kwargs: Optional[dict] = None) -> DDIMInversion:
        """Deterministic DDIM inversion of ``image`` (or of ``source_latents``) with the source prompt, caching the
        reference of the guidance at ``cache_steps`` (None: every step).

        reference: "reconstruction" (pix2pix-zero: z_T denoised again with the source prompt; +1 UNet call per step),
            "inversion" (the inversion's own UNet calls at each step's timestep; no extra call) or None (no cache:
            unguided edits only).
        lambda_ac, lambda_kl, num_reg_steps, num_ac_rolls: pix2pix-zero's noise regularisation (0 to switch off;
            roll amounts drawn from ``generator``).  fixed_point_iterations: re-evaluate the noise at the new point
            k times per step (ours; lowers the inversion error).
        nce_layers, attention_layers, num_patches: what the cache holds (the edit must ask for the same);
            cache_device / cache_dtype: where the cached maps live (default: the UNet's device and dtype)."""
        device = self._execution_device
        generator = _check_generator(generator)
        if reference not in ("reconstruction", "inversion", None):
            raise ValueError(f"reference must be 'reconstruction', 'inversion' or None, got {reference!r}")
        if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
            raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
        if isinstance(fixed_point_iterations, bool) or not isinstance(fixed_point_iterations, int) \
                or fixed_point_iterations < 0:
            raise ValueError(f"fixed_point_iterations must be an int >= 0, got {fixed_point_iterations!r}")
        if source_embeds is None:
            if not isinstance(source_prompt, str) or not source_prompt.strip():
                raise ValueError("invert needs the source prompt: a caption of the image (source_prompt='a cat'); "
                                 "or pass source_embeds")
            source_embeds = self._embed([source_prompt], device)
        if source_latents is None:
            if image is None:
                raise ValueError("invert needs an image (or source_latents)")
            source_latents = self.encode_image(image)
        elif image is not None:
            raise ValueError("pass image or source_latents, not both")
        z0 = source_latents.to(device=device, dtype=self.unet.dtype)
        source_embeds = source_embeds.to(device=device, dtype=self.unet.dtype)
        nce_layers = check_feature_layers(self.unet, nce_layers)
        attention_layers = resolve_attention_layers(self.unet, attention_layers)
        sched = self._scheduler(num_inference_steps, device)
        timesteps = sched.timesteps
        n = len(timesteps)
        cached = set(_steps_set(cache_steps, n)) if reference is not None else set()
        unet_kw = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}
        capture = GuidanceCapture(self.unet, nce_layers, attention_layers)
        ref_kw = dict(num_patches=num_patches, generator=generator, cache_device=cache_device, cache_dtype=cache_dtype)
        references: Dict[int, ReferenceStep] = {}
        trajectory: List[Optional[Tensor]] = [None] * n

        def call(z, t, capture_it):
            if capture_it:
                feats, maps, out = capture.run(z, t, source_embeds, early_exit=False, return_dict=False, **unet_kw)
                eps = _to_eps(out[0], z, _alpha(sched, t).to(z.device), sched.config.prediction_type)
                return eps, (feats, maps)
            return self._eps(sched, z, t, source_embeds, **unet_kw), None

        z = z0
        with capture, self.progress_bar(total=n * (2 if reference == "reconstruction" else 1)) as bar:
            for i in reversed(range(n)):                      # ascending noise: t_{n-1} (low) ... t_0 (high)
                t = timesteps[i]
                a_t, a_prev = _alpha(sched, t), _alpha(sched, _prev_timestep(sched, t))
                want = reference == "inversion" and i in cached
                eps, got = call(z, t, want and fixed_point_iterations == 0)
                eps = regularize_noise(eps, lambda_ac=lambda_ac, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                                       num_ac_rolls=num_ac_rolls, generator=generator)
                z_new = ddim_move(z, eps, a_prev, a_t)
                for k in range(fixed_point_iterations):
                    eps, got = call(z_new, t, want and k == fixed_point_iterations - 1)
                    eps = regularize_noise(eps, lambda_ac=lambda_ac, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                                           num_ac_rolls=num_ac_rolls, generator=generator)
                    z_new = ddim_move(z, eps, a_prev, a_t)
                if want:
                    references[i] = make_reference(*got, **ref_kw)
                z = z_new
                trajectory[i] = z
                bar.update()
            z_T = z
            recon = None
            if reference == "reconstruction":
                z = z_T
                for i, t in enumerate(timesteps):
                    eps, got = call(z, t, i in cached)
                    if got is not None:
                        references[i] = make_reference(*got, **ref_kw)
                    z = ddim_move(z, eps, _alpha(sched, t), _alpha(sched, _prev_timestep(sched, t)))
                    bar.update()
                recon = z
        settings = dict(num_inference_steps=n, reference=reference, nce_layers=nce_layers,
                        attention_layers=attention_layers, num_patches=num_patches, cache_steps=sorted(cached),
                        lambda_ac=lambda_ac, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                        num_ac_rolls=num_ac_rolls, fixed_point_iterations=fixed_point_iterations)
        return DDIMInversion(source_latents=z0, latents=z_T, timesteps=timesteps, source_prompt=source_prompt,
                             source_embeds=source_embeds, references=references, settings=settings,
                             trajectory=trajectory if return_trajectory else None, reconstruction=recon)

    @torch.no_grad()
    def reconstruct(self, inversion: DDIMInversion, *, cross_attention_kwargs=None) -> Tensor:
        """z_T denoised with the source prompt and no guidance (the plain DDIM reconstruction of z_0)."""
        device = self._execution_device
        sched = self._scheduler(inversion.settings["num_inference_steps"], device)
        unet_kw = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}
        z = inversion.latents
        for t in sched.timesteps:
            eps = self._eps(sched, z, t, inversion.source_embeds, **unet_kw)
            z = ddim_move(z, eps, _alpha(sched, t), _alpha(sched, _prev_timestep(sched, t)))
        return z

    # ------------------------------------------------------------------ edit
    @torch.no_grad()
    def __call__(
        self,
        image=None,
        source_prompt: Optional[str] = None,
        target_prompt: Optional[str] = None,
        *,
        edit_direction: Optional[Tensor] = None,
        source_sentences: Optional[Sequence[str]] = None,
        target_sentences: Optional[Sequence[str]] = None,
        source_word: Optional[str] = None,
        target_word: Optional[str] = None,
        inversion: Optional[DDIMInversion] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: Optional[str] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        guided: bool = True,
        guidance_step_size: Union[float, Sequence[float]] = 0.1,
        guidance_steps=None,
        nce_weight: float = 1.0,
        attention_weight: float = 1.0,
        nce_layers: Optional[Sequence[str]] = None,
        attention_layers: Optional[Sequence[str]] = None,
        num_patches: int = 256,
        nce_temperature: float = 0.07,
        guidance_embeds: str = "edit",
        reference: str = "reconstruction",
        inversion_kwargs: Optional[dict] = None,
        record_losses: bool = False,
        early_exit: bool = True,
        backend: Optional[str] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Edit ``image`` from ``source_prompt`` towards the target (see the module docstring for the defaults).

        image, source_prompt: the image (sides multiples of 8) and its caption; or ``inversion`` from
            :meth:`invert` (then neither is needed).
        target_prompt / edit_direction / source_sentences + target_sentences / source_word + target_word: the edit
            direction (:meth:`edit_direction`); ``edit_direction`` (1, 77, D) is used as is.
        guided: False runs the same edit without the contrastive guidance (the pix2pix-zero baseline without
            cross-attention guidance).  guidance_step_size (eta; a float or one value per step), guidance_steps
            (None: all; k: the first k; or step indices), nce_weight, attention_weight, nce_layers,
            attention_layers, num_patches, nce_temperature: the guidance; backend: the PatchNCE backend.
        guidance_embeds: "edit" (the guidance call sees the edited condition) or "source".
        reference, inversion_kwargs: passed to :meth:`invert` when no ``inversion`` is given.
        record_losses: compute the losses at every step even where nothing is guided (for comparisons).
        early_exit: stop the guidance UNet call after the last module it needs (same gradient).
        generator: draws the patch ids and the regularisation rolls of the inversion.
        output_type: "pil", "np", "pt" or "latent"; callback_on_step_end(pipe, i, t, kwargs) as diffusers.
        """
        device = self._execution_device
        generator = _check_generator(generator)
        if guidance_embeds not in ("edit", "source"):
            raise ValueError(f"guidance_embeds must be 'edit' or 'source', got {guidance_embeds!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        if hasattr(callback_on_step_end, "tensor_inputs"):
            tensor_inputs = list(callback_on_step_end.tensor_inputs)
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {self._callback_tensor_inputs}")
        for name, v in (("nce_weight", nce_weight), ("attention_weight", attention_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if guided and not (nce_weight or attention_weight):
            raise ValueError("guided=True needs nce_weight > 0 or attention_weight > 0 (or pass guided=False)")
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = None
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        unet_kw = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}

        # ---- the inversion and its reference
        nce_layers = check_feature_layers(self.unet, nce_layers)
        attention_layers = resolve_attention_layers(self.unet, attention_layers)
        if inversion is None:
            if image is None:
                raise ValueError("pass the source image (image=...) and its caption (source_prompt=...), or an "
                                 "inversion from pipe.invert(...)")
            if not isinstance(source_prompt, str) or not source_prompt.strip():
                raise ValueError("source_prompt is missing: a caption of the source image (e.g. 'a cat'); no "
                                 "captioner is run")
            inversion = self.invert(image, source_prompt, num_inference_steps=num_inference_steps,
                                    generator=generator, reference=reference if (guided or record_losses) else None,
                                    nce_layers=nce_layers, attention_layers=attention_layers, num_patches=num_patches,
                                    cache_steps=None if record_losses else guidance_steps, cross_attention_kwargs=cross_attention_kwargs,
                                    **(inversion_kwargs or {}))
        else:
            if image is not None:
                raise ValueError("pass image or inversion, not both")
            s = inversion.settings
            if s["num_inference_steps"] != num_inference_steps:
                raise ValueError(f"the inversion has {s['num_inference_steps']} steps but num_inference_steps="
                                 f"{num_inference_steps}; pass num_inference_steps={s['num_inference_steps']}")
            if guided or record_losses:
                for key, val in (("nce_layers", nce_layers), ("attention_layers", attention_layers),
                                 ("num_patches", num_patches)):
                    if s[key] != val:
                        raise ValueError(f"the inversion cached {key}={s[key]!r}, the edit asks for {val!r}; invert "
                                         f"again with the same {key}")
            source_prompt = source_prompt or inversion.source_prompt
        source_embeds = inversion.source_embeds

        # ---- the edit direction and the conditions
        if edit_direction is None:
            edit_direction = self.edit_direction(source_prompt, target_prompt, source_sentences=source_sentences,
                                                 target_sentences=target_sentences, source_word=source_word,
                                                 target_word=target_word)
        edit_direction = edit_direction.to(device=device, dtype=source_embeds.dtype)
        if edit_direction.shape[-2:] != source_embeds.shape[-2:]:
            raise ValueError(f"edit_direction must have shape (1, {source_embeds.shape[1]}, {source_embeds.shape[2]}), "
                             f"got {tuple(edit_direction.shape)}")
        edit_embeds = source_embeds + edit_direction
        if negative_prompt is None:
            negative_embeds = source_embeds           # pix2pix-zero: the unedited prompt is the negative prompt
        else:
            negative_embeds = self._embed([negative_prompt], device).to(source_embeds.dtype)
        guide_embeds = edit_embeds if guidance_embeds == "edit" else source_embeds
        prompt_embeds = torch.cat([negative_embeds, edit_embeds]) if self.do_classifier_free_guidance else edit_embeds

        sched = self._scheduler(num_inference_steps, device)
        timesteps = sched.timesteps
        n = len(timesteps)
        steps = set(_steps_set(guidance_steps, n)) if guided else set()
        if isinstance(guidance_step_size, (int, float)) and not isinstance(guidance_step_size, bool):
            etas = np.full(n, float(guidance_step_size))
        else:
            etas = np.asarray(guidance_step_size, dtype=np.float64)
            if etas.shape != (n,):
                raise ValueError(f"guidance_step_size must be a float or {n} values, got shape {etas.shape}")
        look = steps | (set(range(n)) if record_losses else set())
        missing = sorted(i for i in look if i not in inversion.references)
        if missing:
            raise ValueError(f"the inversion holds no reference for steps {missing[:8]}{'...' if len(missing) > 8 else ''}"
                             f" (cached: reference={inversion.settings['reference']!r}, steps "
                             f"{inversion.settings['cache_steps'][:8]}...); invert with cache_steps covering them")

        # both losses are always computed (and recorded); a zero-weight term only leaves the total
        capture = GuidanceCapture(self.unet, nce_layers, attention_layers)
        loss_kw = dict(nce_weight=nce_weight, attention_weight=attention_weight, temperature=nce_temperature,
                       backend=backend)
        latents = inversion.latents.clone()
        losses: List[Optional[GuidanceLosses]] = []
        with capture, self.progress_bar(total=n) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                step_loss = None
                if i in steps:
                    grad, step_loss = guidance_gradient(capture, latents, t, guide_embeds, inversion.references[i],
                                                        early_exit=early_exit, unet_kwargs=unet_kw, **loss_kw)
                    latents = (latents - float(etas[i]) * grad).to(latents.dtype)
                elif record_losses:
                    feats, maps, _ = capture.run(latents, t, guide_embeds, early_exit=early_exit, **unet_kw)
                    kw = loss_kw if (nce_weight or attention_weight) else {**loss_kw, "nce_weight": 1.0}
                    step_loss = guidance_losses(feats, maps, inversion.references[i], **kw).detach()
                losses.append(step_loss)
                capture.idle()
                model_in = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                noise_pred = self._eps(sched, model_in, t, prompt_embeds, **unet_kw)
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = ddim_move(latents, noise_pred, _alpha(sched, t), _alpha(sched, _prev_timestep(sched, t)))

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_embeds}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_embeds = outputs.pop("negative_prompt_embeds", negative_embeds)
                bar.update()

        image_out, has_nsfw = self._decode(latents, output_type, generator)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image_out, has_nsfw
        return ContrastiveEditOutput(images=image_out, nsfw_content_detected=has_nsfw, losses=losses,
                                     inversion=inversion, edit_direction=edit_direction)

    def _decode(self, latents: Tensor, output_type: str, generator=None):
        if output_type == "latent":
            return latents, None
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        image = self.vae.decode(latents / self.vae.config.scaling_factor + shift, return_dict=False,
                                generator=generator)[0]
        image, has_nsfw = self.run_safety_checker(image, self._execution_device, latents.dtype)
        denorm = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), has_nsfw

    @torch.no_grad()
    def decode_latents_to(self, latents: Tensor, output_type: str = "pil"):
        """Decode latents (e.g. ``inversion.source_latents`` or ``inversion.reconstruction``) to images."""
        return self._decode(latents, output_type)[0]


# ------------------------------------------------------------------------------------------------------- CLI
def side_by_side(images: Sequence, labels: Optional[Sequence[str]] = None, *, cell: Optional[int] = None, gap: int = 4):
    """One PIL image: ``images`` (PIL / (H, W, 3) arrays in [0, 1] or uint8) in a row, optional labels on top."""
    from PIL import Image, ImageDraw

    pils = []
    for im in images:
        if not isinstance(im, Image.Image):
            a = np.asarray(im)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(a)
        pils.append(im.convert("RGB"))
    h = cell or max(p.height for p in pils)
    pils = [p if p.height == h else p.resize((max(1, round(p.width * h / p.height)), h), Image.NEAREST) for p in pils]
    top = 14 if labels else 0
    out = Image.new("RGB", (sum(p.width for p in pils) + gap * (len(pils) - 1), h + top), (255, 255, 255))
    x = 0
    draw = ImageDraw.Draw(out)
    for k, p in enumerate(pils):
        out.paste(p, (x, top))
        if labels:
            draw.text((x + 2, 1), str(labels[k]), fill=(0, 0, 0))
        x += p.width + gap
    return out


def _read_sentences(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"{path} holds no sentence (one per line)")
    return lines


def cli_main(argv=None) -> int:
    """``contrastgen edit --model PATH --image in.png --source "a cat" --target "a dog" [--steps 50] [--seed 0]
    --out out.png``: writes the guided edit to ``--out`` and a side-by-side PNG (source | unguided edit | guided
    edit) next to it (``--side-by-side`` to choose the path)."""
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="contrastgen edit", description="Zero-shot image-to-image translation with "
                                 "contrastive guidance (pix2pix-zeroCon) on local Stable Diffusion weights; nothing "
                                 "is ever downloaded")
    ap.add_argument("--model", help="local Stable Diffusion 1.x/2.x folder in diffusers format (with model_index.json)")
    ap.add_argument("--image", required=True, help="source image (PNG/JPEG); sides must be multiples of 8 unless --size")
    ap.add_argument("--source", required=True, help="source prompt: a caption of the image, e.g. 'a cat'")
    ap.add_argument("--target", default=None, help="target prompt, e.g. 'a dog' (direction: target - source)")
    ap.add_argument("--source-sentences", default=None, help="file of source sentences, one per line (with "
                    "--target-sentences: the direction is the difference of their mean embeddings)")
    ap.add_argument("--target-sentences", default=None)
    ap.add_argument("--source-word", default=None, help="with --target-word: direction from sentence templates")
    ap.add_argument("--target-word", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="resize the image to SIZE x SIZE first (pix2pix-zero: 512)")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--step-size", type=float, default=0.1, help="guidance step size eta (pix2pix-zero: 0.1)")
    ap.add_argument("--nce-weight", type=float, default=1.0)
    ap.add_argument("--attention-weight", type=float, default=1.0)
    ap.add_argument("--reference", choices=["reconstruction", "inversion"], default="reconstruction")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default="edit.png", help="the guided edit")
    ap.add_argument("--side-by-side", default=None, help="default: <out>_side.png")
    a = ap.parse_args(argv)
    if not a.model:
        ap.error("no model given: pass --model PATH, a local Stable Diffusion 1.x/2.x folder in diffusers format "
                 "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); nothing is downloaded")
    if not os.path.isfile(os.path.join(a.model, "model_index.json")):
        ap.error(f"--model {a.model!r} is not a local diffusers pipeline folder (no model_index.json there); pass the "
                 "folder of a Stable Diffusion 1.x/2.x checkpoint saved with save_pretrained (nothing is downloaded)")
    if not os.path.isfile(a.image):
        ap.error(f"--image {a.image!r}: no such file")
    if not a.source.strip():
        ap.error("--source must be a caption of the image, e.g. 'a cat'")
    if (a.source_sentences is None) != (a.target_sentences is None):
        ap.error("pass both --source-sentences and --target-sentences, or neither")
    if (a.source_word is None) != (a.target_word is None):
        ap.error("pass both --source-word and --target-word, or neither")
    if a.target is None and a.source_sentences is None and a.source_word is None:
        ap.error("no edit given: pass --target 'a dog' (or --source-sentences/--target-sentences, or "
                 "--source-word/--target-word)")
    from PIL import Image

    img = Image.open(a.image).convert("RGB")
    if a.size:
        img = img.resize((a.size, a.size), Image.LANCZOS)
    elif img.width % 8 or img.height % 8:
        ap.error(f"--image is {img.width}x{img.height}: both sides must be multiples of 8; pass --size 512 to resize")
    kw = {}
    try:
        if a.source_sentences:
            kw = dict(source_sentences=_read_sentences(a.source_sentences),
                      target_sentences=_read_sentences(a.target_sentences))
        elif a.source_word:
            kw = dict(source_word=a.source_word, target_word=a.target_word)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if a.device.startswith("cuda") else torch.float32)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    dkey = "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 37) else "torch_dtype"
    pipe = ContrastiveEditPipeline.from_pretrained(a.model, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False, **{dkey: dtype}).to(a.device)
    pipe.set_progress_bar_config(disable=False)
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    print(f"inverting {a.image} ({img.width}x{img.height}) with {a.source!r}, {a.steps} DDIM steps ...")
    inv = pipe.invert(img, a.source, num_inference_steps=a.steps, generator=gen, reference=a.reference)
    direction = pipe.edit_direction(a.source, a.target, **kw)
    common = dict(inversion=inv, edit_direction=direction, num_inference_steps=a.steps,
                  guidance_scale=a.guidance_scale)
    print("unguided edit (edit direction only) ...")
    unguided = pipe(**common, guided=False).images[0]
    print("guided edit (PatchNCE + cross-attention guidance) ...")
    guided = pipe(**common, guided=True, guidance_step_size=a.step_size, nce_weight=a.nce_weight,
                  attention_weight=a.attention_weight).images[0]
    guided.save(a.out)
    side = a.side_by_side or (os.path.splitext(a.out)[0] + "_side.png")
    side_by_side([img, unguided, guided], ["source", "unguided", "guided"]).save(side)
    print(f"wrote {a.out} and {side}")
    return 0
