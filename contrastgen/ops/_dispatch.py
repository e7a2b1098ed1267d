"""Backend selection for every contrastgen op.

Order of precedence: the explicit ``backend=`` argument, then the
``CONTRASTGEN_BACKEND`` environment variable, then the device default
(Triton for CUDA tensors, the C++ kernel for CPU tensors, the PyTorch
reference for anything else).  A backend that is the *default* but is not
available (no compiled extension, no Triton, or no fused implementation of
this op yet) falls back to the reference with a one-time warning; a backend
that was asked for explicitly and cannot run raises.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict

import torch

BACKENDS = ("triton", "cpp", "torch")

# op name -> backend name -> implementation
_IMPLS: Dict[str, Dict[str, Callable]] = {}
# backend name -> callable returning (available: bool, why_not: str)
_AVAILABILITY: Dict[str, Callable[[], tuple]] = {}
_WARNED: set = set()


def register(op: str, backend: str):
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_availability(backend: str, probe: Callable[[], tuple]) -> None:
    _AVAILABILITY[backend] = probe


def backend_available(backend: str) -> tuple:
    if backend == "torch":
        return True, ""
    probe = _AVAILABILITY.get(backend)
    if probe is None:
        return False, f"backend {backend!r} is not installed"
    return probe()


def implementations(op: str) -> Dict[str, Callable]:
    return dict(_IMPLS.get(op, {}))


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """Return the backend name that will run ``op`` for tensors on ``device``."""
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
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        ok, why = False, f"op {op!r} has no {backend!r} implementation yet"
    else:
        ok, why = backend_available(backend)
    if ok and backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        ok, why = False, "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if ok and backend == "cpp" and device.type != "cpu":
        ok, why = False, f"the C++ backend runs on CPU tensors, got device {device}"
    if ok:
        return backend
    if explicit:
        raise ValueError(f"backend={backend!r} cannot run {op!r} on {device}: {why}")
    _warn_once(f"{op}:{backend}", f"contrastgen: {why}; {op} falls back to the PyTorch reference")
    return "torch"


def dispatch(op: str, backend: str | None, device: torch.device) -> Callable:
    name = resolve_backend(op, backend, device)
    return _IMPLS[op][name]
