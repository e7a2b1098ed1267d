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

# The interpreter evaluates exp() in numpy on lanes that are then masked out (e.g. sigmoid of "-inf" = -1e30), and
# the non-finite tests feed it NaN / Inf: numpy warns there, which is harmless (the result is 0, masked or NaN).
pytestmark = [pytest.mark.filterwarnings(f"ignore:{w}:RuntimeWarning")
              for w in ("overflow encountered", "invalid value encountered", "All-NaN slice", "divide by zero")]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOOR = {F32: 2e-5, BF16: 2e-2, F16: 4e-3}


def assert_close_2x(name, got, ref64, ref_lowp, dtype):
    assert_2x_torch(name, got, ref64, ref_lowp, FLOOR[dtype])


# ----------------------------------------------------------------------------------------------- launchers
# (N, M, K bank, D, labels, exclude_self, in_batch_negatives, pml, symmetric)
LAUNCHER_CASES = [
    (1, 1, 0, 3, None, False, True, False, True),           # CLIP, a single pair
    (2, 2, 0, 1, None, False, True, False, False),
    (37, 37, 0, 130, None, False, True, False, True),       # CLIP, odd N, D over three chunks (pointer loads)
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
    (150, 90, 0, 64, None, False, True, False, True),       # N > M diagonal: rows without a positive
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


def _check_fwd(out, exp, tol):
    for name, a, b in zip(("row_loss", "col_loss", "row_stats", "col_stats"), out, exp):
        assert a.dtype == torch.float32, name
        if "stats" in name:   # the contract's two columns; the Triton stats append lse_lo and the pml coefficient
            assert a.shape[:1] == b.shape[:1] and a.shape[1] == K.STATS_COLUMNS, name
            a = a[:, :2]
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # "-inf" (empty set) may be any value <= -1e30
        a = torch.where(b <= -1e30, torch.full_like(a, -1e30), a).clamp_min(-1e30)
        assert _err(a, b) <= tol * _mag(b), (name, _err(a, b))


def _check_bwd(grads, gexp, tol):
    for name, a, b in zip(("dq", "dk", "dbank", "dscale"), grads, gexp):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        # dscale sums N x M terms that cancel (each row of dS sums to ~0): a looser relative bound
        t = (10 * tol if name == "dscale" else tol) * _mag(b)
        assert _err(a, b) <= t, (name, _err(a, b))


@pytest.mark.parametrize("case", LAUNCHER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_infonce_launchers_match_core_reference(case):
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    _check_fwd(out, exp, 2e-5)
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    # with the launcher's own stats, and with contract-only [lse, npos] stats (c_i recomputed, lse_lo = 0)
    for rs, cs in ((out[2], out[3]), (exp[2], exp[3])):
        grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, rs, cs, g_row, g_col)
        _check_bwd(grads, gexp, 3e-5)


def test_empty_row_gives_zero_loss_and_grads():
    """N = 1 with self exclusion: no valid column -> loss 0, zero gradients, no NaN."""
    q = torch.randn(1, 8)
    labels = torch.zeros(1, dtype=torch.int64)
    for pml in (False, True):
        row, _, stats, _ = K.infonce_fwd(q, q, None, torch.tensor(3.0), labels, labels, True, True, pml, False)
        assert row.item() == 0.0 and stats[0, 0].item() <= -1e30 and stats[0, 1].item() == 0
        dq, dk, dbank, dscale = K.infonce_bwd(q, q, None, torch.tensor(3.0), labels, labels, True, True, pml, False,
                                              stats, torch.zeros(0, 4), torch.ones(1), None)
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
    grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, g_col)
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    for a, b in zip(grads, gexp):
        if b is not None:
            assert a.dtype == b.dtype  # dq, dk, dbank in the input dtype; dscale float32
            # dS is rounded to the input dtype before the gradient products, and the result is rounded once more
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
    """Every path is a fixed-order reduction (no atomics): bitwise equal across calls, whatever the env flag."""
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    stats = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
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
        assert torch.equal(x, y) and torch.equal(x, z)


