"""``contrastgen demo simclr``: SimCLR (NT-Xent) or SupCon on synthetic shapes with a tiny timm ViT (CPU).

Two augmented views of each image (crop-and-resize, flip, colour jitter, noise) go through a ViT-tiny-width
encoder (depth and patch size from the command line) and an MLP projection head; the loss is
``contrastgen.nn.NTXentLoss`` on the 2B projections with the pair index as label (= SimCLR's NT-Xent, cosine,
temperature 0.5), or with ``--loss supcon`` ``contrastgen.nn.SupConLoss`` with the (shape, colour) class as label.
Both run the fused InfoNCE core.  Reported: the loss curve, the monitoring panels (alignment, uniformity,
similarity gap, effective rank of the projections) and the cosine k-NN accuracy of the backbone features on
held-out renders, for the shape (4-way) and the (shape, colour) class (24-way), before and after training.
"""
from __future__ import annotations

import sys

import torch

from ..metrics import ContrastiveMonitor
from ..nn import NTXentLoss, SupConLoss
from .common_demo import (ImageEncoder, Progress, augment, base_parser, embed, knn_accuracy, optimizer, print_summary,
                          render_shapes, resolve, write_outputs)

DEFAULTS = dict(steps=150, batch_size=64, depth=2, patch=8, lr=5e-4, temperature=0.5, train_size=2048,
                test_size=512, loss="simclr")
QUICK = dict(steps=20, batch_size=32, train_size=256, test_size=128)


def _classes(attrs):
    return attrs[:, 0], attrs[:, 0] * 6 + attrs[:, 1]


def evaluate(enc, xtr, atr, xte, ate):
    ftr, fte = embed(enc.features, xtr), embed(enc.features, xte)
    (s_tr, c_tr), (s_te, c_te) = _classes(atr), _classes(ate)
    return {"knn_shape": knn_accuracy(ftr, s_tr, fte, s_te), "knn_shape_colour": knn_accuracy(ftr, c_tr, fte, c_te)}


def main(argv=None) -> int:
    ap = base_parser("simclr", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    if args.loss not in ("simclr", "supcon"):
        ap.error("--loss must be simclr or supcon")
    xtr, atr = render_shapes(args.train_size, seed=args.seed)
    xte, ate = render_shapes(args.test_size, seed=args.seed + 1)
    enc = ImageEncoder(patch_size=args.patch, depth=args.depth)
    before = evaluate(enc.eval(), xtr, atr, xte, ate)
    enc.train()
    opt, sched = optimizer(enc.parameters(), args.lr, args.steps)
    crit = (NTXentLoss(args.temperature, backend=args.backend) if args.loss == "simclr"
            else SupConLoss(args.temperature, base_temperature=args.temperature, backend=args.backend))
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    prog = Progress("simclr", args.steps, args)
    for step in range(args.steps):
        idx = torch.randint(0, xtr.shape[0], (args.batch_size,), generator=g)
        x = xtr[idx]
        z = enc(torch.cat([augment(x, g), augment(x, g)]))
        z1, z2 = z.chunk(2)
        if args.loss == "simclr":
            loss = crit(z, torch.arange(args.batch_size).repeat(2))
        else:
            loss = crit(torch.stack([z1, z2], 1), _classes(atr[idx])[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        m = mon.log(step, z1, z2, loss=loss)
        prog(step, ContrastiveMonitor.format(m))
    enc.eval()
    after = evaluate(enc, xtr, atr, xte, ate)
    summary = {"train_s": round(prog.seconds, 1), "knn_before": before, "knn_after": after,
               "params": sum(p.numel() for p in enc.parameters())}
    s = write_outputs(args.out, "simclr", args, summary, {args.loss: losses}, {"projections": mon})
    print_summary("simclr", {"loss (first 10% -> last 10%)": f"{s['loss_first_10pct'][args.loss]:.4f} -> "
                             f"{s['loss_last_10pct'][args.loss]:.4f}",
                             "kNN shape acc (before -> after)": f"{before['knn_shape']:.3f} -> {after['knn_shape']:.3f}",
                             "kNN shape+colour acc": f"{before['knn_shape_colour']:.3f} -> {after['knn_shape_colour']:.3f}",
                             "train seconds": summary["train_s"], "output": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
