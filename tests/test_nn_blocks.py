"""Building blocks in contrastgen.nn: InfoNCELoss / NTXentLoss (pytorch-metric-learning defaults), SupConLoss
(HobbitLong/SupContrast semantics, checked against that code transcribed below in float64), MoCoQueue (FIFO order,
wrap-around, no-copy negatives) and MomentumEncoder (EMA update, MoCo v3 schedule)."""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastgen as cg
from contrastgen import nn as cnn
from contrastgen import reference as R

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- InfoNCE / NT-Xent
def test_infonce_and_ntxent_defaults_match_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb, ref = torch.randn(12, 7, dtype=F64) * 3, torch.randn(9, 7, dtype=F64)
    lab, rlab = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 1, 2, 3, 3, 0, 4, 2])
    for ours in (cnn.NTXentLoss(), cnn.InfoNCELoss()):
        assert ours.temperature == 0.07 == pml.NTXentLoss().temperature
    expect = pml.NTXentLoss()(emb, lab)
    assert torch.allclose(cnn.NTXentLoss(backend="torch")(emb, lab), expect, rtol=1e-10)
    assert torch.allclose(cnn.InfoNCELoss(backend="torch")(emb, labels=lab), expect, rtol=1e-10)
    expect_ref = pml.NTXentLoss()(emb, lab, ref_emb=ref, ref_labels=rlab)
    assert torch.allclose(cnn.NTXentLoss(backend="torch")(emb, lab, ref_emb=ref, ref_labels=rlab), expect_ref, rtol=1e-10)
    # float32 on the fused backends
    for backend in ("cpp", "triton"):
        got = cnn.NTXentLoss(backend=backend)(emb.float(), lab)
        assert abs(got.item() - expect.item()) < 1e-4 * max(1, abs(expect.item()))


def test_simclr_is_ntxent_with_two_views():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    got = cnn.NTXentLoss(0.5)(torch.cat([z1, z2]), torch.arange(6).repeat(2))
    assert torch.allclose(got, cg.nt_xent(z1, z2, temperature=0.5), atol=1e-6)
    assert torch.allclose(got, R.nt_xent_ref(z1, z2, 0.5), atol=1e-6)


def test_infonce_module_modes():
    q, k, bank, negs = torch.randn(5, 4), torch.randn(5, 4), torch.randn(8, 4), torch.randn(5, 3, 4)
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    m = cnn.InfoNCELoss(0.2)
    assert torch.allclose(m(q, k), R.info_nce_ref(n(q), n(k), temperature=0.2), atol=1e-6)
    assert torch.allclose(m(q, k, negatives=bank), R.info_nce_ref(n(q), n(k), temperature=0.2, negatives=n(bank)), atol=1e-6)
    assert torch.allclose(m(q, k, negatives=negs), R.info_nce_paired_ref(n(q), n(k), n(negs), temperature=0.2), atol=1e-6)
    dot = cnn.InfoNCELoss(0.2, similarity="dot", positives="supcon")
    lab = torch.tensor([0, 1, 0, 1, 2])
    assert torch.allclose(dot(q, labels=lab), R.info_nce_ref(q, labels=lab, positives="supcon", temperature=0.2), atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        cnn.NTXentLoss()(q)
    with pytest.raises(ValueError, match="ref_labels"):
        cnn.NTXentLoss()(q, lab, ref_emb=k)


# ----------------------------------------------------------------------------------------------- SupCon
def supcon_official(features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07):
    """HobbitLong/SupContrast losses.py SupConLoss.forward (current master, with the no-positive guard), transcribed."""
    bsz = features.shape[0]
    features = features.view(bsz, features.shape[1], -1)
    if labels is None and mask is None:
        mask = torch.eye(bsz, dtype=features.dtype)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    else:
        mask = mask.to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, bsz).mean()


