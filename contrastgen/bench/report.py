"""Tables from benchmark results.

* :func:`format_table` -- the plain-text table ``contrastgen bench`` prints for one run.
* ``contrastgen bench report [--dir DIR] [--mode fwd+bwd|all] [--provider ...]`` (also ``python -m
  benches.report`` in a checkout) -- a markdown summary of the latest result per op / shape / dtype / mode /
  provider across the runs in DIR (default ``./contrastgen-bench``), for the README.  Runs of different machines
  (device name, core count, host) are never merged: each machine gets its own section.  Within a section every
  row names the run it comes from, each run is listed with its date, threads and load, and a section that mixes
  idle and loaded runs says so in its header.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path("contrastgen-bench")


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _ratio(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _rate(r):
    if r.get("gbps") is not None:
        return f"{r['gbps']:.1f} GB/s"
    if r.get("tflops") is not None:
        t = r["tflops"]
        s = f"{t * 1e3:.1f} GF/s" if t < 1 else f"{t:.1f} TF/s"
        if r.get("pct_matmul") is not None:
            s += f" ({r['pct_matmul']:.0f}%)"
        return s
    return "-"


def _grid(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _iqr(r):
    if r.get("ms_q1") is None or r.get("ms_q3") is None or not r.get("ms"):
        return "-"
    return f"±{50.0 * (r['ms_q3'] - r['ms_q1']) / r['ms']:.0f}%"


def _load_str(meta):
    a, b = meta.get("load_average"), meta.get("load_average_end")
    if a is None:
        return "load unknown"
    return f"load {a:.1f}" + (f"->{b:.1f}" if b is not None else "") + f" on {meta.get('cpu_count')} cores"


def format_table(doc) -> str:
    """Plain-text table of one run: one block per op; skipped providers summarised under it."""
    meta, results = doc["meta"], doc["results"]
    out = [f"contrastgen bench on {meta.get('device_name')} ({meta.get('device')}, {meta.get('torch_threads')} threads), "
           f"torch {meta['versions'].get('torch')}, commit {str(meta.get('git_commit') or '-')[:10]}, "
           f"{_load_str(meta)}"]
    if meta.get("loaded"):
        out.append("!! LOADED MACHINE: other processes kept more than half the cores busy during this run; "
                   "times are inflated and noisy (see the spread column), compare ratios, not absolute times")
    mm = meta.get("matmul_tflops")
    if mm:
        parts = [f"{dt} D={d}: {v * 1e3:.0f} GF/s" if v and v < 1 else f"{dt} D={d}: {v:.1f} TF/s"
                 for dt, per in mm.items() for d, v in per.items() if v]
        out.append(f"matmul rate (N={meta.get('matmul_N')}): " + ", ".join(parts))
    out.append("ms = median; spread = half the interquartile range of the repeats, in % of the median; speedup and "
               "mem x are vs the reference of the same run; err = |loss - float64 reference| at a small shape "
               "(reference's own error in brackets)")
    ops = []
    for r in results:
        if r["op"] not in ops:
            ops.append(r["op"])
    header = ["shape", "dtype", "mode", "provider", "ms", "spread", "speedup", "peak MiB", "mem x", "rate", "err"]
    for op in ops:
        rows, skipped = [], {}
        for r in results:
            if r["op"] != op:
                continue
            if r["status"] in ("skipped", "planned"):
                if r["status"] == "planned":
                    rows.append([r["shape_str"], r["dtype"], r["mode"], r["provider"], "planned", "", "", "", "", "",
                                 ""])
                else:
                    skipped.setdefault(r["provider"], r.get("reason"))
                continue
            if r["status"] == "failed":
                rows.append([r["shape_str"], r["dtype"], r["mode"], r["provider"],
                             "FAILED", "", "", "", "", "", (r.get("reason") or "")[:60]])
                continue
            err = "-"
            if r.get("check_abs_err") is not None:
                err = f"{r['check_abs_err']:.1e} [{r.get('check_ref_abs_err', 0):.0e}]"
            rows.append([r["shape_str"], r["dtype"], r["mode"], r["provider"], _ms(r["ms"]), _iqr(r),
                         _ratio(r.get("speedup")), _f(r.get("peak_mib"), ".1f"), _ratio(r.get("mem_ratio")),
                         _rate(r), err])
        out.append(f"\n== {op}")
        if rows:
            out.append(_grid(header, rows))
        by_reason = {}
        for p, why in skipped.items():
            if not any(row[3] == p for row in rows):
                why = "no implementation" if why == f"no {p} implementation of {op}" else why
                by_reason.setdefault(why, []).append(p)
        for why, provs in by_reason.items():
            out.append(f"   skipped {', '.join(provs)}: {why}")
    return "\n".join(out)


# --------------------------------------------------------------------------- markdown across runs
def load(results_dir: Path):
    """The harness runs (``contrastgen bench`` JSON) in ``results_dir``; other JSON files are ignored."""
    docs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {p}: {e}", file=sys.stderr)
            continue
        # Harness runs only; the standalone scripts' JSON (benches/cpu_infonce.py, ...) has its own schema.
        if (isinstance(doc, dict) and "meta" in doc and isinstance(doc.get("results"), list)
                and "device_name" in doc["meta"] and all(isinstance(r, dict) and "status" in r for r in doc["results"])):
            doc["_path"] = p.name
            docs.append(doc)
    return docs


def machine_of(meta) -> str:
    """Runs with the same machine key are comparable; schema-1 runs (no key recorded) fall back to the device name
    and core count."""
    return meta.get("machine") or f"{meta.get('device_name')} | {meta.get('cpu_count')} cores"


def run_loaded(meta) -> bool:
    if "loaded" in meta:
        return bool(meta["loaded"])
    load = meta.get("load_average")      # schema 1: only the load when the run started
    return load is not None and load > 0.5 * (meta.get("cpu_count") or 1)


def latest(docs, mode="fwd+bwd", providers=None):
    """{(machine, op, shape_str, dtype, mode, provider): (row, meta, file)} keeping the newest run."""
    best = {}
    for doc in sorted(docs, key=lambda d: d["meta"].get("timestamp", "")):
        meta = doc["meta"]
        for r in doc["results"]:
            if r["status"] != "ok" or (mode != "all" and r["mode"] != mode):
                continue
            if providers and r["provider"] not in providers:
                continue
            key = (machine_of(meta), r["op"], r["shape_str"], r["dtype"], r["mode"], r["provider"])
            best[key] = (r, meta, doc["_path"])
    return best


def markdown(docs, mode="fwd+bwd", providers=None) -> str:
    best = latest(docs, mode, providers)
    by_machine = {}
    for key, val in best.items():
        by_machine.setdefault(key[0], []).append((key, val))
    out = []
    if len(by_machine) > 1:
        out.append(f"Runs of {len(by_machine)} different machines: one section each; times are not comparable "
                   "across sections.\n")
    for machine, items in by_machine.items():
        files = sorted({v[2] for _, v in items}, key=lambda f: next(v[1].get("timestamp", "") for _, v in items
                                                                     if v[2] == f))
        metas = {v[2]: v[1] for _, v in items}
        ref = {f: i + 1 for i, f in enumerate(files)}
        m = metas[files[-1]]
        out.append(f"#### {m.get('device_name')} ({m.get('cpu_count')} cores, {m.get('hostname') or 'host unknown'})\n")
        loaded = {f: run_loaded(metas[f]) for f in files}
        if len(set(loaded.values())) > 1:
            out.append("**Mixed loads:** this table combines runs on an idle and on a loaded machine (marked "
                       "*loaded* below); compare times only within one run.\n")
        elif all(loaded.values()):
            out.append("**Loaded machine:** every run below was taken while other processes kept more than half "
                       "the cores busy; times are inflated.\n")
        out.append("Runs:\n")
        for f in files:
            mm = metas[f]
            out.append(f"* [{ref[f]}] `{f}`: {str(mm.get('timestamp', ''))[:16]}, torch "
                       f"{mm['versions'].get('torch')}, {mm.get('torch_threads')} threads, {_load_str(mm)}"
                       + (", *loaded*" if loaded[f] else ""))
        out.append(f"\nMode: {mode}; speedup and memory ratio are vs the PyTorch reference of the same run; "
                   "spread = half the interquartile range.\n")
        out.append("| op | shape | dtype | mode | provider | ms | spread | speedup | peak MiB | rate | run |")
        out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        order = {"reference": 0, "compile": 1, "cpp": 2, "triton": 3}
        items.sort(key=lambda kv: (kv[0][1], kv[1][0]["shape"].get(kv[1][0]["x"], 0), kv[0][2], kv[0][3], kv[0][4],
                                   order.get(kv[0][5], 9), kv[0][5]))
        for (_, op, shape, dtype, md, prov), (r, _, f) in items:
            out.append(f"| {op} | {shape} | {dtype} | {md} | {prov} | {_ms(r['ms'])} | {_iqr(r)} | "
                       f"{_ratio(r.get('speedup'))} | {_f(r.get('peak_mib'), '.1f')} | {_rate(r)} | {ref[f]} |")
        out.append("")
    return "\n".join(out) if out else "(no results)"


def main(argv=None):
    p = argparse.ArgumentParser(prog="contrastgen bench report", description="Markdown table of the latest result "
                                "per op / shape / dtype / mode / provider across saved runs, one section per machine.")
    p.add_argument("--dir", default=str(RESULTS_DIR), help="folder of run JSON files (default ./contrastgen-bench)")
    p.add_argument("--mode", default="fwd+bwd", help="fwd, bwd, fwd+bwd or all")
    p.add_argument("--provider", action="append", help="only these providers (repeatable)")
    a = p.parse_args(argv)
    if not Path(a.dir).is_dir():
        raise SystemExit(f"no such folder {a.dir!r} (pass --dir: the --out folder of `contrastgen bench`)")
    print(markdown(load(Path(a.dir)), a.mode, a.provider))
    return 0


if __name__ == "__main__":
    sys.exit(main())
