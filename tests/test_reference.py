"""The references against independent formulations: OpenCLIP, pytorch-metric-learning, the
official Dispersive Loss port's formula, explicit loops, and small cases worked by hand.
All in float64 at 1e-6 (losses and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrastgen import reference as R

TOL = dict(rtol=1e-6, atol=1e-6)
D64 = torch.float64


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def _assert_same(fn_a, fn_b, *xs):
    la, ga = _grads(fn_a, *xs)
    lb, gb = _grads(fn_b, *xs)
    torch.testing.assert_close(la, lb, **TOL)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------- CLIP / SigLIP vs OpenCLIP
@pytest.mark.parametrize("n,d", [(1, 3), (7, 5), (33, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_openclip(n, d, with_bias):
    from open_clip.loss import ClipLoss
    img, txt = F.normalize(torch.randn(n, d, dtype=D64), dim=1), F.normalize(torch.randn(n, d, dtype=D64), dim=1)
    scale, bias = torch.tensor(14.3, dtype=D64), torch.tensor(-2.0, dtype=D64)
    oc = ClipLoss()
    if with_bias:
        _assert_same(lambda a, b, s, c: oc(a, b, s, c), lambda a, b, s, c: R.clip_loss_ref(a, b, s, c), img, txt, scale, bias)
    else:
        _assert_same(lambda a, b, s: oc(a, b, s), lambda a, b, s: R.clip_loss_ref(a, b, s), img, txt, scale)


@pytest.mark.parametrize("n,d", [(1, 3), (8, 5), (33, 16)])
def test_siglip_matches_openclip(n, d):
    from open_clip.loss import SigLipLoss
    img, txt = F.normalize(torch.randn(n, d, dtype=D64), dim=1), F.normalize(torch.randn(n, d, dtype=D64), dim=1)
    scale, bias = torch.tensor(10.0, dtype=D64), torch.tensor(-10.0, dtype=D64)
    oc = SigLipLoss()
    _assert_same(lambda *a: oc(*a), R.siglip_loss_ref, img, txt, scale, bias)


# ----------------------------------------------------------------------------- NT-Xent / InfoNCE vs PML
@pytest.mark.parametrize("n,d,tau", [(1, 4, 0.5), (6, 3, 0.5), (17, 8, 0.1)])
def test_nt_xent_matches_pml(n, d, tau):
    from pytorch_metric_learning.losses import NTXentLoss
    pml = NTXentLoss(temperature=tau)
    labels = torch.arange(n).repeat(2)
    _assert_same(lambda a, b: pml(torch.cat([a, b]), labels), lambda a, b: R.nt_xent_ref(a, b, tau),
                 torch.randn(n, d, dtype=D64), torch.randn(n, d, dtype=D64))


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2, 2, 3], [0] * 6, list(range(5)), [0, 1, 1, 2, 2, 2, 5, 0, 9]])
def test_info_nce_pml_matches_pml_ntxent(labels):
    from pytorch_metric_learning.losses import NTXentLoss
    labels = torch.tensor(labels)
    x = F.normalize(torch.randn(len(labels), 6, dtype=D64), dim=1)
    pml = NTXentLoss(temperature=0.5)
    _assert_same(lambda e: pml(e, labels),
                 lambda e: R.info_nce_ref(F.normalize(e, dim=1), None, temperature=0.5, labels=labels, positives="pml"), x)


# (All-same labels are left out: PML returns 0 when a batch has no negative pair at all, while
# SupCon's formula gives lse - mean over the positives; test_info_nce_by_hand covers that case.)
@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2, 2, 3], [0, 0, 0, 0, 0, 1], [0, 1, 1, 2, 2, 2, 5, 0, 9]])
def test_info_nce_supcon_matches_pml_supcon(labels):
    from pytorch_metric_learning.losses import SupConLoss
    labels = torch.tensor(labels)
    x = F.normalize(torch.randn(len(labels), 6, dtype=D64), dim=1)
    pml = SupConLoss(temperature=0.1)
    _assert_same(lambda e: pml(e, labels),
                 lambda e: R.info_nce_ref(F.normalize(e, dim=1), None, temperature=0.1, labels=labels, positives="supcon"), x)


def test_info_nce_pml_no_positive_pairs_is_zero():
    x = torch.randn(4, 3, dtype=D64, requires_grad=True)
    loss = R.info_nce_ref(x, None, temperature=0.5, labels=torch.arange(4), positives="pml")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_info_nce_diagonal_is_cross_entropy_and_symmetric_is_clip():
    q, k = torch.randn(9, 5, dtype=D64), torch.randn(9, 5, dtype=D64)
    tau = 0.2
    _assert_same(lambda a, b: F.cross_entropy(a @ b.T / tau, torch.arange(9)),
                 lambda a, b: R.info_nce_ref(a, b, temperature=tau), q, k)
    _assert_same(lambda a, b: R.clip_loss_ref(a, b, 1 / tau),
                 lambda a, b: R.info_nce_ref(a, b, temperature=tau, symmetric=True), q, k)
    none = R.info_nce_ref(q, k, temperature=tau, reduction="none")
    torch.testing.assert_close(none, F.cross_entropy(q @ k.T / tau, torch.arange(9), reduction="none"), **TOL)
    torch.testing.assert_close(R.info_nce_ref(q, k, temperature=tau, reduction="sum"), none.sum(), **TOL)


def test_info_nce_bank_is_moco():
    """MoCo: logits [q.k+, q.queue] / tau, cross-entropy with target 0; in-batch keys are not negatives."""
    q, k, queue = (F.normalize(torch.randn(n, 8, dtype=D64), dim=1) for n in (6, 6, 11))
    tau = 0.07

    def moco(q, k, queue):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tau
        return F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))

    _assert_same(moco, lambda q, k, b: R.info_nce_ref(q, k, temperature=tau, negatives=b), q, k, queue)

    def moco_inbatch(q, k, queue):
        logits = torch.cat([q @ k.T, q @ queue.T], 1) / tau
        return F.cross_entropy(logits, torch.arange(6))

    _assert_same(moco_inbatch, lambda q, k, b: R.info_nce_ref(q, k, temperature=tau, negatives=b, in_batch_negatives=True),
                 q, k, queue)


def test_info_nce_by_hand():
    """N = 2, D = 1: q = [1, 2], k = [1, -1], tau = 1: s = [[1, -1], [2, -2]]."""
    q = torch.tensor([[1.0], [2.0]], dtype=D64)
    k = torch.tensor([[1.0], [-1.0]], dtype=D64)
    l0 = math.log(math.e + math.exp(-1)) - 1
    l1 = math.log(math.exp(2) + math.exp(-2)) + 2
    assert R.info_nce_ref(q, k, temperature=1.0).item() == pytest.approx((l0 + l1) / 2, abs=1e-12)
    # pml with labels [0, 0] over the keys {k}: each anchor's positive pair has no negatives -> 0
    lab = torch.tensor([0, 0])
    assert R.info_nce_ref(q, k, temperature=1.0, labels=lab, positives="pml").item() == pytest.approx(0.0, abs=1e-12)
    # supcon, all same labels: l_i = lse_j s_ij - mean_j s_ij
    want = ((math.log(math.e + math.exp(-1)) - 0.0) + (math.log(math.exp(2) + math.exp(-2)) - 0.0)) / 2
    assert R.info_nce_ref(q, k, temperature=1.0, labels=lab, positives="supcon").item() == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------- the kernel contract
CORE_CASES = [
    # (name, kwargs of info_nce_ref, key is None, labels kind)
    ("diag", dict(positives="diagonal"), False, None),
    ("diag_sym", dict(positives="diagonal", symmetric=True), False, None),
    ("supcon_self", dict(positives="supcon"), True, "few"),
    ("supcon_sym", dict(positives="supcon", symmetric=True), False, "few"),
    ("pml_self", dict(positives="pml"), True, "few"),
    ("pml_self_unique", dict(positives="pml"), True, "unique"),
    ("pml_key", dict(positives="pml"), False, "same"),
    ("bank", dict(positives="diagonal", negatives="bank"), False, None),
    ("bank_inbatch", dict(positives="diagonal", negatives="bank", in_batch_negatives=True), False, None),
    ("supcon_bank", dict(positives="supcon", negatives="bank"), False, "few"),
    ("pml_bank", dict(positives="pml", negatives="bank", in_batch_negatives=True), False, "few"),
]


def _labels(kind, n):
    return {"few": torch.randint(0, 3, (n,)), "unique": torch.arange(n), "same": torch.zeros(n, dtype=torch.long),
            None: None}[kind]


@pytest.mark.parametrize("name,kw,self_mode,lab", CORE_CASES, ids=[c[0] for c in CORE_CASES])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_core_ref_matches_public_ref(name, kw, self_mode, lab, n):
    """contrastgen/reference/core.py (forward and the hand-written backward) against autograd of info_nce_ref."""
    kw = dict(kw)
    d, tau = 5, 0.3
    q = torch.randn(n, d, dtype=D64)
    k = None if self_mode else torch.randn(n, d, dtype=D64)
    bank = torch.randn(4, d, dtype=D64) if kw.pop("negatives", None) else None
    labels = _labels(lab, n)
    pml, sym = kw["positives"] == "pml", kw.get("symmetric", False)
    ibn = kw.get("in_batch_negatives", bank is None)
    g_row = torch.randn(n, dtype=D64)
    temp = torch.tensor(tau, dtype=D64, requires_grad=True)
    xs = [t.clone().requires_grad_(True) for t in (q, k, bank) if t is not None]
    it = iter(xs)
    qq = next(it)
    kk = None if self_mode else next(it)
    bb = next(it) if bank is not None else None
    per_anchor = R.info_nce_ref(qq, kk, temperature=temp, labels=labels, negatives=bb, reduction="none", **kw)
    (per_anchor * g_row).sum().backward()

    scale = torch.tensor(1 / tau, dtype=D64)
    kc = q if self_mode else k
    row, col, rs, cs = R.infonce_core_fwd_ref(q, kc, bank, scale, labels, labels, self_mode, ibn, pml, sym)
    got = 0.5 * (row + col) if sym else row
    torch.testing.assert_close(got.double(), per_anchor.detach(), rtol=1e-5, atol=1e-5)
    g_col = g_row * 0.5 if sym else torch.zeros(0, dtype=D64)
    dq, dk, db, dscale = R.infonce_core_bwd_ref(q, kc, bank, scale, labels, labels, self_mode, ibn, pml, sym, rs, cs,
                                                g_row * 0.5 if sym else g_row, g_col)
    if self_mode:
        dq = dq + dk
    torch.testing.assert_close(dq, qq.grad, rtol=1e-5, atol=1e-5)
    if not self_mode:
        torch.testing.assert_close(dk, kk.grad, rtol=1e-5, atol=1e-5)
    if bank is not None:
        torch.testing.assert_close(db, bb.grad, rtol=1e-5, atol=1e-5)
    # d/dtau = d/dscale * dscale/dtau = dscale * (-1/tau^2)
    torch.testing.assert_close(dscale.double() * (-1 / tau**2), temp.grad, rtol=1e-4, atol=1e-5)


def test_core_siglip_ref_matches_public_ref():
    q, k = torch.randn(7, 5, dtype=D64), torch.randn(7, 5, dtype=D64)
    s, b = torch.tensor(3.0, dtype=D64), torch.tensor(-2.0, dtype=D64)
    xs = [t.clone().requires_grad_(True) for t in (q, k, s, b)]
    R.siglip_loss_ref(*xs).backward()
    row = R.siglip_core_fwd_ref(q, k, s, b)
    torch.testing.assert_close(row.sum().double() / 7, R.siglip_loss_ref(q, k, s, b), rtol=1e-6, atol=1e-6)
    grads = R.siglip_core_bwd_ref(q, k, s, b, torch.full((7,), 1 / 7, dtype=D64))
    for g, x in zip(grads, xs):
        torch.testing.assert_close(g.double(), x.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- dispersive family
def _official_disp_l2(z, tau):
    """The official PyTorch port's formula (pdist, both triangles plus a zero diagonal), with tau."""
    z = z.reshape(z.shape[0], -1)
    diff = F.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat([diff, diff, torch.zeros(z.shape[0], dtype=z.dtype)])
    return torch.log(torch.exp(-diff / tau).mean())


