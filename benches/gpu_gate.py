"""The pass / fail gate of ``benches/gpu.sh``: reads every bench JSON in a folder and exits non-zero when

* a correctness check of the fused provider (``--fused``, default ``triton``) failed to run, or its error against
  the float64 reference exceeds twice the PyTorch reference's own error at the same precision (loss, and
  gradients where compared), plus a floor of ``--rel-floor`` x the float64 value's magnitude;
* a timed row of the fused provider failed (an exception other than out-of-memory);
* no timed row of the fused provider ran at all.

    python -m benches.gpu_gate OUTDIR [--fused triton] [--rel-floor 1e-6]

Writes OUTDIR/gate.json (the verdict and every check it looked at) and prints one line per check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bench_docs(folder: Path):
    for path in sorted(folder.glob("*.json")):
        if path.name == "gate.json":
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            yield path, None, f"unreadable: {e}"
            continue
        if isinstance(doc, dict) and "results" in doc and "checks" in doc:
            yield path, doc, None


def check_errors(c: dict, rel_floor: float) -> list:
    """Why one correctness check fails the 2x rule ([] when it passes)."""
    if c.get("status") != "ok":
        return [f"check did not run: {c.get('error', c.get('status'))}"]
    why = []
    floor = rel_floor * max(1.0, abs(c.get("loss_ref64", 0.0)))
    if not c["abs_err"] <= 2.0 * c["ref_abs_err"] + floor:       # NaN fails too
        why.append(f"loss error {c['abs_err']:.3g} > 2 x reference error {c['ref_abs_err']:.3g} + {floor:.2g}")
    g, rg = c.get("grad_abs_err"), c.get("ref_grad_abs_err")
    if g is not None and rg is not None:
        gfloor = rel_floor * (c.get("grad_ref64_abs_max") or 0.0)
        if not g <= 2.0 * rg + gfloor:          # NaN fails too
            why.append(f"gradient error {g:.3g} > 2 x reference error {rg:.3g} + {gfloor:.2g}")
    return why


def gate(folder: Path, fused: str = "triton", rel_floor: float = 1e-6) -> tuple:
    """(ok, report dict) for the bench JSON files in ``folder``."""
    failures, checks, rows_ok, rows_failed, files = [], [], 0, 0, []
    for path, doc, err in _bench_docs(folder):
        files.append(path.name)
        if doc is None:
            failures.append(f"{path.name}: {err}")
            continue
        for c in doc["checks"]:
            if c.get("provider") != fused:
                continue
            why = check_errors(c, rel_floor)
            checks.append({"file": path.name, "op": c.get("op"), "dtype": c.get("dtype"), "shape": c.get("shape"),
                           "abs_err": c.get("abs_err"), "ref_abs_err": c.get("ref_abs_err"),
                           "grad_abs_err": c.get("grad_abs_err"), "ref_grad_abs_err": c.get("ref_grad_abs_err"),
                           "ok": not why, "why": why})
            failures += [f"{path.name}: {c.get('op')} {c.get('dtype')}: {w}" for w in why]
        for r in doc["results"]:
            if r.get("provider") != fused:
                continue
            if r.get("status") == "ok":
                rows_ok += 1
            elif r.get("status") == "failed" and not r.get("oom"):
                rows_failed += 1
                failures.append(f"{path.name}: {r.get('op')} {r.get('shape_str')} {r.get('mode')}: "
                                f"{fused} row failed: {r.get('reason')}")
    if rows_ok == 0:
        failures.append(f"no {fused} row ran (files: {', '.join(files) or 'none'})")
    report = {"ok": not failures, "fused": fused, "rel_floor": rel_floor, "files": files, "rows_ok": rows_ok,
              "rows_failed": rows_failed, "checks": checks, "failures": failures}
    return not failures, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--fused", default="triton")
    ap.add_argument("--rel-floor", type=float, default=1e-6)
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    ok, report = gate(folder, a.fused, a.rel_floor)
    for c in report["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['op']} {c['dtype']} {c['shape']}: loss err {c['abs_err']} "
              f"(ref {c['ref_abs_err']}), grad err {c['grad_abs_err']} (ref {c['ref_grad_abs_err']})")
    print(f"{report['rows_ok']} {a.fused} row(s) ran, {report['rows_failed']} failed")
    for f in report["failures"]:
        print("FAIL:", f)
    (folder / "gate.json").write_text(json.dumps(report, indent=1, default=str))
    print("gate:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
