"""Custom ops and backend dispatch.  Importing this registers every available fused backend."""
import importlib

from . import _backends  # noqa: F401  (availability probes)
from ._dispatch import BACKENDS, backend_available, implementations, register, resolve_backend
from .api import (alignment, attention_nce, clip_loss, dispersive_loss, info_nce, nt_xent, patch_nce, siglip_loss,
                  uniformity)

# Modules that define custom ops and register fused implementations (each imports cleanly
# without triton or without the compiled extension; it then registers only what can run).
_FUSED_MODULES = ("infonce", "dispersive")
for _name in _FUSED_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # module not written yet in this checkout
        if e.name != f"{__name__}.{_name}":
            raise

__all__ = ["BACKENDS", "backend_available", "implementations", "register", "resolve_backend", "alignment",
           "attention_nce", "clip_loss", "dispersive_loss", "info_nce", "nt_xent", "patch_nce", "siglip_loss",
           "uniformity"]
