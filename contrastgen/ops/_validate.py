"""Input checks shared by every op.  Each error names the argument and its shape."""
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


def _host_value(value) -> float | None:
    """The scalar's value where reading it costs no device sync: python numbers, and CPU tensors
    outside torch.compile.  A CUDA scale is trusted (a NaN there shows as a NaN loss)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.device.type == "cpu" and not _is_compiling():
        return float(value.detach().reshape(()))
    return None


def check_positive_scalar(name: str, value, *, like: torch.Tensor | None = None, allow_zero: bool = False) -> torch.Tensor | float:
    """A temperature / scale: a python number or a one-element floating tensor, finite and > 0 (>= 0
    with ``allow_zero``).  Tensors keep their autograd; their value is checked where :func:`_host_value` can."""
    _check_scalar_type(name, value)
    if isinstance(value, torch.Tensor) and like is not None and value.device != like.device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    v = _host_value(value)
    if v is not None and (not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {v}")
    return value if isinstance(value, torch.Tensor) else float(value)


def check_finite_scalar(name: str, value) -> torch.Tensor | float:
    """A bias: a python number or a one-element floating tensor, finite."""
    _check_scalar_type(name, value)
    v = _host_value(value)
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return value if isinstance(value, torch.Tensor) else float(value)


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
