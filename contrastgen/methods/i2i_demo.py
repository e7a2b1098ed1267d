"""``contrastgen demo i2i`` (or ``demo edit``): contrastive-guided image-to-image editing on a tiny model trained here.

No pretrained Stable Diffusion can be had offline, so the demo reuses the CONFORM demo's pieces
(:mod:`contrastgen.methods.conform_demo`): its renderer of two-shape scenes ("a red square and a blue circle"), its
tiny text-conditional UNet on pixel-unshuffled 32 x 32 images (12 x 16 x 16 latents, 16 x 16 cross-attention maps)
trained here with its training function, and its colour / shape detector.  Then, for each of ``--scenes`` drawn
scenes, it edits one attribute of one object (its colour, or its shape) with :class:`ContrastiveEditPipeline`:

1. DDIM inversion of the drawn scene with its caption (the source prompt);
2. the edit direction: mean embedding of target sentences minus that of source sentences (the edited object
   beside every other object, pix2pix-zero's sentence-set recipe in the scenes' vocabulary);
3. the same edit unguided (edit direction only) and guided (PatchNCE on the decoder features + cross-attention
   guidance), from the same inversion.

Measured per edit, guided vs unguided:

* edit success: the detector finds the target object (colour and shape) and the other object unchanged;
* structure preservation outside the edited object (the edited object's bounding box in the source scene, grown by
  2 px, is left out): mean absolute pixel difference to the source in [0, 1] RGB, and the F1 agreement of the
  Sobel edge maps (gradient magnitude > 0.25);
* the guidance losses (PatchNCE, attention) along the trajectory, against the reference.

The trained model's VAE is a lossless pixel shuffle; :func:`pixel_shuffle_autoencoder` adds the ``encode`` that the
CONFORM demo's decode-only VAE lacks (an adapter; that module is not changed).  Results (PNG grid source | unguided |
guided per scene, JSON with every number and the load) go to ``benches/results/demo_i2i/`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import conform_demo as CD
from .i2i import ContrastiveEditPipeline, side_by_side


# ------------------------------------------------------------------------------------------------- model
def _quiet(*args, **kwargs):
    pass


def pixel_shuffle_autoencoder(factor: int = 2):
    """A lossless "VAE" with ``encode`` (``pixel_unshuffle``, posterior = a point mass) and ``decode``
    (``pixel_shuffle``): the CONFORM demo's :func:`~contrastgen.methods.conform_demo.pixel_shuffle_vae` plus encode."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class _PointMass:
        def __init__(self, z):
            self.z = z

        def mode(self):
            return self.z

        def sample(self, generator=None):
            return self.z

    class _Encoded:
        def __init__(self, z):
            self.latent_dist = _PointMass(z)

    class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, factor: int = 2, block_out_channels=(3, 3), scaling_factor: float = 1.0,
                     latent_channels: int = 12):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1), persistent=False)

        def encode(self, x, return_dict=True):
            z = F.pixel_unshuffle(x, self.config.factor)
            return _Encoded(z) if return_dict else (_PointMass(z),)

        def decode(self, z, return_dict=True, generator=None):
            x = F.pixel_shuffle(z, self.config.factor)
            return (x,) if not return_dict else type("DecoderOutput", (), {"sample": x})()

    nblocks = int(round(math.log2(factor))) + 1
    return PixelShuffleAutoencoder(factor=factor, block_out_channels=(3,) * nblocks,
                                   latent_channels=3 * factor * factor)


