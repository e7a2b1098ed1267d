"""The custom ops contrastgen::infonce_fwd/bwd and siglip_fwd/bwd (Triton backend, interpreter):
torch.library.opcheck, torch.compile(fullgraph=True), gradcheck in float64."""
import pytest
import torch

import contrastgen
from contrastgen import reference as ref

pytest.importorskip("triton")
import contrastgen.ops.infonce  # noqa: E402,F401  (registers the ops)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
ops = torch.ops.contrastgen


def _fwd_args(n=5, m=5, d=7, kb=0, labels=False, ex=False, ibn=True, pml=False, sym=False, grad=True):
    q = torch.randn(n, d, requires_grad=grad)
    k = q if ex else torch.randn(m, d, requires_grad=grad)
    bank = torch.randn(kb, d, requires_grad=grad) if kb else None
    ql = torch.randint(0, 2, (n,)) if labels else None
    kl = (ql if ex else torch.randint(0, 2, (m,))) if labels else None
    scale = torch.tensor(2.0, requires_grad=grad)
    return (q, k, bank, scale, ql, kl, ex, ibn, pml, sym, "triton")


FWD_VARIANTS = {
    "clip": dict(sym=True),
    "supcon_self": dict(labels=True, ex=True),
    "pml_self": dict(labels=True, ex=True, pml=True),
    "moco_bank": dict(kb=6, ibn=False),
    "pml_bank": dict(kb=3, labels=True, pml=True, m=4),
}


@pytest.mark.parametrize("variant", list(FWD_VARIANTS))
def test_opcheck_infonce_fwd(variant):
    torch.library.opcheck(ops.infonce_fwd.default, _fwd_args(**FWD_VARIANTS[variant]))


@pytest.mark.parametrize("variant", ["clip", "pml_bank"])
def test_opcheck_infonce_bwd(variant):
    args = _fwd_args(grad=False, **FWD_VARIANTS[variant])
    row, col, rs, cs = ops.infonce_fwd(*args)
    g_row, g_col = torch.randn_like(row), torch.randn_like(col)
    torch.library.opcheck(ops.infonce_bwd.default, (*args[:10], rs, cs, g_row, g_col, "triton"))


def test_opcheck_siglip():
    q, k = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    s, b = torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    torch.library.opcheck(ops.siglip_fwd.default, (q, k, s, b, "triton"))
    torch.library.opcheck(ops.siglip_bwd.default, (q.detach(), k.detach(), s.detach(), b.detach(), torch.randn(6),
                                                   "triton"))


def test_unused_outputs_get_zero_grads():
    """Only the column loss is used: the row gradient is None inside autograd and is replaced by zeros."""
    q, k, bank, scale, *rest = _fwd_args(n=6, m=6, sym=True)
    _, col, _, _ = ops.infonce_fwd(q, k, bank, scale, *rest)
    gq, gk, gs = torch.autograd.grad(col.sum(), [q, k, scale])
    qd, kd, sd = q.detach().double(), k.detach().double(), scale.detach().double()
    qd.requires_grad_(), kd.requires_grad_(), sd.requires_grad_()
    s = sd * qd @ kd.T
    expect = (torch.logsumexp(s, 0) - s.diagonal()).sum()
    eq, ek, es = torch.autograd.grad(expect, [qd, kd, sd])
    for a, b in ((gq, eq), (gk, ek), (gs, es)):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    """float64 at the public API with backend="triton": routed to the float64 reference (the fused kernels compute
    in float32), so gradcheck passes at its default (float64) tolerances."""
    torch.manual_seed(1)
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    kw = {}

    def clip(a, b, s):
        return contrastgen.clip_loss(a, b, s, backend="triton")

    def pml_bank(a, b, c, t):
        return contrastgen.info_nce(a, b, labels=labels, positives="pml", negatives=c, in_batch_negatives=True,
                                    temperature=t, reduction="sum", backend="triton")

    def supcon_self(a, t):
        return contrastgen.info_nce(a, None, labels=labels, positives="supcon", temperature=t, reduction="none",
                                    backend="triton")

    def siglip(a, b, s, bias):
        return contrastgen.siglip_loss(a, b, s, bias, backend="triton")

    assert torch.autograd.gradcheck(clip, (q, k, temp), **kw)
    assert torch.autograd.gradcheck(pml_bank, (q, k, bank, temp), **kw)
    assert torch.autograd.gradcheck(supcon_self, (q, temp), **kw)
    assert torch.autograd.gradcheck(siglip, (q, k, temp, -temp.detach().clone().requires_grad_()), **kw)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    n, d = 37, 16
    img, txt = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    logit_scale = torch.tensor(10.0, requires_grad=True)
    labels = torch.randint(0, 3, (n,))
    temp = torch.tensor(0.1, requires_grad=True)

    def step(a, b, s, t):
        clip = contrastgen.clip_loss(a, b, s, backend="triton")
        nce = contrastgen.info_nce(a, None, labels=labels, positives="supcon", temperature=t, backend="triton")
        return clip + nce

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(img, txt, logit_scale, temp)
    grads = torch.autograd.grad(loss, [img, txt, logit_scale, temp])
    eloss = ref.clip_loss_ref(img, txt, logit_scale) + ref.info_nce_ref(img, None, labels=labels, positives="supcon",
                                                                         temperature=temp)
    egrads = torch.autograd.grad(eloss, [img, txt, logit_scale, temp])
    assert torch.allclose(loss, eloss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, egrads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
