"""CPU (C++/OpenMP) launchers of the dispersive-family primitives (``csrc/dispersive.cpp``).

Same functions and signatures as the Triton launchers in ``contrastgen.kernels.dispersive`` (``gram``,
``colstats``, ``stream_wz``, ``pairs_fwd``, ``pairs_bwd``); ``contrastgen/ops/dispersive.py`` wraps them in
custom ops.  Outputs are computed in the accumulation dtype (float64 for float64 input, else float32) and
gradients are cast back to the input dtype.  bf16 / fp16 inputs travel as int16 bits (the C++ side converts).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._backends import cpp_extension

_ext = cpp_extension("dispersive")
_CPP_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_dispersive is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at "
                           "install time)")
    return _ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np_view(t: Tensor):
    """Zero-copy numpy view; bf16 / fp16 travel as int16 bits (the C++ side converts)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def gram(z: Tensor, *, normalize: tuple | None = None, deterministic: bool = True) -> Tensor:
    """Z Z^T of z (G, B, M) -> (G, B, B), accumulation dtype; normalize=(mean, rstd): of the batch-normalised Z.
    (Always deterministic on the CPU: ``deterministic`` is accepted for the launcher signature.)"""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    out = torch.empty((G, B, B), dtype=acc)
    if normalize is None:
        mean = rstd = torch.empty((G, 0), dtype=acc)
    else:
        mean, rstd = (t.to(acc).contiguous() for t in normalize)
    _need_ext().gram(_np_view(z), _CPP_DTYPE[z.dtype], G, B, M, _np_view(mean), _np_view(rstd),
                     normalize is not None, out.numpy())
    return out


def colstats(z: Tensor, eps: float):
    """Per-column batch mean and rstd = (biased var + eps)^-1/2 of z (G, B, M) -> two (G, M) tensors."""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    mean = torch.empty((G, M), dtype=acc)
    rstd = torch.empty((G, M), dtype=acc)
    _need_ext().colstats(_np_view(z), _CPP_DTYPE[z.dtype], G, B, M, float(eps), mean.numpy(), rstd.numpy())
    return mean, rstd


def stream_wz(w: Tensor, z: Tensor, *, cov: tuple | None = None, eps: float = 0.0) -> Tensor:
    """dZ = W Z for W (G, B, B), z (G, B, M) -> (G, B, M) in z's dtype (cov: the covariance variant's
    batch-norm backward, see kernels/dispersive.py)."""
    z = z.contiguous()
    G, B, M = z.shape
    acc = _acc_dtype(z.dtype)
    w = w.to(acc).contiguous()
    dz = torch.empty((G, B, M), dtype=acc)
    if cov is None:
        mean = rstd = dg = torch.empty((G, 0), dtype=acc)
    else:
        mean, rstd, dg = (t.to(acc).contiguous() for t in cov)
    _need_ext().stream_wz(w.numpy(), _np_view(z), _CPP_DTYPE[z.dtype], G, B, M, _np_view(mean), _np_view(rstd),
                          _np_view(dg), cov is not None, float(eps), dz.numpy())
    return dz.to(z.dtype)


def pairs_fwd(x: Tensor, mode: int, alpha: float, margin: float = 0.0, exclude_diag: bool = False) -> Tensor:
    """Per-row log-sum-exp (modes 0, 1) or hinge row sums (mode 2) of x (G, N, D) -> (G, N), accumulation dtype."""
    x = x.contiguous()
    G, N, D = x.shape
    out = torch.empty((G, N), dtype=_acc_dtype(x.dtype))
    _need_ext().pairs_fwd(_np_view(x), _CPP_DTYPE[x.dtype], G, N, D, int(mode), float(alpha), float(margin),
                          bool(exclude_diag), out.numpy())
    return out


def pairs_bwd(x: Tensor, lse: Tensor, gout: Tensor, mode: int, alpha: float, margin: float = 0.0,
              hscale: float = 0.0, exclude_diag: bool = False) -> Tensor:
    """dx (G, N, D) in x's dtype; lse (G,) total log-sum-exp (modes 0/1), gout (G,) upstream gradient."""
    x = x.contiguous()
    G, N, D = x.shape
    acc = _acc_dtype(x.dtype)
    dx = torch.empty((G, N, D), dtype=acc)
    _need_ext().pairs_bwd(_np_view(x), _CPP_DTYPE[x.dtype], G, N, D, _np_view(lse.to(acc)), _np_view(gout.to(acc)),
                          int(mode), float(alpha), float(margin), float(hscale), bool(exclude_diag), dx.numpy())
    return dx.to(x.dtype)
