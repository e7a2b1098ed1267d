"""The i2i demo's pieces (edit jobs, sentence sets, masks, scores) and the demo end to end at a tiny size."""
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")

from contrastgen.methods import conform_demo as CD  # noqa: E402
from contrastgen.methods import i2i_demo as D  # noqa: E402


def test_edit_jobs_change_one_attribute_of_one_object():
    jobs = D.draw_edits(40, seed=3)
    assert [j["kind"] for j in jobs[:4]] == ["colour", "shape", "colour", "shape"]
    for j in jobs:
        w = j["which"]
        (c0, s0), (c1, s1) = j["pair"][w], j["target"][w]
        assert j["pair"][1 - w] == j["target"][1 - w]
        if j["kind"] == "colour":
            assert s0 == s1 and c0 != c1 and c1 != j["pair"][1 - w][0]
        else:
            assert c0 == c1 and s0 != s1


def test_sentence_sets_differ_only_in_the_edited_object():
    job = dict(pair=(("red", "square"), ("blue", "circle")), target=(("green", "square"), ("blue", "circle")),
               which=0, kind="colour")
    src, tgt = D.sentence_sets(job)
    assert len(src) == len(tgt) == 2 * 3          # colours other than red and green, every shape
    assert all(s.startswith("a red square and a ") for s in src)
    assert all(t.startswith("a green square and a ") for t in tgt)
    assert [s[len("a red square"):] for s in src] == [t[len("a green square"):] for t in tgt]


def test_scores_on_rendered_scenes():
    job = dict(pair=(("red", "square"), ("blue", "circle")), target=(("green", "square"), ("blue", "circle")),
               which=0, kind="colour", render_seed=11)
    src = CD.render_scene(job["pair"], 32, random.Random(11))
    tgt = CD.render_scene(job["target"], 32, random.Random(11))
    to_np = lambda x: ((x + 1) / 2).permute(1, 2, 0).numpy()  # noqa: E731
    box = D.object_box_mask(job["pair"], 0, 32, 11)
    red = (np.abs(to_np(src) - np.array(CD.COLORS["red"])).max(-1) < 1e-4)
    assert red.any() and (red <= box).all()                     # the box covers the edited object
    s = D.structure_scores(to_np(src), to_np(tgt), ~box)
    assert s["outside_mae"] < 1e-6 and s["outside_edge_f1"] == 1.0   # the perfect edit changes nothing outside
    assert D.edit_success(to_np(tgt), job)["success"]
    assert not D.edit_success(to_np(src), job)["success"]
    noisy = np.clip(to_np(src) + 0.3, 0, 1)
    assert D.structure_scores(to_np(src), noisy, ~box)["outside_mae"] > 0.1


def test_pixel_shuffle_autoencoder_round_trip():
    vae = D.pixel_shuffle_autoencoder(2)
    x = torch.rand(1, 3, 32, 32)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (1, 12, 16, 16)
    assert torch.equal(vae.decode(z).sample, x)


def test_demo_end_to_end_tiny(tmp_path):
    out = D.run(tmp_path, train_steps=3, batch=4, width=16, scenes=2, steps=3, strong_step_size=1.0,
                model_cache=str(tmp_path / "model.pt"), log=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rates"].keys() == {"unguided", "guided", "attention_only", "guided_strong"}
    assert len(data["edits"]) == 2 and 0.0 <= data["rates"]["guided"]["success"] <= 1.0
    for f in data["files"]:
        assert (tmp_path / f).stat().st_size > 0
    assert out["config"]["scenes"] == 2
    # the cached model is reused
    again = D.train_model(3, 4, 16, 0, log=None, cache=str(tmp_path / "model.pt"))
    assert round(again[3], 1) == out["train"]["seconds"]      # loaded, not retrained
