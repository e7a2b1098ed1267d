"""``contrastgen demo conform`` end to end at a tiny size, and its reusable pieces (renderer, detector,
tokenizer, the lossless pixel-shuffle "VAE")."""
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")

from contrastgen.methods import conform_demo as D  # noqa: E402


def test_words_are_single_tokens():
    tok = D.word_tokenizer(D.WORDS)
    ids = tok(D.caption((("red", "square"), ("blue", "circle")))).input_ids
    assert len(ids) == 2 + 7
    assert tok.convert_ids_to_tokens(ids)[2:4] == ["red</w>", "square</w>"]


def test_detector_on_rendered_scenes():
    rng = random.Random(3)
    for pair in random.Random(0).sample(D.all_pairs(), 12):
        img = D.render_scene(pair, 32, rng)
        assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        s = D.score(img, pair)
        assert s["presence"] and s["binding"], (pair, D.detect_objects(img))
    blank = torch.full((3, 32, 32), -1.0)
    assert D.score(blank, (("red", "square"), ("blue", "circle")))["objects_present"] == 0


def test_held_out_pairs_never_trained():
    train, held = D.split_pairs(0)
    assert held and not set(train) & set(held)
    assert len(train) + len(held) == len(D.all_pairs())


def test_pixel_shuffle_vae_roundtrip():
    vae = D.pixel_shuffle_vae(2)
    x = torch.randn(2, 3, 32, 32)
    z = vae.encode_pixels(x)
    assert z.shape == (2, 12, 16, 16)
    torch.testing.assert_close(vae.decode(z, return_dict=False)[0], x)


def test_demo_end_to_end_tiny(tmp_path):
    from contrastgen.cli import main
    rc = main(["demo", "conform", "--out", str(tmp_path), "--train-steps", "2", "--batch", "2", "--prompts", "1",
               "--seeds", "1", "--steps", "3", "--width", "16", "--gen-batch", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("unguided", "conform"):
        assert set(res["rates"][name]) == {"presence", "binding", "objects_present", "objects_bound"}
        assert 0 <= res["rates"][name]["binding"] <= res["rates"][name]["presence"] <= 1
        assert res["seconds_per_image"][name] > 0
    assert res["detector_on_rendered_scenes"]["binding"] == 1.0
    assert res["load_avg_start"] and res["config"]["map_resolution"] == [16, 16]
    for f in res["files"]:
        assert (tmp_path / f).stat().st_size > 0
    assert np.isfinite(res["train"]["loss_last_50"])
