"""Triton InfoNCE / SigLIP kernels (interpreter) against the float64 references.

Tolerance rule: the kernel's error against a float64 reference must be at most twice PyTorch's own
error at the same precision (the reference evaluated in the input dtype) plus a small absolute floor.
"""

import pytest
import torch

from _tolerance import assert_2x_torch, magnitude as _mag, max_err as _err
import contrastgen
from contrastgen import reference as ref

pytest.importorskip("triton")
K = pytest.importorskip("contrastgen.kernels.infonce")

# The interpreter evaluates exp() in numpy on lanes that are then masked out (e.g. sigmoid of "-inf" = -1e30);
# numpy warns about the overflow there, which is harmless (the result is 0 or masked).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOOR = {F32: 2e-5, BF16: 2e-2, F16: 4e-3}


def assert_close_2x(name, got, ref64, ref_lowp, dtype):
    assert_2x_torch(name, got, ref64, ref_lowp, FLOOR[dtype])


# ----------------------------------------------------------------------------------------------- launchers
# (N, M, K bank, D, labels, exclude_self, in_batch_negatives, pml, symmetric)
LAUNCHER_CASES = [
    (1, 1, 0, 3, None, False, True, False, True),           # CLIP, a single pair
    (2, 2, 0, 1, None, False, True, False, False),
    (37, 37, 0, 130, None, False, True, False, True),       # CLIP, odd N, D over two chunks
    (37, 53, 0, 64, "rand", False, True, False, True),      # supcon symmetric, N != M
    (70, 70, 0, 3, "rand", True, True, False, False),       # self-mode supcon
    (70, 70, 0, 64, "rand", True, True, True, False),       # self-mode pml
    (37, 37, 0, 64, "same", True, True, True, False),       # pml, all the same label: no negatives
    (37, 37, 0, 64, "unique", True, True, True, False),     # pml, unique labels: no positives
    (37, 37, 0, 64, "unique", True, True, False, False),    # supcon, unique labels: loss 0
    (37, 37, 0, 64, "same", True, True, False, False),
    (37, 37, 50, 64, None, False, False, False, False),     # MoCo: bank, no in-batch negatives
    (37, 37, 20, 130, None, False, True, False, False),     # bank and in-batch negatives
    (37, 37, 20, 64, "rand", False, True, True, False),     # pml with a bank
    (1, 1, 0, 4, "rand", True, True, False, False),         # N = 1 self-mode: empty row
    (129, 129, 0, 33, "rand", False, True, False, True),
]


def _make_case(case, dtype, seed=0):
    n, m, kb, d, labels, ex, ibn, pml, sym = case
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    k = q if ex else (torch.randn(m, d, generator=g) * 0.5).to(dtype)
    bank = (torch.randn(kb, d, generator=g) * 0.5).to(dtype) if kb else None
    if labels is None:
        ql = kl = None
    else:
        def lab(size):
            if labels == "same":
                return torch.zeros(size, dtype=torch.int64)
            if labels == "unique":
                return torch.arange(size, dtype=torch.int64)
            return torch.randint(0, 4, (size,), generator=g)
        ql = lab(n)
        kl = ql if ex else lab(m)
    scale = torch.tensor(2.5)
    return q, k, bank, scale, ql, kl, ex, ibn, pml, sym


