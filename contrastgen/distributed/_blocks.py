"""Per-block pieces of the contrastive losses, the unit of work of the ring (``_ring.py``).

A *block* is this rank's n query rows against one chunk of m keys (a piece of another rank's batch).  The
ring merges what the blocks return into the statistics of the full rows (and columns).

InfoNCE / CLIP (:class:`InfoNCEBlocks`)
    Positives are given by labels: ``q_labels[i] == k_labels[j]`` (CLIP and diagonal InfoNCE use *global*
    indices, so a positive can sit in any block).  ``fwd`` returns per-row (and, for the symmetric CLIP loss,
    per-column) statistics ``[lse, npos, possum]`` of the block: the log-sum-exp of the logits, the number of
    positives and the sum of the positive logits.  They merge across blocks with ``logaddexp`` / ``+`` /
    ``+`` (:func:`merge_stats`), and the SupCon row loss is ``lse - possum / npos`` (0 where npos = 0).
    ``bwd`` takes the *merged* ``[lse, npos]`` and returns the block's share of dq, dk and dscale: since
    ``dL/ds_ij = g_i (exp(s_ij - lse_i) - [pos_ij] / npos_i)`` only needs the merged row statistics, the
    block's gradient is exact.  The fused backends call the core ops ``contrastgen::infonce_fwd`` /
    ``infonce_bwd`` (``contrastgen/reference/core.py``) with the block's labels and the merged statistics;
    ``possum`` comes back from their outputs as ``(lse - row_loss) * npos``.

SigLIP (:class:`SigLipBlocks`)
    The row sums of ``-log sigmoid(y_ij z_ij)``, ``z = scale q.k + bias``, where ``y_ij = +1`` on the positive
    pairs ``i == j + diag`` (``diag`` = the chunk's first key row when the chunk belongs to this rank's own
    batch, else ``None``: every pair is negative).  The core op ``contrastgen::siglip_fwd`` puts its positives
    on the main diagonal only, so it serves the one block where that is right (``diag == 0``, n == m); every
    other block goes through :func:`siglip_rows_fwd` / :func:`siglip_rows_bwd`, written here because the core
    has no "no positives" / diagonal-offset option: row blocks of ``B`` queries, ``torch.matmul`` for the three
    products, O(B m) memory.  (Subtracting the diagonal from the core's output instead would cancel
    catastrophically: ``-log sigmoid(z) + z`` for z ~ -10.)

The ``"torch"`` backend computes every block densely in float64 for float64 inputs (float32 otherwise): it is
the exact specification the float64 tests hold the ring to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# rows per matmul block of the PyTorch SigLIP block (logits buffer of at most ROW_BLOCK_ELEMS elements)
ROW_BLOCK_ELEMS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_stats(acc: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Merge block statistics ``[lse, npos, possum]`` (.., 3) of disjoint key sets, in place into ``acc``."""
    torch.logaddexp(acc[:, 0], part[:, 0], out=acc[:, 0])
    acc[:, 1:] += part[:, 1:]
    return acc


def supcon_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """SupCon loss per row from merged ``[lse, npos, possum]``: ``lse - possum / npos`` (0 without positives)."""
    lse, npos, possum = stats.unbind(1)
    return torch.where(npos > 0, lse - possum / npos.clamp_min(1), torch.zeros_like(lse))


class InfoNCEBlocks:
    """SupCon InfoNCE blocks (diagonal positives via global indices), rows only or rows and columns."""

    def __init__(self, backend: str, symmetric: bool, dtype: torch.dtype):
        self.backend, self.symmetric = backend, symmetric
        self.stat_dtype = compute_dtype(dtype) if backend == "torch" else torch.float32

    # ------------------------------------------------------------------ forward
    def fwd(self, q, k, scale, q_labels, k_labels):
        """-> (row stats (n, 3), column stats (m, 3) or None), dtype ``stat_dtype``."""
        if self.backend == "torch":
            return self._fwd_torch(q, k, scale, q_labels, k_labels)
        rl, cl, rs, cs = torch.ops.contrastgen.infonce_fwd(q, k, None, _f32(scale, q), q_labels, k_labels, False, True,
                                                           False, self.symmetric, self.backend)
        row = torch.stack([rs[:, 0], rs[:, 1], (rs[:, 0] - rl) * rs[:, 1]], 1)
        col = torch.stack([cs[:, 0], cs[:, 1], (cs[:, 0] - cl) * cs[:, 1]], 1) if self.symmetric else None
        return row, col

    def _fwd_torch(self, q, k, scale, q_labels, k_labels):
        dt = self.stat_dtype
        s = scale.to(dt) * (q.to(dt) @ k.to(dt).T)
        pos = (q_labels[:, None] == k_labels[None, :]).to(dt)
        row = torch.stack([torch.logsumexp(s, 1), pos.sum(1), (s * pos).sum(1)], 1)
        col = torch.stack([torch.logsumexp(s, 0), pos.sum(0), (s * pos).sum(0)], 1) if self.symmetric else None
        return row, col

    # ------------------------------------------------------------------ backward
    def bwd(self, q, k, scale, q_labels, k_labels, row_stats, g_row, col_stats=None, g_col=None):
        """Block share of (dq (n, D), dk (m, D), dscale 0-d) from the merged ``[lse, npos]`` statistics."""
        if self.backend == "torch":
            return self._bwd_torch(q, k, scale, q_labels, k_labels, row_stats, g_row, col_stats, g_col)
        if self.symmetric:
            cs, gc = col_stats.float().contiguous(), g_col.float().contiguous()
        else:
            cs, gc = q.new_zeros(0, 2, dtype=torch.float32), q.new_zeros(0, dtype=torch.float32)
        dq, dk, _, dscale = torch.ops.contrastgen.infonce_bwd(
            q, k, None, _f32(scale, q), q_labels, k_labels, False, True, False, self.symmetric,
            row_stats.float().contiguous(), cs, g_row.float().contiguous(), gc, self.backend,
            external_stats=True)
        return dq, dk, dscale

    def _bwd_torch(self, q, k, scale, q_labels, k_labels, row_stats, g_row, col_stats, g_col):
        dt = self.stat_dtype
        qd, kd = q.to(dt), k.to(dt)
        qk = qd @ kd.T
        s = scale.to(dt) * qk
        pos = (q_labels[:, None] == k_labels[None, :]).to(dt)
        lse, npos = row_stats[:, 0].to(dt), row_stats[:, 1].to(dt)
        g = torch.where(npos > 0, g_row.to(dt), 0.0)
        ds = g[:, None] * (torch.exp(s - lse[:, None]) - pos / npos.clamp_min(1)[:, None])
        if self.symmetric:
            lse_c, npos_c = col_stats[:, 0].to(dt), col_stats[:, 1].to(dt)
            gc = torch.where(npos_c > 0, g_col.to(dt), 0.0)
            ds = ds + gc[None, :] * (torch.exp(s - lse_c[None, :]) - pos / npos_c.clamp_min(1)[None, :])
        sc = scale.to(dt)
        return sc * (ds @ kd), sc * (ds.T @ qd), (ds * qk).sum()


