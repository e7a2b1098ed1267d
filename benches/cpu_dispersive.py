"""Standalone CPU benchmark of the C++ Dispersive Loss / uniformity kernels (contrastgen._cpp_dispersive).

Cases (fp32):
  * ``dispersive_l2``  B = 64, M = 262,144, infonce_l2 (Gram regime; target: cpp >= 1.5x faster than the dense
                       reference, forward+backward)
  * ``dispersive_cov`` B = 64, M = 262,144, covariance (Gram regime with the fused batch-norm statistics)
  * ``uniformity``     N = 4096, M = 64 (many-samples regime; target: cpp no slower than KeOps)

Providers:
  * ``ref``       the dense PyTorch reference (contrastgen.reference) forward + autograd backward
  * ``cpp``       the public API with backend="cpp" (custom ops; the Gram path's two products as the launcher's
                  PRODUCTS="auto" picks them: BLAS for fp32 l2, the C++ loops for covariance; or tiled online LSE)
  * ``cpp_loops`` (Gram cases) the same with PRODUCTS="cpp": the C++ split-K Gram and streamed W Z loops
  * ``cpp_mm``    (Gram cases) the same with PRODUCTS="blas": both products by torch.matmul (covariance: the
                  batch-normalised Zn materialised): answers "C++ loops or torch.matmul in the wrapper?"
  * ``keops``     (uniformity) pykeops LazyTensor: logits -t ||x_i - x_j||^2 with the diagonal pushed to
                  -1e4 through an index mask, .logsumexp(dim=1), backward by KeOps' autograd

Time: torch.set_num_threads(--threads, default 2), one warm-up call per provider, then --reps repeats with the
providers interleaved repeat by repeat (the machine is shared); median ms of fwd, bwd (the backward call, timed
right after the timed forward) and fwd+bwd (sum of the two within each repeat).

Memory: each (case, provider) runs once more in a fresh subprocess: inputs allocated, one warm-up call, then
``/proc/self/clear_refs`` <- 5 resets VmHWM to the current RSS, and the VmHWM growth over one fwd+bwd is the
extra peak resident memory in MiB (whole process: torch tensors, KeOps and C++ buffers alike; the input leaf
is allocated before the reset, so the number counts the loss' intermediates, saved tensors and the input's
gradient).

    .venv/bin/python benches/cpu_dispersive.py            # writes benches/results/cpu_dispersive_<date>.json
    .venv/bin/python benches/cpu_dispersive.py --reps 9 --cases uniformity
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from contrastgen.bench.harness import cpu_model, git  # noqa: E402

CASES = {
    "dispersive_l2": dict(kind="dispersive", variant="infonce_l2", B=64, M=262_144,
                          providers=("ref", "cpp", "cpp_loops", "cpp_mm")),
    "dispersive_cov": dict(kind="dispersive", variant="covariance", B=64, M=262_144,
                           providers=("ref", "cpp", "cpp_loops", "cpp_mm")),
    "uniformity": dict(kind="uniformity", N=4096, M=64, providers=("ref", "cpp", "keops")),
}


def _inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = CASES[case]
    if c["kind"] == "dispersive":
        return torch.randn(c["B"], c["M"], generator=g)
    return torch.nn.functional.normalize(torch.randn(c["N"], c["M"], generator=g), dim=1)


def _make(case, provider):
    """A function f(x) -> scalar loss (differentiable in x); cpp_mm is built in _fn_for."""
    import contrastgen
    from contrastgen.reference import dispersive_loss_ref, uniformity_ref
    c = CASES[case]
    if c["kind"] == "dispersive":
        v = c["variant"]
        if provider == "ref":
            return lambda z: dispersive_loss_ref(z, variant=v, tau=0.5)
        if provider == "cpp":
            return lambda z: contrastgen.dispersive_loss(z, variant=v, tau=0.5, backend="cpp")
    else:
        t = 2.0
        if provider == "ref":
            return lambda x: uniformity_ref(x, t=t)
        if provider == "cpp":
            return lambda x: contrastgen.uniformity(x, t=t, backend="cpp")
        if provider == "keops":
            from pykeops.torch import LazyTensor
            n = c["N"]
            idx = torch.arange(n, dtype=torch.float32)

            def f(x):
                xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
                ii, jj = LazyTensor(idx[:, None, None]), LazyTensor(idx[None, :, None])
                off = (ii - jj).abs().sign()                       # 0 on the diagonal, 1 elsewhere
                logits = -t * ((xi - xj) ** 2).sum(-1) + (off - 1.0) * 1e4
                rows = logits.logsumexp(dim=1)                     # (N, 1)
                return torch.logsumexp(rows.reshape(-1), 0) - math.log(n * (n - 1))
            return f
    raise ValueError(f"{provider} does not run {case}")


def _run_once(f, x0):
    x = x0 if x0.requires_grad else x0.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = f(x)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _fn_for(case, provider):
    """f(x) -> (fwd ms, bwd ms) for one repeat; cpp_loops / cpp_mm set the C++ launcher's PRODUCTS through the
    backward (cpp: "auto")."""
    products = {"cpp_loops": "cpp", "cpp_mm": "blas"}.get(provider)
    if products is None:
        f = _make(case, provider)
        return lambda x0: _run_once(f, x0)
    from contrastgen.ops import _cpp_dispersive as CPP
    import contrastgen
    v = CASES[case]["variant"]

    def run(x0):
        saved, CPP.PRODUCTS = CPP.PRODUCTS, products
        try:
            return _run_once(lambda z: contrastgen.dispersive_loss(z, variant=v, tau=0.5, backend="cpp"), x0)
        finally:
            CPP.PRODUCTS = saved
    return run


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _memory_child(case, provider, threads):
    torch.set_num_threads(threads)
    x0 = _inputs(case)
    run = _fn_for(case, provider)
    run(x0)                                   # warm-up (KeOps compile, page-in of the extension)
    x = x0.clone().requires_grad_()           # the input leaf exists before the measurement (not counted)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                         # VmHWM <- VmRSS
    rss0 = _status("VmRSS")
    run(x)
    hwm = _status("VmHWM")
    print(json.dumps({"peak_rss_delta_mib": (hwm - rss0) / 2**20}))


def _memory(case, provider, threads):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", case, provider,
                        "--threads", str(threads)], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])["peak_rss_delta_mib"]
    except Exception:  # noqa: BLE001
        sys.stderr.write(p.stderr[-2000:])
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "PROVIDER"))
    a = ap.parse_args(argv)
    if a.memory_child:
        _memory_child(*a.memory_child, a.threads)
        return 0
    torch.set_num_threads(a.threads)
    import triton  # noqa: F401  (version only)
    rows = []
    for case in a.cases:
        x0 = _inputs(case)
        runs = {}
        for p in CASES[case]["providers"]:
            try:
                runs[p] = _fn_for(case, p)
                runs[p](x0)                   # warm-up
            except Exception as e:  # noqa: BLE001
                print(f"{case}/{p}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                runs.pop(p, None)
        times = {p: [] for p in runs}
        for _ in range(a.reps):
            for p, run in runs.items():
                times[p].append(run(x0))
        for p in runs:
            fwd = [t[0] for t in times[p]]
            bwd = [t[1] for t in times[p]]
            tot = [t[0] + t[1] for t in times[p]]
            row = {"case": case, **{k: v for k, v in CASES[case].items() if k != "providers"}, "provider": p,
                   "fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
                   "fwd_bwd_ms": statistics.median(tot), "fwd_bwd_min_ms": min(tot), "reps": a.reps}
            row["peak_rss_delta_mib"] = None if a.no_memory else _memory(case, p, a.threads)
            rows.append(row)
        base = next((r for r in rows if r["case"] == case and r["provider"] == "ref"), None)
        for r in rows:
            if r["case"] == case and base is not None:
                r["speedup_vs_ref"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    meta = {"date": datetime.date.today().isoformat(), "device": cpu_model(), "threads": a.threads,
            "torch": torch.__version__, "triton": __import__("triton").__version__, "git_commit": git("rev-parse", "HEAD") or None,
            "load_average_1min_at_end": load,
            "timing": "median of --reps repeats after one warm-up, providers interleaved; fwd and bwd timed "
                      "separately within each repeat, fwd_bwd = their sum",
            "memory": "peak_rss_delta_mib: VmHWM growth over one fwd+bwd in a fresh subprocess after a warm-up call "
                      "(/proc/self/clear_refs <- 5 resets VmHWM to VmRSS first, the input leaf already allocated); "
                      "whole-process resident memory, including the input's gradient"}
    out = a.out or os.path.join(ROOT, "benches", "results", f"cpu_dispersive_{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"# {meta['device']}, {a.threads} threads, torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {str(meta['git_commit'])[:10]}, load {load}")
    print(f"{'case':16s} {'provider':9s} {'fwd ms':>9s} {'bwd ms':>9s} {'fwd+bwd':>9s} {'x ref':>6s} {'peak MiB':>9s}")
    for r in rows:
        mem = "-" if r["peak_rss_delta_mib"] is None else f"{r['peak_rss_delta_mib']:.0f}"
        print(f"{r['case']:16s} {r['provider']:9s} {r['fwd_ms']:9.1f} {r['bwd_ms']:9.1f} {r['fwd_bwd_ms']:9.1f} "
              f"{r.get('speedup_vs_ref', float('nan')):6.2f} {mem:>9s}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
