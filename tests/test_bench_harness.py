"""Fast CI check of the benchmark harness (benches/): a tiny run end to end, and its pieces."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benches import cases as C  # noqa: E402
from benches import harness as H  # noqa: E402
from benches import report as R  # noqa: E402
from benches.run import main  # noqa: E402


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
