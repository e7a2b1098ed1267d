"""Roofline estimates of the headline cases from the kernels' tiling and their SASS -- an ESTIMATE, not a measurement.

    python -m contrastgen.kernels.roofline [--json PATH] [--l2-tbps 7.2] [--case NAME]

For every headline case each kernel module contributes ``roofline_model(case) -> list[dict]``, one row per launch
(or dense product) of the case, with keys

    kernel       name;  aot_config  the AotConfig launched (None: a cuBLAS product through torch.mm)
    ctas         programs launched;  flops, hbm_bytes, l2_bytes  from the tiling (see the module's docstring)
    note         how the numbers were counted
    optional:    tiles (tiles the programs process on their common path, all programs together),
                 inner_trips (iterations of the tile's D loop), phase ("fwd" / "bwd")

This command compiles each ``aot_config`` for sm_90a (``contrastgen.kernels._aot``; the CI's Triton), reads the SASS
of the common tile path (the straight-line code around the widest-HGMMA D loop: per warp, ``outside`` once per tile
plus ``loop`` x inner_trips) and estimates, per kernel, on an H200:

    t_mma   = flops / 790 TFLOP/s          (the bf16 dense matmul rate measured through PyTorch on the H200)
    t_hbm   = hbm_bytes / 4.8 TB/s;  t_l2 = l2_bytes / L2 (assumed 7.2 TB/s: chips-and-cheese measured 5.5 TB/s on
              the 114-SM H100 PCIe at 1.755 GHz, scaled to 132 SMs at 1.98 GHz; --l2-tbps to change)
    t_issue = tiles x instructions per tile and warp x warps / (4 schedulers x 132 SMs x 1.755 GHz)
    t_mufu  = tiles x MUFU per tile and warp x warps x 2 / (132 SMs x 1.755 GHz)   (16 lanes / clock / SM)
    estimate: low  = max(t_mma, t_issue, t_mufu, t_l2, t_hbm)        (everything overlaps)
              high = max(t_mma + max(t_issue, t_mufu), t_l2, t_hbm)   (a tile's epilogue does not overlap its products:
                                                                      one program per SM, sequential code)
against the floor of the case: 4G = 4 x 2 N^2 D FLOP at 790 TFLOP/s for CLIP, 3G for SigLIP, the minimal HBM traffic
at 4.8 TB/s for dispersive.  Rows without ``tiles`` get no issue / MUFU term (their SASS counts are still printed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

HW = {"name": "H200 (sm_90a, 132 SMs)", "sms": 132, "clock_hz": 1.755e9, "mma_flops": 790e12, "hbm_bps": 4.8e12,
      "l2_bps": 7.2e12, "issue_per_clk_sm": 4, "mufu_lanes_per_clk_sm": 16}

# case -> (module that models it, floor kind, description)
CASES = {
    "clip_n65536_d512_bf16": ("contrastgen.kernels.infonce", "4G",
                              "CLIP (clip_loss), N = 65,536, D = 512, bf16, fwd+bwd"),
    "siglip_n65536_d512_bf16": ("contrastgen.kernels.infonce", "3G",
                                "SigLIP (siglip_loss), N = 65,536, D = 512, bf16, fwd+bwd"),
    "dispersive_b256_m294912_bf16": ("contrastgen.kernels.dispersive", "hbm",
                                     "Dispersive (infonce_l2), B = 256, M = 294,912, bf16, fwd+bwd"),
}
HEADLINE = {"clip_n65536_d512_bf16": dict(N=65536, D=512), "siglip_n65536_d512_bf16": dict(N=65536, D=512),
            "dispersive_b256_m294912_bf16": dict(B=256, M=294912)}


def floor_seconds(case: str, rows: List[dict], hw=HW) -> float:
    kind = CASES[case][1]
    if kind in ("4G", "3G"):
        s = HEADLINE[case]
        g = 2.0 * s["N"] * s["N"] * s["D"]
        return (4 if kind == "4G" else 3) * g / hw["mma_flops"]
    s = HEADLINE[case]
    esz = 2
    minimal = 3.0 * s["B"] * s["M"] * esz    # fwd reads Z; bwd reads Z and writes dZ
    return minimal / hw["hbm_bps"]


def _compile(configs) -> List[dict]:
    from . import _aot
    return _aot.report(90, configs=configs)


def _tile_costs(sass: dict, inner_trips: Optional[float]) -> Optional[dict]:
    """Per tile and warp on the common path: instructions, MUFU, SHFL, HGMMA (outside + loop x trips)."""
    tp = sass.get("tile_path")
    if not tp or inner_trips is None:
        return None
    out, body = tp["outside_loop"], tp["loop_body"]
    hg_out, hg_body = out.get("HGMMA", 0), body.get("HGMMA", 0)
    trips = inner_trips - (hg_out / hg_body if hg_body else 0.0)   # iterations the pipeliner peeled off the loop
    trips = max(trips, 0.0)
    return {k: out.get(k, 0) + body.get(k, 0) * trips for k in ("total", "MUFU", "SHFL", "HGMMA", "FP32", "TMA")}


def estimate(case: str, rows: List[dict], compiled: Dict[int, dict], hw=HW) -> dict:
    out_rows = []
    lo_sum = hi_sum = 0.0
    for i, r in enumerate(rows):
        t_mma = r["flops"] / hw["mma_flops"]
        t_hbm = r["hbm_bytes"] / hw["hbm_bps"]
        t_l2 = r["l2_bytes"] / hw["l2_bps"]
        t_issue = t_mufu = 0.0
        per_tile = None
        c = compiled.get(i)
        if c is not None and "error" not in c and r.get("tiles"):
            per_tile = _tile_costs(c["sass"], r.get("inner_trips"))
            if per_tile is not None:
                warps = r["aot_config"].num_warps
                clk = hw["sms"] * hw["clock_hz"]
                t_issue = r["tiles"] * per_tile["total"] * warps / (hw["issue_per_clk_sm"] * clk)
                t_mufu = r["tiles"] * per_tile["MUFU"] * warps * (32 / hw["mufu_lanes_per_clk_sm"]) / clk
        lo = max(t_mma, t_issue, t_mufu, t_l2, t_hbm)
        hi = max(t_mma + max(t_issue, t_mufu), t_l2, t_hbm)
        lo_sum += lo
        hi_sum += hi
        cfg = r.get("aot_config")
        row = {k: v for k, v in r.items() if k != "aot_config"}
        row.update(aot_config=cfg.describe() if cfg is not None else None,
                   registers=None if c is None else c.get("registers"),
                   spill_bytes=None if c is None else c.get("spill_bytes"),
                   sass_counts=None if c is None else c.get("sass", {}).get("counts"),
                   per_tile_warp=per_tile, t_mma_ms=1e3 * t_mma, t_hbm_ms=1e3 * t_hbm, t_l2_ms=1e3 * t_l2,
                   t_issue_ms=1e3 * t_issue, t_mufu_ms=1e3 * t_mufu, estimate_ms=[1e3 * lo, 1e3 * hi])
        out_rows.append(row)
    floor = floor_seconds(case, rows, hw)
    return {"case": case, "description": CASES[case][2], "floor": CASES[case][1], "floor_ms": 1e3 * floor,
            "estimate_ms": [1e3 * lo_sum, 1e3 * hi_sum], "ratio_to_floor": [lo_sum / floor, hi_sum / floor],
            "rows": out_rows, "label": "ESTIMATE from the tiling and the SASS (no GPU measurement)"}


def model_rows(case: str):
    mod_name = CASES[case][0]
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        return None, f"{mod_name} does not import ({type(e).__name__}: {e})"
    fn = getattr(mod, "roofline_model", None)
    if fn is None:
        return None, f"{mod_name} has no roofline_model(case) yet"
    try:
        return fn(case), ""
    except Exception as e:  # noqa: BLE001
        return None, f"{mod_name}.roofline_model({case!r}) failed: {type(e).__name__}: {e}"


def run(cases=None, hw=HW) -> List[dict]:
    results = []
    for case in cases or CASES:
        rows, why = model_rows(case)
        if rows is None:
            results.append({"case": case, "description": CASES[case][2], "unavailable": why})
            continue
        idx = [i for i, r in enumerate(rows) if r.get("aot_config") is not None]
        reps = _compile([rows[i]["aot_config"] for i in idx]) if idx else []
        results.append(estimate(case, rows, dict(zip(idx, reps)), hw))
    return results


def _fmt(results: List[dict], hw=HW) -> str:
    lines = [f"Roofline ESTIMATE on {hw['name']}: {hw['mma_flops'] / 1e12:.0f} TFLOP/s dense bf16 (measured rate), "
             f"HBM {hw['hbm_bps'] / 1e12:.1f} TB/s, L2 {hw['l2_bps'] / 1e12:.1f} TB/s (assumed), "
             f"{hw['clock_hz'] / 1e9:.3f} GHz -- not a measurement"]
    for res in results:
        lines.append("")
        lines.append(f"== {res['case']}: {res['description']}")
        if "unavailable" in res:
            lines.append(f"   not estimated: {res['unavailable']}")
            continue
        lines.append("   (instr/tile, MUFU, SHFL, HGMMA: SASS per tile and warp on the common path; times in ms)")
        lines.append(f"   {'kernel':32s} {'ctas':>7s} {'GFLOP':>8s} {'HBM GB':>7s} {'L2 GB':>7s} {'regs':>4s} "
                     f"{'instr/tile':>10s} {'MUFU':>6s} {'SHFL':>5s} {'HGMMA':>5s} {'mma':>6s} {'issue':>6s} "
                     f"{'L2':>6s} {'HBM':>6s} {'estimate ms':>13s}")
        for r in res["rows"]:
            pt = r.get("per_tile_warp")
            sass = (f"{pt['total']:10.0f} {pt['MUFU']:6.0f} {pt['SHFL']:5.0f} {pt['HGMMA']:5.0f}" if pt else
                    f"{'-':>10s} {'-':>6s} {'-':>5s} {'-':>5s}")
            lines.append(
                f"   {r['kernel'][:32]:32s} {r['ctas']:7d} {r['flops'] / 1e9:8.1f} {r['hbm_bytes'] / 1e9:7.3f} "
                f"{r['l2_bytes'] / 1e9:7.2f} {str(r.get('registers') or '-'):>4s} {sass} "
                f"{r['t_mma_ms']:6.3g} {r['t_issue_ms']:6.3g} {r['t_l2_ms']:6.3g} {r['t_hbm_ms']:6.3g} "
                f"{r['estimate_ms'][0]:6.3g}-{r['estimate_ms'][1]:<6.3g}")
        lo, hi = res["estimate_ms"]
        lines.append(f"   total {lo:.3g}-{hi:.3g} ms (estimate) vs floor {res['floor']} {res['floor_ms']:.3g} ms: "
                     f"{res['ratio_to_floor'][0]:.2f}-{res['ratio_to_floor'][1]:.2f}x the floor")
        if res["floor"] == "hbm":
            lines.append(f"   = {100 / res['ratio_to_floor'][1]:.0f}-{100 / res['ratio_to_floor'][0]:.0f}% of the HBM "
                         "bandwidth on the minimal traffic")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--l2-tbps", type=float, default=HW["l2_bps"] / 1e12)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":   # the SASS needs the compiler, not the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "contrastgen.kernels.roofline", *(argv or sys.argv[1:])], env=env)
    hw = dict(HW, l2_bps=a.l2_tbps * 1e12)
    results = run(a.case, hw)
    print(_fmt(results, hw))
    if a.json:
        def enc(o):
            return o.describe() if hasattr(o, "describe") else str(o)
        with open(a.json, "w") as f:
            json.dump({"hardware": hw, "results": results}, f, indent=1, default=enc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
