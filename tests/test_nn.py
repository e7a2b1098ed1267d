"""nn modules: OpenCLIP drop-ins (constructor, forward, numbers), LogitScale, float32 under autocast, reprs."""
import inspect
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import contrastgen as cg
from contrastgen import nn as cnn
from contrastgen import reference as R

open_clip_loss = pytest.importorskip("open_clip.loss")
BACKENDS = [None, "torch", "cpp"]


def _features(n=37, d=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return img.requires_grad_(), txt.requires_grad_()


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts, retain_graph=True)


# ------------------------------------------------------------------------------------------- OpenCLIP drop-in
def test_signatures_match_open_clip():
    for ours, theirs in ((cnn.ClipLoss, open_clip_loss.ClipLoss), (cnn.SigLipLoss, open_clip_loss.SigLipLoss)):
        for fn in ("__init__", "forward"):
            p_ours = inspect.signature(getattr(ours, fn)).parameters
            p_theirs = inspect.signature(getattr(theirs, fn)).parameters
            shared = [k for k in p_theirs if k != "use_horovod"]
            assert list(p_ours)[:len(shared)] == shared, (ours, fn)
            for k in shared:
                assert p_ours[k].default == p_theirs[k].default, (ours, fn, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_training_loop_call_unchanged(backend):
    """open_clip_train/train.py: ``losses = loss(**model_out, output_dict=True)``, logit_scale exponentiated."""
    img, txt = _features()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    model_out = {"image_features": img, "text_features": txt, "logit_scale": log_scale.exp()}
    ours = cnn.ClipLoss(backend=backend)(**model_out, output_dict=True)
    theirs = open_clip_loss.ClipLoss()(**model_out, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    torch.testing.assert_close(total_ours, total_theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(total_ours, img, txt, log_scale), _grads(total_theirs, img, txt, log_scale)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_siglip_call_unchanged(backend):
    img, txt = _features(n=29)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    model_out = {"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": bias}
    ours = cnn.SigLipLoss(backend=backend)(**model_out, output_dict=True)["contrastive_loss"]
    theirs = open_clip_loss.SigLipLoss()(**model_out, output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, img, txt, scale, bias), _grads(theirs, img, txt, scale, bias)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clip_logit_bias_and_plain_return():
    img, txt = _features(n=9)
    m = cnn.ClipLoss(backend="torch")
    out = m(img, txt, 20.0, logit_bias=torch.tensor(-3.0))
    assert isinstance(out, torch.Tensor) and out.dim() == 0
    torch.testing.assert_close(out, open_clip_loss.ClipLoss()(img, txt, 20.0, logit_bias=torch.tensor(-3.0)))


def test_siglip_rejects_unknown_dist_impl():
    assert cnn.SigLipLoss().dist_impl == "bidir"
    with pytest.raises(ValueError, match="dist_impl"):
        cnn.SigLipLoss(dist_impl="ring")


def test_world_size_without_process_group_raises():
    img, txt = _features(n=4)
    with pytest.raises(ValueError, match="process group"):
        cnn.ClipLoss(rank=0, world_size=2)(img, txt, 10.0)


# ------------------------------------------------------------------------------------------- world_size > 1
def _has_distributed_functions():
    from contrastgen import distributed
    return all(callable(getattr(distributed, f, None)) for f in ("clip_loss", "siglip_loss"))


WORLD, NLOC, D = 2, 6, 8
DIST_CONFIGS = [("clip", False, True), ("clip", True, True), ("clip", False, False), ("siglip", None, None)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, img, txt, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        sl = slice(rank * NLOC, (rank + 1) * NLOC)
        for kind, local_loss, gather_with_grad in DIST_CONFIGS:
            i, t = img[sl].clone(), txt[sl].clone()
            if kind == "clip":
                m = cnn.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD,
                                 backend="torch")
                loss = m(i, t, torch.tensor(8.0, dtype=img.dtype))
            else:
                m = cnn.SigLipLoss(rank=rank, world_size=WORLD, backend="torch")
                loss = m(i, t, torch.tensor(8.0, dtype=img.dtype), torch.tensor(-4.0, dtype=img.dtype))
            out[(rank, kind, local_loss, gather_with_grad)] = loss.detach()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not _has_distributed_functions(),
                    reason="needs contrastgen.distributed.clip_loss and contrastgen.distributed.siglip_loss "
                           "(the distributed helper's functions; not in this branch yet)")
def test_world_size_2_matches_single_process():
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * NLOC, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(WORLD * NLOC, D, generator=g, dtype=torch.float64), dim=1)
    out = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(_free_port(), img, txt, out), nprocs=WORLD, join=True)
    want_clip = R.clip_loss_ref(img, txt, 8.0)
    want_sig = R.siglip_loss_ref(img, txt, 8.0, -4.0)
    for kind, local_loss, gwg in DIST_CONFIGS:
        losses = torch.stack([out[(r, kind, local_loss, gwg)] for r in range(WORLD)])
        torch.testing.assert_close(losses.mean(), want_clip if kind == "clip" else want_sig, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------- LogitScale
def test_logit_scale_init_clamp_and_gradient():
    ls = cnn.LogitScale()
    assert math.isclose(ls().item(), 1 / 0.07, rel_tol=1e-6)
    img, txt = _features(n=5)
    loss = cnn.ClipLoss(backend="torch")(img, txt, ls())
    loss.backward()
    assert ls.log_scale.grad is not None and ls.log_scale.grad.abs() > 0
    with torch.no_grad():
        ls.log_scale.fill_(10.0)
    assert math.isclose(ls().item(), 100.0, rel_tol=1e-6)           # clamped in place before use
    assert math.isclose(ls.log_scale.item(), math.log(100.0), rel_tol=1e-6)
    with torch.no_grad():
        ls.log_scale.fill_(-1.0)
    ls.clamp_()
    assert ls.log_scale.item() == 0.0                                 # [0, ln 100], as OpenCLIP clamps
    manual = cnn.LogitScale(clamp_in_forward=False)
    with torch.no_grad():
        manual.log_scale.fill_(10.0)
    assert math.isclose(manual().item(), math.exp(10.0), rel_tol=1e-6)


def test_logit_scale_siglip_pair():
    ls = cnn.LogitScale.siglip()
    scale, bias = ls()
    assert math.isclose(scale.item(), 10.0, rel_tol=1e-6) and bias.item() == -10.0
    img, txt = _features(n=6)
    cnn.SigLipLoss(backend="torch")(img, txt, *ls()).backward()
    assert ls.bias.grad is not None and ls.log_scale.grad is not None
    with pytest.raises(ValueError):
        cnn.LogitScale(200.0)


# ------------------------------------------------------------------------------------------- autocast, reprs
def _module_calls():
    img, txt = _features(n=40, d=16)
    z = torch.randn(8, 3, 5, requires_grad=True)
    p = F.normalize(torch.randn(2, 12, 8), dim=-1).requires_grad_()
    maps = torch.softmax(torch.randn(6, 6, 77), -1).requires_grad_()
    return [
        ("ClipLoss", lambda b: cnn.ClipLoss(backend=b)(img, txt, torch.tensor(14.0))),
        ("SigLipLoss", lambda b: cnn.SigLipLoss(backend=b)(img, txt, torch.tensor(10.0), torch.tensor(-10.0))),
        ("DispersiveLoss", lambda b: cnn.DispersiveLoss(backend=b)(z)),
        ("UniformityLoss", lambda b: cnn.UniformityLoss(backend=b)(img)),
        ("PatchNCELoss", lambda b: cnn.PatchNCELoss(backend=b if b != "cpp" else None)(p, p.flip(1))),
        ("AttentionNCELoss", lambda b: cnn.AttentionNCELoss([[2, 3], [5]], backend=b if b != "cpp" else None)(maps)),
    ]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float32_loss_under_cpu_bf16_autocast(backend):
    for name, call in _module_calls():
        want = call(backend)
        assert want.dtype == torch.float32, name
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(backend)
        assert got.dtype == torch.float32, (name, backend, got.dtype)
        # the loss runs on float32 features with autocast off: the same number as without autocast
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_features_under_autocast_give_float32_loss_with_gradients():
    img, txt = _features(n=33, d=16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cnn.ClipLoss(backend="cpp")(img, txt, torch.tensor(14.0))
    assert loss.dtype == torch.float32
    gi, gt = _grads(loss, img, txt)
    assert gi.dtype == torch.bfloat16 and torch.isfinite(gi.float()).all()


NOT_LOSS_MODULES = {"moco_momentum"}   # a schedule function, not a module


def test_every_module_has_docstring_and_hyperparameters_in_repr():
    reprs = {"ClipLoss": (cnn.ClipLoss(local_loss=True), ["local_loss=True", "world_size=1"]),
             "SigLipLoss": (cnn.SigLipLoss(dist_impl="shift"), ["dist_impl='shift'"]),
             "LogitScale": (cnn.LogitScale(), ["scale=14.2857", "max_scale=100.0"]),
             "DispersiveLoss": (cnn.DispersiveLoss(tau=0.25), ["variant='infonce_l2'", "tau=0.25"]),
             "UniformityLoss": (cnn.UniformityLoss(t=3.0), ["t=3.0"]),
             "PatchNCELoss": (cnn.PatchNCELoss(temperature=0.1), ["temperature=0.1", "detach_key=True"]),
             "AttentionNCELoss": (cnn.AttentionNCELoss([[2]]), ["token_groups=[[2]]", "temperature=0.5"]),
             "InfoNCELoss": (cnn.InfoNCELoss(), ["temperature=0.07", "similarity='cosine'"]),
             "NTXentLoss": (cnn.NTXentLoss(), ["temperature=0.07", "similarity='cosine'"]),
             "SupConLoss": (cnn.SupConLoss(), ["temperature=0.07", "contrast_mode='all'", "base_temperature=0.07"]),
             "MoCoQueue": (cnn.MoCoQueue(8, 4), ["size=8", "dim=4"]),
             "MomentumEncoder": (cnn.MomentumEncoder(torch.nn.Linear(2, 2)), ["Linear"])}
    assert set(reprs) | NOT_LOSS_MODULES == set(cnn.__all__)
    for name, (module, parts) in reprs.items():
        doc = type(module).__doc__ or ""
        assert len(doc.strip()) > 40, name
        for part in parts:
            assert part in repr(module), (name, repr(module))


def test_modules_match_functional():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(cnn.SigLipLoss(backend="torch")(q, k, 10.0, -10.0), R.siglip_loss_ref(q, k, 10.0, -10.0))
    torch.testing.assert_close(cnn.NTXentLoss(0.2, backend="torch")(torch.cat([q, k]), torch.arange(6).repeat(2)),
                               R.nt_xent_ref(q, k, 0.2))
    torch.testing.assert_close(cnn.InfoNCELoss(0.1, similarity="dot", backend="torch")(q, k),
                               R.info_nce_ref(q, k, temperature=0.1))
    torch.testing.assert_close(cnn.DispersiveLoss(tau=1.0, backend="torch")(q), R.dispersive_loss_ref(q, tau=1.0))
    torch.testing.assert_close(cnn.UniformityLoss(backend="torch")(q), R.uniformity_ref(q))
    p = torch.randn(2, 5, 3)
    torch.testing.assert_close(cnn.PatchNCELoss()(p, p.flip(1)), R.patch_nce_ref(p, p.flip(1)))
    maps = torch.rand(4, 4, 77)
    torch.testing.assert_close(cnn.AttentionNCELoss([[2, 3], [5]])(maps), cg.attention_nce(maps, [[2, 3], [5]]))
