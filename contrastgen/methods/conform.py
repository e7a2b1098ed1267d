"""CONFORM (Meral et al., CVPR 2024; gemlab-vt/CONFORM) on diffusers' Stable Diffusion: contrastive guidance of
the latent on the cross-attention maps of the prompt's token groups (METHODS.md section 4).

* :class:`ConformPipeline` subclasses ``StableDiffusionPipeline`` (SD 1.x / 2.x; load it with
  ``ConformPipeline.from_pretrained(local_dir)`` or ``ConformPipeline(**sd_pipe.components)``).  At each of the
  first ``max_iter_to_alter`` steps the latent takes one step ``z <- z - alpha_i grad_z L`` of the contrastive loss
  ``contrastgen.attention_nce`` over the 16 x 16 cross-attention maps of the conditional branch; at the steps in
  ``iterative_refinement_steps`` it first takes ``refinement_steps`` such steps; then the usual CFG step.  Step
  size ``alpha_i = scale_factor * sqrt(linspace(1, 0.5, steps))[i]``.  Defaults follow the official
  ``ConformPipeline.__call__`` -- including ``softmax_normalize=True`` (the official notebook passes False).
* The maps come from :class:`contrastgen.methods.attention_capture.UNetCapture`: every layer keeps
  ``scaled_dot_product_attention``, only the targeted cross-attention layers form (head-summed) probabilities,
  and the guidance forward stops after the last targeted layer (``early_exit``).  The UNet's parameters do not
  require grad during the guidance (only the latent does), so autograd keeps fewer activations.
* Same latents as the official pipeline, with fewer UNet calls: the official code also runs a guidance forward
  at every step after ``max_iter_to_alter`` and one before each refinement loop whose results it discards; this
  pipeline skips them (85 instead of 113 extra forwards at the defaults).  Prompts of a batch are guided in one
  UNet call (the loss is per prompt; the official code loops over them).
* ``token_groups=None`` groups the prompt automatically (:func:`group_tokens`: adjective / numeral runs attached to
  their noun, multi-token words kept together) and prints the groups so that they can be checked.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops.api import attention_nce
from .attention_capture import FrozenParams, UNetCapture

try:  # diffusers is an optional dependency (the ``methods`` extra)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import BaseOutput
except ImportError:  # pragma: no cover - exercised only without diffusers
    StableDiffusionPipeline = object
    BaseOutput = object

# ------------------------------------------------------------------------------------------ token groups
# Words that end a noun phrase (never part of a group): determiners, pronouns, conjunctions, prepositions,
# auxiliaries and the relation verbs of compositional prompts.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every another his her its their my your our one's
and or but nor & plus with without of on in at by for from to into onto off over under above below behind
beside besides near next between among amongst inside outside through across around against along beneath
underneath within upon toward towards like as than while where there here together top front back left right
is are was were be been being has have had do does did can could will would should may might
it they he she them him we i you who which
sits sit sitting stands stand standing holds hold holding wears wear wearing rides ride riding eats eat eating
plays play playing lies lie lying looks look looking chases chase chasing carrying carries flying flies walking
walks running runs jumping jumps swimming swims floating placed made
""".split())
_DETERMINERS = frozenset("a an the this that these those some his her its their my your our".split())
_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d|[^\sA-Za-z\d]+")


def word_token_spans(prompt: str, tokenizer) -> List[Tuple[str, List[int]]]:
    """(word, its token indices) for each word of ``prompt``; indices count the start token (the first word's
    first token is 1), as ``token_groups`` do."""
    spans, pos = [], 1
    for word in _WORD_RE.findall(prompt):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        spans.append((word, list(range(pos, pos + len(ids)))))
        pos += len(ids)
    full = tokenizer(prompt).input_ids
    if pos != len(full) - 1:   # the start and end tokens
        raise ValueError(f"could not align the words of {prompt!r} with its {len(full) - 2} tokens; pass token_groups "
                         f"explicitly (token table: {token_table(prompt, tokenizer)})")
    return spans


def token_table(prompt: str, tokenizer) -> Dict[int, str]:
    """{index: token} of the prompt, start and end tokens included (the official ``get_indices``)."""
    ids = tokenizer(prompt).input_ids
    return {i: tok for i, tok in enumerate(tokenizer.convert_ids_to_tokens(ids))}


