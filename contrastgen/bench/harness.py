"""Timing and memory machinery of the benchmark harness.

Timing
------
* CUDA: CUDA events around each call, the L2 cache flushed before each one (a 256 MiB ``zero_()``,
  as ``triton.testing.do_bench`` does), warm-up calls first, then the median of the repeats.
* CPU: ``time.perf_counter`` around each call after warm-up, median of the repeats, with
  ``torch.set_num_threads(os.cpu_count())`` set once by :func:`setup_threads`.

The number of repeats adapts to the measured cost of one call: enough to fill ``budget_s``,
between ``min_reps`` and ``max_reps``.

Peak memory
-----------
* CUDA: ``torch.cuda.reset_peak_memory_stats()``, baseline ``memory_allocated()``, one call,
  ``max_memory_allocated() - baseline``.
* CPU: PyTorch has no CPU allocator statistics, so one extra call runs under
  ``torch.profiler.profile(profile_memory=True)``; the profiler records every allocation and free of
  the CPU allocator (``[memory]`` events, ``nbytes`` < 0 for frees) in time order; the peak is the
  maximum of their running sum, i.e. the peak of torch CPU tensor memory allocated during the call
  above what was live before it.  It does NOT see memory a C++ extension mallocs itself (scratch
  buffers), so the process' resident-set high-water mark is recorded too (``rss_peak_mib``):
  ``/proc/self/clear_refs`` is written with ``5`` to reset ``VmHWM`` to the current RSS, and the
  growth of ``VmHWM`` over the call is reported.  That second number sees everything the process
  touches but under-counts memory reused from freed (not returned) malloc arenas; treat it as a
  lower bound.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

CPU_MEMORY_METHOD = ("torch.profiler(profile_memory=True): peak of the running sum of CPU allocator [memory] "
                     "events during one call (torch CPU tensors only); rss_peak_mib: VmHWM growth after "
                     "resetting it through /proc/self/clear_refs (whole process, lower bound)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() - memory_allocated() before the call, after reset_peak_memory_stats()"


def setup_threads(n: Optional[int] = None) -> int:
    """``torch.set_num_threads(n or os.cpu_count())``.  On a machine shared with other busy processes,
    OpenMP threads wait for a scheduler slot at every barrier and small ops get ~100x slower: pass
    ``n=1`` there (``contrastgen bench --threads 1``); the run's load average is recorded."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    ms: float                       # median
    ms_min: float
    ms_q1: float
    ms_q3: float
    reps: int
    samples: list = field(default_factory=list)


_L2_FLUSH: dict = {}


def _flush_l2(device: str) -> None:
    if device != "cuda":
        return
    buf = _L2_FLUSH.get("buf")
    if buf is None:
        buf = _L2_FLUSH["buf"] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    buf.zero_()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 1, budget_s: float = 0.3, min_reps: int = 3,
            max_reps: int = 100) -> Timing:
    """Median wall time of ``fn()`` in ms.  ``fn`` is called ``warmup`` times first (untimed)."""
    for _ in range(warmup):
        fn()
    sync(device)
    # One timed probe decides the number of repeats.
    probe = _time_once(fn, device)
    reps = int(max(min_reps, min(max_reps, budget_s * 1e3 / max(probe, 1e-3))))
    if probe * min_reps > 10 * budget_s * 1e3:      # a very slow case (e.g. a peer far off its regime)
        reps = min(reps, 2)
    samples = [probe] + [_time_once(fn, device) for _ in range(reps - 1)]
    samples.sort()
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(ms=statistics.median(samples), ms_min=samples[0], ms_q1=q[0], ms_q3=q[2], reps=len(samples),
                  samples=[round(s, 4) for s in samples])


def _time_once(fn, device) -> float:
    if device == "cuda":
        _flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# --------------------------------------------------------------------------- memory
def _read_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_profiler():
    """Kineto prints start/stop lines on the stderr file descriptor on some builds; keep the output
    readable by pointing fd 2 at /dev/null while the profiler runs (nothing else prints then)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class Memory:
    peak_mib: Optional[float]
    rss_peak_mib: Optional[float] = None


def measure_memory(fn: Callable[[], object], device: str) -> Memory:
    """Peak memory of one call of ``fn`` above what was allocated before it (see the module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return Memory(peak_mib=peak / 2**20)
    from torch.profiler import ProfilerActivity, profile

    rss_ok = _reset_hwm()
    rss0 = _read_status("VmRSS") if rss_ok else None
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    hwm = _read_status("VmHWM") if rss_ok else None
    del out
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU:
            events.append((e.start_ns(), e.nbytes()))
    events.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    rss = None if rss0 is None or hwm is None else max(0, hwm - rss0) / 2**20
    return Memory(peak_mib=peak / 2**20, rss_peak_mib=rss)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def available_bytes(device: str) -> int:
    """Memory a case may use: free GPU memory, or MemAvailable on Linux (conservative fallback 4 GiB)."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


# --------------------------------------------------------------------------- run metadata (shared by every bench script)
def _source_root() -> Optional[str]:
    """The checkout the package is imported from (editable install / PYTHONPATH), or None (an installed wheel)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:
        return None
    return root if top and os.path.realpath(top) == os.path.realpath(root) else None


def git(*args) -> str:
    """``git ARGS`` in the checkout the package runs from, or "" (no git, or an installed wheel: the commit of
    some unrelated repository around the working directory or site-packages is never recorded)."""
    import subprocess
    root = _source_root()
    if root is None:
        return ""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def build_commit() -> str:
    """The commit an installed build was made from (recorded at build time), or ""."""
    try:
        from contrastgen.ops import _backends
        return str(_backends.cpp_build_info().get("build", {}).get("git_commit") or "")
    except Exception:
        return ""


def machine_id(device: str) -> str:
    """What makes timings comparable across runs: the device's name, the core count and the host."""
    import platform
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else cpu_model()
    return f"{name} | {os.cpu_count()} cores | {platform.node()}"


def is_loaded(load: Optional[float], own_threads: int = 0) -> bool:
    """True when other processes keep more than half the cores busy (1-min load average minus our threads)."""
    cores = os.cpu_count() or 1
    return load is not None and load - own_threads > 0.5 * cores


def run_is_loaded(meta: dict, results: list) -> bool:
    """A run counts as loaded if the machine was loaded when it started or during most of its cases."""
    if is_loaded(meta.get("load_average")):
        return True
    own = meta.get("torch_threads") or 1
    loads = sorted(r["load_average"] for r in results if r.get("load_average") is not None)
    return bool(loads) and is_loaded(statistics.median(loads), own)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
