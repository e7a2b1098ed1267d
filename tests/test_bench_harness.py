"""Fast CI check of the benchmark harness (contrastgen.bench): a tiny run end to end, and its pieces."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contrastgen.bench import cases as C
from contrastgen.bench import harness as H
from contrastgen.bench import report as R
from contrastgen.bench.run import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    rc = main(["--quick", "--op", "clip_loss", "--max-n", "256", "--budget", "0.02", "--threads", "1",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    return out, json.loads(out.read_text())


def test_quick_run_writes_sane_json_and_png(quick_run):
    path, doc = quick_run
    meta = doc["meta"]
    for key in ("device_name", "versions", "git_commit", "timestamp", "command", "memory_method", "torch_threads"):
        assert meta.get(key), key
    assert meta["versions"]["torch"] == torch.__version__
    assert "--quick" in meta["command"]
    try:
        import matplotlib  # noqa: F401  (absent on the GPU machine: the run then skips the plot)
        assert path.with_suffix(".png").stat().st_size > 10_000
    except ImportError:
        pass
    rows = doc["results"]
    assert {r["op"] for r in rows} == {"clip_loss"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["mode"] for r in ok if r["provider"] == "reference"} == {"fwd", "bwd", "fwd+bwd"}
    for r in ok:
        assert r["shape"] == {"N": 256, "D": 64}
        assert 0 < r["ms_min"] <= r["ms"] and r["reps"] >= 2
        assert r["peak_mib"] is not None and r["peak_mib"] >= 0
        assert r["tflops"] > 0 and math.isfinite(r["tflops"])
        assert r["check_abs_err"] < 1e-4
    refs = [r for r in ok if r["provider"] == "reference"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in refs)
    # the dense fwd keeps an N x N fp32 logits matrix (256 KiB) alive: the CPU memory probe must see it
    fwd = next(r for r in refs if r["mode"] == "fwd")
    assert fwd["peak_mib"] >= 256 * 256 * 4 / 2**20
    # providers that cannot run here are recorded with a reason, never silently dropped
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == set(C.PROVIDERS)
    for r in rows:
        assert r["status"] in ("ok", "skipped", "failed")
        if r["status"] != "ok":
            assert r["reason"]
    assert "CUDA" in by_provider["inf_cl"]["reason"]
    assert doc["checks"] and all(c["status"] == "ok" for c in doc["checks"])


def test_report_markdown_and_table(quick_run):
    path, doc = quick_run
    md = R.markdown(R.load(path.parent), mode="all")
    assert "| clip_loss | N=256 D=64 | float32 | fwd+bwd | reference |" in md
    table = R.format_table(doc)
    assert "== clip_loss" in table and "skipped inf_cl" in table


def test_cpu_memory_probe_counts_allocations():
    x = torch.randn(256, 256)

    def alloc():
        y = torch.empty(1024, 1024)                  # 4 MiB
        return (x @ x).sum() + y[0, 0] * 0           # y freed before the end: peak, not final, is measured
    mem = H.measure_memory(alloc, "cpu")
    assert 4.0 <= mem.peak_mib < 6.0


def test_time_fn_median_and_reps():
    calls = []
    t = H.time_fn(lambda: calls.append(1), "cpu", warmup=2, budget_s=0.01, min_reps=5, max_reps=7)
    assert 5 <= t.reps <= 7 and len(calls) == 2 + t.reps
    assert t.ms_min <= t.ms_q1 <= t.ms <= t.ms_q3


def test_flop_conventions():
    s = {"N": 1024, "D": 256}
    g = 2.0 * 1024 * 1024 * 256
    clip = next(sp for sp in C.all_specs() if sp.name == "clip_loss")
    sig = next(sp for sp in C.all_specs() if sp.name == "siglip_loss")
    assert clip.flops(s, "fwd+bwd") == 4 * g and clip.flops(s, "fwd") == g
    assert sig.flops(s, "fwd+bwd") == 3 * g
    disp = next(sp for sp in C.all_specs() if sp.name == "dispersive_loss/huge_dim")
    assert disp.traffic({"B": 32, "M": 294912}, "fwd+bwd", 2) == 3 * 32 * 294912 * 2


def test_every_op_builds_inputs_and_reference_runs():
    """Each registered op's check-shape inputs go through its reference and backward."""
    import contrastgen
    for spec in C.all_specs():
        inp = spec.make(spec.check, torch.float32, "cpu")
        loss = getattr(contrastgen, spec.api)(*inp.args, **inp.kwargs, backend="torch")
        grads = torch.autograd.grad(loss.sum(), inp.grads, allow_unused=True)
        assert torch.isfinite(loss).all() and any(g is not None for g in grads), spec.name
        for regime in ("quick", "cpu", "cuda"):
            assert spec.shapes[regime], (spec.name, regime)


