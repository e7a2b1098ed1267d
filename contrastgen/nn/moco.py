"""MoCo's two building blocks: a FIFO memory bank of keys and a momentum (EMA) key encoder.

* :class:`MoCoQueue` -- a fixed-size first-in-first-out bank of detached keys (facebookresearch/moco's
  ``queue`` / ``_dequeue_and_enqueue``), labels optional; ``contrastgen.info_nce(q, k, negatives=queue)`` reads
  its storage without a copy.
* :class:`MomentumEncoder` -- a frozen copy of an encoder updated as ``theta_k <- m theta_k + (1 - m) theta_q``
  (MoCo v1/v2: constant m = 0.999; MoCo v3: m follows :func:`moco_momentum`, a half-cosine from 0.99 to 1).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MoCoQueue(nn.Module):
    """A fixed-size FIFO bank of ``size`` keys of dimension ``dim`` (and, with ``labels=True``, their labels).

    ``enqueue(keys, labels=None)`` stores detached copies of the newest keys, overwriting the oldest ones
    (wrapping around the ring buffer; a batch larger than the queue keeps its last ``size`` keys).  Unlike the
    official code, the batch size need not divide ``size``.
    ``init="random"`` (default, as MoCo) starts full of random unit vectors (labels -1); ``init="empty"`` starts
    empty and the bank grows until it is full.

    Reading: ``as_negatives()`` / :attr:`keys` -- a view of the filled part (no copy), (len, dim), in storage order
    (the loss does not depend on the order); :attr:`labels` likewise; :meth:`ordered` -- a copy, oldest first.
    ``info_nce(q, k, negatives=queue)`` uses the bank as shared negatives (read in place with the default
    ``similarity="dot"``: enqueue unit-norm keys; ``"cosine"`` normalises the bank into a new tensor each call);
    for label-aware use (supervised MoCo)
    pass ``key=queue.keys, key_labels=queue.labels`` instead, which is no copy either.
    The write position and the fill count are python ints (saved through ``get_extra_state``), so reading them
    costs no device sync.
    """

    def __init__(self, size: int, dim: int, *, labels: bool = False, dtype=torch.float32, device=None,
                 init: str = "random"):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        bank = torch.zeros(size, dim, dtype=dtype, device=device)
        if init == "random":
            bank = F.normalize(torch.randn(size, dim, device=device, dtype=torch.float32), dim=1).to(dtype)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", torch.full((size,), -1, dtype=torch.long, device=device) if labels else None)
        self.size, self.dim, self.with_labels = size, dim, labels
        self.ptr = 0
        self.count = size if init == "random" else 0

    def __len__(self) -> int:
        return self.count

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, labels={self.with_labels}, filled={self.count}"

    def get_extra_state(self):
        return {"ptr": self.ptr, "count": self.count}

    def set_extra_state(self, state):
        self.ptr, self.count = int(state["ptr"]), int(state["count"])

    @property
    def keys(self) -> torch.Tensor:
        """The stored keys (len, dim): a view, no copy."""
        return self.bank if self.count == self.size else self.bank[: self.count]

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The stored labels (len,), a view; None without ``labels=True``."""
        if self.bank_labels is None:
            return None
        return self.bank_labels if self.count == self.size else self.bank_labels[: self.count]

    def as_negatives(self) -> torch.Tensor:
        """What ``info_nce(..., negatives=queue)`` reads: :attr:`keys`."""
        return self.keys

    def ordered(self):
        """(keys, labels) oldest first (copies); labels is None without ``labels=True``."""
        if self.count < self.size:
            return self.bank[: self.count].clone(), None if self.bank_labels is None else self.bank_labels[: self.count].clone()
        idx = (torch.arange(self.size, device=self.bank.device) + self.ptr) % self.size
        return self.bank[idx], None if self.bank_labels is None else self.bank_labels[idx]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (B, {self.dim}), got {shape}")
        if self.with_labels:
            if labels is None:
                raise ValueError("this queue stores labels (labels=True): enqueue(keys, labels) needs them")
            if (not isinstance(labels, torch.Tensor) or labels.shape != (keys.shape[0],) or labels.dtype.is_floating_point
                    or labels.dtype == torch.bool):
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must be an integer tensor of shape ({keys.shape[0]},), got {shape}")
        elif labels is not None:
            raise ValueError("labels given to a queue without labels (create it with labels=True)")
        n = keys.shape[0]
        if n == 0:
            return
        if n > self.size:   # only the newest `size` keys survive
            keys = keys[n - self.size:]
            labels = None if labels is None else labels[n - self.size:]
            n = self.size
        idx = (torch.arange(n, device=self.bank.device) + self.ptr) % self.size
        self.bank.index_copy_(0, idx, keys.detach().to(device=self.bank.device, dtype=self.bank.dtype))
        if labels is not None:
            self.bank_labels.index_copy_(0, idx, labels.to(device=self.bank.device, dtype=torch.long))
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)


def moco_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """MoCo v3's momentum schedule: ``m = final - (final - base) (1 + cos(pi step / total_steps)) / 2``, from
    ``base`` at step 0 to ``final`` at ``total_steps`` (facebookresearch/moco-v3 ``adjust_moco_momentum``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * t))


class MomentumEncoder(nn.Module):
    """A momentum (EMA) copy of ``encoder`` for MoCo-style keys: its parameters never receive gradients and
    :meth:`update` moves them towards the online encoder's, ``theta_k <- m theta_k + (1 - m) theta_q``; buffers
    (BatchNorm statistics) are copied.  ``momentum`` is constant (MoCo v1/v2: 0.999) unless ``total_steps`` is
    given, then it follows :func:`moco_momentum` from ``momentum`` to ``final_momentum`` (MoCo v3: 0.99 -> 1).
    Calling the module runs the copy under ``torch.no_grad()``.
    """

    def __init__(self, encoder: nn.Module, momentum: float = 0.999, total_steps: Optional[int] = None,
                 final_momentum: float = 1.0):
        super().__init__()
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= final_momentum <= 1.0:
            raise ValueError(f"momentum and final_momentum must lie in [0, 1], got {momentum}, {final_momentum}")
        self.module = copy.deepcopy(encoder)
        self.module.requires_grad_(False)
        self.base_momentum, self.total_steps, self.final_momentum = float(momentum), total_steps, float(final_momentum)
        self.steps = 0

    def momentum(self, step: Optional[int] = None) -> float:
        step = self.steps if step is None else step
        if self.total_steps is None:
            return self.base_momentum
        return moco_momentum(step, self.total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, encoder: nn.Module, step: Optional[int] = None) -> float:
        """One EMA step towards ``encoder`` (the online network); returns the momentum used."""
        m = self.momentum(step)
        ema = list(self.module.parameters())
        online = list(encoder.parameters())
        if len(ema) != len(online) or any(a.shape != b.shape for a, b in zip(ema, online)):
            raise ValueError("encoder does not have the parameters of the momentum copy (same architecture needed)")
        if ema:
            torch._foreach_lerp_(ema, [p.detach() for p in online], 1.0 - m)
        for b_ema, b in zip(self.module.buffers(), encoder.buffers()):
            b_ema.copy_(b)
        self.steps += 1
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
