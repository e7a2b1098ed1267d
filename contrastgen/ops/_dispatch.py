"""Backend selection for every contrastgen op (the table itself is in ``_backends.py``).

Order of precedence:

1. the explicit ``backend=`` argument: always honoured; if it cannot run, ``ValueError`` (never a silent swap);
2. ``CONTRASTGEN_BACKEND``: one backend (``cpp``) or one per device type (``cuda:triton,cpu:cpp``; ``auto`` = the
   default rule); a value that cannot run on the tensor's device falls back to the default rule with a warning
   naming the variable; a malformed value raises ``ValueError`` naming the variable;
3. the default: Triton for CUDA tensors, the C++ kernel for CPU tensors, the PyTorch reference otherwise --
   and, for the sizes where the dense reference is faster (a measured crossover per op and device,
   ``_crossover.py``), the reference.  A default kernel that exists but cannot run here (extension not built,
   no Triton) falls back to the reference with a one-time ``RuntimeWarning`` that names the public op, says why,
   and points at the user's line.  Ops without a kernel on a backend (``PUBLIC_OPS[name] is None`` or no row
   entry in the table: documented as reference-only) run the reference silently.

Every decision is logged once per (op, device, backend) on the ``contrastgen`` logger at DEBUG
(``CONTRASTGEN_LOG=1`` attaches a stderr handler); :func:`backend_for` returns the decision and its reason.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _backends, _crossover

BACKENDS = ("triton", "cpp", "torch")
ENV = "CONTRASTGEN_BACKEND"
DEVICE_DEFAULT = {"cuda": "triton", "cpu": "cpp"}
logger = logging.getLogger("contrastgen")
_WARNED: set = set()
_LOGGED: set = set()
_ENV_CACHE: Dict[str, Dict[str, str]] = {}


def backend_available(backend: str, op: str = "infonce") -> tuple:
    """(available, why not) of ``backend`` for ``op`` on this installation (device aside)."""
    if backend == "torch":
        return True, ""
    if backend not in _backends.BACKEND_TABLE.get(op, {}):
        return False, f"op {op!r} has no {backend!r} implementation yet"
    return _backends.PROBES[backend](op)


def available_backends(op: str) -> List[str]:
    """The fused backends that can run ``op`` on this installation (device aside)."""
    return [b for b in _backends.BACKEND_TABLE.get(op, {}) if backend_available(b, op)[0]]


# ------------------------------------------------------------------------------------------- CONTRASTGEN_BACKEND
def parse_env(value: str) -> Dict[str, str]:
    """``"cpp"`` -> {"*": "cpp"}; ``"cuda:triton,cpu:cpp"`` -> {"cuda": "triton", "cpu": "cpp"}."""
    value = value.strip()
    hit = _ENV_CACHE.get(value)
    if hit is not None:
        return hit
    out: Dict[str, str] = {}
    for part in value.lower().split(","):
        part = part.strip()
        if not part:
            continue
        dev, _, name = part.rpartition(":")
        dev = dev.strip() or "*"
        name = name.strip()
        if name not in BACKENDS + ("auto",) or (dev != "*" and not re.fullmatch(r"[a-z_]+", dev)) or dev in out:
            raise ValueError(f"{ENV}={value!r} is not valid: expected one backend of {BACKENDS + ('auto',)} or "
                             f"a per-device list like 'cuda:triton,cpu:cpp' (problem: {part!r})")
        out[dev] = name
    _ENV_CACHE[value] = out
    return out


def _env_choice(device: torch.device) -> Optional[str]:
    raw = os.environ.get(ENV, "")
    if not raw.strip():
        return None
    table = parse_env(raw)
    name = table.get(device.type, table.get("*"))
    return None if name in (None, "auto") else name


# ------------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class BackendChoice:
    """What :func:`backend_for` reports: the backend that would run and why."""
    op: str                 # the public op name (e.g. "clip_loss")
    kernel_op: Optional[str]  # its row of the backend table ("infonce"), None for reference-only functions
    device: str
    backend: str            # "triton" | "cpp" | "torch"
    source: str             # "argument" | "CONTRASTGEN_BACKEND" | "default" | "shape rule" | "reference-only" | "fallback"
    reason: str
    rule: Optional[str] = None   # the shape rule applied by the default, if any

    def __str__(self) -> str:
        return f"contrastgen.{self.op} on {self.device}: {self.backend} ({self.source}: {self.reason})"


def _runnable(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    ok, why = backend_available(backend, op)
    if ok:
        ok, why = _backends.device_supported(backend, device)
    return ok, why


def _siblings(op: str) -> str:
    names = [k for k, v in _backends.PUBLIC_OPS.items() if v == op]
    return ", ".join(names)


def _decide(op: str, backend: Optional[str], device: torch.device, api: Optional[str],
            shape: Optional[Sequence[int]]) -> Tuple[BackendChoice, Optional[Tuple[str, str]]]:
    """(the choice, None or (warning key, warning message))."""
    if op not in _backends.BACKEND_TABLE:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_backends.BACKEND_TABLE)}")
    api = api or op
    dev = str(device)
    row = _backends.BACKEND_TABLE[op]
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend != "torch":
            ok, why = _runnable(op, backend, device)
            if not ok:
                raise ValueError(f"backend={backend!r} cannot run {api} ({op!r}) on {device}: {why}")
        return BackendChoice(api, op, dev, backend, "argument", "backend= was given"), None
    warn = None
    env = _env_choice(device)
    if env is not None:
        if env == "torch":
            return BackendChoice(api, op, dev, "torch", ENV, f"{ENV}={os.environ[ENV]!r}"), None
        if not row:
            return BackendChoice(api, op, dev, "torch", "reference-only",
                                 f"{api} has no fused kernel yet (documented as reference-only)"), None
        if env in row:
            ok, why = _runnable(op, env, device)
            if ok:
                return BackendChoice(api, op, dev, env, ENV, f"{ENV}={os.environ[ENV]!r}"), None
            warn = (f"env:{op}:{device.type}:{os.environ[ENV]}",
                    f"contrastgen.{api}: {ENV}={os.environ[ENV]!r} asks for the {env!r} backend, which cannot run "
                    f"on {device.type} tensors here ({why}); using the default backend instead")
        # else: the op has no kernel on that backend (a documented gap): the default rule, silently
    default = DEVICE_DEFAULT.get(device.type, "torch")
    if default == "torch" or default not in row:
        reason = (f"{api} has no fused kernel yet (documented as reference-only)" if not row else
                  f"{api} has no {default} kernel (the reference runs on {device.type})")
        return BackendChoice(api, op, dev, "torch", "reference-only", reason), warn
    ok, why = _runnable(op, default, device)
    if not ok:
        sib = _siblings(op)
        msg = (f"contrastgen.{api}: {why}; {api} falls back to the PyTorch reference"
               + (f" (so do {sib})" if sib and sib != api else ""))
        return BackendChoice(api, op, dev, "torch", "fallback", why), warn or (f"{op}:{default}", msg)
    if shape is not None:
        rows, cols, dim = shape         # SymInts under torch.compile(dynamic=True): the rule then guards on them
        dense, rule = _crossover.prefer_dense(api, device.type, rows * cols, dim)
        if dense:
            return BackendChoice(api, op, dev, "torch", "shape rule", rule, rule), warn
        if rule:
            return BackendChoice(api, op, dev, default, "default", f"the {default} kernel for {device.type} tensors",
                                 rule), warn
    return BackendChoice(api, op, dev, default, "default", f"the {default} kernel for {device.type} tensors"), warn


# ------------------------------------------------------------------------------------------- warnings and logging
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called from :func:`_warn_once` that names the first frame outside
    contrastgen and torch (so a warning raised through ``nn.Module.__call__`` or ``contrastgen.distributed``
    still points at the user's line)."""
    frame, level = sys._getframe(1), 1        # level 1: _warn_once, the caller of warnings.warn
    while frame is not None:
        fn = os.path.abspath(frame.f_code.co_filename)
        if not (fn.startswith(_PKG_DIR) or fn.startswith(_TORCH_DIR) or fn.startswith("<")):
            return level
        frame = frame.f_back
        level += 1
    return 2


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=_user_stacklevel())


