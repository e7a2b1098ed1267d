"""``contrastgen demo conform``: CONFORM on a tiny text-to-image model trained here, on CPU, in minutes.

No pretrained Stable Diffusion can be had offline, so the demo trains one (on pixel-unshuffled scenes: a lossless
"VAE" turns 3 x 32 x 32 images into 12 x 16 x 16 latents, so the cross-attention maps are 16 x 16 as in SD):

1. :func:`render_scene` draws 32 x 32 RGB scenes of two coloured shapes (square / circle / triangle, in red,
   green, blue, yellow) with captions "a red square and a blue circle" (:func:`sample_scene_specs`).
2. :func:`build_text_to_image` builds a small diffusers ``UNet2DConditionModel`` with cross-attention and a
   2-layer ``CLIPTextModel`` from config, with a word-level tokenizer made in memory (:func:`word_tokenizer`);
   :func:`train_text_to_image` trains both with the v-prediction loss (linear DDPM schedule) on freshly drawn
   scenes, holding out some (colour, shape) pairings for evaluation.  (An epsilon-prediction model of this size
   samples saturated noise from pure noise: see :func:`train_text_to_image`.)
3. :func:`as_pipeline` wraps the trained model into a :class:`~contrastgen.methods.conform.ConformPipeline`
   (with :func:`pixel_shuffle_vae`), which generates held-out prompts with and without CONFORM.
4. :func:`detect_objects` scores each image with a detector on the rendered shapes: per colour, the pixels close
   to that colour; the shape of each blob from its fill ratio of the bounding box.  Object presence: both
   prompted colours present; binding: both present with the prompted shape each.

Every piece is a function so other demos can reuse the model, renderer and detector (the contrastive
image-to-image editing demo edits an attribute of a drawn scene with the same tiny trained model).
Results (PNG grids, attention overlays, JSON with the measured rates and times) go to
``benches/results/demo_conform/`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.95), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
WORDS = ("a", "and") + tuple(COLORS) + SHAPES
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------------------------- tokenizers
def _bpe_segment(word: str, ranks: Dict[Tuple[str, str], int]) -> List[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, k = min(pairs)
        if r == 1 << 30:
            break
        parts = parts[:k] + [parts[k] + parts[k + 1]] + parts[k + 2:]
    return parts


def word_tokenizer(words: Sequence[str], model_max_length: int = 77):
    """An in-memory ``CLIPTokenizer`` for which each of ``words`` is a single token (any other text falls back to
    characters): byte-level characters, their ``</w>`` forms, and BPE merges that build every word."""
    from transformers import CLIPTokenizer

    vocab: Dict[str, int] = {}

    def add(t):
        vocab.setdefault(t, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for c in [chr(i) for i in range(33, 127)]:
        add(c)
        add(c + "</w>")
    merges: List[Tuple[str, str]] = []
    ranks: Dict[Tuple[str, str], int] = {}
    for w in words:
        while True:
            parts = _bpe_segment(w, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])       # lowest priority: applies after every earlier merge
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
        add(parts[0])
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def byte_level_tokenizer(model_max_length: int = 77):
    """The PLATFORM.md tokenizer: every printable character is one token (multi-token words everywhere)."""
    return word_tokenizer((), model_max_length)


# ---------------------------------------------------------------------------------- tiny Stable Diffusion
def tiny_stable_diffusion(seed: int = 0, tokenizer=None, pipeline_class=None):
    """The tiny offline Stable Diffusion of PLATFORM.md with random weights (UNet block_out_channels (32, 64),
    cross_attention_dim 32, sample_size 16 -> 32 x 32 images, cross-attention at 8 x 8; a 2-layer CLIPTextModel;
    a small AutoencoderKL; DDIMScheduler; no safety checker).  For tests of the pipeline mechanics."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .conform import ConformPipeline

    tokenizer = tokenizer or byte_level_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    cls = pipeline_class or ConformPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------- scenes
