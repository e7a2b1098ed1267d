"""InfoNCE with per-query negatives (``info_nce(..., negatives=(N, M, D))``) on the C++ and Triton backends.

* the launchers of both backends against their float64 contract (``paired_lse_fwd_ref`` / ``paired_lse_bwd_ref``),
  awkward shapes (N = 1, M = 1, D odd, M spanning several chunks and ragged tiles), every need_* combination;
* the public loss against the float64 dense reference (``info_nce_paired_ref``) under the 2x-PyTorch-error rule,
  for each positive mode (diagonal fast path, diagonal + in-batch negatives, supcon labels, key=None), loss and
  every gradient (temperature included), with random upstream gradients (reduction="none");
* the Python loop it replaces (CoDE's official ``info_nce(..., negative_mode="paired")``, one call per query);
* non-finite rule, validation, opcheck, gradcheck, torch.compile(fullgraph=True), cosine similarity.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastgen as cg
from _tolerance import assert_2x_torch
from contrastgen import reference as R
from contrastgen.ops import _cpp_infonce_paired as C

BACKENDS = ["triton"]
if C.available():
    BACKENDS.insert(0, "cpp")
pytest.importorskip("triton")
from contrastgen.kernels import infonce_paired as K  # noqa: E402

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FLOOR = {F32: 2e-6, BF16: 4e-3, F16: 1e-3}
LAUNCHERS = {"triton": K, "cpp": C}


def _launcher_dtypes(backend):
    return (F32, BF16, F16)


# ----------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (3, 7, 5), (2, 300, 33), (9, 65, 130)])
def test_launchers_match_the_contract(backend, n, m, d):
    L = LAUNCHERS[backend]
    for dt in _launcher_dtypes(backend):
        q = torch.randn(n, d).to(dt)
        negs = torch.randn(n, m, d).to(dt)
        scale = torch.tensor(1.3)
        g = torch.randn(n)
        lse, logits = L.paired_fwd(q, negs, scale, True)
        lse64, logits64 = R.paired_lse_fwd_ref(q, negs, scale)
        # low precision PyTorch on the same inputs: its own error
        s_lp = (scale.to(dt) * torch.einsum("nd,nmd->nm", q, negs)).float()
        tol = FLOOR[dt] * max(1.0, logits64.abs().max().item())
        assert (logits - logits64).abs().max() <= 2 * (s_lp - logits64).abs().max() + tol
        assert (lse - lse64).abs().max() <= 2 * (torch.logsumexp(s_lp, 1) - lse64).abs().max() + tol
        lse_none, logits_none = L.paired_fwd(q, negs, scale, False)
        assert logits_none.shape == (0, m) and torch.allclose(lse_none, lse)
        dq64, dn64, ds64 = R.paired_lse_bwd_ref(q, negs, scale, logits64, lse64, g)
        for need_dq, need_dn in ((True, True), (True, False), (False, True), (False, False)):
            dq, dn, dsc = L.paired_bwd(q, negs, scale, logits, lse, g, need_dq, need_dn)
            assert (dq is None) == (not need_dq) and (dn is None) == (not need_dn)
            if need_dq:
                assert dq.dtype == dt and dq.shape == (n, d)
                assert (dq.double() - dq64.double()).abs().max() <= 10 * FLOOR[dt] * max(1.0, dq64.abs().max().item())
            if need_dn:
                assert dn.dtype == dt and dn.shape == (n, m, d)
                assert (dn.double() - dn64.double()).abs().max() <= 10 * FLOOR[dt] * max(1.0, dn64.abs().max().item())
            assert abs(dsc.item() - ds64.item()) <= 10 * FLOOR[dt] * max(1.0, abs(ds64.item())) * math.sqrt(n * m)


def test_cpp_chunked_rows_match_unchunked():
    """A few queries with many negatives split each row over several OpenMP work items (dq partials merged)."""
    if not C.available():
        pytest.skip("C++ extension not built")
    q, negs = torch.randn(2, 19), torch.randn(2, 3000, 19)
    lse, logits = C.paired_fwd(q, negs, torch.tensor(2.0), True)
    lse64, _ = R.paired_lse_fwd_ref(q, negs, torch.tensor(2.0))
    assert torch.allclose(lse.double(), lse64.double(), atol=1e-5)
    dq, _, _ = C.paired_bwd(q, negs, torch.tensor(2.0), logits, lse, torch.ones(2), True, False)
    dq64, _, _ = R.paired_lse_bwd_ref(q, negs, torch.tensor(2.0), logits, lse, torch.ones(2))
    assert torch.allclose(dq.double(), dq64.double(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- public loss
CASES = {
    "diagonal": dict(key=True),
    "diagonal+in_batch": dict(key=True, in_batch_negatives=True),
    "supcon": dict(key=True, labels=True, positives="supcon", in_batch_negatives=True),
    "supcon_two_positives": dict(key="double", labels=True, positives="supcon"),     # DCR's form
    "self_supcon": dict(key=False, labels=True, positives="supcon", in_batch_negatives=True),
}


def _make(case, n, m, d, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = CASES[case]
    q = torch.randn(n, d, generator=g)
    negs = torch.randn(n, m, d, generator=g)
    key = None
    kw = {"positives": spec.get("positives", "diagonal")}
    if spec.get("in_batch_negatives"):
        kw["in_batch_negatives"] = True
    if spec["key"] is True:
        key = torch.randn(n, d, generator=g)
    elif spec["key"] == "double":
        key = torch.randn(2 * n, d, generator=g)
        kw["key_labels"] = torch.arange(n).repeat(2)
    if spec.get("labels"):
        kw["labels"] = torch.arange(n) if spec["key"] == "double" else torch.randint(0, 3, (n,), generator=g)
    leaves = [t.to(dtype) for t in (q, key, negs) if t is not None] + [torch.tensor(0.3, dtype=F64 if dtype == F64 else F32)]
    return leaves, key is not None, kw


def _loss(fn, leaves, has_key, kw, reduction):
    if has_key:
        q, k, negs, t = leaves
    else:
        (q, negs, t), k = leaves, None
    return fn(q, k, negs, temperature=t, reduction=reduction, **kw)


def _run(fn, leaves, has_key, kw, reduction, g_row, dtype):
    # features in ``dtype``; the temperature stays float32 (float64 for the float64 reference)
    xs = [x.detach().to(dtype if (i < len(leaves) - 1 or dtype == F64) else F32).requires_grad_()
          for i, x in enumerate(leaves)]
    out = _loss(fn, xs, has_key, kw, reduction)
    total = (out * g_row.to(out.dtype)).sum() if reduction == "none" else out
    grads = torch.autograd.grad(total, xs)
    return out.detach(), grads


def _fused(backend):
    return lambda q, k, negs, **kw: cg.info_nce(q, k, negatives=negs, backend=backend, **kw)


def _reference(q, k, negs, **kw):
    return R.info_nce_paired_ref(q, k, negs, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_public_loss_and_gradients_2x_torch(backend, case, dtype):
    n, m, d = 11, 37, 24
    leaves, has_key, kw = _make(case, n, m, d)
    kw_ref = dict(kw, in_batch_negatives=kw.get("in_batch_negatives", False))
    for reduction in ("mean", "none"):
        g_row = torch.randn(n)
        got, got_g = _run(_fused(backend), leaves, has_key, kw, reduction, g_row, dtype)
        ref64, ref64_g = _run(_reference, leaves, has_key, kw_ref, reduction, g_row, F64)
        lowp, lowp_g = _run(_reference, leaves, has_key, kw_ref, reduction, g_row, dtype)
        assert got.dtype == dtype
        assert_2x_torch(f"{case} loss", got, ref64, lowp, FLOOR[dtype])
        for i, (a, b, c) in enumerate(zip(got_g, ref64_g, lowp_g)):
            terms = n * (m + n) if i == len(got_g) - 1 else 1      # the temperature sums every logit
            assert a.dtype == (F32 if i == len(got_g) - 1 else dtype)
            assert_2x_torch(f"{case} grad[{i}]", a, b, c, FLOOR[dtype], terms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_python_loop_it_replaces(backend):
    """CoDE's official info_nce(negative_mode='paired') on unit vectors, and the loop of one call per query."""
    n, m, d, tau = 6, 9, 16, 0.1
    q, p, negs = F.normalize(torch.randn(n, d), dim=-1), F.normalize(torch.randn(n, d), dim=-1), F.normalize(
        torch.randn(n, m, d), dim=-1)
    qd, pd, nd = q.double(), p.double(), negs.double()
    official = F.cross_entropy(torch.cat([(qd * pd).sum(1, keepdim=True), (qd[:, None] @ nd.transpose(-2, -1)).squeeze(1)],
                                         1) / tau, torch.zeros(n, dtype=torch.long))
    loop = torch.stack([cg.info_nce(q[i:i + 1], p[i:i + 1], negatives=negs[i], temperature=tau,
                                    in_batch_negatives=False, backend=backend) for i in range(n)]).mean()
    fused = cg.info_nce(q, p, negatives=negs, temperature=tau, backend=backend)
    lowp = R.info_nce_paired_ref(q, p, negs, temperature=tau)
    assert_2x_torch("fused vs official", fused, official, lowp, FLOOR[F32])
    assert abs(loop.item() - fused.item()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    leaves, has_key, kw = _make("diagonal", 5, 7, 8)
    q, k, negs, t = leaves
    negs = negs.clone().requires_grad_()
    loss = cg.info_nce(q, k, negatives=negs, temperature=t, backend=backend)
    (gn,) = torch.autograd.grad(loss, [negs])
    ref = R.info_nce_paired_ref(q, k, negs, temperature=t)
    (gr,) = torch.autograd.grad(ref, [negs])
    assert torch.allclose(gn, gr, atol=1e-6)
    with torch.no_grad():                                       # no gradient: the logits are not kept
        assert torch.allclose(cg.info_nce(q, k, negatives=negs, temperature=t, backend=backend), ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------- non-finite rule
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["diagonal", "supcon"])
@pytest.mark.parametrize("bad", ["nan", "+inf logit", "-inf logit"])
def test_non_finite_rule(backend, case, bad):
    """Where the float64 reference is non-finite, so is our loss, and no gradient entry is finite there."""
    leaves, has_key, kw = _make(case, 6, 5, 4)
    kw_ref = dict(kw, in_batch_negatives=kw.get("in_batch_negatives", False))
    negs = leaves[-2].clone()
    sign = float(torch.sign(leaves[0][2, 1]))
    negs[2, 3, 1] = {"nan": float("nan"), "+inf logit": sign * float("inf"), "-inf logit": -sign * float("inf")}[bad]
    leaves = leaves[:-2] + [negs, leaves[-1]]
    g_row = torch.rand(6) + 0.5
    got, got_g = _run(_fused(backend), leaves, has_key, kw, "none", g_row, F32)
    ref, ref_g = _run(_reference, leaves, has_key, kw_ref, "none", g_row, F64)
    assert torch.isfinite(ref).all() == (bad == "-inf logit")     # a -inf logit only drops out of the sum
    assert not torch.isfinite(got[~torch.isfinite(ref)]).any()
    for a, b in zip(got_g, ref_g):
        assert not torch.isfinite(a[~torch.isfinite(b)]).any()
    # the rows the bad value does not touch keep their values
    ok = torch.isfinite(ref)
    assert torch.allclose(got[ok].double(), ref[ok], atol=1e-5)


# ----------------------------------------------------------------------------------------------- API surface
def test_bad_input_raises():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\(N, K, D\) with N = 4"):
        cg.info_nce(q, k, negatives=torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="same feature dimension"):
        cg.info_nce(q, k, negatives=torch.randn(4, 5, 7))
    with pytest.raises(ValueError, match="not 'pml'"):
        cg.info_nce(q, labels=torch.arange(4), positives="pml", negatives=torch.randn(4, 5, 8))
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        cg.info_nce(q, k, negatives=torch.randn(4, 5, 8, 1))
    with pytest.raises(TypeError, match="same dtype"):
        cg.info_nce(q, k, negatives=torch.randn(4, 5, 8, dtype=F64))
    with pytest.raises(ValueError, match="empty"):
        cg.info_nce(q, k, negatives=torch.randn(4, 0, 8))
    with pytest.raises(ValueError, match="symmetric=True"):
        cg.info_nce(q, k, negatives=torch.randn(4, 5, 8), symmetric=True)
    with pytest.raises(ValueError, match="similarity"):
        cg.info_nce(q, k, similarity="l2")


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_cosine_similarity_normalises_everything(backend):
    q, k, negs, bank = torch.randn(5, 6) * 3, torch.randn(5, 6) * 2, torch.randn(5, 4, 6) * 5, torch.randn(9, 6) * 4
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    for kw, kwn in ((dict(negatives=negs), dict(negatives=n(negs))), (dict(negatives=bank), dict(negatives=n(bank))),
                    ({}, {})):
        a = cg.info_nce(q, k, similarity="cosine", backend=backend, **kw)
        b = cg.info_nce(n(q), n(k), backend=backend, **kwn)
        assert torch.allclose(a, b, atol=1e-6)
    lab = torch.tensor([0, 1, 0, 1, 2])
    a = cg.info_nce(q, labels=lab, positives="pml", similarity="cosine", backend=backend)
    assert torch.allclose(a, R.info_nce_ref(n(q), labels=lab, positives="pml"), atol=1e-5)


def test_float64_goes_to_the_reference_and_gradchecks():
    leaves, has_key, kw = _make("supcon", 4, 3, 5, dtype=F64)
    xs = [x.detach().requires_grad_() for x in leaves]
    fn = lambda q, k, negs, t: cg.info_nce(q, k, negatives=negs, temperature=t, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_gradcheck_in_float32_math(backend):
    """The op's backward is the derivative of its forward (inputs float64, computed in float32: loose tolerance)."""
    q, k, negs = torch.randn(3, 4, dtype=F64), torch.randn(6, 4, dtype=F64), torch.randn(3, 5, 4, dtype=F64)
    lab, klab = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2])
    sc = torch.tensor(0.7, dtype=F64)

    def f(q, k, negs, sc):
        row, _, _ = torch.ops.contrastgen.infonce_paired_fwd(q, k, negs, sc.float(), lab, klab, False, True, True,
                                                             backend)
        return row

    xs = [t.requires_grad_() for t in (q, k, negs, sc)]
    assert torch.autograd.gradcheck(f, xs, eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, negs = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 6, 8)
    lab = torch.tensor([0, 1, 0, 1, 2])
    for args in ((q, k, negs, torch.tensor(3.0), None, None, False, False, True, backend),
                 (q, q, negs, torch.tensor(3.0), lab, lab, True, True, True, backend)):
        torch.library.opcheck(torch.ops.contrastgen.infonce_paired_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, negs = (torch.randn(7, 16, requires_grad=True), torch.randn(7, 16, requires_grad=True),
                  torch.randn(7, 5, 16, requires_grad=True))
    lab = torch.tensor([0, 1, 0, 1, 2, 2, 3])

    def step(q, k, negs):
        a = cg.info_nce(q, k, negatives=negs, temperature=0.1, similarity="cosine", backend=backend)
        b = cg.info_nce(q, labels=lab, positives="supcon", negatives=negs, in_batch_negatives=True, backend=backend)
        return a + b

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, negs)
    grads = torch.autograd.grad(loss, [q, k, negs])
    eager = step(q, k, negs)
    egrads = torch.autograd.grad(eager, [q, k, negs])
    assert torch.allclose(loss, eager, atol=1e-6)
    for a, b in zip(grads, egrads):
        assert torch.allclose(a, b, atol=1e-6)