@pytest.mark.parametrize("case", LAUNCHER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_infonce_launchers_match_core_reference(case):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    for name, a, b in zip(("row_loss", "col_loss", "row_stats", "col_stats"), out, exp):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # "-inf" (empty set) may be any value <= -1e30
        a = torch.where(b <= -1e30, torch.full_like(a, -1e30), a).clamp_min(-1e30)
        assert _err(a, b) <= 2e-5 * _mag(b), (name, _err(a, b))
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    for name, a, b in zip(("dq", "dk", "dbank", "dscale"), grads, gexp):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        # dscale sums N x M terms that cancel (each row of dS sums to ~0): a looser relative bound
        tol = (2e-4 if name == "dscale" else 3e-5) * _mag(b)
        assert _err(a, b) <= tol, (name, _err(a, b))


def test_empty_row_gives_zero_loss_and_grads():
    """N = 1 with self exclusion: no valid column -> loss 0, zero gradients, no NaN."""
    q = torch.randn(1, 8)
    labels = torch.zeros(1, dtype=torch.int64)
    for pml in (False, True):
        row, _, stats, _ = K.infonce_fwd(q, q, None, torch.tensor(3.0), labels, labels, True, True, pml, False)
        assert row.item() == 0.0 and stats[0, 0].item() <= -1e30 and stats[0, 1].item() == 0
        dq, dk, dbank, dscale = K.infonce_bwd(q, q, None, torch.tensor(3.0), labels, labels, True, True, pml, False,
                                              stats, torch.zeros(0, 2), torch.ones(1), None)
        assert dbank is None and (dq == 0).all() and (dk == 0).all() and dscale.item() == 0


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", [LAUNCHER_CASES[2], LAUNCHER_CASES[5], LAUNCHER_CASES[11]], ids=["clip", "pml", "bank"])
def test_infonce_launchers_low_precision(case, dtype):
    """16-bit inputs: outputs against the float64 reference of the same (rounded) inputs."""
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, dtype)
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    for a, b in zip(out[:2], exp[:2]):
        assert _err(a, b) <= 1e-4 * _mag(b)  # fp32 accumulation of exactly representable products
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    for a, b in zip(grads, gexp):
        if b is not None:
            assert a.dtype == b.dtype  # dq, dk, dbank in the input dtype; dscale float32
            # dS is rounded to the input dtype before the gradient matmuls, and the result is rounded once more
            assert _err(a, b) <= FLOOR[dtype] * _mag(b), _err(a, b)


@pytest.mark.parametrize("n,d", [(1, 3), (37, 130), (129, 64)])
def test_siglip_launchers_match_core_reference(n, d):
    q, k = torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.3
    scale, bias = torch.tensor(4.0), torch.tensor(-3.0)
    row = K.siglip_fwd(q, k, scale, bias)
    exp = ref.siglip_core_fwd_ref(q, k, scale, bias)
    assert row.dtype == torch.float32 and _err(row, exp) <= 2e-5 * _mag(exp)
    g = torch.randn(n)
    for det in (False, True):
        got = K.siglip_bwd(q, k, scale, bias, g, deterministic=det)
        gexp = ref.siglip_core_bwd_ref(q, k, scale, bias, g)
        for a, b in zip(got, gexp):
            assert _err(a, b) <= 1e-4 * _mag(b)


@pytest.mark.parametrize("case", [LAUNCHER_CASES[3], LAUNCHER_CASES[5], LAUNCHER_CASES[12]], ids=["sym", "pml", "bank"])
def test_deterministic_mode_is_reproducible(case, monkeypatch):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    stats = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    monkeypatch.setenv("CONTRASTGEN_DETERMINISTIC", "1")
    a = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, stats[2], stats[3], g_row, g_col)
    b = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, stats[2], stats[3], g_row, g_col)
    monkeypatch.setenv("CONTRASTGEN_DETERMINISTIC", "0")
    c = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, stats[2], stats[3], g_row, g_col)
    for x, y, z in zip(a, b, c):
        if x is None:
            continue
        assert torch.equal(x, y)  # bitwise reproducible
        assert _err(x, z) <= 1e-5 * _mag(z)  # same values as the atomic path


# ----------------------------------------------------------------------------------------------- public API
def _grads(loss_fn, tensors, upstream=None):
    loss = loss_fn()
    if upstream is not None:
        loss = (loss * upstream.to(loss.dtype)).sum()
    gs = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
    return loss.detach(), gs


