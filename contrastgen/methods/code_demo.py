"""``contrastgen demo code``: CoDE's global-local contrastive loss for real-vs-generated images (tiny timm ViT, CPU).

Synthetic "real" images are renders of coloured shapes; each "generated" image is a new render of the same scene (as
ELSA D3's fakes are generated from the real image's caption, so content cannot tell them apart) passed through a toy
generator fingerprint (2x nearest-neighbour upsampling of a half-resolution image, as a decoder's transposed
convolutions leave, plus a faint periodic grid -- the spectral peaks of upsampling layers -- of amplitude 0.03).  Each step builds CoDE's eight batches
-- real, fake, their augmented views, and a global (60-100% area) and a local (15-40% area) crop of each -- feeds
them to one ViT-tiny-width encoder (CoDE trains a ViT-tiny) and optimises :class:`contrastgen.methods.code.CoDELoss`
(tau = 0.1, four fused InfoNCE calls with the augmented / global batches of the other kind as the shared negatives).
Reported: the loss curve (and its real / fake terms), monitoring of (real, augmented real) embeddings, and the
real-vs-fake accuracy of held-out images (cosine k-NN and a linear probe), before and after training.
"""
from __future__ import annotations

import math
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
# the fingerprint's periodic grid (images in [-1, 1]): period 8 px survives the crop-and-resize augmentations (a
# pixel checkerboard does not); at amplitude 0.03 a randomly initialised encoder's features tell real from fake for
# ~75% of held-out images (cosine 5-NN), at 0.08 for ~95%
GRID_PERIOD, GRID_AMPLITUDE = 8.0, 0.03


def fake_images(attrs: torch.Tensor, seed: int) -> torch.Tensor:
    """"Generated" versions of the scenes ``attrs`` (new renders of the same attributes, other background and jitter)
    passed through a toy generator fingerprint (2x nearest upsampling, a faint periodic grid)."""
    x, _ = render_shapes(attrs.shape[0], seed=seed, attrs=attrs)
    size = x.shape[-1]
    low = F.avg_pool2d(x, 2)
    up = F.interpolate(low, size=size, mode="nearest")
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    grid = torch.sin(2 * math.pi * xx / GRID_PERIOD) * torch.sin(2 * math.pi * yy / GRID_PERIOD)
    return (up + GRID_AMPLITUDE * grid).clamp(-1, 1)


def real_fake_accuracy(enc, real_tr, fake_tr, real_te, fake_te, space="features") -> dict:
    """Real-vs-fake accuracy on held-out images of a cosine 5-NN and of a linear probe (logistic regression on the
    L2-normalised vectors; CoDE evaluates with linear, k-NN and SVM classifiers), in the backbone features
    (``space="features"``) or in the embedding the loss is applied to (``"embedding"``, after the projection head)."""
    fn = enc.features if space == "features" else enc
    tr = embed(fn, torch.cat([real_tr, fake_tr]))
    te = embed(fn, torch.cat([real_te, fake_te]))
    ytr = torch.cat([torch.zeros(len(real_tr)), torch.ones(len(fake_tr))]).long()
    yte = torch.cat([torch.zeros(len(real_te)), torch.ones(len(fake_te))]).long()
    out = {"knn": knn_accuracy(tr, ytr, te, yte)}
    try:
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(max_iter=2000).fit(F.normalize(tr, dim=1).numpy(), ytr.numpy())
        out["linear"] = float(clf.score(F.normalize(te, dim=1).numpy(), yte.numpy()))
    except ImportError:       # scikit-learn is optional
        pass
    return out


def main(argv=None) -> int:
    ap = base_parser("code", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    real_tr, a_tr = render_shapes(args.train_size, seed=args.seed)
    fake_tr = fake_images(a_tr, seed=args.seed + 100)           # content-matched, as ELSA D3's fakes share the
    real_te, a_te = render_shapes(args.test_size, seed=args.seed + 1)   # real image's caption
    fake_te = fake_images(a_te, seed=args.seed + 101)
    enc = ImageEncoder(patch_size=args.patch, depth=args.depth)
    before = {sp: real_fake_accuracy(enc.eval(), real_tr, fake_tr, real_te, fake_te, sp) for sp in ("features", "embedding")}
    enc.train()
    crit = CoDELoss(temperature=args.temperature, backend=args.backend)
    opt, sched = optimizer(enc.parameters(), args.lr, args.steps)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    curves = {"code": [], "real": [], "fake": []}
    prog = Progress("code", args.steps, args)
    b = args.batch_size
    for step in range(args.steps):
        idx = torch.randint(0, len(real_tr), (b,), generator=g)
        r, f = real_tr[idx], fake_tr[idx]                       # fake i shows the scene of real i
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
    after = {sp: real_fake_accuracy(enc, real_tr, fake_tr, real_te, fake_te, sp) for sp in ("features", "embedding")}
    summary = {"train_s": round(prog.seconds, 1), "real_fake_before": before, "real_fake_after": after,
               "params": sum(p.numel() for p in enc.parameters())}
    s = write_outputs(args.out, "code", args, summary, curves, {"real_views": mon})
    print_summary("code", {"loss (first 10% -> last 10%)": f"{s['loss_first_10pct']['code']:.4f} -> "
                           f"{s['loss_last_10pct']['code']:.4f}",
                           **{f"real-vs-fake {c} acc, {sp} (before -> after)": f"{before[sp][c]:.3f} -> {after[sp][c]:.3f}"
                              for sp in before for c in before[sp]},
                           "train seconds": summary["train_s"], "output": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
