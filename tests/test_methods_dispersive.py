"""DispersiveRegularizer on a tiny SiT, the SiT model/objective/samplers, and the CPU demo end to end."""
import json
import math

import pytest
import torch

import contrastgen
from contrastgen.methods.dispersive import PRESETS, DispersiveRegularizer
from contrastgen.methods.sit import (SIT_CONFIGS, SiT, interpolate, sample, sample_euler, sample_heun, sit_loss,
                                     sit_models)

pytestmark = pytest.mark.filterwarnings("ignore:contrastgen. op:RuntimeWarning")


def tiny(depth=4, **kw):
    """The tiny test SiT (8x8x1, hidden 32) with random adaLN weights: with the adaLN-Zero init every block is the
    identity and its attention/MLP get no gradient, which would hide what the tests look for."""
    torch.manual_seed(0)
    m = SiT("SiT-tiny/2", depth=depth, **kw)
    with torch.no_grad():
        for b in list(m.blocks) + [m.final_layer]:
            b.adaLN_modulation[-1].weight.normal_(0, 0.05)
            b.adaLN_modulation[-1].bias.normal_(0, 0.05)
        m.final_layer.linear.weight.normal_(0, 0.05)
    return m


def batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.rand(b, generator=g)


def block_outputs(model, x, t, y):
    """The blocks' outputs recomputed by hand (no hooks), in the model's eval (no label dropout) path."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    outs = []
    for blk in model.blocks:
        h = blk(h, c)
        outs.append(h)
    return outs


def grad_norms(module):
    return [0.0 if p.grad is None else p.grad.abs().sum().item() for p in module.parameters()]


# --------------------------------------------------------------------------- the regularizer
@pytest.mark.parametrize("variant,tau", [("infonce_l2", 0.5), ("infonce_l2", 1.0), ("infonce_cosine", 0.5),
                                         ("hinge", 0.5), ("covariance", 0.5)])
def test_loss_matches_dispersive_loss_of_hooked_output(variant, tau):
    model = tiny(class_dropout_prob=0.0)
    x, y, t = batch()
    reg = DispersiveRegularizer(model.blocks[1], weight=0.3, tau=tau, variant=variant)
    model(x, t, y)
    got = reg.pop_loss()
    z = block_outputs(model, x, t, y)[1].reshape(x.shape[0], -1)
    want = 0.3 * contrastgen.dispersive_loss(z.double(), variant=variant, tau=tau, backend="torch")
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isclose(reg.last_loss, got / 0.3)
    assert not torch.allclose(got, torch.zeros(())), "an untrained model's dispersive loss should not be 0"


def test_loss_is_added_to_training_loss_and_changes_gradients():
    model = tiny()
    x, y, t = batch()
    noise = torch.randn_like(x)
    reg = DispersiveRegularizer.paper(model.blocks)
    torch.manual_seed(3)
    diff = sit_loss(model, x, y, t=t, noise=noise)
    total = diff + reg.pop_loss()
    assert not torch.isclose(total, diff)
    total.backward()
    g_with = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(3)
    sit_loss(model, x, y, t=t, noise=noise).backward()
    reg.clear()
    assert not torch.allclose(g_with, model.blocks[0].attn.qkv.weight.grad)


def test_gradient_flows_to_hooked_and_earlier_blocks_only():
    model = tiny(depth=4)
    x, y, t = batch()
    reg = DispersiveRegularizer(model.blocks[1], weight=0.5)
    model(x, t, y)
    reg.pop_loss().backward()
    for name, mod in [("hooked block", model.blocks[1]), ("earlier block", model.blocks[0]),
                      ("patch embed", model.x_embedder), ("timestep embedder", model.t_embedder),
                      ("label embedder", model.y_embedder)]:
        assert all(g > 0 for g in grad_norms(mod)), f"{name} got no gradient from the regularizer"
    for later in (model.blocks[2], model.blocks[3], model.final_layer):
        assert all(g == 0 for g in grad_norms(later))


def test_pop_loss_clears_and_returns_zero_on_device():
    model = tiny()
    x, y, t = batch()
    reg = DispersiveRegularizer(model.blocks[0])
    z0 = reg.pop_loss()
    assert z0.item() == 0.0 and z0.device == x.device and z0.dtype == torch.float32
    model(x, t, y)
    assert reg.num_captured == 1
    assert reg.pop_loss().item() != 0.0
    assert reg.num_captured == 0 and reg.pop_loss().item() == 0.0


def test_accumulates_over_forwards_in_one_step():
    model = tiny(class_dropout_prob=0.0)
    x, y, t = batch(b=5)
    x2, y2, t2 = batch(b=5, seed=7)
    reg = DispersiveRegularizer(model.blocks[2], weight=1.0)
    model(x, t, y)
    a = reg.pop_loss()
    model(x2, t2, y2)
    b = reg.pop_loss()
    model(x, t, y)
    model(x2, t2, y2)
    torch.testing.assert_close(reg.pop_loss(), a + b)


def test_disabled_in_eval_paused_and_removed():
    model = tiny()
    x, y, t = batch()
    reg = DispersiveRegularizer(model.blocks[0])
    model.eval()
    model(x, t, y)
    assert reg.num_captured == 0 and reg.pop_loss().item() == 0.0
    sample_euler(model, x, y, steps=2, cfg_scale=2.0)
    assert reg.num_captured == 0
    model.train()
    with reg.paused():
        model(x, t, y)
    assert reg.num_captured == 0 and reg.enabled
    reg.enabled = False
    model(x, t, y)
    assert reg.num_captured == 0
    reg.enabled = True
    model(x, t, y)
    assert reg.num_captured == 1
    reg.remove()
    assert reg.num_captured == 0
    model(x, t, y)
    assert reg.num_captured == 0
    # opting in to eval-mode capture
    model.eval()
    reg2 = DispersiveRegularizer(model.blocks[0], train_only=False)
    model(x, t, y)
    assert reg2.num_captured == 1


def test_under_bfloat16_autocast():
    model = tiny(class_dropout_prob=0.0)
    x, y, t = batch(b=8)
    reg = DispersiveRegularizer(model.blocks[1], weight=0.5)
    # the residual stream stays fp32 under autocast (fp32 pos-embed + bf16 branches); an MLP's output is bf16
    reg_bf16 = DispersiveRegularizer(model.blocks[1].mlp, weight=1.0, tau=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
        assert out.dtype == torch.bfloat16
        assert reg_bf16._captured[0].dtype == torch.bfloat16
        z_mlp = reg_bf16._captured[0].detach()
        loss = reg.pop_loss()                 # inside autocast: must still be evaluated in float32
        loss_bf16 = reg_bf16.pop_loss()
    for lo in (loss, loss_bf16):
        assert lo.dtype == torch.float32 and torch.isfinite(lo)
    (loss + loss_bf16).backward()
    assert model.blocks[1].mlp.fc1.weight.grad.abs().sum() > 0
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
    # equal to the fp32 loss of the captured features (not a bf16 Gram: that would be off by far more)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = block_outputs(model, x, t, y)[1]
    want = 0.5 * contrastgen.dispersive_loss(z.reshape(8, -1).double(), tau=0.5, backend="torch")
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-5)
    want = contrastgen.dispersive_loss(z_mlp.reshape(8, -1).double(), tau=2.0, backend="torch")
    torch.testing.assert_close(loss_bf16.detach().double(), want, rtol=1e-4, atol=1e-5)


def test_hooking_two_blocks_uses_one_grouped_call(monkeypatch):
    model = tiny(class_dropout_prob=0.0)
    x, y, t = batch()
    reg = DispersiveRegularizer([model.blocks[0], model.blocks[2]], weight=0.25, tau=0.7)
    calls = []
    import contrastgen.methods.dispersive as mod
    real = mod.dispersive_loss

    def spy(z, **kw):
        calls.append((tuple(z.shape), kw.get("grouped", False)))
        return real(z, **kw)

    monkeypatch.setattr(mod, "dispersive_loss", spy)
    model(x, t, y)
    got = reg.pop_loss()
    assert calls == [((2, 6, 16 * 32), True)]
    outs = block_outputs(model, x, t, y)
    want = 0.25 * sum(contrastgen.dispersive_loss(outs[i].reshape(6, -1).double(), tau=0.7, backend="torch")
                      for i in (0, 2))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_presets_pick_the_documented_blocks():
    model = tiny(depth=8)
    r = DispersiveRegularizer.paper(model.blocks)
    assert r.modules[0] is model.blocks[2] and (r.weight, r.tau) == (0.5, 0.5)
    r.remove()
    r = DispersiveRegularizer.pytorch_port(model.blocks)
    assert r.modules[0] is model.blocks[7] and (r.weight, r.tau) == (0.25, 1.0)
    r.remove()
    r = DispersiveRegularizer.from_preset(model.blocks, "paper", block=5, weight=0.1)
    assert r.modules[0] is model.blocks[5] and r.weight == 0.1 and r.variant == "infonce_l2"
    r.remove()
    assert set(PRESETS) == {"paper", "pytorch_port"}
    with pytest.raises(TypeError, match="ModuleList"):
        DispersiveRegularizer(model.blocks)
    with pytest.raises(ValueError, match="preset"):
        DispersiveRegularizer.from_preset(model.blocks, "nope")


# --------------------------------------------------------------------------- SiT
def test_sit_configs_and_shapes():
    assert {k: (c.depth, c.hidden_size, c.num_heads, c.patch_size) for k, c in SIT_CONFIGS.items()
            if k != "SiT-tiny/2"} == {"SiT-S/2": (12, 384, 6, 2), "SiT-B/2": (12, 768, 12, 2),
                                      "SiT-L/2": (24, 1024, 16, 2), "SiT-XL/2": (28, 1152, 16, 2)}
    model = sit_models["SiT-tiny/2"]()
    assert len(model.blocks) == 2 and model.x_embedder.num_patches == 16
    x, y, t = batch(b=3)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0          # adaLN-Zero: the final layer starts at zero
    m2 = tiny()
    h = torch.randn(2, 16, 4)                      # unpatchify inverts the patch layout
    img = m2.unpatchify(h)
    assert img.shape == (2, 1, 8, 8)
    torch.testing.assert_close(img[0, 0, 0:2, 0:2].reshape(-1), h[0, 0])
    s = SiT("SiT-S/2", input_size=8, in_channels=3, num_classes=7)
    assert len(s.blocks) == 12 and s.config.hidden_size == 384
    assert s(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 7])).shape == (2, 3, 8, 8)


def test_label_dropout_and_cfg():
    model = tiny(class_dropout_prob=1.0)           # every label dropped in training
    x, y, t = batch(b=4)
    null = torch.full_like(y, 10)
    model.train()
    torch.testing.assert_close(model(x, t, y), model(x, t, null))
    model.eval()
    assert not torch.allclose(model(x, t, y), model(x, t, null))
    cond, unc = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 3.0), unc + 3.0 * (cond - unc), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond)


def test_interpolant_and_loss():
    x, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    xt, v = interpolate(x, noise, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(xt[0], noise[0])       # t = 0: noise
    torch.testing.assert_close(xt[1], x[1])           # t = 1: data
    torch.testing.assert_close(xt[2], 0.25 * x[2] + 0.75 * noise[2])
    torch.testing.assert_close(v, x - noise)

    class Oracle(torch.nn.Module):                    # predicts the exact velocity -> zero loss
        def forward(self, xt_, t_, y_):
            return x - noise
    assert sit_loss(Oracle(), x, torch.zeros(3, dtype=torch.long), noise=noise).item() == 0.0
    model = tiny()
    loss = sit_loss(model, x, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.shape == () and model.final_layer.linear.weight.grad.abs().sum() > 0


def test_samplers_integrate_a_known_velocity_field():
    target = torch.randn(4, 1, 8, 8)

    class ToTarget(torch.nn.Module):                  # v(x, t) = (target - x) / (1 - t): straight line to target
        num_classes = 10

        def forward(self, x, t, y):
            return (target - x) / (1 - t).clamp_min(1e-3).view(-1, 1, 1, 1)

    class Const(torch.nn.Module):                     # constant velocity: both solvers are exact
        def forward(self, x, t, y):
            return torch.ones_like(x) * (1 + 0 * t.view(-1, 1, 1, 1))
    y = torch.zeros(4, dtype=torch.long)
    noise = torch.randn(4, 1, 8, 8)
    for f in (sample_euler, sample_heun):
        torch.testing.assert_close(f(Const(), noise, y, steps=3), noise + 1)
    torch.testing.assert_close(sample_euler(ToTarget(), noise, y, steps=4), target, rtol=1e-4, atol=1e-4)

    class Quad(torch.nn.Module):                      # v = 2t: x(1) = x(0) + 1; Heun exact, Euler off by 1/steps
        def forward(self, x, t, y):
            return 2 * t.view(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(sample_heun(Quad(), noise, y, steps=2), noise + 1)
    torch.testing.assert_close(sample_euler(Quad(), noise, y, steps=4), noise + 0.75)


def test_cfg_sampling_shapes_euler_and_heun():
    model = tiny().eval()
    x, y, _ = batch(b=5)
    for method in ("euler", "heun"):
        for cfg in (1.0, 4.0):
            out = sample(model, x, y, method=method, steps=3, cfg_scale=cfg)
            assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(sample(model, x, y, method="heun", steps=3, cfg_scale=4.0),
                              sample(model, x, y, method="heun", steps=3, cfg_scale=1.0))
    with pytest.raises(ValueError, match="sampler"):
        sample(model, x, y, method="rk4")


def test_short_training_with_regularizer_reduces_both_losses():
    model = tiny(class_dropout_prob=0.1)
    reg = DispersiveRegularizer.paper(model.blocks, weight=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1)
    labels = torch.arange(16) % 10
    diffs, disps = [], []
    for _ in range(30):
        d = sit_loss(model, data, labels, generator=g)
        r = reg.pop_loss()
        (d + r).backward()
        opt.step()
        opt.zero_grad()
        diffs.append(d.item())
        disps.append(reg.last_loss.item())
    assert sum(diffs[-5:]) < sum(diffs[:5])
    assert disps[-1] < disps[0]
    assert disps[-1] >= -math.log(16) - 1e-4          # lower bound log(1/B) (diagonal included)


# --------------------------------------------------------------------------- demo
def test_demo_quick_end_to_end(tmp_path, capsys):
    from contrastgen.cli import main as cli_main
    out = tmp_path / "demo"
    rc = cli_main(["demo", "dispersive", "--quick", "--out", str(out), "--steps", "4", "--no-progress",
                   "--hidden", "32", "--depth", "2", "--samples-per-class", "3", "--sample-steps", "2",
                   "--classifier-epochs", "1", "--batch-size", "8"])
    assert rc == 0
    for f in ("samples.png", "losses.png", "summary.json"):
        assert (out / f).stat().st_size > 0
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"baseline", "dispersive"}
    for r in s["runs"].values():
        assert set(r["fd"]) == {"1.0", "2.0"} and all(math.isfinite(v) and v >= 0 for v in r["fd"].values())
    assert len(s["losses"]["baseline"]["diffusion"]) == 4
    assert s["runs"]["baseline"]["weight"] == 0.0 and s["runs"]["dispersive"]["weight"] == 0.5
    # same seed: the first step (before any update) sees the same batch and the same loss in both runs
    assert s["losses"]["baseline"]["diffusion"][0] == s["losses"]["dispersive"]["diffusion"][0]
    assert 0.0 <= s["classifier_test_accuracy"] <= 1.0
    assert "baseline" in capsys.readouterr().out


def test_tuple_outputs_parameterless_modules_and_context_manager():
    class Pair(torch.nn.Module):                      # returns (features, extra): the first element is used
        def forward(self, z):
            return z * 2, None
    net = torch.nn.Sequential(torch.nn.Identity())
    pair = Pair()
    z = torch.randn(5, 3, 7, requires_grad=True)
    with DispersiveRegularizer([net[0], pair], weight=1.0, tau=0.5) as reg:
        assert reg.pop_loss().device == z.device       # no parameters: still a zero on a device
        net(z)
        pair(z)
        got = reg.pop_loss()
    want = sum(contrastgen.dispersive_loss(w.reshape(5, -1).double(), tau=0.5, backend="torch")
               for w in (z.detach(), 2 * z.detach()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert reg.num_captured == 0
    net(z)
    assert reg.num_captured == 0                       # hooks removed on exit
    got.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# --------------------------------------------------------------------------- footguns (issue 9 items 5, 9; issue 15 item 6)
class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, z):
        return torch.tanh(self.lin(z))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_is_not_captured(reentrant):
    """torch.utils.checkpoint(use_reentrant=True) recomputes the block inside backward: that forward is ignored."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    blk = _Block()
    z = torch.randn(5, 3, 6, requires_grad=True)
    with DispersiveRegularizer(blk, weight=1.0, tau=0.5) as reg:
        want = contrastgen.dispersive_loss(blk(z).reshape(5, -1), tau=0.5)
        reg.clear()
        out = checkpoint(blk, z, use_reentrant=reentrant)
        assert reg.num_captured == 1
        out.square().mean().backward()                   # the recomputation runs here
        assert reg.num_captured == 1
        torch.testing.assert_close(reg.pop_loss(), want)
        # and inside one step: loss = task + reg, one backward
        out = checkpoint(blk, z, use_reentrant=reentrant)
        (out.square().mean() + reg.pop_loss()).backward()
        assert reg.num_captured == 0 and reg.pop_loss().item() == 0.0


