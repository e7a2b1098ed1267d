"""Shape rule of the *default* backend: below a measured problem size the dense PyTorch reference is faster than
the fused kernel (the kernel's fixed costs -- blocking, packing, OpenMP fork/joins, custom-op overhead -- do not
pay off on small problems), so the default picks it there.  An explicit ``backend=`` (and ``CONTRASTGEN_BACKEND``)
is always honoured; this rule only changes what ``backend=None`` runs.

The data (``crossover.json`` next to this file, measured with ``contrastgen bench --crossover``) holds, per public
op and device type, points ``{"dim": D, "pairs_below": P}``: at feature dimension ``D`` the reference was faster
(forward+backward, float32) while the problem had fewer than ``P`` pairs.  A problem's pairs and dim:

    clip_loss, siglip_loss           N x N pairs,            dim D
    info_nce                         N x (M + K) pairs,       dim D   (K: the negative bank)
    nt_xent                          2N x 2N pairs,           dim D
    dispersive_loss                  G x B x B pairs,         dim M   (M: features per sample)
    uniformity                       N x N pairs,             dim D

Between measured dims the threshold is interpolated linearly in (log D, log P); outside it the nearest
measured point is used.  Memory is bounded: the dense path is taken only while its N x M float32 logits stay
under ``dense_max_bytes`` (default 32 MiB, the size of the C++ kernel's own logit-block buffer), whatever the
data says.

Overrides: ``CONTRASTGEN_CROSSOVER=off`` (never the shape rule: the default is always the fused kernel) or
``CONTRASTGEN_CROSSOVER=/path/to/file.json`` (another measurement, e.g. ``contrastgen bench --crossover``'s output
for your machine); ``CONTRASTGEN_DENSE_MAX_BYTES`` (the byte budget); or :func:`set_crossover` at run time.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

SCHEMA = "contrastgen.crossover/1"
DATA_FILE = Path(__file__).with_name("crossover.json")
DEFAULT_DENSE_MAX_BYTES = 32 * 2**20
ENV_TABLE = "CONTRASTGEN_CROSSOVER"
ENV_BYTES = "CONTRASTGEN_DENSE_MAX_BYTES"

# (table, source) set by set_crossover(), else None; tables read per CONTRASTGEN_CROSSOVER value, cached
_override: Optional[Tuple[dict, str]] = None
_max_bytes_override: Optional[int] = None
_cache: Dict[str, Tuple[dict, str]] = {}


def _read(path: Union[str, Path]) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a crossover file (schema {doc.get('schema')!r}, expected {SCHEMA!r})")
    return doc


def _normalise(doc: dict) -> Dict[Tuple[str, str], List[Tuple[float, float]]]:
    table = {}
    for op, per_device in doc.get("rules", {}).items():
        for device, rule in per_device.items():
            pts = sorted((float(p["dim"]), float(p["pairs_below"])) for p in rule.get("points", []))
            table[(op, device)] = pts
    return table


def _load() -> Tuple[Dict[Tuple[str, str], List[Tuple[float, float]]], str]:
    """(table, where it came from)."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_TABLE, "").strip()
    hit = _cache.get(env)
    if hit is None:
        if env.lower() in ("off", "0", "none", "false"):
            hit = ({}, f"{ENV_TABLE}={env}")
        elif env:
            try:
                hit = (_normalise(_read(env)), f"{ENV_TABLE}={env}")
            except (OSError, ValueError) as e:
                raise ValueError(f"{ENV_TABLE}={env!r}: expected 'off' or the path of a crossover JSON file "
                                 f"({e})") from None
        elif DATA_FILE.exists():
            hit = (_normalise(_read(DATA_FILE)), "contrastgen/ops/" + DATA_FILE.name)
        else:
            hit = ({}, "no crossover data")
        _cache[env] = hit
    return hit


def dense_max_bytes() -> int:
    """The byte budget of the dense path's N x M float32 logits."""
    if _max_bytes_override is not None:
        return _max_bytes_override
    env = os.environ.get(ENV_BYTES, "").strip()
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"{ENV_BYTES}={env!r}: expected a number of bytes") from None
    return DEFAULT_DENSE_MAX_BYTES


