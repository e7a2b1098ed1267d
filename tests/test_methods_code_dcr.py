"""CoDE and DCR losses against their papers' official code, transcribed here in float64, under the
2x-PyTorch-error rule (the same official code run in float32 gives PyTorch's own error)."""
import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_2x_torch
from contrastgen.methods.code import CoDELoss, code_info_nce
from contrastgen.methods.dcr import DCRLoss

F32, F64 = torch.float32, torch.float64
BACKENDS = ["torch", "cpp", "triton"]


# ----------------------------------------------------------------------------------------------- CoDE
def official_info_nce(query, positive_key, negative_keys, temperature=0.1, negative_mode="unpaired"):
    """aimagelab/CoDE src/losses/function_loss.py info_nce (with explicit negatives), transcribed."""
    query, positive_key, negative_keys = (F.normalize(x, dim=-1) for x in (query, positive_key, negative_keys))
    positive_logit = torch.sum(query * positive_key, dim=1, keepdim=True)
    if negative_mode == "unpaired":
        negative_logits = query @ negative_keys.transpose(-2, -1)
    else:
        negative_logits = (query.unsqueeze(1) @ negative_keys.transpose(-2, -1)).squeeze(1)
    logits = torch.cat([positive_logit, negative_logits], dim=1)
    labels = torch.zeros(len(logits), dtype=torch.long)
    return F.cross_entropy(logits / temperature, labels)


def official_code_loss(real, fake, aug_real, aug_fake, local_real, global_real, local_fake, global_fake):
    """src/engine.py: contrastive_loss_real + contrastive_loss_fake (the no_sync branch's sum)."""
    lf = official_info_nce
    r = (lf(real, aug_real, aug_fake) + lf(local_real, global_real, global_fake)) / 2
    f = (lf(fake, aug_fake, aug_real) + lf(local_fake, global_fake, global_real)) / 2
    return r + f


def _code_batches(b=16, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base_r, base_f = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) + 0.5
    jit = lambda x: x + 0.3 * torch.randn(b, d, generator=g)  # noqa: E731  (views of the same image stay close)
    return [base_r, base_f, jit(base_r), jit(base_f), jit(base_r), jit(base_r), jit(base_f), jit(base_f)]


def _grads(fn, xs, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return out.detach(), torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_code_loss_equals_official_code(backend):
    xs = _code_batches()
    ours = CoDELoss(backend=backend)
    got, got_g = _grads(ours, xs, F32)
    ref, ref_g = _grads(official_code_loss, xs, F64)
    low, low_g = _grads(official_code_loss, xs, F32)
    assert_2x_torch("CoDE loss", got, ref, low, 2e-6)
    for i, (a, b, c) in enumerate(zip(got_g, ref_g, low_g)):
        assert_2x_torch(f"CoDE grad[{i}]", a, b, c, 2e-6)
    _, terms = ours(*xs)
    assert set(terms) == {"real", "fake"} and abs((terms["real"] + terms["fake"]).item() - got.item()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["unpaired", "paired"])
def test_code_info_nce_equals_official_function(backend, mode):
    """On unit-norm inputs with a bank of negatives at tau = 0.1 (the ill-conditioned regime of the issue)."""
    g = torch.Generator().manual_seed(1)
    n, m, d = 24, 40, 16
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    p = F.normalize(q + 0.1 * torch.randn(n, d, generator=g), dim=-1)
    negs = F.normalize(torch.randn(m, d, generator=g) if mode == "unpaired" else torch.randn(n, m, d, generator=g),
                       dim=-1)
    ours = lambda a, b, c: code_info_nce(a, b, c, negative_mode=mode, backend=backend)  # noqa: E731
    off = lambda a, b, c: official_info_nce(a, b, c, negative_mode=mode)  # noqa: E731
    got, got_g = _grads(ours, [q, p, negs], F32)
    ref, ref_g = _grads(off, [q, p, negs], F64)
    low, low_g = _grads(off, [q, p, negs], F32)
    assert_2x_torch("loss", got, ref, low, 2e-6)
    for a, b, c in zip(got_g, ref_g, low_g):
        assert_2x_torch("grad", a, b, c, 2e-6)


def test_code_bad_input():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="negative_mode"):
        code_info_nce(q, q, q, negative_mode="mixed")
    with pytest.raises(ValueError, match="3 dimensions"):
        code_info_nce(q, q, q, negative_mode="paired")
    with pytest.raises(ValueError, match="2 dimensions"):
        code_info_nce(q, q, q[None], negative_mode="unpaired")