def _setup_log_handler() -> None:
    if os.environ.get("CONTRASTGEN_LOG", "") not in ("", "0") and not getattr(logger, "_contrastgen_handler", False):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.DEBUG)
        logger._contrastgen_handler = True  # type: ignore[attr-defined]


def _log_once(choice: BackendChoice) -> None:
    _setup_log_handler()
    key = (choice.op, choice.device, choice.backend)
    if key in _LOGGED or not logger.isEnabledFor(logging.DEBUG):
        return
    _LOGGED.add(key)
    logger.debug("dispatch %s", choice)


def resolve_backend(op: str, backend: Optional[str], device: torch.device, *, api: Optional[str] = None,
                    shape: Optional[Sequence[int]] = None) -> str:
    """Return the backend name that will run ``op`` (a row of the backend table) for tensors on ``device``.

    ``api``: the public function (for messages and the shape rule); ``shape``: ``(rows, cols, dim)`` of the
    problem (pairs = rows * cols, see ``_crossover.py``) for the default's shape rule."""
    choice, warn = _decide(op, backend, device, api, shape)
    if not torch.compiler.is_compiling():
        if warn is not None:
            _warn_once(*warn)
        _log_once(choice)
    return choice.backend


# ------------------------------------------------------------------------------------------- backend_for
def _problem_shape(name: str, tensors: Sequence[torch.Tensor], negatives, grouped: bool):
    t = tensors
    if name in ("clip_loss", "siglip_loss"):
        return t[0].shape[0], t[1].shape[0] if len(t) > 1 else t[0].shape[0], t[0].shape[1]
    if name == "info_nce":
        m = t[1].shape[0] if len(t) > 1 and t[1] is not None else t[0].shape[0]
        k = 0 if negatives is None else negatives.shape[0]
        return t[0].shape[0], m + k, t[0].shape[1]
    if name == "nt_xent":
        return 2 * t[0].shape[0], 2 * t[0].shape[0], t[0].shape[1]
    if name == "dispersive_loss":
        z = t[0] if grouped else t[0].unsqueeze(0)
        g, b = z.shape[0], z.shape[1]
        return g * b, b, z[0, 0].numel()
    if name == "uniformity":
        return t[0].shape[0], t[0].shape[0], t[0][0].numel()
    return None


