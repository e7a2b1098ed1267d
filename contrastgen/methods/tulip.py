"""TULIP (Tang et al. 2025, "TULIP: Towards Unified Language-Image Pretraining") objective on the fused ops.

TULIP keeps SigLIP's image-text loss and adds contrastive terms between views of the same modality -- an image
and its augmented (or generatively augmented) view, a caption and its paraphrase -- plus optional reconstruction
regularisers (an image decoder and a text decoder on the embeddings):

    L = w_it  SigLIP(image, text)
      + w_ii  C(image, image_view)          C = SigLIP (default) or symmetric InfoNCE, diagonal positives
      + w_tt  C(text,  text_view)
      + w_ir  MSE(image_recon, image_target)
      + w_tr  CE(text_logits, text_targets)          (ignore_index -100)

Each contrastive term is one fused call (:func:`contrastgen.siglip_loss` or :func:`contrastgen.info_nce` with
``symmetric=True``) with its own learnable logit scale (and bias, SigLIP), initialised at scale 10 and bias
``init_bias``; terms whose inputs are not given are skipped.  The weights are configuration: no verified defaults
are published, so every weight defaults to 1.0 (METHODS.md).  ``init_bias=-10`` is SigLIP's initialisation
(TULIP's configs use -15).  Embeddings are L2-normalised inside unless ``normalize=False``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

TERMS = ("image_text", "image_image", "text_text", "image_recon", "text_recon")
CONTRASTIVE = ("image_text", "image_image", "text_text")


class TulipLoss(nn.Module):
    """``forward(image, text, image_view=None, text_view=None, image_recon=None, image_target=None,
    text_logits=None, text_targets=None) -> (loss, terms)``; ``terms`` maps each computed term to its
    (unweighted) value.  ``weights``: dict overriding the default 1.0 of any term in ``TERMS``.
    ``view_loss``: ``"siglip"`` or ``"infonce"`` for the image-image and text-text terms."""

    def __init__(self, weights: Optional[Dict[str, float]] = None, view_loss: str = "siglip", init_scale: float = 10.0,
                 init_bias: float = -10.0, max_scale: float = 100.0, normalize: bool = True, backend=None):
        super().__init__()
        w = {t: 1.0 for t in TERMS}
        for k, v in (weights or {}).items():
            if k not in w:
                raise ValueError(f"unknown TULIP term {k!r}; expected one of {TERMS}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"weight of {k!r} must be a finite float >= 0, got {v!r}")
            w[k] = float(v)
        if view_loss not in ("siglip", "infonce"):
            raise ValueError(f"view_loss must be 'siglip' or 'infonce', got {view_loss!r}")
        self.weights, self.view_loss, self.normalize, self.backend = w, view_loss, normalize, backend
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nn.ParameterDict({t: nn.Parameter(torch.tensor(math.log(init_scale))) for t in CONTRASTIVE})
        self.bias = nn.ParameterDict({t: nn.Parameter(torch.tensor(float(init_bias))) for t in CONTRASTIVE})

    def extra_repr(self):
        return f"weights={self.weights}, view_loss={self.view_loss!r}"

    @torch.no_grad()
    def clamp_(self):
        """Keep every logit scale <= max_scale (call after the optimizer step, as CLIP does)."""
        for p in self.log_scale.values():
            p.clamp_(max=self.max_log_scale)

    def _pair(self, name, a, b):
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        scale = self.log_scale[name].exp()
        if name == "image_text" or self.view_loss == "siglip":
            return ops.siglip_loss(a, b, scale, self.bias[name], backend=self.backend)
        return ops.info_nce(a, b, temperature=1.0 / scale, symmetric=True, backend=self.backend)

    def forward(self, image, text, image_view=None, text_view=None, image_recon=None, image_target=None,
                text_logits=None, text_targets=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        terms: Dict[str, torch.Tensor] = {}
        if self.weights["image_text"] > 0:
            terms["image_text"] = self._pair("image_text", image, text)
        if image_view is not None and self.weights["image_image"] > 0:
            terms["image_image"] = self._pair("image_image", image, image_view)
        if text_view is not None and self.weights["text_text"] > 0:
            terms["text_text"] = self._pair("text_text", text, text_view)
        if (image_recon is None) != (image_target is None):
            raise ValueError("image_recon and image_target go together")
        if image_recon is not None and self.weights["image_recon"] > 0:
            if image_recon.shape != image_target.shape:
                raise ValueError(f"image_recon {tuple(image_recon.shape)} and image_target {tuple(image_target.shape)} "
                                 "must have the same shape")
            terms["image_recon"] = F.mse_loss(image_recon, image_target)
        if (text_logits is None) != (text_targets is None):
            raise ValueError("text_logits and text_targets go together")
        if text_logits is not None and self.weights["text_recon"] > 0:
            if text_logits.shape[:-1] != text_targets.shape:
                raise ValueError(f"text_logits (..., V) {tuple(text_logits.shape)} must match text_targets "
                                 f"{tuple(text_targets.shape)} on the leading dimensions")
            terms["text_recon"] = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text_targets.reshape(-1),
                                                  ignore_index=-100)
        if not terms:
            raise ValueError("no TULIP term to compute (all weights 0 or inputs missing)")
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, terms
