"""The public losses: validate, pick a backend, run it.

float64 (2026-12-01, issue 9 item 2): the fused kernels compute in float32, so float64 inputs run the float64
reference on every backend (:func:`_backend`); ``gradcheck`` passes at this API on every backend.

Each public function resolves the backend of its op (the table in ``_backends.py``: ``"infonce"``,
``"siglip"``, ``"dispersive"``, ``"uniformity"``, ...) and calls the op's core (``infonce_core`` ... in
``infonce.py`` / ``dispersive.py``) with it; the ``"torch"`` backend runs the dense references in
``contrastgen.reference``.  The contract of the InfoNCE / SigLIP cores is ``contrastgen/reference/core.py``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _validate as V
from ._dispatch import resolve_backend
from .dispersive import dispersive_core, uniformity_core
from .infonce import infonce_core, siglip_core

POSITIVES = ("diagonal", "supcon", "pml")
REDUCTIONS = ("none", "mean", "sum")
DISPERSIVE_VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _backend(op: str, backend, *tensors) -> str:
    """The backend that runs ``op``: ``resolve_backend``'s choice (which also rejects a bad ``backend``), except
    that float64 inputs always run the float64 reference -- the fused kernels would compute them in float32."""
    name = resolve_backend(op, backend, tensors[0].device)
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return "torch"
    return name


def _reference_only(op: str, backend, device) -> None:
    """Ops without a fused kernel: an explicitly requested backend must exist (else ValueError); the default
    is the reference without a fallback warning (there is nothing to fall back from)."""
    if backend is not None or os.environ.get("CONTRASTGEN_BACKEND", "").strip():
        resolve_backend(op, backend, device)


def _zero_grad_anchor(loss: torch.Tensor, *tensors) -> torch.Tensor:
    """Adds ``0 * loss * t`` so that every tensor argument gets a zero gradient, as in the reference -- and a
    non-finite one when the loss is non-finite (the reference's gradient is NaN there too)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            loss = loss + (0.0 * loss.detach()) * t.sum().to(loss.dtype)
    return loss


# --------------------------------------------------------------------------- CLIP / InfoNCE family
def info_nce(query, key=None, *, temperature=0.07, labels=None, key_labels=None, positives="diagonal",
             negatives=None, in_batch_negatives=None, symmetric=False, reduction="mean", backend=None):
    """General InfoNCE; see :func:`contrastgen.reference.info_nce_ref` for the exact definition.

    query (N, D); key (M, D) or None (the queries are the keys, self-pairs excluded); labels (N,) and
    key_labels (M,) integer tensors for ``positives="supcon"|"pml"``; negatives (K, D) a bank shared by
    all queries.  Returns a scalar, or (N,) with ``reduction="none"``.  float64 inputs run the float64 reference.
    """
    V.check_tensor("query", query, ndim=2)
    V.check_bool("symmetric", symmetric)
    V.check_choice("positives", positives, POSITIVES)
    V.check_choice("reduction", reduction, REDUCTIONS)
    temperature = V.check_positive_scalar("temperature", temperature, like=query)
    n = query.shape[0]
    if key is not None:
        V.check_tensor("key", key, ndim=2)
        V.check_same(("query", "key"), (query, key))
        V.check_feature_dim(("query", "key"), (query, key))
    m = n if key is None else key.shape[0]
    if positives == "diagonal":
        if key is None:
            raise ValueError("positives='diagonal' needs key: with key=None the diagonal is the excluded self-pair")
        if m != n:
            raise ValueError(f"positives='diagonal' needs as many keys as queries: query has shape {tuple(query.shape)}, "
                             f"key has shape {tuple(key.shape)}")
        if labels is not None or key_labels is not None:
            raise ValueError("labels/key_labels are given but positives='diagonal' ignores them; use positives='supcon' or 'pml'")
    else:
        if labels is None:
            raise ValueError(f"positives={positives!r} needs labels of shape ({n},)")
        V.check_labels("labels", labels, n, query)
        if key is None and key_labels is not None:
            raise ValueError("key_labels is given but key is None (the queries are the keys)")
        if key is not None:
            if key_labels is None:
                if m != n:
                    raise ValueError(f"key has {m} rows but query has {n}: pass key_labels of shape ({m},)")
                key_labels = labels
            V.check_labels("key_labels", key_labels, m, query)
    if negatives is not None:
        V.check_tensor("negatives", negatives, ndim=2)
        V.check_same(("query", "negatives"), (query, negatives))
        V.check_feature_dim(("query", "negatives"), (query, negatives))
    if in_batch_negatives is None:
        in_batch_negatives = negatives is None
    else:
        V.check_bool("in_batch_negatives", in_batch_negatives)
    if symmetric:
        if key is None or negatives is not None or positives == "pml":
            raise ValueError("symmetric=True needs key, no negatives bank, and positives 'diagonal' or 'supcon'")
        if reduction == "none" and m != n:
            raise ValueError(f"symmetric=True with reduction='none' needs N == M, got query {tuple(query.shape)}, key {tuple(key.shape)}")

    name = _backend("infonce", backend, query, key, negatives)
    if name == "torch":
        return ref.info_nce_ref(query, key, temperature=temperature, labels=labels, key_labels=key_labels,
                                positives=positives, negatives=negatives, in_batch_negatives=in_batch_negatives,
                                symmetric=symmetric, reduction=reduction)
    scale = 1.0 / V.to_scalar_tensor(temperature, query)
    exclude_self = key is None
    k = query if exclude_self else key
    ql = None if positives == "diagonal" else labels
    kl = None if positives == "diagonal" else (labels if exclude_self else key_labels)
    pml = positives == "pml"
    row, col, row_stats, col_stats = infonce_core(name, query, k, negatives, scale, ql, kl, exclude_self, in_batch_negatives,
                                          pml, symmetric)
    row_count = row_stats[:, 1].sum() if pml else (row_stats[:, 1] > 0).sum()
    loss = _reduce(row, row_count, reduction)
    if symmetric:
        if reduction == "none":
            loss = 0.5 * (row + col)
        else:
            loss = 0.5 * (loss + _reduce(col, (col_stats[:, 1] > 0).sum(), reduction))
    return loss.to(query.dtype)


def _reduce(per_anchor, count, reduction):
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / count.clamp_min(1).to(per_anchor.dtype)


def _check_pair(image, text):
    V.check_tensor("image", image, ndim=2)
    V.check_tensor("text", text, ndim=2)
    V.check_same(("image", "text"), (image, text))
    if image.shape != text.shape:
        raise ValueError(f"image and text must have the same shape (N, D): image {tuple(image.shape)}, text {tuple(text.shape)}")


def clip_loss(image, text, logit_scale, logit_bias=None, *, backend=None):
    """OpenCLIP ``ClipLoss``: symmetric cross-entropy of ``logit_scale * image @ text.T (+ logit_bias)``.

    ``logit_scale`` is the multiplier (already exponentiated).  image, text: (N, D) -> scalar.  float64 inputs run
    the float64 reference."""
    _check_pair(image, text)
    logit_scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
    if logit_bias is not None:
        logit_bias = V.check_finite_scalar("logit_bias", logit_bias)
    name = _backend("infonce", backend, image, text)
    if name == "torch":
        return ref.clip_loss_ref(image, text, logit_scale, logit_bias)
    scale = V.to_scalar_tensor(logit_scale, image)
    row, col, _, _ = infonce_core(name, image, text, None, scale, None, None, False, True, False, True)
    loss = 0.5 * (row.mean() + col.mean())
    return _zero_grad_anchor(loss, logit_bias).to(image.dtype)


def siglip_loss(image, text, logit_scale, logit_bias, *, backend=None):
    """OpenCLIP ``SigLipLoss``: ``-(1/N) sum_ij log sigmoid(y_ij (logit_scale x_i.y_j + logit_bias))``.
    float64 inputs run the float64 reference."""
    _check_pair(image, text)
    logit_scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
    logit_bias = V.check_finite_scalar("logit_bias", logit_bias)
    name = _backend("siglip", backend, image, text)
    if name == "torch":
        return ref.siglip_loss_ref(image, text, logit_scale, logit_bias)
    row = siglip_core(name, image, text, V.to_scalar_tensor(logit_scale, image), V.to_scalar_tensor(logit_bias, image))
    return (row.sum() / image.shape[0]).to(image.dtype)


def nt_xent(z1, z2, *, temperature=0.5, backend=None):
    """SimCLR NT-Xent over two views z1, z2 (N, D): cosine similarity / temperature, positive = other view.
    float64 inputs run the float64 reference."""
    V.check_tensor("z1", z1, ndim=2)
    V.check_tensor("z2", z2, ndim=2)
    V.check_same(("z1", "z2"), (z1, z2))
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (N, D): z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}")
    temperature = V.check_positive_scalar("temperature", temperature, like=z1)
    name = _backend("infonce", backend, z1, z2)
    if name == "torch":
        return ref.nt_xent_ref(z1, z2, temperature)
    n = z1.shape[0]
    # normalised in float32: in bf16 / fp16 the normalisation's backward cancels (g - z (z.g)) and amplifies the
    # rounding of a not-quite-unit z (found by tests/test_fuzz.py).  The C++ kernel computes in float32 anyway and
    # takes the float32 z; Triton gets it rounded back to the input dtype (its bf16 tensor-core products).
    z = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)
    if name != "cpp":
        z = z.to(z1.dtype)
    labels = torch.arange(n, device=z.device).repeat(2)
    scale = 1.0 / V.to_scalar_tensor(temperature, z1)
    row, _, _, _ = infonce_core(name, z, z, None, scale, labels, labels, True, True, False, False)
    return row.mean().to(z1.dtype)


