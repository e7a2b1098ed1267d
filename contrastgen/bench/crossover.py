"""``contrastgen bench --crossover``: measure where the dense PyTorch reference stops beating the fused kernel.

For each op and feature dimension, the problem size grows through a grid; at each size the reference
(``backend="torch"``) and the fused kernel (``backend="cpp"`` on CPU, ``"triton"`` on CUDA) are timed
forward+backward in float32, interleaved (median of repeats, :func:`contrastgen.bench.harness.time_fn`).  The
crossover at that dimension is the number of pairs (see :mod:`contrastgen.ops._crossover`) below which the
reference was faster: the geometric midpoint between the last size the reference won and the first size from
which the kernel won every larger size.  The sweep stops once the kernel has won two sizes in a row.

The whole sweep runs ``--passes`` times (default 2); the recorded crossover is the smallest of the passes
(the conservative value: the dense path is taken only where it won every time), and the load average of each
pass is recorded.  The output is a crossover file (schema ``contrastgen.crossover/1``): use it with
``CONTRASTGEN_CROSSOVER=FILE`` or ``contrastgen.set_crossover(FILE)``; ``--update-package`` writes it over the
packaged ``contrastgen/ops/crossover.json`` (for maintainers).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import harness as H

# public op -> (registry case, shape builder (size, dim) -> shape dict, pairs(shape), dims, sizes)
_NS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
OPS: Dict[str, dict] = {
    "clip_loss": dict(case="clip_loss", shape=lambda n, d: {"N": n, "D": d}, pairs=lambda s: s["N"] ** 2,
                      dims=(64, 256, 1024), sizes=_NS),
    "info_nce": dict(case="info_nce/diagonal", shape=lambda n, d: {"N": n, "D": d}, pairs=lambda s: s["N"] ** 2,
                     dims=(64, 256, 1024), sizes=_NS),
    "siglip_loss": dict(case="siglip_loss", shape=lambda n, d: {"N": n, "D": d}, pairs=lambda s: s["N"] ** 2,
                        dims=(64, 256, 1024), sizes=_NS),
    "nt_xent": dict(case="nt_xent", shape=lambda n, d: {"N": n, "D": d}, pairs=lambda s: (2 * s["N"]) ** 2,
                    dims=(64, 256, 1024), sizes=tuple(n // 2 for n in _NS)),
    "dispersive_loss": dict(case="dispersive_loss/huge_dim", shape=lambda b, m: {"B": b, "M": m},
                            pairs=lambda s: s["B"] ** 2, dims=(64, 4096, 65536),
                            sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048)),
    "uniformity": dict(case="uniformity", shape=lambda n, d: {"N": n, "D": d}, pairs=lambda s: s["N"] ** 2,
                       dims=(16, 64, 256), sizes=_NS),
}


def _fused(device: str) -> str:
    return "cpp" if device == "cpu" else "triton"


def _time(spec, shape, backend, device, budget):
    import contrastgen
    api = getattr(contrastgen, spec.api)
    inp = spec.make(shape, torch.float32, device)

    def call():
        loss = api(*inp.args, **inp.kwargs, backend=backend)
        return torch.autograd.grad(loss if loss.dim() == 0 else loss.sum(), inp.grads, allow_unused=True)
    call()
    return H.time_fn(call, device, warmup=1, budget_s=budget, min_reps=5, max_reps=50).ms


def sweep(op: str, dim: int, device: str, budget: float, log=print, max_size: Optional[int] = None) -> dict:
    """One pass over the sizes of ``op`` at ``dim``: the timings and the crossover in pairs."""
    from . import cases as C
    cfg = OPS[op]
    spec = next(s for s in C.all_specs() if s.name == cfg["case"])
    points, wins = [], 0
    for size in cfg["sizes"]:
        if max_size and size > max_size:
            break
        shape = cfg["shape"](size, dim)
        if 4.0 * cfg["pairs"](shape) * 8 > 0.5 * H.available_bytes(device):
            break
        ref = _time(spec, shape, "torch", device, budget)
        fused = _time(spec, shape, _fused(device), device, budget)
        points.append({"shape": shape, "pairs": cfg["pairs"](shape), "ref_ms": ref, "fused_ms": fused})
        log(f"  {op:16s} dim {dim:6d} size {size:5d}: reference {ref:9.3f} ms, {_fused(device)} {fused:9.3f} ms")
        wins = wins + 1 if fused < ref else 0
        if wins >= 2:
            break
    return {"dim": dim, "pairs_below": round(crossover_pairs(points)), "points": points}


def crossover_pairs(points: List[dict]) -> float:
    """Pairs below which the reference won: the geometric midpoint between the last size the reference won and the
    first size of the final run of kernel wins; 0 if the kernel won from the smallest size; the largest measured
    size if it never won (no extrapolation)."""
    first_final = len(points)
    for i in range(len(points) - 1, -1, -1):
        if points[i]["fused_ms"] < points[i]["ref_ms"]:
            first_final = i
        else:
            break
    if first_final == 0:
        return 0.0
    if first_final == len(points):
        return float(points[-1]["pairs"]) if points else 0.0
    return math.sqrt(points[first_final - 1]["pairs"] * points[first_final]["pairs"])


def measure(ops: List[str], device: str, passes: int = 2, budget: float = 0.15, log=print,
            max_size: Optional[int] = None) -> dict:
    passes_out = []
    for p in range(passes):
        load0 = H.load_average()
        runs = {op: [sweep(op, d, device, budget, log, max_size) for d in OPS[op]["dims"]] for op in ops}
        passes_out.append({"load_average_start": load0, "load_average_end": H.load_average(), "runs": runs})
        log(f"pass {p}: load average {load0} -> {passes_out[-1]['load_average_end']}")
    rules: Dict[str, dict] = {}
    for op in ops:
        pts = []
        for i, d in enumerate(OPS[op]["dims"]):
            vals = [ps["runs"][op][i]["pairs_below"] for ps in passes_out]
            pts.append({"dim": d, "pairs_below": min(vals), "passes": vals})
        rules[op] = {device: {"points": pts}}
    import contrastgen
    return {
        "schema": "contrastgen.crossover/1",
        "meta": {
            "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else H.cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "contrastgen": contrastgen.__version__},
            "git_commit": H.git("rev-parse", "HEAD"),
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "fwd+bwd", "dtype": "float32", "fused_backend": _fused(device),
            "rule": "pairs_below = the smallest over passes of the crossover (the conservative value)",
            "load_average": [(ps["load_average_start"], ps["load_average_end"]) for ps in passes_out],
        },
        "rules": rules,
        "passes": passes_out,
    }


def merge_into(path: Path, doc: dict) -> dict:
    """Replace the rules of ``doc``'s ops on its device in the crossover file at ``path`` (other rules kept)."""
    old = json.loads(path.read_text()) if path.exists() else {"schema": doc["schema"], "rules": {}}
    device = doc["meta"]["device"]
    for op, per_device in doc["rules"].items():
        old.setdefault("rules", {}).setdefault(op, {})[device] = per_device[device]
    old.setdefault("meta", {})[device] = doc["meta"]
    old.pop("passes", None)
    return old


