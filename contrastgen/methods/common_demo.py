"""Shared pieces of the contrastive demos (``contrastgen demo unclip | tulip | code | dcr | moco | simclr``).

* synthetic data made on the fly (nothing is downloaded): :func:`render_shapes` draws scenes of one coloured shape
  (4 shapes x 6 colours x 4 positions x 2 sizes) on a textured background, with a caption made of words of a
  small vocabulary (:data:`VOCAB`), and :func:`augment` makes random views (crop-and-resize, flip, colour
  jitter, noise), all vectorised in torch;
* tiny models built from configuration: :func:`image_encoder` (a timm ViT-tiny -- width 192, 3 heads -- of
  configurable depth and patch size, plus an MLP projection head);
* evaluation: :func:`knn_accuracy` (cosine k-NN of held-out embeddings against training embeddings);
* the common command line (:func:`base_parser`) and :func:`write_outputs` (summary.json, the loss curves and the
  :class:`contrastgen.metrics.ContrastiveMonitor` panels as PNG) into ``benches/results/demo_<name>/`` or ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = ("square", "circle", "triangle", "cross")
COLORS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1),
          "magenta": (0.95, 0.1, 0.9), "cyan": (0.1, 0.9, 0.95)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
VOCAB = ["<pad>", "a", "the", "at", "in", "is", "on", "shape", ","] + list(SIZES) + list(COLORS) + list(SHAPES) + \
    ["top", "bottom", "left", "right", "upper", "lower", "corner", "big", "little", "box", "ring", "wedge", "plus"]
WORD = {w: i for i, w in enumerate(VOCAB)}
CONTEXT = 10
SYNONYM = {"large": "big", "small": "little", "square": "box", "circle": "ring", "triangle": "wedge", "cross": "plus",
           "top": "upper", "bottom": "lower"}
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benches" / "results"


def default_out(name: str) -> Path:
    """``benches/results/demo_<name>`` when run from inside a checkout, else ``./contrastgen_demo_<name>`` (an
    installed package never writes next to its own files)."""
    try:
        inside = Path.cwd().resolve().is_relative_to(ROOT)
    except AttributeError:  # pragma: no cover  (python < 3.9)
        inside = str(Path.cwd().resolve()).startswith(str(ROOT))
    if inside and (ROOT / "benches").is_dir() and (ROOT / "contrastgen").is_dir():
        return RESULTS / f"demo_{name}"
    return Path(f"contrastgen_demo_{name}")


# ----------------------------------------------------------------------------------------------- data
def _tokens(words: List[str]) -> List[int]:
    ids = [WORD[w] for w in words][:CONTEXT]
    return ids + [0] * (CONTEXT - len(ids))


def caption_ids(attrs: torch.Tensor, paraphrase: bool = False) -> torch.Tensor:
    """(N, 4) attribute ids (shape, colour, position, size) -> (N, CONTEXT) token ids.  ``paraphrase`` uses another
    word order and synonyms (TULIP's text views)."""
    rows = []
    colors = list(COLORS)
    for s, c, p, z in attrs.tolist():
        pos = POSITIONS[p].split()
        if not paraphrase:
            words = ["a", SIZES[z], colors[c], SHAPES[s], "at", "the"] + pos
        else:
            words = ["the", SYNONYM[SHAPES[s]], "is", colors[c], ",", SYNONYM[SIZES[z]], "in", SYNONYM[pos[0]], pos[1]]
        rows.append(_tokens(words))
    return torch.tensor(rows, dtype=torch.long)


def attribute_key(attrs: torch.Tensor) -> torch.Tensor:
    """One integer per attribute combination (for retrieval correctness)."""
    s, c, p, z = attrs.unbind(1)
    return ((s * len(COLORS) + c) * len(POSITIONS) + p) * len(SIZES) + z


def render_shapes(n: int, size: int = 32, seed: int = 0, attrs: Optional[torch.Tensor] = None):
    """(images (N, 3, size, size) in [-1, 1], attrs (N, 4) = shape, colour, position, size ids)."""
    g = torch.Generator().manual_seed(seed)
    if attrs is None:
        attrs = torch.stack([torch.randint(0, len(SHAPES), (n,), generator=g),
                             torch.randint(0, len(COLORS), (n,), generator=g),
                             torch.randint(0, len(POSITIONS), (n,), generator=g),
                             torch.randint(0, len(SIZES), (n,), generator=g)], 1)
    n = attrs.shape[0]
    s, c, p, z = attrs.unbind(1)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    cx = torch.where(p % 2 == 0, 0.28, 0.72) + 0.06 * (torch.rand(n, generator=g) - 0.5)
    cy = torch.where(p < 2, 0.28, 0.72) + 0.06 * (torch.rand(n, generator=g) - 0.5)
    r = torch.where(z == 0, 0.12, 0.2) * (1 + 0.1 * (torch.rand(n, generator=g) - 0.5))
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    r = r[:, None, None]
    square = (dx.abs() <= r) & (dy.abs() <= r)
    circle = dx ** 2 + dy ** 2 <= r ** 2
    triangle = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    cross = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    masks = torch.stack([square, circle, triangle, cross], 1)[torch.arange(n), s].float()
    rgb = torch.tensor(list(COLORS.values()))[c]                                   # (N, 3)
    freq = 2 + 4 * torch.rand(n, 1, 1, generator=g)
    phase = 6.28 * torch.rand(n, 1, 1, generator=g)
    bg = 0.25 + 0.08 * torch.sin(freq * 6.28 * (xs[None] + ys[None]) + phase)       # textured grey background
    bg = bg[:, None] + 0.03 * torch.randn(n, 3, size, size, generator=g)
    img = bg * (1 - masks[:, None]) + rgb[:, :, None, None] * masks[:, None]
    return (img.clamp(0, 1) * 2 - 1), attrs


def augment(x: torch.Tensor, generator: torch.Generator, scale=(0.6, 1.0), out_size: Optional[int] = None,
            jitter: float = 0.3, noise: float = 0.05) -> torch.Tensor:
    """Random crop-and-resize (area fraction ``scale``), horizontal flip, brightness / contrast jitter and Gaussian
    noise, per image, in one batched ``grid_sample``."""
    n = x.shape[0]
    out = out_size or x.shape[-1]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    side = area.sqrt()
    tx = (1 - side) * (2 * torch.rand(n, generator=generator) - 1)
    ty = (1 - side) * (2 * torch.rand(n, generator=generator) - 1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    grid = F.affine_grid(theta, (n, x.shape[1], out, out), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    b = 1 + jitter * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    m = y.mean((1, 2, 3), keepdim=True)
    y = (y - m) * b + m + 0.5 * jitter * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    return (y + noise * torch.randn(y.shape, generator=generator)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------- models
class ImageEncoder(nn.Module):
    """timm ViT (ViT-tiny width/heads) -> ``feat_dim`` features -> MLP projection head -> ``proj_dim``."""

    def __init__(self, img_size: int = 32, patch_size: int = 8, depth: int = 4, feat_dim: int = 128,
                 proj_dim: int = 64, width: int = 192, heads: int = 3):
        super().__init__()
        from .unclip import vit_image_tower
        self.backbone = vit_image_tower(feat_dim, img_size=img_size, patch_size=patch_size, depth=depth, width=width,
                                        heads=heads)
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.GELU(), nn.Linear(feat_dim, proj_dim))

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.backbone(x))


def optimizer(params, lr: float, steps: int, weight_decay: float = 0.05, warmup: float = 0.1):
    """AdamW with a linear warm-up over ``warmup`` of the steps and a cosine decay to 10% (the usual SSL recipe)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    w = max(1, int(warmup * steps))

    def factor(i):
        if i < w:
            return (i + 1) / w
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - w) / max(1, steps - w))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def embed(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 k: int = 5) -> float:
    """Cosine k-NN (majority vote) accuracy of the test embeddings against the training embeddings."""
    sims = F.normalize(test.float(), dim=1) @ F.normalize(train.float(), dim=1).T
    idx = sims.topk(min(k, train.shape[0]), dim=1).indices
    votes = train_y[idx]
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.zeros(test.shape[0], n_cls).scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float))
    return float((counts.argmax(1) == test_y).float().mean())


# ----------------------------------------------------------------------------------------------- CLI + output
def base_parser(name: str, doc: str, defaults: Dict, quick: Dict) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"contrastgen demo {name}", description=doc.strip().splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_out(name), help="output folder (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"short smoke run ({quick})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--backend", default=None, help="contrastgen backend (default: per device)")
    ap.add_argument("--log-every", type=int, default=0, help="print every N steps (0: about 10 lines)")
    ap.add_argument("--no-progress", action="store_true", help="print only the summary")
    for k, v in defaults.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} (quick: {quick.get(k, v)})")
    ap.set_defaults(_defaults=defaults, _quick=quick)
    return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    base = args._quick if args.quick else args._defaults
    for k, v in args._defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, base.get(k, v))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


class Progress:
    def __init__(self, name: str, steps: int, args):
        self.name, self.steps, self.quiet = name, steps, args.no_progress
        self.every = args.log_every or max(1, steps // 10)
        self.t0 = time.perf_counter()

    def __call__(self, step: int, text: str):
        if not self.quiet and (step % self.every == 0 or step == self.steps - 1):
            print(f"[{self.name}] step {step + 1:>4}/{self.steps}  {text}  ({time.perf_counter() - self.t0:.1f} s)",
                  flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _plot_curves(path: Path, curves: Dict[str, List[float]], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.0), squeeze=False)
    for a, (k, v) in zip(ax[0], curves.items()):
        a.plot(range(1, len(v) + 1), v, lw=1.0)
        a.set_title(k, fontsize=9)
        a.set_xlabel("step", fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_tail(v: List[float], frac: float = 0.1) -> float:
    k = max(1, int(len(v) * frac))
    return float(sum(v[-k:]) / k)


def mean_head(v: List[float], frac: float = 0.1) -> float:
    k = max(1, int(len(v) * frac))
    return float(sum(v[:k]) / k)


def write_outputs(out: Path, name: str, args, summary: Dict, curves: Dict[str, List[float]], monitors: Dict) -> Dict:
    """summary.json, losses.png and one monitor_<key>.png per monitor; returns the summary written."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    summary = {"demo": name, "config": cfg, **summary,
               "loss_first_10pct": {k: round(mean_head(v), 5) for k, v in curves.items() if v},
               "loss_last_10pct": {k: round(mean_tail(v), 5) for k, v in curves.items() if v},
               "curves": {k: [round(x, 5) for x in v] for k, v in curves.items()},
               "monitor": {k: m.to_dict() for k, m in monitors.items()},
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    clean = json.loads(json.dumps(summary, default=float).replace("NaN", "null"))
    (out / "summary.json").write_text(json.dumps(clean, indent=1))
    _plot_curves(out / "losses.png", curves, f"contrastgen demo {name}: training losses")
    for k, m in monitors.items():
        if len(m.history["step"]):
            m.plot(out / f"monitor_{k}.png", title=f"demo {name}: {k} monitoring")
    return clean


def print_summary(name: str, rows: Dict[str, object]):
    print(f"\n== contrastgen demo {name} ==")
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4f}" if math.isfinite(v) else str(v)
        print(f"  {k:<{width}}  {v}")
