"""``torch.nn.Module`` wrappers of the losses (hyper-parameters held as state).

* :class:`ClipLoss` and :class:`SigLipLoss` are drop-ins for OpenCLIP's (same constructor and ``forward``
  signatures, same numbers): replacing the import is the whole migration.  The scale (and bias) come in as
  arguments, already exponentiated, as in OpenCLIP; :class:`LogitScale` is a small module owning a learnable
  scale and bias for those who want one.
* Every loss module returns a float32 loss under autocast (features are upcast and the loss runs with autocast
  off, on every backend); outside autocast the loss has the features' dtype.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops


def _autocast_on(*tensors) -> Optional[str]:
    """The device type whose autocast is enabled for these tensors, else None."""
    for t in tensors:
        if isinstance(t, Tensor):
            dev = t.device.type
            try:
                on = torch.is_autocast_enabled(dev)
            except TypeError:                       # torch < 2.4: no device_type argument
                on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
            return dev if on else None
    return None


def _f32(x):
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_f32(v) for v in x)
    return x


def _in_float32(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; under autocast with float32 tensor arguments and autocast off, so that the loss
    is float32 on every backend (the fused kernels are not autocast ops; the reference's matmuls would run in
    bf16/fp16 and its reductions in fp32)."""
    flat = [a for a in args if isinstance(a, Tensor)] + [t for a in args if isinstance(a, (list, tuple))
                                                          for t in a if isinstance(t, Tensor)]
    dev = _autocast_on(*flat)
    if dev is None:
        return fn(*args, **kwargs)
    with torch.autocast(dev, enabled=False):
        return fn(*_f32(list(args)), **{k: _f32(v) for k, v in kwargs.items()})


def _repr(**kw) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


