"""C++ (CPU) InfoNCE / SigLIP core (contrastgen.ops._cpp_infonce) against the float64 contract in
contrastgen/reference/core.py.

Tolerance rule: the kernel's error against the float64 reference must be at most twice PyTorch's own error at
the input precision (the same dense math evaluated by autograd in the input dtype) plus a small floor relative
to the magnitude.  float64 inputs are computed in float32 by this backend (documented), so they are compared
at the float32 rule.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_2x_torch, magnitude as _mag, max_err as _err
from contrastgen.reference import core as R

C = pytest.importorskip("contrastgen.ops._cpp_infonce")
if not C.available():
    pytest.skip("contrastgen._cpp_infonce is not built", allow_module_level=True)
E = C._ext

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FLOOR = {F32: 2e-6, BF16: 4e-3, F16: 1e-3}


PRODUCTS = ["blas"] + (["avx512"] if E.has_avx512_product() else [])


@pytest.fixture(autouse=True, params=PRODUCTS)
def product(request, monkeypatch):
    """Both ways of computing the logits block (MKL via torch.matmul, the AVX-512 micro-kernel), and small row
    blocks so that every case above 16 rows spans several blocks (ragged last block)."""
    monkeypatch.setattr(C, "PRODUCT", request.param)
    monkeypatch.setattr(C, "MAX_BLOCK_ROWS", 16)
    yield request.param


def assert_2x(name, got, ref64, ref_lowp, dtype, terms=1):
    assert_2x_torch(name, got, ref64, ref_lowp, FLOOR[dtype], terms)


# ----------------------------------------------------------------------------------------- dense references
def _dense_lowp(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, g_row, g_col, dtype):
    """The contract's math evaluated densely by autograd in ``dtype``: PyTorch's own error at that precision."""
    qq = q.detach().to(dtype).requires_grad_()
    kk = qq if ex else k.detach().to(dtype).requires_grad_()
    bb = bank.detach().to(dtype).requires_grad_() if bank is not None else None
    sc = scale.detach().to(dtype).requires_grad_()
    n, m = qq.shape[0], kk.shape[0]
    kb = 0 if bb is None else bb.shape[0]
    keys = torch.cat([kk, bb], 0) if kb else kk
    s = sc * (qq @ keys.T)
    pos, valid = R._masks(n, m, kb, ql, kl, ex, ibn, q.device)
    npos = pos.sum(1).to(dtype)

    def lse(x, mask, dim):
        return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=dim).clamp_min(torch.finfo(dtype).min)

    if pml:
        l = lse(s, valid & ~pos, 1)
        row = torch.where(pos, F.softplus(l[:, None] - s), torch.zeros_like(s)).sum(1)
    else:
        l = lse(s, valid, 1)
        row = torch.where(npos > 0, l - torch.where(pos, s, 0.0).sum(1) / npos.clamp_min(1), 0.0)
    total = (row * g_row.to(dtype)).sum()
    col = None
    if sym:
        sb, pb, vb = s[:, :m], pos[:, :m], valid[:, :m]
        nc = pb.sum(0).to(dtype)
        lc = lse(sb, vb, 0)
        col = torch.where(nc > 0, lc - torch.where(pb, sb, 0.0).sum(0) / nc.clamp_min(1), 0.0)
        total = total + (col * g_col.to(dtype)).sum()
    leaves = [qq] + ([] if ex else [kk]) + ([bb] if kb else []) + [sc]
    grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    grads = list(grads)
    dq = grads.pop(0)
    dk = dq if ex else grads.pop(0)
    dbank = grads.pop(0) if kb else None
    return row.detach(), (None if col is None else col.detach()), l.detach(), dq, dk, dbank, grads.pop(0)


def _features(n, d, kind, g):
    x = torch.randn(n, d, generator=g)
    if kind == "clip":  # unit vectors, large scale: the one-exponential (factored) epilogues
        return F.normalize(x, dim=1)
    if kind == "spread":  # row norms over 3 decades: lse spread > 60, the two-exponential epilogues
        return x * torch.logspace(-1.5, 1.5, n).view(-1, 1)[torch.randperm(n, generator=g)]
    return x * 0.5


SCALE = {"clip": 14.0, "spread": 2.0, "plain": 2.5}


def _make(case, seed=0):
    n, m, kb, d, labels, ex, ibn, pml, sym, kind = case
    g = torch.Generator().manual_seed(seed)
    q = _features(n, d, kind, g)
    k = q if ex else _features(m, d, kind, g)
    bank = _features(kb, d, kind, g) if kb else None

    def lab(size):
        if labels == "same":
            return torch.zeros(size, dtype=torch.int64)
        if labels == "unique":
            return torch.arange(size, dtype=torch.int64)
        return torch.randint(0, 4, (size,), generator=g)

    ql = None if labels is None else lab(n)
    kl = None if labels is None else (ql if ex else lab(m))
    return q, k, bank, torch.tensor(SCALE[kind]), ql, kl, ex, ibn, pml, sym


# (N, M, K bank, D, labels, exclude_self, in_batch_negatives, pml, symmetric, feature kind)
CASES = [
    (1, 1, 0, 1, None, False, True, False, True, "plain"),        # CLIP, one pair
    (2, 2, 0, 3, None, False, True, False, True, "plain"),
    (37, 37, 0, 64, None, False, True, False, True, "clip"),      # CLIP, factored fwd + bwd
    (129, 129, 0, 130, None, False, True, False, True, "clip"),
    (300, 300, 0, 64, None, False, True, False, True, "spread"),  # CLIP, two-exponential paths
    (37, 53, 0, 3, None, False, True, False, True, "clip"),       # diagonal, N < M
    (53, 37, 0, 64, None, False, True, False, True, "plain"),     # diagonal, N > M: rows without positive
    (37, 37, 0, 130, None, False, True, False, False, "plain"),   # one-directional
    (37, 37, 5, 64, None, False, True, False, False, "plain"),    # bank + in-batch negatives
    (129, 129, 7, 3, None, False, False, False, False, "spread"), # MoCo: bank only
    (37, 53, 0, 64, "rand", False, True, False, True, "plain"),   # supcon symmetric
    (129, 129, 0, 64, "rand", False, False, False, True, "clip"), # supcon symmetric, positives only
    (300, 300, 0, 3, "rand", True, True, False, False, "plain"),  # self-mode supcon (NT-Xent style)
    (37, 37, 0, 64, "same", True, True, False, False, "plain"),
    (37, 37, 0, 64, "unique", True, True, False, False, "plain"), # no positives: loss 0
    (37, 37, 0, 64, "same", False, True, False, True, "clip"),
    (37, 37, 0, 1, "unique", False, True, False, True, "plain"),
    (129, 129, 7, 130, "rand", False, False, False, False, "plain"),
    (37, 37, 5, 64, "rand", True, True, False, False, "spread"),
    (129, 129, 0, 64, "rand", True, True, True, False, "plain"),  # pml self-mode
    (37, 37, 0, 64, "same", True, True, True, False, "plain"),    # pml, no negatives
    (37, 37, 0, 64, "unique", True, True, True, False, "plain"),  # pml, no positives
    (37, 53, 0, 130, "rand", False, True, True, False, "spread"),
    (37, 37, 20, 64, "rand", False, True, True, False, "plain"),  # pml + bank
    (37, 37, 20, 3, "rand", True, False, True, False, "plain"),   # pml, bank-only negatives
    (2, 2, 0, 3, "rand", True, True, True, False, "plain"),
]
IDS = ["-".join(map(str, c)) for c in CASES]


def _run_case(case, dtype, seed=0):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make(case, seed)
    # the inputs in the tested dtype; the float64 reference sees the same (rounded) values
    q = q.to(dtype)
    k = q if ex else k.to(dtype)
    bank = bank.to(dtype) if bank is not None else None
    n, m = q.shape[0], k.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    g_row = torch.randn(n, generator=g)
    g_col = torch.randn(m, generator=g) if sym else torch.zeros(0)

    out = C.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = R.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    grads = C.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, g_col)
    gexp = R.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    low = _dense_lowp(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, g_row, g_col, F32 if dtype == F64 else dtype)
    return out, exp, grads, gexp, low, (n, m, bank, sym)


def _check(out, exp, grads, gexp, low, meta, dtype):
    n, m, bank, sym = meta
    tol_dtype = F32 if dtype == F64 else dtype
    row, col, rst, cst = out
    assert row.dtype == col.dtype == rst.dtype == cst.dtype == F32
    assert row.shape == (n,) and rst.shape == (n, 2)
    assert col.shape == ((m,) if sym else (0,)) and cst.shape == ((m, 2) if sym else (0, 2))
    for t in out:
        assert torch.isfinite(t).all()
    # stats: npos exact; lse where the reference set is non-empty, "<= -1e30" where it is empty
    assert torch.equal(rst[:, 1], exp[2][:, 1])
    empty = exp[2][:, 0] <= -1e30
    assert (rst[empty, 0] <= -1e30).all()
    assert_2x("row lse", rst[~empty, 0], exp[2][~empty, 0], low[2][~empty], tol_dtype)
    assert_2x("row_loss", row, exp[0], low[0], tol_dtype)
    if sym:
        assert torch.equal(cst[:, 1], exp[3][:, 1])
        cempty = exp[3][:, 0] <= -1e30
        assert (cst[cempty, 0] <= -1e30).all()
        assert_2x("col_loss", col, exp[1], low[1], tol_dtype)
    dq, dk, dbank, dscale = grads
    assert dq.dtype == dk.dtype == dtype and dscale.dtype == F32 and dscale.dim() == 0
    assert (dbank is None) == (bank is None)
    for name, a, b, c in zip(("dq", "dk", "dbank", "dscale"), grads, gexp, low[3:]):
        if b is None:
            continue
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        terms = n * (m + (0 if bank is None else bank.shape[0])) if name == "dscale" else 1
        assert_2x(name, a, b, c, tol_dtype, terms)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_infonce_core_float32(case):
    _check(*_run_case(case, F32), F32)


@pytest.mark.parametrize("case", CASES[2:5] + CASES[10:13] + CASES[19:24], ids=IDS[2:5] + IDS[10:13] + IDS[19:24])
def test_infonce_core_bfloat16(case):
    _check(*_run_case(case, BF16), BF16)


@pytest.mark.parametrize("dtype", [F16, F64])
@pytest.mark.parametrize("case", [CASES[3], CASES[12], CASES[23]], ids=[IDS[3], IDS[12], IDS[23]])
def test_infonce_core_half_and_double(case, dtype):
    """fp16 is converted to fp32 in the wrapper; float64 is computed in fp32 (compared at the fp32 rule)."""
    _check(*_run_case(case, dtype), dtype)


@pytest.mark.parametrize("block_rows", [1, 7, 512])
def test_block_size_does_not_change_results(block_rows, monkeypatch):
    case = (129, 129, 0, 64, "rand", False, True, False, True, "plain")
    monkeypatch.setattr(C, "MAX_BLOCK_ROWS", 16)
    ref_out = _run_case(case, F32)
    monkeypatch.setattr(C, "MAX_BLOCK_ROWS", block_rows)
    out = _run_case(case, F32)
    for a, b in zip(out[0] + out[2][:2], ref_out[0] + ref_out[2][:2]):
        assert _err(a, b) <= 1e-5 * _mag(b)
    _check(*out, F32)


@pytest.mark.parametrize("pml", [False, True])
@pytest.mark.parametrize("ibn", [False, True])
def test_single_row_self_mode_is_zero(pml, ibn):
    """N = 1 with exclude_self: no valid column -> loss 0, lse "-inf", zero gradients, no NaN."""
    q = torch.randn(1, 5)
    lab = torch.zeros(1, dtype=torch.int64)
    for ql in (lab, None):
        if pml and ql is None:
            continue
        row, col, rst, cst = C.infonce_fwd(q, q, None, torch.tensor(3.0), ql, ql, True, ibn, pml, False)
        assert row.item() == 0.0 and rst[0, 0].item() <= -1e30 and rst[0, 1].item() == 0
        assert col.shape == (0,) and cst.shape == (0, 2)
        dq, dk, dbank, dscale = C.infonce_bwd(q, q, None, torch.tensor(3.0), ql, ql, True, ibn, pml, False, rst, cst,
                                              torch.ones(1), torch.zeros(0))
        assert dbank is None and (dq == 0).all() and (dk == 0).all() and dscale.item() == 0.0


def test_bank_outputs_do_not_alias():
    q, k, bank = torch.randn(9, 4), torch.randn(9, 4), torch.randn(5, 4)
    st = C.infonce_fwd(q, k, bank, torch.tensor(2.0), None, None, False, True, False, False)
    dq, dk, dbank, _ = C.infonce_bwd(q, k, bank, torch.tensor(2.0), None, None, False, True, False, False, st[2],
                                     st[3], torch.ones(9), torch.zeros(0))
    assert dk.untyped_storage().data_ptr() != dbank.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------- SigLIP
def _siglip_lowp(q, k, scale, bias, g_row, dtype):
    qq, kk = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
    sc, bi = scale.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
    z = sc * (qq @ kk.T) + bi
    y = -torch.ones_like(z)
    y.diagonal().fill_(1.0)
    row = -F.logsigmoid(y * z).sum(1)
    grads = torch.autograd.grad((row * g_row.to(dtype)).sum(), [qq, kk, sc, bi])
    return (row.detach(),) + tuple(grads)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (2, 2, 3), (37, 37, 64), (129, 129, 130), (300, 300, 64), (37, 53, 3),
                                   (53, 37, 64)])
def test_siglip_core(n, m, d, dtype):
    g = torch.Generator().manual_seed(n * 1000 + d)
    q = (torch.randn(n, d, generator=g) * 0.3).to(dtype)
    k = (torch.randn(m, d, generator=g) * 0.3).to(dtype)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0 if n != 37 else 3.0)
    g_row = torch.randn(n, generator=g)
    row = C.siglip_fwd(q, k, scale, bias)
    exp = R.siglip_core_fwd_ref(q, k, scale, bias)
    low = _siglip_lowp(q, k, scale, bias, g_row, dtype)
    assert row.dtype == F32 and row.shape == (n,)
    assert_2x("row_loss", row, exp, low[0], dtype)
    grads = C.siglip_bwd(q, k, scale, bias, g_row)
    gexp = R.siglip_core_bwd_ref(q, k, scale, bias, g_row)
    assert grads[0].dtype == grads[1].dtype == dtype and grads[2].dtype == grads[3].dtype == F32
    for name, a, b, c in zip(("dq", "dk", "dscale", "dbias"), grads, gexp, low[1:]):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert_2x(name, a, b, c, dtype, n * m if name in ("dscale", "dbias") else 1)


@pytest.mark.skipif(not E.has_avx512_product(), reason="extension built without AVX-512")
@pytest.mark.parametrize("b,c,d", [(1, 1, 1), (11, 31, 3), (12, 32, 64), (13, 33, 130), (25, 100, 7)])
def test_avx512_logits_product(b, c, d):
    q, keys = torch.randn(b + 3, d), torch.randn(c, d)
    panels = torch.empty((c + 31) // 32, d, 32)
    E.pack_keys(keys.numpy(), panels.numpy())
    s = torch.full((b, c), float("nan"))
    E.qkt_block(q.numpy(), 2, panels.numpy(), s.numpy())
    exp = q[2:2 + b].double() @ keys.double().T
    assert _err(s, exp) <= 1e-5 * _mag(exp) * d ** 0.5


# ----------------------------------------------------------------------------------------------- argument checks
def test_wrong_dtype_or_layout_raises_in_the_extension():
    s = np.zeros((4, 4), dtype=np.float32)
    rl, rs = np.zeros(4, np.float32), np.zeros((4, 2), np.float32)
    e64 = np.zeros(0, np.int64)
    cs = np.zeros((4, 0), np.float64)
    E.infonce_fwd_block(s, 1.0, 0, 4, e64, e64, False, False, True, False, False, rl, rs, cs)  # the valid call
    with pytest.raises(TypeError):  # float64 block: noconvert refuses to copy
        E.infonce_fwd_block(s.astype(np.float64), 1.0, 0, 4, e64, e64, False, False, True, False, False, rl, rs, cs)
    with pytest.raises(TypeError):  # non-contiguous (transposed) block
        E.infonce_fwd_block(np.zeros((8, 4), np.float32)[::2], 1.0, 0, 4, e64, e64, False, False, True, False,
                            False, rl, rs, cs)
    with pytest.raises(TypeError):  # int32 labels
        E.infonce_fwd_block(s, 1.0, 0, 4, np.zeros(4, np.int32), np.zeros(4, np.int32), True, False, True, False,
                            False, rl, rs, cs)
    with pytest.raises(TypeError):
        E.siglip_fwd_block(s, 1.0, 0.0, 0, rl.astype(np.float16))
    with pytest.raises(ValueError):  # wrong output shape
        E.siglip_fwd_block(s, 1.0, 0.0, 0, np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        E.infonce_fwd_block(s, 1.0, 0, 5, e64, e64, False, False, True, False, False, rl, rs, cs)


def test_wrapper_rejects_bad_inputs():
    q = torch.randn(4, 3)
    with pytest.raises(TypeError):
        C.infonce_fwd(q.int(), q.int(), None, torch.tensor(1.0), None, None, False, True, False, False)
    with pytest.raises(ValueError):
        C.infonce_fwd(q, torch.randn(4, 5), None, torch.tensor(1.0), None, None, False, True, False, False)
    with pytest.raises(ValueError):
        C.infonce_fwd(q, q, torch.randn(2, 3), torch.tensor(1.0), None, None, False, True, False, True)
    with pytest.raises(TypeError):
        C.siglip_fwd(q.to(torch.int64), q, torch.tensor(1.0), torch.tensor(0.0))


def test_non_contiguous_inputs_are_accepted():
    q = torch.randn(6, 10)[:, ::2]
    k = torch.randn(5, 6).T
    out = C.infonce_fwd(q, k, None, torch.tensor(2.0), None, None, False, True, False, True)
    exp = R.infonce_core_fwd_ref(q, k, None, torch.tensor(2.0), None, None, False, True, False, True)
    assert _err(out[0], exp[0]) <= 1e-5 * _mag(exp[0])


# ----------------------------------------------------------------------------------------------- public API
_ops = pytest.importorskip("contrastgen.ops")
_HAVE_OPS = "cpp" in _ops.available_backends("infonce")
needs_ops = pytest.mark.skipif(not _HAVE_OPS, reason="contrastgen/ops/infonce.py does not register the 'cpp' core")


def _public(fn_cpp, fn_ref, leaves, dtype, upstream=None):
    def grads(fn, ts):
        loss = fn(*ts)
        tot = (loss * upstream.to(loss.dtype)).sum() if upstream is not None else loss
        return loss.detach(), torch.autograd.grad(tot, ts, allow_unused=True, materialize_grads=True)

    low = [t.detach().to(dtype).requires_grad_() if t.dim() == 2 else t.detach().clone().requires_grad_() for t in leaves]
    hi = [t.detach().double().requires_grad_() for t in low]
    low2 = [t.detach().clone().requires_grad_() for t in low]
    got, r64, rlo = grads(fn_cpp, low), grads(fn_ref, hi), grads(fn_ref, low2)
    assert got[0].dtype == dtype
    assert_2x("loss", got[0], r64[0], rlo[0], dtype)
    for i, (a, b, c) in enumerate(zip(got[1], r64[1], rlo[1])):
        assert torch.isfinite(a).all()
        assert_2x(f"grad[{i}]", a, b, c, dtype)


@needs_ops
@pytest.mark.parametrize("n,d,dtype", [(1, 3, F32), (37, 64, F32), (129, 130, F32), (37, 64, BF16)])
def test_public_clip_loss(n, d, dtype):
    import contrastgen
    from contrastgen import reference as ref
    i, t = F.normalize(torch.randn(n, d), dim=1), F.normalize(torch.randn(n, d), dim=1)
    _public(lambda a, b, s, bb: contrastgen.clip_loss(a, b, s, bb, backend="cpp"), ref.clip_loss_ref,
            [i, t, torch.tensor(14.0), torch.tensor(-1.0)], dtype)


@needs_ops
@pytest.mark.parametrize("n,d,dtype", [(37, 64, F32), (129, 3, F32), (37, 64, BF16)])
def test_public_siglip_loss(n, d, dtype):
    import contrastgen
    from contrastgen import reference as ref
    i, t = torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.3
    _public(lambda a, b, s, bb: contrastgen.siglip_loss(a, b, s, bb, backend="cpp"), ref.siglip_loss_ref,
            [i, t, torch.tensor(10.0), torch.tensor(-10.0)], dtype)


@needs_ops
@pytest.mark.parametrize("positives,symmetric,bank", [("supcon", False, 0), ("pml", False, 0), ("diagonal", True, 0),
                                                      ("diagonal", False, 20)])
def test_public_info_nce_and_nt_xent(positives, symmetric, bank):
    import contrastgen
    from contrastgen import reference as ref
    n, d = 53, 32
    q = torch.randn(n, d) * 0.5
    key = torch.randn(n, d) * 0.5 if positives == "diagonal" else None
    neg = torch.randn(bank, d) * 0.5 if bank else None
    lab = None if positives == "diagonal" else torch.randint(0, 5, (n,))
    leaves = [q] + ([key] if key is not None else []) + ([neg] if neg is not None else []) + [torch.tensor(0.2)]

    def call(fn, *ts):
        ts = list(ts)
        qq = ts.pop(0)
        kk = ts.pop(0) if key is not None else None
        nb = ts.pop(0) if neg is not None else None
        return fn(qq, kk, temperature=ts.pop(0), labels=lab, positives=positives, negatives=nb, symmetric=symmetric)

    _public(lambda *ts: call(lambda *a, **kw: contrastgen.info_nce(*a, backend="cpp", **kw), *ts),
            lambda *ts: call(ref.info_nce_ref, *ts), leaves, F32)
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    _public(lambda a, b, t: contrastgen.nt_xent(a, b, temperature=t, backend="cpp"), ref.nt_xent_ref,
            [z1, z2, torch.tensor(0.5)], F32)


@needs_ops
def test_custom_op_opcheck_cpp():
    q, k = torch.randn(20, 8), torch.randn(20, 8)
    args = (q, k, None, torch.tensor(3.0), None, None, False, True, False, True, "cpp")
    torch.library.opcheck(torch.ops.contrastgen.infonce_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.contrastgen.siglip_fwd.default, (q, k, torch.tensor(3.0), torch.tensor(-1.0), "cpp"),
                          test_utils=("test_schema", "test_faketensor"))