@pytest.mark.parametrize("b", [2, 5, 16])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_dispersive_l2_matches_official_formula(b, tau):
    z = torch.randn(b, 3, 4, 5, dtype=D64)
    _assert_same(lambda z: _official_disp_l2(z, tau), lambda z: R.dispersive_loss_ref(z, tau=tau), z)


def test_dispersive_other_variants_by_loops():
    b, m, tau, eps_margin = 5, 7, 0.5, 1.3
    z = torch.randn(b, m, dtype=D64)
    cos = torch.tensor([[F.cosine_similarity(z[i], z[j], dim=0) for j in range(b)] for i in range(b)])
    want = torch.log(torch.exp(cos / tau).mean())
    torch.testing.assert_close(R.dispersive_loss_ref(z, variant="infonce_cosine", tau=tau), want, **TOL)
    d = torch.tensor([[((z[i] - z[j]) ** 2).sum() / m for j in range(b)] for i in range(b)])
    want = (torch.clamp(eps_margin - d, min=0) ** 2).mean()
    torch.testing.assert_close(R.dispersive_loss_ref(z, variant="hinge", margin=eps_margin), want, **TOL)
    zn = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    c = zn.T @ zn / b                                   # the M x M covariance, explicitly
    want = (c**2).sum() - (c.diagonal() ** 2).sum()
    _assert_same(lambda z: R.dispersive_loss_ref(z, variant="covariance"),
                 lambda z: ((((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)).T
                             @ ((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)) / b) ** 2
                            * (1 - torch.eye(m, dtype=D64))).sum(), z)
    torch.testing.assert_close(R.dispersive_loss_ref(z, variant="covariance"), want, **TOL)


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge", "covariance"])
def test_dispersive_grouped_is_stacked(variant):
    z = torch.randn(3, 4, 2, 5, dtype=D64)
    got = R.dispersive_loss_ref(z, variant=variant, grouped=True)
    want = torch.stack([R.dispersive_loss_ref(z[g], variant=variant) for g in range(3)])
    torch.testing.assert_close(got, want, **TOL)