def group_tokens(prompt: str, tokenizer) -> List[List[int]]:
    """Automatic CONFORM token groups: each maximal run of content words (adjectives and numerals attached to the
    noun they precede; multi-token words kept whole) between function words / punctuation is one group.

    ``"a green glasses and a yellow clock"`` -> ``[[2, 3], [6, 7]]`` with a word-level tokenizer.  Rule-based
    (a list of function words and the relation verbs of compositional prompts, plus: a word in -ing followed
    by a determiner is a verb); check the printed groups, and pass ``token_groups`` where the rule is wrong."""
    spans = word_token_spans(prompt, tokenizer)
    groups, run = [], []
    for k, (word, toks) in enumerate(spans):
        w = word.lower()
        nxt = spans[k + 1][0].lower() if k + 1 < len(spans) else ""
        verb_ing = w.endswith("ing") and (nxt in _DETERMINERS or nxt.isdigit())
        if not re.match(r"[a-z\d]", w) or w in FUNCTION_WORDS or verb_ing:
            if run:
                groups.append(run)
            run = []
        else:
            run = run + toks
    if run:
        groups.append(run)
    return groups


def describe_groups(prompt: str, tokenizer, token_groups) -> str:
    """``"[[2, 3], [6, 7]] = [['green', 'glasses'], ['yellow', 'clock']]"`` (the tokens of each group)."""
    table = token_table(prompt, tokenizer)
    names = [[table.get(t, "?").replace("</w>", "") for t in g] for g in token_groups]
    return f"{token_groups} = {names}"


def _per_prompt(token_groups, prompts: Optional[List[str]], batch: int, tokenizer, print_groups: bool):
    if token_groups is None:
        if prompts is None:
            raise ValueError("token_groups=None groups the prompt automatically and needs `prompt` (not prompt_embeds)")
        groups = [group_tokens(p, tokenizer) for p in prompts]
        for p, g in zip(prompts, groups):
            if not g:
                raise ValueError(f"found no content word to guide in {p!r}; pass token_groups")
            if print_groups:
                print(f"CONFORM token groups for {p!r}: {describe_groups(p, tokenizer, g)}")
        return groups
    if token_groups and token_groups[0] and isinstance(token_groups[0][0], int):
        return [token_groups] * batch
    if len(token_groups) != batch:
        raise ValueError(f"token_groups has {len(token_groups)} per-prompt lists but there are {batch} prompts")
    return list(token_groups)


# ----------------------------------------------------------------------------------------------- outputs
@dataclasses.dataclass
class ConformPipelineOutput(BaseOutput):
    """images; nsfw_content_detected; attention_maps: per step the (B, h, w, 77) maps of the conditional branch
    (of the CFG call, i.e. after that step's guidance; None unless ``return_attention_maps``); losses: per step
    the (B,) loss whose gradient was applied (None where no guidance ran); refinement_losses: {step: list of (B,)
    losses over the refinement iterations}; token_groups: the per-prompt groups used."""
    images: Any
    nsfw_content_detected: Optional[List[bool]] = None
    attention_maps: Optional[List[torch.Tensor]] = None
    losses: Optional[List[Optional[torch.Tensor]]] = None
    refinement_losses: Optional[Dict[int, List[torch.Tensor]]] = None
    token_groups: Optional[List[List[List[int]]]] = None


