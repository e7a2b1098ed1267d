"""Input checks shared by every op.  Each error names the argument and its shape.

Under ``torch.compile`` (2026-12-01, issue 9 items 6 and 7): type, shape and option checks are python-level and
run while tracing; the *value* of a tensor hyper-parameter (a learned logit scale, a temperature tensor) cannot be
read on the host there (nor on an accelerator without a sync), so it is checked in the graph with
``torch._assert_async``: compiled code rejects what eager rejects, with the same message, as a ``RuntimeError``
(eager on CPU raises ``ValueError``).  Python numbers are compared with plain operators, never ``math.isfinite``,
which cannot trace a ``SymFloat`` under ``torch.compile(dynamic=True)``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
                 floating: bool = True, nonempty: bool = True, finite: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        kind = "nested" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor of shape "
                        f"{tuple(t.shape) if not t.is_nested else '(nested)'}; convert it with .to_dense() / "
                        f".to_padded_tensor()")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {_desc(t)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got {_desc(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got {_desc(t)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} is empty: {_desc(t)}")
    if finite and not _is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values ({_desc(t)})")
    return t


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_same(names: Iterable[str], tensors: Iterable[torch.Tensor], *, dtype: bool = True, device: bool = True) -> None:
    names, tensors = list(names), list(tensors)
    first_name, first = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if device and t.device != first.device:
            raise ValueError(f"{n} and {first_name} must be on the same device: {n} {_desc(t)}, {first_name} {_desc(first)}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{n} and {first_name} must have the same dtype: {n} {_desc(t)}, {first_name} {_desc(first)}")


def check_feature_dim(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    d = tensors[0].shape[-1]
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape[-1] != d:
            raise ValueError(f"{n} and {names[0]} must have the same feature dimension: "
                             f"{n} has shape {tuple(t.shape)}, {names[0]} has shape {tuple(tensors[0].shape)}")


def _check_scalar_type(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")


def _finite(v) -> bool:
    """``math.isfinite`` by comparisons, so that a ``SymFloat`` traces (torch.compile(dynamic=True))."""
    return v == v and v != math.inf and v != -math.inf


def _host_readable(t: torch.Tensor) -> bool:
    """Reading the value costs no device sync and no graph break: a CPU tensor outside torch.compile."""
    return t.device.type == "cpu" and not _is_compiling()


def _check_value(name: str, value, must: str, ok_number, ok_tensor) -> None:
    """The scalar's value on the host where it is readable (ValueError), else in the graph (torch._assert_async:
    RuntimeError with the same message; asynchronous on an accelerator)."""
    if isinstance(value, torch.Tensor):
        if not _host_readable(value):
            torch._assert_async(ok_tensor(value.detach().reshape(())), f"{name} must be {must}")
            return
        value = float(value.detach().reshape(()))
    if not ok_number(value):
        raise ValueError(f"{name} must be {must}, got {value}")


def check_positive_scalar(name: str, value, *, like: torch.Tensor | None = None, allow_zero: bool = False) -> torch.Tensor | float:
    """A temperature / scale: a python number or a one-element floating tensor, finite and > 0 (>= 0
    with ``allow_zero``).  Tensors keep their autograd; their value is checked as :func:`_check_value` says."""
    _check_scalar_type(name, value)
    if isinstance(value, torch.Tensor) and like is not None and value.device != like.device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    low = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    _check_value(name, value, "finite and >= 0" if allow_zero else "finite and > 0",
                 lambda v: _finite(v) and low(v), lambda t: torch.isfinite(t) & low(t))
    return value if isinstance(value, (torch.Tensor, float)) else float(value)


def check_finite_scalar(name: str, value) -> torch.Tensor | float:
    """A bias: a python number or a one-element floating tensor, finite."""
    _check_scalar_type(name, value)
    _check_value(name, value, "finite", _finite, torch.isfinite)
    return value if isinstance(value, (torch.Tensor, float)) else float(value)


def check_bool(name: str, value) -> bool:
    """A flag: ``True`` or ``False`` only (``symmetric="false"`` is an error, not a true value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_labels(name: str, labels, n: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the features, got shape {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {like.device}")
    return labels


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def to_scalar_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on ``like``'s device, keeping autograd if ``value`` is a tensor."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(value), device=like.device, dtype=torch.float32)
