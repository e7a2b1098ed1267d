"""Smoke test of benches/i2i_step.py (one guided step, hook capture + fused PatchNCE vs the materialising baseline)."""
import json
import os
import sys

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import i2i_step  # noqa: E402


def test_i2i_step_bench_runs_and_agrees(tmp_path):
    out = tmp_path / "r.json"
    assert i2i_step.main(["--config", "tiny", "--threads", "1", "--budget", "0.01", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["variant"] for row in r["rows"]] == ["fused", "baseline"]
    assert r["gradient_rel_diff"] < 1e-4
    assert all(row["ms"] > 0 and row["peak_mib"] > 0 for row in r["rows"])
    assert r["load_avg_start"] is not None and r["reference_cache_mib_per_step"] > 0
    assert r["nce_layers"] == ["up_blocks.0", "up_blocks.1"] and r["attention_layers"] == 4   # down 1 + mid 1 + up 2
