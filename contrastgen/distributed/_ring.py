"""The ring: key chunks travel rank to rank with point-to-point messages overlapped with the per-block kernel.

Schedule
--------
Rank r holds its queries q (n_r rows) and keys k (n_r rows).  Every key block is cut into C chunks
(``C = ceil(max_b n_b / MAX_CHUNK_ROWS)``, the same C on every rank so that all ranks run the same rounds).
A *lane* is a direction d (+1: keys move to rank r+1) and a number of hops h; ``mode="ring"`` and SigLIP's
``"shift"`` use one lane (+1, W-1), SigLIP's ``"bidir"`` two ((+1, ceil((W-1)/2)), (-1, floor((W-1)/2))).
At hop t of lane (d, h) rank r works on block ``r - d t``; hop 0 (its own block) is done once.

Round u = t C + c (one ``batch_isend_irecv`` each, posted *before* the compute of the round, waited after it):

* compute chunk c of hop t (for every lane with t <= h), with the fused kernel;
* key traffic: send that same chunk on to ``r + d`` and receive chunk c of hop t+1 from ``r - d`` (if t < h).
  A chunk is used C rounds after it arrives, so a rank holds at most one block of received keys plus one
  chunk (the "two buffers" of the ring, one chunk deep), never the other ranks' batches;
* accumulator traffic (statistics in the forward of the symmetric CLIP loss, key gradients in every
  backward): what a hop produces for chunk (t, c) -- the incoming accumulator of that chunk plus this rank's
  part -- leaves one round later (so that it overlaps the next round's compute) for the next rank of the lane,
  or, after the lane's last hop, straight for the block's owner ``r - d h``.  Lane 0 starts its accumulators at
  the owner (hop 0), the other lanes at hop 1; the owner merges what its lanes bring back.

Forward: row statistics [lse, npos, possum] merged over every block; for the symmetric (CLIP) loss, column
statistics of each key chunk ride the ring as accumulators and come back complete to the owner.
Backward (a ``torch.autograd.Function``): the keys travel again (recomputed, not stored), with the merged
column statistics and the owner's upstream gradient; dq accumulates locally; dk accumulators travel the ring
and return to their owners.  Memory per rank: O(n D) (the received-key buffer, the accumulator buffer and the
kernel's own), never O(N D) or O(n N).

Message sizes are known on both sides (every rank learned every local batch size in the handshake), so
uneven local batches need nothing special; empty chunks (a block smaller than C rows) are skipped on both
sides.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from ._blocks import InfoNCEBlocks, SigLipBlocks, compute_dtype, merge_stats, supcon_from_stats
from ._comm import start_p2p

# Rows of keys per ring message.  1024 keeps the ring's buffers at about one block plus a quarter at
# N_local = 4096 (benches/distributed.py) while each fused call still sees >= 1024 keys.
MAX_CHUNK_ROWS = 1024


class Plan:
    """Who sends what to whom: group, rank, world, every rank's key-block size, chunks, lanes."""

    def __init__(self, group, rank: int, world: int, key_sizes: Sequence[int], lanes=None):
        self.group, self.rank, self.world = group, rank, world
        self.key_sizes = list(key_sizes)
        self.offsets = [sum(self.key_sizes[:b]) for b in range(world)]
        self.chunks = max(1, math.ceil(max(self.key_sizes) / MAX_CHUNK_ROWS))
        self.lanes = tuple(lanes) if lanes is not None else ((1, world - 1),)

    def block(self, lane: int, t: int) -> int:
        return (self.rank - self.lanes[lane][0] * t) % self.world

    def bounds(self, b: int, c: int):
        n, C = self.key_sizes[b], self.chunks
        return c * n // C, (c + 1) * n // C

    def rows(self, b: int, c: int) -> int:
        s, e = self.bounds(b, c)
        return e - s

    def global_ids(self, b: int, c: int, device) -> torch.Tensor:
        s, e = self.bounds(b, c)
        return torch.arange(self.offsets[b] + s, self.offsets[b] + e, device=device)


