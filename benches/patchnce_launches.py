"""Kernel launches per PatchNCE fwd+bwd on CUDA, counted with the torch profiler (runs when a GPU is lent).

For each provider (the dense reference, ``torch.compile`` of it, the fused Triton op) and each CUT shape (5 layers x
B*256 patches x C = 256, keys detached) plus the i2i case (4 UNet decoder layers, C = 1280/1280/640/320), one
forward+backward (after warm-up) runs under ``torch.profiler`` with CUDA activity; the CUDA kernel events are
counted (memcpy / memset events listed separately), split into those launched during the forward and the backward,
and the fused kernels named.  The result is written as JSON (``--out``, default
benches/results/cuda_<date>_patchnce_launches.json).  On a machine without CUDA it exits with a message.

    python -m benches.patchnce_launches [--out PATH] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [{"B": b, "P": 256, "C": [256] * 5} for b in (1, 4, 16)] + [{"B": 1, "P": 256, "C": [1280, 1280, 640, 320]}]


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    qs = [F.normalize(torch.randn(shape["B"], shape["P"], c, generator=g), dim=-1).to("cuda", dtype).requires_grad_()
          for c in shape["C"]]
    ks = [F.normalize(torch.randn(shape["B"], shape["P"], c, generator=g), dim=-1).to("cuda", dtype) for c in shape["C"]]
    return qs, ks


def _provider(name):
    import contrastgen
    from contrastgen import reference as R
    if name == "reference":
        return lambda q, k: contrastgen.patch_nce(q, k, backend="torch")
    if name == "compile":
        fn = torch.compile(R.patch_nce_ref)
        return lambda q, k: fn(q, k)
    return lambda q, k: contrastgen.patch_nce(q, k, backend="triton")


def count(fn, qs, ks):
    """(forward kernels, backward kernels, other device events, kernel names) of one fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for _ in range(3):
        torch.autograd.grad(fn(qs, ks), qs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("patchnce_fwd_region"):
            loss = fn(qs, ks)
            torch.cuda.synchronize()
        with record_function("patchnce_bwd_region"):
            torch.autograd.grad(loss, qs)
            torch.cuda.synchronize()
    events = prof.events()
    regions = {e.name: (e.time_range.start, e.time_range.end) for e in events if e.name.startswith("patchnce_")}
    # kernels are attributed to the region of the CPU-side launch (cudaLaunchKernel / cuLaunchKernel...)
    launches = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and
                ("LaunchKernel" in e.name or "cuLaunch" in e.name)]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    other = [e.name for e in kernels if e.name.startswith(("Memcpy", "Memset", "[memory]"))]
    names = [e.name for e in kernels if not e.name.startswith(("Memcpy", "Memset", "[memory]"))]

    def within(e, region):
        a, b = regions[region]
        return a <= e.time_range.start <= b
    fwd = sum(within(e, "patchnce_fwd_region") for e in launches)
    bwd = sum(within(e, "patchnce_bwd_region") for e in launches)
    return {"fwd_launches": fwd, "bwd_launches": bwd, "kernels": len(names), "kernel_names": sorted(set(names)),
            "memcpy_memset": other}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--providers", default="reference,compile,triton")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("patchnce_launches: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    dtype = getattr(torch, a.dtype)
    rows = []
    for shape in SHAPES:
        qs, ks = _inputs(shape, dtype)
        for p in a.providers.split(","):
            try:
                r = count(_provider(p), qs, ks)
            except Exception as e:  # noqa: BLE001 - recorded, the next case runs
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append({"provider": p, "B": shape["B"], "P": shape["P"], "C": shape["C"], "dtype": a.dtype, **r})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernel_names"}), flush=True)
    out = a.out or Path(__file__).resolve().parent / "results" / f"cuda_{_dt.date.today()}_patchnce_launches.json"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "method": "torch.profiler (CPU+CUDA); launches = CPU-side *LaunchKernel events inside the fwd / bwd "
                      "record_function regions; kernels = CUDA kernel events other than memcpy / memset"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
