"""Custom ops and backend dispatch.

Importing this registers the custom ops (``contrastgen::infonce_fwd`` ... in ``infonce.py`` and
``dispersive.py``); which launcher runs each op on each backend is the table in ``_backends.py``."""
from . import attention_nce, dispersive, infonce, infonce_paired, patchnce  # noqa: F401  (registers the custom ops)
from ._backends import BACKEND_TABLE, PUBLIC_OPS, launcher
from ._dispatch import BACKENDS, available_backends, backend_available, resolve_backend
from .api import (alignment, attention_nce, clip_loss, dispersive_loss, info_nce, nt_xent, patch_nce, siglip_loss,
                  uniformity)

__all__ = ["BACKENDS", "BACKEND_TABLE", "PUBLIC_OPS", "available_backends", "backend_available", "launcher",
           "resolve_backend", "alignment", "attention_nce", "clip_loss", "dispersive_loss", "info_nce", "nt_xent",
           "patch_nce", "siglip_loss", "uniformity"]
