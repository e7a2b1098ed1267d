"""``contrastgen demo cut``: unpaired image-to-image translation with CUT on scikit-learn's digits (CPU, minutes).

Domains (nothing is downloaded: the 1797 8x8 digits ship inside scikit-learn):
* A: the digits upsampled to 16x16, white strokes on black, as 3 grey channels in [-1, 1];
* B: the same kind of digits restyled by a fixed transform: strokes thickened (3x3 max filter), colours inverted
  and tinted (dark red strokes on a cream background).
A stratified 80/20 split gives train and test digits; the training digits are split again into two disjoint halves,
one used only as domain A and the other only (restyled) as domain B, so no (x, T(x)) pair is ever shown.

The same small CUT (ResNet generator with n_blocks residual blocks, PatchGAN discriminator, PatchNCE on the
generator layers 0,4,8,12,16 through ``contrastgen.patch_nce``, every layer in one fused call) is trained twice
with the same seed and batches: once as CUT (lambda_NCE = 1 with the identity term), once without the PatchNCE
term (lambda_NCE = 0: the GAN loss alone).  Measured on the 360 test digits:
* content preservation: accuracy of a digit classifier trained on domain B (restyled training digits), applied to
  G(test digit in domain A); it stays high only if the translation kept the digit;
* Frechet distance (FD) between the classifier's 64-d penultimate features of the translations and of the test
  digits in domain B.
* diagnostic: the same classifier on the translations with stroke and background colours swapped (a shape kept
  but drawn in the wrong polarity reads correctly only after the swap).
For scale: the classifier on the real domain-B test digits, on the untranslated domain-A test digits, and the FD of
those two sets.  Writes into --out (default benches/results/demo_cut/): ``translations.png`` (source | CUT | no
PatchNCE | the fixed transform, for scale), ``losses.png`` and ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common_demo import default_out
from .cut import CUTConfig, CUTModel
from .dispersive_demo import frechet_distance, load_digits_16, stratified_split

DEFAULTS = dict(steps=1200, batch_size=8, ngf=16, n_blocks=6, ndf=16, n_layers_d=2, num_patches=256, nc=256,
                lr=2e-4, classifier_epochs=8)
TINY = dict(steps=6, batch_size=2, ngf=4, n_blocks=5, ndf=4, n_layers_d=1, num_patches=16, nc=16, lr=2e-4,
            classifier_epochs=1)
BG = torch.tensor([0.96, 0.92, 0.78])     # domain B background (cream)
FG = torch.tensor([0.55, 0.08, 0.10])     # domain B strokes (dark red)


# --------------------------------------------------------------------------- domains
def to_domain_a(x01: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16) intensities in [0, 1] -> (N, 3, 16, 16) in [-1, 1], white strokes on black."""
    return x01.repeat(1, 3, 1, 1) * 2 - 1


def to_domain_b(x01: torch.Tensor) -> torch.Tensor:
    """The fixed restyling: thicken (3x3 max filter), invert and tint: strokes FG on background BG, in [-1, 1]."""
    v = F.max_pool2d(x01, 3, stride=1, padding=1)
    rgb = BG.view(1, 3, 1, 1) * (1 - v) + FG.view(1, 3, 1, 1) * v
    return rgb * 2 - 1


def make_domains(seed: int):
    x, y = load_digits_16()
    x01 = (x + 1) / 2
    tr, te = stratified_split(y, seed=seed)
    g = torch.Generator().manual_seed(seed)
    perm = tr[torch.randperm(len(tr), generator=g)]
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]      # disjoint digit instances
    return {
        "a_train": to_domain_a(x01[half_a]), "b_train": to_domain_b(x01[half_b]),
        "clf_x": to_domain_b(x01[tr]), "clf_y": y[tr],                    # the classifier's domain-B training set
        "a_test": to_domain_a(x01[te]), "b_test": to_domain_b(x01[te]), "y_test": y[te],
        "sizes": {"a_train": len(half_a), "b_train": len(half_b), "test": len(te), "classifier_train": len(tr)},
    }


