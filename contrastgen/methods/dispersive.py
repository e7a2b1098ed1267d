"""Dispersive Loss (Wang & He 2025) as a plug-in regularizer for diffusion/flow transformers (DiT, SiT, ...).

Usage::

    model = SiT("SiT-XL/2")
    reg = DispersiveRegularizer.paper(model.blocks)            # block depth // 4, tau 0.5, weight 0.5
    for x, y in loader:
        loss = sit_loss(model, x, y) + reg.pop_loss()          # the hook captured the block's output
        loss.backward(); opt.step(); opt.zero_grad()
    model.eval()                                               # no hook work in eval mode
    with reg.paused():                                         # ... or switch it off explicitly
        samples = sample_heun(model, noise, labels)

A forward hook on each hooked module stores its output (the first element if the module returns a tuple) for
the current step; :meth:`DispersiveRegularizer.pop_loss` flattens each capture per sample to (B, M), evaluates
:func:`contrastgen.dispersive_loss` on it and returns ``weight * sum(losses)``, then forgets the captures.
Captures of equal shape (several hooked blocks, or several forwards before one ``pop_loss``) are evaluated in a
single grouped call (``dispersive_loss(..., grouped=True)``).

Presets (METHODS.md section 2):

* ``"paper"`` (Wang & He 2025, the JAX code): InfoNCE-L2, tau = 0.5, weight = 0.5, block ``depth // 4``.
* ``"pytorch_port"`` (the official PyTorch port): InfoNCE-L2, tau = 1.0, weight = 0.25, the last block.

Precision: the loss is computed in float32 with autocast switched off (a distance ``||z_i - z_j||^2 / M`` of
bf16 features computed through a bf16 Gram would cancel catastrophically); pass ``upcast=False`` to hand the
captured dtype to a fused backend that accumulates in fp32 itself (saves one fp32 copy of the features).

Distributed training: each device computes the loss over its local batch (no all-gather, as in the paper);
hooks work unchanged on a module wrapped in ``DistributedDataParallel`` (register them on the inner module's
blocks).

Activation checkpointing: with ``torch.utils.checkpoint(..., use_reentrant=True)`` the hooked block runs a second
time inside the backward pass (the recomputation); the hook ignores every forward that runs inside a backward
pass, so each step counts the block once (the first forward, the one whose output is in the graph).  With
``use_reentrant=False`` torch does not run forward hooks on the recomputation at all.

Footguns it refuses: a container of blocks (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) passed as
the module (pass one block, a list of blocks, or use a preset; a Sequential whose *own* output is wanted goes in
a list: ``DispersiveRegularizer([seq])``); more than ``max_captures`` (default 8) forwards without ``pop_loss()``
(a training loop that forgot it, or a train-mode evaluation loop, which would keep every graph alive); bad
hyper-parameters (checked when it is built, not at the first ``pop_loss``).  ``remove()`` and leaving a ``with``
block detach the hooks.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..ops import _validate as V
from ..ops import dispersive_loss

__all__ = ["DispersiveRegularizer", "PRESETS"]

PRESETS = {
    "paper": dict(weight=0.5, tau=0.5, variant="infonce_l2", block="quarter"),
    "pytorch_port": dict(weight=0.25, tau=1.0, variant="infonce_l2", block="last"),
}


def _in_backward() -> bool:
    """True inside an autograd backward pass (where a reentrant checkpoint recomputes its forward)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _pick_block(blocks: Sequence[nn.Module], where: Union[str, int]) -> nn.Module:
    n = len(blocks)
    if n == 0:
        raise ValueError("blocks is empty")
    if where == "quarter":
        return blocks[n // 4]
    if where == "last":
        return blocks[n - 1]
    if isinstance(where, int) and not isinstance(where, bool):
        return blocks[where]
    raise ValueError(f"block must be 'quarter', 'last' or an index, got {where!r}")


class DispersiveRegularizer:
    """Adds ``weight * dispersive_loss(flatten(output of module))`` to the training loss through a forward hook.

    module: an ``nn.Module`` or a list of them (each is hooked; same hyper-parameters for all).
    weight (lambda), tau, variant ("infonce_l2" | "infonce_cosine" | "hinge" | "covariance"), margin (hinge only),
    backend: passed to :func:`contrastgen.dispersive_loss`.
    train_only: capture only while the hooked module is in training mode (default True).
    upcast: evaluate the loss on float32 features (default True); False keeps the captured dtype.
    max_captures: at most this many captures between two ``pop_loss()`` / ``clear()`` calls (default 8; raise it for
    gradient accumulation over more micro-batches, None for no bound); one more raises RuntimeError.
    """

    def __init__(self, module: Union[nn.Module, Iterable[nn.Module]], weight: float = 0.5, tau: float = 0.5,
                 variant: str = "infonce_l2", backend: Optional[str] = None, *, margin: float = 1.0,
                 train_only: bool = True, upcast: bool = True, max_captures: Optional[int] = 8):
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            n = len(module)
            raise TypeError(f"got an nn.{type(module).__name__} of {n} modules: pass one block (e.g. blocks[{n // 4}]),"
                            " a list of blocks, or use DispersiveRegularizer.paper(blocks) / .pytorch_port(blocks); "
                            "to regularize the output of a whole nn.Sequential, pass it in a list: "
                            "DispersiveRegularizer([seq])")
        modules = [module] if isinstance(module, nn.Module) else list(module)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError("module must be an nn.Module or a non-empty list of nn.Modules")
        for i, m in enumerate(modules):
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                raise TypeError(f"module[{i}] is an nn.{type(m).__name__}, which is never called itself: pass its blocks")
        V.check_choice("variant", variant, ("infonce_l2", "infonce_cosine", "hinge", "covariance"))
        for name, value in (("weight", weight), ("tau", tau), ("margin", margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a python number, got {type(value).__name__}")
        V.check_finite_scalar("weight", weight)
        V.check_positive_scalar("tau", tau)
        V.check_positive_scalar("margin", margin, allow_zero=True)
        V.check_bool("train_only", train_only)
        V.check_bool("upcast", upcast)
        if max_captures is not None and (isinstance(max_captures, bool) or not isinstance(max_captures, int)
                                         or max_captures < 1):
            raise ValueError(f"max_captures must be a positive int or None, got {max_captures!r}")
        self.modules: List[nn.Module] = modules
        self.max_captures = max_captures
        self.weight, self.tau, self.variant, self.margin = float(weight), float(tau), variant, float(margin)
        self.backend, self.train_only, self.upcast = backend, train_only, upcast
        self.enabled = True
        self.last_loss: Optional[torch.Tensor] = None   # unweighted, detached value of the last pop_loss()
        self._captured: List[torch.Tensor] = []
        self._last_device = torch.device("cpu")
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, blocks: Sequence[nn.Module], preset: str = "paper", *, block: Union[str, int, None] = None,
                    **overrides) -> "DispersiveRegularizer":
        """Hook one of ``blocks`` (e.g. ``model.blocks``) with the hyper-parameters of ``preset``
        (see :data:`PRESETS`); ``block`` ("quarter", "last" or an index) and keyword arguments override it."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        cfg = dict(PRESETS[preset])
        where = cfg.pop("block") if block is None else block
        cfg.pop("block", None)
        cfg.update(overrides)
        return cls(_pick_block(blocks, where), **cfg)

    @classmethod
    def paper(cls, blocks: Sequence[nn.Module], **overrides) -> "DispersiveRegularizer":
        """Wang & He 2025 / JAX defaults: block ``len(blocks) // 4``, tau = 0.5, weight = 0.5."""
        return cls.from_preset(blocks, "paper", **overrides)

    @classmethod
    def pytorch_port(cls, blocks: Sequence[nn.Module], **overrides) -> "DispersiveRegularizer":
        """Official PyTorch port defaults: the last block, tau = 1.0, weight = 0.25."""
        return cls.from_preset(blocks, "pytorch_port", **overrides)

    # ----------------------------------------------------------------- hook
    def _hook(self, module: nn.Module, args, output) -> None:
        if not self.enabled or (self.train_only and not module.training):
            return
        if _in_backward():  # the recomputation of a reentrant activation checkpoint: counted once already
            return
        z = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"DispersiveRegularizer: hooked {type(module).__name__} returned "
                            f"{type(output).__name__}, expected a tensor (or a tuple starting with one)")
        if self.max_captures is not None and len(self._captured) >= self.max_captures:
            raise RuntimeError(f"DispersiveRegularizer: {len(self._captured) + 1} captures without pop_loss() (bound "
                               f"max_captures={self.max_captures}): call reg.pop_loss() once per training step (or "
                               "reg.clear()), wrap evaluation/sampling in `with reg.paused():` or model.eval(), or "
                               "pass max_captures=None / a larger bound for long gradient accumulation")
        self._captured.append(z)

    # ----------------------------------------------------------------- loss
    @property
    def num_captured(self) -> int:
        return len(self._captured)

    def _device(self) -> torch.device:
        """Where the hooked modules live now (they may have been moved after the hooks were registered)."""
        for m in self.modules:
            for t in itertools.chain(m.parameters(), m.buffers()):
                return t.device
        return self._last_device

    def compute_loss(self) -> torch.Tensor:
        """``sum`` of the unweighted dispersive losses of the current captures (float32 scalar); keeps them."""
        if not self._captured:
            return torch.zeros((), device=self._device(), dtype=torch.float32)
        groups: dict = {}
        for z in self._captured:
            z2 = z.reshape(z.shape[0], -1)
            groups.setdefault((tuple(z2.shape), z2.dtype, z2.device), []).append(z2)
        total = None
        for (_, _, dev), zs in groups.items():
            with torch.autocast(device_type=dev.type, enabled=False):
                if len(zs) == 1:
                    z = zs[0].float() if self.upcast else zs[0]
                    loss = dispersive_loss(z, variant=self.variant, tau=self.tau, margin=self.margin,
                                           backend=self.backend).float()
                else:
                    z = torch.stack(zs)
                    z = z.float() if self.upcast else z
                    loss = dispersive_loss(z, variant=self.variant, tau=self.tau, margin=self.margin,
                                           grouped=True, backend=self.backend).float().sum()
            self._last_device = dev
            total = loss if total is None else total + loss.to(total.device)
        return total

    def pop_loss(self) -> torch.Tensor:
        """``weight * (sum of the dispersive losses captured since the last call)``, then clears the captures.
        A float32 zero on the model's device when nothing was captured (eval mode, disabled, no forward)."""
        loss = self.compute_loss()
        self._captured.clear()
        self.last_loss = loss.detach()
        return self.weight * loss

    def clear(self) -> None:
        """Drops the captures (and the graph they hold) without computing anything."""
        self._captured.clear()

    # ----------------------------------------------------------------- switches
    @contextlib.contextmanager
    def paused(self):
        """Context manager: no capture inside (e.g. around sampling in train mode)."""
        prev, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = prev

    def __enter__(self) -> "DispersiveRegularizer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Removes the hooks and drops the captures."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._captured.clear()

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.modules)
        return (f"DispersiveRegularizer([{names}], weight={self.weight}, tau={self.tau}, variant={self.variant!r}, "
                f"enabled={self.enabled})")