# --------------------------------------------------------------------------- dispersive family
def dispersive_loss(z, *, variant="infonce_l2", tau=0.5, margin=1.0, grouped=False, backend=None):
    """Dispersive Loss (Wang & He 2025) of B samples flattened to M features.

    z (B, ...) -> scalar; with ``grouped=True`` z (G, B, ...) -> (G,) (G independent groups in one call).
    See :func:`contrastgen.reference.dispersive_loss_ref` for the variants.  float64 inputs run the float64
    reference."""
    V.check_bool("grouped", grouped)
    V.check_tensor("z", z, min_ndim=3 if grouped else 2)
    V.check_choice("variant", variant, DISPERSIVE_VARIANTS)
    tau = V.check_positive_scalar("tau", tau)
    margin = V.check_positive_scalar("margin", margin, allow_zero=True)
    if isinstance(tau, torch.Tensor) or isinstance(margin, torch.Tensor):
        raise TypeError("tau and margin must be python floats (they are hyper-parameters, not learned)")
    z3 = z if grouped else z.unsqueeze(0)
    if variant == "covariance" and z3.shape[1] < 2:
        raise ValueError(f"variant='covariance' needs at least 2 samples per group, got z of shape {tuple(z.shape)}")
    name = _backend("dispersive", backend, z)
    if name == "torch":
        out = ref.dispersive_loss_ref(z3, variant=variant, tau=tau, margin=margin, grouped=True)
    else:
        out = dispersive_core(name, z3.reshape(z3.shape[0], z3.shape[1], -1), variant, tau, margin).to(z.dtype)
    return out if grouped else out[0]


