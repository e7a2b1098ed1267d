"""``contrastgen demo dispersive``: Dispersive Loss on a small SiT trained on scikit-learn's 8x8 digits (CPU).

Trains the same small SiT twice with the same seed (same initialisation, batches, timesteps, noise and label
dropout): once with the plain SiT velocity loss, once with ``+ weight * dispersive_loss`` on one block's output
(:class:`contrastgen.methods.dispersive.DispersiveRegularizer`).  The digits (1797 images, bundled with
scikit-learn, nothing is downloaded) are upsampled to 16x16 and scaled to [-1, 1]; a stratified 80/20 split
gives the training set of both the SiT and a small CNN classifier, whose test accuracy is reported.  Samples are
drawn from the EMA weights with the Euler or Heun ODE solver, without guidance and with classifier-free guidance,
and scored by the Frechet distance (FD) between generated and real images in the CNN's 64-d penultimate feature
space (real = all 1797 digits), plus the fraction of samples the CNN assigns to the class they were conditioned
on.  ``fd_real_floor`` = FD between the real test split and the real training split, for scale.

Writes into --out: ``samples.png`` (real | baseline | dispersive grids, one row per class), ``losses.png``
(diffusion and dispersive loss per step; the baseline's dispersive loss is only monitored, not optimised) and
``summary.json``.  ``--quick`` is a ~30-60 s smoke run (CI); the default takes a few minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common_demo import default_out
from .dispersive import PRESETS, DispersiveRegularizer
from .sit import SiT, interpolate, sample, sit_loss

DEFAULTS = dict(steps=600, batch_size=64, hidden=128, depth=6, heads=4, patch=4, lr=1e-3, ema=0.995,
                samples_per_class=50, sample_steps=10, classifier_epochs=15)
QUICK = dict(steps=60, batch_size=32, hidden=64, depth=4, heads=4, patch=4, lr=2e-3, ema=0.9,
             samples_per_class=10, sample_steps=5, classifier_epochs=3)


# --------------------------------------------------------------------------- data
def load_digits_16(device="cpu"):
    """(1797, 1, 16, 16) float32 in [-1, 1] (bilinear upsampling of the 8x8 digits, 0..16 grey levels) and labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    return x.to(device), torch.tensor(d.target, dtype=torch.long, device=device)


def stratified_split(y: torch.Tensor, test_frac=0.2, seed=0):
    rng = np.random.RandomState(seed)
    yn = y.cpu().numpy()
    test = []
    for c in np.unique(yn):
        idx = np.flatnonzero(yn == c)
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * test_frac))])
    mask = np.zeros(len(yn), bool)
    mask[test] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


# --------------------------------------------------------------------------- feature network for the FD
class DigitCNN(nn.Module):
    def __init__(self, feat_dim=64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 4 * 4, feat_dim)
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x):
        """64-d penultimate pre-activation features (the FD space)."""
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def train_classifier(x_tr, y_tr, x_te, y_te, epochs, seed):
    torch.manual_seed(seed)
    net = DigitCNN().to(x_tr.device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g).to(x_tr.device)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = x_tr[idx]
            xb = xb + 0.05 * torch.randn_like(xb)           # a little noise: robust to imperfect samples
            loss = F.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x_te).argmax(1) == y_te).float().mean().item()
    return net, acc


@torch.no_grad()
def features(net, x, bs=512):
    return torch.cat([net.features(x[i:i + bs]) for i in range(0, len(x), bs)]).double().cpu().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two feature sets (rows = samples)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr (S1 S2)^(1/2) = sum of sqrt of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------- SiT training
