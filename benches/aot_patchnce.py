"""AOT compile of the PatchNCE Triton configs only (``kernels/patchnce.py`` AOT_CONFIGS) for sm_80 / sm_90a with the
CI's Triton and Triton 3.6 (the GPU machines'), on a CPU machine; a quicker, scoped form of tests/test_aot_compile.py.

    python benches/aot_patchnce.py [--out benches/results/aot_patchnce_<date>.json]

Prints one line per (Triton, arch, config): registers, spill bytes, shared memory, HGMMA / HMMA counts and fenced
atomics (PTX acq/rel atomics, SASS ATOM/RED beside MEMBAR.GPU / CCTL.IVALL); exits 1 on an error, a spill, an HMMA
in a 16-bit sm_90 config, or a fenced atomic.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys


def _one(arch: int) -> None:
    from contrastgen.kernels import _aot
    from contrastgen.kernels import patchnce as K
    print(json.dumps(_aot.report(arch, configs=[c for c in K.AOT_CONFIGS if arch in c.archs])))


def _run(path: str, arch: int):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["TRITON_CACHE_DIR"] = os.path.join(path, ".triton-cache")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(arch)], capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.one:
        _one(a.one)
        return 0
    import torch
    import triton
    from contrastgen.kernels import _aot
    paths = {"ci": ""}
    p36, why = _aot.ensure_triton(_aot.GPU_TRITON)
    if p36 is None:
        print(f"Triton {_aot.GPU_TRITON}: skipped ({why})", file=sys.stderr)
    else:
        paths[_aot.GPU_TRITON] = p36
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        jobs = {(v, arch): ex.submit(_run, p, arch) for v, p in paths.items() for arch in (80, 90)}
        res = {k: f.result() for k, f in jobs.items()}
    rows, bad = [], []
    for (v, arch), rs in res.items():
        for r in rs:
            if "error" in r:
                bad.append(f"{v} sm_{arch} {r['config']}: {r['error']}")
                continue
            c = r["sass"]["counts"]
            row = {"version": v, "arch": arch, "triton": r["triton"], "config": r["config"],
                   "registers": r["registers"], "spill_bytes": r["spill_bytes"], "shared_mem": r["shared_mem"],
                   "HGMMA": c.get("HGMMA", 0), "HMMA": c.get("HMMA", 0), "ptx_fenced_atomics": r["fenced_atomics"],
                   "sass_fenced_atomics": c.get("fenced_atomics", 0), "MEMBAR": c.get("MEMBAR", 0)}
            rows.append(row)
            sixteen = any(t in ("*bf16", "*fp16") for t in r["signature"].values())
            if row["spill_bytes"] or row["ptx_fenced_atomics"] or row["sass_fenced_atomics"] or (
                    arch == 90 and sixteen and row["HMMA"]):
                bad.append(f"{v} sm_{arch} {r['config']}: {row}")
            print(f"triton {r['triton']} sm_{arch} {r['config']}: regs={row['registers']} spills={row['spill_bytes']} "
                  f"smem={row['shared_mem']} HGMMA={row['HGMMA']} HMMA={row['HMMA']} "
                  f"fenced={row['ptx_fenced_atomics']}/{row['sass_fenced_atomics']}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"what": "AOT compile of kernels/patchnce.py AOT_CONFIGS for sm_80 / sm_90a with the CI's Triton and "
                    "Triton 3.6, on the CPU machine", "date": datetime.date.today().isoformat(), "commit": commit,
            "ci_triton": triton.__version__, "torch": torch.__version__, "command": "python benches/aot_patchnce.py"}
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"aot_patchnce_{meta['date']}.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{len(rows)} configs, {len(bad)} problems; wrote {out}")
    for b in bad:
        print("PROBLEM", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
