"""Benchmark of ``contrastgen.distributed.clip_loss``: ``mode="all_gather"`` vs ``mode="ring"`` on W ranks.

gloo on CPU (the default here), NCCL with one GPU per rank where CUDA has at least W devices.  Each rank holds
its own CLIP batch (n = N_local rows, D features, L2-normalised, logit scale 1/0.07) and runs forward +
backward of the distributed loss; the single-rank fused loss ``contrastgen.clip_loss`` on N_local rows (rank 0
alone, the others waiting at a barrier) is the reference.

* time per step: each repeat starts at a barrier; a step takes as long as its slowest rank (max over ranks of
  ``time.perf_counter`` around the call, after ``torch.cuda.synchronize`` on GPUs); median over repeats, after
  one warm-up step;
* peak memory per rank: ``contrastgen.bench.harness.measure_memory`` around one step on every rank at once (CPU:
  torch.profiler peak of the CPU allocator plus the RSS high-water growth; CUDA: max_memory_allocated); the
  features exist before the call and are not counted (gradients, gathered copies, buffers are);
* agreement: per rank, the largest difference of the loss and of the feature gradients between the modes,
  relative to the largest value;
* analytic communication volume per rank and step (bytes each rank sends).

    python benches/distributed.py              # W=4, N_local=4096, D=256 -> benches/results/distributed_cpu_<date>.json
    python benches/distributed.py --world 2 --n 1024 --reps 2 --out /tmp/d.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from contrastgen.bench.harness import (CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, cpu_model, git, load_average,  # noqa: E402
                             measure_memory)

MODES = ("all_gather", "ring")
TARGET_RING_OVER_SINGLE = 1.2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(n, d, rank, device, dtype):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return x.to(device, dtype), y.to(device, dtype), torch.tensor(1 / 0.07, device=device)


def _step_fn(mode, image, text, scale, backend):
    """fwd + bwd of one loss step; returns (loss, d image, d text, d scale)."""
    import contrastgen as cg
    import contrastgen.distributed as cd

    def step():
        i, t = image.detach().requires_grad_(), text.detach().requires_grad_()
        s = scale.detach().requires_grad_()
        if mode == "single":
            loss = cg.clip_loss(i, t, s, backend=backend)
        else:
            loss = cd.clip_loss(i, t, s, mode=mode, backend=backend)
        loss.backward()
        return loss.detach(), i.grad, t.grad, s.grad
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _gather_floats(values, world):
    out = [None] * world
    dist.all_gather_object(out, values)
    return out


def _worker(rank, world, port, args, outfile):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    torch.set_num_threads(args.threads)
    from contrastgen.distributed import _ring
    if args.chunk_rows:
        _ring.MAX_CHUNK_ROWS = args.chunk_rows
    dtype = getattr(torch, args.dtype)
    image, text, scale = _inputs(args.n, args.d, rank, device, dtype)
    out = {"modes": {}}
    grads = {}
    for mode in args.modes:
        fn = _step_fn(mode, image, text, scale, args.backend)
        dist.barrier()
        fn()                                                      # warm-up
        ms = []
        for _ in range(args.reps):
            dist.barrier()
            t, res = _timed(fn, device)
            ms.append(t)
        grads[mode] = [x.detach().float().cpu() for x in res]
        dist.barrier()
        mem = measure_memory(fn, args.device)
        per_rank = _gather_floats({"ms": ms, "peak_mib": mem.peak_mib, "rss_peak_mib": mem.rss_peak_mib}, world)
        step_ms = [max(r["ms"][i] for r in per_rank) for i in range(args.reps)]
        out["modes"][mode] = {"step_ms_median": statistics.median(step_ms), "step_ms": step_ms,
                              "per_rank": per_rank,
                              "peak_mib_max_over_ranks": max(r["peak_mib"] for r in per_rank),
                              "rss_peak_mib_max_over_ranks": max((r["rss_peak_mib"] or 0) for r in per_rank)}
        del fn, res
    if len(args.modes) == 2:                                     # agreement of the two modes, per rank
        a, b = grads[MODES[0]], grads[MODES[1]]
        diff = {name: (x - y).abs().max().item() / max(x.abs().max().item(), 1e-30)
                for name, x, y in zip(("loss", "d_image", "d_text"), a[:3], b[:3])}
        out["agreement_per_rank"] = _gather_floats(diff, world)
        sums = _gather_floats([a[3].item(), b[3].item()], world)
        sa, sb = sum(s[0] for s in sums), sum(s[1] for s in sums)
        out["d_scale_sum_over_ranks"] = {"all_gather": sa, "ring": sb, "rel_diff": abs(sa - sb) / abs(sa)}
    dist.barrier()
    if rank == 0:                                                # the single-rank fused loss on N_local
        fn = _step_fn("single", image, text, scale, args.backend)
        fn()
        ms = [_timed(fn, device)[0] for _ in range(args.reps)]
        mem = measure_memory(fn, args.device)
        out["single_rank"] = {"step_ms_median": statistics.median(ms), "step_ms": ms, "peak_mib": mem.peak_mib,
                              "rss_peak_mib": mem.rss_peak_mib}
        with open(outfile, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _comm_bytes(world, n, d, elt, acc=4, stat=4):
    """Bytes each rank sends per step (forward + backward)."""
    w1 = world - 1
    return {
        "all_gather": {"forward_allgather_image_text": 2 * w1 * n * d * elt,
                       "backward_reduce_scatter_image_text": 2 * w1 * n * d * elt,
                       "total": 4 * w1 * n * d * elt},
        "ring": {"forward_keys": w1 * n * d * elt, "forward_column_stats": world * n * 3 * stat,
                 "backward_keys": w1 * n * d * elt, "backward_column_meta": w1 * n * 3 * stat,
                 "backward_dk_accumulators": world * n * d * acc,
                 "total": 2 * w1 * n * d * elt + world * n * d * acc + (2 * world - 1) * n * 3 * stat},
    }


def _versions():
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--n", type=int, default=4096, help="N_local, rows per rank")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", default=None, help="kernel backend (default: the device's fused one)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="cuda (NCCL) needs at least --world GPUs; default: cuda if so, else cpu (gloo)")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // world)")
    p.add_argument("--chunk-rows", type=int, default=None, help="override contrastgen.distributed._ring.MAX_CHUNK_ROWS")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.world else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"--device cuda needs {args.world} GPUs (one per rank), found {torch.cuda.device_count()}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world)
    load0 = load_average()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        outfile = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(args.world, _free_port(), args, outfile), nprocs=args.world, join=True)
        with open(outfile) as f:
            res = json.load(f)
    from contrastgen.distributed import _ring
    elt = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    single = res["single_rank"]
    ring = res["modes"].get("ring")
    summary = {}
    if ring is not None and single.get("peak_mib"):
        ratio = ring["peak_mib_max_over_ranks"] / single["peak_mib"]
        summary["ring_peak_over_single_rank_peak"] = ratio
        summary["target_ring_peak_over_single"] = TARGET_RING_OVER_SINGLE
        summary["target_met"] = ratio <= TARGET_RING_OVER_SINGLE
        if single.get("rss_peak_mib"):
            summary["ring_rss_peak_over_single_rank_rss_peak"] = (ring["rss_peak_mib_max_over_ranks"]
                                                                   / single["rss_peak_mib"])
    if "agreement_per_rank" in res:
        summary["max_rel_diff_between_modes"] = max(v for r in res["agreement_per_rank"] for v in r.values()
                                                    if v is not None)
    for mode, r in res["modes"].items():
        summary[f"{mode}_step_ms"] = r["step_ms_median"]
        summary[f"{mode}_peak_mib"] = r["peak_mib_max_over_ranks"]
    summary["single_rank_step_ms"] = single["step_ms_median"]
    summary["single_rank_peak_mib"] = single["peak_mib"]
    meta = {
        "benchmark": "contrastgen.distributed.clip_loss, forward + backward per step, all_gather vs ring",
        "date": datetime.date.today().isoformat(), "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model(),
        "process_group_backend": "nccl" if args.device == "cuda" else "gloo",
        "kernel_backend": args.backend or ("triton" if args.device == "cuda" else "cpp"),
        "world": args.world, "n_local": args.n, "d": args.d, "dtype": args.dtype, "reps": args.reps,
        "threads_per_rank": args.threads, "cpu_count": os.cpu_count(),
        "ring_chunk_rows": args.chunk_rows or _ring.MAX_CHUNK_ROWS,
        "versions": _versions(), "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_start": load0, "load_average_end": load_average(), "wall_s": round(time.time() - t0, 1),
        "timing": "per repeat: barrier, then time.perf_counter around fwd+bwd on every rank (cuda: synchronized); "
                  "step = slowest rank; median over repeats after one warm-up",
        "memory": CUDA_MEMORY_METHOD if args.device == "cuda" else CPU_MEMORY_METHOD,
        "communication_bytes_sent_per_rank": _comm_bytes(args.world, args.n, args.d, elt),
    }
    doc = {"meta": meta, "summary": summary, "results": res}
    out = args.out or os.path.join(ROOT, "benches", "results", f"distributed_{args.device}_{meta['date']}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(summary, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
