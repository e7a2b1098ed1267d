"""Contrastive losses across processes on ``torch.distributed`` (NCCL on GPUs, gloo on CPU; launch with torchrun).

Each rank passes its *local* features; no rank ever builds the global N x N logits (N = sum of the local
batches n_r).  Two ways to see the other ranks' features:

* ``mode="all_gather"``: an autograd-aware all-gather of the other side's features, then this rank's rows
  against all N keys with the fused kernel (OpenCLIP's ``gather_features``).  Memory O(N D) per rank.
* ``mode="ring"``: key chunks travel around the ring with point-to-point messages overlapped with the fused
  kernel on the chunk at hand; row and column log-sum-exps are merged across blocks and the backward sends
  the key-gradient accumulators back to their owners (``_ring.py``).  Memory O(n D) per rank.

Conventions (OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)``): each rank returns the loss of
its own rows (and, for CLIP, its own columns), normalised so that **the mean over ranks is the loss of the
concatenated batch**; after ``backward()`` each rank's feature gradients are ``world_size`` times the
gradients of that global loss, which DDP's gradient averaging turns back into the global gradient.  With
even local batches the per-rank losses and feature gradients equal OpenCLIP's; uneven local batches are
supported (the normaliser is N / world_size instead of n_r, so the mean is still the global loss).

Every call starts with a tiny all-gather of each rank's sizes and options (:func:`_comm.handshake`): a rank
whose inputs are invalid makes *every* rank raise (instead of leaving the others blocked in a collective),
and ranks that disagree on the feature dimension, dtype or options all raise the same error.  A rank that
never reaches the call (it crashed elsewhere) still blocks the others until the process group's timeout
(``init_process_group(timeout=...)``), as with any collective.  Every rank must run ``backward()`` too.

Without an initialized process group (or with one rank) every function is the single-process fused loss.

Launch (one process per GPU)::

    torchrun --standalone --nproc_per_node=8 train.py                      # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 train.py

    # train.py
    dist.init_process_group("nccl")                 # "gloo" for CPU tensors
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    loss = contrastgen.distributed.clip_loss(img_emb, txt_emb, logit_scale.exp(), mode="ring")
    loss.backward()                                 # every rank; DDP averages the parameter gradients
"""
from __future__ import annotations

import warnings

import torch

from .. import ops
from ..ops import _validate as V
from ..ops._dispatch import resolve_backend
from . import _comm as C
from ._blocks import InfoNCEBlocks, SigLipBlocks
from ._ring import InfoNCERing, InfoNCERingFn, Plan, SigLipBlockFn, SigLipRing, SigLipRingFn, ring_lanes

MODES = ("all_gather", "ring")
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

__all__ = ["clip_loss", "info_nce", "siglip_loss", "all_gather_with_grad", "clip_loss_distributed", "MODES",
           "DIST_IMPLS"]