def all_objects() -> List[Tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def all_pairs() -> List[Tuple[Tuple[str, str], Tuple[str, str]]]:
    """Unordered pairs of objects with different colours (the first object is drawn on the left)."""
    objs = all_objects()
    return [(a, b) for i, a in enumerate(objs) for b in objs[i + 1:] if a[0] != b[0]]


def split_pairs(seed: int = 0, held_out_fraction: float = 0.25):
    """(train pairs, held-out pairs): held-out pairings of objects never appear together in training."""
    pairs = all_pairs()
    rng = random.Random(seed)
    rng.shuffle(pairs)
    k = max(1, int(round(len(pairs) * held_out_fraction)))
    return sorted(pairs[k:]), sorted(pairs[:k])


def caption(pair) -> str:
    (c1, s1), (c2, s2) = pair
    return f"a {c1} {s1} and a {c2} {s2}"


def render_scene(pair, size: int = 32, rng: Optional[random.Random] = None) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: black background, the first object in the left half, the second in the right
    half (random size and position within its half when ``rng`` is given)."""
    rng = rng or random.Random(0)
    img = torch.zeros(3, size, size)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    half = size / 2
    for k, (color, shape) in enumerate(pair):
        r = rng.uniform(0.22, 0.30) * size if rng is not None else 0.26 * size
        cx = half * k + half / 2 + rng.uniform(-0.06, 0.06) * size
        cy = size / 2 + rng.uniform(-0.2, 0.2) * size
        if shape == "square":
            m = ((xx - cx).abs() <= r * 0.8) & ((yy - cy).abs() <= r * 0.8)
        elif shape == "circle":
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:   # upward triangle: apex at the top
            top, bottom = cy - r, cy + r * 0.8
            t = ((yy - top) / (bottom - top)).clamp(0, 1)
            m = (yy >= top) & (yy <= bottom) & ((xx - cx).abs() <= t * r)
        col = torch.tensor(COLORS[color])[:, None, None]
        img = torch.where(m[None], col, img)
    return img * 2 - 1


def draw_batch(pairs, batch: int, rng: random.Random, size: int = 32):
    """(images (batch, 3, size, size), captions) of random training pairs (either object order)."""
    imgs, caps = [], []
    for _ in range(batch):
        pair = rng.choice(pairs)
        if rng.random() < 0.5:
            pair = (pair[1], pair[0])
        imgs.append(render_scene(pair, size, rng))
        caps.append(caption(pair))
    return torch.stack(imgs), caps


# ------------------------------------------------------------------------------------------------ model
def build_text_to_image(tokenizer, size: int = 32, seed: int = 0, width: int = 32, factor: int = 2):
    """(unet, text_encoder): a ``UNet2DConditionModel`` on the pixel-unshuffled scenes (a lossless "VAE",
    :func:`pixel_shuffle_vae`: 3 x 32 x 32 -> 12 x 16 x 16 latents), block_out_channels (w, 2w), cross-attention in
    the first down block and the last up block at the latent resolution (16 x 16 maps, as SD's at 512 px), and a
    2-layer ``CLIPTextModel``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    ch = 3 * factor * factor
    unet = UNet2DConditionModel(
        sample_size=size // factor, in_channels=ch, out_channels=ch, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77))
    return unet, text


def ddpm_scheduler(prediction_type: str = "epsilon"):
    """The training noise schedule (linear betas 1e-4..0.02 over 1000 steps, as pixel-space DDPMs).  The CONFORM
    demo trains with ``prediction_type="v_prediction"``; see :func:`train_text_to_image` for why."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=False, prediction_type=prediction_type)


def encode(text_encoder, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_text_to_image(unet, text_encoder, tokenizer, pairs, *, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
                        size: int = 32, seed: int = 0, p_uncond: float = 0.1, factor: int = 2, log=print,
                        prediction_type: str = "epsilon", progress: bool = False):
    """Diffusion training of ``unet`` and ``text_encoder`` on freshly drawn scenes of ``pairs`` (target: the noise
    for ``prediction_type="epsilon"``, the velocity sqrt(a) eps - sqrt(1 - a) x0 for ``"v_prediction"``); captions
    are dropped (empty prompt) with probability ``p_uncond`` for classifier-free guidance.  Returns the loss curve.
    ``progress``: a tqdm bar over the steps (stderr).

    Why the CONFORM demo uses ``"v_prediction"``: with this schedule sqrt(alpha_bar) is 0.0064 at t = 999 (0.0095 at
    the first DDIM step, t = 981), and sampling from pure noise reads the clean image off the model as
    x0 = (x_t - sqrt(1 - a) eps) / sqrt(a): an epsilon model must be accurate to ~1e-3 there.  The tiny model trained
    for minutes is not (its eps error at t = 999 is ~0.16 RMS, i.e. an x0 error of ~25), so its samples from noise
    were saturated noise, while DDIM-inverted latents (the i2i demo) stayed fine.  A v model predicts ~ -x0 at high
    noise, so its errors stay bounded.  (Inversion-based demos keep ``"epsilon"``.)"""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    sched = ddpm_scheduler(prediction_type)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    lr_at = lambda k: lr * min(1.0, (k + 1) / warm) * (0.5 * (1 + math.cos(math.pi * k / steps)))  # noqa: E731
    unet.train()
    text_encoder.train()
    curve = []
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="training", unit="step", mininterval=2.0)
    for k in range(steps):
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(k)
        x0, caps = draw_batch(pairs, batch, rng, size)
        x0 = F.pixel_unshuffle(x0, factor)
        caps = ["" if rng.random() < p_uncond else c for c in caps]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=encode(text_encoder, tokenizer, caps)).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        if bar is not None:
            bar.update()
            if k % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(curve[-50:]):.4f}", refresh=False)
        if log and (k % max(1, steps // 10) == 0 or k == steps - 1):
            log(f"  train step {k:5d}/{steps}  loss {np.mean(curve[-50:]):.4f}  ({time.time() - t0:.0f} s)")
    if bar is not None:
        bar.close()
    unet.eval()
    text_encoder.eval()
    return curve


def pixel_shuffle_vae(factor: int = 2):
    """A lossless "VAE" for diffusers pipelines: encode = ``pixel_unshuffle`` (3 x H x W -> 3 f^2 x H/f x W/f),
    decode = ``pixel_shuffle``; vae_scale_factor = f, scaling_factor 1."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class PixelShuffleVAE(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, factor: int = 2, block_out_channels=(3, 3), scaling_factor: float = 1.0,
                     latent_channels: int = 12):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1), persistent=False)

        def encode_pixels(self, x):
            return F.pixel_unshuffle(x, self.config.factor)

        def decode(self, z, return_dict=True, generator=None):
            x = F.pixel_shuffle(z, self.config.factor)
            return (x,) if not return_dict else type("DecoderOutput", (), {"sample": x})()

    nblocks = int(round(math.log2(factor))) + 1
    return PixelShuffleVAE(factor=factor, block_out_channels=(3,) * nblocks, latent_channels=3 * factor * factor)


