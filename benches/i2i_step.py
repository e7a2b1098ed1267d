"""Benchmark of one guided step of :class:`contrastgen.methods.i2i.ContrastiveEditPipeline` (pix2pix-zeroCon):
UNet forward with capture + PatchNCE over the decoder layers + cross-attention loss + backward to the latent.

* ``fused``: :class:`~contrastgen.methods.i2i.GuidanceCapture` (hooks only: every attention layer keeps
  ``scaled_dot_product_attention``, per-head cross-attention probabilities recomputed from the hooked Q/K of the
  guided layers, early exit after the last module needed) + all PatchNCE layers in one fused
  :func:`contrastgen.patch_nce` call;
* ``baseline``: :class:`~contrastgen.methods.i2i.MaterializingCapture` (pix2pix-zero's processor on every
  attention layer: probabilities materialised and kept for the backward) + the PatchNCE reference
  (:func:`contrastgen.reference.patch_nce_ref`) layer by layer.

Both compute the same loss (defaults: every cross-attention layer, every up block's output, 256 patches, tau 0.07);
the gradient agreement is recorded.  The UNet is built from config with random weights (nothing is downloaded):
``--config sd15`` is Stable Diffusion 1.5's UNet (64 x 64 latents, 512 px images; for the GPU), ``--config reduced``
the same topology at reduced width (channels (32, 64, 128, 128), 8 heads, 32 x 32 latents; for the CPU).

Time: median of repeated steps (``contrastgen.bench.harness.time_fn``; CUDA events on GPU); memory: peak above what was
allocated before the step (``contrastgen.bench.harness.measure_memory``: ``max_memory_allocated`` on CUDA, the profiler's CPU
allocator peak on CPU).  The load average is recorded.

    python benches/i2i_step.py --config reduced                 # CPU -> benches/results/i2i_step_cpu_<date>.json
    python benches/i2i_step.py --config sd15 --dtype float16    # GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from contrastgen.bench.harness import (CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, cpu_model, git, load_average,  # noqa: E402
                             measure_memory, setup_threads, time_fn)

CONFIGS = {
    # Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), random weights
    "sd15": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                           attention_head_dim=8, sample_size=64, in_channels=4, out_channels=4,
                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                 latent=64, tokens=77),
    "reduced": dict(unet=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64,
                              attention_head_dim=8, sample_size=32, in_channels=4, out_channels=4, norm_num_groups=16,
                              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                    latent=32, tokens=77),
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                           attention_head_dim=4, sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                 latent=16, tokens=77),
}


def build(config: str, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import UNet2DConditionModel

    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"]).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    n = cfg["latent"]
    latents = torch.randn(1, 4, n, n, generator=g).to(device, dtype)
    embeds = torch.randn(1, cfg["tokens"], cfg["unet"]["cross_attention_dim"], generator=g).to(device, dtype)
    return unet, latents, embeds


def make_case(config: str, device: str, dtype: torch.dtype, num_patches: int = 256):
    from contrastgen.methods import i2i as I

    unet, latents, embeds = build(config, device, dtype)
    nce_layers = I.default_nce_layers(unet)
    attn_layers = I.cross_attention_layers(unet)
    t = torch.tensor(601, device=device)
    with torch.no_grad(), I.GuidanceCapture(unet, nce_layers, attn_layers) as cap:
        feats, maps, _ = cap.run(latents * 0.9 + 0.1, t, embeds, early_exit=False)
        ref = I.make_reference(feats, maps, num_patches=num_patches, generator=torch.Generator().manual_seed(0))
    return unet, latents, embeds, t, ref, nce_layers, attn_layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: sd15 on CUDA, reduced on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per variant")
    ap.add_argument("--variants", default="fused,baseline")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from contrastgen.methods import i2i as I

    threads = setup_threads(a.threads)
    device = a.device
    config = a.config or ("sd15" if device == "cuda" else "reduced")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if device == "cuda" else torch.float32)
    load0 = load_average()
    unet, latents, embeds, t, ref, nce_layers, attn_layers = make_case(config, device, dtype)
    captures = {"fused": (I.GuidanceCapture, True), "baseline": (I.MaterializingCapture, False)}
    rows, grads = [], {}
    for name in a.variants.split(","):
        cls, fused = captures[name]
        with cls(unet, nce_layers, attn_layers) as cap:
            def step():
                return I.guidance_gradient(cap, latents, t, embeds, ref, fused=fused)
            grad, losses = step()
            grads[name] = grad.float()
            timing = time_fn(step, device, warmup=1, budget_s=a.budget, min_reps=3)
            mem = measure_memory(step, device)
        rows.append(dict(variant=name, ms=timing.ms, ms_min=timing.ms_min, ms_q1=timing.ms_q1, ms_q3=timing.ms_q3,
                         reps=timing.reps, peak_mib=mem.peak_mib, rss_peak_mib=mem.rss_peak_mib,
                         patch_nce=losses.patch_nce.tolist(), attention_sum=float(losses.attention.sum())))
        print(f"{name:9s} {timing.ms:9.1f} ms  peak {mem.peak_mib:9.1f} MiB" +
              (f"  (RSS growth {mem.rss_peak_mib:.1f} MiB)" if mem.rss_peak_mib is not None else ""))
    agree = None
    if {"fused", "baseline"} <= set(grads):
        agree = float((grads["fused"] - grads["baseline"]).norm() / grads["baseline"].norm().clamp_min(1e-30))
        f, b = (next(r for r in rows if r["variant"] == v) for v in ("fused", "baseline"))
        print(f"speed-up {b['ms'] / f['ms']:.2f}x, memory {b['peak_mib'] / max(f['peak_mib'], 1e-9):.2f}x less, "
              f"gradient rel. diff {agree:.2e}")
    result = dict(
        bench="i2i_step", date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
        device=torch.cuda.get_device_name() if device == "cuda" else cpu_model(), torch=torch.__version__,
        platform=platform.platform(), threads=threads, load_avg_start=load0, load_avg_end=load_average(),
        config=config, unet=CONFIGS[config]["unet"], latent=CONFIGS[config]["latent"], dtype=str(dtype),
        nce_layers=nce_layers, attention_layers=len(attn_layers), num_patches=256, timestep=int(t),
        reference_cache_mib_per_step=ref.nbytes() / 2**20,
        memory_method=CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD, rows=rows,
        gradient_rel_diff=agree)
    out = a.out or os.path.join(ROOT, "benches", "results", f"i2i_step_{'cuda' if device == 'cuda' else 'cpu'}_"
                                f"{config}_{result['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
