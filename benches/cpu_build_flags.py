"""Standalone CPU benchmark of the compiled variants of the C++ kernels (portable AVX-512 / AVX2 builds vs a
``-march=native`` build): the two headline CPU cases, fp32 forward+backward with ``backend="cpp"``.

    clip_loss        N = 8192, D = 256   (unit-norm features, logit scale 1/0.07)
    dispersive_loss  B = 64,   M = 262144 (variant infonce_l2, tau 0.5)

Each variant runs in its own subprocess (``CONTRASTGEN_CPU_VARIANT=<variant>``; the variants are loaded from the
package folder, so build them in place first), and the variants alternate round by round so that a changing
load on the shared machine spreads over all of them.  Per round: one warm-up call, then ``--reps`` timed calls;
the reported time is the median over every timed call of the variant, with the quartiles and the load average
(1 min) seen before and after each round.

    python benches/cpu_build_flags.py --variants native,avx512,avx2 --rounds 3 --reps 5 --threads 2 \
        --json benches/results/cpu_<date>_build_flags.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("clip_loss", "dispersive_huge_dim")


def _child(case: str, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import contrastgen as cg
    from contrastgen.ops import _backends

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    if case == "clip_loss":
        a = F.normalize(torch.randn(8192, 256, generator=g), dim=1).requires_grad_()
        b = F.normalize(torch.randn(8192, 256, generator=g), dim=1).requires_grad_()
        scale = torch.tensor(1 / 0.07)

        def call():
            torch.autograd.grad(cg.clip_loss(a, b, scale, backend="cpp"), (a, b))
    else:
        z = torch.randn(64, 262144, generator=g).requires_grad_()

        def call():
            torch.autograd.grad(cg.dispersive_loss(z, variant="infonce_l2", tau=0.5, backend="cpp"), (z,))
    call()
    load0 = os.getloadavg()[0]
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    info = getattr(_backends, "cpp_build_info", lambda: {})()
    return {"ms": ms, "load_before": load0, "load_after": os.getloadavg()[0], "loaded": info.get("loaded", {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="native,avx512,avx2", help="comma-separated CONTRASTGEN_CPU_VARIANT values; "
                   "'-' runs the package's default choice")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.reps, a.threads)))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    cases = [c for c in a.cases.split(",") if c]
    runs = {(c, v): [] for c in cases for v in variants}
    for r in range(a.rounds):
        for case in cases:
            for v in variants:
                env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
                if v != "-":
                    env["CONTRASTGEN_CPU_VARIANT"] = v
                out = subprocess.run([sys.executable, __file__, "--child", case, "--reps", str(a.reps), "--threads",
                                      str(a.threads)], env=env, capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{case} / {v} failed")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[(case, v)].append(res)
                print(f"round {r} {case:20s} {v:8s} median {statistics.median(res['ms']):8.1f} ms  "
                      f"load {res['load_before']:.2f}->{res['load_after']:.2f}", file=sys.stderr)
    rows = []
    for (case, v), rr in runs.items():
        ms = sorted(x for res in rr for x in res["ms"])
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        loads = [x for res in rr for x in (res["load_before"], res["load_after"])]
        rows.append({"case": case, "variant": v, "ms": statistics.median(ms), "ms_q1": q[0], "ms_q3": q[2],
                     "ms_min": ms[0], "n": len(ms), "load_min": min(loads), "load_max": max(loads),
                     "loaded": rr[-1]["loaded"]})
        print(f"{case:20s} {v:8s} {rows[-1]['ms']:8.1f} ms  IQR {q[0]:.1f}-{q[2]:.1f}  "
              f"load {min(loads):.1f}-{max(loads):.1f}  {rr[-1]['loaded']}")
    if a.json:
        from contrastgen.bench.harness import cpu_model
        doc = {"schema": "contrastgen.build_flags/1", "timestamp": _dt.datetime.now().astimezone().isoformat(
               timespec="seconds"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": a.threads,
               "command": "python benches/cpu_build_flags.py " + " ".join(argv or sys.argv[1:]), "results": rows}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
