"""``contrastgen bench``: time every op x shape x dtype x provider x mode, print a table, write JSON + PNG.

Examples::

    contrastgen bench --quick                       # every op vs its reference, small CPU shapes (~1-2 min)
    contrastgen bench --op clip_loss,siglip_loss --device cuda --dtype bfloat16 --mode fwd+bwd
    contrastgen bench --list                        # the registry
    contrastgen bench --device cuda --dry-run       # what would run / be skipped, without timing
    contrastgen bench --crossover                   # where the dense reference beats the kernel (the default's rule)
    contrastgen bench report [--dir DIR]            # markdown across saved runs

Results go to ``--out DIR`` (default ``./contrastgen-bench/`` in the working directory): one JSON per run
(schema ``contrastgen.bench/2``, see :data:`SCHEMA_VERSION` and the README) and a PNG next to it.

Every provider that cannot run a case is recorded as ``skipped`` with the reason; one that fails at
run time (OOM, unsupported input) as ``failed`` with the error; neither stops the run.  Results are
written after every case, so an interrupted or time-boxed run still leaves its JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from . import cases as C
from . import harness as H

SCHEMA = "contrastgen.bench"
SCHEMA_VERSION = 2
DEFAULT_OUT = "contrastgen-bench"          # relative to the working directory
# torch.compile needs ~5-30 s per graph on CPU and KeOps ~15 s per formula on first use: too slow for --quick.
_JIT = "not in --quick (JIT compilation takes ~5-30 s per graph/formula); add with --providers all"
QUICK_EXCLUDED = {"compile": _JIT, "keops": _JIT}


# --------------------------------------------------------------------------- arguments
def _csv(values):
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="contrastgen bench", description="Benchmark contrastgen's losses against "
                                "their PyTorch references and peer libraries.")
    p.add_argument("--op", action="append", help="op names or families, comma-separated (e.g. clip_loss,info_nce)")
    p.add_argument("--quick", action="store_true", help="small shapes on CPU, every op, cheap providers (~1-2 min)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available (cpu with --quick)")
    p.add_argument("--dtype", action="append", help="float32, bfloat16, float16 (default: float32 on CPU, "
                                                     "bfloat16 on CUDA)")
    p.add_argument("--mode", action="append", help=f"{', '.join(C.MODES)} (default: all three)")
    p.add_argument("--providers", action="append", help=f"subset of {', '.join(C.PROVIDERS)}, or 'all'")
    p.add_argument("--shapes", choices=["quick", "cpu", "cuda"], help="shape regime (default: from device/--quick)")
    p.add_argument("--max-n", type=int, help="drop shapes whose x-axis size exceeds this")
    p.add_argument("--out", "--out-dir", dest="out_dir", metavar="DIR",
                   help=f"folder for the JSON and PNG (default ./{DEFAULT_OUT}/ in the working directory)")
    p.add_argument("--json", help="output path of the JSON (default DIR/<device>_<date>_<tag>.json)")
    p.add_argument("--shape", action="append", help="keep only shapes with these values, e.g. N=65536,D=512 "
                                                    "(repeatable: a shape is kept if it matches any)")
    p.add_argument("--check-shape", choices=["small", "timed"], default="small",
                   help="correctness check at the op's small check shape (default) or at the first timed shape "
                        "(float64 reference on the same rounded inputs; chunked where the op has one)")
    p.add_argument("--tag", help="file-name tag (default: quick / full)")
    p.add_argument("--budget", type=float, help="seconds of timed repeats per case (default 0.1 quick, 0.5 else)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default os.cpu_count(); use 1 on a busy machine)")
    p.add_argument("--time-limit", type=float, help="stop starting new cases after this many seconds "
                                                      "(the rest is recorded as skipped)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list ops, shapes and providers, then exit")
    p.add_argument("--dry-run", action="store_true", help="resolve cases and providers, time nothing")
    p.add_argument("--crossover", action="store_true", help="measure where the dense reference is faster than the "
                   "fused kernel (the default backend's shape rule) for --op (default: every measured op)")
    p.add_argument("--passes", type=int, default=2, help="--crossover: sweeps to run (the smallest crossover is kept)")
    p.add_argument("--update-package", action="store_true", help="--crossover: write the result into the "
                   "package's crossover.json (maintainers)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- environment
def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def device_name(device):
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return H.cpu_model()


def device_slug(device):
    if device == "cpu":
        return "cpu"
    name = device_name(device).lower().replace("nvidia", "")
    return "cuda-" + (re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu")


def _cpp_build():
    from contrastgen.ops import _backends
    try:
        return _backends.cpp_build_info()
    except Exception as e:  # noqa: BLE001 (metadata must never stop a run)
        return {"error": _err(e)}


def metadata(args, argv, device, dtypes):
    import contrastgen
    from contrastgen.ops import BACKEND_TABLE, available_backends, backend_available

    meta = {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": H.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "contrastgen": contrastgen.__version__, "numpy": _version("numpy"),
            "open_clip_torch": _version("open_clip_torch"), "pytorch_metric_learning": _version("pytorch-metric-learning"),
            "pykeops": _version("pykeops"), "inf_cl": _version("inf-cl"),
        },
        "git_commit": H.git("rev-parse", "HEAD") or H.build_commit(),
        "git_dirty": bool(H.git("status", "--porcelain", "--untracked-files=no")),
        "hostname": platform.node(),
        "machine": H.machine_id(device),
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "contrastgen bench " + " ".join(argv),
        "argv": list(argv),
        "quick": bool(args.quick),
        "dtypes": [str(d).replace("torch.", "") for d in dtypes],
        "backends": {b: dict(zip(("available", "why_not"), backend_available(b))) for b in ("cpp", "triton")},
        "cpp_build": _cpp_build(),
        "registered": {op: sorted(available_backends(op)) for op in BACKEND_TABLE},
        "timing": ("CUDA events, L2 flushed before each call, median" if device == "cuda" else
                   "time.perf_counter, median of repeats after warm-up"),
        "memory_method": H.CUDA_MEMORY_METHOD if device == "cuda" else H.CPU_MEMORY_METHOD,
        "flop_convention": C.__doc__.split("FLOP convention")[1].strip() if "FLOP convention" in C.__doc__ else "",
        "env": {k: os.environ[k] for k in ("CONTRASTGEN_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS")
                if k in os.environ},
    }
    return meta


# --------------------------------------------------------------------------- one case
def _scalar(loss):
    return loss if loss.dim() == 0 else loss.sum()


def mode_callable(fn, inp, mode):
    if mode == "fwd":
        return lambda: fn(inp)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(_scalar(fn(inp)), inp.grads, allow_unused=True)
    if mode == "bwd":
        loss = _scalar(fn(inp))
        return lambda: torch.autograd.grad(loss, inp.grads, retain_graph=True, allow_unused=True)
    raise ValueError(mode)


def _err(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _tensors(x):
    """The tensors of an Inputs' args / kwargs, in order (lists flattened)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def correctness(spec, fn, dtype, device, compare_grads, shape=None, cache=None):
    """max |provider - float64 reference| (and the dtype reference's own error) at spec.check, or at ``shape``.

    At ``shape`` the float64 reference runs on the provider's (rounded) inputs, through ``spec.ref64`` (chunked)
    where the op has one; ``cache`` keeps the references of one (op, dtype, shape) for the next provider."""
    import contrastgen
    api = getattr(contrastgen, spec.api)
    at = spec.check if shape is None else shape
    inp = spec.make(at, dtype, device)
    key = (spec.name, str(dtype), C.shape_str(at), compare_grads)
    if cache is None or key not in cache:
        inp64 = spec.make(at, torch.float64, device)
        if shape is not None:          # the same values as the provider's inputs
            with torch.no_grad():
                for t64, t in zip(_tensors((inp64.args, inp64.kwargs)), _tensors((inp.args, inp.kwargs))):
                    if t64.is_floating_point():
                        t64.copy_(t)
        if shape is not None and spec.ref64 is not None:
            ref64, g64 = spec.ref64(inp64)
        else:
            ref64 = _scalar(api(*inp64.args, **inp64.kwargs, backend="torch"))
            g64 = torch.autograd.grad(ref64, inp64.grads, allow_unused=True) if compare_grads else None
        refd = _scalar(api(*inp.args, **inp.kwargs, backend="torch"))
        gd = torch.autograd.grad(refd, inp.grads, allow_unused=True) if compare_grads else None
        refs = (float(ref64.detach()), g64, float(refd.detach()), gd)
        del inp64, ref64, refd
        if cache is not None:
            cache.clear()              # one shape at a time (the references can be large)
            cache[key] = refs
    else:
        refs = cache[key]
    r64, g64, rd, gd = refs
    val = _scalar(fn(inp))
    v = float(val.detach())
    out = {"shape": at, "loss": v, "loss_ref64": r64, "abs_err": abs(v - r64), "ref_abs_err": abs(rd - r64),
           "ref64": "chunked" if shape is not None and spec.ref64 is not None else "dense"}
    if compare_grads:
        gv = torch.autograd.grad(val, inp.grads, allow_unused=True)

        def gerr(gs):
            errs = [float((a.double() - b).abs().max()) for a, b in zip(gs, g64) if a is not None and b is not None]
            return max(errs) if errs else None
        out["grad_abs_err"] = gerr(gv)
        out["ref_grad_abs_err"] = gerr(gd)
        mags = [float(b.abs().max()) for b in g64 if b is not None]
        out["grad_ref64_abs_max"] = max(mags) if mags else None
    return out