def test_dispersive_l2_gradient_formula():
    """METHODS.md: dL/dz_i = -(4 / (tau M S)) sum_j e_ij (z_i - z_j)."""
    b, m, tau = 6, 9, 0.5
    z = torch.randn(b, m, dtype=D64, requires_grad=True)
    R.dispersive_loss_ref(z, tau=tau).backward()
    with torch.no_grad():
        d = torch.cdist(z, z).pow(2) / m
        e = torch.exp(-d / tau)
        want = -(4 / (tau * m * e.sum())) * (e.sum(1, keepdim=True) * z - e @ z)
    torch.testing.assert_close(z.grad, want, **TOL)


@pytest.mark.parametrize("n", [2, 3, 20])
def test_uniformity_matches_wang_isola(n):
    x = F.normalize(torch.randn(n, 4, dtype=D64), dim=1)
    _assert_same(lambda x: torch.pdist(x, p=2).pow(2).mul(-2.0).exp().mean().log(), lambda x: R.uniformity_ref(x), x)


def test_alignment_matches_wang_isola():
    x, y = torch.randn(6, 4, dtype=D64), torch.randn(6, 4, dtype=D64)
    _assert_same(lambda x, y: (x - y).norm(p=2, dim=1).pow(2).mean(), lambda x, y: R.alignment_ref(x, y), x, y)