class InfoNCELoss(nn.Module):
    """:func:`contrastgen.info_nce` as a module, with pytorch-metric-learning's defaults: cosine similarity (query,
    key and negatives are L2-normalised inside) and temperature 0.07.

    ``forward(query, key=None, labels=None, key_labels=None, negatives=None)``.  ``positives=None`` picks the
    diagonal when no labels are given and PML's multi-positive convention (``"pml"``) when they are; pass
    ``"diagonal"``, ``"supcon"`` or ``"pml"`` to fix it.  ``negatives``: a shared (K, D) bank, (N, K, D) per-query
    negatives, or a :class:`contrastgen.nn.MoCoQueue`.  ``similarity="dot"`` uses the features as given.
    """

    def __init__(self, temperature=0.07, similarity="cosine", positives=None, symmetric=False,
                 in_batch_negatives=None, reduction="mean", backend=None):
        super().__init__()
        self.temperature, self.similarity, self.positives, self.symmetric = temperature, similarity, positives, symmetric
        self.in_batch_negatives, self.reduction, self.backend = in_batch_negatives, reduction, backend

    def forward(self, query, key=None, labels=None, key_labels=None, negatives=None):
        positives = self.positives or ("diagonal" if labels is None else "pml")
        return ops.info_nce(query, key, temperature=self.temperature, labels=labels, key_labels=key_labels,
                            positives=positives, negatives=negatives, in_batch_negatives=self.in_batch_negatives,
                            symmetric=self.symmetric, reduction=self.reduction, similarity=self.similarity,
                            backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, similarity={self.similarity!r}, positives={self.positives!r}"


class ClipLoss(nn.Module):
    """OpenCLIP's ``ClipLoss`` on contrastgen's kernels (symmetric InfoNCE of ``logit_scale * image @ text.T``).

    Same constructor and ``forward`` as ``open_clip.loss.ClipLoss``, so swapping the import is the migration::

        loss = contrastgen.nn.ClipLoss()                 # was: open_clip.loss.ClipLoss()
        losses = loss(image_features, text_features, logit_scale, output_dict=True)   # {"contrastive_loss": ...}

    ``logit_scale`` is the multiplier, already exponentiated (OpenCLIP's ``model.logit_scale.exp()``); a
    ``logit_bias`` is accepted (it cancels in the cross-entropy, as in OpenCLIP).  Features are used as given
    (OpenCLIP normalises them in the model).  ``cache_labels`` is accepted for compatibility and has no effect
    (the fused kernels never build a label tensor).  With ``world_size > 1`` the loss runs across processes
    through :func:`contrastgen.distributed.clip_loss` (``local_loss`` and ``gather_with_grad`` as in OpenCLIP;
    ``rank`` / ``world_size`` must match the initialised process group).  ``backend`` as in
    :func:`contrastgen.clip_loss`.  Returns a float32 loss under autocast.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, *, backend: Optional[str] = None):
        super().__init__()
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def extra_repr(self) -> str:
        return _repr(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=self.rank,
                     world_size=self.world_size, backend=self.backend)

    def _loss(self, image, text, scale, bias):
        if self.world_size > 1:
            from .. import distributed
            _check_world(self.rank, self.world_size)
            return distributed.clip_loss(image, text, scale, bias, mode="all_gather", local_loss=self.local_loss,
                                         gather_with_grad=self.gather_with_grad, group=None, backend=self.backend)
        return ops.clip_loss(image, text, scale, bias, backend=self.backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Optional[Union[Tensor, float]] = None,
                output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        loss = _in_float32(self._loss, image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """OpenCLIP's ``SigLipLoss`` on contrastgen's kernels: ``-(1/N) sum_ij log sigmoid(y_ij (s x_i.t_j + b))``.

    Same constructor and ``forward`` as ``open_clip.loss.SigLipLoss``; ``logit_scale`` (exponentiated) and
    ``logit_bias`` are arguments (:class:`LogitScale` ``.siglip()`` owns a learnable pair, init 10 and -10).
    With ``world_size > 1`` the loss runs across processes through :func:`contrastgen.distributed.siglip_loss`
    with ``dist_impl`` (``"bidir"`` by default, as in OpenCLIP; also ``"shift"``, ``"reduce"``, ``"gather"``).
    ``cache_labels`` has no effect.  Returns a float32 loss under autocast.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: Optional[str] = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self.DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def extra_repr(self) -> str:
        return _repr(rank=self.rank, world_size=self.world_size, dist_impl=self.dist_impl, backend=self.backend)

    def _loss(self, image, text, scale, bias):
        if self.world_size > 1:
            from .. import distributed
            _check_world(self.rank, self.world_size)
            return distributed.siglip_loss(image, text, scale, bias, dist_impl=self.dist_impl, group=None,
                                           backend=self.backend)
        return ops.siglip_loss(image, text, scale, bias, backend=self.backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Union[Tensor, float], output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        loss = _in_float32(self._loss, image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


def _check_world(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"rank={rank}, world_size={world_size} do not match the process group "
                         f"(rank {dist.get_rank()} of {dist.get_world_size()})")


class LogitScale(nn.Module):
    """A learnable logit scale (and optionally bias), CLIP-style: ``scale = exp(log_scale)``.

    ``LogitScale()`` (or ``.clip()``): ``log_scale`` initialised to ln(1/0.07); ``LogitScale.siglip()``: scale 10,
    bias -10 (SigLIP's init).  ``forward()`` returns the scale, or ``(scale, bias)`` when a bias is learned;
    pass them to :class:`ClipLoss` / :class:`SigLipLoss`.  ``log_scale`` is kept in ``[ln min_scale, ln max_scale]``
    = [0, ln 100] by default, as OpenCLIP does after each optimizer step: ``forward()`` clamps the parameter in
    place (no gradient) before using it, or, with ``clamp_in_forward=False``, call :meth:`clamp_` yourself.
    """

    def __init__(self, init_scale: float = 1 / 0.07, init_bias: Optional[float] = None, *, max_scale: float = 100.0,
                 min_scale: float = 1.0, learn_scale: bool = True, clamp_in_forward: bool = True):
        super().__init__()
        if not (0 < min_scale <= init_scale <= max_scale):
            raise ValueError(f"need 0 < min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, "
                             f"{max_scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.bias = None if init_bias is None else nn.Parameter(torch.tensor(float(init_bias)))
        self.min_log_scale, self.max_log_scale = math.log(min_scale), math.log(max_scale)
        self.clamp_in_forward = clamp_in_forward

    @classmethod
    def clip(cls, **kw) -> "LogitScale":
        return cls(1 / 0.07, **kw)

    @classmethod
    def siglip(cls, **kw) -> "LogitScale":
        return cls(10.0, -10.0, **kw)

    def extra_repr(self) -> str:
        return _repr(scale=round(math.exp(float(self.log_scale.detach())), 4),
                     bias=None if self.bias is None else round(float(self.bias.detach()), 4),
                     min_scale=round(math.exp(self.min_log_scale), 4), max_scale=round(math.exp(self.max_log_scale), 4))

    @torch.no_grad()
    def clamp_(self) -> "LogitScale":
        self.log_scale.clamp_(self.min_log_scale, self.max_log_scale)
        return self

    def forward(self) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if self.clamp_in_forward:
            self.clamp_()
        scale = self.log_scale.exp()
        return scale if self.bias is None else (scale, self.bias)


class NTXentLoss(nn.Module):
    """pytorch-metric-learning's ``NTXentLoss`` on the fused op: ``forward(embeddings, labels, ref_emb=None,
    ref_labels=None)``, cosine similarity, temperature 0.07; for each positive pair (a, p)
    ``l_ap = -log(e^{s_ap} / (e^{s_ap} + sum_{n: y_n != y_a} e^{s_an}))``, mean over positive pairs, 0 without any.
    Without ``ref_emb`` the embeddings are compared with each other (self-pairs excluded); with it, with ``ref_emb``.

    SimCLR's two-view loss is the special case ``NTXentLoss(0.5)(torch.cat([z1, z2]), torch.arange(n).repeat(2))``
    (= :func:`contrastgen.nt_xent`).  Not supported: PML's ``indices_tuple`` / miners, distances other than
    cosine / dot (``similarity="dot"``), reducers other than the mean over positive pairs.
    """

    def __init__(self, temperature=0.07, similarity="cosine", backend=None):
        super().__init__()
        self.temperature, self.similarity, self.backend = temperature, similarity, backend

    def forward(self, embeddings, labels=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("NTXentLoss needs labels (N,) for the embeddings (SimCLR: torch.arange(n).repeat(2) for "
                             "two views concatenated)")
        if ref_emb is not None and ref_labels is None:
            raise ValueError(f"ref_emb of shape {tuple(ref_emb.shape)} needs ref_labels")
        if ref_emb is None and ref_labels is not None:
            raise ValueError("ref_labels is given without ref_emb")
        return ops.info_nce(embeddings, ref_emb, temperature=self.temperature, labels=labels, key_labels=ref_labels,
                            positives="pml", similarity=self.similarity, backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, similarity={self.similarity!r}"


class DispersiveLoss(nn.Module):
    """:func:`contrastgen.dispersive_loss` as a module: ``forward(z)`` with z (B, ...) -> scalar, or with
    ``grouped=True`` z (G, B, ...) -> (G,).  Variants ``infonce_l2`` (default), ``infonce_cosine``, ``hinge``,
    ``covariance``; ``tau`` the temperature, ``margin`` the hinge margin.  Float32 under autocast.  For the
    hook-based regularizer of a diffusion transformer see :class:`contrastgen.methods.dispersive.DispersiveRegularizer`.
    """

    def __init__(self, variant: str = "infonce_l2", tau: float = 0.5, margin: float = 1.0, grouped: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        self.variant, self.tau, self.margin, self.grouped, self.backend = variant, tau, margin, grouped, backend

    def extra_repr(self) -> str:
        return _repr(variant=self.variant, tau=self.tau, margin=self.margin, grouped=self.grouped,
                     backend=self.backend)

    def forward(self, z: Tensor) -> Tensor:
        return _in_float32(ops.dispersive_loss, z, variant=self.variant, tau=self.tau, margin=self.margin,
                           grouped=self.grouped, backend=self.backend)


class UniformityLoss(nn.Module):
    """Wang & Isola's uniformity ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (:func:`contrastgen.uniformity`).
    Expects unit-norm rows (the paper's setting; it is not normalised here).  Float32 under autocast."""

    def __init__(self, t: float = 2.0, backend: Optional[str] = None):
        super().__init__()
        self.t, self.backend = t, backend

    def extra_repr(self) -> str:
        return _repr(t=self.t, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        return _in_float32(ops.uniformity, x, t=self.t, backend=self.backend)


class PatchNCELoss(nn.Module):
    """CUT's PatchNCE (:func:`contrastgen.patch_nce`): ``forward(query, key)`` with (B, P, C) tensors or lists of
    them (one per layer) -> the mean over layers.  Expects unit-norm patch features (CUT normalises them in
    its projection head).  Float32 under autocast."""

    def __init__(self, temperature: float = 0.07, all_negatives_from_minibatch: bool = False, detach_key: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.all_negatives_from_minibatch = temperature, all_negatives_from_minibatch
        self.detach_key, self.backend = detach_key, backend

    def extra_repr(self) -> str:
        return _repr(temperature=self.temperature, all_negatives_from_minibatch=self.all_negatives_from_minibatch,
                     detach_key=self.detach_key, backend=self.backend)

    def forward(self, query: Union[Tensor, Sequence[Tensor]], key: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        return _in_float32(ops.patch_nce, query, key, temperature=self.temperature,
                           all_negatives_from_minibatch=self.all_negatives_from_minibatch,
                           detach_key=self.detach_key, backend=self.backend)


class AttentionNCELoss(nn.Module):
    """CONFORM's contrastive loss over cross-attention maps (:func:`contrastgen.attention_nce`):
    ``forward(maps, prev_maps=None)`` with maps (H, W, 77) or (B, H, W, 77); ``token_groups`` lists the token
    indices that should attend together.  Float32 under autocast."""

    def __init__(self, token_groups: Sequence[Sequence[int]], temperature: float = 0.5, softmax_normalize: bool = False,
                 smoothing: Optional[str] = "conform", loss: str = "ntxent", backend: Optional[str] = None):
        super().__init__()
        self.token_groups, self.temperature, self.softmax_normalize = token_groups, temperature, softmax_normalize
        self.smoothing, self.loss, self.backend = smoothing, loss, backend

    def extra_repr(self) -> str:
        return _repr(token_groups=self.token_groups, temperature=self.temperature,
                     softmax_normalize=self.softmax_normalize, smoothing=self.smoothing, loss=self.loss,
                     backend=self.backend)

    def forward(self, maps: Tensor, prev_maps: Optional[Tensor] = None) -> Tensor:
        return _in_float32(ops.attention_nce, maps, self.token_groups, prev_maps=prev_maps,
                           temperature=self.temperature, softmax_normalize=self.softmax_normalize,
                           smoothing=self.smoothing, loss=self.loss, backend=self.backend)
