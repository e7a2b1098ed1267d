"""TULIP's objective and the unCLIP pieces (towers, CLIP loss, diffusion prior) against their reference math."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrastgen import reference as R
from contrastgen.methods.tulip import TulipLoss
from contrastgen.methods.unclip import CLIP, DiffusionPrior, TextTransformer, retrieval_accuracy, vit_image_tower

n_ = lambda x: F.normalize(x, dim=-1)  # noqa: E731


# ----------------------------------------------------------------------------------------------- TULIP
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("view_loss", ["siglip", "infonce"])
def test_tulip_terms_match_reference(backend, view_loss):
    g = torch.Generator().manual_seed(0)
    img, txt, iv, tv = (torch.randn(9, 12, generator=g, requires_grad=True) for _ in range(4))
    rec, tgt = torch.randn(9, 3, 4, 4, generator=g), torch.randn(9, 3, 4, 4, generator=g)
    logits, targets = torch.randn(9, 5, 11, generator=g), torch.randint(0, 11, (9, 5), generator=g)
    targets[0, 2] = -100
    w = {"image_image": 0.5, "text_text": 2.0, "image_recon": 0.1, "text_recon": 0.3}
    loss = TulipLoss(weights=w, view_loss=view_loss, backend=backend)
    total, terms = loss(img, txt, iv, tv, rec, tgt, logits, targets)
    s, b = 10.0, -10.0

    def view(a, c):
        if view_loss == "siglip":
            return R.siglip_loss_ref(n_(a), n_(c), s, b)
        return R.info_nce_ref(n_(a), n_(c), temperature=1 / s, symmetric=True)

    expect = {"image_text": R.siglip_loss_ref(n_(img), n_(txt), s, b), "image_image": view(img, iv),
              "text_text": view(txt, tv), "image_recon": F.mse_loss(rec, tgt),
              "text_recon": F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)}
    assert set(terms) == set(expect)
    for k in expect:
        assert torch.allclose(terms[k], expect[k], atol=1e-5, rtol=1e-5), k
    want = expect["image_text"] + sum(w[k] * expect[k] for k in w)
    assert torch.allclose(total, want, atol=1e-5)
    grads = torch.autograd.grad(total, [img, loss.log_scale["image_image"], loss.bias["image_text"]])
    egrads = torch.autograd.grad(want, [img], retain_graph=True)
    assert torch.allclose(grads[0], egrads[0], atol=1e-5)
    assert all(torch.isfinite(x) and x != 0 for x in grads[1:])       # every term's scale / bias is learned


def test_tulip_optional_terms_weights_and_errors():
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    total, terms = TulipLoss(backend="torch")(img, txt)
    assert set(terms) == {"image_text"} and torch.equal(total, terms["image_text"])
    _, terms = TulipLoss(weights={"image_image": 0.0}, backend="torch")(img, txt, image_view=img)
    assert set(terms) == {"image_text"}
    with pytest.raises(ValueError, match="unknown TULIP term"):
        TulipLoss(weights={"image_video": 1.0})
    with pytest.raises(ValueError, match="finite float"):
        TulipLoss(weights={"text_text": -1.0})
    with pytest.raises(ValueError, match="go together"):
        TulipLoss()(img, txt, image_recon=img)
    with pytest.raises(ValueError, match="view_loss"):
        TulipLoss(view_loss="triplet")
    with pytest.raises(ValueError, match="no TULIP term"):
        TulipLoss(weights={"image_text": 0.0})(img, txt)
    m = TulipLoss(max_scale=20.0)
    with torch.no_grad():
        m.log_scale["image_text"].fill_(10.0)
    m.clamp_()
    assert m.log_scale["image_text"].item() == pytest.approx(math.log(20.0))


def test_tulip_compile_fullgraph():
    torch._dynamo.reset()
    img, txt, iv, tv = (torch.randn(8, 6, requires_grad=True) for _ in range(4))
    m = TulipLoss(backend="cpp")
    eager, _ = m(img, txt, iv, tv)
    got, _ = torch.compile(m, fullgraph=True, backend="aot_eager")(img, txt, iv, tv)
    assert torch.allclose(got, eager, atol=1e-6)


# ----------------------------------------------------------------------------------------------- unCLIP towers
def test_text_transformer_pooling_and_causality():
    torch.manual_seed(0)
    tt = TextTransformer(vocab_size=20, embed_dim=8, context_length=6, width=16, layers=2, heads=2)
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]])
    emb, tok, mask = tt(ids)
    assert emb.shape == (2, 8) and tok.shape == (2, 6, 16) and mask.tolist()[0] == [True] * 3 + [False] * 3
    ids2 = ids.clone()
    ids2[0, 4] = 15                        # after the last real token of row 0 ... but now a "real" token
    ids2[1, 5] = 13                        # last token of row 1 changes: earlier token features do not
    _, tok2, _ = tt(ids2)
    assert torch.allclose(tok2[1, :5], tok[1, :5], atol=1e-6) and not torch.allclose(tok2[1, 5], tok[1, 5])
    with pytest.raises(ValueError, match="context_length"):
        tt(torch.ones(1, 7, dtype=torch.long))


def test_clip_objective_is_the_fused_clip_loss():
    torch.manual_seed(0)
    model = CLIP(vit_image_tower(16, img_size=16, patch_size=8, depth=1), TextTransformer(30, 16, 8, 32, 1, 2),
                 backend="cpp")
    imgs, ids = torch.randn(5, 3, 16, 16), torch.randint(1, 30, (5, 8))
    loss = model(imgs, ids)
    ie, te = model.encode_image(imgs), model.encode_text(ids)[0]
    assert torch.allclose(loss, R.clip_loss_ref(ie, te, model.logit_scale), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss.backward()
    assert model.scale.log_scale.grad is not None and model.visual.patch_embed.proj.weight.grad is not None


# ----------------------------------------------------------------------------------------------- prior
def _prior(**kw):
    torch.manual_seed(0)
    return DiffusionPrior(embed_dim=8, token_dim=6, max_text_len=5, width=32, depth=2, heads=2,
                          num_train_timesteps=100, **kw)


def test_prior_learns_a_fixed_mapping_and_samples():
    prior = _prior(cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(1)
    text = n_(torch.randn(4, 8, generator=g))
    tokens, mask = torch.randn(4, 3, 6, generator=g), torch.ones(4, 3, dtype=torch.bool)
    image = n_(text @ torch.randn(8, 8, generator=g))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = prior.loss(text, tokens, mask, image, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    prior.eval()
    out = prior.sample(text, tokens, mask, steps=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 8) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    cos = (out * image).sum(1)
    assert cos.mean() > 0.7, cos                          # it maps each text to its image embedding
    ddpm = prior.sample(text, tokens, mask, steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ddpm).all()


def test_prior_guidance_padding_and_errors():
    prior = _prior(cond_drop_prob=0.5).eval()
    text, tokens = torch.randn(3, 8), torch.randn(3, 2, 6)
    mask = torch.tensor([[True, False], [True, True], [True, False]])
    a = prior.sample(text, tokens, mask, steps=4, generator=torch.Generator().manual_seed(0))
    b = prior.sample(text, tokens, mask, steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.allclose(a, b)
    # padded positions do not influence the prediction
    x, t = torch.randn(3, 8), torch.tensor([5, 50, 99])
    tokens2 = tokens.clone()
    tokens2[0, 1] = 100.0
    p1 = prior.denoise(x, t, text, tokens, mask)
    p2 = prior.denoise(x, t, text, tokens2, mask)
    assert torch.allclose(p1[0], p2[0], atol=1e-5)
    # dropping the condition ignores the text entirely
    d = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(prior.denoise(x, t, text, tokens, mask, d), prior.denoise(x, t, -text, tokens2, mask, d),
                          atol=1e-5)
    prior.train()
    assert torch.isfinite(prior.loss(text, tokens, mask, torch.randn(3, 8)))
    with pytest.raises(ValueError, match="text_embed"):
        prior.loss(torch.randn(3, 7), tokens, mask, torch.randn(3, 8))
    with pytest.raises(ValueError, match="text_tokens"):
        prior.loss(text, torch.randn(3, 6, 6), torch.ones(3, 6, dtype=torch.bool), torch.randn(3, 8))
    with pytest.raises(ValueError, match="sampler"):
        prior.sample(text, tokens, mask, sampler="euler")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        _prior(cond_drop_prob=1.0)


def test_retrieval_accuracy():
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 0.2, 1.0], [0.9, 1.0, 0, 0]])
    acc = retrieval_accuracy(queries, gallery, [0, 3, 0], [0, 1, 2, 3], topk=(1, 2))
    assert acc == {"top1": pytest.approx(2 / 3), "top2": pytest.approx(1.0)}


def test_prior_and_clip_losses_compile_fullgraph():
    torch._dynamo.reset()
    prior = _prior()
    text, tokens, mask, image = torch.randn(4, 8), torch.randn(4, 3, 6), torch.ones(4, 3, dtype=torch.bool), torch.randn(4, 8)
    mask[1, 2] = False
    f = torch.compile(prior.loss, fullgraph=True, backend="aot_eager")     # (a torch.Generator cannot be traced)
    torch.manual_seed(3)
    got = f(text, tokens, mask, image)
    torch.manual_seed(3)
    assert torch.allclose(got, prior.loss(text, tokens, mask, image), atol=1e-5)
    model = CLIP(vit_image_tower(8, img_size=16, patch_size=8, depth=1), TextTransformer(30, 8, 8, 16, 1, 2),
                 backend="cpp")
    imgs, ids = torch.randn(3, 3, 16, 16), torch.randint(1, 30, (3, 8))
    assert torch.allclose(torch.compile(model, fullgraph=True, backend="aot_eager")(imgs, ids), model(imgs, ids),
                          atol=1e-5)
