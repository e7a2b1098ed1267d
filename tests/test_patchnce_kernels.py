"""Fused PatchNCE (C++ and Triton in the interpreter) against the float64 reference ``patch_nce_ref``.

Accuracy rule (tests/_tolerance.py): the kernel's error against float64 is at most twice PyTorch's own error (the
reference evaluated in the input dtype) plus a small floor.  Non-finite rule: where the float64 reference is
non-finite, so is the fused loss, and every gradient entry the reference makes non-finite is non-finite too.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_2x_torch
import contrastgen
from contrastgen import reference as ref
from contrastgen.ops import backend_available

pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOOR = {F32: 2e-5, BF16: 2e-2, F16: 4e-3}
BACKENDS = [b for b in ("cpp", "triton") if backend_available(b, "patch_nce")[0]]
ops = torch.ops.contrastgen


def _layers(B, shapes, dtype=torch.float64, seed=0, normalize=True):
    g = torch.Generator().manual_seed(seed)

    def one(P, C):
        x = torch.randn(B, P, C, generator=g, dtype=torch.float64)
        return (F.normalize(x, dim=-1) if normalize else 0.3 * x).to(dtype)
    return [one(P, C) for P, C in shapes], [one(P, C) for P, C in shapes]


def _ref_per_layer(qs, ks, **kw):
    return torch.stack([ref.patch_nce_ref([q], [k], **kw) for q, k in zip(qs, ks)])


def _loss_and_grads(fn, qs, ks, detach_key, weights):
    qs = [q.clone().requires_grad_() for q in qs]
    ks = [k.clone().requires_grad_(not detach_key) for k in ks]
    loss = fn(qs, ks)
    out = (loss * weights).sum() if weights is not None else loss
    inputs = qs + ([] if detach_key else ks)
    return loss.detach(), torch.autograd.grad(out, inputs)


# (B, [(P_l, C_l) per layer]): layers with different C (300 > 256: the chunked-channel Triton path; C = 3 and 24:
# C++ partial panels), B*P not a multiple of any block, P = 1, B = 1
CASES = {
    "mixed_c": (2, [(70, 24), (5, 3), (33, 300)]),
    "p1": (3, [(1, 16), (4, 8)]),
    "b1": (1, [(70, 40), (9, 64)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("minibatch", [False, True], ids=["per_image", "minibatch"])
@pytest.mark.parametrize("detach_key", [True, False], ids=["keys_detached", "key_grads"])
def test_against_float64_reference(backend, case, minibatch, detach_key):
    B, shapes = CASES[case]
    q64, k64 = _layers(B, shapes)
    weights = torch.rand(len(shapes), dtype=torch.float64) + 0.5     # random upstream weight per layer
    kw = dict(temperature=0.07, all_negatives_from_minibatch=minibatch, detach_key=detach_key)
    e_loss, e_grads = _loss_and_grads(lambda q, k: _ref_per_layer(q, k, **kw), q64, k64, detach_key, weights)
    for reduction, w in (("none", weights.float()), ("mean", None)):
        got_loss, got_grads = _loss_and_grads(
            lambda q, k: contrastgen.patch_nce(q, k, reduction=reduction, backend=backend, **kw),
            [q.float() for q in q64], [k.float() for k in k64], detach_key, w)
        low_loss, low_grads = _loss_and_grads(
            lambda q, k: _ref_per_layer(q, k, **kw) if reduction == "none" else ref.patch_nce_ref(q, k, **kw),
            [q.float() for q in q64], [k.float() for k in k64], detach_key, w)
        exp_loss = e_loss if reduction == "none" else e_loss.mean()
        exp_grads = e_grads if reduction == "none" else _loss_and_grads(
            lambda q, k: ref.patch_nce_ref(q, k, **kw), q64, k64, detach_key, None)[1]
        assert got_loss.dtype == torch.float32 and got_loss.shape == exp_loss.shape
        assert_2x_torch(f"{reduction} loss", got_loss, exp_loss, low_loss, FLOOR[F32])
        for i, (a, e, lo) in enumerate(zip(got_grads, exp_grads, low_grads)):
            assert a.shape == e.shape and a.dtype == torch.float32
            assert_2x_torch(f"{reduction} grad {i}", a, e, lo, FLOOR[F32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("minibatch", [False, True], ids=["per_image", "minibatch"])
def test_low_precision(backend, dtype, minibatch):
    """bf16 / fp16 inputs, fp32 accumulation: within 2x the error of PyTorch's reference in the same dtype."""
    q64, k64 = _layers(2, [(70, 24), (33, 64)])
    kw = dict(temperature=0.07, all_negatives_from_minibatch=minibatch, detach_key=False)
    e_loss, e_grads = _loss_and_grads(lambda q, k: ref.patch_nce_ref(q, k, **kw), q64, k64, False, None)
    lo_loss, lo_grads = _loss_and_grads(lambda q, k: ref.patch_nce_ref(q, k, **kw), [q.to(dtype) for q in q64],
                                        [k.to(dtype) for k in k64], False, None)
    got_loss, got_grads = _loss_and_grads(lambda q, k: contrastgen.patch_nce(q, k, backend=backend, **kw),
                                          [q.to(dtype) for q in q64], [k.to(dtype) for k in k64], False, None)
    assert got_loss.dtype == dtype and all(g.dtype == dtype for g in got_grads)
    assert_2x_torch("loss", got_loss, e_loss, lo_loss, FLOOR[dtype])
    for i, (a, e, lo) in enumerate(zip(got_grads, e_grads, lo_grads)):
        assert_2x_torch(f"grad {i}", a, e, lo, FLOOR[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_temperature_gradient(backend):
    q64, k64 = _layers(2, [(20, 16), (7, 8)])
    t64 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    t32 = torch.tensor(0.2, requires_grad=True)
    qe = [q.clone().requires_grad_() for q in q64]
    e = ref.patch_nce_ref(qe, k64, temperature=t64)
    eg = torch.autograd.grad(e, qe + [t64])
    qg = [q.float().requires_grad_() for q in q64]
    got = contrastgen.patch_nce(qg, [k.float() for k in k64], temperature=t32, backend=backend)
    gg = torch.autograd.grad(got, qg + [t32])
    assert abs(got.item() - e.item()) < 1e-5
    for a, b in zip(gg, eg):
        assert torch.allclose(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input(backend, where, value):
    """Where the float64 reference is non-finite, the fused loss is non-finite, and no gradient entry that is
    non-finite in the reference is finite here (a NaN is never taken for an empty set)."""
    q64, k64 = _layers(2, [(20, 16), (9, 8)])
    (q64 if where == "query" else k64)[0][1, 3, 2] = value
    kw = dict(temperature=0.07, detach_key=False)
    w = torch.tensor([1.0, 2.0])
    e_loss, e_grads = _loss_and_grads(lambda q, k: _ref_per_layer(q, k, **kw), q64, k64, False, w.double())
    got_loss, got_grads = _loss_and_grads(
        lambda q, k: contrastgen.patch_nce(q, k, reduction="none", backend=backend, **kw),
        [q.float() for q in q64], [k.float() for k in k64], False, w)
    assert not torch.isfinite(e_loss[0])
    assert torch.equal(torch.isfinite(got_loss), torch.isfinite(e_loss))
    for a, e in zip(got_grads, e_grads):
        assert not torch.isfinite(a[~torch.isfinite(e)]).any()
        assert torch.isfinite(a[torch.isfinite(e)]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_i2i_guidance_case(backend):
    """The i2i guidance use (issue 14): UNet features of different channel counts, shared patches, no MLP,
    tau = 0.07, keys detached, the gradient flows to the queries only (no key pass, no lse saved)."""
    q64, k64 = _layers(1, [(64, 320), (64, 96), (64, 40)], normalize=False)
    qs = [F.normalize(q, dim=-1).float().requires_grad_() for q in q64]
    ks = [F.normalize(k, dim=-1).float() for k in k64]
    loss, lse, gq, dtl = ops.patchnce_fwd([q.reshape(-1, q.shape[-1]) for q in qs],
                                          [k.reshape(-1, k.shape[-1]) for k in ks], 1, 0.07, None, True, True, False,
                                          False, backend)
    assert lse.numel() == 0 and dtl.numel() == 0 and gq.numel() == sum(q.numel() for q in qs)
    got = contrastgen.patch_nce(qs, ks, temperature=0.07, backend=backend)
    grads = torch.autograd.grad(got, qs)
    qe = [F.normalize(q, dim=-1).requires_grad_() for q in q64]
    e = ref.patch_nce_ref(qe, [F.normalize(k, dim=-1) for k in k64], temperature=0.07)
    eg = torch.autograd.grad(e, qe)
    assert abs(got.item() - e.item()) < 2e-5
    for a, b in zip(grads, eg):
        assert torch.allclose(a.double(), b, atol=1e-6, rtol=1e-4)


def test_more_layers_than_one_launch_holds():
    """Triton: more than MAX_LAYERS layers are split over launches; the result is the same."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from contrastgen.kernels import patchnce as K
    shapes = [(5 + i, 8 + 2 * i) for i in range(K.MAX_LAYERS + 2)]
    q64, k64 = _layers(2, shapes)
    kw = dict(temperature=0.1, detach_key=False)
    weights = torch.rand(len(shapes), dtype=torch.float64)
    e_loss, e_grads = _loss_and_grads(lambda q, k: _ref_per_layer(q, k, **kw), q64, k64, False, weights)
    got_loss, got_grads = _loss_and_grads(
        lambda q, k: contrastgen.patch_nce(q, k, reduction="none", backend="triton", **kw),
        [q.float() for q in q64], [k.float() for k in k64], False, weights.float())
    assert torch.allclose(got_loss.double(), e_loss, atol=1e-5)
    for a, b in zip(got_grads, e_grads):
        assert torch.allclose(a.double(), b, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_work_for_gradients_nobody_asked_for(backend):
    q64, k64 = _layers(2, [(9, 8)])
    q2, k2 = [q64[0].float().reshape(-1, 8)], [k64[0].float().reshape(-1, 8)]
    loss, lse, gq, dtl = ops.patchnce_fwd(q2, k2, 2, 0.07, None, True, False, False, False, backend)
    assert loss.shape == () and lse.numel() == gq.numel() == dtl.numel() == 0
    with torch.no_grad():
        q = q64[0].float().requires_grad_()
        assert torch.isfinite(contrastgen.patch_nce(q, k64[0].float(), backend=backend))


# ----------------------------------------------------------------------------------------------- op level
def _op_args(backend, dtype=torch.float32, grad=True, detach_key=False, mean=True, minibatch=False, tau_t=False):
    q64, k64 = _layers(2, [(6, 5), (3, 4)])
    qs = [q.reshape(-1, q.shape[-1]).to(dtype).requires_grad_(grad) for q in q64]
    ks = [k.reshape(-1, k.shape[-1]).to(dtype).requires_grad_(grad and not detach_key) for k in k64]
    t = torch.tensor(0.3, dtype=dtype, requires_grad=grad) if tau_t else None
    return (qs, ks, 1 if minibatch else 2, 0.3, t, mean, grad, grad and not detach_key, grad and tau_t, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["mean", "none_minibatch", "keys_detached", "temperature"])
def test_opcheck(backend, variant):
    kw = {"mean": {}, "none_minibatch": dict(mean=False, minibatch=True), "keys_detached": dict(detach_key=True),
          "temperature": dict(tau_t=True)}[variant]
    args = _op_args(backend, **kw)
    torch.library.opcheck(ops.patchnce_fwd.default, args)
    qs, ks, groups, tau, t, mean, dq, dk, dt, be = args
    loss, lse, gq, dtl = ops.patchnce_fwd(*args)
    grad = torch.randn_like(loss)
    torch.library.opcheck(ops.patchnce_bwd.default,
                          (grad, [q.detach() for q in qs], [k.detach() for k in ks], groups, tau,
                           None if t is None else t.detach(), mean, lse.detach(), gq.detach(), dq, dk, be))


def test_gradcheck_cpp_float64():
    """The C++ kernels compute float64 input in float64: gradcheck at its default tolerances."""
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    q64, k64 = _layers(2, [(5, 4), (3, 6)])
    qs = [q.reshape(-1, q.shape[-1]).requires_grad_() for q in q64]
    ks = [k.reshape(-1, k.shape[-1]).requires_grad_() for k in k64]
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    for mean, groups in ((True, 2), (False, 1)):
        def fn(q0, q1, k0, k1, tt):
            loss, _, _, _ = ops.patchnce_fwd([q0, q1], [k0, k1], groups, 1.0, tt, mean, True, True, True, "cpp")
            return loss
        assert torch.autograd.gradcheck(fn, (*qs, *ks, t))


def test_gradcheck_triton_float64_inputs():
    """Triton computes float64 input in float32: gradcheck with float32-sized tolerances."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    q64, k64 = _layers(2, [(5, 4), (3, 6)])
    qs = [q.reshape(-1, q.shape[-1]).requires_grad_() for q in q64]
    ks = [k.reshape(-1, k.shape[-1]).requires_grad_() for k in k64]
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def fn(q0, q1, k0, k1, tt):
        loss, _, _, _ = ops.patchnce_fwd([q0, q1], [k0, k1], 2, 1.0, tt, False, True, True, True, "triton")
        return loss.double()
    assert torch.autograd.gradcheck(fn, (*qs, *ks, t), eps=1e-3, atol=2e-3, rtol=2e-3, nondet_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    q64, k64 = _layers(2, [(12, 8), (7, 16)])
    qs = [q.float().requires_grad_() for q in q64]
    ks = [k.float().requires_grad_() for k in k64]

    def step(q, k):
        a = contrastgen.patch_nce(q, k, temperature=0.07, backend=backend)
        b = contrastgen.patch_nce(q, k, temperature=0.1, all_negatives_from_minibatch=True, detach_key=False,
                                  reduction="none", backend=backend)
        return a + b.sum()

    loss = torch.compile(step, fullgraph=True, backend=compile_backend)(qs, ks)
    grads = torch.autograd.grad(loss, qs + ks)
    eloss = ref.patch_nce_ref(qs, ks, temperature=0.07) + _ref_per_layer(
        qs, ks, temperature=0.1, all_negatives_from_minibatch=True, detach_key=False).sum()
    egrads = torch.autograd.grad(eloss, qs + ks)
    assert torch.allclose(loss, eloss, atol=1e-5)
    for a, b in zip(grads, egrads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- bad input
def _x(*shape):
    return torch.randn(*shape)


BAD = [
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), _x(2, 8, 4)], [_x(2, 8, 4)]), ValueError, ["2 and 1"]),
    (lambda: contrastgen.patch_nce([], []), ValueError, ["non-empty"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(3, 8, 4)), ValueError, ["query[0]", "(2, 8, 4)", "(3, 8, 4)"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 9, 4)), ValueError, ["query[0]", "(2, 9, 4)"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 5)), ValueError, ["key[0]", "(2, 8, 5)"]),
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), _x(3, 8, 4)], [_x(2, 8, 4), _x(3, 8, 4)]), ValueError,
     ["batch size", "query[1]", "(3, 8, 4)"]),
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), _x(2, 8, 4).half()], [_x(2, 8, 4), _x(2, 8, 4).half()]), TypeError,
     ["query[1]", "dtype"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), temperature=float("nan")), ValueError,
     ["temperature", "finite"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), temperature=torch.tensor(float("inf"))), ValueError,
     ["temperature", "finite"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), temperature=0.0), ValueError, ["temperature"]),
    (lambda: contrastgen.patch_nce(_x(8, 4), _x(8, 4)), ValueError, ["query[0]", "3 dimensions"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), reduction="max"), ValueError, ["reduction"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4).long(), _x(2, 8, 4).long()), TypeError, ["query[0]", "floating"]),
    # a later layer: P or C of the key differs from its query's, a non-tensor entry, an empty layer
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), _x(2, 6, 8)], [_x(2, 8, 4), _x(2, 6, 9)]), ValueError,
     ["query[1]", "key[1]", "(2, 6, 8)", "(2, 6, 9)"]),
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), _x(2, 6, 8)], [_x(2, 8, 4), _x(2, 7, 8)]), ValueError,
     ["key[1]", "(2, 7, 8)"]),
    (lambda: contrastgen.patch_nce([_x(2, 8, 4), None], [_x(2, 8, 4), _x(2, 8, 4)]), TypeError,
     ["query[1]", "Tensor", "NoneType"]),
    (lambda: contrastgen.patch_nce([_x(2, 0, 4)], [_x(2, 0, 4)]), ValueError, ["query[0]", "empty"]),
    (lambda: contrastgen.patch_nce([], [_x(2, 8, 4)]), ValueError, ["0 and 1"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), temperature=-0.1), ValueError, ["temperature", "> 0"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), temperature="0.07"), TypeError, ["temperature"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), all_negatives_from_minibatch=1), TypeError,
     ["all_negatives_from_minibatch"]),
    (lambda: contrastgen.patch_nce(_x(2, 8, 4), _x(2, 8, 4), detach_key="no"), TypeError, ["detach_key"]),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_naming_the_argument(i):
    fn, exc, words = BAD[i]
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_float64_uses_the_reference():
    q64, k64 = _layers(2, [(9, 8)])
    got = contrastgen.patch_nce(q64, k64, backend=BACKENDS[0] if BACKENDS else None)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), ref.patch_nce_ref(q64, k64).item(), rel_tol=1e-12)
