"""UNetCapture.count_layers: a no_grad forward learns the layer count, so the first guidance forward already
stops early (the full first forward with autograd was the guidance step's peak memory); maps and gradients are
those of the full forward, and ConformPipeline's images do not change."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from contrastgen.methods.attention_capture import UNetCapture  # noqa: E402


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8).eval()


def test_count_layers_then_first_forward_exits_early():
    unet = _unet()
    g = torch.Generator().manual_seed(1)
    x, t, emb = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 7, 32, generator=g)
    w = torch.randn(2, 8, 8, 7, generator=g)
    full = UNetCapture(unet, resolution=(8, 8))
    with full:
        xx = x.clone().requires_grad_(True)
        assert full.forward(xx, t, emb, early_exit=False) is not None
        (g_full,) = torch.autograd.grad((full.maps() * w).sum(), xx)
        m_full = full.maps().detach()
    cap = UNetCapture(unet, resolution=(8, 8))
    with pytest.raises(RuntimeError, match="install"):
        cap.count_layers(x, t, emb)
    with cap:
        assert cap.count_layers(x, t, emb) == full.expected_layers == 4
        xx = x.clone().requires_grad_(True)
        assert cap.forward(xx, t, emb, early_exit=True) is None      # the first call already stops early
        (g_early,) = torch.autograd.grad((cap.maps() * w).sum(), xx)
    torch.testing.assert_close(cap.maps().detach(), m_full, rtol=0, atol=0)
    torch.testing.assert_close(g_early, g_full, rtol=1e-6, atol=1e-8)
    assert UNetCapture(unet, resolution=None, features=("down_blocks.1",)).install().count_layers(x, t, emb) == 0


def test_pipeline_early_exit_same_images():
    from contrastgen.methods.conform_demo import tiny_stable_diffusion
    pipe = tiny_stable_diffusion(0)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append(torch.is_grad_enabled()), with_kwargs=True)
    kw = dict(token_groups=[[2, 3], [5, 6]], num_inference_steps=4, max_iter_to_alter=2,
              iterative_refinement_steps=(0,), refinement_steps=2, output_type="np", print_groups=False)
    a = pipe("a red cat", generator=torch.Generator().manual_seed(0), early_exit=True, **kw).images
    n_early = len(calls)
    b = pipe("a red cat", generator=torch.Generator().manual_seed(0), early_exit=False, **kw).images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert n_early == len(calls) - n_early + 1     # one extra (no_grad) forward: the layer count
    assert calls[0] is False
