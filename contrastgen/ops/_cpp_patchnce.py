"""CPU (C++/OpenMP) launchers of the fused PatchNCE op (``csrc/patchnce.cpp``).

Same functions, signatures and outputs as the Triton launchers in ``contrastgen.kernels.patchnce``
(``patchnce_fwd``, ``patchnce_bwd``); ``contrastgen/ops/patchnce.py`` wraps them in custom ops.  One C++ call per
direction runs every layer (one OpenMP region: pack the key panels, then all (layer, group, row block) items).
float32 and float64 are computed as they are (float64: the gradcheck path); bfloat16 / float16 inputs are converted
to float32 once per call (O(N C), against O(N n C) work), and gradients are returned in the input dtypes.
The packed-panel scratch (the size of the keys) is allocated here as torch tensors, so the benchmark harness
counts it; the per-thread tiles (48 x 256 logits, 48 x C accumulator) are not.
"""
from __future__ import annotations

import torch

from ._backends import cpp_extension

_ext = cpp_extension("patchnce")


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_patchnce is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at "
                           "install time)")
    return _ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(qs, ks):
    if qs[0].device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors, got {qs[0].device}")
    acc = _acc_dtype(qs[0].dtype)
    return ([q.detach().to(acc).contiguous() for q in qs], [k.detach().to(acc).contiguous() for k in ks], acc)


def _panels(xs, groups, acc):
    nr = _need_ext().panel_width(acc == torch.float64)
    return [torch.empty(groups * (-(-(x.shape[0] // groups) // nr)) * x.shape[1] * nr, dtype=acc) for x in xs]


def _tau_value(tau) -> float:
    # the temperature is read on the host: CPU tensors, no device sync
    return float(tau.detach().reshape(())) if isinstance(tau, torch.Tensor) else float(tau)


def patchnce_fwd(qs, ks, groups, tau, mean_layers, need_dq, need_lse, need_dt):
    """Fused PatchNCE forward; outputs as ``contrastgen.kernels.patchnce.patchnce_fwd``: (part (L, 1), dpart (L, 1)
    or (0,), lse (sum N_l,) or (0,), gq (sum N_l C_l,) or (0,)) in the accumulation dtype (float64 for float64)."""
    ext = _need_ext()
    qf, kf, acc = _inputs(qs, ks)
    L = len(qf)
    gq = torch.empty(sum(q.numel() for q in qf), dtype=acc) if need_dq else torch.empty(0, dtype=acc)
    gq_views = list(torch.split(gq, [q.numel() for q in qf])) if need_dq else []
    gq_views = [v.view(q.shape) for v, q in zip(gq_views, qf)]
    lse = torch.empty(sum(q.shape[0] for q in qf), dtype=acc) if need_lse else torch.empty(0, dtype=acc)
    layer_loss = torch.empty(L, dtype=torch.float64)
    layer_dlt = torch.empty(L, dtype=torch.float64)
    ext.fwd([q.numpy() for q in qf], [k.numpy() for k in kf], [p.numpy() for p in _panels(kf, groups, acc)],
            int(groups), 1.0 / _tau_value(tau), bool(need_dq), bool(need_dt), [v.numpy() for v in gq_views],
            lse.numpy(), layer_loss.numpy(), layer_dlt.numpy(), torch.get_num_threads())
    div = float(L) if mean_layers else 1.0
    part = (layer_loss / div).to(acc).reshape(L, 1)
    dpart = (layer_dlt / div).to(acc).reshape(L, 1) if need_dt else torch.empty(0, dtype=acc)
    return part, dpart, lse, gq


def patchnce_bwd(grad, qs, ks, groups, tau, mean_layers, lse, gq, need_dq, need_dk, q_dtype, k_dtype):
    """Fused PatchNCE backward: (dq flat (sum N_l C_l,) in ``q_dtype`` or (0,), dk flat in ``k_dtype`` or (0,))."""
    L = len(qs)
    g = grad.detach().to(torch.float64).reshape(-1)
    if mean_layers:
        g = g.expand(L) / L
    w = (g / torch.tensor([float(q.shape[0]) for q in qs], dtype=torch.float64)).contiguous()
    sizes = [q.numel() for q in qs]
    if not need_dk:   # the CUT default: dq_l = w_l gq_l, one multiply per layer (no extension call, no conversions)
        acc = gq.dtype
        dq = torch.empty(sum(sizes), dtype=acc)
        for a, b, wl in zip(torch.split(gq, sizes), torch.split(dq, sizes), w.tolist()):
            torch.mul(a, wl, out=b)
        return dq.to(q_dtype), torch.empty(0, dtype=k_dtype)
    ext = _need_ext()
    qf, kf, acc = _inputs(qs, ks)
    dq = torch.empty(sum(sizes), dtype=acc) if need_dq else torch.empty(0, dtype=acc)
    dk = torch.empty(sum(sizes), dtype=acc) if need_dk else torch.empty(0, dtype=acc)

    def views(flat):
        return [v.view(q.shape).numpy() for v, q in zip(torch.split(flat, sizes), qf)]

    gq_in = views(gq.to(acc).contiguous()) if need_dq else []
    panels = _panels(qf, groups, acc) if need_dk else [torch.empty(0, dtype=acc) for _ in qf]
    if need_dk:
        lse = lse.to(acc).contiguous()
    ext.bwd([q.numpy() for q in qf], [k.numpy() for k in kf], [p.numpy() for p in panels], int(groups),
            1.0 / _tau_value(tau), w.numpy(), gq_in, views(dq) if need_dq else [], lse.numpy() if need_dk else
            torch.empty(0, dtype=acc).numpy(), views(dk) if need_dk else [], torch.get_num_threads())
    return dq.to(q_dtype), dk.to(k_dtype)
