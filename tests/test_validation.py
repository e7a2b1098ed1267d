"""Bad input raises ValueError/TypeError naming the argument and the shapes; dispatch rules."""
import math
import warnings

import pytest
import torch

import contrastgen as cg
import contrastgen.nn as cgnn
from contrastgen.ops import _backends, _dispatch

x4 = lambda n=4, d=3, **kw: torch.randn(n, d, **kw)  # noqa: E731


@pytest.mark.parametrize("call,exc,words", [
    # shapes
    (lambda: cg.clip_loss(x4(4, 3), x4(5, 3), 10.0), ValueError, ["image", "text", "(4, 3)", "(5, 3)"]),
    (lambda: cg.clip_loss(x4(4, 3), x4(4, 2), 10.0), ValueError, ["image", "text"]),
    (lambda: cg.clip_loss(torch.randn(4), x4(), 10.0), ValueError, ["image", "(4,)"]),
    (lambda: cg.info_nce(x4(4, 3), x4(4, 5)), ValueError, ["key", "query", "(4, 5)"]),
    (lambda: cg.info_nce(x4(4, 3), x4(6, 3)), ValueError, ["diagonal", "(6, 3)"]),
    (lambda: cg.info_nce(x4(4, 3)), ValueError, ["diagonal", "key"]),
    (lambda: cg.info_nce(x4(4, 3), labels=torch.zeros(5, dtype=torch.long), positives="pml"), ValueError, ["labels", "(4,)"]),
    (lambda: cg.info_nce(x4(4, 3), x4(6, 3), labels=torch.zeros(4, dtype=torch.long), positives="supcon"), ValueError, ["key_labels"]),
    (lambda: cg.info_nce(x4(4, 3), x4(4, 3), negatives=x4(5, 2)), ValueError, ["negatives", "(5, 2)"]),
    (lambda: cg.info_nce(x4(4, 3), x4(4, 3), negatives=x4(5, 3), symmetric=True), ValueError, ["symmetric"]),
    (lambda: cg.nt_xent(x4(4, 3), x4(3, 3)), ValueError, ["z1", "z2", "(3, 3)"]),
    (lambda: cg.dispersive_loss(torch.randn(4)), ValueError, ["z", "(4,)"]),
    (lambda: cg.dispersive_loss(x4(4, 3), grouped=True), ValueError, ["z", "(4, 3)"]),
    (lambda: cg.dispersive_loss(x4(1, 3), variant="covariance"), ValueError, ["covariance", "(1, 3)"]),
    (lambda: cg.uniformity(x4(1, 3)), ValueError, ["uniformity", "(1, 3)"]),
    (lambda: cg.alignment(x4(4, 3), x4(4, 2)), ValueError, ["x", "y", "(4, 2)"]),
    (lambda: cg.patch_nce(torch.randn(2, 4, 3), torch.randn(2, 5, 3)), ValueError, ["query[0]", "key[0]", "(2, 5, 3)"]),
    (lambda: cg.patch_nce([torch.randn(2, 4, 3)], []), ValueError, ["equal-length"]),
    (lambda: cg.attention_nce(torch.rand(16, 16), [[2]]), ValueError, ["maps", "(16, 16)"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2]], prev_maps=torch.rand(4, 4, 76)), ValueError, ["prev_maps", "(4, 4, 76)"]),
    # empty batch
    (lambda: cg.clip_loss(x4(0, 3), x4(0, 3), 10.0), ValueError, ["image", "empty", "(0, 3)"]),
    (lambda: cg.info_nce(x4(0, 3), x4(0, 3)), ValueError, ["query", "empty"]),
    (lambda: cg.dispersive_loss(x4(0, 3)), ValueError, ["z", "empty"]),
    (lambda: cg.siglip_loss(x4(0, 3), x4(0, 3), 10.0, -10.0), ValueError, ["image", "empty"]),
    # dtypes
    (lambda: cg.clip_loss(x4().long(), x4().long(), 10.0), TypeError, ["image", "floating", "int64"]),
    (lambda: cg.clip_loss(x4(), x4(dtype=torch.float64), 10.0), TypeError, ["text", "image", "dtype"]),
    (lambda: cg.info_nce(x4(), labels=torch.zeros(4), positives="pml"), TypeError, ["labels", "integer"]),
    (lambda: cg.nt_xent(x4(), x4(dtype=torch.bfloat16)), TypeError, ["z2", "z1"]),
    (lambda: cg.clip_loss(x4(), x4(), "10"), TypeError, ["logit_scale"]),
    # temperatures / scales
    (lambda: cg.clip_loss(x4(), x4(), float("nan")), ValueError, ["logit_scale", "finite"]),
    (lambda: cg.clip_loss(x4(), x4(), torch.tensor(float("inf"))), ValueError, ["logit_scale", "finite"]),
    (lambda: cg.clip_loss(x4(), x4(), -1.0), ValueError, ["logit_scale"]),
    (lambda: cg.clip_loss(x4(), x4(), torch.ones(2)), ValueError, ["logit_scale", "(2,)"]),
    (lambda: cg.siglip_loss(x4(), x4(), 10.0, float("nan")), ValueError, ["logit_bias", "finite"]),
    (lambda: cg.info_nce(x4(), x4(), temperature=0.0), ValueError, ["temperature"]),
    (lambda: cg.info_nce(x4(), x4(), temperature=math.inf), ValueError, ["temperature"]),
    (lambda: cg.nt_xent(x4(), x4(), temperature=torch.tensor(float("nan"))), ValueError, ["temperature"]),
    (lambda: cg.dispersive_loss(x4(), tau=-0.5), ValueError, ["tau"]),
    (lambda: cg.uniformity(x4(), t=float("nan")), ValueError, ["t"]),
    (lambda: cg.patch_nce(torch.randn(1, 3, 2), torch.randn(1, 3, 2), temperature=0), ValueError, ["temperature"]),
    # unknown options
    (lambda: cg.info_nce(x4(), x4(), positives="all"), ValueError, ["positives", "'all'"]),
    (lambda: cg.info_nce(x4(), x4(), reduction="max"), ValueError, ["reduction"]),
    (lambda: cg.dispersive_loss(x4(), variant="l1"), ValueError, ["variant", "'l1'"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2]], smoothing="box"), ValueError, ["smoothing"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2]], loss="triplet"), ValueError, ["loss"]),
    (lambda: cg.clip_loss(x4(), x4(), 10.0, backend="cuda"), ValueError, ["backend", "'cuda'"]),
    # token groups
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[0]]), ValueError, ["token index 0", "[1, 75]"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2], [76]]), ValueError, ["token index 76", "token_groups[1]"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2], []]), ValueError, ["token_groups[1]"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2], [2]]), ValueError, ["token index 2"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [2, 3]), ValueError, ["token_groups[0]"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), []), TypeError, ["token_groups"]),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2.0]]), TypeError, ["token_groups[0]"]),
])
def test_bad_input_raises_with_names(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message {msg!r}"


def test_device_mismatch_is_named():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        cg.clip_loss(x4(), meta, 10.0)


def test_env_backend_and_explicit_backend(monkeypatch):
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "torch")
    assert _dispatch.resolve_backend("infonce", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        cg.clip_loss(x4(), x4(), 10.0)
    monkeypatch.delenv("CONTRASTGEN_BACKEND")
    # every op of the table has fused kernels now; a row without them stands for a reference-only op
    monkeypatch.setitem(_backends.BACKEND_TABLE, "ref_only_op", {})
    with pytest.raises(ValueError, match="ref_only_op"):   # explicit but not implemented: raise, never a fallback
        _dispatch.resolve_backend("ref_only_op", "cpp", torch.device("cpu"))


def test_reference_only_op_runs_the_reference_without_warning(monkeypatch):
    # an op without a fused kernel (documented as reference-only) runs the reference silently by default;
    # the warning is for kernels that exist but cannot run (test_missing_cpp_extension_falls_back_to_reference).
    monkeypatch.setitem(_backends.BACKEND_TABLE, "ref_only_op", {})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("ref_only_op", None, torch.device("cpu")) == "torch"
    assert not [x for x in w if "contrastgen" in str(x.message)]


def test_every_floating_argument_gets_a_gradient():
    img, txt = x4().requires_grad_(), x4().requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    cg.clip_loss(img, txt, s, b, backend="torch").backward()
    assert all(t.grad is not None for t in (img, txt, s, b))
    img.grad = None
    s.grad = b.grad = None
    cg.siglip_loss(img, txt, s, b, backend="torch").backward()
    assert all(t.grad is not None for t in (img, s, b))
    tau = torch.tensor(0.1, requires_grad=True)
    q, bank = x4().requires_grad_(), x4(7, 3).requires_grad_()
    cg.info_nce(q, txt, temperature=tau, negatives=bank, backend="torch").backward()
    assert tau.grad is not None and bank.grad is not None and q.grad is not None


def test_missing_cpp_extension_falls_back_to_reference(monkeypatch):
    """A pure-Python install (CONTRASTGEN_SKIP_CPP=1 or no compiler): CPU ops run the reference, warning once."""
    monkeypatch.delenv("CONTRASTGEN_BACKEND", raising=False)
    monkeypatch.setitem(_backends.PROBES, "cpp", lambda op: (False, "the C++ extension is not built"))
    _dispatch._WARNED.discard("infonce:cpp")
    img, txt = x4(6, 5), x4(6, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = cg.clip_loss(img, txt, 10.0)
        cg.clip_loss(img, txt, 10.0)
    assert [str(x.message) for x in w if "not built" in str(x.message)] != []
    assert sum("falls back" in str(x.message) for x in w) == 1
    from contrastgen.reference import clip_loss_ref
    torch.testing.assert_close(got, clip_loss_ref(img, txt, 10.0))
    with pytest.raises(ValueError, match="not built"):
        cg.clip_loss(img, txt, 10.0, backend="cpp")


def test_setup_skips_extensions_on_request(monkeypatch):
    import pathlib
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)                                           # setup.py globs csrc/ relative to cwd
    monkeypatch.setenv("CONTRASTGEN_SKIP_CPP", "1")
    src = (root / "setup.py").read_text().split("\nsetup(")[0]      # definitions only, do not run setup()
    mod = type(sys)("_cg_setup")
    exec(compile(src, str(root / "setup.py"), "exec"), mod.__dict__)
    assert mod.extensions() == []
    monkeypatch.delenv("CONTRASTGEN_SKIP_CPP")
    names = sorted({e.name.rsplit("_", 1)[0] for e in mod.extensions()})     # contrastgen._cpp_<stem>_<variant>
    assert names == sorted(f"contrastgen._cpp_{p.stem}" for p in (root / "csrc").glob("*.cpp")) and names


# --------------------------------------------------------------------------- issue 9: checks that survive torch.compile
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_compiled_code_rejects_bad_tensor_scales(compile_backend):
    """clip_loss(a, b, torch.tensor(-1.)) raises in eager (ValueError) and, compiled, in the graph (RuntimeError
    with the same message) -- it used to return 3.06."""
    torch._dynamo.reset()
    a, b = x4(6, 3), x4(6, 3)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        cg.clip_loss(a, b, torch.tensor(-1.0))

    def f(x, y, s, bias, t):
        return cg.clip_loss(x, y, s) + cg.siglip_loss(x, y, s, bias) + cg.info_nce(x, y, temperature=t)
    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    good = cf(a, b, torch.tensor(3.0), torch.tensor(-1.0), torch.tensor(0.5))
    assert torch.isfinite(good)
    for s, bias, t, word in [(-1.0, -1.0, 0.5, "logit_scale"), (float("nan"), -1.0, 0.5, "logit_scale"),
                             (3.0, float("inf"), 0.5, "logit_bias"), (3.0, -1.0, 0.0, "temperature")]:
        with pytest.raises(RuntimeError, match=f"{word} must be finite"):
            cf(a, b, torch.tensor(s), torch.tensor(bias), torch.tensor(t))


def _dynamic_calls():
    q, k = x4(8, 4), x4(8, 4)
    lab = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    return [
        ("info_nce", lambda a, b: cg.info_nce(a, b), (q, k)),
        ("info_nce_supcon", lambda a, b: cg.info_nce(a, labels=lab, positives="supcon"), (q, k)),
        ("nt_xent", lambda a, b: cg.nt_xent(a, b), (q, k)),
        ("dispersive_loss", lambda a, b: cg.dispersive_loss(a), (q, k)),
        ("uniformity", lambda a, b: cg.uniformity(a), (q, k)),
        ("alignment", lambda a, b: cg.alignment(a, b), (q, k)),
        ("patch_nce", lambda a, b: cg.patch_nce(a[None], b[None]), (q, k)),
        ("InfoNCELoss", lambda a, b: cgnn.InfoNCELoss()(a, b), (q, k)),
        ("NTXentLoss", lambda a, b: cgnn.NTXentLoss()(torch.cat([a, b]), torch.arange(a.shape[0]).repeat(2)), (q, k)),
        ("DispersiveLoss", lambda a, b: cgnn.DispersiveLoss()(a), (q, k)),
    ]


@pytest.mark.parametrize("name,fn,args", _dynamic_calls(), ids=[c[0] for c in _dynamic_calls()])
def test_compile_fullgraph_dynamic_with_default_hyper_parameters(name, fn, args):
    """torch.compile(fullgraph=True, dynamic=True) with every float hyper-parameter left at its default (it failed
    on math.isfinite of a SymFloat)."""
    torch._dynamo.reset()
    want = fn(*args)
    got = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("call,name", [
    (lambda: cg.info_nce(x4(), x4(), symmetric="false"), "symmetric"),
    (lambda: cg.info_nce(x4(), x4(), symmetric=1), "symmetric"),
    (lambda: cg.info_nce(x4(), x4(), in_batch_negatives="yes"), "in_batch_negatives"),
    (lambda: cg.dispersive_loss(torch.randn(2, 4, 3), grouped="True"), "grouped"),
    (lambda: cg.patch_nce(torch.randn(1, 3, 2), torch.randn(1, 3, 2), detach_key="no"), "detach_key"),
    (lambda: cg.patch_nce(torch.randn(1, 3, 2), torch.randn(1, 3, 2), all_negatives_from_minibatch=0),
     "all_negatives_from_minibatch"),
    (lambda: cg.attention_nce(torch.rand(4, 4, 77), [[2]], softmax_normalize="False"), "softmax_normalize"),
])
def test_bool_flags_refuse_strings_and_ints(call, name):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        call()


@pytest.mark.parametrize("make,word", [(lambda: x4(4, 3).to_sparse(), "sparse"),
                                       (lambda: x4(4, 3).to_sparse_csr(), "sparse_csr"),
                                       (lambda: torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]),
                                        "nested")])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_sparse_and_nested_tensors_are_named(make, word):
    t = make()
    for call, arg in [(lambda: cg.clip_loss(t, x4(4, 3), 10.0), "image"), (lambda: cg.info_nce(x4(4, 3), t), "key"),
                      (lambda: cg.dispersive_loss(t), "z")]:
        with pytest.raises(TypeError, match=f"{arg} must be a dense.*{word}"):
            call()


