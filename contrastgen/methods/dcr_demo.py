"""``contrastgen demo dcr``: DCR's diffusion-based contrastive loss with a tiny offline UNet and a tiny ViT (CPU).

A ViT-tiny-width image encoder turns each image into a conditioning vector (its class token through DCR's
``project_clip`` MLP, added to a fixed "empty prompt" token sequence, as the official code does); a small
``diffusers.UNet2DConditionModel`` built from config (block_out_channels (16, 32), cross-attention on the
conditioning) denoises "latents" -- the images average-pooled to 3 x 8 x 8, standing in for VAE latents -- with the
official schedule (DDPM, 1000 steps, scaled-linear betas 0.00085-0.012) and the velocity target.  Each step runs the
UNet on all B x B (latent i, condition j) pairs and on each latent with the condition of an augmented view, and
optimises ``DCRLoss(temperature=0.1)(pred_pairs, pred_pos, target_v)`` (one fused call) plus ``--mse-weight`` times
the plain diffusion MSE of the matched pairs, which keeps the randomly initialised UNet a denoiser (the official
stage 1 freezes a pretrained UNet instead; ``--freeze-unet`` reproduces that, here with a random one).
Reported: the loss curves, monitoring of the (anchor, "plus") UNet predictions the loss compares, and the cosine k-NN
accuracy of the encoder features on held-out renders, before and after training.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import ContrastiveMonitor
from .common_demo import (ImageEncoder, Progress, augment, base_parser, optimizer, print_summary, render_shapes,
                          resolve, write_outputs)
from .dcr import DCRLoss
from .simclr_demo import evaluate

DEFAULTS = dict(steps=120, batch_size=6, depth=2, patch=8, lr=5e-4, temperature=0.1, mse_weight=1.0, train_size=1024,
                test_size=512, cond_dim=32, cond_tokens=4, freeze_unet=0)
QUICK = dict(steps=6, batch_size=4, train_size=128, test_size=128)


def tiny_unet(cond_dim: int) -> nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cond_dim,
                                attention_head_dim=8, norm_num_groups=8)


class Conditioner(nn.Module):
    """DCR's ``project_clip``: LayerNorm-Linear-GELU-Linear on the encoder feature, broadcast over a fixed token
    sequence (the official code adds it to the empty prompt's text-encoder states)."""

    def __init__(self, feat_dim: int, cond_dim: int, tokens: int, seed: int = 0):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, cond_dim), nn.GELU(),
                                  nn.Linear(cond_dim, cond_dim))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("uc", torch.randn(tokens, cond_dim, generator=g) * 0.5)

    def forward(self, feats):
        return self.proj(feats)[:, None, :] + self.uc[None]


def main(argv=None) -> int:
    ap = base_parser("dcr", __doc__, DEFAULTS, QUICK)
    args = resolve(ap.parse_args(list(sys.argv[1:] if argv is None else argv)))
    from diffusers import DDPMScheduler
    xtr, atr = render_shapes(args.train_size, seed=args.seed)
    xte, ate = render_shapes(args.test_size, seed=args.seed + 1)
    enc = ImageEncoder(patch_size=args.patch, depth=args.depth)
    before = evaluate(enc.eval(), xtr, atr, xte, ate)
    enc.train()
    feat_dim = enc.head[0].in_features
    cond = Conditioner(feat_dim, args.cond_dim, args.cond_tokens, args.seed)
    unet = tiny_unet(args.cond_dim)
    if args.freeze_unet:
        unet.requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon")
    params = list(enc.backbone.parameters()) + list(cond.parameters()) + [p for p in unet.parameters() if p.requires_grad]
    opt, lr_sched = optimizer(params, args.lr, args.steps)
    crit = DCRLoss(temperature=args.temperature, backend=args.backend)
    mon = ContrastiveMonitor(uniformity_samples=None)
    g = torch.Generator().manual_seed(args.seed)
    curves = {"total": [], "dcr": [], "mse": []}
    prog = Progress("dcr", args.steps, args)
    b = args.batch_size
    for step in range(args.steps):
        imgs = xtr[torch.randint(0, len(xtr), (b,), generator=g)]
        plus = augment(imgs, g, scale=(0.8, 1.0), jitter=0.1, noise=0.02)      # DCR's mild "plus" augmentation
        feats = enc.features(torch.cat([imgs, plus]))
        f, f_plus = feats.chunk(2)
        c, c_plus = cond(f), cond(f_plus)
        x0 = F.avg_pool2d(imgs, 4)                                              # (B, 3, 8, 8) "latents"
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = sched.add_noise(x0, noise, t)
        target_v = sched.get_velocity(x0, noise, t)
        pair_in = noisy[:, None].expand(b, b, *noisy.shape[1:]).reshape(b * b, *noisy.shape[1:])
        pair_t = t[:, None].expand(b, b).reshape(b * b)
        pair_c = c[None].expand(b, *c.shape).reshape(b * b, *c.shape[1:])
        out = unet(torch.cat([pair_in, noisy]), torch.cat([pair_t, t]),
                   encoder_hidden_states=torch.cat([pair_c, c_plus])).sample
        pred_pairs, pred_pos = out[: b * b].reshape(b, b, *noisy.shape[1:]), out[b * b:]
        dcr = crit(pred_pairs, pred_pos, target_v)
        mse = F.mse_loss(pred_pairs[torch.arange(b), torch.arange(b)], target_v)
        loss = dcr + args.mse_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        for k, v in (("total", loss), ("dcr", dcr), ("mse", mse)):
            curves[k].append(v.item())
        # monitor what the loss compares: the flattened predictions of the matched pairs vs the "plus" condition
        m = mon.log(step, pred_pairs[torch.arange(b), torch.arange(b)].flatten(1), pred_pos.flatten(1), loss=dcr)
        prog(step, f"mse {mse.item():.4f}  " + ContrastiveMonitor.format(m))
    enc.eval()
    after = evaluate(enc, xtr, atr, xte, ate)
    summary = {"train_s": round(prog.seconds, 1), "knn_before": before, "knn_after": after,
               "unet_params": sum(p.numel() for p in unet.parameters()),
               "encoder_params": sum(p.numel() for p in enc.backbone.parameters())}
    s = write_outputs(args.out, "dcr", args, summary, curves, {"unet_predictions": mon})
    print_summary("dcr", {"DCR loss (first 10% -> last 10%)": f"{s['loss_first_10pct']['dcr']:.4f} -> "
                          f"{s['loss_last_10pct']['dcr']:.4f}",
                          "diffusion MSE": f"{s['loss_first_10pct']['mse']:.4f} -> {s['loss_last_10pct']['mse']:.4f}",
                          "kNN shape acc (before -> after)": f"{before['knn_shape']:.3f} -> {after['knn_shape']:.3f}",
                          "kNN shape+colour acc": f"{before['knn_shape_colour']:.3f} -> {after['knn_shape_colour']:.3f}",
                          "train seconds": summary["train_s"], "output": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
