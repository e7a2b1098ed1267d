"""Fused Dispersive Loss / uniformity (cpp and Triton-interpreter backends) vs the float64 references."""
import math

import pytest
import torch

import contrastgen
from contrastgen.ops import available_backends
from contrastgen.ops import dispersive as D
from contrastgen.reference import dispersive_loss_ref, uniformity_ref

BACKENDS = available_backends("dispersive")
VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _kw(variant):
    return dict(variant=variant, tau=0.6, margin=3.0 if variant == "hinge" else 1.0)


@pytest.fixture
def force_tiled(monkeypatch):
    monkeypatch.setattr(D, "GRAM_PATH_MAX_B", 0)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(out, out_lowp_torch, ref64, rel_floor):
    """Kernel error vs float64 at most 2x PyTorch's own error at the input precision, plus a small floor."""
    floor = rel_floor * (ref64.abs().max().item() + 1e-3)
    err, torch_err = _err(out, ref64), _err(out_lowp_torch, ref64)
    assert err <= 2.0 * torch_err + floor, (err, torch_err, floor)


def _compare(backend, z0, variant, dtype, rel_floor, grouped=True):
    z = z0.to(dtype).requires_grad_()
    z64 = z0.to(dtype).double().requires_grad_()
    zt = z0.to(dtype).requires_grad_()
    kw = _kw(variant)
    out = contrastgen.dispersive_loss(z, grouped=grouped, backend=backend, **kw)
    ref = dispersive_loss_ref(z64, grouped=grouped, **kw)
    ref_t = dispersive_loss_ref(zt, grouped=grouped, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    _check(out, ref_t, ref, rel_floor)
    go = torch.randn(ref.shape, dtype=torch.float64)
    g, = torch.autograd.grad(out, z, go.to(dtype))
    g64, = torch.autograd.grad(ref, z64, go)
    gt, = torch.autograd.grad(ref_t, zt, go.to(dtype))
    assert g.dtype == dtype
    _check(g, gt, g64, rel_floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_path_matches_reference(backend, variant, dtype):
    # G = 2 groups, B = 9 (not a multiple of any tile), M = 301 (odd, >= 4 B: Gram path)
    assert D.choose_path(9, 301, variant) == "gram"
    _compare(backend, torch.randn(2, 9, 301) * 1.5, variant, dtype, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ("infonce_l2", "infonce_cosine", "hinge"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_path_matches_reference(backend, variant, dtype):
    # B = 70 samples (two 64-row tiles, ragged), M = 19 < 4 B: tiled path by shape
    assert D.choose_path(70, 19, variant) == "tiled"
    _compare(backend, torch.randn(2, 70, 19) * 0.4, variant, dtype, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ("infonce_l2", "hinge"))
def test_tiled_path_forced_on_gram_shapes(backend, variant, force_tiled):
    assert D.choose_path(9, 301, variant) == "tiled"
    _compare(backend, torch.randn(2, 9, 301), variant, torch.float32, 1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_cpp(backend, variant):
    _compare(backend, torch.randn(2, 7, 101), variant, torch.float16, 1e-4)


def test_path_switch_thresholds(monkeypatch):
    assert D.choose_path(32, 294_912, "infonce_l2") == "gram"        # SiT-XL/2
    assert D.choose_path(256, 294_912, "infonce_l2") == "gram"
    assert D.choose_path(4096, 64, "infonce_l2") == "tiled"          # uniformity-like
    assert D.choose_path(513, 10**6, "infonce_l2") == "tiled"        # too many samples for a B x B Gram
    assert D.choose_path(64, 255, "hinge") == "tiled" and D.choose_path(64, 256, "hinge") == "gram"
    assert D.choose_path(4096, 64, "covariance") == "gram"           # needs column statistics
    monkeypatch.setattr(D, "GRAM_PATH_MIN_RATIO", 1)
    assert D.choose_path(64, 64, "infonce_l2") == "gram"


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_boundary_both_paths_agree(backend):
    """At the switch (M = 4B vs M = 4B - 1) each side runs its own path; both match the reference, and the
    two paths give the same loss and gradient on the same input."""
    z = torch.randn(1, 8, 32, dtype=torch.float64)
    for m in (31, 32):
        assert D.choose_path(8, m, "infonce_l2") == ("gram" if m == 32 else "tiled")
        _compare(backend, torch.randn(2, 8, m), "infonce_l2", torch.float32, 1e-5)
    res = {}
    for path in ("gram", "tiled"):
        zz = z.clone().requires_grad_()
        loss, rows, w, scales, _ = torch.ops.contrastgen.dispersive_fwd(zz, "infonce_l2", 0.5, 1.0, backend, path, True)
        assert rows.shape == (1, 8)
        assert w.shape[0] == 1 and w.shape[2:] == (8, 8) and (w.shape[1] >= 1 if path == "gram" else w.shape[1] == 0)
        res[path] = (loss, torch.autograd.grad(loss.sum(), zz)[0])
    torch.testing.assert_close(res["gram"][0], res["tiled"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res["gram"][1], res["tiled"][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ("infonce_l2", "infonce_cosine", "hinge"))
@pytest.mark.parametrize("path", ("gram", "tiled"))
def test_single_sample(backend, variant, path, monkeypatch):
    if path == "tiled":
        monkeypatch.setattr(D, "GRAM_PATH_MAX_B", 0)
    z = torch.randn(1, 37, requires_grad=True)
    out = contrastgen.dispersive_loss(z, backend=backend, **_kw(variant))
    ref = dispersive_loss_ref(z.detach().double(), **_kw(variant))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g, = torch.autograd.grad(out, z)
    if variant == "infonce_l2":
        assert out.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_needs_two_samples(backend):
    with pytest.raises(ValueError, match="at least 2"):
        contrastgen.dispersive_loss(torch.randn(1, 8), variant="covariance", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_samples_ungrouped_4d(backend, variant):
    # B = 2, features (3, 5): flattened by the API to M = 15; scalar output.  Covariance at B = 2 is
    # ill-conditioned: the whole gradient is the eps-sized residual of the batch-norm projection of a
    # gradient ~B*M times larger (rounding of that larger term, times rstd), hence its looser floor.
    _compare(backend, torch.randn(2, 3, 5), variant, torch.float32, 1e-4 if variant == "covariance" else 1e-5,
             grouped=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniformity_matches_reference(backend, dtype):
    x0 = torch.randn(130, 33) * 0.3
    x = x0.to(dtype).requires_grad_()
    x64 = x0.to(dtype).double().requires_grad_()
    xt = x0.to(dtype).requires_grad_()
    out = contrastgen.uniformity(x, t=2.0, backend=backend)
    ref, ref_t = uniformity_ref(x64, t=2.0), uniformity_ref(xt, t=2.0)
    assert out.shape == () and out.dtype == dtype
    _check(out, ref_t, ref, 1e-5)
    go = torch.randn((), dtype=torch.float64)
    _check(torch.autograd.grad(out, x, go.to(dtype))[0], torch.autograd.grad(ref_t, xt, go.to(dtype))[0],
           torch.autograd.grad(ref, x64, go)[0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniformity_two_points_far_apart(backend):
    # all off-diagonal logits are very negative: the online max must keep the result finite
    x = torch.tensor([[0.0, 0.0], [6.0, 8.0]], requires_grad=True)
    out = contrastgen.uniformity(x, t=2.0, backend=backend)
    assert out.item() == pytest.approx(-200.0, rel=1e-6)
    g, = torch.autograd.grad(out, x)
    torch.testing.assert_close(g, torch.tensor([[24.0, 32.0], [-24.0, -32.0]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", ("gram", "tiled"))
def test_gradcheck_float64(backend, variant, path):
    if variant == "covariance" and path == "tiled":
        pytest.skip("covariance always runs the Gram path")
    torch.manual_seed(1)
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(z):
        zz = torch.nn.functional.normalize(z, dim=-1) if (variant == "infonce_cosine" and path == "tiled") else z
        return torch.ops.contrastgen.dispersive_fwd(zz, variant, 0.7, 2.0, backend, path, True)[0]

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_uniformity(backend):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.contrastgen.uniformity_fwd(x, 1.5, backend)[0], (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,path", [("infonce_l2", "gram"), ("covariance", "gram"), ("hinge", "tiled"),
                                          ("infonce_cosine", "gram")])
def test_opcheck_dispersive(backend, variant, path):
    z = torch.randn(2, 5, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.contrastgen.dispersive_fwd.default, (z, variant, 0.5, 1.0, backend, path, True))
    state = torch.ops.contrastgen.dispersive_fwd(z.detach(), variant, 0.5, 1.0, backend, path, True)
    torch.library.opcheck(torch.ops.contrastgen.dispersive_bwd.default,
                          (torch.randn(2), z.detach(), *state, variant, 0.5, 1.0, backend, path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_uniformity(backend):
    x = torch.randn(20, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.contrastgen.uniformity_fwd.default, (x, 2.0, backend))
    loss, rows = torch.ops.contrastgen.uniformity_fwd(x.detach(), 2.0, backend)
    torch.library.opcheck(torch.ops.contrastgen.uniformity_bwd.default, (torch.randn(()), x.detach(), rows, 2.0,
                                                                          backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(z, x):
        return (contrastgen.dispersive_loss(z, variant="infonce_l2", tau=0.5, grouped=True, backend=backend).sum()
                + contrastgen.uniformity(x, backend=backend))

    z = torch.randn(2, 6, 40, requires_grad=True)
    x = torch.randn(30, 8, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(z, x)
    ref = f(z, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, (z, x)), torch.autograd.grad(ref, (z, x)))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("deterministic", (True, False))
def test_triton_split_k_gram(deterministic):
    from contrastgen.kernels import dispersive as K
    z = torch.randn(2, 70, 333)
    ref = z.double() @ z.double().transpose(-1, -2)
    for splits in (1, 3):
        g = K.gram(z, splits=splits, deterministic=deterministic)
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g, g.transpose(-1, -2), rtol=0, atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("arch", (80, 90))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_tile_configs_in_interpreter(arch, dtype, monkeypatch):
    """The shipped GPU tile sizes of _CFG[arch] on small ragged shapes with several tiles / splits: Gram path
    B = 130 (two 128-row blocks: 3 upper tiles, 2 row blocks of dZ, 3 K splits), B = 40 (one 64-row tile),
    B = 300 (the B > 256 configs: W streamed in chunks, covariance with all 512 padded rows); tiled path with BLOCK_N = 32/64 and several output-column
    programs; uniformity."""
    from contrastgen.kernels import dispersive as K
    monkeypatch.setattr(K, "INTERPRET_WITH_GPU_CONFIGS", True)
    monkeypatch.setattr(K, "INTERPRET_ARCH", arch)
    monkeypatch.setattr(K, "_INTERPRET_SMS", 8)
    _compare("triton", torch.randn(1, 130, 600), "infonce_l2", dtype, 1e-5)
    _compare("triton", torch.randn(1, 40, 200), "covariance", dtype, 1e-5)
    _compare("triton", torch.randn(1, 300, 1200) * 0.5, "infonce_cosine", dtype, 1e-5)
    _compare("triton", torch.randn(1, 300, 1200), "covariance", dtype, 1e-5)
    _compare("triton", torch.randn(1, 70, 40) * 0.3, "hinge", dtype, 1e-5)       # tiled path
    _compare("triton", torch.randn(1, 70, 40), "infonce_cosine", dtype, 1e-5)
    x0 = torch.randn(70, 33) * 0.3
    x, x64, xt = x0.to(dtype).requires_grad_(), x0.to(dtype).double().requires_grad_(), x0.to(dtype).requires_grad_()
    out, ref, ref_t = contrastgen.uniformity(x, backend="triton"), uniformity_ref(x64), uniformity_ref(xt)
    _check(out, ref_t, ref, 1e-5)
    _check(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref_t, xt)[0], torch.autograd.grad(ref, x64)[0], 1e-5)


def test_cpp_and_triton_agree_on_grouped_input():
    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    z = torch.randn(3, 6, 50, dtype=torch.float64)
    outs = [contrastgen.dispersive_loss(z, variant="covariance", grouped=True, backend=b) for b in BACKENDS]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-9)
    # each group of a grouped call equals the ungrouped call on that group
    single = torch.stack([contrastgen.dispersive_loss(z[i], variant="covariance", backend=BACKENDS[0]) for i in range(3)])
    torch.testing.assert_close(outs[0], single, rtol=1e-12, atol=1e-9)
    assert math.isfinite(outs[0].sum().item())


# ------------------------------------------------------------------------------ issue 9: numerics and contracts
ALL = ["torch"] + BACKENDS


def _rel_grad_err(backend, z0, variant, tau, path=None, monkeypatch=None):
    if path == "tiled":
        monkeypatch.setattr(D, "GRAM_PATH_MAX_B", 0)
    z = z0.clone().requires_grad_()
    z64 = z0.double().requires_grad_()
    g, = torch.autograd.grad(contrastgen.dispersive_loss(z, variant=variant, tau=tau, backend=backend), z)
    g64, = torch.autograd.grad(dispersive_loss_ref(z64, variant=variant, tau=tau), z64)
    return ((g.double() - g64).abs().max() / g64.abs().max()).item()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("variant", ("infonce_l2", "infonce_cosine"))
@pytest.mark.parametrize("path", ("gram", "tiled"))
def test_float32_gradient_near_the_floor(backend, variant, path, monkeypatch):
    """Issue 9 item 3: z = 2 randn(8, 4, 16), tau = 0.5 sits at the floor log(1/B); differentiating the self-pairs
    through ||z_i||^2 + ||z_i||^2 - 2 z_i.z_i gave a 1.4e-2 relative gradient error in float32 (the official
    pdist formula: 6e-7).  The self-pairs are constants now."""
    if backend == "torch" and path == "tiled":
        pytest.skip("the reference has one path")
    torch.manual_seed(0)
    z0 = 2 * torch.randn(8, 4, 16)
    assert D.choose_path(8, 64, variant) == "gram"
    err = _rel_grad_err(backend, z0, variant, 0.5, path, monkeypatch)
    assert err < 2e-5, err


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", ("gram", "tiled"))
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_non_finite_input_gives_non_finite_loss_and_gradient(backend, variant, path, bad, monkeypatch):
    """Issue 9 item 1: where the float64 reference is non-finite, so is our loss, and no gradient entry of that
    group is finite (group 1 stays finite and matches the reference)."""
    if path == "tiled" and (variant == "covariance" or backend == "torch"):
        pytest.skip("no tiled path")
    if path == "tiled":
        monkeypatch.setattr(D, "GRAM_PATH_MAX_B", 0)
    torch.manual_seed(0)
    z0 = torch.randn(2, 6, 40)
    z0[0, 2, 7] = bad
    kw = _kw(variant)
    ref64 = dispersive_loss_ref(z0.double(), grouped=True, **kw)
    assert not math.isfinite(ref64[0].item()) and math.isfinite(ref64[1].item())
    z = z0.clone().requires_grad_()
    out = contrastgen.dispersive_loss(z, grouped=True, backend=backend, **kw)
    assert not math.isfinite(out[0].item()), out
    g, = torch.autograd.grad(out.sum(), z)
    if backend != "torch":           # the reference's own autograd leaves some entries finite
        assert not torch.isfinite(g[0]).any(), torch.isfinite(g[0]).sum()
    torch.testing.assert_close(out[1].double(), ref64[1], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g[1]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_non_finite_input_uniformity(backend, bad):
    x0 = torch.randn(70, 5) * 0.3
    x0[3, 1] = bad
    assert not math.isfinite(uniformity_ref(x0.double()).item())
    x = x0.clone().requires_grad_()
    out = contrastgen.uniformity(x, backend=backend)
    assert not math.isfinite(out.item())
    if backend != "torch":
        assert not torch.isfinite(torch.autograd.grad(out, x)[0]).any()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_uniformity_temperature_tensor_gets_its_gradient(backend, dtype):
    """Issue 9 item 8: a t that requires grad is differentiated (it was dropped on cpp and Triton)."""
    torch.manual_seed(0)
    x0 = torch.nn.functional.normalize(torch.randn(40, 6), dim=1).to(dtype)
    x, t = x0.clone().requires_grad_(), torch.tensor(2.0, dtype=dtype, requires_grad=True)
    out = contrastgen.uniformity(x, t=t, backend=backend)
    gx, gt = torch.autograd.grad(out, (x, t))
    x64, t64 = x0.double().requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref = uniformity_ref(x64, t=t64)
    gx64, gt64 = torch.autograd.grad(ref, (x64, t64))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gt.double(), gt64, **tol)
    torch.testing.assert_close(gx.double(), gx64, **tol)
    assert gt.item() < -0.1          # a real gradient, not a dropped one


def test_uniformity_and_dispersive_on_meta_tensors():
    """Issue 9 item 9: the reference (the meta / shape path) has no boolean indexing."""
    out = contrastgen.uniformity(torch.randn(5, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == ()
    for v in VARIANTS:
        out = contrastgen.dispersive_loss(torch.randn(2, 4, 8, device="meta"), variant=v, grouped=True)
        assert out.device.type == "meta" and out.shape == (2,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,words", [
    (("l1", "gram"), ["variant", "'l1'"]),
    (("infonce_l2", "dense"), ["path", "'dense'"]),
    (("covariance", "tiled"), ["covariance", "tiled"]),
])
def test_custom_ops_reject_unknown_variant_and_path(backend, args, words):
    """Issue 9 item 9: torch.ops.contrastgen.dispersive_fwd(variant="l1") returned the infonce_l2 value."""
    z = torch.randn(1, 4, 32)
    for call in (lambda: torch.ops.contrastgen.dispersive_fwd(z, args[0], 0.5, 1.0, backend, args[1], False),
                 lambda: torch.ops.contrastgen.dispersive_bwd(torch.ones(1), z, torch.ones(1), torch.ones(1, 4),
                                                              torch.ones(1, 0, 4, 4), torch.ones(1, 0),
                                                              torch.ones(1, 0, 0), args[0], 0.5, 1.0, backend, args[1])):
        with pytest.raises(ValueError) as e:
            call()
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    with pytest.raises(ValueError, match="backend"):
        torch.ops.contrastgen.dispersive_fwd(z, "infonce_l2", 0.5, 1.0, "cuda", "gram", False)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_int32_offset_guard():
    """Issue 9 item 9: offsets inside a group are int32; a group of >= 2**31 elements raises instead of wrapping
    (expanded views: no memory is allocated)."""
    from contrastgen.kernels import dispersive as K
    big = torch.zeros(1, 1, 16).expand(1, 2 ** 27, 16)           # 2**31 elements, stride(1) = 0
    with pytest.raises(ValueError, match="32-bit offsets"):
        K.gram_forward(big, "infonce_l2", 0.5, 1.0, 1e-5, False)
    with pytest.raises(ValueError, match="32-bit offsets"):
        K.pairs_fwd(big, 0, 1.0)
    wide = torch.zeros(1, 1, 1).expand(1, 4, 2 ** 29)
    with pytest.raises(ValueError, match="32-bit offsets"):
        K.gram_backward(torch.ones(1), wide, torch.zeros(1, 1, 4, 4), torch.ones(1, 5), torch.zeros(1, 0, 0),
                        "infonce_l2", 1e-5)
    K._check_int32("z", 2 ** 15, 2 ** 16 - 1)                     # just below: fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_call_builds_no_weight_matrix(backend):
    z = torch.randn(1, 8, 64)
    state = torch.ops.contrastgen.dispersive_fwd(z, "infonce_l2", 0.5, 1.0, backend, "gram", False)
    assert state[2].shape[1] == 0
    with_w = torch.ops.contrastgen.dispersive_fwd(z, "infonce_l2", 0.5, 1.0, backend, "gram", True)
    torch.testing.assert_close(state[0], with_w[0], rtol=0, atol=0)
    with torch.no_grad():
        contrastgen.dispersive_loss(z.requires_grad_(), backend=backend)    # need_w False under no_grad


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_fp16_weights_keep_their_range_at_large_m():
    """fp16 Z at a SiT-like M: W ~ 1 / (tau M S) would underflow fp16 without the per-row power-of-two scale."""
    torch.manual_seed(0)
    _compare("triton", torch.randn(1, 16, 65536) * 0.05, "infonce_l2", torch.float16, 1e-4)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("products", ("cpp", "blas"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpp_gram_products_both_ways(products, variant, monkeypatch):
    """The C++ launcher's two Gram-path products by its own loops and by the BLAS ("auto" picks per dtype)."""
    from contrastgen.ops import _cpp_dispersive as CPP
    monkeypatch.setattr(CPP, "PRODUCTS", products)
    for dtype in (torch.float32, torch.bfloat16):
        _compare("cpp", torch.randn(2, 9, 301) * 1.5, variant, dtype, 1e-5)
    z = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: torch.ops.contrastgen.dispersive_fwd(z, variant, 0.7, 2.0, "cpp", "gram", True)[0], (z,), eps=1e-6,
        atol=1e-6)
