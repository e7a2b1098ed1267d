"""Process-group plumbing for :mod:`contrastgen.distributed`.

* :func:`group_info` -- (rank, world size) of a group, (0, 1) when torch.distributed is not initialized;
* :func:`handshake` -- the one small all-gather every distributed loss starts with: each rank's local
  sizes, feature dimension, dtype and options, plus an error flag, so that a rank whose inputs are invalid
  makes *every* rank raise (instead of leaving the others blocked in a collective), and so that uneven
  local batches are known to everybody;
* :class:`AllGather` / :class:`AllReduce` -- autograd-aware collectives (uneven first dimensions padded),
  written on public, non-deprecated ``torch.distributed`` calls (``torch.distributed.nn.functional`` warns
  with a FutureWarning on every call since torch 2.14);
* :func:`start_p2p` -- one ``batch_isend_irecv`` of a list of sends and receives (the ring's messages).

Everything here is collective: every rank of the group must call it, in the same order.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# torch 2.14 deprecates all_gather_into_tensor / reduce_scatter_tensor (FutureWarning on each call) in favour of
# the *_single names, which older torch (the GPU machines run 2.11) does not have yet.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def group_info(group) -> Tuple[int, int]:
    """(rank, world size) of ``group``; (0, 1) when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialized (call "
                             "torch.distributed.init_process_group first, e.g. under torchrun)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (P2P calls take global ranks on every torch version)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def comm_device(group, like) -> torch.device:
    """Where the group's collectives want their tensors: CPU for gloo, the features' (or current) GPU else."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.device.type != "cpu":
        return like.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dtype_code(t) -> int:
    if isinstance(t, torch.Tensor) and t.dtype in DTYPES:
        return DTYPES.index(t.dtype)
    return -1


class InputError(ValueError):
    """Raised on every rank when some rank rejected its inputs (that rank raises its own, precise error)."""


def handshake(group, rank: int, world: int, fields: Sequence[int], error: Optional[BaseException], *, what: str,
              like=None) -> List[List[int]]:
    """All-gather ``fields`` (small ints) from every rank; returns the (world, len(fields)) table.

    If any rank passes ``error`` (its local validation failed), every rank raises: that rank its own error,
    the others an :class:`InputError` naming it.  Costs one tiny all-gather (and, on GPUs, one host sync to
    read the table)."""
    dev = comm_device(group, like)
    row = [0 if error is None else 1] + [int(f) for f in fields]
    mine = torch.tensor(row, dtype=torch.int64, device=dev)
    table = torch.empty(world * len(row), dtype=torch.int64, device=dev)
    _all_gather_single(table, mine, group=group)
    rows = table.view(world, len(row)).tolist()
    bad = [r for r, x in enumerate(rows) if x[0]]
    if error is not None:
        raise error
    if bad:
        raise InputError(f"{what}: rank(s) {bad} of {world} rejected their inputs (see the error raised there); "
                         f"every rank raises so that none waits in a collective")
    return [x[1:] for x in rows]


def check_agree(table: List[List[int]], column: int, name: str, what: str, describe=str) -> int:
    """The value of ``column`` that every rank must share; raises (on every rank) naming the disagreeing ranks."""
    values = [r[column] for r in table]
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {describe(v)}" for r, v in enumerate(values))
        raise ValueError(f"{what}: every rank must pass the same {name}; got {shown}")
    return values[0]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])], 0)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank r holds ``sizes[r]`` rows) along dim 0; no autograd."""
    world, mx = len(sizes), max(sizes)
    out = x.new_empty(world * mx, *x.shape[1:])
    _all_gather_single(out, _pad_rows(x, mx), group=group)
    if all(s == mx for s in sizes):
        return out
    return torch.cat([out[r * mx: r * mx + s] for r, s in enumerate(sizes)], 0)


def _sum_own_rows(g: torch.Tensor, sizes: Sequence[int], rank: int, group) -> torch.Tensor:
    """Each rank gets the sum over ranks of the rows of ``g`` (N = sum(sizes) rows) that it owns."""
    world, mx = len(sizes), max(sizes)
    if all(s == mx for s in sizes):
        gp = g.contiguous()
    else:
        offs = [sum(sizes[:r]) for r in range(world)]
        gp = torch.cat([_pad_rows(g[o:o + s], mx) for o, s in zip(offs, sizes)], 0)
    if _reduce_scatter_single is not None:
        out = g.new_empty(mx, *g.shape[1:])
        _reduce_scatter_single(out, gp, group=group)
    else:                                             # pragma: no cover - torch without reduce_scatter_tensor
        dist.all_reduce(gp, group=group)
        out = gp[rank * mx:(rank + 1) * mx]
    return out[:sizes[rank]]


class AllGather(torch.autograd.Function):
    """``cat(x of every rank)`` with gradients: the backward sums each rank's rows over the group and hands them
    back to their owner (a reduce-scatter), as OpenCLIP's ``gather_with_grad=True`` does."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = tuple(sizes), rank, group
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        return _sum_own_rows(g, ctx.sizes, ctx.rank, ctx.group), None, None, None


class BlockFromRank(torch.autograd.Function):
    """Rank ``src``'s block, delivered to every rank by an all-reduce of (that block on ``src``, zeros elsewhere),
    as OpenCLIP's SigLIP ``dist_impl="reduce"``; the backward all-reduces the gradients back to ``src``.

    ``x`` (this rank's block) is an input on every rank, so that the backward runs on every rank."""

    @staticmethod
    def forward(ctx, x, src, sizes, rank, group):
        ctx.src, ctx.sizes, ctx.rank, ctx.group = src, tuple(sizes), rank, group
        mx = max(sizes)
        buf = _pad_rows(x, mx).clone() if rank == src else x.new_zeros(mx, *x.shape[1:])
        dist.all_reduce(buf, group=group)
        return buf[:sizes[src]]

    @staticmethod
    def backward(ctx, g):
        mx = max(ctx.sizes)
        buf = _pad_rows(g, mx).clone()
        dist.all_reduce(buf, group=ctx.group)
        mine = ctx.sizes[ctx.rank]
        gx = buf[:mine] if ctx.rank == ctx.src else g.new_zeros(mine, *g.shape[1:])
        return gx, None, None, None, None


def start_p2p(ops: Sequence[Tuple[str, torch.Tensor, int, int]], group) -> list:
    """Post ``ops`` = [("send" | "recv", tensor, peer rank in group, tag), ...] as one ``batch_isend_irecv``;
    returns the works to ``wait()``.  Empty tensors are skipped (both sides know the sizes)."""
    p2p = []
    for kind, t, peer, tag in ops:
        if t.numel() == 0:
            continue
        fn = dist.isend if kind == "send" else dist.irecv
        p2p.append(dist.P2POp(fn, t, global_rank(group, peer), group=group, tag=tag))
    return dist.batch_isend_irecv(p2p) if p2p else []