def as_edit_pipeline(unet, text_encoder, tokenizer, factor: int = 2) -> ContrastiveEditPipeline:
    """A :class:`ContrastiveEditPipeline` around the trained model (the CONFORM demo's DDIM schedule)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(CD.ddpm_scheduler().config, set_alpha_to_one=False, steps_offset=1)
    pipe = ContrastiveEditPipeline(vae=pixel_shuffle_autoencoder(factor), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_model(train_steps: int, batch: int, width: int, seed: int, log=print, cache: Optional[str] = None):
    """(unet, text_encoder, tokenizer, seconds, loss curve): the CONFORM demo's model trained on every pairing;
    ``cache``: a .pt file to load the weights from if it exists (and the settings match), else to save them to."""
    log = log or _quiet
    tok = CD.word_tokenizer(CD.WORDS)
    unet, text = CD.build_text_to_image(tok, width=width, seed=seed)
    key = dict(train_steps=train_steps, batch=batch, width=width, seed=seed)
    if cache and Path(cache).is_file():
        state = torch.load(cache, map_location="cpu", weights_only=False)
        if state.get("key") == key:
            unet.load_state_dict(state["unet"])
            text.load_state_dict(state["text"])
            unet.eval()
            text.eval()
            log(f"loaded the trained model from {cache}")
            return unet, text, tok, state["seconds"], state["curve"]
    log(f"training the tiny text-to-image model ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M UNet "
        f"parameters) for {train_steps} steps of {batch} scenes (every pairing)")
    t0 = time.perf_counter()
    curve = CD.train_text_to_image(unet, text, tok, CD.all_pairs(), steps=train_steps, batch=batch, seed=seed,
                                   log=None if log is _quiet else log)
    seconds = time.perf_counter() - t0
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(key=key, unet=unet.state_dict(), text=text.state_dict(), seconds=seconds, curve=curve), cache)
    return unet, text, tok, seconds, curve


# ------------------------------------------------------------------------------------------------- edits
def draw_edits(n: int, seed: int = 0) -> List[dict]:
    """``n`` edit jobs: a scene (pair of objects, rendering seed), which object (0 = left, 1 = right) and what
    changes: its colour (to one no object of the scene has) or its shape; alternating colour / shape edits."""
    rng = random.Random(seed)
    pairs = CD.all_pairs()
    jobs = []
    for k in range(n):
        pair = rng.choice(pairs)
        if rng.random() < 0.5:
            pair = (pair[1], pair[0])
        which = rng.randrange(2)
        (c, s), other = pair[which], pair[1 - which]
        kind = "colour" if k % 2 == 0 else "shape"
        if kind == "colour":
            new = (rng.choice([x for x in CD.COLORS if x not in (c, other[0])]), s)
        else:
            new = (c, rng.choice([x for x in CD.SHAPES if x != s]))
        target = (new, other) if which == 0 else (other, new)
        jobs.append(dict(pair=pair, target=target, which=which, kind=kind, render_seed=rng.randrange(1 << 30)))
    return jobs


def sentence_sets(job: dict) -> Tuple[List[str], List[str]]:
    """Source / target sentences: the edited object (before / after) beside every other object the vocabulary can
    name (colours other than both versions' and the other object's), in the edited object's position."""
    which = job["which"]
    old, new = job["pair"][which], job["target"][which]
    src, tgt = [], []
    for c, s in CD.all_objects():
        if c in (old[0], new[0]):
            continue
        a, b = ((old, (c, s)), (new, (c, s))) if which == 0 else (((c, s), old), ((c, s), new))
        src.append(CD.caption(a))
        tgt.append(CD.caption(b))
    return src, tgt


def object_box_mask(pair, which: int, size: int, render_seed: int, grow: int = 2) -> np.ndarray:
    """(size, size) bool: the bounding box of object ``which`` in the rendered scene (its pixels: the objects of a
    scene have different colours), grown by ``grow`` pixels."""
    img = CD.render_scene(pair, size, random.Random(render_seed))
    color = torch.tensor(CD.COLORS[pair[which][0]])[:, None, None] * 2 - 1
    m = ((img - color).abs().amax(0) < 1e-4).numpy()
    box = np.zeros_like(m)
    if m.any():
        ys, xs = np.nonzero(m)
        box[max(0, ys.min() - grow): ys.max() + grow + 1, max(0, xs.min() - grow): xs.max() + grow + 1] = True
    return box


def _sobel_mag(img: np.ndarray) -> np.ndarray:
    g = img.mean(-1)
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float32) / 4.0
    p = np.pad(g, 1, mode="edge")
    gx = sum(kx[i, j] * p[i:i + g.shape[0], j:j + g.shape[1]] for i in range(3) for j in range(3))
    gy = sum(kx.T[i, j] * p[i:i + g.shape[0], j:j + g.shape[1]] for i in range(3) for j in range(3))
    return np.hypot(gx, gy)


def structure_scores(source: np.ndarray, edited: np.ndarray, outside: np.ndarray, edge_threshold: float = 0.25):
    """Mean |edited - source| over the ``outside`` pixels ([0, 1] RGB) and the F1 of their Sobel edge maps there."""
    mae = float(np.abs(edited - source).mean(-1)[outside].mean())
    e_src = (_sobel_mag(source) > edge_threshold) & outside
    e_out = (_sobel_mag(edited) > edge_threshold) & outside
    tp = float((e_src & e_out).sum())
    denom = float(e_src.sum() + e_out.sum())
    f1 = 1.0 if denom == 0 else 2 * tp / denom
    return {"outside_mae": mae, "outside_edge_f1": f1}