def threshold(op: str, device_type: str, dim: int) -> Optional[float]:
    """Pairs below which the dense reference is faster for ``op`` at ``dim`` on ``device_type`` (None: no data)."""
    pts = _load()[0].get((op, device_type))
    if not pts:
        return None
    if len(pts) == 1 or dim <= pts[0][0]:
        return pts[0][1]
    if dim >= pts[-1][0]:
        return pts[-1][1]
    for (d0, p0), (d1, p1) in zip(pts, pts[1:]):
        if d0 <= dim <= d1:
            if p0 <= 0 or p1 <= 0:
                return min(p0, p1)
            w = (math.log(dim) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return pts[-1][1]


def prefer_dense(op: str, device_type: str, pairs: int, dim: int) -> Tuple[bool, str]:
    """(True, why) when the default backend should run the dense reference for this shape, else (False, why)."""
    below = threshold(op, device_type, dim)
    if below is None:
        return False, ""
    logit_bytes = 4 * pairs
    budget = dense_max_bytes()
    if torch.compiler.is_compiling():
        # the sizes may be symbolic (torch.compile, dynamic shapes): decide without formatting them (2026-12-02)
        return bool(pairs < below and logit_bytes <= budget), "shape rule (traced by torch.compile)"
    where = f"{op} on {device_type}, {_load()[1]}"
    if pairs >= below:
        return False, f"{pairs} pairs >= crossover {below:.0f} at dim {dim} ({where})"
    if logit_bytes > budget:
        return False, (f"{pairs} pairs < crossover {below:.0f} at dim {dim}, but the dense logits ({logit_bytes} B) "
                       f"exceed the {budget} B budget ({ENV_BYTES})")
    return True, f"{pairs} pairs < crossover {below:.0f} at dim {dim}: the dense reference is faster ({where})"


def set_crossover(table: Union[None, str, Path, dict] = "default", *, op: Optional[str] = None,
                  device: str = "cpu", pairs_below: Optional[float] = None,
                  dense_max_bytes: Optional[int] = None) -> None:
    """Change the default backend's shape rule at run time.

    * ``set_crossover(None)``: no shape rule (the default is always the fused kernel).
    * ``set_crossover("default")``: back to the packaged data (or ``CONTRASTGEN_CROSSOVER``).
    * ``set_crossover("my_machine.json")`` or a dict in that format: another measurement.
    * ``set_crossover(op="clip_loss", device="cpu", pairs_below=0)``: one rule (0: never dense).
    * ``dense_max_bytes=``: the byte budget of the dense path's N x M logits.
    """
    global _override, _max_bytes_override
    if dense_max_bytes is not None:
        _max_bytes_override = int(dense_max_bytes)
    if op is not None:
        if pairs_below is None:
            raise ValueError("set_crossover(op=...) needs pairs_below=")
        table = dict(_load()[0])
        table[(op, device)] = [(1.0, float(pairs_below))]
        _override = (table, "set_crossover()")
    elif table is None:
        _override = ({}, "set_crossover(None)")
    elif isinstance(table, dict):
        if table.get("schema") != SCHEMA:
            raise ValueError(f"set_crossover: a dict in the crossover file format needs schema={SCHEMA!r}")
        _override = (_normalise(table), "set_crossover(dict)")
    elif table == "default":
        _override = None
        if dense_max_bytes is None:
            _max_bytes_override = None
    else:
        _override = (_normalise(_read(table)), f"set_crossover({str(table)!r})")


def describe() -> List[str]:
    """One line per (op, device) rule, for ``contrastgen bench`` and ``contrastgen env``."""
    table, source = _load()
    lines = [f"crossover data: {source}; dense logits budget {dense_max_bytes() / 2**20:.0f} MiB"]
    for (op, device), pts in sorted(table.items()):
        parts = []
        for d, p in pts:
            n = math.isqrt(int(p)) if p > 0 else 0
            parts.append(f"dim {d:g}: < {p:.0f} pairs (~{n}^2)" if p > 0 else f"dim {d:g}: never")
        lines.append(f"  {op:16s} {device:5s} dense reference when " + "; ".join(parts))
    return lines


# Read the table at import (2026-12-02): torch.compile(fullgraph=True) cannot trace the file system calls of a
# first _load() inside a compiled region (posix.stat), so the cache must already hold it; a bad
# CONTRASTGEN_CROSSOVER still raises, at the first dispatch that needs it.
try:
    _load()
except ValueError:
    pass
