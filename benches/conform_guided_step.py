"""One CONFORM-guided denoising step at SD-1.5 UNet shapes (random weights): time and peak memory.

    python -m benches.conform_guided_step                     # CPU: 64x64 latents, batch 1, width / 5
    python -m benches.conform_guided_step --device cuda --width-div 1 --dtype float16   # SD-1.5 shapes

Variants (each measured in a fresh subprocess, so that the peak memory of one does not hide another's):
  unguided       the ordinary classifier-free-guidance step: no_grad UNet forward on [uncond, cond] (batch 2)
  ours           the guidance step of contrastgen.methods.conform.ConformPipeline: UNet forward with
                 UNetCapture (SDPA everywhere, 16x16 cross-attention maps only, stops after the last of them),
                 contrastgen.attention_nce (default backend), backward to the latent, latent update; the layer
                 count that the early exit needs is learnt first by UNetCapture.count_layers (a no_grad forward,
                 once per pipeline call, as the pipeline does; it runs before the memory baseline but the peak
                 resident set still includes it); --first-step-counts restores the old measurement, where the
                 first early-exit step itself runs the whole UNet with autograd to count the layers
  ours_full      the same without the early exit (the whole UNet forward)
  materialising  the official CONFORM processor: every attention layer materialises its probabilities
                 (get_attention_scores + bmm, the 4096 x 4096 self-attention at 64x64 included), the reference
                 loss (PyTorch ops), UNet parameters requiring grad as in the official pipeline, backward

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the step (weights included, reported apart);
on CPU the growth of the process's peak resident set (``ru_maxrss``) over its resident set before the step
(the step's own transient memory; weights are resident before).  Times: median of ``--repeats`` steps after one
warm-up.  The JSON (``benches/results/<device>_<date>_conform_guided_step.json``) records the machine's load.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unguided", "ours", "ours_full", "materialising")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unet(width_div: int, device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ch = tuple(max(8, c // width_div) for c in (320, 640, 1280, 1280))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=min(32, ch[0] // 2))
    return unet.to(device=device, dtype=dtype).eval(), ch


def measure(variant: str, width_div: int, device: str, dtype_name: str, repeats: int, backend,
            count_in_step: bool = False) -> dict:
    """Runs in the child process: one variant, peak memory of its first step, then timed repeats."""
    import torch

    import contrastgen as cg
    from contrastgen.methods.attention_capture import MaterializingCapture, UNetCapture
    from contrastgen.methods.conform import _NoParamGrad
    from contrastgen.reference import attention_nce_ref

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    unet, ch = _unet(width_div, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    z0 = torch.randn(1, 4, 64, 64, generator=g).to(dev, dtype)
    cond = torch.randn(1, 77, 768, generator=g).to(dev, dtype)
    uncond = torch.randn(1, 77, 768, generator=g).to(dev, dtype)
    prev = torch.softmax(torch.randn(1, 16, 16, 77, generator=g), -1).to(dev)
    t = torch.tensor(801, device=dev)
    groups = [[2, 3], [6, 7]]
    alpha = 20.0

    if variant == "unguided":
        def step():
            with torch.no_grad():
                return unet(torch.cat([z0, z0]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        ctx = None
    elif variant in ("ours", "ours_full"):
        cap = UNetCapture(unet, resolution=(16, 16)).install()
        early = variant == "ours"
        if early and not count_in_step:
            cap.count_layers(z0, t, cond)   # as ConformPipeline does once per call (no_grad); else the first
            #                                 early-exit forward runs the whole UNet with autograd to count the layers

        def step():
            with torch.enable_grad(), _NoParamGrad(unet):
                z = z0.detach().requires_grad_(True)
                cap.forward(z, t, cond, early_exit=early)
                loss = cg.attention_nce(cap.maps(), groups, prev_maps=prev, softmax_normalize=True, backend=backend)
                (gz,) = torch.autograd.grad(loss.sum(), z)
                return z.detach() - alpha * gz
        ctx = cap
    elif variant == "materialising":
        mat = MaterializingCapture(unet, resolution=(16, 16)).__enter__()

        def step():
            with torch.enable_grad():
                mat.reset()
                z = z0.detach().requires_grad_(True)
                unet(z, t, encoder_hidden_states=cond)
                loss = attention_nce_ref(mat.maps().float(), groups, prev_maps=prev[0], softmax_normalize=True)
                (gz,) = torch.autograd.grad(loss, z, retain_graph=True)     # as the official _update_latent
                return z.detach() - alpha * gz
        ctx = mat
    else:
        raise ValueError(variant)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated()
        mem = {"peak_bytes": peak, "peak_above_start_bytes": peak - base, "weights_bytes": weights}
    else:
        import gc
        gc.collect()
        base = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = {"peak_rss_bytes": peak, "peak_above_start_bytes": peak - base, "weights_bytes": weights}
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    del ctx
    return {"variant": variant, "median_s": times[len(times) // 2], "min_s": times[0], "times_s": times,
            "block_out_channels": list(ch), **mem}


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, float16 on CUDA")
    ap.add_argument("--width-div", type=int, default=None, help="block_out_channels / this (default 5 on CPU, 1 on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default=None, help="attention_nce backend (default: the device's)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--first-step-counts", action="store_true",
                    help="ours: no count_layers first (the first early-exit step runs the whole UNet to count layers)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    dtype = a.dtype or ("float16" if a.device == "cuda" else "float32")
    wdiv = a.width_div or (1 if a.device == "cuda" else 5)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.child:
        print("RESULT " + json.dumps(measure(a.child, wdiv, a.device, dtype, a.repeats, a.backend,
                                                    count_in_step=a.first_step_counts)))
        return 0
    rows, load0 = [], _load()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for v in a.variants.split(","):
        cmd = [sys.executable, "-m", "benches.conform_guided_step", "--child", v, "--device", a.device, "--dtype", dtype,
               "--width-div", str(wdiv), "--repeats", str(a.repeats)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if a.backend:
            cmd += ["--backend", a.backend]
        if a.first_step_counts:
            cmd += ["--first-step-counts"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            rows.append({"variant": v, "failed": (p.stderr or p.stdout)[-2000:]})
            print(f"{v}: FAILED\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        r["load_avg_after"] = _load()
        r["wall_s"] = round(time.time() - t0, 1)
        rows.append(r)
        mem = r["peak_above_start_bytes"] / 2**20
        print(f"{v:14s} median {r['median_s'] * 1e3:9.1f} ms   peak memory above start {mem:8.1f} MiB", flush=True)
    import torch
    by = {r["variant"]: r for r in rows if "failed" not in r}
    ratios = {}
    if "ours" in by and "materialising" in by:
        ratios["materialising_over_ours_time"] = by["materialising"]["median_s"] / by["ours"]["median_s"]
        ratios["materialising_over_ours_peak"] = (by["materialising"]["peak_above_start_bytes"]
                                                  / max(1, by["ours"]["peak_above_start_bytes"]))
    if "ours" in by and "unguided" in by:
        key = "peak_bytes" if a.device == "cuda" else "peak_above_start_bytes"
        ratios["ours_over_unguided_peak"] = by["ours"][key] / max(1, by["unguided"][key])
        if a.device != "cuda":
            ratios["ours_over_unguided_peak_rss_total"] = by["ours"]["peak_rss_bytes"] / by["unguided"]["peak_rss_bytes"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    out = {"benchmark": "conform_guided_step", "device": a.device, "dtype": dtype, "width_div": wdiv,
           "latent": [1, 4, 64, 64], "attention_heads": 8, "cross_attention_dim": 768,
           "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": a.threads or torch.get_num_threads(), "commit": commit,
           "ours_counts_layers_first": not a.first_step_counts, "load_avg_start": load0,
           "load_avg_end": _load(), "date": _dt.datetime.now().isoformat(timespec="seconds"), "ratios": ratios,
           "rows": rows}
    if a.device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    path = Path(a.json) if a.json else ROOT / "benches" / "results" / (
        f"{a.device}_{_dt.date.today().isoformat()}_conform_guided_step.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
