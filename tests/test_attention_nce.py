"""Fused CONFORM loss (contrastgen::attention_nce_fwd / _bwd; cpp and Triton-interpreter backends) against the
float64 reference, pytorch-metric-learning's NTXentLoss, the edge cases of the issue, opcheck / compile / gradcheck.

Accuracy rule (tests/_tolerance.py): the kernel's float32 error against the float64 reference is at most twice the
reference's own float32 error plus a small floor.  The contrastive loss counts its non-zero terms, a discontinuous
function: its cases use maps away from the thresholds (no double softmax)."""
import itertools

import pytest
import torch

import contrastgen as cg
from contrastgen.ops.attention_nce import attention_nce_core
from contrastgen.reference import attention_nce_ref
from contrastgen.reference.attention import _token_maps

from _tolerance import assert_2x_torch

BACKENDS = ["cpp", "triton"]
D64 = torch.float64


def _maps(b, h, w, t=77, seed=0, sharp=2.0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, w, t, generator=g, dtype=D64) * sharp, -1).to(dtype)


GROUPS = [[[2, 3], [6, 7]], [[4], [9], [10]], [[5, 8, 11]]]   # per prompt: pairs, singletons, one group


def _check(backend, maps64, groups, prev64=None, grad_seed=1, rel_floor=2e-6, **kw):
    """Loss and gradient of the kernel (float32) vs the reference in float64 and in float32."""
    g = torch.randn(maps64.shape[0], generator=torch.Generator().manual_seed(grad_seed), dtype=D64)
    m64 = maps64.clone().requires_grad_(True)
    ref = attention_nce_ref(m64, groups, prev_maps=prev64, **kw)
    (d64,) = torch.autograd.grad(ref, m64, g)
    m32 = maps64.float().requires_grad_(True)
    p32 = None if prev64 is None else prev64.float()
    r32 = attention_nce_ref(m32, groups, prev_maps=p32, **kw)
    (d32,) = torch.autograd.grad(r32, m32, g.float())
    k = maps64.float().requires_grad_(True)
    out = attention_nce_core(backend, k, groups, p32, kw.get("temperature", 0.5), kw.get("softmax_normalize", False),
                             kw.get("smoothing", "conform"), kw.get("kernel_size", 3), kw.get("sigma", 0.5),
                             kw.get("softmax_normalize_attention_maps", False), kw.get("loss", "ntxent"))
    (dk,) = torch.autograd.grad(out, k, g.float())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(dk).all()
    assert_2x_torch("loss", out, ref, r32, rel_floor)
    assert_2x_torch("dmaps", dk, d64, d32, rel_floor)
    return out, dk


CPP_GRID = list(itertools.product([False, True], ["conform", "gaussian", None], [False, True], ["ntxent", "contrastive",
                                  "ntxent_contrastive"], [False, True]))


@pytest.mark.parametrize("softmax,smoothing,prev,loss,spatial", CPP_GRID)
def test_cpp_matches_reference(softmax, smoothing, prev, loss, spatial):
    if spatial and softmax and loss != "ntxent":
        pytest.skip("contrastive after two x100 softmaxes sits on its thresholds (see the module docstring)")
    maps = _maps(3, 6, 5)
    pm = _maps(3, 6, 5, seed=7) if prev else None
    _check("cpp", maps, GROUPS, pm, softmax_normalize=softmax, smoothing=smoothing, loss=loss,
           softmax_normalize_attention_maps=spatial)