# ----------------------------------------------------------------------------------------------- needs_* flags
def test_gradients_nobody_asked_for_cost_nothing(monkeypatch):
    """needs_dq / needs_dk / needs_dbank = False: None, and no product for it (a MoCo bank without grad)."""
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(LAUNCHER_CASES[10], F32)
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    g_row = torch.randn(q.shape[0])
    full = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, None)
    calls = []
    real = K._mm32
    monkeypatch.setattr(K, "_mm32", lambda a, b: calls.append((tuple(a.shape), tuple(b.shape))) or real(a, b))
    dq, dk, dbank, dscale = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, None,
                                          needs_dk=False, needs_dbank=False)
    assert dk is None and dbank is None
    assert torch.equal(dq, full[0]) and torch.equal(dscale, full[3])
    n, m, kb = q.shape[0], k.shape[0], bank.shape[0]
    assert calls == [((n, m), (m, q.shape[1])), ((n, kb), (kb, q.shape[1]))]   # dQ only: dS K and dS_bank bank
    calls.clear()
    _, _, dbank_only, _ = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, None,
                                        needs_dq=False, needs_dk=False)
    assert torch.equal(dbank_only, full[2]) and calls == [((kb, n), (n, q.shape[1]))]
    # SigLIP
    s, b = torch.tensor(3.0), torch.tensor(-2.0)
    calls.clear()
    dq, dk, _, _ = K.siglip_bwd(q, k, s, b, g_row, needs_dq=False)
    assert dq is None and dk is not None and len(calls) == 1


def test_custom_op_passes_needs_input_grad():
    """A bank that does not require grad: the public API returns no gradient for it and computes none."""
    q = torch.randn(20, 16, requires_grad=True)
    k = torch.randn(20, 16, requires_grad=True)
    bank = torch.randn(40, 16)           # no grad (MoCo queue)
    loss = contrastgen.info_nce(q, k, negatives=bank, temperature=0.2, backend="triton")
    gq, gk = torch.autograd.grad(loss, [q, k])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    e = torch.autograd.grad(ref.info_nce_ref(q64, k64, negatives=bank.double(), temperature=0.2), [q64, k64])
    assert _err(gq, e[0]) <= 1e-5 * _mag(e[0]) and _err(gk, e[1]) <= 1e-5 * _mag(e[1])


# ----------------------------------------------------------------------------------------------- chunks, splits
@pytest.fixture
def small_workspace(monkeypatch):
    """Force several row chunks (a workspace of ~2 row blocks) and several splits of the key tiles."""
    monkeypatch.setattr(K, "FORCE_WORKSPACE_BYTES", 1)
    monkeypatch.setattr(K, "FORCE_SPLITS", 3)


CHUNK_CASES = [  # more rows than one interpreter row block (64)
    (150, 100, 0, 64, "rand", False, True, False, True),    # supcon symmetric, N != M: column records over chunks
    (150, 90, 0, 64, None, False, True, False, True),       # CLIP with N > M
    (130, 130, 0, 64, "rand", True, True, True, False),     # pml self: the pml pass per chunk
    (130, 130, 70, 64, None, False, False, False, False),   # MoCo: bank records in their own splits
    (140, 140, 40, 64, "rand", False, True, True, False),   # pml with a bank
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_row_chunks_and_key_splits_match(case, small_workspace):
    """The forward records merged over chunks and splits, and the backward slab in chunks, equal the reference."""
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, F32)
    bn = K.tile_config(q.dtype, q.device, q.shape[1]).block_n
    assert K._chunk_rows(q.shape[0], bn, 1.0, 0, K.FORCE_WORKSPACE_BYTES) == bn < q.shape[0]   # several chunks
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    _check_fwd(out, exp, 2e-5)
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, g_col)
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    _check_bwd(grads, gexp, 3e-5)


