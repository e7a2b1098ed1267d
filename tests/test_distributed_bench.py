"""benches/distributed.py on a tiny problem (2 gloo ranks): it runs and records sane JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benches import distributed as B  # noqa: E402


def test_distributed_bench_writes_json(tmp_path):
    out = tmp_path / "d.json"
    B.main(["--world", "2", "--n", "48", "--d", "16", "--reps", "1", "--chunk-rows", "16", "--threads", "1",
            "--out", str(out)])
    doc = json.loads(out.read_text())
    meta, summary, res = doc["meta"], doc["summary"], doc["results"]
    assert meta["world"] == 2 and meta["process_group_backend"] == "gloo" and meta["ring_chunk_rows"] == 16
    assert meta["load_average_start"] is not None and meta["versions"]["torch"]
    for mode in B.MODES:
        r = res["modes"][mode]
        assert len(r["per_rank"]) == 2 and r["step_ms_median"] > 0 and r["peak_mib_max_over_ranks"] > 0
    assert res["single_rank"]["peak_mib"] > 0
    assert summary["max_rel_diff_between_modes"] < 1e-4          # the two modes agree to float32 rounding
    assert res["d_scale_sum_over_ranks"]["rel_diff"] < 1e-4
    comm = meta["communication_bytes_sent_per_rank"]
    assert comm["all_gather"]["total"] == 4 * 1 * 48 * 16 * 4