# ----------------------------------------------------------------------------- PatchNCE
def _patch_nce_loop(q, k, tau, all_neg):
    """CUT's PatchNCE written per patch: logits [q_i.k_i, q_i.k_j (j != i), -10 at j == i] / tau."""
    b, p, c = q.shape
    groups = [(q.reshape(-1, c), k.reshape(-1, c))] if all_neg else [(q[i], k[i]) for i in range(b)]
    losses = []
    for qg, kg in groups:
        for i in range(qg.shape[0]):
            neg = torch.stack([qg[i] @ kg[j] if j != i else torch.tensor(-10.0, dtype=q.dtype) for j in range(qg.shape[0])])
            logits = torch.cat([(qg[i] @ kg[i]).reshape(1), neg]) / tau
            losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("all_neg", [False, True])
def test_patch_nce_matches_loop(all_neg):
    q = F.normalize(torch.randn(2, 5, 4, dtype=D64), dim=-1)
    k = F.normalize(torch.randn(2, 5, 4, dtype=D64), dim=-1)
    _assert_same(lambda q, k: _patch_nce_loop(q, k, 0.07, all_neg),
                 lambda q, k: R.patch_nce_ref(q, k, all_negatives_from_minibatch=all_neg, detach_key=False), q, k)
    layers_q = [q, F.normalize(torch.randn(2, 3, 6, dtype=D64), dim=-1)]
    layers_k = [k, F.normalize(torch.randn(2, 3, 6, dtype=D64), dim=-1)]
    want = (_patch_nce_loop(layers_q[0], layers_k[0], 0.07, all_neg) + _patch_nce_loop(layers_q[1], layers_k[1], 0.07, all_neg)) / 2
    torch.testing.assert_close(R.patch_nce_ref(layers_q, layers_k, all_negatives_from_minibatch=all_neg), want, **TOL)


