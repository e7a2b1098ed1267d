"""``contrastgen demo moco``: MoCo (queue of negatives + momentum key encoder) on synthetic shapes, tiny timm ViT (CPU).

The query encoder (ViT-tiny width, configurable depth, MLP head) sees one augmented view, the momentum encoder
(:class:`contrastgen.nn.MomentumEncoder`, MoCo v3's cosine momentum schedule from ``--momentum`` to 1) the other;
the loss is ``contrastgen.info_nce(q, k, negatives=queue, temperature=0.2)`` on L2-normalised q and k -- InfoNCE of
each query against its key and the :class:`contrastgen.nn.MoCoQueue` bank (read in place by the fused kernel), in-batch
keys not negatives, as in MoCo v1/v2 -- after which the keys are enqueued.  The queue is pre-filled with keys of
the initial encoder (MoCo starts from random unit vectors, which makes the first steps' loss incomparable).  Reported: the loss curve, the monitoring
panels of (q, k) and the cosine k-NN accuracy of the backbone features on held-out renders, before and after.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import info_nce
from ..metrics import ContrastiveMonitor
from ..nn import MoCoQueue, MomentumEncoder
from .common_demo import (ImageEncoder, Progress, augment, base_parser, optimizer, print_summary, render_shapes,
                          resolve, write_outputs)
from .simclr_demo import evaluate

DEFAULTS = dict(steps=150, batch_size=64, depth=2, patch=8, lr=5e-4, temperature=0.2, queue=1024, momentum=0.99,
                train_size=2048, test_size=512)
QUICK = dict(steps=20, batch_size=32, queue=128, train_size=256, test_size=128)


def main(argv=None) -> int:
    ap = base_parser("moco", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    xtr, atr = render_shapes(args.train_size, seed=args.seed)
    xte, ate = render_shapes(args.test_size, seed=args.seed + 1)
    enc = ImageEncoder(patch_size=args.patch, depth=args.depth)
    before = evaluate(enc.eval(), xtr, atr, xte, ate)
    enc.train()
    key_enc = MomentumEncoder(enc, momentum=args.momentum, total_steps=args.steps)
    # the queue starts empty and is filled with keys of the initial momentum encoder (instead of MoCo's random unit
    # vectors), so that the loss measures the same task from the first step on
    queue = MoCoQueue(args.queue, enc.head[-1].out_features, init="empty")
    g_fill = torch.Generator().manual_seed(args.seed + 5)
    while len(queue) < args.queue:
        x = xtr[torch.randint(0, xtr.shape[0], (args.batch_size,), generator=g_fill)]
        queue.enqueue(F.normalize(key_enc(augment(x, g_fill)), dim=1))
    opt, sched = optimizer(enc.parameters(), args.lr, args.steps)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    losses, momenta = [], []
    prog = Progress("moco", args.steps, args)
    for step in range(args.steps):
        idx = torch.randint(0, xtr.shape[0], (args.batch_size,), generator=g)
        x = xtr[idx]
        q = F.normalize(enc(augment(x, g)), dim=1)
        k = F.normalize(key_enc(augment(x, g)), dim=1)
        # unit vectors in, the default dot similarity: the queue's storage is read in place (no copy)
        loss = info_nce(q, k, negatives=queue, temperature=args.temperature, backend=args.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        momenta.append(key_enc.update(enc))
        queue.enqueue(k)
        losses.append(loss.item())
        m = mon.log(step, q, k, loss=loss, momentum=momenta[-1])
        prog(step, ContrastiveMonitor.format(m))
    enc.eval()
    after = evaluate(enc, xtr, atr, xte, ate)
    after_key = evaluate(key_enc.module.eval(), xtr, atr, xte, ate)
    summary = {"train_s": round(prog.seconds, 1), "knn_before": before, "knn_after": after,
               "knn_after_momentum_encoder": after_key, "momentum_first_last": [momenta[0], momenta[-1]],
               "queue": args.queue, "params": sum(p.numel() for p in enc.parameters())}
    s = write_outputs(args.out, "moco", args, summary, {"moco": losses}, {"query_key": mon})
    print_summary("moco", {"loss (first 10% -> last 10%)": f"{s['loss_first_10pct']['moco']:.4f} -> "
                           f"{s['loss_last_10pct']['moco']:.4f}",
                           "kNN shape acc (before -> after)": f"{before['knn_shape']:.3f} -> {after['knn_shape']:.3f}",
                           "kNN shape+colour acc": f"{before['knn_shape_colour']:.3f} -> {after['knn_shape_colour']:.3f}",
                           "momentum encoder kNN shape acc": f"{after_key['knn_shape']:.3f}",
                           "train seconds": summary["train_s"], "output": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
