"""The public losses: validate, pick a backend, run it.

float64 (2026-12-01, issue 9 item 2): the fused kernels compute in float32, so float64 inputs run the float64
reference on every backend (:func:`_backend`); ``gradcheck`` passes at this API on every backend.

Each public function resolves the backend of its op (the table in ``_backends.py``: ``"infonce"``,
``"siglip"``, ``"dispersive"``, ``"uniformity"``, ...) and calls the op's core (``infonce_core`` ... in
``infonce.py`` / ``dispersive.py``) with it; the ``"torch"`` backend runs the dense references in
``contrastgen.reference``.  The contract of the InfoNCE / SigLIP cores is ``contrastgen/reference/core.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from . import _validate as V
from ._dispatch import resolve_backend
from .dispersive import dispersive_core, uniformity_core
from .attention_nce import attention_nce_core
from .infonce import infonce_core, siglip_core
from .infonce_paired import infonce_paired_core
from .patchnce import patch_nce_core

Scalar = Union[float, Tensor]      # a python number or a 0-d tensor (learnable scales and temperatures)
POSITIVES = ("diagonal", "supcon", "pml")
SIMILARITIES = ("dot", "cosine")
REDUCTIONS = ("none", "mean", "sum")
DISPERSIVE_VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _backend(op: str, backend, *tensors, api: Optional[str] = None, shape: Optional[Sequence[int]] = None) -> str:
    """The backend that runs ``op``: ``resolve_backend``'s choice (which also rejects a bad ``backend`` and applies
    the shape crossover), except that float64 inputs always run the float64 reference -- the fused kernels would
    compute them in float32."""
    name = resolve_backend(op, backend, tensors[0].device, api=api, shape=shape)
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return "torch"
    return name


def _zero_grad_anchor(loss: torch.Tensor, *tensors) -> torch.Tensor:
    """Adds ``0 * loss * t`` so that every tensor argument gets a zero gradient, as in the reference -- and a
    non-finite one when the loss is non-finite (the reference's gradient is NaN there too)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            loss = loss + (0.0 * loss.detach()) * t.sum().to(loss.dtype)
    return loss


# --------------------------------------------------------------------------- CLIP / InfoNCE family
def info_nce(query: Tensor, key: Optional[Tensor] = None, *, temperature: Scalar = 0.07,
             labels: Optional[Tensor] = None, key_labels: Optional[Tensor] = None, positives: str = "diagonal",
             negatives: Optional[Tensor] = None, in_batch_negatives: Optional[bool] = None, symmetric: bool = False,
             reduction: str = "mean", similarity: str = "dot",
             backend: Optional[str] = None) -> Tensor:
    """General InfoNCE; see :func:`contrastgen.reference.info_nce_ref` for the exact definition.

    query (N, D); key (M, D) or None (the queries are the keys, self-pairs excluded); labels (N,) and
    key_labels (M,) integer tensors for ``positives="supcon"|"pml"``; negatives (K, D) a bank shared by
    all queries, or (N, K, D) per-query negatives (row i its own K; diagonal/supcon positives, see
    :func:`contrastgen.reference.info_nce_paired_ref`), or an object with ``as_negatives()`` (e.g.
    :class:`contrastgen.nn.MoCoQueue`, passed without a copy).  Returns a scalar, or (N,) with ``reduction="none"``.
    float64 inputs run the float64 reference.

    ``similarity="dot"`` (the default) uses the features as given: ``s_ij = q_i . k_j / temperature``.
    ``similarity="cosine"`` L2-normalises query, key and negatives first (pytorch-metric-learning's
    ``CosineSimilarity``, CoDE, CONFORM); the gradient flows through the normalisation.
    """
    V.check_tensor("query", query, ndim=2)
    V.check_bool("symmetric", symmetric)
    V.check_choice("positives", positives, POSITIVES)
    V.check_choice("reduction", reduction, REDUCTIONS)
    V.check_choice("similarity", similarity, SIMILARITIES)
    if negatives is not None and not isinstance(negatives, torch.Tensor) and hasattr(negatives, "as_negatives"):
        negatives = negatives.as_negatives()
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
    paired = negatives is not None and isinstance(negatives, torch.Tensor) and negatives.dim() == 3
    if negatives is not None:
        V.check_tensor("negatives", negatives, ndim=(2, 3))
        V.check_same(("query", "negatives"), (query, negatives))
        V.check_feature_dim(("query", "negatives"), (query, negatives))
    if paired:
        if negatives.shape[0] != n:
            raise ValueError(f"per-query negatives must have shape (N, K, D) with N = {n} queries: query has shape "
                             f"{tuple(query.shape)}, negatives has shape {tuple(negatives.shape)}")
        if positives == "pml":
            raise ValueError("per-query negatives (3-D negatives) support positives='diagonal' and 'supcon', not 'pml'")
    if in_batch_negatives is None:
        in_batch_negatives = negatives is None
    else:
        V.check_bool("in_batch_negatives", in_batch_negatives)
    if symmetric:
        if key is None or negatives is not None or positives == "pml":
            raise ValueError("symmetric=True needs key, no negatives bank, and positives 'diagonal' or 'supcon'")
        if reduction == "none" and m != n:
            raise ValueError(f"symmetric=True with reduction='none' needs N == M, got query {tuple(query.shape)}, key {tuple(key.shape)}")

    if similarity == "cosine":
        query = F.normalize(query, dim=-1)
        key = None if key is None else F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    if paired:
        return _info_nce_paired(query, key, negatives, temperature, labels, key_labels, positives, in_batch_negatives,
                                reduction, backend)
    name = _backend("infonce", backend, query, key, negatives, api="info_nce",
                    shape=(n, m + (0 if negatives is None else negatives.shape[0]), query.shape[1]))
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


def _info_nce_paired(query, key, negatives, temperature, labels, key_labels, positives, in_batch_negatives,
                     reduction, backend):
    """The 3-D ``negatives`` branch of :func:`info_nce` (inputs validated): the per-query negatives op."""
    name = resolve_backend("infonce_paired", backend, query.device)
    if name != "torch" and resolve_backend("infonce", name, query.device) != name:
        name = "torch"
    if name == "torch" or query.dtype == torch.float64:   # float64: the reference is exact and as fast
        return ref.info_nce_paired_ref(query, key, negatives, temperature=temperature, labels=labels,
                                       key_labels=key_labels, positives=positives,
                                       in_batch_negatives=in_batch_negatives, reduction=reduction)
    scale = 1.0 / V.to_scalar_tensor(temperature, query)
    exclude_self = key is None
    k = query if exclude_self else key
    ql = None if positives == "diagonal" else labels
    kl = None if positives == "diagonal" else (labels if exclude_self else key_labels)
    row, stats = infonce_paired_core(name, query, k, negatives, scale, ql, kl, exclude_self, in_batch_negatives)
    return _reduce(row, (stats[:, 1] > 0).sum(), reduction).to(query.dtype)


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


def clip_loss(image: Tensor, text: Tensor, logit_scale: Scalar, logit_bias: Optional[Scalar] = None, *,
              backend: Optional[str] = None) -> Tensor:
    """OpenCLIP ``ClipLoss``: symmetric cross-entropy of ``logit_scale * image @ text.T (+ logit_bias)``.

    ``logit_scale`` is the multiplier (already exponentiated).  image, text: (N, D) -> scalar.  float64 inputs run
    the float64 reference."""
    _check_pair(image, text)
    logit_scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
    if logit_bias is not None:
        logit_bias = V.check_finite_scalar("logit_bias", logit_bias)
    name = _backend("infonce", backend, image, text, api="clip_loss", shape=(image.shape[0], text.shape[0], image.shape[1]))
    if name == "torch":
        return ref.clip_loss_ref(image, text, logit_scale, logit_bias)
    scale = V.to_scalar_tensor(logit_scale, image)
    row, col, _, _ = infonce_core(name, image, text, None, scale, None, None, False, True, False, True)
    loss = 0.5 * (row.mean() + col.mean())
    return _zero_grad_anchor(loss, logit_bias).to(image.dtype)


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Scalar, logit_bias: Scalar, *,
                backend: Optional[str] = None) -> Tensor:
    """OpenCLIP ``SigLipLoss``: ``-(1/N) sum_ij log sigmoid(y_ij (logit_scale x_i.y_j + logit_bias))``."""
    _check_pair(image, text)
    logit_scale = V.check_positive_scalar("logit_scale", logit_scale, like=image)
    logit_bias = V.check_finite_scalar("logit_bias", logit_bias)
    name = _backend("siglip", backend, image, text, api="siglip_loss", shape=(image.shape[0], text.shape[0], image.shape[1]))
    if name == "torch":
        return ref.siglip_loss_ref(image, text, logit_scale, logit_bias)
    row = siglip_core(name, image, text, V.to_scalar_tensor(logit_scale, image), V.to_scalar_tensor(logit_bias, image))
    return (row.sum() / image.shape[0]).to(image.dtype)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: Scalar = 0.5, backend: Optional[str] = None) -> Tensor:
    """SimCLR NT-Xent over two views z1, z2 (N, D): cosine similarity / temperature, positive = other view."""
    V.check_tensor("z1", z1, ndim=2)
    V.check_tensor("z2", z2, ndim=2)
    V.check_same(("z1", "z2"), (z1, z2))
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (N, D): z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}")
    temperature = V.check_positive_scalar("temperature", temperature, like=z1)
    name = _backend("infonce", backend, z1, z2, api="nt_xent", shape=(2 * z1.shape[0], 2 * z1.shape[0], z1.shape[1]))
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
def dispersive_loss(z: Tensor, *, variant: str = "infonce_l2", tau: float = 0.5, margin: float = 1.0,
                    grouped: bool = False, backend: Optional[str] = None) -> Tensor:
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
    name = _backend("dispersive", backend, z, api="dispersive_loss",
                    shape=(z3.shape[0] * z3.shape[1], z3.shape[1], z3[0, 0].numel()))
    if name == "torch":
        out = ref.dispersive_loss_ref(z3, variant=variant, tau=tau, margin=margin, grouped=True)
    else:
        out = dispersive_core(name, z3.reshape(z3.shape[0], z3.shape[1], -1), variant, tau, margin).to(z.dtype)
    return out if grouped else out[0]


