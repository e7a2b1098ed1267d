"""The backend table: which launcher module runs each fused op on each backend, and whether it can run here.

    op              "triton" launcher                   "cpp" launcher (compiled extension)
    infonce         contrastgen.kernels.infonce         contrastgen.ops._cpp_infonce      (contrastgen._cpp_infonce)
    siglip          contrastgen.kernels.infonce         contrastgen.ops._cpp_infonce      (contrastgen._cpp_infonce)
    dispersive      contrastgen.kernels.dispersive      contrastgen.ops._cpp_dispersive   (contrastgen._cpp_dispersive)
    uniformity      contrastgen.kernels.dispersive      contrastgen.ops._cpp_dispersive   (contrastgen._cpp_dispersive)
    patch_nce       contrastgen.kernels.patchnce        contrastgen.ops._cpp_patchnce     (contrastgen._cpp_patchnce)
    attention_nce   contrastgen.kernels.attention_nce   contrastgen.ops._cpp_attention_nce (contrastgen._cpp_attention_nce)

The "torch" backend of every op is its reference in ``contrastgen.reference``.  The launchers of one op have
the same functions and signatures on every backend (for infonce / siglip: the contract written out in
``contrastgen/reference/core.py``), so the custom ops in ``contrastgen/ops/<op>.py`` call
``launcher(op, backend).<function>(...)`` and never name a backend.  Launcher modules are imported on first
use (Triton is imported only when a Triton kernel runs).

To add a fused op: write its launchers, add a row here (and its compiled extension to ``CPP_EXTENSION``),
and add the public name(s) to ``PUBLIC_OPS``.
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Callable, Dict

import torch


def _triton_infonce() -> ModuleType:
    from ..kernels import infonce
    return infonce


def _cpp_infonce() -> ModuleType:
    from . import _cpp_infonce
    return _cpp_infonce


def _triton_dispersive() -> ModuleType:
    from ..kernels import dispersive
    return dispersive


def _cpp_dispersive() -> ModuleType:
    from . import _cpp_dispersive
    return _cpp_dispersive


def _triton_attention_nce() -> ModuleType:
    from ..kernels import attention_nce
    return attention_nce


def _cpp_attention_nce() -> ModuleType:
    from . import _cpp_attention_nce
    return _cpp_attention_nce


def _triton_patchnce() -> ModuleType:
    from ..kernels import patchnce
    return patchnce


def _cpp_patchnce() -> ModuleType:
    from . import _cpp_patchnce
    return _cpp_patchnce


# op -> backend -> zero-argument function returning the launcher module
BACKEND_TABLE: Dict[str, Dict[str, Callable[[], ModuleType]]] = {
    "infonce": {"triton": _triton_infonce, "cpp": _cpp_infonce},
    "siglip": {"triton": _triton_infonce, "cpp": _cpp_infonce},
    "dispersive": {"triton": _triton_dispersive, "cpp": _cpp_dispersive},
    "uniformity": {"triton": _triton_dispersive, "cpp": _cpp_dispersive},
    "patch_nce": {"triton": _triton_patchnce, "cpp": _cpp_patchnce},
    "attention_nce": {"triton": _triton_attention_nce, "cpp": _cpp_attention_nce},
}

# op -> the compiled extension its "cpp" launcher needs (``contrastgen._cpp_<name>``, built from csrc/<name>.cpp)
CPP_EXTENSION: Dict[str, str] = {"infonce": "infonce", "siglip": "infonce", "dispersive": "dispersive",
                                 "uniformity": "dispersive", "attention_nce": "attention_nce",
                                 "patch_nce": "patchnce"}

# public function -> the op of the table that runs it (None: reference only, documented as such)
PUBLIC_OPS: Dict[str, str | None] = {
    "info_nce": "infonce", "clip_loss": "infonce", "nt_xent": "infonce", "siglip_loss": "siglip",
    "dispersive_loss": "dispersive", "uniformity": "uniformity", "patch_nce": "patch_nce",
    "attention_nce": "attention_nce", "alignment": None,
}


def launcher(op: str, backend: str) -> ModuleType:
    """The launcher module of ``op`` on ``backend`` ("triton" or "cpp")."""
    try:
        load = BACKEND_TABLE[op][backend]
    except KeyError:
        raise ValueError(f"op {op!r} has no {backend!r} launcher (table: {sorted(BACKEND_TABLE.get(op, {}))})") from None
    return load()


# ----------------------------------------------------------------------------------------------- availability
def cpp_extension(name: str):
    """Import ``contrastgen._cpp_<name>`` (a pybind11 module built from ``csrc/<name>.cpp``), or None."""
    try:
        return importlib.import_module(f"contrastgen._cpp_{name}")
    except ImportError:
        return None


def _triton_probe(op: str) -> tuple:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


_CPP_BUILT: Dict[str, bool] = {}


def _cpp_probe(op: str) -> tuple:
    # Cached per extension and filled eagerly at import (below): torch.compile(fullgraph=True) cannot trace an import.
    name = CPP_EXTENSION[op]
    if name not in _CPP_BUILT:
        _CPP_BUILT[name] = cpp_extension(name) is not None
    if _CPP_BUILT[name]:
        return True, ""
    return False, (f"the C++ extension contrastgen._cpp_{name} is not built "
                   "(CONTRASTGEN_SKIP_CPP=1 or no compiler at install time)")


# backend -> probe(op) -> (available, why not); consulted only for ops that have a launcher on that backend
PROBES: Dict[str, Callable[[str], tuple]] = {"triton": _triton_probe, "cpp": _cpp_probe}


def device_supported(backend: str, device: torch.device) -> tuple:
    """(ok, why not) for running ``backend``'s kernels on tensors of ``device``."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if backend == "cpp" and device.type != "cpu":
        return False, f"the C++ backend runs on CPU tensors, got device {device}"
    return True, ""


for _op in CPP_EXTENSION:
    _cpp_probe(_op)