def backend_for(op_name: str, *tensors: torch.Tensor, backend: Optional[str] = None,
                negatives: Optional[torch.Tensor] = None, grouped: bool = False) -> BackendChoice:
    """Which backend ``contrastgen.<op_name>(*tensors, backend=backend)`` would run, and why.

    >>> contrastgen.backend_for("clip_loss", image, text)
    BackendChoice(op='clip_loss', ..., backend='torch', source='shape rule', reason='65536 pairs < crossover ...')

    ``op_name`` is a public function name (``clip_loss``, ``info_nce``, ``nt_xent``, ``siglip_loss``,
    ``dispersive_loss``, ``uniformity``, ``patch_nce``, ``attention_nce``, ``alignment``); ``tensors`` are its
    leading tensor arguments (their device and shapes decide); ``negatives`` / ``grouped`` as in the function.
    Nothing is computed and no warning is raised."""
    if op_name not in _backends.PUBLIC_OPS:
        raise ValueError(f"unknown op {op_name!r}; expected one of {sorted(_backends.PUBLIC_OPS)}")
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None and tensors and isinstance(tensors[0], (list, tuple)) and tensors[0]:
        first = tensors[0][0]                      # patch_nce takes lists of layers
    device = first.device if first is not None else torch.device("cpu")
    op = _backends.PUBLIC_OPS[op_name]
    if op is None:
        return BackendChoice(op_name, None, str(device), "torch", "reference-only",
                             f"{op_name} is a PyTorch function (no fused kernel; documented as reference-only)")
    shape = None
    if first is not None and all(isinstance(t, torch.Tensor) or t is None for t in tensors):
        shape = _problem_shape(op_name, tensors, negatives, grouped)
    return _decide(op, backend, device, op_name, shape)[0]