def _check_public(fn_kernel, fn_ref, leaves, dtype, upstream=None):
    """Kernel (input dtype) vs reference in float64 and in the input dtype: loss and every gradient."""
    lows = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() and t.dim() == 2
            else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    hi = [t.detach().double().requires_grad_(t.requires_grad) for t in lows]
    lo_ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in lows]
    got = _grads(lambda: fn_kernel(*lows), lows, upstream)
    r64 = _grads(lambda: fn_ref(*hi), hi, upstream)
    rlo = _grads(lambda: fn_ref(*lo_ref), lo_ref, upstream)
    assert got[0].dtype == dtype
    assert_close_2x("loss", got[0], r64[0], rlo[0], dtype)
    for i, (a, b, c) in enumerate(zip(got[1], r64[1], rlo[1])):
        assert torch.isfinite(a).all()
        assert_close_2x(f"grad[{i}]", a, b, c, dtype)


def _feat(n, d, scale=0.3):
    return torch.randn(n, d) * scale


@pytest.mark.parametrize("n,d,dtype", [(1, 3, F32), (2, 1, F32), (37, 64, F32), (129, 130, F32), (300, 64, F32),
                                       (37, 64, BF16), (37, 130, F16)])
def test_clip_loss(n, d, dtype):
    image, text = _feat(n, d).requires_grad_(), _feat(n, d).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True)
    _check_public(lambda i, t, s_, b_: contrastgen.clip_loss(i, t, s_, b_, backend="triton"),
                  ref.clip_loss_ref, [image, text, s, b], dtype)


@pytest.mark.parametrize("n,d,dtype", [(1, 3, F32), (37, 130, F32), (129, 64, F32), (37, 64, BF16), (37, 64, F16)])
def test_siglip_loss(n, d, dtype):
    image, text = _feat(n, d).requires_grad_(), _feat(n, d).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    _check_public(lambda i, t, s_, b_: contrastgen.siglip_loss(i, t, s_, b_, backend="triton"),
                  ref.siglip_loss_ref, [image, text, s, b], dtype)


@pytest.mark.parametrize("n,d,dtype", [(1, 3, F32), (37, 64, F32), (129, 130, F32), (37, 64, BF16)])
def test_nt_xent(n, d, dtype):
    z1, z2 = _feat(n, d).requires_grad_(), _feat(n, d).requires_grad_()
    t = torch.tensor(0.5, requires_grad=True)
    _check_public(lambda a, b, t_: contrastgen.nt_xent(a, b, temperature=t_, backend="triton"),
                  ref.nt_xent_ref, [z1, z2, t], dtype)


INFO_NCE_CASES = [
    # (N, D, labels, positives, key, bank, in_batch_negatives, symmetric, reduction, dtype)
    (37, 64, None, "diagonal", True, 0, None, False, "mean", F32),
    (37, 130, None, "diagonal", True, 0, None, True, "none", F32),
    (129, 3, None, "diagonal", True, 0, None, True, "sum", F32),
    (37, 64, "rand", "supcon", False, 0, None, False, "mean", F32),
    (37, 64, "rand", "supcon", False, 0, None, False, "none", F32),
    (37, 64, "same", "supcon", False, 0, None, False, "mean", F32),
    (37, 64, "unique", "supcon", False, 0, None, False, "mean", F32),
    (37, 64, "rand", "supcon", True, 0, None, True, "mean", F32),
    (37, 64, "rand", "pml", False, 0, None, False, "mean", F32),
    (37, 130, "rand", "pml", False, 0, None, False, "none", F32),
    (37, 64, "same", "pml", False, 0, None, False, "sum", F32),
    (37, 64, "unique", "pml", False, 0, None, False, "mean", F32),
    (37, 64, None, "diagonal", True, 50, None, False, "mean", F32),     # MoCo (no in-batch negatives)
    (37, 64, None, "diagonal", True, 50, True, False, "none", F32),
    (37, 64, "rand", "pml", True, 20, True, False, "mean", F32),
    (2, 1, None, "diagonal", True, 0, None, False, "mean", F32),
    (1, 3, "rand", "supcon", False, 0, None, False, "mean", F32),       # N = 1 self-mode: loss 0
    (300, 64, "rand", "supcon", False, 0, None, False, "mean", F32),
    (37, 64, "rand", "supcon", False, 0, None, False, "mean", BF16),
    (37, 64, None, "diagonal", True, 20, None, False, "none", BF16),
    (37, 64, "rand", "pml", False, 0, None, False, "mean", F16),
    (37, 130, None, "diagonal", True, 0, None, True, "mean", F16),
]