def uniformity(x: Tensor, *, t: float = 2.0, backend: Optional[str] = None) -> Tensor:
    """Wang & Isola uniformity ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of x (N, D), N >= 2."""
    V.check_tensor("x", x, min_ndim=2)
    t = V.check_positive_scalar("t", t)
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got x of shape {tuple(x.shape)}")
    name = _backend("uniformity", backend, x, api="uniformity", shape=(x.shape[0], x.shape[0], x[0].numel()))
    if name == "torch":
        return ref.uniformity_ref(x, t=t)
    return uniformity_core(name, x.reshape(x.shape[0], -1), t).to(x.dtype)


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0) -> Tensor:
    """Wang & Isola alignment ``mean_i ||x_i - y_i||^alpha`` (PyTorch; memory-bound and tiny)."""
    V.check_tensor("x", x, min_ndim=2)
    V.check_tensor("y", y, min_ndim=2)
    V.check_same(("x", "y"), (x, y))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape: x {tuple(x.shape)}, y {tuple(y.shape)}")
    alpha = V.check_positive_scalar("alpha", alpha)
    return ref.alignment_ref(x, y, alpha=alpha)


# --------------------------------------------------------------------------- PatchNCE
def patch_nce(query: Union[Tensor, Sequence[Tensor]], key: Union[Tensor, Sequence[Tensor]], *,
              temperature: float = 0.07, all_negatives_from_minibatch: bool = False, detach_key: bool = True,
              reduction: str = "mean", backend: Optional[str] = None) -> Tensor:
    """CUT PatchNCE: query/key (B, P, C), or equal-length lists of them (one per layer) -> mean over layers.

    ``reduction="none"`` returns the (L,) per-layer losses, ``"sum"`` their sum.  Every layer runs in one fused
    launch per direction (:mod:`contrastgen.ops.patchnce`); float64 input runs the reference."""
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
        if i > 0:
            V.check_same(("query[0]", f"query[{i}]"), (qs[0], q))
            if q.shape[0] != qs[0].shape[0]:
                raise ValueError(f"every layer must have the same batch size B: query[0] has shape {tuple(qs[0].shape)}, "
                                 f"query[{i}] has shape {tuple(q.shape)}")
    V.check_choice("reduction", reduction, REDUCTIONS)
    temperature = V.check_positive_scalar("temperature", temperature, like=qs[0])
    name = resolve_backend("patch_nce", backend, qs[0].device, api="patch_nce")
    if name == "torch" or qs[0].dtype == torch.float64:
        kw = dict(temperature=temperature, all_negatives_from_minibatch=all_negatives_from_minibatch,
                  detach_key=detach_key)
        if reduction == "mean":
            return ref.patch_nce_ref(qs, ks, **kw)
        per_layer = torch.stack([ref.patch_nce_ref([q], [k], **kw) for q, k in zip(qs, ks)])
        return per_layer if reduction == "none" else per_layer.sum()
    loss = patch_nce_core(name, qs, ks, temperature, bool(all_negatives_from_minibatch), bool(detach_key), reduction)
    return loss.to(qs[0].dtype)


