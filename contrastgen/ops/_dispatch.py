"""Backend selection for every contrastgen op (the table itself is in ``_backends.py``).

Order of precedence: the explicit ``backend=`` argument, then the ``CONTRASTGEN_BACKEND`` environment
variable, then the device default (Triton for CUDA tensors, the C++ kernel for CPU tensors, the PyTorch
reference for anything else).  A backend that is the *default* but cannot run (no compiled extension, no
Triton, or no fused launcher of this op) falls back to the reference with a one-time warning; a backend that
was asked for explicitly and cannot run raises.
"""
from __future__ import annotations

import os
import warnings
from typing import List

import torch

from . import _backends

BACKENDS = ("triton", "cpp", "torch")
_WARNED: set = set()


def backend_available(backend: str, op: str = "infonce") -> tuple:
    """(available, why not) of ``backend`` for ``op`` on this installation (device aside)."""
    if backend == "torch":
        return True, ""
    if backend not in _backends.BACKEND_TABLE.get(op, {}):
        return False, f"op {op!r} has no {backend!r} implementation yet"
    return _backends.PROBES[backend](op)


def available_backends(op: str) -> List[str]:
    """The fused backends that can run ``op`` on this installation (device aside)."""
    return [b for b in _backends.BACKEND_TABLE.get(op, {}) if backend_available(b, op)[0]]


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """Return the backend name that will run ``op`` (a row of the backend table) for tensors on ``device``."""
    if op not in _backends.BACKEND_TABLE:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_backends.BACKEND_TABLE)}")
    explicit = backend is not None
    if backend is None:
        env = os.environ.get("CONTRASTGEN_BACKEND", "").strip().lower()
        if env:
            backend = env
            explicit = True
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        backend = {"cuda": "triton", "cpu": "cpp"}.get(device.type, "torch")
    if backend == "torch":
        return backend
    ok, why = backend_available(backend, op)
    if ok:
        ok, why = _backends.device_supported(backend, device)
    if ok:
        return backend
    if explicit:
        raise ValueError(f"backend={backend!r} cannot run {op!r} on {device}: {why}")
    _warn_once(f"{op}:{backend}", f"contrastgen: {why}; {op} falls back to the PyTorch reference")
    return "torch"