def edit_success(img: np.ndarray, job: dict) -> Dict[str, bool]:
    """target_present: the edited object is detected with the target colour and shape; other_kept: the other
    object too; success: both."""
    found = {c: s for c, s, _ in CD.detect_objects(img)}
    which = job["which"]
    (nc, ns), (oc, os_) = job["target"][which], job["target"][1 - which]
    target_present = found.get(nc) == ns
    other_kept = found.get(oc) == os_
    source_gone = job["pair"][which][0] == nc or job["pair"][which][0] not in found
    return {"target_present": target_present, "other_kept": other_kept, "success": target_present and other_kept,
            "source_colour_gone": source_gone}


def run_edits(pipe: ContrastiveEditPipeline, jobs: Sequence[dict], *, steps: int = 50, guidance_scale: float = 5.0,
              settings: Optional[Dict[str, dict]] = None, size: int = 32, fixed_point_iterations: int = 0,
              reference: str = "reconstruction", regularize: bool = False, seed: int = 0, log=print):
    """Run every job with each named setting (``{"unguided": dict(guided=False), "guided": dict(...)}``); returns
    per-setting lists of images (H, W, 3) in [0, 1] and per-job records (scores, losses, timings)."""
    settings = settings or {"unguided": dict(guided=False), "guided": dict(guided=True)}
    images = {k: [] for k in settings}
    sources, recons, records = [], [], []
    for j, job in enumerate(jobs):
        src = CD.render_scene(job["pair"], size, random.Random(job["render_seed"]))
        src01 = ((src + 1) / 2).clamp(0, 1)
        gen = torch.Generator().manual_seed(seed + j)
        t0 = time.perf_counter()
        inv = pipe.invert(src01[None], CD.caption(job["pair"]), num_inference_steps=steps, generator=gen,
                          reference=reference, fixed_point_iterations=fixed_point_iterations,
                          **({} if regularize else dict(lambda_ac=0.0, lambda_kl=0.0)))
        t_inv = time.perf_counter() - t0
        s_sent, t_sent = sentence_sets(job)
        direction = pipe.edit_direction(source_sentences=s_sent, target_sentences=t_sent)
        source_np = src01.permute(1, 2, 0).numpy()
        rec = pipe.decode_latents_to(inv.reconstruction, "np")[0] if inv.reconstruction is not None else None
        outside = ~object_box_mask(job["pair"], job["which"], size, job["render_seed"])
        rec_rec = {"inversion_s": t_inv, "cache_MiB": inv.cache_bytes() / 2**20}
        if rec is not None:
            rec_rec["reconstruction_mae"] = float(np.abs(rec - source_np).mean())
            recons.append(rec)
        for name, kw in settings.items():
            t0 = time.perf_counter()
            out = pipe(inversion=inv, edit_direction=direction, num_inference_steps=steps,
                       guidance_scale=guidance_scale, output_type="np", record_losses=True, **kw)
            wall = time.perf_counter() - t0
            img = out.images[0]
            images[name].append(img)
            ls = [l for l in out.losses[1:] if l is not None]
            rec_rec[name] = dict(seconds=wall, **structure_scores(source_np, img, outside), **edit_success(img, job),
                                 patch_nce=float(np.mean([l.patch_nce.mean().item() for l in ls])),
                                 attention=float(np.mean([l.attention.sum().item() for l in ls])))
        sources.append(source_np)
        records.append(dict(source=CD.caption(job["pair"]), target=CD.caption(job["target"]), kind=job["kind"],
                            which=job["which"], **rec_rec))
        if log:
            msg = ", ".join(f"{k}: ok={rec_rec[k]['success']} mae={rec_rec[k]['outside_mae']:.3f}" for k in settings)
            log(f"  [{j + 1}/{len(jobs)}] {records[-1]['source']!r} -> {records[-1]['target']!r}: {msg}")
    return sources, recons, images, records


def summarize(records: Sequence[dict], names: Sequence[str]) -> Dict[str, dict]:
    out = {}
    for k in names:
        rs = [r[k] for r in records]
        out[k] = {m: float(np.mean([r[m] for r in rs])) for m in
                  ("success", "target_present", "other_kept", "outside_mae", "outside_edge_f1", "patch_nce",
                   "attention", "seconds")}
        for kind in ("colour", "shape"):
            sub = [r[k] for r in records if r["kind"] == kind]
            if sub:
                out[k][f"success_{kind}"] = float(np.mean([r["success"] for r in sub]))
                out[k][f"outside_mae_{kind}"] = float(np.mean([r["outside_mae"] for r in sub]))
    return out


