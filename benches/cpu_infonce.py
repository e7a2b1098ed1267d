"""Standalone CPU benchmark of the C++ InfoNCE core (contrastgen.ops._cpp_infonce) on symmetric CLIP.

Providers (all fp32, diagonal positives, symmetric):
  * ``ref``        contrastgen.reference.clip_loss_ref forward + autograd backward (dense N x N logits)
  * ``cpp_core``   _cpp_infonce.infonce_fwd + infonce_bwd (symmetric=True), upstream 1/(2N) per row/column
                   as clip_loss's mean passes it
  * ``cpp_public`` contrastgen.clip_loss(..., backend="cpp") forward + autograd backward (custom ops), when
                   contrastgen/ops/infonce.py registers the "cpp" core

Time: torch.set_num_threads(--threads, default 2), one warm-up call, then ``--reps`` repeats per provider and
phase, providers interleaved repeat by repeat (the machine is shared: interleaving spreads the noise evenly);
median (and min) in ms of fwd, bwd (backward alone, after an untimed forward) and fwd+bwd.

Memory: each (provider, shape) runs once in a fresh subprocess: inputs allocated, a tiny warm-up call, then
(a) ``/proc/self/clear_refs`` <- 5 resets VmHWM to the current RSS and the VmHWM growth over one fwd+bwd is
the extra peak RSS (whole process, any allocator), and (b) a second fwd+bwd under
``torch.profiler.profile(profile_memory=True)``: the peak of the running sum of CPU allocator events
(torch tensors only).  Both in MiB.

    .venv/bin/python benches/cpu_infonce.py                 # full grid, writes benches/results/cpu_infonce_<date>.json
    .venv/bin/python benches/cpu_infonce.py --n 8192 --d 256 --reps 7
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from contrastgen.bench.harness import cpu_model, git  # noqa: E402

PROVIDERS = ("ref", "cpp_core", "cpp_public")


def _inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return q, k, torch.tensor(14.285714)  # scale = 1 / 0.07, CLIP's initial logit scale


def _available(provider):
    if provider == "ref":
        return True
    from contrastgen.ops import _cpp_infonce as C
    if not C.available():
        return False
    if provider == "cpp_public":
        import contrastgen.ops as ops
        return "cpp" in ops.available_backends("infonce")
    return True


def make_provider(provider, n, d):
    """-> (fwd() -> state, bwd(state), fwdbwd())"""
    q, k, scale = _inputs(n, d)
    if provider == "ref":
        from contrastgen.reference import clip_loss_ref

        def fwd():
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            s = scale.clone().requires_grad_()
            return clip_loss_ref(qq, kk, s)

        def bwd(loss):
            loss.backward()

        return fwd, bwd, lambda: bwd(fwd())
    if provider == "cpp_public":
        import contrastgen

        def fwd():
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            s = scale.clone().requires_grad_()
            return contrastgen.clip_loss(qq, kk, s, backend="cpp")

        def bwd(loss):
            loss.backward()

        return fwd, bwd, lambda: bwd(fwd())
    from contrastgen.ops import _cpp_infonce as C
    g = torch.full((n,), 0.5 / n)

    def fwd():
        return C.infonce_fwd(q, k, None, scale, None, None, False, True, False, True)

    def bwd(out):
        return C.infonce_bwd(q, k, None, scale, None, None, False, True, False, True, out[2], out[3], g, g)

    return fwd, bwd, lambda: bwd(fwd())


def time_shape(n, d, providers, reps):
    made = {p: make_provider(p, n, d) for p in providers}
    for p in providers:  # warm-up
        made[p][2]()
    times = {p: {"fwd": [], "bwd": [], "fwdbwd": []} for p in providers}
    for _ in range(reps):
        for p in providers:
            fwd, bwd, fb = made[p]
            t0 = time.perf_counter()
            st = fwd()
            t1 = time.perf_counter()
            bwd(st)
            t2 = time.perf_counter()
            del st
            fb()
            t3 = time.perf_counter()
            times[p]["fwd"].append(t1 - t0)
            times[p]["bwd"].append(t2 - t1)
            times[p]["fwdbwd"].append(t3 - t2)
    out = {}
    for p in providers:
        out[p] = {}
        for ph, v in times[p].items():
            out[p][f"{ph}_ms"] = round(1e3 * statistics.median(v), 2)
            out[p][f"{ph}_min_ms"] = round(1e3 * min(v), 2)
    return out


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _memory_child(provider, n, d, threads):
    torch.set_num_threads(threads)
    if os.environ.get("CONTRASTGEN_BENCH_PRODUCT"):
        from contrastgen.ops import _cpp_infonce as C
        C.PRODUCT = os.environ["CONTRASTGEN_BENCH_PRODUCT"]
    fwd, bwd, fb = make_provider(provider, 64, d)
    fb()  # load libraries, start the thread pools
    fwd, bwd, fb = make_provider(provider, n, d)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fb()
    rss_peak = (_status_kib("VmHWM") - base) / 1024
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fb()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    run = peak = 0
    for _, nbytes in events:
        run += nbytes
        peak = max(peak, run)
    print(json.dumps({"rss_peak_mib": round(rss_peak, 1), "torch_alloc_peak_mib": round(peak / 2**20, 1)}))


def measure_memory(provider, n, d, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", provider, str(n), str(d), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- metadata
def _versions():
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def _cpp_setting(name):
    from contrastgen.ops import _cpp_infonce as C
    return getattr(C, name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--d", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--reps", type=int, default=5, help="repeats per provider and phase (3 above N = 8192)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--product", choices=["avx512", "blas"], default=None,
                    help="how the C++ core computes the logits block (default: the module's choice)")
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        p, n, d, t = args.memory_child
        _memory_child(p, int(n), int(d), int(t))
        return
    torch.set_num_threads(args.threads)
    if args.product:
        from contrastgen.ops import _cpp_infonce as C
        C.PRODUCT = args.product
        os.environ["CONTRASTGEN_BENCH_PRODUCT"] = args.product  # for the memory subprocesses
    providers = [p for p in args.providers if _available(p)]
    results = []
    load0 = os.getloadavg()[0]
    for n in args.n:
        for d in args.d:
            reps = args.reps if n <= 8192 else min(args.reps, 3)
            t = time_shape(n, d, providers, reps)
            for p in providers:
                row = {"provider": p, "n": n, "d": d, "dtype": "float32", "reps": reps, **t[p]}
                if not args.no_memory:
                    row.update(measure_memory(p, n, d, args.threads))
                results.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "benchmark": "symmetric CLIP loss, fp32, forward + backward, CPU",
        "date": datetime.date.today().isoformat(),
        "device": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "versions": _versions(), "git_commit": git("rev-parse", "HEAD") or None,
        "load_average_start": load0, "load_average_end": os.getloadavg()[0],
        "timing": "median (and min) of interleaved repeats after one warm-up, time.perf_counter",
        "memory": "fresh subprocess per (provider, shape): rss_peak_mib = VmHWM growth over one fwd+bwd after "
                  "resetting VmHWM via /proc/self/clear_refs; torch_alloc_peak_mib = peak running sum of "
                  "torch.profiler CPU [memory] events over one fwd+bwd",
        "cpp_max_block_rows": _cpp_setting("MAX_BLOCK_ROWS"),
        "cpp_logits_product": _cpp_setting("PRODUCT"),
    }
    out = args.out or os.path.join(ROOT, "benches", "results", f"cpu_infonce_{meta['date']}.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print_table(results)
    print(f"wrote {out}")


def print_table(results):
    hdr = f"{'N':>6} {'D':>4} {'provider':>11} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9} {'min':>9} {'speedup':>8} " \
          f"{'rss MiB':>8} {'torch MiB':>9} {'mem %':>6}"
    print(hdr)
    ref = {(r["n"], r["d"]): r for r in results if r["provider"] == "ref"}
    for r in results:
        base = ref.get((r["n"], r["d"]))
        sp = base["fwdbwd_ms"] / r["fwdbwd_ms"] if base else float("nan")
        mem = r.get("rss_peak_mib", float("nan"))
        tmem = r.get("torch_alloc_peak_mib", float("nan"))
        pct = 100 * tmem / base["torch_alloc_peak_mib"] if base and base.get("torch_alloc_peak_mib") else float("nan")
        print(f"{r['n']:>6} {r['d']:>4} {r['provider']:>11} {r['fwd_ms']:>9.1f} {r['bwd_ms']:>9.1f} "
              f"{r['fwdbwd_ms']:>9.1f} {r['fwdbwd_min_ms']:>9.1f} {sp:>8.2f} {mem:>8.1f} {tmem:>9.1f} {pct:>6.1f}")


if __name__ == "__main__":
    main()