def sampling_scheduler(prediction_type: str = "v_prediction", clip_sample: bool = False):
    """DDIM on the training schedule (:func:`ddpm_scheduler`) with the same ``prediction_type``; ``clip_sample``
    clips the predicted x0 to the pixel range [-1, 1].  (diffusers' ``StableDiffusionPipeline.__init__`` resets
    ``clip_sample=True`` to False with a deprecation warning, so the demo's pipeline samples without clipping: the
    earlier "clip_sample=True" of this demo never took effect.)"""
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(ddpm_scheduler(prediction_type).config, set_alpha_to_one=False, steps_offset=1,
                                     clip_sample=clip_sample)


def as_pipeline(unet, text_encoder, tokenizer, factor: int = 2, prediction_type: str = "v_prediction"):
    """A :class:`~contrastgen.methods.conform.ConformPipeline` around the trained model (DDIM sampling; pass the
    ``prediction_type`` the model was trained with)."""
    from .conform import ConformPipeline

    sched = sampling_scheduler(prediction_type, clip_sample=False)
    pipe = ConformPipeline(vae=pixel_shuffle_vae(factor), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                           scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------- detector
def detect_objects(img, min_area: int = 10, max_dist: float = 0.45) -> List[Tuple[str, str, int]]:
    """(colour, shape, area) of each colour blob in ``img`` (H, W, 3) in [0, 1] (numpy) or [-1, 1] (tensor):
    each pixel takes the nearest of black and the four colours (if within ``max_dist``); the largest connected
    blob of each colour with at least ``min_area`` pixels is an object, its shape from the fill ratio of its
    bounding box (square ~1, circle ~pi/4, triangle ~1/2)."""
    from scipy import ndimage

    if isinstance(img, torch.Tensor):
        img = ((img.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    img = np.asarray(img, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    palette = np.array([(0.0, 0.0, 0.0)] + [COLORS[c] for c in COLORS], dtype=np.float32)
    d = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > max_dist] = 0
    found = []
    for ci, color in enumerate(COLORS, start=1):
        comp, n = ndimage.label(lab == ci)
        if n == 0:
            continue
        areas = ndimage.sum(np.ones_like(comp), comp, index=range(1, n + 1))
        k = int(np.argmax(areas)) + 1
        area = int(areas[k - 1])
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp == k)
        fill = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.88 else ("circle" if fill > 0.64 else "triangle")
        found.append((color, shape, area))
    return found


def score(img, pair) -> Dict[str, bool]:
    """presence: both prompted colours found; binding: both found with the prompted shape each."""
    found = {c: s for c, s, _ in detect_objects(img)}
    present = [c in found for c, _ in pair]
    bound = [found.get(c) == s for c, s in pair]
    return {"presence": all(present), "binding": all(bound), "objects_present": sum(present),
            "objects_bound": sum(bound)}


def detector_accuracy(pairs, n: int = 200, seed: int = 1, size: int = 32) -> Dict[str, float]:
    """The detector on rendered scenes (ground truth): the ceiling of the generation scores."""
    rng = random.Random(seed)
    res = [score(render_scene(p, size, rng), p) for p in (rng.choice(pairs) for _ in range(n))]
    return {"presence": float(np.mean([r["presence"] for r in res])), "binding": float(np.mean([r["binding"] for r in res]))}


# ------------------------------------------------------------------------------------------- generation
def generate(pipe, pairs, *, guided: bool, seeds: Sequence[int], steps: int = 50, batch: int = 16,
             guidance_scale: float = 5.0, conform_kwargs: Optional[dict] = None, maps: bool = False,
             progress: bool = False, desc: str = ""):
    """Images (n, H, W, 3) in [0, 1] for every (pair, seed), the per-step attention maps of the last chunk
    (if ``maps``), and the wall time.  ``guided=False`` runs the same pipeline with no CONFORM step."""
    jobs = [(p, s) for p in pairs for s in seeds]
    kw = dict(conform_kwargs or {})
    if not guided:
        kw.update(max_iter_to_alter=0, iterative_refinement_steps=())
    images, all_maps = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=desc or ("conform" if guided else "unguided"), unit="img")
    t0 = time.perf_counter()
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([caption(p) for p, _ in chunk], token_groups=[[2, 3], [6, 7]], num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gens, output_type="np", return_attention_maps=maps,
                   print_groups=False, **kw)
        images.append(out.images)
        if maps:
            all_maps.append(torch.stack(out.attention_maps, 1))   # (b, steps, h, w, 77)
        if bar is not None:
            bar.update(len(chunk))
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return np.concatenate(images), (torch.cat(all_maps) if maps else None), wall


def _grid(rows: List[List[np.ndarray]], scale: int = 4):
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w * scale + (cols - 1) * 2, len(rows) * h * scale + (len(rows) - 1) * 2),
                     (255, 255, 255))
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            pil = Image.fromarray((np.clip(im, 0, 1) * 255).astype(np.uint8)).resize((w * scale, h * scale),
                                                                                       Image.NEAREST)
            grid.paste(pil, (j * (w * scale + 2), i * (h * scale + 2)))
    return grid