def test_unknown_op_and_dry_run(tmp_path):
    with pytest.raises(SystemExit):
        main(["--op", "no_such_op", "--dry-run"])
    out = tmp_path / "dry.json"
    assert main(["--device", "cuda", "--dry-run", "--op", "dispersive_loss/huge_dim", "--no-progress",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    shapes = {r["shape_str"] for r in doc["results"]}
    assert "B=256 M=294912" in shapes
    if not torch.cuda.is_available():
        assert all(r["status"] in ("skipped", "planned") for r in doc["results"])


def test_cli_entry_point_lists_registry(capsys):
    from contrastgen.cli import main as cli_main
    assert cli_main(["bench", "--list", "--quick"]) == 0
    listing = capsys.readouterr().out
    for name in ("clip_loss", "siglip_loss", "info_nce/bank", "dispersive_loss/huge_dim", "uniformity", "patch_nce",
                 "attention_nce"):
        assert f"\n{name}  (" in listing


def test_gpu_script_dry_run(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "benches" / "gpu.sh"), "--dry-run", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "bench --device cuda" in p.stdout and "-m pytest" in p.stdout


# ------------------------------------------------------------------------------------------- output, schema, spread
def test_default_output_goes_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--op", "uniformity", "--max-n", "512", "--budget", "0.01", "--threads", "1",
                 "--providers", "reference", "--mode", "fwd", "--no-progress", "--no-plot"]) == 0
    files = list((tmp_path / "contrastgen-bench").glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "contrastgen.bench" and doc["schema_version"] == 2
    meta = doc["meta"]
    for key in ("machine", "hostname", "load_average", "load_average_end", "loaded", "cpp_build"):
        assert key in meta, key
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok and all(r["ms_q1"] <= r["ms"] <= r["ms_q3"] and r["iqr_pct"] >= 0 for r in ok)
    assert all("load_average" in r for r in ok)


def test_table_shows_spread_and_flags_a_loaded_machine(quick_run):
    _, doc = quick_run
    table = R.format_table(doc)
    assert "spread" in table and "±" in table
    loaded = json.loads(json.dumps(doc))
    loaded["meta"]["loaded"] = True
    assert "LOADED MACHINE" in R.format_table(loaded)
    idle = json.loads(json.dumps(doc))
    idle["meta"]["loaded"] = False
    assert "LOADED MACHINE" not in R.format_table(idle)


def test_report_never_mixes_machines_or_loads_silently(quick_run, tmp_path):
    _, doc = quick_run
    runs = []
    for i, (machine, load, loaded) in enumerate([("host A", 0.2, False), ("host A", 7.5, True),
                                                 ("host B", 0.1, False)]):
        d = json.loads(json.dumps(doc))
        d["meta"].update(machine=machine, hostname=machine, load_average=load, loaded=loaded,
                         timestamp=f"2026-12-0{i + 1}T10:00:00")
        if i == 1:      # the newer run on host A re-measured only cpp: the section mixes the two runs
            d["results"] = [r for r in d["results"] if r["provider"] == "cpp"]
        (tmp_path / f"run{i}.json").write_text(json.dumps(d))
        runs.append(d)
    md = R.markdown(R.load(tmp_path), mode="fwd+bwd")
    assert "2 different machines" in md
    sections = md.split("#### ")[1:]
    assert len(sections) == 2
    a = next(s for s in sections if "host A" in s)
    assert "Mixed loads" in a and "*loaded*" in a and "run0.json" in a and "run1.json" in a
    b = next(s for s in sections if "host B" in s)
    assert "Mixed loads" not in b and "run2.json" in b
    # every row names its run
    rows = [ln for ln in a.splitlines() if ln.startswith("| clip_loss")]
    assert rows and all(ln.rstrip().endswith(("| 1 |", "| 2 |")) for ln in rows)


def test_plot_has_time_and_memory_side_by_side(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    from contrastgen.bench.plot import plot_results
    _, doc = quick_run
    png = plot_results(doc, tmp_path / "p.png")
    w, h = struct.unpack(">II", png.read_bytes()[16:24])
    assert w > 1.8 * h                                         # one op: a time panel and a memory panel in one row


def test_benches_report_shim_reads_recorded_results():
    p = subprocess.run([sys.executable, "-m", "benches.report", "--mode", "fwd+bwd"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "####" in p.stdout and "cpu_2026-11-24" in p.stdout


# ------------------------------------------------------------------------------------------- crossover
def test_crossover_rule_from_timings():
    from contrastgen.bench.crossover import crossover_pairs

    def pts(wins):
        return [{"pairs": 100 * 4 ** i, "ref_ms": 1.0, "fused_ms": 0.5 if w else 2.0} for i, w in enumerate(wins)]
    assert crossover_pairs(pts([True, True])) == 0.0                       # the kernel always won
    assert crossover_pairs(pts([False, False, True, True])) == pytest.approx((400 * 1600) ** 0.5)
    assert crossover_pairs(pts([False, True, False, True, True])) == pytest.approx((1600 * 6400) ** 0.5)
    assert crossover_pairs(pts([False, False])) == 400                     # never won: no extrapolation


def test_crossover_command_writes_a_usable_file(tmp_path, monkeypatch):
    out = tmp_path / "x.json"
    assert main(["--crossover", "--op", "uniformity", "--max-n", "64", "--passes", "1", "--budget", "0.01",
                 "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    pts = doc["rules"]["uniformity"]["cpu"]["points"]
    assert [p["dim"] for p in pts] == [16, 64, 256] and doc["meta"]["load_average"]
    monkeypatch.setenv("CONTRASTGEN_CROSSOVER", str(out))
    import contrastgen
    c = contrastgen.backend_for("uniformity", torch.randn(1000, 16))
    assert c.backend == "cpp" and "crossover" in c.rule               # 10^6 pairs: beyond every measured size
