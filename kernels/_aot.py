"""Ahead-of-time compilation of the shipped Triton kernel configurations (no GPU needed).

Every kernel module in ``contrastgen.kernels`` exports ``AOT_CONFIGS: list[AotConfig]``, one entry per
(kernel, argument types, constexpr values, num_warps, num_stages) combination that its launchers build for the
benchmark shapes, with ``archs`` the architectures it is launched on.  ``compile_config`` compiles one of them for
an NVIDIA architecture on the CPU and reads, from the bundled CUDA tools:

* ``ptxas -v`` (the flags Triton uses): registers per thread and spill bytes;
* the PTX: acquire/release atomics (``atom``/``red`` with ``.acq_rel`` / ``.acquire`` / ``.release``);
* the SASS of Triton's cubin (``cuobjdump -sass``): instruction counts by opcode (HGMMA = wgmma, HMMA = mma.sync,
  MUFU, SHFL, MEMBAR, CCTL.IVALL, atomics ...) and the loops (backward branches) with their instruction counts,
  which ``contrastgen.kernels.roofline`` turns into per-tile costs,

so that a CPU-only CI catches compile errors, register spills, shared-memory overflows, products that fell off the
tensor-core path and fenced atomics, none of which the interpreter (``TRITON_INTERPRET=1``) sees.

Triton versions: the CI's Triton (the one installed) and Triton 3.6, the version of the GPU machines.  The latter is
installed beside the CI's, never over it: ``ensure_triton("3.6.0")`` downloads the wheel (``pip download``) into
``~/.cache/contrastgen_aot/triton-3.6.0/`` (unzipped, the CUDA tools made executable) and ``run_in_subprocess(arch,
triton_path=...)`` runs the compile in a fresh interpreter with that folder first on ``PYTHONPATH`` (and its own
``TRITON_CACHE_DIR``).

Format of an entry (agreed between the kernel modules)::

    AotConfig(kernel="contrastgen.kernels.infonce:_infonce_fwd_kernel",   # "module:function" (or the function)
              signature={"q_ptr": "*bf16", "n": "i32", "scale": "fp32", "BLOCK_M": "constexpr", ...},
              constexprs={"BLOCK_M": 128, ...},
              num_warps=8, num_stages=3, archs=(90,))   # archs: where the launchers launch it

``signature`` lists every argument of the kernel in order, constexprs included (type ``"constexpr"``).
Pointer arguments are compiled as 16-byte aligned (what the Triton launcher specializes on for
torch allocations); integer arguments named in ``divisible_by_16`` are compiled as multiples of 16.

The compile must run in a process where ``TRITON_INTERPRET`` is not "1" (under the interpreter
``@triton.jit`` returns an ``InterpretedFunction`` that cannot be compiled): ``run_in_subprocess`` does
that, and ``python -m contrastgen.kernels._aot --arch 90`` prints a JSON report of every config.
Results are cached by the hash of the PTX / cubin under ``~/.cache/contrastgen_aot`` (Triton caches its own
compiles under ``~/.triton/cache``), so repeated runs take seconds.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib
import json
import os
import pkgutil
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Tuple

# Largest dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
GPU_TRITON = "3.6.0"   # the Triton of the GPU machines (PLATFORM.md)
_STATS_VERSION = 4      # bump when the cached statistics change shape


@dataclasses.dataclass(frozen=True)
class AotConfig:
    kernel: Any                      # "package.module:function_name" or the @triton.jit function itself
    signature: Dict[str, str]        # every argument in order -> "*fp32" | "*bf16" | "*fp16" | "*i32" | "i32" | "fp32" | "constexpr"
    constexprs: Dict[str, Any]       # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: Tuple[str, ...] = ()   # integer arguments compiled as multiples of 16
    archs: Tuple[int, ...] = ARCHS          # the architectures the launchers launch this config on

    @property
    def kernel_path(self) -> str:
        if isinstance(self.kernel, str):
            return self.kernel
        fn = _unwrap(self.kernel)
        return f"{fn.__module__}:{fn.__name__}"

    def describe(self) -> str:
        dts = sorted({v for v in self.signature.values() if v.startswith("*")})
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel_path.split(':')[-1]}[{'/'.join(dts)}; {cx}; w{self.num_warps} s{self.num_stages}]"

    def to_json(self) -> dict:
        return {"kernel": self.kernel_path, "signature": dict(self.signature), "constexprs": dict(self.constexprs),
                "num_warps": self.num_warps, "num_stages": self.num_stages, "divisible_by_16": list(self.divisible_by_16),
                "archs": list(self.archs)}


def _unwrap(fn):
    """The JITFunction under autotune / heuristics wrappers."""
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _resolve(kernel):
    if isinstance(kernel, str):
        mod, name = kernel.split(":")
        kernel = getattr(importlib.import_module(mod), name)
    return _unwrap(kernel)


def _arch_int(arch) -> int:
    if isinstance(arch, str):
        arch = int(re.sub(r"[^0-9]", "", arch))
    return int(arch)


def cache_root() -> str:
    root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "contrastgen_aot")
    os.makedirs(root, exist_ok=True)
    return root


def _cached(key: str, compute):
    path = os.path.join(cache_root(), hashlib.sha256(key.encode()).hexdigest() + ".json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    value = compute()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return value


# ----------------------------------------------------------------------------------------------- CUDA tools
def _nvidia_bin() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_flags() -> List[str]:
    """The codegen-relevant ptxas flags this Triton passes (``make_cubin``): --regAllocOptLevel=2 from 3.7 on."""
    import triton.backends.nvidia.compiler as nv
    with open(nv.__file__) as f:
        src = f.read()
    return ["-lineinfo"] + (["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in src else [])


def _ptxas_stats(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers, spill bytes = stores + loads) from ``ptxas -v`` with Triton's flags; cached by PTX hash."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    flags = _ptxas_flags()
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"

    def compute():
        with tempfile.TemporaryDirectory() as td:
            src, out = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
            with open(src, "w") as f:
                f.write(ptx)
            p = subprocess.run([ptxas, *flags, "-v", f"--gpu-name={gpu}", src, "-o", out], capture_output=True,
                               text=True)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if not regs:
            raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
        return {"registers": max(regs), "spill_bytes": sum(int(a) + int(b) for a, b in spills)}

    d = _cached(f"ptxas2\n{triton.__version__}\n{arch}\n{' '.join(flags)}\n{ptx}", compute)
    return d["registers"], d["spill_bytes"]


def ptx_fenced_atomics(ptx: str) -> int:
    """Atomics / reductions with acquire or release semantics in the PTX (``atom.acq_rel`` is tl.atomic_add's
    default ``sem``: the SASS wraps it in MEMBAR + CCTL.IVALL).  Relaxed ones do not count."""
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.[\w.]*\b(?:acq_rel|acquire|release)\b", ptx, re.M))


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> List[Tuple[int, str, str]]:
    """(address, opcode with modifiers, full instruction) for every SASS instruction of ``cuobjdump -sass``."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        ins = m.group(2).strip()
        body = re.sub(r"^@!?U?P[T\d]+\s+", "", ins)
        out.append((int(m.group(1), 16), body.split()[0] if body else "", ins))
    return out


