"""contrastgen.methods.cut (generator / discriminator layout, presets, training step) and `contrastgen demo cut`
end to end at a tiny size."""
import json

import pytest
import torch

from contrastgen.methods.cut import (CUTConfig, CUTModel, Downsample, NLayerDiscriminator, PRESETS, ResnetGenerator,
                                     Upsample, gan_loss)


def test_generator_layers_follow_cuts_sequential():
    torch.manual_seed(0)
    g = ResnetGenerator(3, 3, ngf=8, n_blocks=5)
    x = torch.randn(2, 3, 16, 16)
    y = g(x)
    assert y.shape == x.shape and float(y.detach().abs().max()) <= 1.0      # tanh output
    feats = g(x, [0, 4, 8, 12, 16], encode_only=True)
    # 0: reflection-padded input; 4: first stride-1 conv before the first blur-pool; 8: second downsampling stage;
    # 12, 16: the first and fifth residual blocks at 4 ngf channels, 1/4 resolution
    assert [tuple(f.shape) for f in feats] == [(2, 3, 22, 22), (2, 16, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4),
                                               (2, 32, 4, 4)]
    assert torch.equal(feats[0], torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"))
    out, feats2 = g(x, [0, 4])
    assert torch.allclose(out, y) and len(feats2) == 2
    assert type(g.model[16]).__name__ == "ResnetBlock" and type(g.model[7]).__name__ == "Downsample"


def test_antialiased_resampling_shapes_and_mean():
    x = torch.ones(1, 4, 8, 8)
    assert torch.allclose(Downsample(4)(x), torch.ones(1, 4, 4, 4))        # normalised blur keeps constants
    u = Upsample(4)(torch.randn(1, 4, 5, 7))
    assert u.shape == (1, 4, 10, 14)


def test_discriminator_is_a_patchgan():
    d = NLayerDiscriminator(3, ndf=8, n_layers=3)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape[:2] == (2, 1) and out.shape[-1] > 1                     # a map of patch predictions
    assert NLayerDiscriminator(3, ndf=8, n_layers=2)(torch.randn(1, 3, 16, 16)).shape == (1, 1, 2, 2)


def test_gan_losses():
    p = torch.tensor([[0.5, 2.0]])
    assert torch.isclose(gan_loss(p, True), ((p - 1) ** 2).mean())
    assert torch.isclose(gan_loss(p, False), (p ** 2).mean())
    assert torch.isclose(gan_loss(p, True, "vanilla"), torch.nn.functional.softplus(-p).mean())
    with pytest.raises(ValueError):
        gan_loss(p, True, "hinge")


def test_presets():
    cut, fast = CUTConfig.cut(), CUTConfig.fastcut()
    assert (cut.lambda_nce, cut.nce_idt, cut.flip_equivariance) == (1.0, True, False)
    assert (fast.lambda_nce, fast.nce_idt, fast.flip_equivariance) == (10.0, False, True)
    assert cut.nce_layers == (0, 4, 8, 12, 16) and cut.num_patches == 256 and cut.nce_t == 0.07
    assert cut.gan_mode == "lsgan" and cut.lr == 2e-4 and cut.betas == (0.5, 0.999)
    assert set(PRESETS) == {"cut", "fastcut"} and CUTConfig.cut(lambda_nce=0.0).lambda_nce == 0.0


@pytest.mark.parametrize("preset", ["cut", "fastcut"])
def test_training_step(preset):
    torch.manual_seed(0)
    cfg = PRESETS[preset](num_patches=16, netf_nc=16)
    model = CUTModel(cfg, 3, 3, ngf=4, n_blocks=5, ndf=4, n_layers_d=1)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    losses = model.train_step(a, b)
    assert model.opt_f is not None and model.nce.sampler.heads_created            # F's optimizer after step 1
    assert {"D", "G_GAN", "NCE", "G"} <= set(losses) and ("NCE_Y" in losses) == cfg.nce_idt
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    head = [p.detach().clone() for p in model.nce.sampler.parameters()]
    gen = [p.detach().clone() for p in model.netG.parameters()]
    model.train_step(a, b)
    assert any(not torch.equal(p, q) for p, q in zip(head, model.nce.sampler.parameters()))   # F is trained
    assert any(not torch.equal(p, q) for p, q in zip(gen, model.netG.parameters()))


def test_training_step_without_patchnce():
    torch.manual_seed(0)
    model = CUTModel(CUTConfig.cut(lambda_nce=0.0), 3, 3, ngf=4, n_blocks=5, ndf=4, n_layers_d=1)
    losses = model.train_step(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))
    assert "NCE" not in losses and model.opt_f is None and not model.nce.sampler.heads_created


def test_demo_end_to_end_tiny(tmp_path):
    from contrastgen.cli import main
    assert main(["demo", "cut", "--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "results.json").read_text())
    assert set(s["runs"]) == {"CUT", "no PatchNCE"}
    for r in s["runs"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= 0.0 and 0.0 <= r["accuracy_polarity_swapped"] <= 1.0
    assert s["runs"]["CUT"]["lambda_nce"] == 1.0 and s["runs"]["no PatchNCE"]["lambda_nce"] == 0.0
    assert "NCE" in s["losses"]["CUT"] and "NCE" not in s["losses"]["no PatchNCE"]
    assert s["data"]["a_train"] + s["data"]["b_train"] == s["data"]["classifier_train"]
    assert {"real_domain_b", "untranslated_domain_a"} <= set(s["scale"])
    assert (tmp_path / "translations.png").stat().st_size > 0 and (tmp_path / "losses.png").stat().st_size > 0


def test_polarity_swap_is_an_involution_on_domain_b():
    from contrastgen.methods.cut_demo import BG, FG, swap_polarity, to_domain_b
    x01 = torch.rand(3, 1, 16, 16)
    b = to_domain_b(x01)
    assert torch.allclose(swap_polarity(swap_polarity(b)), b, atol=1e-5)
    v = torch.nn.functional.max_pool2d(x01, 3, stride=1, padding=1)      # the stroke weight to_domain_b drew
    expect = (BG.view(1, 3, 1, 1) * v + FG.view(1, 3, 1, 1) * (1 - v)) * 2 - 1
    assert torch.allclose(swap_polarity(b), expect, atol=1e-5)
