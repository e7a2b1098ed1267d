"""Ahead-of-time compilation of the shipped Triton kernel configurations (no GPU needed).

Every kernel module in ``contrastgen.kernels`` exports ``AOT_CONFIGS: list[AotConfig]``, one entry per
(kernel, argument types, constexpr values, num_warps, num_stages) combination that its launchers can
launch (including every autotune config).  ``compile_config`` compiles one of them for an NVIDIA
architecture on the CPU and reads the register / spill / shared-memory numbers from the bundled ptxas,
so that a CPU-only CI catches compile errors, register spills and shared-memory overflows that the
interpreter (``TRITON_INTERPRET=1``) never sees.

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
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

# Largest dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


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


def _ptxas_stats(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers, spill bytes = stores + loads) from ``ptxas -v`` on ``ptx``; cached by PTX hash."""
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "contrastgen_aot")
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()
    cached = os.path.join(cache_dir, key + ".json")
    if os.path.exists(cached):
        with open(cached) as f:
            d = json.load(f)
        return d["registers"], d["spill_bytes"]
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as td:
        src, out = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", out], capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
    out = (max(regs), sum(int(a) + int(b) for a, b in spills))
    with open(cached, "w") as f:
        json.dump({"registers": out[0], "spill_bytes": out[1]}, f)
    return out


def compile_config(cfg: AotConfig, arch) -> Tuple[int, int, int]:
    """Compile ``cfg`` for ``arch`` (80, 90, "sm_80" or "sm_90a") on the CPU.

    Returns (registers per thread, spill bytes (stores + loads), shared memory bytes).
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
    regs, spills = _ptxas_stats(compiled.asm["ptx"], arch)
    return regs, spills, int(compiled.metadata.shared)


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


def report(arch, package: str = "contrastgen.kernels") -> List[dict]:
    """Compile every shipped config launched on ``arch`` (``arch in cfg.archs``); one dict per config (errors are
    reported, not raised)."""
    arch = _arch_int(arch)
    rows = []
    for modname, cfg in all_configs(package):
        if arch not in cfg.archs:
            continue
        row = {"module": modname, "config": cfg.describe(), "arch": arch, **cfg.to_json()}
        try:
            row["registers"], row["spill_bytes"], row["shared_mem"] = compile_config(cfg, arch)
            row["smem_limit"] = SMEM_LIMIT.get(arch)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            row["error"] = f"{type(e).__name__}: {e}"[:4000]
        rows.append(row)
    return rows


def run_in_subprocess(arch, package: str = "contrastgen.kernels", timeout: Optional[float] = 900) -> List[dict]:
    """``report(arch)`` in a fresh interpreter with ``TRITON_INTERPRET`` removed from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "contrastgen.kernels._aot", "--arch", str(_arch_int(arch)),
                        "--package", package], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed (rc={p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
            print(f"sm_{r['arch']} {r['config']}: " + (r.get("error") or
                  f"regs={r['registers']} spills={r['spill_bytes']} smem={r['shared_mem']}"), file=sys.stderr)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