# --------------------------------------------------------------------------- the run
def plan(args):
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    regime = args.shapes or ("quick" if args.quick else device)
    dtypes = [C.DTYPES[d] for d in _csv(args.dtype)] or [torch.float32 if device == "cpu" else torch.bfloat16]
    modes = _csv(args.mode) or list(C.MODES)
    for m in modes:
        if m not in C.MODES:
            raise SystemExit(f"unknown mode {m!r}; expected {C.MODES}")
    providers = _csv(args.providers)
    if not providers or providers == ["all"]:
        providers = list(C.PROVIDERS)
        excluded = QUICK_EXCLUDED if args.quick and not args.providers else {}
    else:
        excluded = {}
        for p in providers:
            if p not in C.PROVIDERS:
                raise SystemExit(f"unknown provider {p!r}; expected {C.PROVIDERS}")
        if "reference" not in providers:
            providers.insert(0, "reference")      # ratios need it
    specs = C.select_specs(_csv(args.op))
    return device, regime, dtypes, modes, providers, excluded, specs


def _shape_filters(values):
    """["N=65536,D=512", ...] -> [{"N": 65536, "D": 512}, ...]"""
    out = []
    for v in values or []:
        f = {}
        for kv in v.split(","):
            if kv.strip():
                k, _, val = kv.partition("=")
                f[k.strip()] = int(val)
        out.append(f)
    return out