# --------------------------------------------------------------------------- evaluator
class DigitClassifier(nn.Module):
    def __init__(self, feat_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 4 * 4, feat_dim)
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x):
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def train_classifier(x, y, epochs: int, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = x[idx] + 0.05 * torch.randn(len(idx), *x.shape[1:], generator=g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def swap_polarity(x: torch.Tensor) -> torch.Tensor:
    """Diagnostic: project each pixel on domain B's colour line (v = 0 at BG, 1 at FG, clamped) and swap the two
    colours (v -> 1 - v): a translation that kept the digit's shape but drew it in the wrong polarity (light strokes
    on dark) is read correctly by the classifier after the swap, one that lost the shape is not."""
    x01 = (x + 1) / 2
    d = (FG - BG).view(1, 3, 1, 1)
    v = (((x01 - BG.view(1, 3, 1, 1)) * d).sum(1, keepdim=True) / (d * d).sum()).clamp(0, 1)
    return (BG.view(1, 3, 1, 1) * v + FG.view(1, 3, 1, 1) * (1 - v)) * 2 - 1


@torch.no_grad()
def evaluate(clf: DigitClassifier, x: torch.Tensor, y: torch.Tensor, ref_feats: np.ndarray) -> dict:
    acc = (clf(x).argmax(1) == y).float().mean().item()
    fd = frechet_distance(clf.features(x).double().numpy(), ref_feats)
    return {"accuracy": round(acc, 4), "fd": round(max(fd, 0.0), 4)}


# --------------------------------------------------------------------------- training
def train_cut(args, dom, lambda_nce: float, desc: str):
    torch.manual_seed(args.seed)
    cfg = CUTConfig.cut(lambda_nce=lambda_nce, nce_idt=lambda_nce > 0, num_patches=args.num_patches,
                        netf_nc=args.nc, lr=args.lr)
    model = CUTModel(cfg, 3, 3, ngf=args.ngf, n_blocks=args.n_blocks, ndf=args.ndf, n_layers_d=args.n_layers_d,
                     backend=args.backend)
    g = torch.Generator().manual_seed(args.seed + 1)
    na, nb = len(dom["a_train"]), len(dom["b_train"])
    hist: dict = {}
    from tqdm.auto import tqdm
    bar = tqdm(range(args.steps), desc=desc, disable=args.no_progress, dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    for step in bar:
        ia = torch.randint(0, na, (args.batch_size,), generator=g)
        ib = torch.randint(0, nb, (args.batch_size,), generator=g)           # independent draws: unpaired
        losses = model.train_step(dom["a_train"][ia], dom["b_train"][ib])
        for k, v in losses.items():
            hist.setdefault(k, []).append(round(v, 5))
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("G_GAN", "D", "NCE")})
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        fake = torch.cat([model.translate(dom["a_test"][i:i + 128]) for i in range(0, len(dom["a_test"]), 128)])
    return fake, hist, train_s


# --------------------------------------------------------------------------- figures
def _to_img(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def save_figures(out: Path, dom, fakes: dict, hists: dict, n_show: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = dom["y_test"]
    idx = [int(torch.nonzero(y == c)[0]) for c in range(10)][:n_show]
    cols = [("source (A)", dom["a_test"])] + [(n, f) for n, f in fakes.items()] + [("fixed transform", dom["b_test"])]
    fig, axes = plt.subplots(len(idx), len(cols), figsize=(1.3 * len(cols), 1.3 * len(idx)))
    for r, i in enumerate(idx):
        for c, (name, imgs) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(_to_img(imgs[i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "translations.png", dpi=90)
    plt.close(fig)

    keys = ["G_GAN", "D", "NCE", "NCE_Y"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        for name, h in hists.items():
            if k in h:
                v = np.asarray(h[k])
                w = max(1, len(v) // 50)
                sm = np.convolve(v, np.ones(w) / w, mode="valid")
                ax.plot(np.arange(len(sm)) + w - 1, sm, label=name)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point
def default_out_dir() -> Path:
    return default_out("cut")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="contrastgen demo cut",
                                description="CUT unpaired translation digits -> restyled digits on CPU, with and "
                                            "without the PatchNCE term.")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benches/results/demo_cut/ inside the repo, else ./contrastgen_demo_cut)")
    p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model: an end-to-end smoke run (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["cpp", "triton", "torch"], default=None, help="patch_nce backend")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    for k in ("steps", "batch_size", "ngf", "n_blocks", "ndf", "n_layers_d", "num_patches", "nc", "classifier_epochs"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(argv)
    base = TINY if args.tiny else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_blocks < 5:
        p.error("--n-blocks must be >= 5: CUT's nce layer 16 is the fifth residual block")
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
    dom = make_domains(args.seed)

    t0 = time.perf_counter()
    clf = train_classifier(dom["clf_x"], dom["clf_y"], args.classifier_epochs, args.seed)
    with torch.no_grad():
        ref_feats = clf.features(dom["b_test"]).double().numpy()
    scale = {"real_domain_b": evaluate(clf, dom["b_test"], dom["y_test"], ref_feats),
             "untranslated_domain_a": evaluate(clf, dom["a_test"], dom["y_test"], ref_feats)}
    scale["real_domain_b"]["accuracy_polarity_swapped"] = evaluate(clf, swap_polarity(dom["b_test"]), dom["y_test"],
                                                                   ref_feats)["accuracy"]
    scale["real_domain_b"]["fd_train_vs_test"] = round(frechet_distance(
        clf.features(dom["b_train"]).detach().double().numpy(), ref_feats), 4)
    print(f"classifier (trained on domain B, {time.perf_counter() - t0:.1f} s): accuracy on domain-B test digits "
          f"{scale['real_domain_b']['accuracy']:.3f}, on untranslated domain-A test digits "
          f"{scale['untranslated_domain_a']['accuracy']:.3f} (FD {scale['untranslated_domain_a']['fd']:.2f})",
          flush=True)

    runs, fakes, hists = {}, {}, {}
    for name, lam in (("CUT", 1.0), ("no PatchNCE", 0.0)):
        fake, hist, train_s = train_cut(args, dom, lam, desc=name)
        r = evaluate(clf, fake, dom["y_test"], ref_feats)
        r["accuracy_polarity_swapped"] = evaluate(clf, swap_polarity(fake), dom["y_test"], ref_feats)["accuracy"]
        k = max(1, len(hist["G_GAN"]) // 10)
        r.update(lambda_nce=lam, nce_idt=lam > 0, train_s=round(train_s, 2),
                 final={key: round(float(np.mean(v[-k:])), 4) for key, v in hist.items()})
        runs[name], fakes[name], hists[name] = r, fake, hist
        print(f"{name}: content preservation (classifier accuracy on G(A)) {r['accuracy']:.3f} (on the "
              f"polarity-swapped G(A) {r['accuracy_polarity_swapped']:.3f}), FD to domain B {r['fd']:.2f}, "
              f"{train_s:.0f} s", flush=True)

    save_figures(out, dom, fakes, hists)
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {**dom["sizes"], "image": "3x16x16 in [-1,1]; A: grey digits; B: thickened (3x3 max), inverted, "
                                          "tinted (dark red on cream); A and B from disjoint training digits"},
        "metric": "classifier trained on domain-B training digits; accuracy on G(A test) = content preservation; "
                  "FD in its 64-d penultimate features to the domain-B test digits; accuracy_polarity_swapped: the "
                  "same classifier on G(A test) with stroke and background colours swapped (diagnostic: shape kept "
                  "but drawn in the wrong polarity)",
        "scale": scale,
        "runs": runs,
        "losses": hists,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    with open(out / "results.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out / 'results.json'}, translations.png, losses.png ({summary['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
