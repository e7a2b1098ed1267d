"""``contrastgen demo tulip``: TULIP's objective on a tiny two-tower model and synthetic paired data (CPU).

The towers of ``contrastgen demo unclip`` (timm ViT-tiny-width image tower, small text transformer) are trained
with :class:`contrastgen.methods.tulip.TulipLoss`: SigLIP image-text, plus SigLIP image-image between two augmented
views of each image, SigLIP text-text between each caption and a paraphrase (other word order, synonyms:
"the ring is blue , little in lower left"), plus reconstruction of the 8 x 8 image from the image embedding (MSE)
and of the caption's tokens from the text embedding (cross-entropy), each weight 1.0 by default (``--w-*``).
Every contrastive term is one fused SigLIP call with its own learnable scale and bias.  Reported: the total and
per-term loss curves, monitoring of (image, text) embeddings, and text -> image retrieval accuracy on held-out
renders (a retrieval is correct when the image has the caption's attributes), with the original captions and
with their paraphrases, before and after training.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import ContrastiveMonitor
from .common_demo import (CONTEXT, VOCAB, Progress, attribute_key, augment, base_parser, caption_ids, optimizer,
                          print_summary, resolve, write_outputs)
from .tulip import TulipLoss
from .unclip import retrieval_accuracy
from .unclip_demo import build_clip, encode_all, paired_data

DEFAULTS = dict(steps=150, batch_size=64, depth=2, patch=8, embed_dim=64, text_width=128, text_layers=2, lr=5e-4,
                w_image_text=1.0, w_image_image=1.0, w_text_text=1.0, w_image_recon=1.0, w_text_recon=1.0,
                init_bias=-10.0, train_size=2048, test_size=384)
QUICK = dict(steps=10, batch_size=32, train_size=256, test_size=64)


def evaluate(model, x, ids, ids_para, attrs):
    img, txt, _, _ = encode_all(model, x, ids)
    _, txt_p, _, _ = encode_all(model, x, ids_para)
    keys = attribute_key(attrs)
    return {"text_to_image": retrieval_accuracy(txt, img, keys, keys)["top1"],
            "paraphrase_to_image": retrieval_accuracy(txt_p, img, keys, keys)["top1"],
            "image_to_text": retrieval_accuracy(img, txt, keys, keys)["top1"]}


def main(argv=None) -> int:
    ap = base_parser("tulip", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    xtr, idtr, atr = paired_data(args.train_size, args.seed)
    xte, idte, ate = paired_data(args.test_size, args.seed + 1)
    para_tr, para_te = caption_ids(atr, paraphrase=True), caption_ids(ate, paraphrase=True)
    small_tr = F.avg_pool2d(xtr, 4)                                         # reconstruction targets (3 x 8 x 8)
    model = build_clip(args)
    before = evaluate(model, xte, idte, para_te, ate)
    weights = {k: getattr(args, "w_" + k) for k in ("image_text", "image_image", "text_text", "image_recon",
                                                   "text_recon")}
    crit = TulipLoss(weights=weights, init_bias=args.init_bias, backend=args.backend)
    image_dec = nn.Linear(args.embed_dim, small_tr[0].numel())
    text_dec = nn.Linear(args.embed_dim, CONTEXT * len(VOCAB))
    params = list(model.visual.parameters()) + list(model.text.parameters()) + list(crit.parameters()) + \
        list(image_dec.parameters()) + list(text_dec.parameters())
    opt, sched = optimizer(params, args.lr, args.steps)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    curves = {"total": [], "image_text": [], "image_image": [], "text_text": [], "image_recon": [], "text_recon": []}
    prog = Progress("tulip", args.steps, args)
    model.train()
    b = args.batch_size
    for step in range(args.steps):
        idx = torch.randint(0, xtr.shape[0], (b,), generator=g)
        x = xtr[idx]
        ie_all = model.encode_image(torch.cat([augment(x, g, scale=(0.7, 1.0)), augment(x, g, scale=(0.7, 1.0))]))
        ie, ie_view = ie_all.chunk(2)
        te_all = model.encode_text(torch.cat([idtr[idx], para_tr[idx]]))[0]
        te, te_view = te_all.chunk(2)
        tokens = idtr[idx].masked_fill(idtr[idx] == 0, -100)
        loss, terms = crit(ie, te, ie_view, te_view, image_recon=image_dec(ie).view_as(small_tr[idx]),
                           image_target=small_tr[idx], text_logits=text_dec(te).view(b, CONTEXT, len(VOCAB)),
                           text_targets=tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        crit.clamp_()
        curves["total"].append(loss.item())
        for k in curves:
            if k in terms:
                curves[k].append(terms[k].item())
        m = mon.log(step, ie, te, loss=loss, logit_scale=crit.log_scale["image_text"].exp())
        prog(step, ContrastiveMonitor.format(m))
    curves = {k: v for k, v in curves.items() if v}
    after = evaluate(model, xte, idte, para_te, ate)
    keys = attribute_key(ate)
    summary = {"train_s": round(prog.seconds, 1), "retrieval_top1_before": before, "retrieval_top1_after": after,
               "chance_top1": float((keys[:, None] == keys[None]).float().mean()), "weights": weights}
    s = write_outputs(args.out, "tulip", args, summary, curves, {"image_text": mon})
    rows = {f"{k} loss (first 10% -> last 10%)": f"{s['loss_first_10pct'][k]:.4f} -> {s['loss_last_10pct'][k]:.4f}"
            for k in curves}
    for k in before:
        rows[f"{k} top1 (before -> after)"] = f"{before[k]:.3f} -> {after[k]:.3f}"
    rows["chance top1"] = f"{summary['chance_top1']:.4f}"
    rows["train seconds"] = summary["train_s"]
    rows["output"] = str(args.out)
    print_summary("tulip", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
