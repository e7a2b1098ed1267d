"""Dense PyTorch references for InfoNCE with per-query negatives (``info_nce(..., negatives=(N, M, D))``).

Each query ``q_i`` has its own M negatives ``n_i1 .. n_iM`` (CoDE's ``negative_mode="paired"``, DCR's per-anchor
predictions ``eps_ij``).  Their logits ``s_ij = q_i . n_ij / temperature`` are extra columns of row i that are
always in the denominator and never positive, exactly like the columns of a shared bank.  Everything else (the
in-batch keys, diagonal or label positives, ``key=None`` with self-exclusion, ``in_batch_negatives``) is as in
:func:`contrastgen.reference.info_nce_ref`; only the supcon convention (and its special case "diagonal") is
defined here: ``l_i = lse_{j valid} s_ij - mean_{p in P_i} s_ip``, anchors without a positive give 0 and are left
out of the mean.

The fused op splits the work in two (``contrastgen/ops/infonce_paired.py``): the in-batch part is the existing
InfoNCE core, the per-query part is the op whose contract is :func:`paired_lse_fwd_ref` / :func:`paired_lse_bwd_ref`
below, and the two log-sum-exps are merged per row.
"""
from __future__ import annotations

import torch


def info_nce_paired_ref(query, key, negatives, *, temperature=0.07, labels=None, key_labels=None,
                        positives="diagonal", in_batch_negatives=False, reduction="mean"):
    """InfoNCE with per-query negatives: query (N, D), key (M, D) or None, negatives (N, K, D)."""
    self_mode = key is None
    if self_mode:
        key, key_labels = query, labels
    elif key_labels is None:
        key_labels = labels
    n, m = query.shape[0], key.shape[0]
    dev = query.device
    logits = (query @ key.T) / temperature
    if positives == "diagonal":
        pos = torch.eye(n, m, dtype=torch.bool, device=dev)
    else:
        pos = labels.view(-1, 1) == key_labels.view(1, -1)
    valid = torch.ones(n, m, dtype=torch.bool, device=dev)
    if self_mode:
        valid &= ~torch.eye(n, m, dtype=torch.bool, device=dev)
    pos &= valid
    if not in_batch_negatives:
        valid &= pos
    paired = torch.einsum("nd,nkd->nk", query, negatives) / temperature
    all_logits = torch.cat([logits, paired], 1)
    all_valid = torch.cat([valid, torch.ones_like(paired, dtype=torch.bool)], 1)
    all_pos = torch.cat([pos, torch.zeros_like(paired, dtype=torch.bool)], 1)
    npos = all_pos.sum(1)
    lse = torch.logsumexp(all_logits.masked_fill(~all_valid, float("-inf")), dim=1)
    pos_mean = torch.where(all_pos, all_logits, torch.zeros_like(all_logits)).sum(1) / npos.clamp_min(1)
    row = torch.where(npos > 0, lse - pos_mean, torch.zeros_like(lse))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / (npos > 0).sum().clamp_min(1).to(row.dtype)


# ------------------------------------------------------------------------------------- the per-query op contract
def paired_lse_fwd_ref(q, negs, scale, save_logits: bool = True):
    """Contract of the launchers' ``paired_fwd``: q (N, D), negs (N, M, D), scale a 0-d tensor.

    ``logits_ij = scale * q_i . n_ij`` and ``lse_i = log sum_j exp(logits_ij)``.  Returns (lse (N,) float32,
    logits (N, M) float32, or an empty (0, M) tensor when ``save_logits`` is False)."""
    s = scale.double() * torch.einsum("nd,nmd->nm", q.double(), negs.double())
    lse = torch.logsumexp(s, dim=1)
    logits = s.float() if save_logits else q.new_zeros(0, negs.shape[1], dtype=torch.float32)
    return lse.float(), logits


def paired_lse_bwd_ref(q, negs, scale, logits, lse, g, need_dq: bool = True, need_dnegs: bool = True):
    """Contract of the launchers' ``paired_bwd``, given the saved logits and the row lse the gradient is taken
    against (in the merged op: the lse of the whole row, in-batch columns included).

    ``dS_ij = g_i exp(logits_ij - lse_i)``; ``dq_i = scale sum_j dS_ij n_ij``; ``dn_ij = scale dS_ij q_i``;
    ``dscale = sum_ij dS_ij logits_ij / scale`` (= sum dS_ij q_i . n_ij).
    Returns (dq like q or None, dnegs like negs or None, dscale 0-d float32)."""
    sc = scale.double()
    ds = g.double()[:, None] * torch.exp(logits.double() - lse.double()[:, None])
    dq = (sc * torch.einsum("nm,nmd->nd", ds, negs.double())).to(q.dtype) if need_dq else None
    dn = (sc * ds[:, :, None] * q.double()[:, None, :]).to(negs.dtype) if need_dnegs else None
    dscale = (ds * logits.double()).sum() / sc
    return dq, dn, dscale.float()