# --------------------------------------------------------------------------- CONFORM
def _check_token_groups(name, token_groups, maps):
    if isinstance(token_groups, torch.Tensor) or not isinstance(token_groups, (list, tuple)) or not token_groups:
        raise TypeError(f"{name} must be a non-empty list of lists of token indices, e.g. [[2, 3], [6, 7]]")
    hi = maps.shape[-1] - 2
    seen = set()
    for gi, g in enumerate(token_groups):
        if not isinstance(g, (list, tuple)) or not g:
            raise ValueError(f"{name}[{gi}] must be a non-empty list of token indices, got {g!r}")
        for t in g:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{name}[{gi}] holds {t!r}; token indices are ints")
            if not 1 <= t <= hi:
                raise ValueError(f"token index {t} in {name}[{gi}] is out of range [1, {hi}] for maps of shape "
                                 f"{tuple(maps.shape)} (index 0 is the start token, the last channel is dropped)")
            if t in seen:
                raise ValueError(f"token index {t} appears in more than one place in {name}")
            seen.add(t)


def attention_nce(maps: Tensor, token_groups: Sequence, *, prev_maps: Optional[Tensor] = None,
                  temperature: float = 0.5, softmax_normalize: bool = False, smoothing: Optional[str] = "conform",
                  kernel_size: int = 3, sigma: float = 0.5, softmax_normalize_attention_maps: bool = False,
                  loss: str = "ntxent", backend: Optional[str] = None) -> Tensor:
    """CONFORM's contrastive loss over cross-attention maps (H, W, 77) -> scalar or (B, H, W, 77) -> (B,).

    ``token_groups``: [[2, 3], [6, 7]] (shared by every prompt) or, for (B, H, W, 77) maps, one such list per
    prompt.  See :func:`contrastgen.reference.attention_nce_ref` for the options."""
    V.check_bool("softmax_normalize", softmax_normalize)
    V.check_bool("softmax_normalize_attention_maps", softmax_normalize_attention_maps)
    V.check_tensor("maps", maps, ndim=(3, 4))
    if maps.shape[-1] < 3:
        raise ValueError(f"maps must have a token axis (last) with at least 3 entries, got shape {tuple(maps.shape)}")
    if prev_maps is not None:
        V.check_tensor("prev_maps", prev_maps)
        V.check_same(("maps", "prev_maps"), (maps, prev_maps))
        if prev_maps.shape != maps.shape:
            raise ValueError(f"prev_maps must have the shape of maps: {tuple(prev_maps.shape)} vs {tuple(maps.shape)}")
    V.check_choice("smoothing", smoothing, ("conform", "gaussian", None))
    V.check_choice("loss", loss, ("ntxent", "contrastive", "ntxent_contrastive"))
    temperature = V.check_positive_scalar("temperature", temperature)
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a python float for attention_nce (a hyper-parameter, not learned)")
    per_prompt = (isinstance(token_groups, (list, tuple)) and token_groups and isinstance(token_groups[0], (list, tuple))
                  and token_groups[0] and isinstance(token_groups[0][0], (list, tuple)))
    if per_prompt:
        if maps.dim() != 4 or len(token_groups) != maps.shape[0]:
            raise ValueError(f"per-prompt token_groups (a list of {len(token_groups)} group lists) need maps of shape "
                             f"(B, H, W, T) with B = {len(token_groups)}, got maps of shape {tuple(maps.shape)}")
        for b, groups in enumerate(token_groups):
            _check_token_groups(f"token_groups[{b}]", groups, maps)
    else:
        _check_token_groups("token_groups", token_groups, maps)
    if maps.shape[-3] < 2 or maps.shape[-2] < 2:
        raise ValueError(f"maps must be at least 2x2 spatially for the reflect-padded smoothing, got {tuple(maps.shape)}")
    if smoothing is not None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if kernel_size > min(maps.shape[-3], maps.shape[-2]) + 2:
            raise ValueError(f"kernel_size {kernel_size} is larger than the reflect-padded maps "
                             f"({maps.shape[-3] + 2}x{maps.shape[-2] + 2} for maps of shape {tuple(maps.shape)})")
        sigma = V.check_positive_scalar("sigma", sigma)
    name = resolve_backend("attention_nce", backend, maps.device, api="attention_nce")
    if name == "torch" or maps.dtype == torch.float64:
        return ref.attention_nce_ref(maps, token_groups, prev_maps=prev_maps, temperature=temperature,
                                     softmax_normalize=softmax_normalize, smoothing=smoothing,
                                     kernel_size=kernel_size, sigma=sigma,
                                     softmax_normalize_attention_maps=softmax_normalize_attention_maps, loss=loss)
    return attention_nce_core(name, maps, token_groups, prev_maps, float(temperature), softmax_normalize, smoothing,
                              kernel_size, float(sigma), softmax_normalize_attention_maps, loss)