@pytest.mark.parametrize("container", [lambda: torch.nn.Sequential(_Block(), _Block()),
                                       lambda: torch.nn.ModuleList([_Block(), _Block()]),
                                       lambda: torch.nn.ModuleDict({"a": _Block()})])
def test_container_of_blocks_is_refused_with_advice(container):
    c = container()
    with pytest.raises(TypeError, match=r"pass one block.*\.paper\(blocks\)"):
        DispersiveRegularizer(c)
    if isinstance(c, torch.nn.Sequential):               # its own output, asked for explicitly: allowed
        reg = DispersiveRegularizer([c])
        c(torch.randn(4, 6))
        assert reg.num_captured == 1
        reg.remove()
    else:
        with pytest.raises(TypeError, match="module\\[0\\]"):
            DispersiveRegularizer([c])


def test_captures_beyond_the_bound_raise():
    blk = _Block()
    reg = DispersiveRegularizer(blk)
    z = torch.randn(4, 6)
    for _ in range(8):
        blk(z)
    with pytest.raises(RuntimeError, match=r"9 captures without pop_loss\(\).*max_captures=8"):
        blk(z)
    assert reg.num_captured == 8
    reg.pop_loss()
    for _ in range(8):                                   # the bound counts from the last pop_loss / clear
        blk(z)
    reg.clear()
    blk(z)
    reg.remove()
    unbounded = DispersiveRegularizer(blk, max_captures=None)
    for _ in range(20):
        blk(z)
    assert unbounded.num_captured == 20
    unbounded.remove()
    with pytest.raises(ValueError, match="max_captures"):
        DispersiveRegularizer(blk, max_captures=0)


