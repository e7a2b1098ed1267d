"""contrastgen: fused contrastive losses for generative-model research (Triton on GPU, C++ on CPU)."""
__version__ = "0.1.0"

from .ops import (alignment, attention_nce, clip_loss, dispersive_loss, info_nce, nt_xent, patch_nce, siglip_loss,
                  uniformity)

__all__ = ["alignment", "attention_nce", "clip_loss", "dispersive_loss", "info_nce", "nt_xent", "patch_nce",
           "siglip_loss", "uniformity", "__version__"]
