"""``contrastgen demo unclip``: DALL-E 2's CLIP + diffusion prior on synthetic paired data (CPU).

Stage 1 trains a tiny two-tower CLIP -- a timm ViT-tiny-width image tower and a small causal text transformer --
with the fused CLIP loss (:class:`contrastgen.nn.ClipLoss`, learnable temperature) on renders of coloured shapes and
their captions ("a small red circle at the top left").  Stage 2 freezes it and trains
:class:`contrastgen.methods.unclip.DiffusionPrior` (a causal transformer over [text tokens, text embedding, timestep,
noised image embedding, query], predicting the clean image embedding, MSE, 10% condition dropout) on the CLIP
embeddings of the training pairs.  Evaluation on held-out renders: for every caption, an image embedding sampled
from the prior (DDIM, ``--sample-steps``; guidance scales 1 and ``--guidance``) retrieves among the true image
embeddings of the held-out images; a retrieval is correct when the retrieved image has the caption's attributes.
Baseline: the caption's text embedding itself as the query (plain CLIP retrieval).  Also reported: the mean
cosine between the query and the paired image's embedding (the "modality gap" the prior is meant to close).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..metrics import ContrastiveMonitor
from .common_demo import (CONTEXT, VOCAB, Progress, attribute_key, base_parser, caption_ids, optimizer, print_summary,
                          render_shapes, resolve, write_outputs)
from .unclip import CLIP, DiffusionPrior, TextTransformer, retrieval_accuracy, vit_image_tower

DEFAULTS = dict(clip_steps=150, prior_steps=300, batch_size=64, prior_batch_size=128, depth=2, patch=8, embed_dim=64,
                text_width=128, text_layers=2, lr=5e-4, prior_lr=1e-3, prior_width=128, prior_depth=2,
                sample_steps=32, guidance=2.0, train_size=2048, test_size=384)
QUICK = dict(clip_steps=10, prior_steps=10, batch_size=32, prior_batch_size=32, train_size=256, test_size=64,
             sample_steps=4)


def build_clip(args) -> CLIP:
    image = vit_image_tower(args.embed_dim, img_size=32, patch_size=args.patch, depth=args.depth)
    text = TextTransformer(len(VOCAB), args.embed_dim, context_length=CONTEXT, width=args.text_width,
                           layers=args.text_layers, heads=4)
    return CLIP(image, text, backend=args.backend)


def paired_data(n: int, seed: int):
    x, attrs = render_shapes(n, seed=seed)
    return x, caption_ids(attrs), attrs


@torch.no_grad()
def encode_all(model: CLIP, x, ids, batch: int = 256):
    model.eval()
    img, txt, tok, mask = [], [], [], []
    for i in range(0, x.shape[0], batch):
        img.append(model.encode_image(x[i:i + batch]))
        t, k, m = model.encode_text(ids[i:i + batch])
        txt.append(t)
        tok.append(k)
        mask.append(m)
    return torch.cat(img), torch.cat(txt), torch.cat(tok), torch.cat(mask)


def train_clip(args, model: CLIP, x, ids, name: str):
    opt, sched = optimizer(model.parameters(), args.lr, args.clip_steps)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    prog = Progress(name, args.clip_steps, args)
    model.train()
    for step in range(args.clip_steps):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=g)
        ie = model.encode_image(x[idx])
        te = model.encode_text(ids[idx])[0]
        loss = model.loss_fn(ie, te, model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        model.scale.clamp_()
        losses.append(loss.item())
        m = mon.log(step, ie, te, loss=loss, logit_scale=model.logit_scale)
        prog(step, ContrastiveMonitor.format(m))
    return losses, mon, prog.seconds


def main(argv=None) -> int:
    ap = base_parser("unclip", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    xtr, idtr, atr = paired_data(args.train_size, args.seed)
    xte, idte, ate = paired_data(args.test_size, args.seed + 1)
    model = build_clip(args)
    clip_losses, mon, clip_s = train_clip(args, model, xtr, idtr, "unclip/clip")
    model.requires_grad_(False)
    img_tr, txt_tr, tok_tr, mask_tr = encode_all(model, xtr, idtr)
    img_te, txt_te, tok_te, mask_te = encode_all(model, xte, idte)

    prior = DiffusionPrior(args.embed_dim, args.text_width, CONTEXT, width=args.prior_width, depth=args.prior_depth,
                           heads=4, cond_drop_prob=0.1)
    opt, sched = optimizer(prior.parameters(), args.prior_lr, args.prior_steps, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 7)
    prior_losses = []
    prog = Progress("unclip/prior", args.prior_steps, args)
    prior.train()
    for step in range(args.prior_steps):
        idx = torch.randint(0, img_tr.shape[0], (args.prior_batch_size,), generator=g)
        loss = prior.loss(txt_tr[idx], tok_tr[idx], mask_tr[idx], img_tr[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        prior_losses.append(loss.item())
        prog(step, f"prior mse {loss.item():.4f}")
    prior_s = prog.seconds

    prior.eval()
    keys = attribute_key(ate)
    results = {"text_embedding": {**retrieval_accuracy(txt_te, img_te, keys, keys),
                                  "cos_to_paired_image": float((txt_te * img_te).sum(1).mean())}}
    for scale in sorted({1.0, args.guidance}):
        emb = prior.sample(txt_te, tok_te, mask_te, steps=args.sample_steps, guidance_scale=scale,
                           generator=torch.Generator().manual_seed(args.seed + 11))
        results[f"prior_cfg{scale:g}"] = {**retrieval_accuracy(emb, img_te, keys, keys),
                                          "cos_to_paired_image": float((emb * img_te).sum(1).mean())}
    results["chance_top1"] = float((keys[:, None] == keys[None]).float().mean())
    summary = {"clip_train_s": round(clip_s, 1), "prior_train_s": round(prior_s, 1), "retrieval": results,
               "final_logit_scale": float(model.logit_scale), "distinct_test_captions": int(keys.unique().numel())}
    s = write_outputs(args.out, "unclip", args, summary, {"clip": clip_losses, "prior_mse": prior_losses},
                      {"clip_image_text": mon})
    rows = {"CLIP loss (first 10% -> last 10%)": f"{s['loss_first_10pct']['clip']:.4f} -> {s['loss_last_10pct']['clip']:.4f}",
            "prior MSE (first 10% -> last 10%)": f"{s['loss_first_10pct']['prior_mse']:.4f} -> "
                                                 f"{s['loss_last_10pct']['prior_mse']:.4f}"}
    for k, r in results.items():
        if isinstance(r, dict):
            rows[f"{k}: top1 / top5 / cos"] = f"{r['top1']:.3f} / {r['top5']:.3f} / {r['cos_to_paired_image']:.3f}"
    rows["chance top1"] = f"{results['chance_top1']:.4f}"
    rows["train seconds (clip, prior)"] = f"{clip_s:.1f}, {prior_s:.1f}"
    rows["output"] = str(args.out)
    print_summary("unclip", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
