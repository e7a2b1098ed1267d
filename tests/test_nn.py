"""nn.Module wrappers call the functional API with their stored options."""
import math

import torch

import contrastgen as cg
from contrastgen import nn as cnn
from contrastgen import reference as R


def test_clip_module_learns_scale_and_clamps():
    m = cnn.ClipLoss(backend="torch")
    assert math.isclose(m.log_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    loss = m(img, txt)
    torch.testing.assert_close(loss, R.clip_loss_ref(img, txt, m.log_scale.exp()))
    loss.backward()
    assert m.log_scale.grad is not None
    with torch.no_grad():
        m.log_scale.fill_(10.0)
    m.clamp_()
    assert math.isclose(m.log_scale.item(), math.log(100.0), rel_tol=1e-6)


def test_modules_match_functional():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(cnn.SigLipLoss(backend="torch")(q, k), R.siglip_loss_ref(q, k, 10.0, -10.0))
    torch.testing.assert_close(cnn.NTXentLoss(0.2, backend="torch")(torch.cat([q, k]), torch.arange(6).repeat(2)),
                               R.nt_xent_ref(q, k, 0.2))
    torch.testing.assert_close(cnn.InfoNCELoss(0.1, similarity="dot", backend="torch")(q, k),
                               R.info_nce_ref(q, k, temperature=0.1))
    torch.testing.assert_close(cnn.DispersiveLoss(tau=1.0, backend="torch")(q), R.dispersive_loss_ref(q, tau=1.0))
    torch.testing.assert_close(cnn.UniformityLoss(backend="torch")(q), R.uniformity_ref(q))
    p = torch.randn(2, 5, 3)
    torch.testing.assert_close(cnn.PatchNCELoss()(p, p.flip(1)), R.patch_nce_ref(p, p.flip(1)))
    maps = torch.rand(4, 4, 77)
    torch.testing.assert_close(cnn.AttentionNCELoss([[2, 3], [5]])(maps), cg.attention_nce(maps, [[2, 3], [5]]))
