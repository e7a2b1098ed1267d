"""The contract of the fused InfoNCE / SigLIP kernels, written densely in PyTorch.

Every fused backend (Triton launcher in ``contrastgen.kernels``, C++ in ``csrc/``) implements
exactly these two forward/backward pairs; the public losses in ``contrastgen.ops`` are thin
compositions of them.  The backward here is written out by hand (not autograd) so that it is
also the specification of the backward kernels; ``tests/test_reference.py`` checks it against
autograd of the public references.

InfoNCE core
------------
Inputs: ``q`` (N, D), ``k`` (M, D), ``bank`` (K, D) (K may be 0), ``scale`` a 0-d float32 tensor,
``q_labels`` (N,) / ``k_labels`` (M,) int64 or both ``None`` (diagonal positives), and flags.
Logits ``s_ij = scale * q_i . k_j`` over the M in-batch columns then the K bank columns.

* positive: in-batch column j with ``i == j`` (no labels) or ``q_labels[i] == k_labels[j]``;
  bank columns are never positive.
* ``exclude_self``: column ``j == i`` is neither positive nor negative (queries are the keys).
* valid (in the denominator): a positive, or any other in-batch column if ``in_batch_negatives``,
  or any bank column.
* ``npos_i`` = number of positives of row i.
* supcon (``pml=False``): ``lse_i = lse_{j valid} s_ij``;
  ``row_loss_i = lse_i - mean_{p positive} s_ip`` if npos_i > 0 else 0.
* pml (``pml=True``): ``lse_i = lse_{j valid, not positive} s_ij`` (negatives only, -inf if none);
  ``row_loss_i = sum_{p positive} softplus(lse_i - s_ip)``.
* ``symmetric`` (supcon only, no bank, no exclude_self): the same for the columns of the in-batch
  block: ``col_loss_j = lse_i(s_ij over valid i) - mean_{i positive} s_ij``.

Outputs: ``row_loss`` (N,) fp32, ``col_loss`` (M,) fp32 (empty unless symmetric), ``row_stats`` (N, C)
fp32, ``col_stats`` (M, C) fp32 (empty unless symmetric).  Columns 0 and 1 are [lse_i, npos_i] on every backend
(the public API reads only these); a backend may append refinements that only its own backward reads, declared
as ``STATS_COLUMNS`` in its launcher module (default 2).  The Triton launchers use C = 4: column 2 is lse_lo
(lse = lse_hi + lse_lo as an fp32 pair, so that e^{s - lse} keeps its digits at logit scales of 1e4), column 3
the pml coefficient c_i below (0 otherwise).  "-inf" may be stored as any value <= -1e30; consumers treat it as
an empty set.

Non-finite inputs: an empty set (no valid key) is the only case that yields the "-inf" placeholder (loss 0,
zero gradient).  A NaN or Inf logit (a NaN/Inf feature, bank row or scale) is never an empty set: wherever this
float64 reference is non-finite, the fused loss is non-finite, and no gradient entry is finite where the
reference's is not (the dense products below propagate NaN also through zero entries of dS).

Memory: the fused backends never store an N x M matrix; the Triton backward keeps one bounded slab of dS
(a chunk of rows x (M + K), sized from the free device memory) for the dQ / dK products.

Backward (upstream ``g_row`` (N,), ``g_col`` (M,)), with ``dS_ij`` the gradient w.r.t. ``s_ij``:
* supcon row i with npos_i > 0: ``dS_ij += g_i (exp(s_ij - lse_i) [j valid] - [j positive] / npos_i)``
* pml row i: ``r_ip = sigmoid(lse_i - s_ip)``; ``dS_ip -= g_i r_ip`` for positives and
  ``dS_in += g_i (sum_p r_ip) exp(s_in - lse_i)`` for negatives.
* symmetric: the same per column with ``g_col``.
* ``dq = scale dS [k; bank]``, ``dk = scale dS_batch^T q``, ``dbank = scale dS_bank^T q``,
  ``dscale = sum_ij dS_ij s_ij / scale`` (= sum dS_ij q_i.k_j).

Launcher signatures (every backend)::

    infonce_fwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric)
        -> (row_loss, col_loss, row_stats, col_stats)
    infonce_bwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric,
                row_stats, col_stats, g_row, g_col, needs_dq=True, needs_dk=True, needs_dbank=True,
                deterministic=None) -> (dq or None, dk or None, dbank or None, dscale)
    siglip_fwd(q, k, scale, bias) -> row_loss
    siglip_bwd(q, k, scale, bias, g_row, needs_dq=True, needs_dk=True, deterministic=None)
        -> (dq or None, dk or None, dscale, dbias)

A gradient that is not needed is returned as None and costs nothing (no product, no atomics): the custom ops pass
``ctx.needs_input_grad``.  ``deterministic=None`` reads ``CONTRASTGEN_DETERMINISTIC``.

SigLIP core
-----------
``z_ij = scale q_i . k_j + bias``, ``y_ij = +1 if i == j else -1``,
``row_loss_i = -sum_j log sigmoid(y_ij z_ij)`` (the loss is ``row_loss.sum() / N``).
Backward: ``dZ_ij = -g_i y_ij sigmoid(-y_ij z_ij)``; ``dq = scale dZ k``, ``dk = scale dZ^T q``,
``dscale = sum dZ_ij q_i.k_j``, ``dbias = sum dZ_ij``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e30


def _masks(n, m, kb, q_labels, k_labels, exclude_self, in_batch_negatives, device):
    if q_labels is None:
        pos = torch.eye(n, m, dtype=torch.bool, device=device)
    else:
        pos = q_labels.view(-1, 1) == k_labels.view(1, -1)
    valid = torch.ones(n, m, dtype=torch.bool, device=device)
    if exclude_self:
        valid &= ~torch.eye(n, m, dtype=torch.bool, device=device)
    pos &= valid
    if not in_batch_negatives:
        valid &= pos
    pos = torch.cat([pos, torch.zeros(n, kb, dtype=torch.bool, device=device)], 1)
    valid = torch.cat([valid, torch.ones(n, kb, dtype=torch.bool, device=device)], 1)
    return pos, valid


def _logits(q, k, bank, scale):
    keys = torch.cat([k, bank], 0) if bank is not None and bank.shape[0] else k
    return scale.double() * (q.double() @ keys.double().T), keys


def _lse(x, mask, dim):
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=dim).clamp_min(NEG_INF)


def infonce_core_fwd_ref(q, k, bank, scale, q_labels, k_labels, exclude_self: bool,
                         in_batch_negatives: bool, pml: bool, symmetric: bool):
    n, m = q.shape[0], k.shape[0]
    kb = 0 if bank is None else bank.shape[0]
    s, _ = _logits(q, k, bank, scale)
    pos, valid = _masks(n, m, kb, q_labels, k_labels, exclude_self, in_batch_negatives, q.device)
    npos = pos.sum(1).double()
    if pml:
        lse = _lse(s, valid & ~pos, 1)
        row = torch.where(pos, F.softplus(lse[:, None] - s), torch.zeros_like(s)).sum(1)
    else:
        lse = _lse(s, valid, 1)
        row = torch.where(npos > 0, lse - torch.where(pos, s, 0.0).sum(1) / npos.clamp_min(1), 0.0)
    row_stats = torch.stack([lse, npos], 1).float()
    if not symmetric:
        empty = q.new_zeros(0, dtype=torch.float32)
        return row.float(), empty, row_stats, q.new_zeros(0, 2, dtype=torch.float32)
    sb, pb, vb = s[:, :m], pos[:, :m], valid[:, :m]
    npos_c = pb.sum(0).double()
    lse_c = _lse(sb, vb, 0)
    col = torch.where(npos_c > 0, lse_c - torch.where(pb, sb, 0.0).sum(0) / npos_c.clamp_min(1), 0.0)
    return row.float(), col.float(), row_stats, torch.stack([lse_c, npos_c], 1).float()


def _stats_lse(stats):
    """lse of a stats tensor: column 0, plus the lse_lo refinement of column 2 where a backend stores one."""
    lse = stats[:, 0].double()
    return lse + stats[:, 2].double() if stats.shape[1] > 2 else lse


def infonce_core_bwd_ref(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml,
                         symmetric, row_stats, col_stats, g_row, g_col, needs_dq=True, needs_dk=True,
                         needs_dbank=True):
    """Returns (dq, dk, dbank, dscale) in the dtypes of (q, k, bank, float32); None for a gradient not needed."""
    n, m = q.shape[0], k.shape[0]
    kb = 0 if bank is None else bank.shape[0]
    s, keys = _logits(q, k, bank, scale)
    pos, valid = _masks(n, m, kb, q_labels, k_labels, exclude_self, in_batch_negatives, q.device)
    lse, npos = _stats_lse(row_stats), row_stats[:, 1].double()
    g = g_row.double()[:, None]
    if pml:
        r = torch.where(pos, torch.sigmoid(lse[:, None] - s), 0.0)
        p_neg = torch.where(valid & ~pos, torch.exp(s - lse[:, None]), 0.0)
        ds = g * (p_neg * r.sum(1, keepdim=True) - r)
    else:
        p = torch.where(valid, torch.exp(s - lse[:, None]), 0.0)
        ds = torch.where((npos > 0)[:, None], g * (p - pos.double() / npos.clamp_min(1)[:, None]), 0.0)
    if symmetric:
        lse_c, npos_c = _stats_lse(col_stats), col_stats[:, 1].double()
        sb, pb, vb = s[:, :m], pos[:, :m], valid[:, :m]
        pc = torch.where(vb, torch.exp(sb - lse_c[None, :]), 0.0)
        dsc = torch.where((npos_c > 0)[None, :], g_col.double()[None, :] * (pc - pb.double() / npos_c.clamp_min(1)[None, :]), 0.0)
        ds = ds.clone()
        ds[:, :m] += dsc
    sc = scale.double()
    dq = sc * ds @ keys.double()
    dkeys = sc * ds.T @ q.double()
    dscale = (ds * s).sum() / sc
    dbank = dkeys[m:].to(bank.dtype) if kb and needs_dbank else None
    return (dq.to(q.dtype) if needs_dq else None, dkeys[:m].to(k.dtype) if needs_dk else None, dbank,
            dscale.float())


def siglip_core_fwd_ref(q, k, scale, bias):
    z = scale.double() * (q.double() @ k.double().T) + bias.double()
    y = -torch.ones_like(z)
    y.diagonal().fill_(1.0)
    return (-F.logsigmoid(y * z).sum(1)).float()


def siglip_core_bwd_ref(q, k, scale, bias, g_row, needs_dq=True, needs_dk=True):
    qk = q.double() @ k.double().T
    z = scale.double() * qk + bias.double()
    y = -torch.ones_like(z)
    y.diagonal().fill_(1.0)
    dz = -g_row.double()[:, None] * y * torch.sigmoid(-y * z)
    sc = scale.double()
    return ((sc * dz @ k.double()).to(q.dtype) if needs_dq else None,
            (sc * dz.T @ q.double()).to(k.dtype) if needs_dk else None,
            (dz * qk).sum().float(), dz.sum().float())