def train_sit(args, x_tr, y_tr, use_reg: bool, desc: str):
    torch.manual_seed(args.seed)
    model = SiT("SiT-tiny/2", input_size=16, in_channels=1, patch_size=args.patch, hidden_size=args.hidden,
                depth=args.depth, num_heads=args.heads, num_classes=10, time_scale=1000.0).to(args.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)   # copied before any hook is registered
    preset = dict(PRESETS[args.preset])
    weight = preset["weight"] if args.weight is None else args.weight
    tau = preset["tau"] if args.tau is None else args.tau
    # the baseline run hooks the same block to *monitor* the dispersive loss (never added to its loss)
    reg = DispersiveRegularizer.from_preset(model.blocks, args.preset, weight=weight, tau=tau)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    hist = {"diffusion": [], "dispersive": []}
    try:
        from tqdm.auto import tqdm
        bar = tqdm(range(args.steps), desc=desc, disable=args.no_progress, dynamic_ncols=True, leave=True)
    except ImportError:                                         # pragma: no cover
        bar = range(args.steps)
    t0 = time.perf_counter()
    model.train()
    for step in bar:
        idx = torch.randint(0, len(x_tr), (args.batch_size,), generator=g, device=args.device)
        x, y = x_tr[idx], y_tr[idx]
        t = torch.rand(args.batch_size, generator=g, device=args.device)
        noise = torch.randn(x.shape, generator=g, device=args.device)
        diff = sit_loss(model, x, y, t=t, noise=noise)
        disp = reg.pop_loss()
        loss = diff + disp if use_reg else diff
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        hist["diffusion"].append(diff.item())
        hist["dispersive"].append(reg.last_loss.item())
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(diff=f"{hist['diffusion'][-1]:.3f}", disp=f"{hist['dispersive'][-1]:.3f}")
    train_s = time.perf_counter() - t0
    block = next(i for i, b in enumerate(model.blocks) if b is reg.modules[0])
    reg.remove()
    # diagnostic: RMS of the hooked block's output (EMA weights) on a fixed batch -- the InfoNCE-L2 loss can be
    # driven to its floor log(1/B) by scaling this representation up
    probe = DispersiveRegularizer(ema.blocks[block], train_only=False)
    gp = torch.Generator(device=args.device).manual_seed(args.seed + 3)
    idx = torch.randint(0, len(x_tr), (min(256, len(x_tr)),), generator=gp, device=args.device)
    tp = torch.rand(len(idx), generator=gp, device=args.device)
    xp, _ = interpolate(x_tr[idx], torch.randn(x_tr[idx].shape, generator=gp, device=args.device), tp)
    with torch.no_grad():
        ema(xp, tp, y_tr[idx])
        rms = probe._captured[0].float().pow(2).mean().sqrt().item()
    probe.remove()
    info = dict(block=block, weight=weight if use_reg else 0.0, tau=tau,
                params=sum(p.numel() for p in model.parameters()), hooked_block_rms=round(rms, 4),
                dispersive_floor=round(-math.log(args.batch_size), 5))
    return ema, hist, train_s, info


@torch.no_grad()
def generate(args, model, cfg_scale):
    n = args.samples_per_class
    y = torch.arange(10, device=args.device).repeat_interleave(n)
    g = torch.Generator(device=args.device).manual_seed(args.seed + 2)   # same noise for every run
    noise = torch.randn((len(y), 1, 16, 16), generator=g, device=args.device)
    out = []
    for i in range(0, len(y), 500):
        out.append(sample(model, noise[i:i + 500], y[i:i + 500], method=args.sampler, steps=args.sample_steps,
                          cfg_scale=cfg_scale))
    return torch.cat(out).clamp(-1, 1), y


# --------------------------------------------------------------------------- outputs
def _grid(x, y, per_class=10):
    """(10 * k, 1, 16, 16) images -> one (10*16, per_class*16) array, one row per class."""
    rows = []
    for c in range(10):
        xc = x[y == c][:per_class].cpu()
        if len(xc) < per_class:
            xc = torch.cat([xc, -torch.ones(per_class - len(xc), 1, 16, 16)])
        rows.append(torch.cat(list(xc[:, 0]), dim=1))
    return ((torch.cat(rows, 0) + 1) / 2).numpy()