def _shapes(spec, regime, max_n, only=None):
    shapes = spec.shapes.get(regime, [])
    if max_n:
        shapes = [s for s in shapes if s[spec.x] <= max_n]
    if only:
        shapes = [s for s in shapes if any(all(s.get(k) == v for k, v in f.items()) for f in only)]
    return shapes


def list_registry(args):
    device, regime, dtypes, modes, providers, excluded, specs = plan(args)
    print(f"regime {regime!r}, device {device}, providers {', '.join(providers)}")
    for spec in specs:
        peers = ", ".join(sorted(spec.peers)) or "-"
        print(f"\n{spec.name}  (contrastgen.{spec.api}, fused op {spec.core!r}, peers: {peers})")
        for s in _shapes(spec, regime, args.max_n, _shape_filters(args.shape)):
            print(f"    {C.shape_str(s)}")
    return 0


def default_json_path(device, tag, out_dir=None):
    date = _dt.date.today().isoformat()
    return Path(out_dir or DEFAULT_OUT) / f"{device_slug(device)}_{date}_{tag}.json"


def write_json(path, doc):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def add_derived(results, meta):
    """Ratios vs the reference of the same (op, shape, dtype, mode); TFLOP/s, GB/s, % of matmul rate."""
    ref = {(r["op"], r["shape_str"], r["dtype"], r["mode"]): r for r in results
           if r["provider"] == "reference" and r["status"] == "ok"}
    mm = meta.get("matmul_tflops", {})
    for r in results:
        if r["status"] != "ok":
            continue
        base = ref.get((r["op"], r["shape_str"], r["dtype"], r["mode"]))
        if base is not None:
            r["speedup"] = base["ms"] / r["ms"] if r["ms"] > 0 else None
            if base.get("peak_mib") and r.get("peak_mib") is not None:
                r["mem_ratio"] = r["peak_mib"] / base["peak_mib"]
        if r.get("flops"):
            r["tflops"] = r["flops"] / (r["ms"] * 1e9)
            d = r["shape"].get("D")
            rate = mm.get(r["dtype"], {}).get(str(d)) if d else None
            if rate:
                r["pct_matmul"] = 100.0 * r["tflops"] / rate
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["ms"] * 1e6)


