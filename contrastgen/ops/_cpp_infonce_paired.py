"""CPU (C++/OpenMP) launchers of the per-query negatives op (contract: ``contrastgen/reference/infonce_paired.py``).

Plain functions on tensors (no autograd); ``contrastgen/ops/infonce_paired.py`` wraps them in custom ops.  The
kernel (``csrc/infonce_paired.cpp``) streams the (N, M, D) negatives once per pass: a batched mat-vec plus a
log-sum-exp forward, one fused pass producing dq and dnegs backward.

Dtypes: float32 and bfloat16 negatives are read (and their gradient written) in place, bfloat16 through its int16
bit pattern, so no float32 copy of the (N, M, D) tensor is made; float16 / float64 negatives are converted to
float32 first (one copy) and their gradient converted back.  Queries are converted to float32 (O(N D)).
"""
from __future__ import annotations

import torch

from ._backends import cpp_extension

_ext = cpp_extension("infonce_paired")


def available() -> bool:
    return _ext is not None


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_infonce_paired is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at "
                           "install time); reinstall with `pip install --no-build-isolation -e .`")
    return _ext


def _cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors, {name} is on {t.device}")
    return t


def _negs(negs: torch.Tensor):
    """(kernel array, kind) for the negatives: kind "bf16" (int16 view, no copy) or "f32"."""
    n = _cpu(negs, "negs").detach()
    if n.dim() != 3:
        raise ValueError(f"negs must be (N, M, D), got shape {tuple(negs.shape)}")
    if n.dtype == torch.bfloat16:
        return n.contiguous().view(torch.int16), "bf16"
    return n.to(torch.float32).contiguous(), "f32"


def _scalar(scale) -> float:
    return float(scale.detach().reshape(()).to(torch.float64)) if isinstance(scale, torch.Tensor) else float(scale)


def paired_fwd(q, negs, scale, save_logits: bool):
    """-> (lse (N,) float32, logits (N, M) float32, or (0, M) when ``save_logits`` is False)."""
    ext = _need_ext()
    qf = _cpu(q, "q").detach().to(torch.float32).contiguous()
    na, kind = _negs(negs)
    n, m = negs.shape[0], negs.shape[1]
    lse = torch.empty(n, dtype=torch.float32)
    logits = torch.empty(n if save_logits else 0, m, dtype=torch.float32)
    fn = ext.paired_fwd_bf16 if kind == "bf16" else ext.paired_fwd_f32
    fn(qf.numpy(), na.numpy(), _scalar(scale), logits.numpy(), lse.numpy())
    return lse, logits


def paired_bwd(q, negs, scale, logits, lse, g, need_dq: bool, need_dnegs: bool):
    """-> (dq like q or None, dnegs like negs or None, dscale 0-d float32)."""
    ext = _need_ext()
    qf = _cpu(q, "q").detach().to(torch.float32).contiguous()
    na, kind = _negs(negs)
    n, d = qf.shape
    dq = torch.empty(n if need_dq else 0, d, dtype=torch.float32)
    if need_dnegs:
        dn = torch.empty(negs.shape, dtype=torch.bfloat16).view(torch.int16) if kind == "bf16" else torch.empty(
            negs.shape, dtype=torch.float32)
    else:
        dn = torch.empty(0, 0, 0, dtype=torch.int16 if kind == "bf16" else torch.float32)
    fn = ext.paired_bwd_bf16 if kind == "bf16" else ext.paired_bwd_f32
    dscale = fn(qf.numpy(), na.numpy(), _scalar(scale), logits.detach().to(torch.float32).contiguous().numpy(),
                lse.detach().to(torch.float32).contiguous().numpy(), g.detach().to(torch.float32).contiguous().numpy(),
                dq.numpy(), dn.numpy())
    dq_out = dq.to(q.dtype) if need_dq else None
    if need_dnegs:
        dn_out = dn.view(torch.bfloat16) if kind == "bf16" else dn.to(negs.dtype)
    else:
        dn_out = None
    return dq_out, dn_out, torch.tensor(dscale, dtype=torch.float32)