def save_figures(out, real, runs, hist, cfg_show):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("real digits (16x16)", _grid(*real))] + [
        (f"{name} (cfg {cfg_show})", _grid(*runs[name]["grid"])) for name in runs]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=80)
    plt.close(fig)

    def smooth(v, k):
        v = np.asarray(v, float)
        if len(v) < 2 * k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    k = max(1, len(next(iter(hist.values()))["diffusion"]) // 30)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, h in hist.items():
        axes[0].plot(smooth(h["diffusion"], k), label=name)
        style = "-" if name == "dispersive" else "--"
        lab = name if name == "dispersive" else f"{name} (monitored only)"
        axes[1].plot(smooth(h["dispersive"], k), style, label=lab)
    axes[0].set_title("diffusion (velocity MSE) loss")
    axes[1].set_title("dispersive loss (unweighted, InfoNCE-L2)")
    for ax in axes:
        ax.set_xlabel(f"step (moving average over {k})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=80)
    plt.close(fig)


def default_out_dir() -> Path:
    return default_out("dispersive")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="contrastgen demo dispersive",
                                description="Dispersive Loss on a small SiT trained on the 8x8 digits (CPU).")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {DEFAULTS['steps']}, quick {QUICK['steps']})")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benches/results/demo_dispersive/ inside the repo, else ./contrastgen_demo)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: an end-to-end smoke run (~30-60 s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: block depth//4, tau 0.5, weight 0.5; pytorch_port: last block, tau 1, weight 0.25")
    p.add_argument("--weight", type=float, default=None, help="override the preset's weight (lambda)")
    p.add_argument("--tau", type=float, default=None, help="override the preset's temperature")
    p.add_argument("--sampler", choices=["euler", "heun"], default="heun")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guided evaluation (the unguided one is always run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # size knobs (defaults depend on --quick)
    for k in ("batch_size", "hidden", "depth", "heads", "patch", "samples_per_class", "sample_steps",
              "classifier_epochs"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    for k in ("lr", "ema"):
        p.add_argument("--" + k, type=float, default=None)
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = default_out_dir()
    return args


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x, y = load_digits_16(args.device)
    tr, te = stratified_split(y, seed=args.seed)
    tr, te = tr.to(args.device), te.to(args.device)
    t0 = time.perf_counter()
    clf, clf_acc = train_classifier(x[tr], y[tr], x[te], y[te], args.classifier_epochs, args.seed)
    clf_s = time.perf_counter() - t0
    feats_real = features(clf, x)
    fd_floor = frechet_distance(features(clf, x[te]), features(clf, x[tr]))
    print(f"classifier: test accuracy {clf_acc:.4f} ({len(te)} held-out digits, {clf_s:.1f} s); "
          f"FD(real test, real train) = {fd_floor:.3f}", flush=True)

    cfgs = [1.0] if args.cfg_scale == 1.0 else [1.0, args.cfg_scale]
    runs, hist = {}, {}
    for name, use_reg in (("baseline", False), ("dispersive", True)):
        ema, h, train_s, info = train_sit(args, x[tr], y[tr], use_reg, desc=f"SiT {name}")
        hist[name] = h
        t0 = time.perf_counter()
        r = dict(info, train_s=round(train_s, 2), fd={}, cond_acc={})
        for cfg in cfgs:
            xs, ys = generate(args, ema, cfg)
            r["fd"][str(cfg)] = round(frechet_distance(features(clf, xs), feats_real), 4)
            with torch.no_grad():
                r["cond_acc"][str(cfg)] = round((clf(xs).argmax(1) == ys).float().mean().item(), 4)
            if cfg == cfgs[-1]:
                r["grid"] = (xs, ys)
        r["sample_s"] = round(time.perf_counter() - t0, 2)
        k = max(1, len(h["diffusion"]) // 10)
        r["final_diffusion_loss"] = round(float(np.mean(h["diffusion"][-k:])), 5)
        r["final_dispersive_loss"] = round(float(np.mean(h["dispersive"][-k:])), 5)
        runs[name] = r

    save_figures(out, (x[te], y[te]), runs, hist, cfgs[-1])
    total_s = time.perf_counter() - t_start
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"train": len(tr), "test": len(te), "image": "1x16x16 in [-1,1] (bilinear from 8x8)"},
        "classifier_test_accuracy": round(clf_acc, 4),
        "fd_real_floor": round(fd_floor, 4),
        "fd_reference": "all 1797 real digits; features = DigitCNN 64-d penultimate pre-activation",
        "runs": {n: {k: v for k, v in r.items() if k != "grid"} for n, r in runs.items()},
        "losses": {n: {"diffusion": [round(v, 5) for v in h["diffusion"]],
                       "dispersive": [round(v, 5) for v in h["dispersive"]]} for n, h in hist.items()},
        "total_s": round(total_s, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    head = f"{'run':<11} {'diff.loss':>9} {'disp.loss':>9} " + " ".join(
        f"{'FD cfg' + str(c):>10} {'acc cfg' + str(c):>10}" for c in cfgs) + f" {'feat rms':>8} {'train s':>8}"
    print("\n" + head)
    for n, r in runs.items():
        print(f"{n:<11} {r['final_diffusion_loss']:>9.4f} {r['final_dispersive_loss']:>9.4f} " + " ".join(
            f"{r['fd'][str(c)]:>10.3f} {r['cond_acc'][str(c)]:>10.3f}" for c in cfgs) + f" {r['hooked_block_rms']:>8.3f} {r['train_s']:>8.1f}")
    print(f"(dispersive loss of the baseline is monitored only, floor log(1/B) = {-math.log(args.batch_size):.3f}; "
          f"feat rms = RMS of the hooked block's output; sampler {args.sampler} x {args.sample_steps} steps, "
          f"{10 * args.samples_per_class} samples; FD floor real-vs-real {fd_floor:.3f}; classifier acc {clf_acc:.3f})")
    print(f"wrote {out / 'samples.png'}, {out / 'losses.png'}, {out / 'summary.json'} in {total_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
