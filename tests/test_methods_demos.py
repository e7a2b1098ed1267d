"""Every method demo end to end at a tiny size through the CLI (``contrastgen demo NAME``): it runs, writes its
summary JSON and PNGs into --out, and the summary holds finite losses for every step and the evaluation numbers."""
import json
import math

import pytest
import torch

from contrastgen.cli import DEMOS, main as cli_main

TINY = ["--quick", "--no-progress", "--depth", "1", "--train-size", "48", "--test-size", "24"]
CASES = {
    "simclr": ["--steps", "3", "--batch-size", "8"],
    "moco": ["--steps", "3", "--batch-size", "8", "--queue", "16"],
    "code": ["--steps", "2", "--batch-size", "6"],
    "dcr": ["--steps", "2", "--batch-size", "3"],
    "tulip": ["--steps", "2", "--batch-size", "8", "--text-width", "32", "--text-layers", "1"],
    "unclip": ["--clip-steps", "2", "--prior-steps", "3", "--batch-size", "8", "--prior-batch-size", "8",
               "--text-width", "32", "--text-layers", "1", "--prior-width", "32", "--prior-depth", "1",
               "--sample-steps", "2"],
}
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_method_has_a_demo():
    assert set(CASES) <= set(DEMOS)


@pytest.mark.parametrize("name", list(CASES))
def test_demo_end_to_end(name, tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / name
    rc = cli_main(["demo", name, "--out", str(out), *TINY, *CASES[name]])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["demo"] == name
    assert (out / "losses.png").read_bytes()[:8] == PNG
    monitors = list(out.glob("monitor_*.png"))
    assert len(monitors) == 1 and monitors[0].read_bytes()[:8] == PNG
    for k, v in s["curves"].items():
        assert v and all(math.isfinite(x) for x in v), k
    for mon in s["monitor"].values():
        assert mon["step"] and {"alignment", "uniformity", "sim_gap", "effective_rank"} <= set(mon)
    text = capsys.readouterr().out
    assert f"contrastgen demo {name}" in text
    if name == "unclip":
        r = s["retrieval"]
        assert {"text_embedding", "prior_cfg1", "prior_cfg2"} <= set(r)
        assert all(0.0 <= r[k]["top1"] <= r[k]["top5"] <= 1.0 for k in ("text_embedding", "prior_cfg1"))
    elif name == "tulip":
        assert set(s["curves"]) == {"total", "image_text", "image_image", "text_text", "image_recon", "text_recon"}
        assert 0.0 <= s["retrieval_top1_after"]["paraphrase_to_image"] <= 1.0
    elif name == "code":
        assert 0.0 <= s["real_fake_after"]["embedding"]["knn"] <= 1.0 and set(s["curves"]) == {"code", "real", "fake"}
    else:
        assert 0.0 <= s["knn_after"]["knn_shape"] <= 1.0


def test_demo_unknown_option_fails():
    with pytest.raises(SystemExit):
        cli_main(["demo", "simclr", "--loss", "triplet", "--quick"])
