"""contrastgen.methods.patchnce: CUT's patch sampler (id reuse, heads created once per layer, normalisation) and the
PatchNCE loss module (one fused call for every layer, equal to a per-layer loop written after CUT's code)."""
import pytest
import torch
import torch.nn.functional as F

from contrastgen import reference as ref
from contrastgen.methods.patchnce import PatchNCELoss, PatchSampler, init_weights, l2_normalize


def _feats(B=2, spec=((3, 10, 10), (8, 6, 6), (16, 3, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, c, h, w, generator=g) for c, h, w in spec]


def test_patch_ids_are_shared_by_the_batch_and_reused_for_the_queries():
    torch.manual_seed(0)
    s = PatchSampler(num_patches=20, use_mlp=False)
    fk = _feats()
    keys, ids = s(fk)
    assert [tuple(k.shape) for k in keys] == [(2, 20, 3), (2, 20, 8), (2, 9, 16)]   # min(num_patches, H W)
    assert [len(i) for i in ids] == [20, 20, 9]
    assert all(len(set(i.tolist())) == len(i) for i in ids)                           # distinct locations
    for f, k, i in zip(fk, keys, ids):                                                 # the same ids for every image
        flat = f.permute(0, 2, 3, 1).flatten(1, 2)
        assert torch.equal(k, l2_normalize(flat[:, i]))
    queries, ids2 = s([f * 2 + 1 for f in fk], ids)                                    # reused, not redrawn
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    keys2, _ = s(fk, ids)
    assert all(torch.equal(a, b) for a, b in zip(keys, keys2))
    _, ids3 = s(fk)
    assert any(not torch.equal(a, b) for a, b in zip(ids, ids3))                     # a fresh draw otherwise


def test_all_locations_when_num_patches_is_zero():
    s = PatchSampler(num_patches=0, use_mlp=False)
    out, ids = s(_feats())
    assert [o.shape[1] for o in out] == [100, 36, 9]
    assert torch.equal(ids[1], torch.arange(36))


def test_heads_are_created_once_per_layer_on_the_first_call():
    torch.manual_seed(0)
    s = PatchSampler(num_patches=8, use_mlp=True, nc=32)
    assert not s.heads_created and len(list(s.parameters())) == 0
    fk = _feats()
    out, ids = s(fk)
    assert s.heads_created and [o.shape[-1] for o in out] == [32, 32, 32]
    heads = [s.head(i) for i in range(3)]
    assert [h[0].in_features for h in heads] == [3, 8, 16]
    assert all(isinstance(h[1], torch.nn.ReLU) and h[2].in_features == h[2].out_features == 32 for h in heads)
    n_params = sum(p.numel() for p in s.parameters())
    assert n_params == sum(c * 32 + 32 + 32 * 32 + 32 for c in (3, 8, 16))
    s(fk, ids)
    s(_feats(seed=1))
    assert [s.head(i) for i in range(3)] == heads                                       # not recreated
    assert sum(p.numel() for p in s.parameters()) == n_params
    assert all(float(h[0].bias.detach().abs().max()) == 0 for h in heads)                        # CUT's init_net: biases 0
    with pytest.raises(ValueError, match="3 layers"):
        s(_feats()[:2])


def test_normalisation_is_cuts():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)
    assert torch.allclose(y[0], torch.tensor([3.0, 4.0]) / (5.0 + 1e-7))
    assert torch.equal(y[1], torch.zeros(2))                                            # no division by zero
    s = PatchSampler(num_patches=5, use_mlp=True, nc=16)
    fk = _feats()
    out, ids = s(fk)
    for i, (f, o) in enumerate(zip(fk, out)):
        h = s.head(i)(f.permute(0, 2, 3, 1).flatten(1, 2)[:, ids[i]])
        n = h.norm(dim=-1, keepdim=True)
        assert torch.allclose(o, h / (n + 1e-7), atol=1e-7)        # (the small heads give norms ~1e-3: 1e-7 shows)


@pytest.mark.parametrize("init_type", ["normal", "xavier", "kaiming", "orthogonal"])
def test_init_types(init_type):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Conv2d(4, 8, 3))
    init_weights(net, init_type, 0.02)
    w = net[0].weight.detach()
    assert float(net[0].bias.detach().abs().max()) == 0 and float(net[1].bias.detach().abs().max()) == 0
    if init_type == "normal":
        assert abs(float(w.std()) - 0.02) < 0.003
    if init_type == "orthogonal":
        assert torch.allclose(w @ w.T, 0.02 ** 2 * torch.eye(64), atol=1e-5)
    with pytest.raises(ValueError, match="init_type"):
        init_weights(net, "uniform")


def _cut_reference(feat_q, feat_k, sampler, temperature, weight):
    """CUT's calculate_NCE_loss written as its loop: one PatchNCELoss per layer, mean over layers."""
    keys, ids = sampler(feat_k)
    queries, _ = sampler(feat_q, ids)
    total = 0.0
    for q, k in zip(queries, keys):
        total = total + weight * ref.patch_nce_ref(q, k, temperature=temperature)
    return total / len(queries)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_loss_module_matches_cuts_loop_and_calls_the_fused_op_once(backend):
    from contrastgen.ops import backend_available
    if not backend_available(backend, "patch_nce")[0]:
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    nce = PatchNCELoss(layers=(0, 4, 8), weight=2.0, num_patches=16, nc=32, backend=backend)
    fq = [f.requires_grad_() for f in _feats(seed=1)]
    fk = [f.requires_grad_() for f in _feats(seed=2)]
    nce(fq, fk)                                                       # creates the heads (consumes random numbers)
    torch.manual_seed(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = nce(fq, fk)
    names = [e.name for e in prof.events()]
    assert names.count("contrastgen::patchnce_fwd") == 1
    grads = torch.autograd.grad(loss, fq + list(nce.sampler.parameters()))
    torch.manual_seed(5)
    expect = _cut_reference(fq, fk, nce.sampler, 0.07, 2.0)
    egrads = torch.autograd.grad(expect, fq + list(nce.sampler.parameters()))
    assert torch.allclose(loss, expect, atol=1e-5)
    for a, b in zip(grads, egrads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert fk[0].grad is None                                                           # keys detached
    per_layer = nce(fq, fk, per_layer=True)
    assert per_layer.shape == (3,)


def test_loss_module_checks_the_layer_count():
    nce = PatchNCELoss(layers=(0, 4))
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        nce(_feats(), _feats())


def test_sampler_checks_its_input():
    s = PatchSampler(num_patches=4, use_mlp=False)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(2, 3, 10\)"):
        s([torch.randn(2, 3, 10)])
    with pytest.raises(ValueError, match="non-empty"):
        s([])
    _, ids = s(_feats())
    with pytest.raises(ValueError, match="patch_ids holds 2 layers but feats holds 3"):
        s(_feats(), ids[:2])
    with pytest.raises(ValueError, match="init_type"):
        PatchSampler(init_type="uniform")
