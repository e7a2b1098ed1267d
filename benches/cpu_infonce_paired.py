"""CPU benchmark of InfoNCE with per-query negatives (``contrastgen.info_nce(q, k, negatives=(N, M, D))``).

Providers (float32, diagonal positive, per-query negatives only -- CoDE's ``negative_mode="paired"``; and the DCR
form: two positives per anchor via labels, B - 1 negatives each):
  * ``reference``  the dense PyTorch reference (``contrastgen.reference.info_nce_paired_ref``) with autograd
  * ``compile``    ``torch.compile`` of that reference (inductor)
  * ``loop``       the Python loop it replaces: one ``contrastgen.info_nce`` call per query (its negatives as a
                   (M, D) bank, fused C++ backend), losses averaged
  * ``cpp``        the fused op (C++ backend)
Modes: ``fwd`` and ``fwd+bwd`` (gradients of q, k and the negatives).  Times are medians (contrastgen.bench.harness.time_fn);
peak memory is the torch allocator peak of one fwd+bwd call above the inputs (contrastgen.bench.harness.measure_memory).
Every provider's loss and gradients are checked against a float64 evaluation of the reference before timing.
The machine's load average is recorded before and after (the machine is shared).

    python benches/cpu_infonce_paired.py --threads 2 [--tag NAME]   # writes benches/results/cpu_<date>_<tag>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import contrastgen as cg  # noqa: E402
from contrastgen.bench.harness import cpu_model, git, load_average, measure_memory, setup_threads, time_fn  # noqa: E402
from contrastgen import reference as R  # noqa: E402

# (name, N queries, M negatives per query, D, form)
SHAPES = [
    ("code_paired", 256, 64, 256, "diagonal"),
    ("code_paired_wide", 64, 1024, 256, "diagonal"),
    ("moco_like", 1024, 32, 128, "diagonal"),
    ("dcr_sd_latent", 16, 15, 4096, "dcr"),
    ("dcr_large_batch", 64, 63, 1024, "dcr"),
]
PROVIDERS = ("reference", "compile", "loop", "cpp")


def make(n, m, d, form, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    negs = F.normalize(torch.randn(n, m, d, generator=g), dim=-1)
    if form == "diagonal":
        k = F.normalize(q + 0.3 * torch.randn(n, d, generator=g), dim=-1)
        kw = {}
    else:   # DCR: key = [p; v], two positives per anchor
        k = F.normalize(torch.randn(2 * n, d, generator=g), dim=-1)
        kw = dict(labels=torch.arange(n), key_labels=torch.arange(n).repeat(2), positives="supcon")
    return q, k, negs, kw


def loss_fn(provider, form, kw, compiled):
    tau = 0.1
    if provider == "reference":
        return lambda q, k, n: R.info_nce_paired_ref(q, k, n, temperature=tau, **kw)
    if provider == "compile":
        return lambda q, k, n: compiled(q, k, n)
    if provider == "cpp":
        return lambda q, k, n: cg.info_nce(q, k, negatives=n, temperature=tau, backend="cpp", **kw)
    if form == "diagonal":
        return lambda q, k, n: torch.stack([cg.info_nce(q[i:i + 1], k[i:i + 1], negatives=n[i], temperature=tau,
                                                        in_batch_negatives=False, backend="cpp")
                                            for i in range(q.shape[0])]).mean()
    b = kw["labels"].shape[0]
    lab1 = torch.zeros(1, dtype=torch.long)
    return lambda q, k, n: torch.stack([cg.info_nce(q[i:i + 1], torch.stack([k[i], k[b + i]]), labels=lab1,
                                                    key_labels=torch.zeros(2, dtype=torch.long), positives="supcon",
                                                    negatives=n[i], in_batch_negatives=False, temperature=tau,
                                                    backend="cpp")
                                        for i in range(b)]).mean()


def run_case(name, n, m, d, form, providers, budget):
    q0, k0, n0, kw = make(n, m, d, form)
    leaves64 = [t.double().requires_grad_() for t in (q0, k0, n0)]
    ref64 = R.info_nce_paired_ref(*leaves64, temperature=0.1, **kw)
    g64 = torch.autograd.grad(ref64, leaves64)
    compiled = None
    if "compile" in providers:
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, n: R.info_nce_paired_ref(q, k, n, temperature=0.1, **kw))
    rows = []
    for p in providers:
        fn = loss_fn(p, form, kw, compiled)
        leaves = [t.clone().requires_grad_() for t in (q0, k0, n0)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves)
        err = max([abs(out.item() - ref64.item())] + [(a.double() - b).abs().max().item() for a, b in zip(grads, g64)])

        def fwd():
            with torch.no_grad():
                return fn(*leaves)

        def fwd_bwd():
            o = fn(*leaves)
            return torch.autograd.grad(o, leaves)

        t_f = time_fn(fwd, "cpu", budget_s=budget)
        t_fb = time_fn(fwd_bwd, "cpu", budget_s=budget)
        mem = measure_memory(fwd_bwd, "cpu")
        rows.append({"case": name, "N": n, "M": m, "D": d, "form": form, "provider": p,
                     "fwd_ms": round(t_f.ms, 3), "fwd_bwd_ms": round(t_fb.ms, 3), "fwd_bwd_ms_min": round(t_fb.ms_min, 3),
                     "reps": t_fb.reps, "peak_mib": round(mem.peak_mib, 2), "max_abs_err_vs_fp64": err,
                     "negatives_mib": round(n * m * d * 4 / 2 ** 20, 2),
                     "negatives_gb_per_s_fwd": round(n * m * d * 4 / (t_f.ms * 1e-3) / 1e9, 2)})
        print(f"{name:<18} N={n:<5} M={m:<5} D={d:<5} {p:<10} fwd {t_f.ms:9.2f} ms  fwd+bwd {t_fb.ms:9.2f} ms  "
              f"peak {mem.peak_mib:8.1f} MiB  err {err:.2e}", flush=True)
    base = {r["provider"]: r for r in rows}
    for r in rows:
        for other in ("reference", "loop"):
            if other in base:
                r[f"speedup_fwd_bwd_vs_{other}"] = round(base[other]["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--cases", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per timing")
    ap.add_argument("--tag", default="infonce_paired")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    threads = setup_threads(a.threads)
    providers = [p for p in a.providers.split(",") if p]
    load0 = load_average()
    rows = []
    for s in SHAPES:
        if s[0] in a.cases.split(","):
            rows += run_case(*s, providers, a.budget)
    load1 = load_average()
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join(ROOT, "benches", "results", f"cpu_{date}_{a.tag}.json")
    meta = {"benchmark": "info_nce with per-query negatives (benches/cpu_infonce_paired.py)", "date": date,
            "device": "cpu", "cpu": cpu_model(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "load_average_1min": {"before": load0, "after": load1}, "temperature": 0.1, "dtype": "float32",
            "memory_method": "torch.profiler allocator peak of one fwd+bwd call (contrastgen.bench.harness.measure_memory)"}
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {out} (load average {load0} -> {load1})")


if __name__ == "__main__":
    main()