def uniformity(x, *, t=2.0, backend=None):
    """Wang & Isola uniformity ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of x (N, D), N >= 2.  float64 inputs
    run the float64 reference."""
    V.check_tensor("x", x, min_ndim=2)
    t = V.check_positive_scalar("t", t)
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got x of shape {tuple(x.shape)}")
    name = _backend("uniformity", backend, x)
    if name == "torch":
        return ref.uniformity_ref(x, t=t)
    return uniformity_core(name, x.reshape(x.shape[0], -1), t).to(x.dtype)


def alignment(x, y, *, alpha=2.0):
    """Wang & Isola alignment ``mean_i ||x_i - y_i||^alpha`` (PyTorch; memory-bound and tiny)."""
    V.check_tensor("x", x, min_ndim=2)
    V.check_tensor("y", y, min_ndim=2)
    V.check_same(("x", "y"), (x, y))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape: x {tuple(x.shape)}, y {tuple(y.shape)}")
    alpha = V.check_positive_scalar("alpha", alpha)
    return ref.alignment_ref(x, y, alpha=alpha)


# --------------------------------------------------------------------------- PatchNCE
def patch_nce(query, key, *, temperature=0.07, all_negatives_from_minibatch=False, detach_key=True, backend=None):
    """CUT PatchNCE: query/key (B, P, C), or equal-length lists of them (one per layer) -> mean over layers."""
    V.check_bool("all_negatives_from_minibatch", all_negatives_from_minibatch)
    V.check_bool("detach_key", detach_key)
    qs = [query] if isinstance(query, torch.Tensor) else list(query)
    ks = [key] if isinstance(key, torch.Tensor) else list(key)
    if len(qs) != len(ks) or not qs:
        raise ValueError(f"query and key must be tensors or equal-length, non-empty lists; got {len(qs)} and {len(ks)} layers")
    for i, (q, k) in enumerate(zip(qs, ks)):
        V.check_tensor(f"query[{i}]", q, ndim=3)
        V.check_tensor(f"key[{i}]", k, ndim=3)
        V.check_same((f"query[{i}]", f"key[{i}]"), (q, k))
        if q.shape != k.shape:
            raise ValueError(f"query[{i}] and key[{i}] must have the same shape (B, P, C): {tuple(q.shape)} vs {tuple(k.shape)}")
    temperature = V.check_positive_scalar("temperature", temperature)
    _reference_only("patch_nce", backend, qs[0].device)
    return ref.patch_nce_ref(qs, ks, temperature=temperature, all_negatives_from_minibatch=all_negatives_from_minibatch,
                             detach_key=detach_key)


