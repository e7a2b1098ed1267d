"""Monitoring of contrastive training: alignment, uniformity, effective temperature, positive/negative similarity
gap, effective rank (collapse), and :class:`ContrastiveMonitor`, which logs them per step.

All metrics take embeddings as the model outputs them and work on detached copies; none materialises an N x N
matrix: uniformity runs the fused O(N)-memory op (:func:`contrastgen.uniformity`, so N = 10^5 - 10^6 fits), the
similarity gap uses sum_ij x_i . y_j = (sum_i x_i) . (sum_j y_j), the rank works on the D x D covariance.

* ``alignment(x, y)`` (Wang & Isola 2020): ``mean_i ||x_i - y_i||^alpha`` of the L2-normalised positive pairs
  (alpha = 2); 0 = perfectly aligned, 4 = opposite.
* ``uniformity(x)``: ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of the normalised embeddings (t = 2); lower is more
  uniform; for points spread uniformly on the sphere it tends to -2t (-4 for t = 2) as the dimension grows, and it is
  0 for a collapsed embedding.
* ``similarity_gap(x, y)``: mean cosine of the positive pairs (i, i), of the negative pairs (i != j), and their
  difference; the gap closes when the embedding collapses or stops discriminating.
* ``effective_rank(x)`` (Roy & Vetterli 2007): ``exp(H(p))``, p the normalised eigenvalues of the covariance of the
  normalised embeddings; from 1 (complete collapse) to D (isotropic); dimensional collapse shows as a low value.
* ``effective_temperature(x, y, temperature=... | logit_scale=...)``: the temperature on the cosine scale,
  ``tau / mean_i(||x_i|| ||y_i||)`` -- with dot-product logits ``x.y / tau = cos * ||x|| ||y|| / tau``, so growing
  feature norms sharpen the softmax exactly like a smaller temperature; equals tau for unit-norm features.
  ``logit_scale`` s (CLIP's exp(theta)) means tau = 1 / s.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["alignment", "uniformity", "similarity_gap", "effective_rank", "effective_temperature",
           "ContrastiveMonitor"]


def _emb(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty (N, D) tensor of embeddings, got {shape}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    return x.detach()


def _pair(x, y):
    x = _emb(x, "x")
    y = _emb(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (N, D): {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    x, y = _pair(x, y)
    return ops.alignment(F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1), alpha=alpha)


def uniformity(x: torch.Tensor, t: float = 2.0, max_samples: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fused uniformity of the normalised embeddings; ``max_samples`` draws a random subset first (CPU speed)."""
    x = _emb(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {tuple(x.shape)}")
    if max_samples is not None and x.shape[0] > max_samples:
        idx = torch.randperm(x.shape[0], generator=generator, device="cpu")[:max_samples].to(x.device)
        x = x[idx]
    return ops.uniformity(F.normalize(x.float(), dim=1), t=t)


def similarity_gap(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """{"pos": mean_i cos(x_i, y_i), "neg": mean_{i != j} cos(x_i, y_j), "gap": pos - neg}; O(N D)."""
    x, y = _pair(x, y)
    xn, yn = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    n = x.shape[0]
    diag = (xn * yn).sum(1).sum()
    pos = float(diag / n)
    neg = float(((xn.sum(0) @ yn.sum(0)) - diag) / (n * (n - 1))) if n > 1 else float("nan")
    return {"pos": pos, "neg": neg, "gap": pos - neg}


def effective_rank(x: torch.Tensor, normalize: bool = True) -> float:
    """exp(entropy) of the normalised eigenvalue spectrum of the covariance of x (normalised rows by default)."""
    x = _emb(x, "x").double()
    if normalize:
        x = F.normalize(x, dim=1)
    if x.shape[0] < 2:
        raise ValueError(f"effective_rank needs at least 2 embeddings, got {tuple(x.shape)}")
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / (x.shape[0] - 1)
    ev = torch.linalg.eigvalsh(cov).clamp_min(0)
    total = ev.sum()
    if total <= 0:
        return 1.0
    p = ev / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_temperature(x: torch.Tensor, y: Optional[torch.Tensor] = None, *, temperature=None,
                          logit_scale=None) -> float:
    """tau / mean_i(||x_i|| ||y_i||) (y defaults to x); give ``temperature`` or ``logit_scale`` (= 1 / tau)."""
    if (temperature is None) == (logit_scale is None):
        raise ValueError("give exactly one of temperature and logit_scale")
    tau = float(temperature) if temperature is not None else 1.0 / float(logit_scale)
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"the temperature must be finite and > 0, got {tau}")
    x = _emb(x, "x").double()
    y = x if y is None else _pair(x, y)[1].double()
    return tau / float((x.norm(dim=1) * y.norm(dim=1)).mean())


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().reshape(-1)[0]) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class ContrastiveMonitor:
    """Per-step contrastive-training metrics: a dict of lists (:attr:`history`), TensorBoard scalars when a writer
    is available, and a PNG summary (:meth:`plot`).

    ``log(step, x, y=None, *, loss=None, temperature=None, logit_scale=None, **scalars)``: x (and y, the positive
    partner of each row, e.g. the other view or the paired text) are embeddings; records alignment, similarity
    gap (with y), uniformity, effective rank, effective temperature (with a temperature / logit scale), the loss
    and any extra scalars; returns the step's metrics.  Every ``every``-th step is measured (others return {}).
    ``uniformity_samples`` caps the uniformity at a random subset (None: all rows -- fine on GPU, N^2 work on CPU).
    ``writer``: an object with ``add_scalar(tag, value, step)`` (e.g. ``torch.utils.tensorboard.SummaryWriter``);
    with ``log_dir`` and no writer, a SummaryWriter is created when TensorBoard is installed.
    """

    METRICS = ("loss", "alignment", "uniformity", "pos_sim", "neg_sim", "sim_gap", "effective_rank",
               "effective_temperature")

    def __init__(self, log_dir=None, *, writer=None, every: int = 1, uniformity_samples: Optional[int] = 4096,
                 uniformity_t: float = 2.0, prefix: str = "contrastive", seed: int = 0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.uniformity_samples, self.uniformity_t, self.prefix = every, uniformity_samples, uniformity_t, prefix
        self.history: Dict[str, List[float]] = {"step": []}
        self.writer = writer
        if writer is None and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(log_dir))
            except Exception:  # noqa: BLE001 - TensorBoard not installed: dict + PNG only
                self.writer = None
        self._gen = torch.Generator().manual_seed(seed)

    def measure(self, x, y=None, *, loss=None, temperature=None, logit_scale=None) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if loss is not None:
            out["loss"] = _scalar(loss)
        x = _emb(x, "x")
        if y is not None:
            out["alignment"] = float(alignment(x, y))
            gap = similarity_gap(x, y)
            out.update(pos_sim=gap["pos"], neg_sim=gap["neg"], sim_gap=gap["gap"])
        if x.shape[0] >= 2:
            out["uniformity"] = float(uniformity(x, t=self.uniformity_t, max_samples=self.uniformity_samples,
                                                 generator=self._gen))
            out["effective_rank"] = effective_rank(x)
        if temperature is not None or logit_scale is not None:
            out["effective_temperature"] = effective_temperature(x, y, temperature=_scalar(temperature) if temperature
                                                                 is not None else None,
                                                                 logit_scale=_scalar(logit_scale) if logit_scale
                                                                 is not None else None)
        return out

    def log(self, step: int, x, y=None, *, loss=None, temperature=None, logit_scale=None, **scalars) -> Dict[str, float]:
        if step % self.every:
            return {}
        with torch.no_grad():
            out = self.measure(x, y, loss=loss, temperature=temperature, logit_scale=logit_scale)
        for k, v in scalars.items():
            s = _scalar(v)
            if s is None:
                raise TypeError(f"extra scalar {k!r} must be a number or a one-element tensor, got {type(v).__name__}")
            out[k] = s
        n_before = len(self.history["step"])
        self.history["step"].append(int(step))
        for k, v in out.items():
            col = self.history.setdefault(k, [float("nan")] * n_before)
            col.append(v)
        for k, col in self.history.items():
            if len(col) < n_before + 1:
                col.append(float("nan"))
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(f"{self.prefix}/{k}", v, step)
        return out

    def last(self) -> Dict[str, float]:
        return {k: v[-1] for k, v in self.history.items() if v}

    @staticmethod
    def format(metrics: Dict[str, float]) -> str:
        names = {"alignment": "align", "uniformity": "unif", "sim_gap": "gap", "effective_rank": "erank",
                 "effective_temperature": "tau_eff"}
        return "  ".join(f"{names.get(k, k)} {v:.4g}" for k, v in metrics.items() if k != "step")

    def to_dict(self) -> Dict[str, List[float]]:
        return {k: list(v) for k, v in self.history.items()}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: [None if (isinstance(x, float) and not math.isfinite(x)) else x for x in v]
                 for k, v in self.history.items()}
        path.write_text(json.dumps(clean))
        return path

    def plot(self, path, title: Optional[str] = None) -> Path:
        """One panel per recorded metric against the step; written as PNG."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [k for k in self.history if k != "step" and any(math.isfinite(v) for v in self.history[k])]
        if not keys:
            raise ValueError("nothing logged yet")
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
        steps = self.history["step"]
        for ax, k in zip(axes.flat, keys):
            ax.plot(steps, self.history[k], lw=1.2)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self):
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()