TRITON_CASES = [
    dict(softmax_normalize=True, prev=True),                                    # the pipeline's default
    dict(softmax_normalize=False, prev=True),                                   # the notebook's
    dict(softmax_normalize=False, prev=False, smoothing="gaussian"),
    dict(softmax_normalize=True, prev=False, smoothing=None),
    dict(softmax_normalize=False, prev=True, loss="contrastive"),
    dict(softmax_normalize=True, prev=True, loss="ntxent_contrastive"),          # mixed kinds across prompts
    dict(softmax_normalize=False, prev=True, softmax_normalize_attention_maps=True),
    dict(softmax_normalize=True, prev=False, kernel_size=5, sigma=0.8),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_triton_matches_reference(case):
    case = dict(case)
    prev = case.pop("prev")
    maps = _maps(3, 7, 5)
    _check("triton", maps, GROUPS, _maps(3, 7, 5, seed=3) if prev else None, **case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd_shape_and_kernel_sizes(backend):
    """16 x 16 x 77 maps (several tiles on GPU), odd kernel sizes (official: reflect pad 1 whatever the size)."""
    maps = _maps(2, 16, 16, seed=4)
    for ks in ((3, 1) if backend == "cpp" else (3,)):
        _check(backend, maps, [[2, 3], [6, 7]], _maps(2, 16, 16, seed=5), softmax_normalize=True, kernel_size=ks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pml_ntxent_on_the_same_embeddings(backend):
    from pytorch_metric_learning.losses import NTXentLoss
    maps, prev = _maps(1, 6, 6, seed=11), _maps(1, 6, 6, seed=12)
    groups = [[2, 3], [6, 7], [9]]
    tokens = [t for g in groups for t in g]
    labels = torch.tensor([gi for gi, g in enumerate(groups) for _ in g] * 2)
    emb = torch.cat([_token_maps(maps[0], tokens, True, "conform"), _token_maps(prev[0], tokens, True, "conform")])
    want = NTXentLoss(temperature=0.5)(emb, labels)
    got = cg.attention_nce(maps[0].float(), groups, prev_maps=prev[0].float(), softmax_normalize=True, backend=backend)
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positive_pair_gives_zero_loss_and_no_update(backend):
    maps = _maps(2, 5, 5).float().requires_grad_(True)
    out = cg.attention_nce(maps, [[2], [5], [8]], backend=backend)         # singletons, no previous maps
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and torch.equal(maps.grad, torch.zeros_like(maps))
    one = _maps(1, 5, 5).float().requires_grad_(True)                       # one group: positives, no negatives
    out = cg.attention_nce(one, [[2, 3, 4]], backend=backend)
    out.sum().backward()
    assert out.item() == 0.0 and torch.equal(one.grad, torch.zeros_like(one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_size_one_with_previous_maps(backend):
    """Singleton groups get their positive from the previous step's map (the official use)."""
    out, _ = _check(backend, _maps(2, 6, 6, seed=2), [[2], [5]], _maps(2, 6, 6, seed=9), softmax_normalize=True)
    assert (out > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_prompts_per_prompt_groups(backend):
    maps = _maps(3, 6, 5, seed=6).float()
    prev = _maps(3, 6, 5, seed=8).float()
    both = cg.attention_nce(maps, GROUPS, prev_maps=prev, softmax_normalize=True, backend=backend)
    for b in range(3):
        one = cg.attention_nce(maps[b], GROUPS[b], prev_maps=prev[b], softmax_normalize=True, backend=backend)
        torch.testing.assert_close(both[b], one, rtol=1e-6, atol=1e-7)
    shared = cg.attention_nce(maps, [[2, 3], [6, 7]], backend=backend)
    assert shared.shape == (3,)


def test_bad_tokens_raise():
    maps = torch.rand(2, 4, 4, 77)
    with pytest.raises(ValueError, match="token index 3 appears in more than one place"):
        cg.attention_nce(maps, [[2, 3], [3]])
    with pytest.raises(ValueError, match="out of range"):
        cg.attention_nce(maps, [[2], [76]])
    with pytest.raises(ValueError, match=r"token_groups\[1\]"):
        cg.attention_nce(maps, [[[2], [3]], [[0]]])
    with pytest.raises(ValueError, match="per-prompt token_groups"):
        cg.attention_nce(maps, [[[2], [3]]])
    with pytest.raises(ValueError, match="kernel_size"):
        cg.attention_nce(maps, [[2], [3]], kernel_size=9)
    with pytest.raises(TypeError, match="python float"):
        cg.attention_nce(maps, [[2], [3]], temperature=torch.tensor(0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True])
def test_non_finite_rule(backend, softmax):
    """Where the float64 reference is non-finite, so is the loss, and no gradient entry of that prompt is finite."""
    maps = _maps(2, 5, 5).float()
    maps[0, 1, 2, 3] = float("nan")                      # token 3 is selected
    ref = attention_nce_ref(maps.double(), [[2, 3], [6, 7]], softmax_normalize=softmax)
    m = maps.clone().requires_grad_(True)
    out = cg.attention_nce(m, [[2, 3], [6, 7]], softmax_normalize=softmax, backend=backend)
    out.sum().backward()
    assert not torch.isfinite(ref[0]) and not torch.isfinite(out[0])
    assert not torch.isfinite(m.grad[0]).any()
    assert torch.isfinite(out[1]) and torch.isfinite(m.grad[1]).all()
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit_maps(dtype):
    maps = _maps(2, 6, 6, seed=13).to(dtype)
    prev = _maps(2, 6, 6, seed=14).to(dtype)
    ref = attention_nce_ref(maps.double(), [[2, 3], [6, 7]], prev_maps=prev.double(), softmax_normalize=True)
    m = maps.clone().requires_grad_(True)
    out = cg.attention_nce(m, [[2, 3], [6, 7]], prev_maps=prev, softmax_normalize=True, backend="triton")
    out.sum().backward()
    assert out.dtype == dtype and m.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_cpp_gradcheck_float64():
    maps = _maps(2, 4, 5, t=12, seed=3).requires_grad_(True)
    prev = _maps(2, 4, 5, t=12, seed=4)
    for softmax, spatial, loss in ((False, False, "ntxent"), (True, False, "ntxent"), (False, True, "ntxent"),
                                   (False, False, "contrastive")):
        f = lambda m: attention_nce_core("cpp", m, [[2, 3], [6, 7]], prev, 0.5, softmax, "conform", 3, 0.5,  # noqa
                                         spatial, loss)
        assert torch.autograd.gradcheck(f, (maps,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    from contrastgen.ops.attention_nce import pack_groups
    maps = _maps(2, 5, 4, seed=1).float().requires_grad_(True)
    prev = _maps(2, 5, 4, seed=2).float()
    tok, lab, kinds, mode = pack_groups([[2, 3], [6, 7]], 2, "ntxent", "cpu")
    args = (maps, prev, tok, lab, kinds, 0.5, True, "conform", 3, 0.5, False, mode, backend)
    torch.library.opcheck(torch.ops.contrastgen.attention_nce_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def f(m, p):
        return cg.attention_nce(m, [[2, 3], [6, 7]], prev_maps=p, softmax_normalize=True, backend=backend).sum()

    eager = f(maps, prev)
    (ge,) = torch.autograd.grad(eager, maps)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(maps, prev)
    (gc,) = torch.autograd.grad(compiled, maps)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gc, ge)


def test_dispatch_defaults():
    maps = _maps(1, 4, 4).float()
    assert cg.ops.resolve_backend("attention_nce", None, maps.device) == "cpp"
    r = cg.attention_nce(maps.double(), [[2, 3], [6, 7]], backend="cpp")    # float64 -> the reference
    torch.testing.assert_close(r, attention_nce_ref(maps.double(), [[2, 3], [6, 7]]))
    torch.testing.assert_close(cg.attention_nce(maps[0], [[2, 3], [6, 7]]),
                               attention_nce_ref(maps[0].double(), [[2, 3], [6, 7]]).float(), rtol=1e-5, atol=1e-6)