# --------------------------------------------------------------------------- CONFORM
def attention_nce(maps, token_groups: Sequence[Sequence[int]], *, prev_maps=None, temperature=0.5,
                  softmax_normalize=False, smoothing="conform", loss="ntxent", backend=None):
    """CONFORM's contrastive loss over cross-attention maps (H, W, 77) -> scalar or (B, H, W, 77) -> (B,)."""
    V.check_bool("softmax_normalize", softmax_normalize)
    V.check_tensor("maps", maps, ndim=(3, 4))
    if maps.shape[-1] < 3:
        raise ValueError(f"maps must have a token axis (last) with at least 3 entries, got shape {tuple(maps.shape)}")
    if prev_maps is not None:
        V.check_tensor("prev_maps", prev_maps)
        V.check_same(("maps", "prev_maps"), (maps, prev_maps))
        if prev_maps.shape != maps.shape:
            raise ValueError(f"prev_maps must have the shape of maps: {tuple(prev_maps.shape)} vs {tuple(maps.shape)}")
    V.check_choice("smoothing", smoothing, ("conform", "gaussian", None))
    V.check_choice("loss", loss, ("ntxent", "contrastive"))
    temperature = V.check_positive_scalar("temperature", temperature)
    if isinstance(token_groups, torch.Tensor) or not isinstance(token_groups, (list, tuple)) or not token_groups:
        raise TypeError("token_groups must be a non-empty list of lists of token indices, e.g. [[2, 3], [6, 7]]")
    hi = maps.shape[-1] - 2
    seen = set()
    for gi, g in enumerate(token_groups):
        if not isinstance(g, (list, tuple)) or not g:
            raise ValueError(f"token_groups[{gi}] must be a non-empty list of token indices, got {g!r}")
        for t in g:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"token_groups[{gi}] holds {t!r}; token indices are ints")
            if not 1 <= t <= hi:
                raise ValueError(f"token index {t} in token_groups[{gi}] is out of range [1, {hi}] for maps of shape "
                                 f"{tuple(maps.shape)} (index 0 is the start token, the last channel is dropped)")
            if t in seen:
                raise ValueError(f"token index {t} appears in more than one place in token_groups")
            seen.add(t)
    if maps.shape[-3] < 2 or maps.shape[-2] < 2:
        raise ValueError(f"maps must be at least 2x2 spatially for the reflect-padded smoothing, got {tuple(maps.shape)}")
    _reference_only("attention_nce", backend, maps.device)
    return ref.attention_nce_ref(maps, token_groups, prev_maps=prev_maps, temperature=temperature,
                                 softmax_normalize=softmax_normalize, smoothing=smoothing, loss=loss)