def _features(bsz=8, views=2, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(bsz, views, d, generator=g, dtype=F64), dim=-1)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_supcon_matches_the_original_code(mode, backend):
    f = _features(bsz=8, views=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 3, 4])            # label 2 and 4: one sample each
    cases = [dict(labels=labels), dict(), dict(labels=torch.zeros(8, dtype=torch.long))]
    for kw in cases:
        ours = cnn.SupConLoss(0.1, contrast_mode=mode, base_temperature=0.07, backend=backend)
        dt = F64 if backend == "torch" else torch.float32
        x = f.to(dt).requires_grad_()
        x64 = f.clone().requires_grad_()
        got = ours(x, **kw)
        expect = supcon_official(x64, temperature=0.1, contrast_mode=mode, base_temperature=0.07, **kw)
        tol = 1e-10 if dt == F64 else 2e-5
        assert abs(got.item() - expect.item()) <= tol * max(1, abs(expect.item()))
        (g,) = torch.autograd.grad(got, x)
        (ge,) = torch.autograd.grad(expect, x64)
        assert (g.double() - ge).abs().max() <= tol * max(1, ge.abs().max().item())


@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_explicit_mask_matches_the_original_code(mode):
    f = _features(bsz=6, views=2)
    mask = torch.rand(6, 6, dtype=F64) * (torch.rand(6, 6, dtype=F64) > 0.4)      # asymmetric, weighted
    mask[2] = 0                                                                        # an anchor without positives
    x = f.clone().requires_grad_()
    x64 = f.clone().requires_grad_()
    got = cnn.SupConLoss(0.2, contrast_mode=mode)(x, mask=mask)
    expect = supcon_official(x64, mask=mask, temperature=0.2, contrast_mode=mode)
    assert torch.allclose(got, expect, rtol=1e-10)
    assert torch.allclose(torch.autograd.grad(got, x)[0], torch.autograd.grad(expect, x64)[0], rtol=1e-8, atol=1e-12)


