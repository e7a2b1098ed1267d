"""Pure-PyTorch references: the specification every fused kernel is tested against."""
from .attention import attention_nce_ref, smoothing_kernel
from .core import infonce_core_bwd_ref, infonce_core_fwd_ref, siglip_core_bwd_ref, siglip_core_fwd_ref
from .dispersive import alignment_ref, dispersive_loss_ref, uniformity_ref
from .infonce import clip_loss_ref, info_nce_ref, nt_xent_ref, siglip_loss_ref
from .infonce_paired import info_nce_paired_ref, paired_lse_bwd_ref, paired_lse_fwd_ref
from .patchnce import patch_nce_ref

__all__ = [
    "attention_nce_ref", "smoothing_kernel", "infonce_core_fwd_ref", "infonce_core_bwd_ref", "siglip_core_fwd_ref",
    "siglip_core_bwd_ref", "alignment_ref", "dispersive_loss_ref", "uniformity_ref", "clip_loss_ref", "info_nce_ref",
    "nt_xent_ref", "siglip_loss_ref", "patch_nce_ref",
    "info_nce_paired_ref", "paired_lse_fwd_ref", "paired_lse_bwd_ref",
]
