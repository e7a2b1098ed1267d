"""contrastgen: fused contrastive losses for generative-model research (Triton on GPU, C++ on CPU).

The losses are functions here (``contrastgen.clip_loss`` ...); ``contrastgen.nn`` has them as modules,
``contrastgen.methods`` the research methods built on them, ``contrastgen.distributed`` the multi-process
versions, ``contrastgen.bench`` the benchmark harness (submodules load on first attribute access).
``contrastgen.backend_for(op_name, *tensors)`` says which backend a call would run and why.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .ops import (alignment, attention_nce, clip_loss, dispersive_loss, info_nce, nt_xent, patch_nce, siglip_loss,
                  uniformity)
from .ops._crossover import set_crossover
from .ops._dispatch import BackendChoice, backend_for

if TYPE_CHECKING:  # pragma: no cover
    from . import bench, distributed, methods, nn, reference  # noqa: F401

_LAZY = ("nn", "methods", "distributed", "bench", "reference")

__all__ = ["alignment", "attention_nce", "clip_loss", "dispersive_loss", "info_nce", "nt_xent", "patch_nce",
           "siglip_loss", "uniformity", "backend_for", "BackendChoice", "set_crossover", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'contrastgen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
