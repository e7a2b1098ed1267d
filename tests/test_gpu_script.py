"""benches/gpu.sh without a GPU: the dry run and its time boxes, the exit status (a fake failing step), a CPU smoke
run of its Python parts on tiny shapes, and the pass / fail gate (benches/gpu_gate.py) on synthetic JSON."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu.sh"
sys.path.insert(0, str(ROOT))

from benches import gpu_gate  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(args, tmp_path, **env):
    e = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=2400)


@pytest.mark.parametrize("part", ["headline", "extra"])
def test_dry_run_lists_the_steps_within_eight_minutes(part, tmp_path):
    p = _run(["--dry-run", str(tmp_path / "out"), part], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    boxes = [int(x) for x in re.findall(r"^== \[\S+\] \(limit (\d+)s\)", p.stdout, re.M)]
    total = int(re.search(r"time boxes of this part: (\d+)s", p.stdout).group(1))
    assert total == sum(boxes) <= 480, (boxes, total)
    steps = re.findall(r"^== \[(\S+)\]", p.stdout, re.M)
    if part == "headline":
        assert steps == ["install_wheels", "env", "test_cuda", "test_cuda_dispersive", "bench_clip", "bench_siglip",
                         "bench_dispersive", "gate"]
        assert "TRITON_INTERPRET=0" in SCRIPT.read_text()
        clip = next(line for line in p.stdout.splitlines() if "[bench_clip]" in line)
        for want in ("--shape N=65536,D=512", "reference,triton,open_clip,inf_cl", "--check-shape timed", "bfloat16"):
            assert want in clip, want
        disp = next(line for line in p.stdout.splitlines() if "[bench_dispersive]" in line)
        assert "--shape B=256,M=294912" in disp
    else:
        assert "bench_compile" in steps and steps[-1] == "gate"


def test_unknown_part_fails(tmp_path):
    assert _run(["--dry-run", str(tmp_path / "o"), "everything"], tmp_path).returncode == 2


def test_cpu_smoke_and_a_failing_step_gives_a_non_zero_exit(tmp_path):
    """The headline part on the CPU (GPU_SH_DEVICE=cpu: quick shapes, fused provider cpp) with one test step
    replaced by `false`: the script goes on, every bench writes its JSON, the gate passes, and the exit status
    is 1 because of the failed step."""
    out = tmp_path / "out"
    p = _run([str(out), "headline"], tmp_path, GPU_SH_DEVICE="cpu", GPU_SH_FAKE_FAIL="test_cuda_dispersive",
             OMP_NUM_THREADS="1", GPU_SH_BOX_SCALE="6")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    steps = (out / "steps.txt").read_text()
    assert "FAILED: test_cuda_dispersive (rc=1)" in steps
    if (ROOT / "tests" / "test_cuda.py").exists():
        assert "[test_cuda] rc=0" in steps, steps               # skipped without CUDA: not a failure
    for name in ("clip", "siglip", "dispersive"):
        assert f"[bench_{name}] rc=0" in steps, steps
        doc = json.loads(next(out.glob(f"*_{name}.json")).read_text())
        assert any(r["provider"] == "cpp" and r["status"] == "ok" for r in doc["results"])
        c = next(c for c in doc["checks"] if c["provider"] == "cpp")
        assert c["status"] == "ok" and c["shape"] == doc["results"][0]["shape"]      # checked at the timed shape
    gate = json.loads((out / "gate.json").read_text())
    assert gate["ok"] and gate["fused"] == "cpp" and len(gate["checks"]) == 3


def _doc(checks, rows):
    return {"meta": {}, "checks": checks, "results": rows}


def _check(**kw):
    c = dict(op="clip_loss", dtype="bfloat16", provider="triton", status="ok", shape={"N": 8}, loss=1.0,
             loss_ref64=1.0, abs_err=1e-3, ref_abs_err=1e-3, grad_abs_err=1e-4, ref_grad_abs_err=1e-4,
             grad_ref64_abs_max=1.0)
    c.update(kw)
    return c


ROW = dict(op="clip_loss", provider="triton", status="ok", shape_str="N=8", mode="fwd")


@pytest.mark.parametrize("checks,rows,ok,why", [
    ([_check()], [ROW], True, None),
    ([_check(abs_err=2.1e-3)], [ROW], False, "loss error"),
    ([_check(grad_abs_err=float("nan"))], [ROW], False, "gradient error"),
    ([_check(status="failed", error="RuntimeError: boom")], [ROW], False, "did not run"),
    ([_check()], [dict(ROW, status="skipped")], False, "no triton row"),
    ([_check()], [ROW, dict(ROW, status="failed", reason="CompilationError", oom=False)], False, "row failed"),
    ([_check()], [ROW, dict(ROW, status="failed", reason="CUDA out of memory", oom=True)], True, None),
    ([_check(provider="open_clip", abs_err=1.0)], [ROW], True, None),          # peers are reported, not gated
])
def test_gate(tmp_path, checks, rows, ok, why):
    (tmp_path / "run.json").write_text(json.dumps(_doc(checks, rows)))
    got, report = gpu_gate.gate(tmp_path)
    assert got is ok, report["failures"]
    if why:
        assert any(why in f for f in report["failures"]), report["failures"]
    assert gpu_gate.main([str(tmp_path)]) == (0 if ok else 1)
    assert json.loads((tmp_path / "gate.json").read_text())["ok"] is ok
