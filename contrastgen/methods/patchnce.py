"""PatchNCE for CUT (Park et al., ECCV 2020; taesungp/contrastive-unpaired-translation): the patch sampler with its
per-layer MLP heads, and the loss module that runs every layer through one fused ``contrastgen.patch_nce`` call.

    sampler = PatchSampler(num_patches=256, use_mlp=True, nc=256)
    nce = PatchNCELoss(layers=(0, 4, 8, 12, 16), sampler=sampler)       # CUT's nce_layers of the ResNet generator
    feat_k = generator(real_a, layers=nce.layers, encode_only=True)      # keys: the source image
    feat_q = generator(fake_b, layers=nce.layers, encode_only=True)      # queries: the translated image
    loss = nce(feat_q, feat_k)                                           # weight * mean over layers

Conventions of the official code that this module keeps (METHODS.md section 3):
* the same random patch locations for every image of the batch, drawn for the keys and reused for the queries
  (``sampler(feat_k)`` returns them, ``sampler(feat_q, patch_ids)`` reuses them); a layer with fewer locations than
  ``num_patches`` uses all of them in a random order (``min(num_patches, H W)``), so P may differ per layer;
* one head Linear(C_l, nc)-ReLU-Linear(nc, nc) per layer, created on the first call from the feature shapes (CUT's
  ``create_mlp``; build the optimizer of the sampler after that call) and initialised like CUT's ``init_net``;
* L2 normalisation ``x / (||x|| + 1e-7)`` after the head;
* keys detached; CE over ``[l_pos, l_neg with its diagonal set to -10] / tau``, mean over patches, then layers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.api import patch_nce

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def init_weights(module: nn.Module, init_type: str = "xavier", init_gain: float = 0.02) -> nn.Module:
    """CUT's ``init_weights``: Conv / Linear weights N(0, gain), xavier-normal(gain), kaiming-normal (fan_in) or
    orthogonal(gain), biases 0; BatchNorm2d weights N(1, gain), biases 0."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")

    def init(m):
        name = type(m).__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(m.weight, gain=init_gain)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, 0.0)
        elif "BatchNorm2d" in name:
            nn.init.normal_(m.weight, 1.0, init_gain)
            nn.init.constant_(m.bias, 0.0)
    module.apply(init)
    return module


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """CUT's ``Normalize(2)``: ``x / (||x||_2 + 1e-7)`` (not ``F.normalize``, which clamps the norm instead)."""
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-7)


