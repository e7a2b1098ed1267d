"""ContrastiveEditPipeline (pix2pix-zeroCon) on the tiny offline Stable Diffusion (random weights): DDIM inversion
error bounds, the hook-only capture against pix2pix-zero's materialising processor, the guidance lowering both
losses, edit directions, determinism, diffusers conventions (output_type, callback), bad inputs, the CLI."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from contrastgen.methods import i2i as I  # noqa: E402
from contrastgen.methods.conform_demo import tiny_stable_diffusion, word_tokenizer  # noqa: E402
from contrastgen.reference import patch_nce_ref  # noqa: E402

WORDS = ["a", "cat", "dog", "photo", "of", "the", "picture"]


@pytest.fixture(scope="module")
def pipe():
    p = tiny_stable_diffusion(seed=0, tokenizer=word_tokenizer(WORDS), pipeline_class=I.ContrastiveEditPipeline)
    return p


def _z0(seed=1):
    # SD latents have unit variance (scaling_factor); the tiny random VAE's are ~0.04, so tests that look at the
    # inversion error start from unit-variance latents directly
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)          # [0, 1], as diffusers expects tensors


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


NO_REG = dict(lambda_ac=0.0, lambda_kl=0.0)


# ----------------------------------------------------------------------------------------------- inversion
def test_ddim_move_is_exactly_invertible():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a, b = torch.tensor(0.9), torch.tensor(0.3)
    y = I.ddim_move(x, e, a, b)
    assert _rel(I.ddim_move(y, e, b, a), x) < 1e-6


def test_ddim_move_matches_diffusers_step(pipe):
    sched = pipe._scheduler(10, "cpu")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    for t in sched.timesteps[[0, 4, 9]]:
        ours = I.ddim_move(x, e, I._alpha(sched, t), I._alpha(sched, I._prev_timestep(sched, t)))
        theirs = sched.step(e, t, x, eta=0.0).prev_sample
        assert _rel(ours, theirs) < 1e-6


def test_inversion_exact_when_the_noise_does_not_depend_on_the_latent(pipe):
    # With conv_in zeroed, eps(x, t) = eps(t): DDIM inversion is then exact, so the reconstruction error is
    # float32 rounding only (measured 2e-7 relative).  Bound: 1e-5.
    w = pipe.unet.conv_in.weight.detach().clone()
    try:
        with torch.no_grad():
            pipe.unet.conv_in.weight.zero_()
        z0 = _z0()
        inv = pipe.invert(source_latents=z0, source_prompt="a cat", num_inference_steps=10, reference=None, **NO_REG)
        assert _rel(pipe.reconstruct(inv), z0) < 1e-5
    finally:
        with torch.no_grad():
            pipe.unet.conv_in.weight.copy_(w)


def test_fixed_point_inversion_reconstructs_the_source_latent(pipe):
    # The random UNet is far from smooth in x (eps changes by ~0.37 std when x moves by O(1)), so plain DDIM
    # inversion's eps(x_{t-1}, t) ~ eps(x_t, t) is poor: at 30 steps the plain reconstruction is ~100% off.  With
    # fixed-point refinement of each step the error falls: measured 1.12 / 0.25 / 0.018 relative for 0 / 2 / 5
    # iterations (50 steps, 6 iterations: 5.3e-4).  Bounds: 5 iterations < 0.05, each count below the previous.
    z0 = _z0()
    errs = []
    for k in (0, 2, 5):
        inv = pipe.invert(source_latents=z0, source_prompt="a cat", num_inference_steps=30, reference=None,
                          fixed_point_iterations=k, **NO_REG)
        errs.append(_rel(pipe.reconstruct(inv), z0))
    assert errs[-1] < 0.05, errs
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert inv.latents.shape == z0.shape


def test_reconstruction_reference_is_the_plain_reconstruction(pipe):
    z0 = _z0()
    inv = pipe.invert(source_latents=z0, source_prompt="a cat", num_inference_steps=8,
                      generator=torch.Generator().manual_seed(0))
    assert inv.reconstruction is not None and len(inv.references) == 8
    assert _rel(inv.reconstruction, pipe.reconstruct(inv)) < 1e-6
    # reference maps are probabilities over the 77 tokens, per head
    m = next(iter(inv.references[3].maps.values()))
    assert m.shape[:2] == (1, 8) and m.shape[-1] == 77
    torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)
    p = next(iter(inv.references[3].patches.values()))
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[:2]), atol=1e-5, rtol=0)


def test_inversion_reference_caches_the_inversion_calls_only(pipe):
    z0 = _z0()
    inv = pipe.invert(source_latents=z0, source_prompt="a cat", num_inference_steps=6, reference="inversion",
                      cache_steps=[0, 2, 5], generator=torch.Generator().manual_seed(0), **NO_REG)
    assert inv.reconstruction is None and sorted(inv.references) == [0, 2, 5]
    assert inv.settings["cache_steps"] == [0, 2, 5]


def test_regularised_inversion_is_deterministic_and_whitens(pipe):
    z0 = _z0()
    kw = dict(source_latents=z0, source_prompt="a cat", num_inference_steps=6, reference=None)
    a = pipe.invert(generator=torch.Generator().manual_seed(3), **kw).latents
    b = pipe.invert(generator=torch.Generator().manual_seed(3), **kw).latents
    plain = pipe.invert(**kw, **NO_REG).latents
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    e = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.2
    r = I.regularize_noise(e, generator=torch.Generator().manual_seed(0))
    assert I._kl_to_standard_normal(r) < I._kl_to_standard_normal(e)


def test_regularize_noise_matches_pix2pix_zero_kl_step():
    # one round, KL only: e - lambda * d KL / d e with KL = var + mu^2 - 1 - log(var + 1e-7)
    e = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = I.regularize_noise(e, lambda_ac=0.0, lambda_kl=20.0, num_reg_steps=1)
    n = e.numel()
    mu, var = e.mean(), e.var()
    grad = 2 * (e - mu) / (n - 1) * (1 - 1 / (var + 1e-7)) + 2 * mu / n
    torch.testing.assert_close(r, e - 20.0 * grad)


# ----------------------------------------------------------------------------------------------- capture
def _setup(pipe, steps=6):
    inv = pipe.invert(source_latents=_z0(), source_prompt="a cat", num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(0))
    return inv, inv.settings["nce_layers"], inv.settings["attention_layers"]


def test_hook_capture_equals_materialising_processor(pipe):
    inv, nl, al = _setup(pipe)
    assert len(al) == 6 and nl == ["up_blocks.0", "up_blocks.1"]
    z = inv.latents + 0.1
    t = inv.timesteps[2]
    emb = inv.source_embeds + 0.05 * torch.randn(inv.source_embeds.shape, generator=torch.Generator().manual_seed(1))
    with I.GuidanceCapture(pipe.unet, nl, al) as cap:
        f1, m1, _ = cap.run(z, t, emb, early_exit=False)
    with I.MaterializingCapture(pipe.unet, nl, al) as cap:
        f2, m2, _ = cap.run(z, t, emb)
    for a in al:
        torch.testing.assert_close(m1[a], m2[a], atol=1e-6, rtol=1e-5)
    for n in nl:
        torch.testing.assert_close(f1[n], f2[n], atol=1e-5, rtol=1e-5)
    # the processors are restored
    assert all(type(p).__name__ != "_MaterializingProcessor" for p in pipe.unet.attn_processors.values())


def test_fused_guidance_gradient_equals_the_baseline(pipe):
    inv, nl, al = _setup(pipe)
    z, t, ref = inv.latents + 0.1, inv.timesteps[3], inv.references[3]
    emb = inv.source_embeds + 0.05 * torch.randn(inv.source_embeds.shape, generator=torch.Generator().manual_seed(2))
    with I.GuidanceCapture(pipe.unet, nl, al) as cap:
        g1, l1 = I.guidance_gradient(cap, z, t, emb, ref, nce_weight=2.0, attention_weight=3.0)
    with I.MaterializingCapture(pipe.unet, nl, al) as cap:
        g2, l2 = I.guidance_gradient(cap, z, t, emb, ref, nce_weight=2.0, attention_weight=3.0, fused=False)
    torch.testing.assert_close(l1.patch_nce, l2.patch_nce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1.attention, l2.attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l1.total, 2.0 * l1.patch_nce.mean() + 3.0 * l1.attention.sum())
    assert _rel(g1, g2) < 1e-4 and g1.norm() > 0
    assert pipe.unet.conv_in.weight.requires_grad          # the parameters' flags are restored after the step


def test_guidance_losses_match_a_direct_transcription(pipe):
    inv, nl, al = _setup(pipe)
    ref = inv.references[1]
    z, t = inv.latents + 0.2, inv.timesteps[1]
    with I.GuidanceCapture(pipe.unet, nl, al) as cap:
        feats, maps, _ = cap.run(z, t, inv.source_embeds, early_exit=False)
    got = I.guidance_losses(feats, maps, ref, nce_weight=1.0, attention_weight=1.0)
    for i, n in enumerate(nl):
        q = feats[n].flatten(2).transpose(1, 2)[:, ref.ids[n]]
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-7)
        want = patch_nce_ref([q.double()], [ref.patches[n].double()], temperature=0.07)
        assert abs(got.patch_nce[i].item() - want.item()) < 1e-5
    for i, a in enumerate(al):
        cur, r = maps[a].reshape(-1, *maps[a].shape[2:]), ref.maps[a].reshape(-1, *maps[a].shape[2:])
        want = ((cur - r) ** 2).sum((1, 2)).mean(0)             # pix2pix-zero's line
        assert abs(got.attention[i].item() - want.item()) < 1e-7


def test_patch_ids_shared_across_layers_of_one_size(pipe):
    inv, nl, _ = _setup(pipe)
    ref = inv.references[0]
    sizes = {n: inv.references[0].patches[n].shape for n in nl}
    assert sizes["up_blocks.0"][1] == sizes["up_blocks.1"][1] == 256     # 16 x 16 = 256 locations, all used
    assert sizes["up_blocks.0"][2] == 64 and sizes["up_blocks.1"][2] == 32
    assert torch.equal(ref.ids["up_blocks.0"], ref.ids["up_blocks.1"])
    inv2 = pipe.invert(source_latents=_z0(), source_prompt="a cat", num_inference_steps=6, num_patches=17,
                       generator=torch.Generator().manual_seed(0))
    ids = inv2.references[0].ids["up_blocks.1"]
    assert ids.numel() == 17 and ids.unique().numel() == 17


def test_early_exit_gives_the_same_gradient(pipe):
    inv, nl, al = _setup(pipe)
    nl = ["up_blocks.0"]
    al = [a for a in al if not a.startswith("up_blocks")]
    inv = pipe.invert(source_latents=_z0(), source_prompt="a cat", num_inference_steps=6, nce_layers=nl,
                      attention_layers=al, generator=torch.Generator().manual_seed(0))
    z, t, ref = inv.latents + 0.1, inv.timesteps[2], inv.references[2]
    with I.GuidanceCapture(pipe.unet, nl, al) as cap:
        g1, _ = I.guidance_gradient(cap, z, t, inv.source_embeds, ref, early_exit=True)
        g2, _ = I.guidance_gradient(cap, z, t, inv.source_embeds, ref, early_exit=False)
        with torch.no_grad():
            assert cap.run(z, t, inv.source_embeds, early_exit=True)[2] is None        # stopped after up_blocks.0
            assert cap.run(z, t, inv.source_embeds, early_exit=False)[2] is not None
    torch.testing.assert_close(g1, g2, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- the edit
def _mean_losses(out):
    ls = out.losses[1:]                           # step 0 starts from the same z_T in every run
    return (float(np.mean([l.patch_nce.mean().item() for l in ls])),
            float(np.mean([l.attention.sum().item() for l in ls])))


def test_guidance_lowers_both_losses_against_the_unguided_edit(pipe):
    # Same inversion (hence the same z_T and reference), same generator; the losses of every step after the first
    # are measured against the reference in both runs (record_losses).  The random UNet's attention loss is small
    # (0.0023) and its gradient too, hence attention_weight=100 here.  Measured (6 steps, eta 1): PatchNCE 0.10147
    # -> 0.10121, attention 0.002304 -> 0.002287.
    inv = pipe.invert(source_latents=_z0(), source_prompt="a cat", num_inference_steps=6,
                      generator=torch.Generator().manual_seed(0))
    kw = dict(inversion=inv, target_prompt="a dog", num_inference_steps=6, record_losses=True, output_type="latent")
    unguided = pipe(guided=False, **kw)
    guided = pipe(guided=True, guidance_step_size=1.0, nce_weight=1.0, attention_weight=100.0, **kw)
    (n0, a0), (n1, a1) = _mean_losses(unguided), _mean_losses(guided)
    assert n1 < n0 and a1 < a0, (n0, n1, a0, a1)
    assert not torch.equal(guided.images, unguided.images)


def test_one_guidance_step_descends_each_loss(pipe):
    inv, nl, al = _setup(pipe)
    z, t, ref = inv.latents + 0.1, inv.timesteps[2], inv.references[2]
    emb = inv.source_embeds + 0.05 * torch.randn(inv.source_embeds.shape, generator=torch.Generator().manual_seed(4))
    with I.GuidanceCapture(pipe.unet, nl, al) as cap:
        for w in (dict(nce_weight=1.0, attention_weight=0.0), dict(nce_weight=0.0, attention_weight=1.0)):
            g, before = I.guidance_gradient(cap, z, t, emb, ref, **w)
            eta = 1e-2 / g.norm().item()                       # a small step along -grad
            _, after = I.guidance_gradient(cap, z - eta * g, t, emb, ref, **w)
            assert after.total < before.total, (w, before.total, after.total)


def test_unedited_unguided_run_is_the_reconstruction(pipe):
    inv = pipe.invert(source_latents=_z0(), source_prompt="a cat", num_inference_steps=6, reference=None, **NO_REG)
    out = pipe(inversion=inv, edit_direction=torch.zeros_like(inv.source_embeds), num_inference_steps=6,
               guided=False, output_type="latent")
    assert _rel(out.images, pipe.reconstruct(inv)) < 1e-5


def test_same_generator_same_edit_and_end_to_end_from_an_image(pipe):
    kw = dict(image=_image(), source_prompt="a cat", target_prompt="a dog", num_inference_steps=4,
              output_type="np", guidance_step_size=1.0)
    a = pipe(generator=torch.Generator().manual_seed(5), **kw)
    b = pipe(generator=torch.Generator().manual_seed(5), **kw)
    assert a.images.shape == (1, 32, 32, 3) and np.array_equal(a.images, b.images)
    assert len(a.losses) == 4 and all(l is not None for l in a.losses)
    assert a.inversion.source_latents.shape == (1, 4, 16, 16)
    pil = pipe(generator=torch.Generator().manual_seed(5), **{**kw, "output_type": "pil"}).images[0]
    assert pil.size == (32, 32)


def test_guidance_steps_and_step_size_schedule(pipe):
    inv, _, _ = _setup(pipe)
    out = pipe(inversion=inv, target_prompt="a dog", num_inference_steps=6, guidance_steps=2, output_type="latent")
    assert [l is not None for l in out.losses] == [True, True, False, False, False, False]
    out = pipe(inversion=inv, target_prompt="a dog", num_inference_steps=6, guidance_steps=[1, 4],
               guidance_step_size=[0.0] * 6, output_type="latent")
    ref = pipe(inversion=inv, target_prompt="a dog", num_inference_steps=6, guided=False, output_type="latent")
    assert torch.equal(out.images, ref.images)          # zero step size: no change
    assert [l is not None for l in out.losses] == [False, True, False, False, True, False]


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    inv, _, _ = _setup(pipe, steps=4)
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, int(t), tuple(kw["latents"].shape)))
        return {"latents": kw["latents"] * 0 if i == 3 else kw["latents"]}

    out = pipe(inversion=inv, target_prompt="a dog", num_inference_steps=4, output_type="latent",
               callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 4, 16, 16)
    assert torch.count_nonzero(out.images) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(inversion=inv, target_prompt="a dog", num_inference_steps=4, callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=["noise"])


# ----------------------------------------------------------------------------------------------- directions
def test_edit_direction_from_prompts_sentences_and_templates(pipe):
    e = lambda s: pipe._embed([s], "cpu")  # noqa: E731
    d = pipe.edit_direction("a cat", "a dog")
    torch.testing.assert_close(d, e("a dog") - e("a cat"))
    d = pipe.edit_direction(source_sentences=["a cat", "the cat"], target_sentences=["a dog", "a photo of a dog",
                                                                                      "the dog"])
    want = (e("a dog") + e("a photo of a dog") + e("the dog")) / 3 - (e("a cat") + e("the cat")) / 2
    torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-5)
    d = pipe.edit_direction(source_word="cat", target_word="dog", templates=("a {}", "a photo of the {}"))
    want = (e("a dog") + e("a photo of the dog")) / 2 - (e("a cat") + e("a photo of the cat")) / 2
    torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-5)
    assert pipe.edit_direction(source_word="cat", target_word="dog").shape == (1, 77, 32)


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(pipe):
    img = _image()
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(_image(size=36), source_prompt="a cat", target_prompt="a dog", num_inference_steps=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.invert(torch.rand(1, 3, 32, 20), "a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="source_prompt is missing"):
        pipe(img, target_prompt="a dog", num_inference_steps=2)
    with pytest.raises(ValueError, match="needs source and target"):
        pipe(img, source_prompt="a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="source image"):
        pipe(source_prompt="a cat", target_prompt="a dog", num_inference_steps=2)
    with pytest.raises(ValueError, match="attention_layers: 'up_blocks.7'"):
        pipe(img, source_prompt="a cat", target_prompt="a dog", attention_layers=["up_blocks.7"], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"nce_layers: \['up_blocks.9.resnets.0'\] are not modules"):
        pipe(img, source_prompt="a cat", target_prompt="a dog", nce_layers=["up_blocks.9.resnets.0"],
             num_inference_steps=2)
    with pytest.raises(ValueError, match="one image at a time"):
        pipe(torch.rand(2, 3, 32, 32), source_prompt="a cat", target_prompt="a dog", num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_steps"):
        pipe(img, source_prompt="a cat", target_prompt="a dog", num_inference_steps=2, guidance_steps=[5])
    with pytest.raises(ValueError, match="nce_weight"):
        pipe(img, source_prompt="a cat", target_prompt="a dog", num_inference_steps=2, nce_weight=-1.0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(img, source_prompt="a cat", target_prompt="a dog", num_inference_steps=2, output_type="jpeg")
    inv = pipe.invert(img, "a cat", num_inference_steps=3, reference=None)
    with pytest.raises(ValueError, match="no reference for steps"):
        pipe(inversion=inv, target_prompt="a dog", num_inference_steps=3)
    with pytest.raises(ValueError, match="the inversion has 3 steps"):
        pipe(inversion=inv, target_prompt="a dog", num_inference_steps=4, guided=False)
    inv = pipe.invert(img, "a cat", num_inference_steps=3, nce_layers=["up_blocks.1"])
    with pytest.raises(ValueError, match="the inversion cached nce_layers"):
        pipe(inversion=inv, target_prompt="a dog", num_inference_steps=3)
    with pytest.raises(ValueError, match="pass both source_sentences and target_sentences"):
        pipe.edit_direction(source_sentences=["a cat"])
    with pytest.raises(TypeError, match="image must be"):
        pipe.invert("cat.png", "a cat")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_without_weights_says_what_to_pass(capsys, tmp_path):
    from contrastgen.cli import main
    with pytest.raises(SystemExit):
        main(["edit", "--image", "x.png", "--source", "a cat", "--target", "a dog"])
    assert "pass --model PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["edit", "--model", str(tmp_path), "--image", "x.png", "--source", "a cat", "--target", "a dog"])
    assert "no model_index.json" in capsys.readouterr().err


def test_cli_writes_the_edit_and_the_side_by_side(pipe, tmp_path, capsys):
    from PIL import Image

    from contrastgen.cli import main
    model = tmp_path / "tiny_sd"
    pipe.save_pretrained(model)
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "out.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["edit", "--model", str(model), "--image", str(src), "--source", "a cat", "--target", "a dog",
                     "--steps", "3", "--seed", "0", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    side = Image.open(tmp_path / "out_side.png")
    assert side.width >= 3 * 32 and side.height >= 32
    bad = tmp_path / "odd.png"
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(bad)
    with pytest.raises(SystemExit):
        main(["edit", "--model", str(model), "--image", str(bad), "--source", "a cat", "--target", "a dog"])
    assert "multiples of 8" in capsys.readouterr().err
