"""PNG of a benchmark run: per op, time and peak memory vs size per provider side by side (log-log, matplotlib Agg)."""
from __future__ import annotations

import math
from pathlib import Path

STYLE = {"reference": ("k", "o"), "compile": ("tab:gray", "s"), "cpp": ("tab:red", "D"), "triton": ("tab:red", "D"),
         "open_clip": ("tab:blue", "^"), "pml": ("tab:green", "v"), "keops": ("tab:purple", "P"),
         "inf_cl": ("tab:orange", "X")}


def _panel(ax, rows, xkey, ykey, ylabel, title):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    # A line per provider x dtype x the shape keys other than the x-axis that vary within the op.
    varying = [k for k in rows[0]["shape"] if k != xkey and len({r["shape"].get(k) for r in rows}) > 1]
    multi_dtype = len({r["dtype"] for r in rows}) > 1
    lines = {}
    for r in rows:
        if r.get(ykey) is None:
            continue
        label = r["provider"] + "".join(f" {k}={r['shape'][k]}" for k in varying) + \
            (f" {r['dtype']}" if multi_dtype else "")
        lines.setdefault(label, []).append((r["shape"][xkey], max(r[ykey], 1e-3), r["provider"]))
    for label, pts in sorted(lines.items()):
        pts.sort()
        color, marker = STYLE.get(pts[0][2], (None, "o"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color if len(varying) == 0 else None,
                label=label, linewidth=1.4, markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted({r["shape"][xkey] for r in rows})
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x // 1024}k" if x >= 8192 and x % 1024 == 0 else str(x) for x in xs], fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xkey)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=7)


def plot_results(doc, path, mode_pref=("fwd+bwd", "fwd", "bwd")) -> Path:
    """Two panels per op, side by side: median time and peak memory against the op's size axis."""
    from .._optional import require
    matplotlib = require("matplotlib", extra="bench", what="the benchmark plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    ops = []
    for r in ok:
        if r["op"] not in ops:
            ops.append(r["op"])
    if not ops:
        raise ValueError("no successful results to plot")
    per_row = min(2, len(ops))                      # ops per figure row; each op takes two axes (time | memory)
    nrows = math.ceil(len(ops) / per_row)
    fig, axes = plt.subplots(nrows, 2 * per_row, figsize=(4.6 * 2 * per_row, 3.7 * nrows), squeeze=False)
    meta = doc["meta"]
    for i, op in enumerate(ops):
        ax_t, ax_m = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
        rows = [r for r in ok if r["op"] == op]
        mode = next((m for m in mode_pref if any(r["mode"] == m for r in rows)), rows[0]["mode"])
        rows = [r for r in rows if r["mode"] == mode]
        xkey = rows[0]["x"]
        _panel(ax_t, rows, xkey, "ms", f"{mode} time (ms)", f"{op}: time")
        _panel(ax_m, rows, xkey, "peak_mib", "peak memory (MiB)", f"{op}: peak memory")
    for ax in list(axes.flat)[2 * len(ops):]:
        ax.axis("off")
    load = meta.get("load_average")
    fig.suptitle(f"contrastgen bench: {meta.get('device_name')} ({meta.get('torch_threads')} threads), "
                 f"torch {meta['versions'].get('torch')}, {meta.get('timestamp', '')[:10]}"
                 + (f", load {load:.1f}" if load is not None else "") + (" (LOADED)" if meta.get("loaded") else ""),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    """``contrastgen bench plot RUN.json [OUT.png]``: (re)draw the plot of a saved run."""
    import json
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main.__doc__)
        return 2
    src = Path(argv[0])
    out = plot_results(json.loads(src.read_text()), Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