class PatchSampler(nn.Module):
    """CUT's ``PatchSampleF``: feature maps (B, C_l, H_l, W_l) -> normalised patch features (B, P_l, nc or C_l).

    ``forward(feats, patch_ids=None) -> (features, patch_ids)``; ``patch_ids`` (one LongTensor per layer) are drawn
    with ``torch.randperm`` when not given and returned so that the second pass (the queries) reuses them.
    ``num_patches <= 0`` takes every location in order.  With ``use_mlp`` the heads ``mlp_<l>`` are created on the
    first call (``init_type`` / ``init_gain`` as CUT's ``init_net``) on the features' device and dtype;
    ``heads_created`` tells whether that happened (create the optimizer of this module afterwards).
    """

    def __init__(self, num_patches: int = 256, use_mlp: bool = True, nc: int = 256, init_type: str = "xavier",
                 init_gain: float = 0.02):
        super().__init__()
        if init_type not in INIT_TYPES:
            raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")
        self.num_patches, self.use_mlp, self.nc = int(num_patches), bool(use_mlp), int(nc)
        self.init_type, self.init_gain = init_type, float(init_gain)
        self.heads_created = False
        self.n_layers: Optional[int] = None

    def create_heads(self, feats: Sequence[Tensor]) -> None:
        """One Linear(C_l, nc)-ReLU-Linear(nc, nc) head per layer, from the channel counts of ``feats``."""
        for i, f in enumerate(feats):
            head = nn.Sequential(nn.Linear(f.shape[1], self.nc), nn.ReLU(), nn.Linear(self.nc, self.nc))
            init_weights(head, self.init_type, self.init_gain)
            self.add_module(f"mlp_{i}", head.to(device=f.device, dtype=f.dtype))
        self.heads_created = True
        self.n_layers = len(feats)

    def head(self, i: int) -> nn.Module:
        return getattr(self, f"mlp_{i}")

    def forward(self, feats: Sequence[Tensor], patch_ids: Optional[Sequence[Tensor]] = None
                ) -> Tuple[List[Tensor], List[Tensor]]:
        feats = list(feats)
        if not feats or any(not isinstance(f, Tensor) or f.dim() != 4 for f in feats):
            raise ValueError("feats must be a non-empty list of (B, C, H, W) feature maps, got "
                             f"{[tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__ for f in feats]}")
        if patch_ids is not None and len(patch_ids) != len(feats):
            raise ValueError(f"patch_ids holds {len(patch_ids)} layers but feats holds {len(feats)}")
        if self.use_mlp and not self.heads_created:
            self.create_heads(feats)
        if self.use_mlp and self.n_layers != len(feats):
            raise ValueError(f"the heads were created for {self.n_layers} layers, got {len(feats)} feature maps")
        out, ids = [], []
        for i, f in enumerate(feats):
            b, c, h, w = f.shape
            flat = f.permute(0, 2, 3, 1).flatten(1, 2)                      # (B, H W, C)
            if self.num_patches > 0:
                if patch_ids is not None:
                    pid = patch_ids[i].to(f.device)
                else:
                    pid = torch.randperm(h * w, device=f.device)[:min(self.num_patches, h * w)]
                x = flat[:, pid, :]                                         # (B, P, C), the same ids for every image
            else:
                pid = torch.arange(h * w, device=f.device)
                x = flat
            if self.use_mlp:
                x = self.head(i)(x)
            out.append(l2_normalize(x))
            ids.append(pid)
        return out, ids


class PatchNCELoss(nn.Module):
    """CUT's PatchNCE over generator layers, every layer in one fused call.

    ``forward(feat_q, feat_k)``: the generator's feature maps of the translated image (queries) and of the source
    image (keys), one (B, C_l, H_l, W_l) map per layer of ``layers``; the keys are sampled first and their patch
    ids reused for the queries.  Returns ``weight * mean over layers`` (CUT's ``calculate_NCE_loss`` with
    ``lambda_NCE = weight``); ``per_layer=True`` returns the (L,) weighted per-layer losses.  ``sampler`` defaults to
    ``PatchSampler(num_patches, use_mlp, nc)``.  ``all_negatives_from_minibatch=True`` is SinCUT's setting.
    """

    def __init__(self, layers: Sequence[int] = (0, 4, 8, 12, 16), weight: float = 1.0, temperature: float = 0.07,
                 all_negatives_from_minibatch: bool = False, *, sampler: Optional[PatchSampler] = None,
                 num_patches: int = 256, use_mlp: bool = True, nc: int = 256, detach_key: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.layers = [int(i) for i in layers]
        if not self.layers:
            raise ValueError("layers must name at least one generator layer")
        self.weight, self.temperature = float(weight), float(temperature)
        self.all_negatives_from_minibatch, self.detach_key = bool(all_negatives_from_minibatch), bool(detach_key)
        self.backend = backend
        self.sampler = sampler if sampler is not None else PatchSampler(num_patches, use_mlp, nc)

    def pooled(self, feat_q: Sequence[Tensor], feat_k: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """(queries, keys): the sampled, projected and normalised (B, P_l, nc) features of every layer."""
        if len(feat_q) != len(self.layers) or len(feat_k) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} feature maps (layers {self.layers}), got {len(feat_q)} "
                             f"queries and {len(feat_k)} keys")
        keys, ids = self.sampler(feat_k)
        queries, _ = self.sampler(feat_q, ids)
        return queries, keys

    def forward(self, feat_q: Sequence[Tensor], feat_k: Sequence[Tensor], per_layer: bool = False) -> Tensor:
        queries, keys = self.pooled(feat_q, feat_k)
        loss = patch_nce(queries, keys, temperature=self.temperature,
                         all_negatives_from_minibatch=self.all_negatives_from_minibatch, detach_key=self.detach_key,
                         reduction="none" if per_layer else "mean", backend=self.backend)
        return self.weight * loss
