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


_CPP_PROBE_RESULT = None


def _cpp_probe():
    # Cached: torch.compile(fullgraph=True) cannot trace os.listdir, so the directory is listed once
    # (eagerly, at import) and later calls only read the cached tuple.
    global _CPP_PROBE_RESULT
    if _CPP_PROBE_RESULT is not None:
        return _CPP_PROBE_RESULT
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the contrastgen package
    if any(f.startswith("_cpp_") and f.endswith(".so") for f in os.listdir(pkg_dir)):
        _CPP_PROBE_RESULT = (True, "")
    else:
        _CPP_PROBE_RESULT = (False, "the C++ extension is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at install time)")
    return _CPP_PROBE_RESULT


register_availability("triton", _triton_probe)
register_availability("cpp", _cpp_probe)
_cpp_probe()
