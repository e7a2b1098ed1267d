"""Availability probes for the fused backends."""
from __future__ import annotations

import importlib.util
import os

import torch

from ._dispatch import register_availability


def _triton_probe():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter)"


def cpp_extension(name: str):
    """Import ``contrastgen._cpp_<name>`` (a pybind11 module built from ``csrc/<name>.cpp``), or None."""
    try:
        return importlib.import_module(f"contrastgen._cpp_{name}")
    except ImportError:
        return None


def _cpp_probe():
    import contrastgen
    pkg_dir = os.path.dirname(contrastgen.__file__)
    if any(f.startswith("_cpp_") and f.endswith(".so") for f in os.listdir(pkg_dir)):
        return True, ""
    return False, "the C++ extension is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at install time)"


register_availability("triton", _triton_probe)
register_availability("cpp", _cpp_probe)
