"""UNetCapture (contrastgen.methods.attention_capture): outputs equal the stock SDPA processor's, the averaged
maps equal those of the materialised probabilities (the official CONFORM processor), gradients reach the latent,
early exit changes neither maps nor gradients, feature hooks, and the processors are restored."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from contrastgen.methods.attention_capture import MaterializingCapture, UNetCapture  # noqa: E402


def _unet(heads=2):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=heads, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(b, 7, 32, generator=g)


def test_outputs_equal_stock_processor(unet):
    x, t, emb = _inputs()
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(x, t, encoder_hidden_states=emb).sample
    for res, rows in (((16, 16), None), ((8, 8), "cond"), ((16, 16), [1])):
        with UNetCapture(unet, resolution=res) as cap, torch.no_grad():
            out = cap.forward(x, t, emb, rows=rows, early_exit=False).sample
        assert torch.equal(out, stock), (res, rows)
        assert cap.n_layers == {(16, 16): 3, (8, 8): 4}[res]   # down.0 + up.1 / down.1 + mid + up.0


@pytest.mark.parametrize("res", [(16, 16), (8, 8)])
def test_maps_equal_materialised_probabilities_and_gradients(unet, res):
    x, t, emb = _inputs(b=1)
    weights = torch.randn(*res, 7, generator=torch.Generator().manual_seed(4))

    def loss_and_grad(ctx, use_capture):
        xx = x.clone().requires_grad_(True)
        with ctx as cap:
            if use_capture:
                cap.forward(xx, t, emb, early_exit=False)
                m = cap.maps()[0]
            else:
                unet(xx, t, encoder_hidden_states=emb)
                m = cap.maps()
        (g,) = torch.autograd.grad((m * weights).sum(), xx)
        return m.detach(), g

    m_ours, g_ours = loss_and_grad(UNetCapture(unet, resolution=res), True)
    m_ref, g_ref = loss_and_grad(MaterializingCapture(unet, resolution=res), False)
    assert m_ours.shape == (*res, 7)
    torch.testing.assert_close(m_ours, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_ours.sum(-1), torch.ones(res), rtol=1e-5, atol=1e-5)
    assert g_ours.abs().max() > 0
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_cond_rows_of_a_cfg_batch(unet):
    x, t, emb = _inputs(b=2)
    with UNetCapture(unet, resolution=(16, 16)) as cap, torch.no_grad():
        cap.forward(x, t, emb, rows="cond", early_exit=False)
        cond = cap.maps()
        cap.forward(x[1:], t, emb[1:], early_exit=False)
        alone = cap.maps()
    assert cond.shape == (1, 16, 16, 7)
    torch.testing.assert_close(cond, alone, rtol=1e-5, atol=1e-6)


def test_early_exit_same_maps_and_gradients(unet):
    x, t, emb = _inputs(b=1)
    w = torch.randn(1, 8, 8, 7)
    cap = UNetCapture(unet, resolution=(8, 8), features=("down_blocks.1",))
    with cap:
        res = []
        for _ in range(3):
            xx = x.clone().requires_grad_(True)
            out = cap.forward(xx, t, emb, early_exit=True)
            (g,) = torch.autograd.grad((cap.maps() * w).sum(), xx)
            res.append((out, cap.maps().detach(), g, cap.features["down_blocks.1"].shape))
    assert res[0][0] is not None          # the first call runs to the end (it counts the layers)
    assert res[1][0] is None and res[2][0] is None
    assert cap.expected_layers == 4
    for _, m, g, fshape in res[1:]:
        torch.testing.assert_close(m, res[0][1], rtol=0, atol=0)
        torch.testing.assert_close(g, res[0][2], rtol=1e-6, atol=1e-8)
        assert fshape == (1, 64, 8, 8)


def test_disabled_and_removed(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    cap = UNetCapture(unet, resolution=(16, 16))
    x, t, emb = _inputs(b=1)
    with cap, torch.no_grad():
        cap.reset(enabled=False)
        unet(x, t, encoder_hidden_states=emb)
        with pytest.raises(RuntimeError, match="no cross-attention layer"):
            cap.maps()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    with pytest.raises(ValueError, match="features"):
        UNetCapture(unet, features=("up_blocks.9",))
    with pytest.raises(RuntimeError, match="install"):
        UNetCapture(unet).forward(x, t, emb)


def test_heads_weighted_like_the_official_average():
    """Layers with different head counts: one mean over all (layer, head) pairs, as the official code."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), norm_num_groups=8).eval()
    x, t, emb = _inputs(b=1)
    with UNetCapture(unet, resolution=(8, 8)) as cap, torch.no_grad():
        cap.forward(x, t, emb, early_exit=False)
        ours = cap.maps()[0]
    with MaterializingCapture(unet, resolution=(8, 8)) as mat, torch.no_grad():
        unet(x, t, encoder_hidden_states=emb)
        ref = mat.maps()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