_CATEGORIES = {
    "HGMMA": "HGMMA", "HMMA": "HMMA", "MUFU": "MUFU", "SHFL": "SHFL", "BAR": "BAR", "MEMBAR": "MEMBAR",
    "ATOM": "ATOM", "ATOMG": "ATOM", "ATOMS": "ATOM", "RED": "RED", "REDG": "RED", "REDUX": "REDUX",
    "LDG": "LDG", "STG": "STG", "LDS": "LDS", "STS": "STS", "LDSM": "LDS", "UTMALDG": "TMA", "UTMASTG": "TMA",
    "LDGSTS": "LDGSTS", "FFMA": "FP32", "FADD": "FP32", "FMUL": "FP32", "FMNMX": "FP32", "FSEL": "FP32",
    "FSETP": "FP32", "F2F": "CVT", "F2FP": "CVT", "I2F": "CVT", "F2I": "CVT",
}


def _categorize(ops) -> Dict[str, int]:
    ops = list(ops)
    c = collections.Counter()
    for op in ops:
        base = op.split(".")[0]
        c[_CATEGORIES.get(base, "other")] += 1
        if base == "CCTL" and "IVALL" in op:
            c["CCTL.IVALL"] += 1
        if base == "MEMBAR" and ".GPU" in op or base == "MEMBAR" and ".SYS" in op:
            c["MEMBAR.GPU"] += 1   # a device-wide fence (the CTA-level ones come with TMA stores)
    c["total"] = len(ops)
    return dict(c)