@pytest.mark.parametrize("case", INFO_NCE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_info_nce(case):
    n, d, labels, positives, with_key, kb, ibn, symmetric, reduction, dtype = case
    q = _feat(n, d, 0.5).requires_grad_()
    key = _feat(n, d, 0.5).requires_grad_() if with_key else None
    bank = _feat(kb, d, 0.5).requires_grad_() if kb else None
    temp = torch.tensor(0.2, requires_grad=True)
    if labels is None:
        lab = None
    elif labels == "same":
        lab = torch.zeros(n, dtype=torch.int64)
    elif labels == "unique":
        lab = torch.arange(n)
    else:
        lab = torch.randint(0, 4, (n,))
    upstream = torch.randn(n) if reduction == "none" else None
    leaves = [q] + ([key] if key is not None else []) + ([bank] if bank is not None else []) + [temp]

    def call(fn, *ts):
        ts = list(ts)
        qq = ts.pop(0)
        kk = ts.pop(0) if key is not None else None
        bb = ts.pop(0) if bank is not None else None
        tt = ts.pop(0)
        return fn(qq, kk, temperature=tt, labels=lab, positives=positives, negatives=bb, in_batch_negatives=ibn,
                  symmetric=symmetric, reduction=reduction)

    _check_public(lambda *ts: call(lambda *a, **kw: contrastgen.info_nce(*a, backend="triton", **kw), *ts),
                  lambda *ts: call(ref.info_nce_ref, *ts), leaves, dtype, upstream)


def test_public_deterministic_env(monkeypatch):
    """CONTRASTGEN_DETERMINISTIC=1 through the public API: bitwise-identical gradients across calls."""
    monkeypatch.setenv("CONTRASTGEN_DETERMINISTIC", "1")
    q, k = _feat(70, 32).requires_grad_(), _feat(70, 32).requires_grad_()
    out = []
    for _ in range(2):
        loss = contrastgen.clip_loss(q, k, torch.tensor(10.0), backend="triton")
        out.append(torch.autograd.grad(loss, [q, k]))
    assert all(torch.equal(a, b) for a, b in zip(*out))


# ----------------------------------------------------------------------------------------------- column pass
# Symmetric losses: the column statistics come either from the (row blocks, 4, M) partial buffer (small shapes)
# or from the column pass (the forward kernel with q and k swapped, no workspace).  Budget 0 forces the latter.
@pytest.fixture
def force_column_pass(monkeypatch):
    monkeypatch.setattr(K, "COL_PARTIAL_BUDGET_BYTES", 0)
    monkeypatch.setattr(K, "COL_PARTIAL_INPUT_RATIO", 0.0)

    class _NoReduce:  # the column pass must not go through the partial buffer
        def __getitem__(self, grid):
            raise AssertionError("the column pass launched the partial reduction")

    monkeypatch.setattr(K, "_infonce_col_reduce_kernel", _NoReduce())


# (N, M, K bank, D, labels, exclude_self, in_batch_negatives, pml, symmetric)
COLUMN_PASS_CASES = [
    (1, 1, 0, 3, None, False, True, False, True),          # N = 1
    (37, 37, 0, 130, None, False, True, False, True),      # CLIP diagonal, N not a multiple of the block
    (37, 53, 0, 64, "rand", False, True, False, True),     # supcon symmetric with labels, N != M
    (129, 70, 0, 33, "rand", False, True, False, True),    # several row and key blocks, odd D
    (37, 37, 0, 64, "unique", False, False, False, True),  # only the positive is valid
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("case", COLUMN_PASS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_column_pass_matches_core_reference(case, dtype, force_column_pass):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, dtype)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    assert K.infonce_fwd_workspace(n, m, d, q.element_size(), True) == ("column_pass", 0)
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)  # float64 of the same inputs
    tol = 2e-5 if dtype == F32 else 1e-4  # fp32 accumulation (16-bit products are exact in fp32)
    for name, a, b in zip(("row_loss", "col_loss", "row_stats", "col_stats"), out, exp):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        a = torch.where(b <= -1e30, torch.full_like(a, -1e30), a).clamp_min(-1e30)
        assert _err(a, b) <= tol * _mag(b), (name, _err(a, b))


@pytest.mark.parametrize("case", [COLUMN_PASS_CASES[2], COLUMN_PASS_CASES[3]], ids=["supcon", "blocks"])
def test_column_pass_and_partials_agree(case, monkeypatch):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    assert K.infonce_fwd_workspace(n, m, d, 4, True)[0] == "partials"  # small: the default takes the buffer
    part = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    monkeypatch.setattr(K, "COL_PARTIAL_BUDGET_BYTES", 0)
    monkeypatch.setattr(K, "COL_PARTIAL_INPUT_RATIO", 0.0)
    col = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    col2 = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    for a, b, c in zip(part, col, col2):
        assert torch.equal(b, c)  # deterministic
        assert _err(a, b) <= 1e-6 * _mag(a)  # same values up to fp32 rounding
    assert torch.equal(part[0], col[0]) and torch.equal(part[2], col[2])  # the row pass is the same computation


def test_column_pass_public_clip_gradients(force_column_pass):
    """clip_loss end to end (forward through the column pass, backward from its col_stats) vs the reference."""
    image, text = _feat(70, 64).requires_grad_(), _feat(70, 64).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    _check_public(lambda i, t, s_: contrastgen.clip_loss(i, t, s_, backend="triton"),
                  lambda i, t, s_: ref.clip_loss_ref(i, t, s_), [image, text, s], F32)


def test_forward_workspace_choice():
    """The launcher's extra memory: the partial buffer only while it is small, O(N D + N + M) beyond that."""
    ws = K.infonce_fwd_workspace
    assert ws(4096, 4096, 256, 2, False) == ("rows", 0)
    # CLIP at 8k: 16 x 128 x 8192 B = 16 MiB partials, within the 32 MiB floor
    path, extra = ws(8192, 8192, 256, 2, True)
    assert path == "partials" and extra == 16 * (8192 // K._MIN_FWD_BLOCK_N) * 8192 <= K.COL_PARTIAL_BUDGET_BYTES
    # partials allowed up to the bytes of q and k (D = 4096 fp32: 1 GiB of inputs, 256 MiB of partials)
    assert ws(32768, 32768, 4096, 4, True)[0] == "partials"
    for n, d, itemsize in ((65536, 512, 2), (262144, 256, 2), (262144, 1024, 4), (20000, 64, 4)):
        path, extra = ws(n, n, d, itemsize, True)
        partial = 16 * -(-n // K._MIN_FWD_BLOCK_N) * n
        assert path == "column_pass" and partial > max(K.COL_PARTIAL_BUDGET_BYTES, 2 * n * d * itemsize)
        assert extra <= 2 * n * d * itemsize + 12 * 2 * n  # O(N D + N + M), here 0
    # whatever the shape, the chosen workspace stays within the budget rule
    for n, m, d in ((1, 1, 1), (100, 3000, 7), (50000, 70, 64), (70, 50000, 64), (40000, 40000, 128)):
        _, extra = ws(n, m, d, 2, True)
        assert extra <= max(K.COL_PARTIAL_BUDGET_BYTES, K.COL_PARTIAL_INPUT_RATIO * (n + m) * d * 2)