def _load() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def run(out_dir, *, train_steps: int = 1200, batch: int = 16, width: int = 32, seeds: int = 2,
        n_prompts: Optional[int] = None, steps: int = 50, gen_batch: int = 16, guidance_scale: float = 5.0,
        scale_factor: float = 20.0, softmax_normalize: bool = True, seed: int = 0, checkpoint=None,
        prediction_type: str = "v_prediction", progress: bool = True, log=print) -> dict:
    """Train, generate held-out prompts with and without CONFORM, score, write PNGs and JSON; returns the JSON."""
    from .conform import save_attention_overlays

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = _load()
    tok = word_tokenizer(WORDS)
    train_pairs, held_out = split_pairs(seed)
    if n_prompts is not None:
        held_out = held_out[:n_prompts]
    det = detector_accuracy(train_pairs + held_out)
    log(f"detector on rendered scenes: presence {det['presence']:.3f}, binding {det['binding']:.3f}")
    unet, text = build_text_to_image(tok, width=width, seed=seed)
    log(f"training the tiny text-to-image model ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M UNet "
        f"parameters) for {train_steps} steps of {batch} scenes ({len(train_pairs)} training pairings, "
        f"{len(held_out)} held out)")
    t0 = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint else None
    trained = dict(train_steps=train_steps, batch=batch, width=width, seed=seed, prediction_type=prediction_type)
    loaded = False
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        got = {k: state.get(k, "epsilon" if k == "prediction_type" else None) for k in trained}
        if got["width"] != width or got["prediction_type"] != prediction_type:
            raise ValueError(f"checkpoint {ckpt} was trained with width={got['width']}, prediction_type="
                             f"{got['prediction_type']!r}; this run asks for width={width}, prediction_type="
                             f"{prediction_type!r} (pass matching --width/--prediction-type or another --checkpoint)")
        trained = got
        loaded = True
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        curve, train_s = state["curve"], state["train_seconds"]
        unet.eval()
        text.eval()
        log(f"loaded the trained model from {ckpt} ({trained}; trained in {train_s:.0f} s)")
    else:
        curve = train_text_to_image(unet, text, tok, train_pairs, steps=train_steps, batch=batch, seed=seed,
                                    log=None if progress else log, prediction_type=prediction_type, progress=progress)
        train_s = time.perf_counter() - t0
        log(f"trained in {train_s:.0f} s, loss {np.mean(curve[:50]):.4f} (first 50 steps) -> "
            f"{np.mean(curve[-50:]):.4f} (last 50)")
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "curve": curve, "train_seconds": train_s,
                        "load_avg": _load(), **trained}, ckpt)
            log(f"saved the trained model to {ckpt}")
    pipe = as_pipeline(unet, text, tok, prediction_type=prediction_type)
    kw = dict(scale_factor=scale_factor, softmax_normalize=softmax_normalize)
    seed_list = list(range(1000, 1000 + seeds))
    results = {}
    for name, guided in (("unguided", False), ("conform", True)):
        log(f"generating {len(held_out)} held-out prompts x {seeds} seeds, {name} ...")
        imgs, maps, wall = generate(pipe, held_out, guided=guided, seeds=seed_list, steps=steps, batch=gen_batch,
                                    guidance_scale=guidance_scale, conform_kwargs=kw, maps=True, progress=progress,
                                    desc=name)
        scores = [score(im, p) for im, (p, _) in zip(imgs, [(p, s) for p in held_out for s in seed_list])]
        results[name] = dict(images=imgs, maps=maps, wall_s=wall, scores=scores)
        log(f"  {name}: presence {np.mean([s['presence'] for s in scores]):.3f}, binding "
            f"{np.mean([s['binding'] for s in scores]):.3f}, {wall / len(imgs):.2f} s per image")
    # PNGs: one row per prompt: unguided seeds | conform seeds
    rows = []
    for i in range(len(held_out)):
        sl = slice(i * seeds, (i + 1) * seeds)
        rows.append(list(results["unguided"]["images"][sl]) + list(results["conform"]["images"][sl]))
    _grid(rows).save(out_dir / "grid_unguided_vs_conform.png")
    n_show = min(4, len(held_out))
    labels = [[f"{c} {s}" for c, s in p] for p in held_out[:n_show]]
    for name in ("unguided", "conform"):
        r = results[name]
        idx = [i * seeds for i in range(n_show)]
        from PIL import Image
        pil = [Image.fromarray((np.clip(r["images"][j], 0, 1) * 255).astype(np.uint8)) for j in idx]
        step_maps = [r["maps"][idx, s] for s in range(r["maps"].shape[1])]
        save_attention_overlays(out_dir / f"attention_{name}.png", pil, step_maps, [[2, 3], [6, 7]],
                                steps=[min(10, steps - 1), steps - 1], labels=labels, cell=96)

    def rate(name, key):
        return float(np.mean([s[key] for s in results[name]["scores"]]))

    summary = {
        "demo": "conform", "commit": _git_commit(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": _load(),
        "config": dict(train_steps=trained["train_steps"], batch=trained["batch"], width=width, seeds=seeds, steps=steps,
                       prediction_type=prediction_type, sampler="DDIM, leading spacing, steps_offset 1, no x0 clipping",
                       guidance_scale=guidance_scale, scale_factor=scale_factor, softmax_normalize=softmax_normalize,
                       n_prompts=len(held_out), image_size=32, map_resolution=[16, 16], seed=seed),
        "held_out_prompts": [caption(p) for p in held_out],
        "detector_on_rendered_scenes": det,
        "train": dict(seconds=round(train_s, 1), loaded_from_checkpoint=loaded, loss_first_50=float(np.mean(curve[:50])),
                      loss_last_50=float(np.mean(curve[-50:]))),
        "rates": {name: {"presence": rate(name, "presence"), "binding": rate(name, "binding"),
                         "objects_present": float(np.mean([s["objects_present"] for s in results[name]["scores"]])) / 2,
                         "objects_bound": float(np.mean([s["objects_bound"] for s in results[name]["scores"]])) / 2}
                  for name in results},
        "seconds_per_image": {name: results[name]["wall_s"] / len(results[name]["images"]) for name in results},
        "conform_over_unguided_time": results["conform"]["wall_s"] / max(1e-9, results["unguided"]["wall_s"]),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "files": ["grid_unguided_vs_conform.png", "attention_unguided.png", "attention_conform.png"],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps({k: summary[k] for k in ("rates", "seconds_per_image", "train", "total_seconds")}, indent=2))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="contrastgen demo conform", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benches" / "results" / "demo_conform"))
    ap.add_argument("--train-steps", type=int, default=1200,
                    help="training steps (default 1200: ~9 min at 1 thread at load 6-9, ~0.25-0.45 s a step)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=2, help="images per held-out prompt and setting")
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N held-out prompts")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (the official schedule assumes 50)")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--scale-factor", type=float, default=20.0, help="CONFORM step size scale (official: 20)")
    ap.add_argument("--no-softmax-normalize", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prediction-type", default="v_prediction", choices=PREDICTION_TYPES,
                    help="training target (epsilon samples saturated noise from pure noise at this training size)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--checkpoint", default=None, help="load the trained model from here if it exists, else train "
                    "and save it here (to rerun the generation without retraining)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.out, train_steps=a.train_steps, batch=a.batch, width=a.width, seeds=a.seeds, n_prompts=a.prompts,
        steps=a.steps, gen_batch=a.gen_batch, guidance_scale=a.guidance_scale, scale_factor=a.scale_factor,
        softmax_normalize=not a.no_softmax_normalize, seed=a.seed, checkpoint=a.checkpoint,
        prediction_type=a.prediction_type, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
