"""``contrastgen demo code``: CoDE's global-local contrastive loss for real-vs-generated images (tiny timm ViT, CPU).

Synthetic "real" images are renders of coloured shapes; "generated" images are other renders passed through a toy
generator fingerprint (2x nearest-neighbour upsampling of a half-resolution image, as a decoder's transposed
convolutions leave, plus a faint periodic checkerboard and a colour cast).  Each step builds CoDE's eight batches
-- real, fake, their augmented views, and a global (60-100% area) and a local (15-40% area) crop of each -- feeds
them to one ViT-tiny-width encoder (CoDE trains a ViT-tiny) and optimises :class:`contrastgen.methods.code.CoDELoss`
(tau = 0.1, four fused InfoNCE calls with the augmented / global batches of the other kind as the shared negatives).
Reported: the loss curve (and its real / fake terms), monitoring of (real, augmented real) embeddings, and the
cosine k-NN real-vs-fake accuracy of held-out images, before and after training.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..metrics import ContrastiveMonitor
from .code import CoDELoss
from .common_demo import (ImageEncoder, Progress, augment, base_parser, embed, knn_accuracy, optimizer, print_summary,
                          render_shapes, resolve, write_outputs)

DEFAULTS = dict(steps=120, batch_size=32, depth=2, patch=8, lr=5e-4, temperature=0.1, train_size=1024,
                test_size=512)
QUICK = dict(steps=10, batch_size=16, train_size=128, test_size=128)


def fake_images(n: int, seed: int) -> torch.Tensor:
    """Renders passed through a toy generator fingerprint (upsampling artefacts, checkerboard, colour cast)."""
    x, _ = render_shapes(n, seed=seed)
    size = x.shape[-1]
    low = F.avg_pool2d(x, 2)
    up = F.interpolate(low, size=size, mode="nearest")
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((yy + xx) % 2).float() * 2 - 1
    cast = torch.tensor([0.04, -0.02, 0.05])[:, None, None]
    return (up + 0.06 * checker + cast).clamp(-1, 1)


def real_fake_knn(enc, real_tr, fake_tr, real_te, fake_te) -> float:
    tr = embed(enc.features, torch.cat([real_tr, fake_tr]))
    te = embed(enc.features, torch.cat([real_te, fake_te]))
    ytr = torch.cat([torch.zeros(len(real_tr)), torch.ones(len(fake_tr))]).long()
    yte = torch.cat([torch.zeros(len(real_te)), torch.ones(len(fake_te))]).long()
    return knn_accuracy(tr, ytr, te, yte)


def main(argv=None) -> int:
    ap = base_parser("code", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    real_tr, _ = render_shapes(args.train_size, seed=args.seed)
    fake_tr = fake_images(args.train_size, seed=args.seed + 100)
    real_te, _ = render_shapes(args.test_size, seed=args.seed + 1)
    fake_te = fake_images(args.test_size, seed=args.seed + 101)
    enc = ImageEncoder(patch_size=args.patch, depth=args.depth)
    before = real_fake_knn(enc.eval(), real_tr, fake_tr, real_te, fake_te)
    enc.train()
    crit = CoDELoss(temperature=args.temperature, backend=args.backend)
    opt, sched = optimizer(enc.parameters(), args.lr, args.steps)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    curves = {"code": [], "real": [], "fake": []}
    prog = Progress("code", args.steps, args)
    b = args.batch_size
    for step in range(args.steps):
        r = real_tr[torch.randint(0, len(real_tr), (b,), generator=g)]
        f = fake_tr[torch.randint(0, len(fake_tr), (b,), generator=g)]
        views = [r, f, augment(r, g), augment(f, g), augment(r, g, scale=(0.15, 0.4)), augment(r, g, scale=(0.6, 1.0)),
                 augment(f, g, scale=(0.15, 0.4)), augment(f, g, scale=(0.6, 1.0))]
        emb = enc(torch.cat(views)).split(b)
        loss, terms = crit(*emb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curves["code"].append(loss.item())
        curves["real"].append(terms["real"].item())
        curves["fake"].append(terms["fake"].item())
        m = mon.log(step, emb[0], emb[2], loss=loss)
        prog(step, ContrastiveMonitor.format(m))
    enc.eval()
    after = real_fake_knn(enc, real_tr, fake_tr, real_te, fake_te)
    summary = {"train_s": round(prog.seconds, 1), "real_fake_knn_before": before, "real_fake_knn_after": after,
               "params": sum(p.numel() for p in enc.parameters())}
    s = write_outputs(args.out, "code", args, summary, curves, {"real_views": mon})
    print_summary("code", {"loss (first 10% -> last 10%)": f"{s['loss_first_10pct']['code']:.4f} -> "
                           f"{s['loss_last_10pct']['code']:.4f}",
                           "kNN real-vs-fake acc (before -> after)": f"{before:.3f} -> {after:.3f}",
                           "train seconds": summary["train_s"], "output": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