def test_patch_nce_detaches_key_by_default():
    q = torch.randn(1, 4, 3, dtype=D64, requires_grad=True)
    k = torch.randn(1, 4, 3, dtype=D64, requires_grad=True)
    R.patch_nce_ref(q, k).backward()
    assert k.grad is None and q.grad is not None


# ----------------------------------------------------------------------------- CONFORM
def test_conform_smoothing_kernel_values():
    k = R.smoothing_kernel("conform", dtype=D64)
    w = k.sum(0)
    torch.testing.assert_close(w, torch.tensor([0.2119, 0.5761, 0.2119], dtype=D64), atol=1e-4, rtol=0)
    assert k.sum().item() == pytest.approx(1.0)
    g = R.smoothing_kernel("gaussian", dtype=D64).sum(0)
    torch.testing.assert_close(g, torch.tensor([0.1065, 0.7870, 0.1065], dtype=D64), atol=1e-4, rtol=0)


def _conform_embeddings(maps, groups, smoothing_kind, softmax):
    a = maps[:, :, 1:-1]
    if softmax:
        a = torch.softmax(a * 100, dim=-1)
    kern = R.smoothing_kernel(smoothing_kind, dtype=maps.dtype)
    embs, labels = [], []
    for gi, g in enumerate(groups):
        for t in g:
            m = a[:, :, t - 1]
            if kern is not None:
                p = F.pad(m[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
                m = torch.stack([torch.stack([(p[i:i + 3, j:j + 3] * kern).sum() for j in range(m.shape[1])])
                                 for i in range(m.shape[0])])
            embs.append(m.flatten())
            labels.append(gi)
    return torch.stack(embs), torch.tensor(labels)


@pytest.mark.parametrize("softmax,smoothing", [(False, "conform"), (True, "conform"), (False, None), (False, "gaussian")])
def test_attention_nce_matches_pml(softmax, smoothing):
    from pytorch_metric_learning.losses import NTXentLoss
    groups = [[2, 3], [6, 7], [9]]
    maps, prev = torch.rand(6, 6, 77, dtype=D64), torch.rand(6, 6, 77, dtype=D64)

    def official(maps):
        e, lab = _conform_embeddings(maps, groups, smoothing, softmax)
        ep, _ = _conform_embeddings(prev, groups, smoothing, softmax)
        return NTXentLoss(temperature=0.5)(torch.cat([e, ep]), torch.cat([lab, lab]))

    _assert_same(official, lambda m: R.attention_nce_ref(m, groups, prev_maps=prev, softmax_normalize=softmax,
                                                         smoothing=smoothing), maps)


def test_attention_nce_contrastive_matches_pml():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss
    groups = [[1, 2], [4, 5, 6]]
    maps = torch.rand(5, 5, 77, dtype=D64)
    pml = ContrastiveLoss(pos_margin=1, neg_margin=0, distance=CosineSimilarity())
    _assert_same(lambda m: pml(*_conform_embeddings(m, groups, "conform", False)),
                 lambda m: R.attention_nce_ref(m, groups, loss="contrastive"), maps)


def test_attention_nce_batched_and_prev_detached():
    maps = torch.rand(2, 4, 4, 77, dtype=D64)
    prev = torch.rand(2, 4, 4, 77, dtype=D64, requires_grad=True)
    out = R.attention_nce_ref(maps, [[2], [3]], prev_maps=prev)
    assert out.shape == (2,)
    torch.testing.assert_close(out[1], R.attention_nce_ref(maps[1], [[2], [3]], prev_maps=prev[1]))
    assert not out.requires_grad