def run(out_dir, *, train_steps: int = 1200, batch: int = 32, width: int = 32, scenes: int = 12, steps: int = 50,
        guidance_scale: float = 10.0, step_size: float = 0.1, nce_weight: float = 1.0, attention_weight: float = 1.0,
        strong_step_size: Optional[float] = 1.0, fixed_point_iterations: int = 0, seed: int = 0,
        model_cache: Optional[str] = None, log=print) -> dict:
    """Train (or load), edit, score, write the grid PNG and results.json; returns the JSON dict.

    Settings: ``unguided`` (edit direction only); ``guided`` (PatchNCE + attention at ``step_size``, the pipeline
    default 0.1); with ``strong_step_size``: ``attention_only`` (pix2pix-zero's cross-attention guidance alone) and
    ``guided_strong`` (PatchNCE + attention), both at that step size, which isolates the contrastive term."""
    log = log or _quiet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = CD._load()
    unet, text, tok, train_s, curve = train_model(train_steps, batch, width, seed, log=log, cache=model_cache)
    pipe = as_edit_pipeline(unet, text, tok)
    jobs = draw_edits(scenes, seed)
    guide = dict(guided=True, nce_weight=nce_weight, attention_weight=attention_weight)
    settings = {"unguided": dict(guided=False), "guided": dict(guide, guidance_step_size=step_size)}
    if strong_step_size:
        settings["attention_only"] = dict(guide, nce_weight=0.0, guidance_step_size=strong_step_size)
        settings["guided_strong"] = dict(guide, guidance_step_size=strong_step_size)
    log(f"editing {len(jobs)} scenes ({', '.join(settings)}), {steps} DDIM steps ...")
    sources, recons, images, records = run_edits(pipe, jobs, steps=steps, guidance_scale=guidance_scale,
                                                 settings=settings, fixed_point_iterations=fixed_point_iterations,
                                                 seed=seed, log=log)
    rows = []
    for j in range(len(jobs)):
        rows.append([sources[j]] + ([recons[j]] if recons else []) + [images[k][j] for k in settings])
    CD._grid(rows).save(out_dir / "grid_source_recon_unguided_guided.png")
    header = ["source"] + (["reconstruction"] if recons else []) + list(settings)
    side_by_side([sources[0]] + [images[k][0] for k in settings], ["source"] + list(settings), cell=128).save(
        out_dir / "example_side_by_side.png")
    summary = {
        "demo": "i2i", "commit": CD._git_commit(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": CD._load(),
        "config": dict(train_steps=train_steps, batch=batch, width=width, scenes=scenes, steps=steps,
                       guidance_scale=guidance_scale, step_size=step_size, strong_step_size=strong_step_size,
                       nce_weight=nce_weight, attention_weight=attention_weight,
                       fixed_point_iterations=fixed_point_iterations, seed=seed, image_size=32,
                       grid_columns=header, outside_region="edited object's source bounding box + 2 px, excluded",
                       edge_threshold=0.25),
        "train": dict(seconds=round(train_s, 1), loss_first_50=float(np.mean(curve[:50])),
                      loss_last_50=float(np.mean(curve[-50:]))),
        "reconstruction_mae": float(np.mean([r["reconstruction_mae"] for r in records])) if recons else None,
        "rates": summarize(records, list(settings)),
        "edits": records,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "files": ["grid_source_recon_unguided_guided.png", "example_side_by_side.png"],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps({k: summary[k] for k in ("rates", "reconstruction_mae", "train", "total_seconds")}, indent=2))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="contrastgen demo i2i", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benches" / "results" / "demo_i2i"))
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (pix2pix-zero: 50)")
    ap.add_argument("--guidance-scale", type=float, default=10.0,
                    help="CFG scale (pix2pix-zero: 5; on this tiny model 5 leaves the edits undone: measured)")
    ap.add_argument("--step-size", type=float, default=0.1, help="guidance step size (pix2pix-zero: 0.1)")
    ap.add_argument("--strong-step-size", type=float, default=1.0,
                    help="also run attention-only and PatchNCE + attention guidance at this step size (0: skip)")
    ap.add_argument("--nce-weight", type=float, default=1.0)
    ap.add_argument("--attention-weight", type=float, default=1.0)
    ap.add_argument("--fixed-point-iterations", type=int, default=0)
    ap.add_argument("--model-cache", default=None, help="a .pt file: load the trained model from it, or save it there")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.out, train_steps=a.train_steps, batch=a.batch, width=a.width, scenes=a.scenes, steps=a.steps,
        guidance_scale=a.guidance_scale, step_size=a.step_size, nce_weight=a.nce_weight,
        attention_weight=a.attention_weight, strong_step_size=a.strong_step_size,
        fixed_point_iterations=a.fixed_point_iterations, seed=a.seed, model_cache=a.model_cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
