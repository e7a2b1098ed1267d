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


# ----------------------------------------------------------------------------------------------------------
# Regression: the recorded run trained an epsilon model and sampled saturated noise from pure noise.  With the
# demo's schedule sqrt(alpha_bar) is ~0.01 at the first DDIM step, so an epsilon error e becomes an x0 error of
# ~e / 0.01; a v model's error stays ~e.  The demo now trains and samples with v-prediction.
def _ddim_from_noise_with_error(prediction_type, err_rms=0.1, steps=50, seed=0):
    """DDIM (the demo's sampler) from pure noise with an oracle for one known image x0, whose every prediction is
    off by Gaussian noise of ``err_rms``; returns (max |x0 predicted at the first step - x0|, final image error)."""
    sched = D.sampling_scheduler(prediction_type, clip_sample=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x0 = D.render_scene((("red", "square"), ("blue", "circle")))[None]
    x = torch.randn(x0.shape, generator=g)
    first = None
    for t in sched.timesteps:
        a = sched.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        out = sched.step(target + err_rms * torch.randn(x.shape, generator=g), t, x)
        if first is None:
            first = (out.pred_original_sample - x0).abs().max().item()
        x = out.prev_sample
    return first, (x - x0).abs().mean().item()


def test_v_prediction_keeps_model_errors_bounded_from_pure_noise():
    eps_first, _ = _ddim_from_noise_with_error("epsilon")
    v_first, v_final = _ddim_from_noise_with_error("v_prediction")
    assert eps_first > 20          # an eps error of 0.1 RMS: x0 off by tens at the first step (what the old run did)
    assert v_first < 1.0 and v_final < 0.1


def test_demo_samples_with_the_training_parameterisation():
    import inspect
    assert inspect.signature(D.run).parameters["prediction_type"].default == "v_prediction"
    tok = D.word_tokenizer(D.WORDS)
    unet, text = D.build_text_to_image(tok, width=16)
    for ptype in D.PREDICTION_TYPES:
        pipe = D.as_pipeline(unet, text, tok, prediction_type=ptype)
        train = D.ddpm_scheduler(ptype)
        assert pipe.scheduler.config.prediction_type == ptype
        assert pipe.scheduler.config.clip_sample is False     # what the demo records (diffusers would reset it)
        torch.testing.assert_close(pipe.scheduler.alphas_cumprod, train.alphas_cumprod)
    with pytest.raises(ValueError, match="prediction_type"):
        D.train_text_to_image(unet, text, tok, D.all_pairs(), steps=1, batch=1, prediction_type="sample", log=None)


def test_v_training_target_is_the_velocity():
    sched = D.ddpm_scheduler("v_prediction")
    x0, noise, t = torch.randn(3, 12, 4, 4), torch.randn(3, 12, 4, 4), torch.tensor([1, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_checkpoint_reuse_and_mismatch(tmp_path):
    from contrastgen.cli import main
    ck = tmp_path / "m.pt"
    args = ["demo", "conform", "--train-steps", "2", "--batch", "2", "--prompts", "1", "--seeds", "1", "--steps", "2",
            "--width", "16", "--gen-batch", "2", "--checkpoint", str(ck), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0 and ck.is_file()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["train"]["loaded_from_checkpoint"] and res["config"]["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        main(args + ["--out", str(tmp_path / "c"), "--prediction-type", "epsilon"])