# --------------------------------------------------------------------------------------------- helpers
def _check_pair(names, a, b):
    V.check_tensor(names[0], a, ndim=2)
    V.check_tensor(names[1], b, ndim=2)
    V.check_same(names, (a, b))
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (n, D): {names[0]} {tuple(a.shape)}, "
                         f"{names[1]} {tuple(b.shape)}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on ``like``'s device (keeps autograd for tensors)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(like.device)
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _zero_grad_anchor(loss, *tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            loss = loss + 0.0 * t.sum().to(loss.dtype)
    return loss


def _agree(table, what, names):
    """Columns 1.. of the handshake table must agree across ranks (column 0 is the local batch size)."""
    C.check_agree(table, 1, "feature dimension D", what)
    C.check_agree(table, 2, "dtype", what, lambda v: str(C.DTYPES[v]) if 0 <= v < len(C.DTYPES) else "?")
    for col, (name, describe) in enumerate(names, start=3):
        C.check_agree(table, col, name, what, describe)
    return [row[0] for row in table]


def _choice(options):
    return lambda v: repr(options[v]) if 0 <= v < len(options) else "?"


def _start(what, group, like, fields_fn, validate, nfields):
    """Validate locally, then (world > 1) run the handshake of ``nfields`` ints (a rank whose validation failed
    sends zeros).  -> (rank, world, table or None, what ``validate`` returned)."""
    rank, world = C.group_info(group)
    err, out = None, None
    try:
        out = validate()
    except (TypeError, ValueError) as e:
        if world == 1:
            raise
        err = e
    if world == 1:
        return rank, world, None, out
    fields = fields_fn() if err is None else [0] * nfields
    table = C.handshake(group, rank, world, fields, err, what=what, like=like)
    return rank, world, table, out


# --------------------------------------------------------------------------------------------- CLIP
def clip_loss(image, text, logit_scale, logit_bias=None, *, mode="all_gather", local_loss=True, gather_with_grad=True,
              group=None, backend=None):
    """OpenCLIP's distributed ``ClipLoss`` on this rank's local (n, D) image and text features.

    ``logit_scale`` is the multiplier (already exponentiated); ``logit_bias`` shifts every logit equally, so it
    cancels in the softmax (it gets a zero gradient).  ``local_loss`` / ``gather_with_grad`` follow OpenCLIP's
    ``ClipLoss`` for ``mode="all_gather"`` (every combination); ``mode="ring"`` computes this rank's rows and
    columns with gradients sent back to their owners, i.e. ``local_loss=True, gather_with_grad=True`` only.

    In ring mode the per-rank share of the ``logit_scale`` gradient differs from OpenCLIP's (the column terms
    of rank b's loss are computed where b's text block happens to be); its sum over ranks -- what DDP averages
    -- is the same, and the loss values and feature gradients are OpenCLIP's per rank.
    """
    what = "contrastgen.distributed.clip_loss"

    def validate():
        _check_pair(("image", "text"), image, text)
        scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
        bias = V.check_finite_scalar("logit_bias", logit_bias) if logit_bias is not None else None
        V.check_choice("mode", mode, MODES)
        _check_bool("local_loss", local_loss)
        _check_bool("gather_with_grad", gather_with_grad)
        if mode == "ring" and not (local_loss and gather_with_grad):
            raise ValueError(f"mode='ring' computes this rank's rows and columns and sends the key gradients back to "
                             f"their owners (local_loss=True, gather_with_grad=True); got local_loss={local_loss}, "
                             f"gather_with_grad={gather_with_grad}: use mode='all_gather' for those")
        return scale, bias, resolve_backend("infonce", backend, image.device)

    rank, world, table, (scale, bias, name) = _start(
        what, group, image,
        lambda: [image.shape[0], image.shape[1], C.dtype_code(image), MODES.index(mode), local_loss, gather_with_grad],
        validate, 6)
    if table is None:
        return ops.clip_loss(image, text, scale, bias, backend=backend)
    sizes = _agree(table, what, [("mode", _choice(MODES)), ("local_loss", bool), ("gather_with_grad", bool)])
    N, n, off = sum(sizes), sizes[rank], sum(sizes[:rank])
    if mode == "ring":
        plan = Plan(group, rank, world, sizes)
        ids = torch.arange(off, off + n, device=image.device)
        problem = InfoNCERing(plan, InfoNCEBlocks(name, True, image.dtype), ids)
        row, col = InfoNCERingFn.apply(image, text, _as_tensor(scale, image), problem)
        loss = (row.sum() + col.sum()) * (0.5 * world / N)
        return _zero_grad_anchor(loss.to(image.dtype), bias)
    if local_loss:
        if gather_with_grad:
            all_image, all_text = (C.AllGather.apply(x, sizes, rank, group) for x in (image, text))
        else:
            all_image, all_text = (C.all_gather_rows(x.detach(), sizes, group) for x in (image, text))
        ids = torch.arange(off, off + n, device=image.device)
        every = torch.arange(N, device=image.device)
        temperature = 1.0 / scale
        kw = dict(temperature=temperature, labels=ids, key_labels=every, positives="supcon", reduction="sum",
                  backend=backend)
        loss = (ops.info_nce(image, all_text, **kw) + ops.info_nce(text, all_image, **kw)) * (0.5 * world / N)
        return _zero_grad_anchor(loss.to(image.dtype), bias)
    if gather_with_grad:
        all_image, all_text = (C.AllGather.apply(x, sizes, rank, group) for x in (image, text))
    else:   # gathered without gradients, this rank's own slice put back so that it gets its gradient
        def own_slice_back(x):
            g = C.all_gather_rows(x.detach(), sizes, group)
            return torch.cat([g[:off], x, g[off + n:]], 0)
        all_image, all_text = own_slice_back(image), own_slice_back(text)
    return ops.clip_loss(all_image, all_text, scale, bias, backend=backend)


# --------------------------------------------------------------------------------------------- InfoNCE
def info_nce(query, key, *, temperature=0.07, labels=None, mode="all_gather", group=None, backend=None):
    """InfoNCE of this rank's (n, D) queries against every rank's keys (rows only).

    Positives: query i and key i of the same rank (the diagonal of the concatenated batch), or, with ``labels``
    (n,) integers shared by ``query[i]`` and ``key[i]``, every key with the query's label (SupCon: the other
    positives stay in the denominator).  The mean over ranks equals
    ``contrastgen.info_nce(cat(query), cat(key), labels=cat(labels), positives="supcon")`` (``"diagonal"``
    without labels); gradients flow back to the owners of the keys."""
    what = "contrastgen.distributed.info_nce"

    def validate():
        _check_pair(("query", "key"), query, key)
        t = V.check_positive_scalar("temperature", temperature, like=query)
        if labels is not None:
            V.check_labels("labels", labels, query.shape[0], query)
        V.check_choice("mode", mode, MODES)
        return t, resolve_backend("infonce", backend, query.device)

    rank, world, table, (t, name) = _start(
        what, group, query,
        lambda: [query.shape[0], query.shape[1], C.dtype_code(query), MODES.index(mode), labels is not None],
        validate, 5)
    if table is None:
        positives = "diagonal" if labels is None else "supcon"
        return ops.info_nce(query, key, temperature=t, labels=labels, positives=positives, backend=backend)
    sizes = _agree(table, what, [("mode", _choice(MODES)), ("labels (given or None)", bool)])
    N, n, off = sum(sizes), sizes[rank], sum(sizes[:rank])
    ql = labels.to(torch.int64) if labels is not None else torch.arange(off, off + n, device=query.device)
    if mode == "ring":
        plan = Plan(group, rank, world, sizes)
        problem = InfoNCERing(plan, InfoNCEBlocks(name, False, query.dtype), ql,
                              ql.contiguous() if labels is not None else None)
        row, _ = InfoNCERingFn.apply(query, key, 1.0 / _as_tensor(t, query), problem)
        return (row.sum() * (world / N)).to(query.dtype)
    all_key = C.AllGather.apply(key, sizes, rank, group)
    if labels is not None:
        kl = C.all_gather_rows(ql.contiguous(), sizes, group)
    else:
        kl = torch.arange(N, device=query.device)
    # every row has a positive (its own key), so the global mean divides by N
    loss = ops.info_nce(query, all_key, temperature=t, labels=ql, key_labels=kl, positives="supcon", reduction="sum",
                        backend=backend)
    return (loss * (world / N)).to(query.dtype)


# --------------------------------------------------------------------------------------------- SigLIP
def siglip_loss(image, text, logit_scale, logit_bias, *, dist_impl="bidir", group=None, backend=None):
    """OpenCLIP's distributed ``SigLipLoss(dist_impl=...)`` on this rank's local (n, D) features.

    Every ``dist_impl`` gives the same loss and gradients (OpenCLIP's, per rank, including ``logit_scale`` and
    ``logit_bias``); they differ in how the text blocks move: ``"shift"`` one ring direction, ``"bidir"``
    both (half the hops, two blocks in flight), both overlapped with the kernel and recomputing in the
    backward (O(n D) memory); ``"gather"`` one autograd all-gather and ``"reduce"`` one all-reduce per rank, as
    OpenCLIP does (O(N D) memory)."""
    what = "contrastgen.distributed.siglip_loss"

    def validate():
        _check_pair(("image", "text"), image, text)
        scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
        bias = V.check_finite_scalar("logit_bias", logit_bias)
        V.check_choice("dist_impl", dist_impl, DIST_IMPLS)
        return scale, bias, resolve_backend("siglip", backend, image.device)

    rank, world, table, (scale, bias, name) = _start(
        what, group, image,
        lambda: [image.shape[0], image.shape[1], C.dtype_code(image), DIST_IMPLS.index(dist_impl)], validate, 4)
    if table is None:
        return ops.siglip_loss(image, text, scale, bias, backend=backend)
    sizes = _agree(table, what, [("dist_impl", _choice(DIST_IMPLS))])
    N = sum(sizes)
    blocks = SigLipBlocks(name, image.dtype)
    s, b = _as_tensor(scale, image), _as_tensor(bias, image)
    if dist_impl in ("shift", "bidir"):
        plan = Plan(group, rank, world, sizes, ring_lanes(world, dist_impl == "bidir"))
        rows = SigLipRingFn.apply(image, text, s, b, SigLipRing(plan, blocks))
        return (rows.sum() * (world / N)).to(image.dtype)
    if dist_impl == "gather":
        all_text = C.AllGather.apply(text, sizes, rank, group)
        pieces = [all_text[o:o + m] for o, m in zip([sum(sizes[:r]) for r in range(world)], sizes)]
    else:
        pieces = [C.BlockFromRank.apply(text, src, sizes, rank, group) for src in range(world)]
    total = sum(SigLipBlockFn.apply(image, p, s, b, blocks, 0 if src == rank else None).sum()
                for src, p in enumerate(pieces))
    return (total * (world / N)).to(image.dtype)


# --------------------------------------------------------------------------------------------- helpers kept public
def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) from every rank along dim 0 (uneven n_r allowed); gradients are summed over
    ranks and flow back to each rank's slice.  Without a process group, returns ``x``."""
    rank, world = C.group_info(group)
    if world == 1:
        return x
    table = C.handshake(group, rank, world, [x.shape[0]], None, what="contrastgen.distributed.all_gather_with_grad",
                        like=x)
    return C.AllGather.apply(x, [row[0] for row in table], rank, group)


_ALIAS_WARNED = False


def clip_loss_distributed(image, text, logit_scale, logit_bias=None, *, local_loss: bool = False, group=None,
                          backend=None):
    """Deprecated: ``clip_loss(image, text, logit_scale, logit_bias, mode="all_gather", local_loss=local_loss,
    gather_with_grad=True)``."""
    global _ALIAS_WARNED
    if not _ALIAS_WARNED:
        _ALIAS_WARNED = True
        warnings.warn("contrastgen.distributed.clip_loss_distributed is deprecated; use contrastgen.distributed."
                      "clip_loss(image, text, logit_scale, logit_bias, mode='all_gather', local_loss=..., "
                      "gather_with_grad=True)", DeprecationWarning, stacklevel=2)
    return clip_loss(image, text, logit_scale, logit_bias, mode="all_gather", local_loss=local_loss,
                     gather_with_grad=True, group=group, backend=backend)