def test_remove_and_context_manager_detach_the_hooks():
    blk = _Block()
    before = len(blk._forward_hooks)
    reg = DispersiveRegularizer(blk)
    assert len(blk._forward_hooks) == before + 1
    reg.remove()
    assert len(blk._forward_hooks) == before
    blk(torch.randn(4, 6))
    assert reg.num_captured == 0
    reg.remove()                                         # idempotent
    with DispersiveRegularizer([blk, _Block()]) as reg2:
        assert len(blk._forward_hooks) == before + 1
    assert len(blk._forward_hooks) == before and reg2.num_captured == 0
    with pytest.raises(ZeroDivisionError):               # hooks are detached when the block raises, too
        with DispersiveRegularizer(blk):
            1 / 0
    assert len(blk._forward_hooks) == before


@pytest.mark.parametrize("kw,exc,word", [(dict(variant="l1"), ValueError, "variant"), (dict(tau=-1.0), ValueError, "tau"),
                                          (dict(tau=float("nan")), ValueError, "tau"),
                                          (dict(margin=-0.5), ValueError, "margin"),
                                          (dict(weight=float("inf")), ValueError, "weight"),
                                          (dict(tau="0.5"), TypeError, "tau"),
                                          (dict(train_only="yes"), TypeError, "train_only"),
                                          (dict(upcast=1), TypeError, "upcast")])
def test_bad_hyper_parameters_fail_at_construction(kw, exc, word):
    blk = _Block()
    with pytest.raises(exc, match=word):
        DispersiveRegularizer(blk, **kw)
    assert len(blk._forward_hooks) == 0                  # nothing was registered