def _cross_attention_resolutions(unet, h: int, w: int) -> List[Tuple[int, int]]:
    cfg = unet.config
    out = []
    for k, kind in enumerate(cfg.down_block_types):
        if "CrossAttn" in kind:
            out.append((-(-h // 2 ** k), -(-w // 2 ** k)))
    return out


def default_attn_res(unet, latent_h: int, latent_w: int) -> Tuple[int, int]:
    """Official choice (16, 16) for SD 1.x/2.x at 512 px: the cross-attention layers at latent / 4; for other
    sizes the available resolution closest to latent / 4 (in log scale, ties to the larger)."""
    avail = _cross_attention_resolutions(unet, latent_h, latent_w)
    if not avail:
        raise ValueError("the UNet has no cross-attention down block; pass attn_res")
    target = latent_h / 4
    return min(avail, key=lambda r: (abs(np.log2(r[0] / target)), -r[0]))


class ConformPipeline(StableDiffusionPipeline):
    """Stable Diffusion with CONFORM guidance; see the module docstring.  ``pipe(prompt, token_groups=...)``."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def group_tokens(self, prompt: str) -> List[List[int]]:
        return group_tokens(prompt, self.tokenizer)

    def get_indices(self, prompt: str) -> Dict[int, str]:
        """The token table of ``prompt`` (the official helper's name)."""
        return token_table(prompt, self.tokenizer)

    @staticmethod
    def step_sizes(num_steps: int, scale_factor: float = 20.0) -> np.ndarray:
        return scale_factor * np.sqrt(np.linspace(1.0, 0.5, num_steps))

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        token_groups: Optional[Sequence] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_iter_to_alter: int = 25,
        refinement_steps: int = 20,
        iterative_refinement_steps: Sequence[int] = (0, 10, 20),
        scale_factor: float = 20.0,
        step_size: Optional[Union[float, Sequence[float]]] = None,
        attn_res: Optional[Tuple[int, int]] = None,
        temperature: float = 0.5,
        smoothing: Optional[str] = "conform",
        smoothing_kernel_size: int = 3,
        smoothing_sigma: float = 0.5,
        softmax_normalize: bool = True,
        softmax_normalize_attention_maps: bool = False,
        add_previous_attention_maps: bool = True,
        previous_attention_map_anchor_step: Optional[int] = None,
        loss_fn: str = "ntxent",
        return_attention_maps: bool = False,
        early_exit: bool = True,
        backend: Optional[str] = None,
        print_groups: bool = True,
    ):
        """Generate images with CONFORM guidance.  Arguments as ``StableDiffusionPipeline.__call__`` plus:

        token_groups: [[2, 3], [6, 7]] (1-based token indices counting the start token; one list shared by all
            prompts, or one per prompt); None: :func:`group_tokens` (printed unless ``print_groups=False``).
        max_iter_to_alter, refinement_steps, iterative_refinement_steps, scale_factor: the official schedule;
            ``step_size`` (a float or one value per step) overrides ``scale_factor * sqrt(linspace(1, 0.5, T))``.
        attn_res: resolution of the guided maps (default: (16, 16) for SD at 512 px, see :func:`default_attn_res`).
        temperature, smoothing ("conform", "gaussian" or None), smoothing_kernel_size, smoothing_sigma,
            softmax_normalize, softmax_normalize_attention_maps, loss_fn ("ntxent", "contrastive",
            "ntxent_contrastive"): the loss (``contrastgen.attention_nce``); backend: its backend.
        add_previous_attention_maps, previous_attention_map_anchor_step: the previous step's maps (or those of
            the anchor step) join the loss as extra positives, without gradient.
        return_attention_maps: record each step's maps (conditional half of the CFG call, no extra UNet call).
        early_exit: stop the guidance forward after the last guided layer (same gradients, less work).
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        if hasattr(callback_on_step_end, "tensor_inputs"):
            tensor_inputs = list(callback_on_step_end.tensor_inputs)
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          None, None, tensor_inputs)
        for name, v in (("max_iter_to_alter", max_iter_to_alter), ("refinement_steps", refinement_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = None
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        device = self._execution_device
        groups = _per_prompt(token_groups, prompts, batch_size, self.tokenizer, print_groups)
        groups = [g for g in groups for _ in range(num_images_per_prompt)]

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        cond_embeds = prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        n_steps = len(timesteps)
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.config.in_channels, height,
                                       width, prompt_embeds.dtype, device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        if attn_res is None:
            attn_res = default_attn_res(self.unet, latents.shape[-2], latents.shape[-1])
        if step_size is None:
            alphas = self.step_sizes(n_steps, scale_factor)
        elif isinstance(step_size, (int, float)):
            alphas = np.full(n_steps, float(step_size))
        else:
            alphas = np.asarray(step_size, dtype=np.float64)
            if alphas.shape != (n_steps,):
                raise ValueError(f"step_size must be a float or {n_steps} values, got {alphas.shape[0]}")

        refine = {int(i) for i in iterative_refinement_steps}
        guided = {i for i in range(n_steps) if i < max_iter_to_alter or i in refine}
        last_guided = max(guided) if guided else -1
        loss_kw = dict(temperature=temperature, softmax_normalize=softmax_normalize, smoothing=smoothing,
                       kernel_size=smoothing_kernel_size, sigma=smoothing_sigma,
                       softmax_normalize_attention_maps=softmax_normalize_attention_maps, loss=loss_fn,
                       backend=backend)
        capture = UNetCapture(self.unet, resolution=attn_res)
        unet_kw = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}

        def guided_loss(z, t, prev):
            z = z.detach().requires_grad_(True)
            capture.forward(z, t, cond_embeds, early_exit=early_exit, **unet_kw)
            maps = capture.maps()
            return z, maps, attention_nce(maps, groups, prev_maps=prev, **loss_kw)

        def update(z, loss, alpha):
            active = loss.detach() != 0         # the official "if loss != 0", per prompt
            if not bool(active.any()):
                return z.detach()
            (grad,) = torch.autograd.grad(loss.sum(), z)
            step = alpha * grad * active.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
            return (z - step).detach()

        if guided and early_exit:
            with capture:   # a no_grad forward counts the layers, so no guidance forward runs the whole UNet
                capture.count_layers(latents, timesteps[0], cond_embeds, **unet_kw)
        prev_maps = None
        step_losses: List[Optional[torch.Tensor]] = []
        refinement_losses: Dict[int, List[torch.Tensor]] = {}
        attention_maps: List[torch.Tensor] = []
        with capture, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                need_prev = add_previous_attention_maps and i < last_guided and (
                    previous_attention_map_anchor_step is None or i == previous_attention_map_anchor_step)
                loss = None
                if i in guided or need_prev:
                    with torch.enable_grad(), FrozenParams(self.unet):
                        if i in refine:
                            hist = []
                            for _ in range(refinement_steps):
                                z, maps, loss = guided_loss(latents, t, prev_maps)
                                hist.append(loss.detach())
                                latents = update(z, loss, float(alphas[i]))
                            refinement_losses[i] = hist
                        z, maps, loss = guided_loss(latents, t, prev_maps)
                        latents = update(z, loss, float(alphas[i])) if i < max_iter_to_alter else z.detach()
                    if need_prev:
                        prev_maps = maps.detach()
                    del maps
                step_losses.append(None if loss is None else loss.detach())

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                capture.reset(rows="cond" if self.do_classifier_free_guidance else None, enabled=return_attention_maps)
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False,
                                       **unet_kw)[0]
                if return_attention_maps:
                    attention_maps.append(capture.maps().detach().cpu())
                capture.reset(enabled=False)
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    for k in tensor_inputs:
                        callback_kwargs[k] = local[k]
                    outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw = latents, None
        denorm = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
        if output_type != "latent":
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)
        self.maybe_free_model_hooks()
        maps_out = attention_maps if return_attention_maps else None
        if not return_dict:
            return image, has_nsfw
        return ConformPipelineOutput(images=image, nsfw_content_detected=has_nsfw, attention_maps=maps_out,
                                     losses=step_losses, refinement_losses=refinement_losses, token_groups=groups)


# ------------------------------------------------------------------------------------------------ overlays
def _heat(x: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) uint8 (black-red-yellow-white ramp)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def attention_overlay(image, maps: torch.Tensor, token_groups: Sequence[Sequence[int]], *, labels=None,
                      alpha: float = 0.55, cell: int = 128):
    """One PIL image: the generated ``image`` followed by one panel per token group, the group's mean map
    (normalised to [0, 1], bilinear upsampling) blended over the image.  maps: (h, w, 77) of one prompt."""
    from PIL import Image, ImageDraw

    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    base = base.convert("RGB").resize((cell, cell), Image.BILINEAR)
    m = maps.detach().float().cpu()
    panels = [base]
    for gi, g in enumerate(token_groups):
        a = m[:, :, list(g)].mean(-1)
        a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
        a = torch.nn.functional.interpolate(a[None, None], size=(cell, cell), mode="bilinear", align_corners=False)[0, 0]
        heat = _heat(a.numpy())
        blend = (np.asarray(base, dtype=np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)
        panel = Image.fromarray(blend)
        if labels is not None:
            ImageDraw.Draw(panel).text((3, 2), str(labels[gi])[:24], fill=(255, 255, 255))
        panels.append(panel)
    out = Image.new("RGB", (cell * len(panels), cell))
    for k, p in enumerate(panels):
        out.paste(p, (k * cell, 0))
    return out


def save_attention_overlays(path, images, attention_maps: Sequence[torch.Tensor], token_groups, *, steps=None,
                            labels=None, cell: int = 128):
    """A PNG grid: one row per (step, prompt) of :func:`attention_overlay` panels.  ``attention_maps``: the
    per-step (B, h, w, 77) maps of :class:`ConformPipelineOutput`; ``steps``: which steps (default: the last)."""
    from PIL import Image

    steps = [len(attention_maps) - 1] if steps is None else list(steps)
    rows = []
    for s in steps:
        for b, img in enumerate(images):
            groups = token_groups[b] if token_groups and isinstance(token_groups[0][0], (list, tuple)) else token_groups
            rows.append(attention_overlay(img, attention_maps[s][b], groups,
                                          labels=None if labels is None else labels[b], cell=cell))
    w = max(r.width for r in rows)
    grid = Image.new("RGB", (w, cell * len(rows)))
    for k, r in enumerate(rows):
        grid.paste(r, (0, k * cell))
    grid.save(path)
    return grid


# ------------------------------------------------------------------------------------------------------ CLI
def parse_groups(text: str) -> List[List[int]]:
    """``"2,3;6,7"`` -> ``[[2, 3], [6, 7]]``."""
    try:
        groups = [[int(t) for t in g.split(",") if t.strip()] for g in text.split(";") if g.strip()]
    except ValueError:
        raise ValueError(f"--groups must look like '2,3;6,7' (token indices, ',' within a group, ';' between "
                         f"groups), got {text!r}") from None
    if not groups or not all(groups):
        raise ValueError(f"--groups must hold at least one non-empty group, got {text!r}")
    return groups


def cli_main(argv=None) -> int:
    """``contrastgen conform --model PATH --prompt "..." [--groups "2,3;6,7"] [--steps 50] [--seed 0]
    [--out out.png] [--maps maps.png]``."""
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="contrastgen conform", description="Stable Diffusion with CONFORM guidance "
                                 "(local weights only: nothing is ever downloaded)")
    ap.add_argument("--model", help="local Stable Diffusion 1.x/2.x folder in diffusers format (with model_index.json)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--groups", default=None, help="token groups, e.g. '2,3;6,7' (default: automatic, printed)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--max-iter-to-alter", type=int, default=25)
    ap.add_argument("--no-softmax-normalize", action="store_true",
                    help="softmax_normalize=False (the official notebook's setting; __call__ defaults to True)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default="conform.png")
    ap.add_argument("--maps", default=None, help="also write the attention overlays (one panel per group) here")
    a = ap.parse_args(argv)
    if not a.model:
        ap.error("no model given: pass --model PATH, a local Stable Diffusion 1.x/2.x folder in diffusers format "
                 "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); nothing is downloaded")
    if not os.path.isfile(os.path.join(a.model, "model_index.json")):
        ap.error(f"--model {a.model!r} is not a local diffusers pipeline folder (no model_index.json there); pass the "
                 "folder of a Stable Diffusion 1.x/2.x checkpoint saved with save_pretrained (nothing is downloaded)")
    try:
        groups = parse_groups(a.groups) if a.groups else None
    except ValueError as e:
        ap.error(str(e))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if a.device.startswith("cuda") else torch.float32)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    dkey = "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 37) else "torch_dtype"
    pipe = ConformPipeline.from_pretrained(a.model, local_files_only=True, safety_checker=None,
                                           requires_safety_checker=False, **{dkey: dtype}).to(a.device)
    print(f"token table: {token_table(a.prompt, pipe.tokenizer)}")
    if groups is not None:
        print(f"CONFORM token groups: {describe_groups(a.prompt, pipe.tokenizer, groups)}")
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    out = pipe(a.prompt, token_groups=groups, num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
               generator=gen, max_iter_to_alter=a.max_iter_to_alter, softmax_normalize=not a.no_softmax_normalize,
               return_attention_maps=a.maps is not None)
    out.images[0].save(a.out)
    print(f"wrote {a.out}")
    if a.maps:
        g = out.token_groups[0]
        table = token_table(a.prompt, pipe.tokenizer)
        names = ["".join(table.get(t, "?") for t in grp).replace("</w>", " ").strip() for grp in g]
        save_attention_overlays(a.maps, out.images[:1], out.attention_maps, [g], labels=[names])
        print(f"wrote {a.maps}")
    return 0