def main(args, out_dir: Path) -> int:
    """Entry point used by ``contrastgen bench --crossover`` (args: the bench run's parsed arguments)."""
    from ..ops import _crossover
    device = args.device or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--crossover --device cuda: no CUDA device here")
    H.setup_threads(args.threads)
    ops = [o for o in (args.op and ",".join(args.op).split(",") or OPS) if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"--crossover: unknown op(s) {unknown}; measured ops: {', '.join(OPS)}")
    load = H.load_average()
    print(f"crossover sweep on {device} ({torch.get_num_threads()} threads), load average {load}", file=sys.stderr)
    doc = measure(ops, device, passes=args.passes, budget=args.budget or 0.15,
                  log=lambda s: print(s, file=sys.stderr), max_size=args.max_n)
    path = Path(args.json) if args.json else out_dir / f"crossover_{device}_{_dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    for op, per_device in doc["rules"].items():
        pts = ", ".join(f"dim {p['dim']}: {p['pairs_below']} (passes {p['passes']})"
                        for p in per_device[device]["points"])
        print(f"{op:16s} {device}: dense reference below  {pts}")
    print(f"\nJSON: {path}   (use it: CONTRASTGEN_CROSSOVER={path})")
    if args.update_package:
        merged = merge_into(_crossover.DATA_FILE, doc)
        _crossover.DATA_FILE.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"updated {_crossover.DATA_FILE}")
    return 0


def summary() -> Optional[str]:
    from ..ops import _crossover
    try:
        return "\n".join(_crossover.describe())
    except ValueError as e:
        return f"crossover data unreadable: {e}"
