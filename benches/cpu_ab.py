"""A/B timing of two source trees of contrastgen on the C++ backend (CPU), interleaved.

Each round runs one fresh subprocess per tree (``PYTHONPATH=<tree>``; each tree has its own built extension),
alternating A, B, A, B, ... so that the load of the shared machine falls on both alike.  In each subprocess every
case runs one warm-up fwd+bwd and then ``--reps`` timed fwd+bwd calls through the public API
(``backend="cpp"``, autograd backward).  Reported: per case and tree the median and min over all rounds, the
B/A ratio of the medians, and the load average (1 min) before and after each subprocess.

    python benches/cpu_ab.py --a /tmp/base --b . --rounds 4 --out benches/results/cpu_<date>_<tag>.json
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (callable name, shape); built in the child
CASES = {
    "clip_loss N=8192 D=256 scale=14.3": ("clip", dict(n=8192, d=256, scale=1 / 0.07)),
    "clip_loss N=8192 D=256 scale=100": ("clip", dict(n=8192, d=256, scale=100.0)),
    "nt_xent N=4096 D=128": ("nt_xent", dict(n=4096, d=128)),
    "info_nce/supcon N=4096 D=256": ("supcon", dict(n=4096, d=256, positives="supcon")),
    "info_nce/pml N=4096 D=256": ("supcon", dict(n=4096, d=256, positives="pml")),
}


def _child(reps: int, names):
    import torch
    import torch.nn.functional as F

    import contrastgen as cg

    torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
    g = torch.Generator().manual_seed(0)

    def unit(n, d):
        return F.normalize(torch.randn(n, d, generator=g), dim=1)

    out = {}
    for name in names:
        kind, s = CASES[name]
        n, d = s["n"], s["d"]
        if kind == "clip":
            a, b = unit(n, d), unit(n, d)
            sc = torch.tensor(s["scale"])

            def step():
                x, y, t = a.clone().requires_grad_(), b.clone().requires_grad_(), sc.clone().requires_grad_()
                cg.clip_loss(x, y, t, backend="cpp").backward()
        elif kind == "nt_xent":
            a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)

            def step():
                x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
                cg.nt_xent(x, y, temperature=0.5, backend="cpp").backward()
        else:
            a = unit(n, d)
            labels = torch.arange(n) % max(1, n // 4)

            def step(pos=s["positives"]):
                x = a.clone().requires_grad_()
                cg.info_nce(x, labels=labels, positives=pos, temperature=0.1, backend="cpp").backward()
        step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = times
    print(json.dumps(out))


def _git(tree):
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="tree A (baseline), with its extension built in place")
    ap.add_argument("--b", default=ROOT, help="tree B (default: this checkout)")
    ap.add_argument("--a-label", default=None, help="label of A in the JSON (e.g. its commit)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", action="append", help=f"subset of {list(CASES)}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.case or list(CASES)
    if args.child:
        return _child(args.reps, names)
    trees = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    times = {t: {n: [] for n in names} for t in trees}
    loads = []
    for r in range(args.rounds):
        for t in (("A", "B") if r % 2 == 0 else ("B", "A")):
            env = dict(os.environ, PYTHONPATH=trees[t], AB_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
            l0 = os.getloadavg()[0]
            cmd = [sys.executable, os.path.abspath(__file__), "--a", trees["A"], "--child", "--reps", str(args.reps)]
            for n in names:
                cmd += ["--case", n]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
            if res.returncode:
                raise SystemExit(f"child {t} failed:\n{res.stderr[-3000:]}")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            loads.append({"round": r, "tree": t, "load_before": l0, "load_after": os.getloadavg()[0]})
            for n in names:
                times[t][n] += got[n]
            print(f"round {r} {t}: " + ", ".join(f"{n.split()[0]} {statistics.median(got[n]):.0f} ms" for n in names),
                  flush=True)
    summary = {}
    for n in names:
        ma, mb = statistics.median(times["A"][n]), statistics.median(times["B"][n])
        summary[n] = {"A_median_ms": ma, "A_min_ms": min(times["A"][n]), "B_median_ms": mb,
                      "B_min_ms": min(times["B"][n]), "B_over_A": mb / ma}
        print(f"{n:40s} A {ma:8.1f} ms  B {mb:8.1f} ms  B/A {mb / ma:.3f}  (min {min(times['A'][n]):.1f} / "
              f"{min(times['B'][n]):.1f})")
    import torch
    rec = {"date": datetime.date.today().isoformat(), "device": "cpu", "cpu": platform.processor() or platform.machine(),
           "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
           "A": {"tree": trees["A"], "commit": args.a_label or _git(trees["A"])},
           "B": {"tree": trees["B"], "commit": _git(trees["B"])},
           "rounds": args.rounds, "reps": args.reps, "load": loads, "summary": summary, "times_ms": times}
    try:
        sys.path.insert(0, ROOT)
        from contrastgen.bench.harness import cpu_model
        rec["cpu"] = cpu_model()
    except Exception:
        pass
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