def measure_matmul(device, dtypes, dims, quick):
    """bf16/fp32 GEMM rate (TFLOP/s) of (N, D) @ (D, N) for each D, from the fastest repeat: the ceiling
    for the "% of matmul rate" metric (at small N the GEMM itself is far from peak, so % is only meaningful
    at the large shapes)."""
    n = 1024 if quick else (16384 if device == "cuda" else 4096)
    out = {}
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        out[name] = {}
        for d in sorted(dims):
            try:
                a = torch.randn(n, d, device=device).to(dt)
                b = torch.randn(n, d, device=device).to(dt)
                t = H.time_fn(lambda: a @ b.T, device, warmup=2, budget_s=0.3 if quick else 0.5, min_reps=10)
                out[name][str(d)] = 2.0 * n * n * d / (t.ms_min * 1e9)     # a ceiling: the best repeat
            except Exception as e:  # noqa: BLE001 (e.g. a dtype without a CPU GEMM)
                out[name][str(d)] = None
                print(f"matmul rate {name} D={d}: {_err(e)}", file=sys.stderr)
    return {"N": n, "tflops": out}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        return list_registry(args)
    if args.crossover:
        from .crossover import main as crossover_main
        return crossover_main(args, Path(args.out_dir or DEFAULT_OUT))
    device, regime, dtypes, modes, providers, excluded, specs = plan(args)
    if device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("--device cuda: no CUDA device here (use --dry-run to only list the cases)")
    threads = H.setup_threads(args.threads)
    load = H.load_average()
    if H.is_loaded(load, 0):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete for the "
              f"CPU and {threads}-thread timings will be inflated and noisy" +
              ("; consider --threads 1" if device == "cpu" and threads > 1 else ""), file=sys.stderr)
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.5)
    tag = args.tag or ("quick" if args.quick else "full")
    json_path = Path(args.json) if args.json else default_json_path(device, tag, args.out_dir)
    write = not args.dry_run or bool(args.json)          # a dry run writes only where asked

    meta = metadata(args, argv, device, dtypes)
    meta["torch_threads"] = threads
    meta["load_average"] = load
    meta["regime"] = regime
    meta["budget_s"] = budget
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": meta, "results": [], "checks": []}
    results, checks = doc["results"], doc["checks"]
    avail = H.available_bytes(device) if not args.dry_run or device == "cpu" else 0
    # A CPU OOM can kill the process: skip dense cases that would not fit.  A CUDA OOM is caught and
    # recorded as a failure, so on CUDA only the hopeless ones are skipped (the estimate is rough).
    dense_limit = 0.7 * avail if device == "cpu" else 2.0 * avail
    C.MEMORY_LIMIT = dense_limit if not args.dry_run else float("inf")

    only = _shape_filters(args.shape)
    work = [(spec, dt, shape) for spec in specs for dt in dtypes for shape in _shapes(spec, regime, args.max_n, only)]
    total = len(work) * len(providers) * len(modes)
    if not args.dry_run:
        dims = {s["D"] for spec, _, s in work if "D" in s and spec.flops}
        if dims:
            mm = measure_matmul(device, dtypes, dims, args.quick)
            meta["matmul_N"] = mm["N"]
            meta["matmul_tflops"] = mm["tflops"]
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="bench", unit="case", file=sys.stderr, disable=args.no_progress,
                   dynamic_ncols=True)
    except ImportError:
        bar = None
    t_start = time.perf_counter()
    check_done, ref_cache = {}, {}
    for spec, dt, shape in work:
        dname = str(dt).replace("torch.", "")
        inp = None
        for provider in providers:
            row_base = {"op": spec.name, "api": spec.api, "shape": dict(shape), "shape_str": C.shape_str(shape),
                        "x": spec.x, "dtype": dname, "provider": provider, "device": device}
            reason, fn = None, None
            if provider in excluded:
                reason = excluded[provider]
            elif args.time_limit and time.perf_counter() - t_start > args.time_limit:
                reason = f"time limit ({args.time_limit:.0f} s) reached"
            elif provider in C.DENSE and not args.dry_run and spec.dense_bytes(shape) > dense_limit:
                reason = (f"dense logits need ~{spec.dense_bytes(shape) / 2**30:.0f} GiB, more than "
                          f"{dense_limit / 2**30:.0f} GiB ({'70% of available RAM' if device == 'cpu' else '2x free GPU memory'})")
            else:
                try:
                    fn = C.build_provider(spec, provider, shape, dt, device)
                except C.Skip as e:
                    reason = str(e)
                except Exception as e:  # noqa: BLE001 (a broken peer must not stop the run)
                    reason = f"provider setup failed: {_err(e)}"
            if fn is None or args.dry_run:
                status = "skipped" if fn is None else "planned"
                for mode in modes:
                    results.append({**row_base, "mode": mode, "status": status, "reason": reason})
                if bar:
                    bar.update(len(modes))
                continue
            # correctness, once per (op, dtype, provider)
            ck = (spec.name, dname, provider)
            if ck not in check_done and not args.no_check:
                try:
                    c = correctness(spec, fn, dt, device, compare_grads=provider != "pml",
                                    shape=shape if args.check_shape == "timed" else None, cache=ref_cache)
                    c.update(op=spec.name, dtype=dname, provider=provider, status="ok")
                except Exception as e:  # noqa: BLE001
                    c = {"op": spec.name, "dtype": dname, "provider": provider, "status": "failed", "error": _err(e)}
                checks.append(c)
                check_done[ck] = c
            c = check_done.get(ck, {})
            if inp is None:
                try:
                    inp = spec.make(shape, dt, device)
                except Exception as e:  # noqa: BLE001 (OOM while building inputs)
                    H.free_memory(device)
                    for mode in modes:
                        results.append({**row_base, "mode": mode, "status": "failed",
                                        "reason": f"building inputs: {_err(e)}"})
                    if bar:
                        bar.update(len(modes))
                    continue
            for mode in modes:
                row = {**row_base, "mode": mode}
                if spec.flops:
                    row["flops"] = spec.flops(shape, mode)
                if spec.traffic:
                    row["bytes"] = spec.traffic(shape, mode, torch.empty((), dtype=dt).element_size())
                if c.get("status") == "ok":
                    row["check_abs_err"] = c["abs_err"]
                    row["check_ref_abs_err"] = c["ref_abs_err"]
                    if c.get("grad_abs_err") is not None:
                        row["check_grad_abs_err"] = c["grad_abs_err"]
                try:
                    call = mode_callable(fn, inp, mode)
                    call()                                   # warm-up: compiles, autotunes, caches
                    H.sync(device)
                    mem = H.measure_memory(call, device)
                    t = H.time_fn(call, device, warmup=0 if device == "cpu" else 2, budget_s=budget,
                                  max_reps=50 if device == "cpu" else 200)
                    row.update(status="ok", ms=t.ms, ms_min=t.ms_min, ms_q1=t.ms_q1, ms_q3=t.ms_q3, reps=t.reps,
                               iqr_pct=100.0 * (t.ms_q3 - t.ms_q1) / t.ms if t.ms > 0 else None,
                               peak_mib=mem.peak_mib, load_average=H.load_average())
                    if mem.rss_peak_mib is not None:
                        row["rss_peak_mib"] = mem.rss_peak_mib
                except Exception as e:  # noqa: BLE001 (OOM, unsupported input, compile error, ...)
                    row.update(status="failed", reason=_err(e), oom=H.is_oom(e))
                    if os.environ.get("CONTRASTGEN_BENCH_TRACEBACK"):
                        traceback.print_exc()
                finally:
                    call = None
                    H.free_memory(device)
                results.append(row)
                if bar:
                    bar.update(1)
                add_derived(results, meta)
                if write:
                    write_json(json_path, doc)
        inp = None
        H.free_memory(device)
    if bar:
        bar.close()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_average_end"] = H.load_average()
    meta["loaded"] = H.run_is_loaded(meta, results)
    add_derived(results, meta)
    if write:
        write_json(json_path, doc)
    from .crossover import summary
    from .report import format_table
    print(format_table(doc))
    if device == "cpu" or args.quick:
        print("\nDefault backend (backend=None): " + summary())
    if write:
        print(f"\nJSON: {json_path}")
    if not args.no_plot and not args.dry_run:
        try:
            from .plot import plot_results
            png = plot_results(doc, json_path.with_suffix(".png"))
            print(f"plot: {png}")
        except Exception as e:  # noqa: BLE001 (matplotlib missing must not lose the results)
            print(f"plot skipped: {_err(e)}", file=sys.stderr)
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        print(f"\n{len(failed)} case(s) failed (see 'reason' in the JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