# ----------------------------------------------------------------------------------------------- DCR
def official_dcr_loss(model_pred, model_pred_plus, target_v, tau=0.1):
    """boyuh/DCR train_OpenAICLIP_stage1.py, the loss block, transcribed."""
    bs = model_pred.shape[0]
    anchor_pred = model_pred[torch.arange(bs), torch.arange(bs)]
    anchor_vec = F.normalize(anchor_pred.flatten(1), dim=1)
    gt_vec = F.normalize(target_v.flatten(1), dim=1)
    pos_plus_vec = F.normalize(model_pred_plus.flatten(1), dim=1)
    all_vec = F.normalize(model_pred.reshape(bs, bs, -1), dim=2)
    sim_anchor_all = torch.einsum("bd,bkd->bk", anchor_vec, all_vec)
    logits_all = sim_anchor_all / tau
    neg_mask = ~torch.eye(bs, dtype=torch.bool)
    neg_logit = logits_all.masked_fill(~neg_mask, float("-inf"))
    logits_pos_pred = (anchor_vec * pos_plus_vec).sum(dim=1) / tau
    logits_pos_gt = (anchor_vec * gt_vec).sum(dim=1) / tau
    denom = torch.exp(logits_pos_pred) + torch.exp(logits_pos_gt) + torch.exp(neg_logit).sum(dim=1)
    loss_pos_pred = -torch.log(torch.exp(logits_pos_pred) / denom)
    loss_pos_gt = -torch.log(torch.exp(logits_pos_gt) / denom)
    return (0.5 * (loss_pos_pred + loss_pos_gt)).mean()


def _dcr_inputs(b=6, shape=(4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, *shape, generator=g)
    pairs = target[:, None] * 0.5 + torch.randn(b, b, *shape, generator=g)
    pos = pairs[torch.arange(b), torch.arange(b)] + 0.3 * torch.randn(b, *shape, generator=g)
    return [pairs, pos, target]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 2, 7])
def test_dcr_loss_equals_official_code(backend, b):
    xs = _dcr_inputs(b=b)
    got, got_g = _grads(DCRLoss(backend=backend), xs, F32)
    ref, ref_g = _grads(official_dcr_loss, xs, F64)
    low, low_g = _grads(official_dcr_loss, xs, F32)
    assert_2x_torch("DCR loss", got, ref, low, 2e-6)
    for i, (a, bb, c) in enumerate(zip(got_g, ref_g, low_g)):
        assert_2x_torch(f"DCR grad[{i}]", a, bb, c, 2e-6)


def test_dcr_per_anchor_and_bad_input():
    xs = _dcr_inputs(b=4)
    per = DCRLoss(reduction="none", backend="cpp")(*xs)
    assert per.shape == (4,) and abs(per.mean().item() - DCRLoss(backend="cpp")(*xs).item()) < 1e-6
    pairs, pos, tgt = xs
    with pytest.raises(ValueError, match=r"\(B, B, \.\.\.\)"):
        DCRLoss()(pairs[:, :3], pos, tgt)
    with pytest.raises(ValueError, match="pred_pos and target"):
        DCRLoss()(pairs, pos[:, :2], tgt)
    with pytest.raises(TypeError, match="target"):
        DCRLoss()(pairs, pos, None)


def test_code_and_dcr_compile_fullgraph():
    torch._dynamo.reset()
    xs = [x.requires_grad_() for x in _dcr_inputs(b=5)]
    dcr = DCRLoss(backend="cpp")
    got = torch.compile(dcr, fullgraph=True, backend="aot_eager")(*xs)
    assert torch.allclose(got, dcr(*xs), atol=1e-6)
    assert torch.allclose(torch.autograd.grad(got, xs[0])[0], torch.autograd.grad(dcr(*xs), xs[0])[0], atol=1e-6)
    cs = [x.requires_grad_() for x in _code_batches(b=8, d=8)]
    code = CoDELoss(backend="cpp")
    out, terms = torch.compile(code, fullgraph=True, backend="aot_eager")(*cs)
    assert torch.allclose(out, code(*cs)[0], atol=1e-6)
