"""The backend table: which launcher module runs each fused op on each backend, and whether it can run here.

    op              "triton" launcher                   "cpp" launcher (compiled extension)
    infonce         contrastgen.kernels.infonce         contrastgen.ops._cpp_infonce      (contrastgen._cpp_infonce)
    siglip          contrastgen.kernels.infonce         contrastgen.ops._cpp_infonce      (contrastgen._cpp_infonce)
    dispersive      contrastgen.kernels.dispersive      contrastgen.ops._cpp_dispersive   (contrastgen._cpp_dispersive)
    uniformity      contrastgen.kernels.dispersive      contrastgen.ops._cpp_dispersive   (contrastgen._cpp_dispersive)
    infonce_paired  contrastgen.kernels.infonce_paired  contrastgen.ops._cpp_infonce_paired (contrastgen._cpp_infonce_paired)
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

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Tuple

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


def _triton_infonce_paired() -> ModuleType:
    from ..kernels import infonce_paired
    return infonce_paired


def _cpp_infonce_paired() -> ModuleType:
    from . import _cpp_infonce_paired
    return _cpp_infonce_paired


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
    # per-query negatives (info_nce with 3-D negatives); its in-batch part also runs the "infonce" launchers
    "infonce_paired": {"triton": _triton_infonce_paired, "cpp": _cpp_infonce_paired},
    "patch_nce": {"triton": _triton_patchnce, "cpp": _cpp_patchnce},
    "attention_nce": {"triton": _triton_attention_nce, "cpp": _cpp_attention_nce},
}

# op -> the compiled extension its "cpp" launcher needs (``contrastgen._cpp_<name>``, built from csrc/<name>.cpp)
CPP_EXTENSION: Dict[str, str] = {"infonce": "infonce", "siglip": "infonce", "dispersive": "dispersive",
                                 "uniformity": "dispersive", "infonce_paired": "infonce_paired",
                                 "attention_nce": "attention_nce", "patch_nce": "patchnce"}

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
# The C++ extensions are built in variants (setup.py): contrastgen/_cpp_<name>_<variant>.<suffix>, each defining the
# module ``contrastgen._cpp_<name>``.  The first variant in this order that the CPU can run is loaded.
CPU_VARIANTS = ("native", "avx512", "avx2", "generic")
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma")
_AVX2 = ("avx2", "fma")
_PKG_DIR = Path(__file__).resolve().parents[1]
_LOADED: Dict[str, dict] = {}      # name -> {"variant", "file"}
_WHY_NOT: Dict[str, str] = {}      # name -> why no variant loaded


def cpu_features() -> frozenset:
    """The CPU's ISA flags (Linux: /proc/cpuinfo, i.e. what the kernel enabled); elsewhere from torch's own CPUID
    check (``torch.backends.cpu.get_cpu_capability()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        return frozenset()
    return frozenset({"AVX512": _AVX512, "AVX2": _AVX2}.get(cap, ()))


def cpu_variant_ok(variant: str) -> Tuple[bool, str]:
    """(can this CPU run ``variant``, why not)."""
    flags = cpu_features()
    need = {"avx512": _AVX512, "avx2": _AVX2}.get(variant, ())
    missing = [f for f in need if f not in flags]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    return True, ""


def build_info() -> dict:
    """What the install built (``contrastgen/_build_info.json``, written by setup.py), or {} (none recorded)."""
    try:
        with open(_PKG_DIR / "_build_info.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _variant_files(name: str) -> Dict[str, Path]:
    out = {}
    for v in CPU_VARIANTS:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            p = _PKG_DIR / f"_cpp_{name}_{v}{suffix}"
            if p.exists():
                out[v] = p
                break
    return out


def _not_built_reason(name: str, files: Dict[str, Path], tried: List[str]) -> str:
    info = build_info()
    mod = f"contrastgen._cpp_{name}"
    if tried:
        return f"the C++ extension {mod} could not be loaded: " + "; ".join(tried)
    if info.get("skipped"):
        return f"the C++ extension {mod} was not built: {info['skipped']}"
    failed = {k: v for k, v in info.get("extensions", {}).items() if k.startswith(f"_cpp_{name}_")
              and v.get("status") == "failed"}
    if failed:
        k, v = next(iter(failed.items()))
        log = _PKG_DIR / v["log"] if v.get("log") else None
        return (f"the C++ extension {mod} failed to compile at install time ({k}: {v.get('error', '?')}"
                + (f"; compiler output in {log}" if log else "") + ")")
    if info.get("error"):
        return f"the C++ extensions were not built at install time: {info['error']}"
    if files:
        return (f"the C++ extension {mod} is built only for {', '.join(sorted(files))}, which this CPU cannot run "
                f"({'; '.join(v + ': ' + cpu_variant_ok(v)[1] for v in sorted(files))}); reinstall with "
                "CONTRASTGEN_NATIVE=1 for a build for this machine")
    return (f"the C++ extension {mod} is not built (no compiled file in {_PKG_DIR}; in a source checkout run "
            "`python setup.py build_ext --inplace`, or install with `pip install .`)")


def cpp_extension(name: str):
    """Import ``contrastgen._cpp_<name>`` (pybind11, built from ``csrc/<name>.cpp``): the best variant this CPU runs
    (``CONTRASTGEN_CPU_VARIANT=avx2`` etc. forces one), or None with the reason in :func:`cpp_build_info`."""
    full = f"contrastgen._cpp_{name}"
    if full in sys.modules and name in _LOADED:
        return sys.modules[full]
    files = _variant_files(name)
    forced = os.environ.get("CONTRASTGEN_CPU_VARIANT", "").strip().lower()
    order = [forced] if forced else list(CPU_VARIANTS)
    tried = []
    for v in order:
        path = files.get(v)
        if path is None:
            if forced:
                tried.append(f"CONTRASTGEN_CPU_VARIANT={forced}: no such build (built: {', '.join(files) or 'none'})")
            continue
        ok, why = cpu_variant_ok(v)
        if not ok:
            continue
        try:
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as e:
            tried.append(f"{path.name}: {e}")
            continue
        sys.modules[full] = module
        _LOADED[name] = {"variant": v, "file": str(path)}
        _WHY_NOT.pop(name, None)
        return module
    _WHY_NOT[name] = _not_built_reason(name, files, tried)
    return None


def cpp_build_info() -> dict:
    """For ``contrastgen env`` and the benchmark metadata: the install's build record, the variant loaded per
    extension (or why none), and the CPU's relevant features."""
    for name in sorted(set(CPP_EXTENSION.values())):
        if name not in _LOADED and name not in _WHY_NOT:
            cpp_extension(name)
    info = build_info()
    return {"build": {k: info.get(k) for k in ("skipped", "native", "variants", "git_commit", "platform")},
            "compiled": {k: v.get("status") for k, v in info.get("extensions", {}).items()},
            "loaded": {k: v["variant"] for k, v in _LOADED.items()}, "why_not": dict(_WHY_NOT),
            "cpu_features": sorted(f for f in cpu_features() if f in set(_AVX512))}


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
    return False, _WHY_NOT.get(name) or f"the C++ extension contrastgen._cpp_{name} is not available"


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