def test_workspace_budget_bounds_the_slab():
    """The slab / records take the budget (a fraction of free CUDA memory; fixed on CPU), never N x M."""
    cfg = K.INTERPRET_TILE
    n, m = 65536, 65536
    rows = K._chunk_rows(n, cfg.block_n, m * 2, 0, 2 ** 30)
    assert rows % cfg.block_n == 0 and rows * m * 2 <= 2 ** 30 and rows < n
    assert K._chunk_rows(100, cfg.block_n, 8, 0, 2 ** 30) == 128        # small problems: one chunk
    assert K._chunk_rows(n, cfg.block_n, m * 2, 0, 1) == cfg.block_n     # at least one row block
    assert K.workspace_budget(torch.device("cpu"), False) == K.CPU_WORKSPACE_BYTES


# ----------------------------------------------------------------------------------------------- GPU tiles
GPU_TILE_CASES = [  # few tiles at the GPU tile sizes (128 x 128 on sm_90 / sm_80 16-bit)
    (200, 200, 0, 64, None, False, True, False, True),       # CLIP: fast tiles, diagonal tiles, edges
    (200, 200, 0, 48, "rand", True, True, False, False),     # nt_xent / supcon self
    (160, 160, 0, 64, "rand", True, True, True, False),      # pml self
    (130, 130, 300, 64, None, False, False, False, False),   # MoCo: bank tiles, skipped in-batch tiles
    (150, 150, 0, 33, None, False, True, False, True),       # odd D: the pointer (non-TMA) tiles
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_tile_configs_under_the_interpreter(case, dtype, arch, monkeypatch):
    """The shipped GPU tiles (not only the interpreter's 64 x 64) against the float64 contract."""
    monkeypatch.setattr(K, "INTERPRET_WITH_GPU_CONFIGS", arch)
    q, k, bank, scale, ql, kl, ex, ibn, pml, sym = _make_case(case, dtype)
    cfg = K.tile_config(q.dtype, q.device, q.shape[1])
    assert cfg == K.TILE_CONFIGS[(arch, K._precision(dtype), K.use_tma(q.shape[1], q.dtype, q.device))]
    out = K.infonce_fwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    exp = ref.infonce_core_fwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym)
    _check_fwd(out, exp, 2e-5 if dtype == F32 else 1e-4)
    g_row = torch.randn(q.shape[0])
    g_col = torch.randn(k.shape[0]) if sym else None
    grads = K.infonce_bwd(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, out[2], out[3], g_row, g_col)
    gexp = ref.infonce_core_bwd_ref(q, k, bank, scale, ql, kl, ex, ibn, pml, sym, exp[2], exp[3], g_row, g_col)
    _check_bwd(grads, gexp, 3e-5 if dtype == F32 else FLOOR[dtype])


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_siglip_gpu_tile_configs_under_the_interpreter(dtype, arch, monkeypatch):
    monkeypatch.setattr(K, "INTERPRET_WITH_GPU_CONFIGS", arch)
    q, k = (torch.randn(200, 64) * 0.3).to(dtype), (torch.randn(200, 64) * 0.3).to(dtype)
    scale, bias = torch.tensor(4.0), torch.tensor(-3.0)
    row = K.siglip_fwd(q, k, scale, bias)
    exp = ref.siglip_core_fwd_ref(q, k, scale, bias)
    assert _err(row, exp) <= (2e-5 if dtype == F32 else 1e-4) * _mag(exp)
    g = torch.randn(200)
    got = K.siglip_bwd(q, k, scale, bias, g)
    for a, b in zip(got, ref.siglip_core_bwd_ref(q, k, scale, bias, g)):
        assert _err(a, b) <= (1e-4 if dtype == F32 else FLOOR[dtype]) * _mag(b)