def test_supcon_agrees_with_pml_where_their_conventions_meet():
    """PML's SupConLoss = ours on flattened, normalised views when T = base_T and every anchor has a positive."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    f = _features(bsz=8, views=2)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 3, 2])
    ours = cnn.SupConLoss(0.1, base_temperature=0.1, backend="torch")(f, labels)
    theirs = pml.SupConLoss(temperature=0.1)(torch.cat(torch.unbind(f, 1)), labels.repeat(2))
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_supcon_bad_input():
    f = _features()
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        cnn.SupConLoss()(f[:, 0])
    with pytest.raises(ValueError, match="not both"):
        cnn.SupConLoss()(f, torch.arange(8), mask=torch.eye(8))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        cnn.SupConLoss()(f, torch.arange(5))
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 8\)"):
        cnn.SupConLoss()(f, mask=torch.eye(4))
    with pytest.raises(ValueError, match="contrast_mode"):
        cnn.SupConLoss(contrast_mode="two")
    with pytest.raises(ValueError, match="temperature"):
        cnn.SupConLoss(temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        cnn.SupConLoss()(f, torch.arange(8).float())


def test_losses_compile_fullgraph():
    torch._dynamo.reset()
    f = _features(bsz=6, views=2).float().requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mods = [(cnn.SupConLoss(backend="cpp"), (f, labels)), (cnn.SupConLoss(contrast_mode="one", backend="triton"), (f, labels)),
            (cnn.NTXentLoss(backend="cpp"), (f[:, 0], labels)), (cnn.InfoNCELoss(backend="cpp"), (f[:, 0], f[:, 1]))]
    for m, args in mods:
        eager = m(*args)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(*args)
        assert torch.allclose(got, eager, atol=1e-6)
        assert torch.allclose(torch.autograd.grad(got, f)[0], torch.autograd.grad(eager, f)[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------- MoCoQueue
def test_queue_fifo_order_and_wrap_around():
    q = cnn.MoCoQueue(5, 2, init="empty")
    assert len(q) == 0 and q.keys.shape == (0, 2)
    batch = lambda a, n: torch.arange(a, a + n, dtype=torch.float32)[:, None].repeat(1, 2)  # noqa: E731
    q.enqueue(batch(0, 2))
    assert len(q) == 2 and q.keys[:, 0].tolist() == [0, 1]
    q.enqueue(batch(2, 2))
    q.enqueue(batch(4, 2))                                         # wraps: 5 overwrites 0
    assert len(q) == 5 and q.ptr == 1
    assert q.ordered()[0][:, 0].tolist() == [1, 2, 3, 4, 5]
    assert q.keys[:, 0].tolist() == [5, 1, 2, 3, 4]                # storage order
    q.enqueue(batch(6, 3))
    assert q.ordered()[0][:, 0].tolist() == [4, 5, 6, 7, 8]
    q.enqueue(batch(100, 7))                                       # larger than the queue: the newest 5 survive
    assert q.ordered()[0][:, 0].tolist() == [102, 103, 104, 105, 106]


def test_queue_labels_detach_and_no_copy():
    q = cnn.MoCoQueue(4, 3, labels=True, init="empty")
    k = torch.randn(3, 3, requires_grad=True)
    q.enqueue(k * 2, torch.tensor([7, 8, 9]))
    assert not q.keys.requires_grad and torch.equal(q.keys, (k * 2).detach())
    q.enqueue(torch.randn(2, 3), torch.tensor([1, 2]))
    keys, labels = q.ordered()
    assert labels.tolist() == [8, 9, 1, 2] and q.labels.tolist() == [2, 8, 9, 1]
    assert q.as_negatives().data_ptr() == q.bank.data_ptr()        # a view of the storage
    with pytest.raises(ValueError, match="needs them"):
        q.enqueue(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        q.enqueue(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        q.enqueue(torch.randn(2, 3), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="labels=True"):
        cnn.MoCoQueue(4, 3).enqueue(torch.randn(2, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="size"):
        cnn.MoCoQueue(0, 3)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_queue_as_negatives_in_info_nce(backend):
    queue = cnn.MoCoQueue(16, 8)                                   # MoCo's init: random unit vectors, full
    assert len(queue) == 16 and torch.allclose(queue.keys.norm(dim=1), torch.ones(16))
    q, k = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    got = cg.info_nce(q, k, negatives=queue, temperature=0.2, backend=backend)
    assert torch.allclose(got, R.info_nce_ref(q, k, negatives=queue.bank, temperature=0.2), atol=1e-5)
    queue.enqueue(k)
    lab = torch.tensor([0, 1, 0, 1])
    lq = cnn.MoCoQueue(6, 8, labels=True, init="empty")
    lq.enqueue(k, lab)
    got = cg.info_nce(q, lq.keys, labels=lab, key_labels=lq.labels, positives="supcon", backend=backend)
    assert torch.allclose(got, R.info_nce_ref(q, k, labels=lab, key_labels=lab, positives="supcon"), atol=1e-5)


def test_queue_state_dict_round_trip():
    a = cnn.MoCoQueue(4, 2, labels=True, init="empty")
    a.enqueue(torch.randn(3, 2), torch.tensor([1, 2, 3]))
    b = cnn.MoCoQueue(4, 2, labels=True)
    b.load_state_dict(a.state_dict())
    assert (b.ptr, b.count) == (3, 3) and torch.equal(b.keys, a.keys) and torch.equal(b.labels, a.labels)


# ----------------------------------------------------------------------------------------------- momentum encoder
def test_momentum_schedule():
    assert cnn.moco_momentum(0, 100) == pytest.approx(0.99)
    assert cnn.moco_momentum(100, 100) == pytest.approx(1.0)
    assert cnn.moco_momentum(50, 100) == pytest.approx(0.995)
    assert cnn.moco_momentum(25, 100, base=0.9) == pytest.approx(1 - 0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError):
        cnn.moco_momentum(1, 0)


def test_momentum_encoder_update():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = cnn.MomentumEncoder(net, momentum=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(8, 3))                                   # moves the BN statistics
    assert ema.update(net) == pytest.approx(0.9)
    for b, e, o in zip(before, ema.module.parameters(), net.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * o, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    out = ema(torch.randn(2, 3))
    assert not out.requires_grad
    sched = cnn.MomentumEncoder(net, momentum=0.99, total_steps=10)
    ms = [sched.update(net) for _ in range(11)]
    assert ms[0] == pytest.approx(0.99) and ms[-1] == pytest.approx(1.0) and ms == sorted(ms)
    with pytest.raises(ValueError, match="architecture"):
        ema.update(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="momentum"):
        cnn.MomentumEncoder(net, momentum=1.5)