# --------------------------------------------------------------------------- issue 9 item 2: float64
def _public_float64_cases():
    lab = torch.tensor([0, 1, 0, 1, 2, 2])
    return {
        "clip_loss": lambda a, b, s: cg.clip_loss(a, b, s, **_bk),
        "siglip_loss": lambda a, b, s: cg.siglip_loss(a, b, s, -s, **_bk),
        "info_nce_bank": lambda a, b, s: cg.info_nce(a, b[:3], temperature=s, negatives=b, labels=lab,
                                                     key_labels=lab[:3], positives="pml", **_bk),
        "info_nce_supcon": lambda a, b, s: cg.info_nce(a, temperature=s, labels=lab, positives="supcon",
                                                       reduction="none", **_bk),
        "nt_xent": lambda a, b, s: cg.nt_xent(a, b, temperature=s, **_bk),
        "dispersive_loss": lambda a, b, s: cg.dispersive_loss(a.reshape(3, 2, 3), tau=0.7, **_bk),
        "uniformity": lambda a, b, s: cg.uniformity(a, t=1.5, **_bk),
    }


_bk = {}


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("case", list(_public_float64_cases()))
def test_float64_gradcheck_on_every_backend(case, backend):
    """float64 inputs run the float64 reference on every backend: gradcheck at the public API passes."""
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cpp" and "cpp" not in _dispatch.available_backends("infonce"):
        pytest.skip("C++ extension not built")
    _bk.clear()
    _bk["backend"] = backend
    try:
        fn = _public_float64_cases()[case]
        g = torch.Generator().manual_seed(3)
        a = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
        b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
        s = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        assert fn(a, b, s).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, (a, b, s))
        big = (a.detach() * 1e25).requires_grad_()       # float32 would overflow to inf / nan here
        out = fn(big, b, s) if case in ("dispersive_loss", "uniformity", "nt_xent") else None
        if out is not None:
            assert torch.isfinite(out).all()
    finally:
        _bk.clear()


def test_float64_features_scaled_by_1e25_stay_finite():
    """Issue 9: clip_loss of features scaled by 1e25 gave nan on the fused backends (float32 overflow); the float64
    reference gives 1.1e52."""
    a, b = torch.randn(8, 4, dtype=torch.float64) * 1e25, torch.randn(8, 4, dtype=torch.float64)
    want = cg.clip_loss(a, b, 1.0, backend="torch")
    for backend in ("cpp", "triton"):
        torch.testing.assert_close(cg.clip_loss(a, b, 1.0, backend=backend), want)