# ----------------------------------------------------------------------------------------------- non-finite inputs
def _nonfinite_case(name):
    """(function of the leaves, leaves): one NaN / Inf somewhere (issue 9 item 1)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "bank_nan":                      # MoCo: a NaN in one bank row reaches every row
        q, k, bank = r(8, 4), r(8, 4), r(16, 4)
        bank[3, 0] = float("nan")
        return lambda be, q, k, b: contrastgen.info_nce(q, k, negatives=b, backend=be), [q, k, bank]
    if name == "pml_query_nan":                 # pml, one NaN query row
        q = r(12, 5)
        q[2, 1] = float("nan")
        lab = torch.arange(12) % 3
        return lambda be, q: contrastgen.info_nce(q, labels=lab, positives="pml", temperature=0.3, backend=be), [q]
    if name == "pml_bank_nan":                  # pml with a NaN in the bank
        q, bank = r(12, 5), r(10, 5)
        bank[4, 2] = float("nan")
        lab = torch.arange(12) % 3
        return (lambda be, q, b: contrastgen.info_nce(q, labels=lab, positives="pml", negatives=b, backend=be),
                [q, bank])
    if name == "none_key_nan":                  # reduction="none", one NaN key: every row
        q, k = r(9, 4), r(9, 4)
        k[5, 0] = float("nan")
        return lambda be, q, k: contrastgen.info_nce(q, k, reduction="none", backend=be), [q, k]
    if name == "clip_feature_nan":
        i, t = r(40, 8), r(40, 8)
        i[7, 3] = float("nan")
        return lambda be, i, t: contrastgen.clip_loss(i, t, torch.tensor(10.0), backend=be), [i, t]
    if name == "clip_feature_inf":
        i, t = r(40, 8), r(40, 8)
        t[1, 0] = float("inf")
        return lambda be, i, t: contrastgen.clip_loss(i, t, torch.tensor(10.0), backend=be), [i, t]
    if name == "moco_masked_nan":               # a NaN key only its own row may use (no in-batch negatives)
        q, k, bank = r(8, 4), r(8, 4), r(16, 4)
        k[5, 0] = float("nan")
        return (lambda be, q, k, b: contrastgen.info_nce(q, k, negatives=b, in_batch_negatives=False,
                                                         reduction="none", backend=be), [q, k, bank])
    if name == "siglip_nan":
        i, t = r(30, 6), r(30, 6)
        i[4, 4] = float("nan")
        return (lambda be, i, t: contrastgen.siglip_loss(i, t, torch.tensor(5.0), torch.tensor(-3.0), backend=be),
                [i, t])
    raise ValueError(name)


NONFINITE = ["bank_nan", "pml_query_nan", "pml_bank_nan", "none_key_nan", "clip_feature_nan", "clip_feature_inf",
             "moco_masked_nan", "siglip_nan"]


@pytest.mark.parametrize("name", NONFINITE)
def test_nonfinite_inputs_give_nonfinite_outputs(name):
    """Wherever the float64 reference is non-finite, so is the loss, and no gradient entry is finite there; a NaN is
    never an empty set (the "-inf" placeholder never comes out)."""
    fn, leaves = _nonfinite_case(name)
    ours = [t.clone().requires_grad_() for t in leaves]
    r64 = [t.double().requires_grad_() for t in leaves]
    loss = fn("triton", *ours)
    loss64 = fn("torch", *r64)
    assert not ((loss.abs() >= 1e29) & torch.isfinite(loss)).any()          # never the -1e30 placeholder
    bad = ~torch.isfinite(loss64)
    assert (~torch.isfinite(loss.double())[bad]).all(), (loss, loss64)
    assert torch.allclose(loss.double()[~bad], loss64[~bad], atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(loss.sum(), ours, allow_unused=True, materialize_grads=True)
    g64 = torch.autograd.grad(loss64.sum(), r64, allow_unused=True, materialize_grads=True)
    for i, (a, b) in enumerate(zip(g, g64)):
        bad = ~torch.isfinite(b)
        assert (~torch.isfinite(a)[bad]).all(), f"grad[{i}]: {int(torch.isfinite(a)[bad].sum())} finite entries where the reference is not"
        assert torch.allclose(a.double()[~bad], b[~bad], atol=1e-5, rtol=1e-4), f"grad[{i}]"


def test_nan_scale_is_not_an_empty_set():
    q, k = torch.randn(10, 4), torch.randn(10, 4)
    row, col, rs, cs = K.infonce_fwd(q, k, None, torch.tensor(float("nan")), None, None, False, True, False, True)
    assert torch.isnan(row).all() and torch.isnan(col).all() and torch.isnan(rs[:, 0]).all()
    dq, dk, _, dscale = K.infonce_bwd(q, k, None, torch.tensor(float("nan")), None, None, False, True, False, True,
                                      rs, cs, torch.ones(10), torch.ones(10))
    assert torch.isnan(dq).all() and torch.isnan(dk).all() and torch.isnan(dscale)


# ----------------------------------------------------------------------------------------------- large logit scales
def _unit(n, d, g, spread=None):
    x = torch.randn(n, d, generator=g)
    if spread is not None:   # a cluster: logits close to each other, so that the softmax is not one-hot
        x = torch.randn(1, d, generator=g) + spread * x
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("spread", [None, 0.01], ids=["random", "clustered"])
def test_clip_loss_at_logit_scale_1e4(spread):
    """Issue 9 item 4: logit scale 1e4 with unit features; the lse kept as an fp32 pair keeps e^{s - lse} exact."""
    g = torch.Generator().manual_seed(5)
    image, text = _unit(37, 16, g, spread), _unit(37, 16, g, spread)
    if spread is not None:
        text = torch.nn.functional.normalize(image + 0.003 * torch.randn(37, 16, generator=g), dim=1)
    s = torch.tensor(1e4)
    _check_public(lambda i, t: contrastgen.clip_loss(i, t, s, backend="triton"),
                  lambda i, t: ref.clip_loss_ref(i, t, s), [image.requires_grad_(), text.requires_grad_()], F32)


def test_nt_xent_at_temperature_1e_3():
    g = torch.Generator().manual_seed(6)
    for seed in range(4):
        z1 = torch.randn(24, 16, generator=g)
        z2 = z1 + 0.05 * torch.randn(24, 16, generator=g)
        _check_public(lambda a, b: contrastgen.nt_xent(a, b, temperature=1e-3, backend="triton"),
                      lambda a, b: ref.nt_xent_ref(a, b, 1e-3), [z1.requires_grad_(), z2.requires_grad_()], F32)


@pytest.mark.parametrize("bank", [True, False], ids=["code_bank", "diagonal"])
@pytest.mark.parametrize("target", [5.5e-4, 1e-7])
def test_small_losses_keep_their_digits(target, bank):
    """A positive that dominates its negatives (CoDE-style with a bank, or the diagonal): the loss is
    log1p(sum_neg e^{s_n - s_p}), which keeps its relative accuracy where lse - s_p cancels (the fused kernels gave
    3e-4 relative error at 5.5e-4 and exactly 0.0 at 1e-7; torch's fp32 cross-entropy is ~1e-1 off at 1e-7)."""
    g = torch.Generator().manual_seed(7)
    n, d, kb = 16, 32, 24
    q = _unit(n, d, g)
    k = torch.nn.functional.normalize(q + 0.01 * torch.randn(n, d, generator=g), dim=1)
    negatives = _unit(kb, d, g) if bank else None
    keys = negatives if bank else k
    s_pos = (q * k).sum(1).double()
    s_neg = q.double() @ keys.double().T
    if not bank:
        s_neg = s_neg.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    lo, hi = 1e-3, 10.0   # the temperature that makes the mean loss about `target`
    for _ in range(60):
        t = (lo * hi) ** 0.5
        lo, hi = (lo, t) if torch.log1p(torch.exp((s_neg - s_pos[:, None]) / t).sum(1)).mean() > target else (t, hi)
    t = torch.tensor(t, dtype=torch.float32)
    got = contrastgen.info_nce(q, k, negatives=negatives, temperature=t, backend="triton").double()
    exact = ref.info_nce_ref(q.double(), k.double(), negatives=None if negatives is None else negatives.double(),
                             temperature=t.double())
    assert 0.5 * target < exact < 2 * target
    assert abs(got - exact) <= 1e-4 * exact, (got.item(), exact.item())
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()] + ([negatives.clone().requires_grad_()] if bank else [])
    _check_public(lambda *x: contrastgen.info_nce(x[0], x[1], negatives=x[2] if bank else None, temperature=t,
                                                  backend="triton"),
                  lambda *x: ref.info_nce_ref(x[0], x[1], negatives=x[2] if bank else None, temperature=t.to(x[0].dtype)),
                  leaves, F32)


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