def sass_summary(text: str) -> dict:
    """Counts by category over the whole kernel, the HGMMA / HMMA shapes, and the loops (backward branches): for each,
    its address range, depth (1 = outermost), instruction counts by category (nested loops included) and the HGMMA
    shapes in it.  ``tile_path``: the instructions of the straight-line code around the innermost loop with the
    widest HGMMA (the D loop of a kernel's full tiles), between the conditional branch that enters it and the branch
    that leaves it -- the per-tile epilogue of a kernel's common path (see contrastgen.kernels.roofline)."""
    ins = parse_sass(text)
    addrs = [a for a, _, _ in ins]
    loops = []
    for a, op, full in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", full.split("BRA", 1)[1])
            if m and int(m.group(1), 16) <= a:
                loops.append([int(m.group(1), 16), a])
    loops.sort(key=lambda r: (r[0], -r[1]))

    def in_range(lo, hi):
        return [(a, op, full) for a, op, full in ins if lo <= a <= hi]

    def shapes(rng):
        return sorted({re.sub(r"^HGMMA\.", "", op).split(".")[0] for _, op, _ in rng if op.startswith("HGMMA")})

    out_loops = []
    for lo, hi in loops:
        depth = 1 + sum(1 for lo2, hi2 in loops if lo2 <= lo and hi <= hi2 and (lo2, hi2) != (lo, hi))
        rng = in_range(lo, hi)
        out_loops.append({"start": lo, "end": hi, "depth": depth, "counts": _categorize(op for _, op, _ in rng),
                          "hgmma_shapes": shapes(rng)})
    # atomics wrapped in device-wide fences (what acq_rel atomics become): a MEMBAR.*.GPU or CCTL.IVALL within a few
    # instructions of an ATOM / RED.  (A lone CCTL.IVALL also follows the wait for a kernel's last TMA stores.)
    fence_idx = [i for i, (_, op, _) in enumerate(ins)
                 if (op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op)) or op.startswith("CCTL.IVALL")]
    atom_idx = [i for i, (_, op, _) in enumerate(ins) if op.split(".")[0] in ("ATOM", "ATOMG", "RED", "REDG")]
    fenced = sum(1 for i in atom_idx if any(abs(i - j) <= 6 for j in fence_idx))
    summary = {"counts": dict(_categorize(op for _, op, _ in ins), fenced_atomics=fenced), "hgmma_shapes": shapes(ins),
               "hmma_shapes": sorted({op for _, op, _ in ins if op.startswith("HMMA")}), "loops": out_loops}
    # the common tile path: the innermost loop whose HGMMA (or HMMA) N is the widest
    inner = [lp for lp in out_loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]
                                               for o in out_loops)]

    def width(lp):
        ws = [int(s.split("x")[1]) for s in lp["hgmma_shapes"] if "x" in s]
        return (max(ws) if ws else 0, lp["counts"].get("HGMMA", 0) + lp["counts"].get("HMMA", 0))

    mma_loops = [lp for lp in inner if width(lp)[1] > 0]
    if mma_loops:
        best = max(mma_loops, key=width)
        lo, hi = best["start"], best["end"]
        # enclosing straight-line region: back to the conditional branch that skips past the loop, forward to the
        # first unconditional branch after it (the loop latch / merge of the kind dispatch)
        start = addrs[0]
        for a, op, full in reversed([r for r in ins if r[0] < lo]):
            m = re.search(r"0x([0-9a-f]+)", full.split("BRA", 1)[1]) if op.startswith("BRA") else None
            if m and full.startswith("@") and int(m.group(1), 16) > hi:
                start = a
                break
        end = addrs[-1]
        for a, op, full in [r for r in ins if r[0] > hi]:
            if (op.startswith("BRA") and not full.startswith("@")) or op.startswith("EXIT"):
                end = a
                break
        path = [r for r in in_range(start, end) if not (lo <= r[0] <= hi)]
        summary["tile_path"] = {"start": start, "end": end, "loop": [lo, hi], "hgmma_shape": shapes(in_range(lo, hi)),
                                "outside_loop": _categorize(op for _, op, _ in path),
                                "loop_body": best["counts"]}
    return summary