def ring_lanes(world: int, bidirectional: bool):
    if not bidirectional:
        return ((1, world - 1),)
    return ((1, world // 2), (-1, (world - 1) // 2))


def _tag(lane: int, kind: int, slot: int) -> int:
    return (lane * 2 + kind) * 16 + slot


def _wait_quietly(works):
    for w in works:
        try:
            w.wait()
        except Exception:                                          # noqa: BLE001 - the original error wins
            pass


def ring_pass(plan: Plan, own: Callable, like: Callable, compute: Callable, acc_like: Optional[Callable] = None,
              merge: Optional[Callable] = None) -> List:
    """Run one pass of the ring (see the module doc).

    own(c) -> payload (list of tensors) of this rank's chunk c; like(b, c) -> empty buffers for chunk c of
    block b; compute(payload, b, c) -> accumulator part (list of tensors) or None; acc_like(b, c) -> empty
    accumulator buffers; merge(acc, part) -> acc (in place).  Returns, per own chunk, the accumulator merged
    over every rank (None entries when there are no accumulators)."""
    W, r, C, group = plan.world, plan.rank, plan.chunks, plan.group
    lanes = plan.lanes
    H = max(h for _, h in lanes)
    keys, acc_in, produced = {}, {}, {}
    final: List = [None] * C
    n_compute = (H + 1) * C
    n_rounds = n_compute + (1 if acc_like is not None else 0)

    def has_acc(li: int, t: int) -> bool:
        return t >= 1 or li == 0

    def add_final(cp, acc):
        final[cp] = acc if final[cp] is None else merge(final[cp], acc)

    for u in range(n_rounds):
        t, c = divmod(u, C)
        ops, finals_in = [], []
        if u < n_compute:                                         # keys: this round's chunk goes on
            for li, (d, h) in enumerate(lanes):
                if t < h:
                    payload = own(c) if t == 0 else keys[(li, t, c)]
                    buf = like(plan.block(li, t + 1), c)
                    keys[(li, t + 1, c)] = buf
                    ops += [("send", x, (r + d) % W, _tag(li, 0, i)) for i, x in enumerate(payload)]
                    ops += [("recv", x, (r - d) % W, _tag(li, 0, i)) for i, x in enumerate(buf)]
        if acc_like is not None and u >= 1:                       # accumulators: last round's output goes on
            tp, cp = divmod(u - 1, C)
            for li, (d, h) in enumerate(lanes):
                if tp > h or not has_acc(li, tp):
                    continue
                mine = produced.pop((li, tp, cp))
                if tp < h:
                    dst, src = (r + d) % W, (r - d) % W
                    buf = acc_like(plan.block(li, tp + 1), cp)
                    acc_in[(li, tp + 1, cp)] = buf
                else:                                             # last hop: back to the owner
                    dst, src = (r - d * h) % W, (r + d * h) % W
                    if dst == r:
                        add_final(cp, mine)
                        continue
                    buf = acc_like(r, cp)
                    finals_in.append((cp, buf))
                ops += [("send", x, dst, _tag(li, 1, i)) for i, x in enumerate(mine)]
                ops += [("recv", x, src, _tag(li, 1, i)) for i, x in enumerate(buf)]
        works = start_p2p(ops, group)
        computed = []
        try:
            if u < n_compute:                                     # the fused kernel on this round's chunk(s)
                for li, (d, h) in enumerate(lanes):
                    if t > h or (t == 0 and li > 0):
                        continue
                    b = plan.block(li, t)
                    payload = own(c) if t == 0 else keys.pop((li, t, c))
                    if plan.rows(b, c) == 0:
                        part = acc_like(b, c) if acc_like is not None else None
                    else:
                        part = compute(payload, b, c)
                    computed.append((li, part))
        except BaseException:
            # finish this round's messages (the peers posted theirs) before leaving, so that no transfer is left
            # writing into freed buffers; the peers then fail on the next round within their timeout
            _wait_quietly(works)
            raise
        for w in works:
            w.wait()
        del ops, works
        for cp, buf in finals_in:
            add_final(cp, buf)
        if acc_like is not None:
            for li, part in computed:
                inc = acc_in.pop((li, t, c), None)
                produced[(li, t, c)] = part if inc is None else merge(inc, part)
    return final


# --------------------------------------------------------------------------------------------- InfoNCE / CLIP
class InfoNCERing:
    """SupCon InfoNCE of this rank's query rows against every rank's keys (and, symmetric, the key columns
    against every rank's queries).  Positives: ``q_labels == k_labels``; ``k_labels`` of remote chunks are the
    global indices of the keys (``travel_labels=False``: diagonal / CLIP positives) or travel with the keys."""

    def __init__(self, plan: Plan, blocks: InfoNCEBlocks, q_labels: torch.Tensor,
                 k_labels: Optional[torch.Tensor] = None):
        self.plan, self.blocks, self.q_labels, self.k_labels = plan, blocks, q_labels, k_labels
        self.symmetric = blocks.symmetric

    def _kl(self, payload, b, c, device):
        return payload[1] if self.k_labels is not None else self.plan.global_ids(b, c, device)

    def _key_payload(self, k, c, extra=None):
        s, e = self.plan.bounds(self.plan.rank, c)
        out = [k[s:e]]
        if self.k_labels is not None:
            out.append(self.k_labels[s:e])
        if extra is not None:
            out.append(extra[s:e])
        return out

    def _key_like(self, k, b, c, extra_cols=0, extra_dtype=None):
        m = self.plan.rows(b, c)
        out = [k.new_empty(m, k.shape[1])]
        if self.k_labels is not None:
            out.append(self.k_labels.new_empty(m))
        if extra_cols:
            out.append(k.new_empty(m, extra_cols, dtype=extra_dtype))
        return out

    def forward(self, q, k, scale):
        """-> (row stats (n, 3), own column stats (m, 3) or None), merged over every rank."""
        plan, blocks, sd = self.plan, self.blocks, self.blocks.stat_dtype
        state = {}

        def compute(payload, b, c):
            row, col = blocks.fwd(q, payload[0], scale, self.q_labels, self._kl(payload, b, c, q.device))
            state["row"] = row if "row" not in state else merge_stats(state["row"], row)
            return [col] if self.symmetric else None

        acc_like = (lambda b, c: [q.new_empty(plan.rows(b, c), 3, dtype=sd)]) if self.symmetric else None
        final = ring_pass(plan, lambda c: self._key_payload(k, c), lambda b, c: self._key_like(k, b, c), compute,
                          acc_like, lambda a, p: [merge_stats(a[0], p[0])])
        col = torch.cat([f[0] for f in final], 0) if self.symmetric else None
        return state["row"], col

    def backward(self, q, k, scale, row, col, g_row, g_col):
        """-> (dq, dk, dscale) of ``sum g_row * row_loss + sum g_col * col_loss`` summed over every rank."""
        plan, blocks, sd = self.plan, self.blocks, self.blocks.stat_dtype
        acc_dtype = compute_dtype(k.dtype)
        row2 = row[:, :2].contiguous()
        colmeta = torch.stack([col[:, 0], col[:, 1], g_col.to(sd)], 1) if self.symmetric else None
        state = {"dscale": torch.zeros((), dtype=torch.float64, device=q.device)}

        def compute(payload, b, c):
            kl = self._kl(payload, b, c, q.device)
            cm = payload[-1] if self.symmetric else None
            dq, dk, ds = blocks.bwd(q, payload[0], scale, self.q_labels, kl, row2, g_row,
                                    None if cm is None else cm[:, :2], None if cm is None else cm[:, 2])
            state["dq"] = dq.to(acc_dtype) if "dq" not in state else state["dq"].add_(dq)
            state["dscale"] += ds.to(torch.float64)
            return [dk.to(acc_dtype)]

        final = ring_pass(plan, lambda c: self._key_payload(k, c, colmeta),
                          lambda b, c: self._key_like(k, b, c, 3 if self.symmetric else 0, sd), compute,
                          lambda b, c: [k.new_empty(plan.rows(b, c), k.shape[1], dtype=acc_dtype)],
                          lambda a, p: [a[0].add_(p[0])])
        dk = torch.cat([f[0] for f in final], 0)
        return state["dq"].to(q.dtype), dk.to(k.dtype), state["dscale"]


class InfoNCERingFn(torch.autograd.Function):
    """(row_loss (n,), col_loss (m,) or (0,)) of :class:`InfoNCERing`; the backward runs the ring again."""

    @staticmethod
    def forward(ctx, q, k, scale, problem: InfoNCERing):
        row, col = problem.forward(q, k, scale)
        ctx.problem = problem
        ctx.save_for_backward(q, k, scale, row, col if col is not None else row.new_zeros(0, 3))
        row_loss = supcon_from_stats(row)
        col_loss = supcon_from_stats(col) if col is not None else row.new_zeros(0)
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, scale, row, col = ctx.saved_tensors
        problem = ctx.problem
        if g_row is None:
            g_row = row.new_zeros(row.shape[0])
        if problem.symmetric and g_col is None:
            g_col = col.new_zeros(col.shape[0])
        dq, dk, dscale = problem.backward(q, k, scale, row, col if problem.symmetric else None, g_row, g_col)
        return dq, dk, dscale.to(scale.dtype).reshape(scale.shape), None


# --------------------------------------------------------------------------------------------- SigLIP
class SigLipRing:
    """Sum over every rank's text of this rank's SigLIP pair losses (positives: this rank's diagonal)."""

    def __init__(self, plan: Plan, blocks: SigLipBlocks):
        self.plan, self.blocks = plan, blocks

    def _diag(self, b, c):
        return self.plan.bounds(b, c)[0] if b == self.plan.rank else None

    def _own(self, k, c):
        s, e = self.plan.bounds(self.plan.rank, c)
        return [k[s:e]]

    def forward(self, q, k, scale, bias):
        plan = self.plan
        state = {}

        def compute(payload, b, c):
            rows = self.blocks.fwd(q, payload[0], scale, bias, self._diag(b, c))
            state["rows"] = rows if "rows" not in state else state["rows"].add_(rows)
            return None

        ring_pass(plan, lambda c: self._own(k, c), lambda b, c: [k.new_empty(plan.rows(b, c), k.shape[1])], compute)
        return state["rows"]

    def backward(self, q, k, scale, bias, g_row):
        plan = self.plan
        acc_dtype = compute_dtype(k.dtype)
        state = {"ds": torch.zeros((), dtype=torch.float64, device=q.device)}
        state["db"] = state["ds"].clone()

        def compute(payload, b, c):
            dq, dk, ds, db = self.blocks.bwd(q, payload[0], scale, bias, self._diag(b, c), g_row)
            state["dq"] = dq.to(acc_dtype) if "dq" not in state else state["dq"].add_(dq)
            state["ds"] += ds.to(torch.float64)
            state["db"] += db.to(torch.float64)
            return [dk.to(acc_dtype)]

        final = ring_pass(plan, lambda c: self._own(k, c), lambda b, c: [k.new_empty(plan.rows(b, c), k.shape[1])],
                          compute, lambda b, c: [k.new_empty(plan.rows(b, c), k.shape[1], dtype=acc_dtype)],
                          lambda a, p: [a[0].add_(p[0])])
        dk = torch.cat([f[0] for f in final], 0)
        return state["dq"].to(q.dtype), dk.to(k.dtype), state["ds"], state["db"]


class SigLipRingFn(torch.autograd.Function):
    """Row sums (n,) of :class:`SigLipRing`; the backward runs the ring again."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, problem: SigLipRing):
        ctx.problem = problem
        ctx.save_for_backward(q, k, scale, bias)
        return problem.forward(q, k, scale, bias)

    @staticmethod
    def backward(ctx, g_row):
        q, k, scale, bias = ctx.saved_tensors
        dq, dk, ds, db = ctx.problem.backward(q, k, scale, bias, g_row)
        return dq, dk, ds.to(scale.dtype).reshape(scale.shape), db.to(bias.dtype).reshape(bias.shape), None


class SigLipBlockFn(torch.autograd.Function):
    """Row sums of one SigLIP block with autograd (the ``"gather"`` and ``"reduce"`` dist_impls)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, blocks: SigLipBlocks, diag):
        ctx.blocks, ctx.diag = blocks, diag
        ctx.save_for_backward(q, k, scale, bias)
        return blocks.fwd(q, k, scale, bias, diag)

    @staticmethod
    def backward(ctx, g_row):
        q, k, scale, bias = ctx.saved_tensors
        dq, dk, ds, db = ctx.blocks.bwd(q, k, scale, bias, ctx.diag, g_row)
        return (dq.to(q.dtype), dk.to(k.dtype), ds.to(scale.dtype).reshape(scale.shape),
                db.to(bias.dtype).reshape(bias.shape), None, None)