class SigLipBlocks:
    """SigLIP blocks: row sums of the pair losses, positives on ``i == j + diag`` (or none)."""

    def __init__(self, backend: str, dtype: torch.dtype):
        self.backend = backend
        self.stat_dtype = compute_dtype(dtype) if backend == "torch" else torch.float32

    def _core(self, q, k, diag) -> bool:
        return self.backend != "torch" and diag == 0 and q.shape[0] == k.shape[0]

    def fwd(self, q, k, scale, bias, diag: Optional[int]):
        if self._core(q, k, diag):
            return torch.ops.contrastgen.siglip_fwd(q, k, _f32(scale, q), _f32(bias, q), self.backend)
        return siglip_rows_fwd(q, k, scale, bias, diag, self.stat_dtype)

    def bwd(self, q, k, scale, bias, diag: Optional[int], g_row):
        """-> (dq, dk, dscale, dbias)."""
        if self._core(q, k, diag):
            return torch.ops.contrastgen.siglip_bwd(q, k, _f32(scale, q), _f32(bias, q), g_row.float().contiguous(),
                                                    self.backend)
        return siglip_rows_bwd(q, k, scale, bias, diag, g_row, self.stat_dtype)


def _f32(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(()).to(device=like.device, dtype=torch.float32)


def _positives(i0: int, i1: int, m: int, diag: Optional[int], device):
    """(rows, cols) of the positive pairs i == j + diag with i in [i0, i1), j in [0, m); rows block-local."""
    if diag is None:
        return None
    lo, hi = max(i0, diag), min(i1, diag + m)
    if lo >= hi:
        return None
    rows = torch.arange(lo, hi, device=device)
    return rows - i0, rows - diag


def _row_block(n: int, m: int) -> int:
    return max(1, min(n, ROW_BLOCK_ELEMS // max(m, 1)))


def siglip_rows_fwd(q, k, scale, bias, diag, dt):
    """Row sums of SigLIP pair losses of q (n, D) against k (m, D) in dtype ``dt``, B rows at a time."""
    n, m = q.shape[0], k.shape[0]
    kd, sc, b = k.to(dt), scale.to(dt), bias.to(dt)
    out = q.new_empty(n, dtype=dt)
    step = _row_block(n, m)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        z = (q[i0:i1].to(dt) @ kd.T).mul_(sc).add_(b)                           # (B, m)  z = scale q.k + bias
        p = _positives(i0, i1, m, diag, q.device)
        if p is not None:
            z[p] = -z[p]                                                       # -log sigmoid(y z) = softplus(-y z)
        out[i0:i1] = F.softplus(z).sum(1)
    return out


def siglip_rows_bwd(q, k, scale, bias, diag, g_row, dt):
    """(dq, dk, dscale, dbias) of ``sum_i g_i row_i`` for :func:`siglip_rows_fwd`."""
    n, m = q.shape[0], k.shape[0]
    kd, sc, b = k.to(dt), scale.to(dt), bias.to(dt)
    g = g_row.to(dt)
    dq = q.new_empty(n, q.shape[1], dtype=dt)
    dk = torch.zeros(m, k.shape[1], dtype=dt, device=k.device)
    dscale = torch.zeros((), dtype=dt, device=q.device)
    dbias = torch.zeros((), dtype=dt, device=q.device)
    step = _row_block(n, m)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        qb = q[i0:i1].to(dt)
        qk = qb @ kd.T                                                         # (B, m)
        w = qk * sc + b                                                        # z; then w = -y z
        p = _positives(i0, i1, m, diag, q.device)
        if p is not None:
            w[p] = -w[p]
        dz = torch.sigmoid_(w)                                                 # d softplus(-y z)/dz = -y sigmoid(-y z)
        if p is not None:
            dz[p] = -dz[p]
        dz.mul_(g[i0:i1, None])
        dscale += (dz * qk).sum()
        dbias += dz.sum()
        torch.mm(dz, kd, out=dq[i0:i1])
        dk.addmm_(dz.T, qb)
    return dq.mul_(sc), dk.mul_(sc), dscale, dbias