def _sass(cubin: bytes) -> dict:
    def compute():
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            p = subprocess.run([os.path.join(_nvidia_bin(), "cuobjdump"), "-sass", path], capture_output=True,
                               text=True)
        if p.returncode != 0:
            raise RuntimeError(f"cuobjdump -sass failed:\n{p.stderr[-2000:]}")
        return sass_summary(p.stdout)

    return _cached(f"sass{_STATS_VERSION}\n" + hashlib.sha256(cubin).hexdigest(), compute)


# ----------------------------------------------------------------------------------------------- compile
def compile_config(cfg: AotConfig, arch) -> dict:
    """Compile ``cfg`` for ``arch`` (80, 90, "sm_80" or "sm_90a") on the CPU.

    Returns {registers, spill_bytes, shared_mem, fenced_atomics (PTX), sass (see sass_summary)}.
    Raises if the kernel does not compile.  Must not run under ``TRITON_INTERPRET=1``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_config needs TRITON_INTERPRET unset (use run_in_subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = _arch_int(arch)
    fn = _resolve(cfg.kernel)
    names = list(fn.arg_names)
    if list(cfg.signature) != names:
        raise ValueError(f"{cfg.kernel_path}: signature names {list(cfg.signature)} != kernel arguments {names}")
    attrs = {}
    for i, (name, ty) in enumerate(cfg.signature.items()):
        if ty.startswith("*") or name in cfg.divisible_by_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, arch)
    return {"registers": regs, "spill_bytes": spills, "shared_mem": int(compiled.metadata.shared),
            "fenced_atomics": ptx_fenced_atomics(ptx), "sass": _sass(compiled.asm["cubin"])}


def all_configs(package: str = "contrastgen.kernels") -> List[Tuple[str, AotConfig]]:
    """(module name, config) for every ``AOT_CONFIGS`` entry of every module of ``package``."""
    pkg = importlib.import_module(package)
    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        for cfg in getattr(mod, "AOT_CONFIGS", []):
            out.append((mod.__name__, cfg))
    return out


def report(arch, package: str = "contrastgen.kernels", configs: Optional[List[AotConfig]] = None) -> List[dict]:
    """Compile every shipped config launched on ``arch`` (``arch in cfg.archs``), or the given ``configs``; one dict
    per config (errors are reported, not raised)."""
    import triton
    arch = _arch_int(arch)
    items = [("", c) for c in configs] if configs is not None else all_configs(package)
    rows = []
    for modname, cfg in items:
        if configs is None and arch not in cfg.archs:
            continue
        row = {"module": modname or cfg.kernel_path.split(":")[0], "config": cfg.describe(), "arch": arch,
               "triton": triton.__version__, **cfg.to_json()}
        try:
            row.update(compile_config(cfg, arch))
            row["smem_limit"] = SMEM_LIMIT.get(arch)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            row["error"] = f"{type(e).__name__}: {e}"[:4000]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- other Tritons
def ensure_triton(version: str = GPU_TRITON) -> Tuple[Optional[str], str]:
    """(folder to put first on PYTHONPATH, "") with Triton ``version`` unpacked in this cache, or (None, why not).

    ``pip download triton==VERSION --no-deps --only-binary=:all:`` for this Python, unzipped (zip drops the run bits:
    the CUDA tools under triton/backends/nvidia/bin are made executable again).  Never installed into the
    environment: the CI's Triton stays as it is."""
    import triton
    if triton.__version__.split("+")[0] == version:
        return "", ""
    dest = os.path.join(cache_root(), f"triton-{version}")
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest, ""
    dl = os.path.join(cache_root(), "wheels")
    os.makedirs(dl, exist_ok=True)
    wheels = glob.glob(os.path.join(dl, f"triton-{version}-*.whl"))
    if not wheels:
        p = subprocess.run([sys.executable, "-m", "pip", "download", f"triton=={version}", "--no-deps",
                            "--only-binary=:all:", "-d", dl, "-q"], capture_output=True, text=True, timeout=600)
        wheels = glob.glob(os.path.join(dl, f"triton-{version}-*.whl"))
        if p.returncode != 0 or not wheels:
            return None, f"pip download triton=={version} failed: {(p.stderr or p.stdout).strip()[-500:]}"
    tmp = f"{dest}.{os.getpid()}.tmp"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp)
    for tool in glob.glob(os.path.join(tmp, "triton", "backends", "nvidia", "bin", "*")):
        os.chmod(tool, os.stat(tool).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if os.path.exists(dest):
        import shutil
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    open(marker, "w").close()
    return dest, ""


def run_in_subprocess(arch, package: str = "contrastgen.kernels", timeout: Optional[float] = 1800,
                      triton_path: str = "") -> List[dict]:
    """``report(arch)`` in a fresh interpreter with ``TRITON_INTERPRET`` removed from the environment; with
    ``triton_path`` (from ``ensure_triton``) first on PYTHONPATH and its own Triton cache directory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join([triton_path] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                             if p])
        env["TRITON_CACHE_DIR"] = os.path.join(triton_path, ".triton-cache")
    p = subprocess.run([sys.executable, "-m", "contrastgen.kernels._aot", "--arch", str(_arch_int(arch)),
                        "--package", package], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed (rc={p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_matrix(archs=ARCHS, versions=("", GPU_TRITON), package: str = "contrastgen.kernels"):
    """{(triton version or "ci", arch): rows} for every (Triton, arch), one subprocess each, in parallel; a Triton
    that cannot be obtained gives {(version, arch): "skip: why"}."""
    jobs, out = {}, {}
    paths = {}
    for v in versions:
        if v == "":
            paths["ci"] = ""
            continue
        path, why = ensure_triton(v)
        if path is None:
            for a in archs:
                out[(v, a)] = f"skip: {why}"
        else:
            paths[v] = path
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(paths) * len(archs))) as ex:
        for v, path in paths.items():
            for a in archs:
                jobs[(v, a)] = ex.submit(run_in_subprocess, a, package, triton_path=path)
        for key, fut in jobs.items():
            out[key] = fut.result()
    return out


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="AOT-compile every shipped Triton config; print a JSON list")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--package", default="contrastgen.kernels")
    ap.add_argument("--pretty", action="store_true")
    a = ap.parse_args(argv)
    rows = report(a.arch, a.package)
    if a.pretty:
        for r in rows:
            c = r.get("sass", {}).get("counts", {})
            print(f"triton {r['triton']} sm_{r['arch']} {r['config']}: " + (r.get("error") or
                  f"regs={r['registers']} spills={r['spill_bytes']} smem={r['shared_mem']} HGMMA={c.get('HGMMA', 0)} "
                  f"HMMA={c.get('HMMA', 0)} fenced_atomics={r['fenced_atomics']}"), file=sys.stderr)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
