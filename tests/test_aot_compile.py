"""Every shipped Triton configuration (``AOT_CONFIGS`` of each module in ``contrastgen.kernels``) compiles
ahead of time for sm_80 and sm_90a on this CPU machine, with zero register spills and shared memory
within the architecture's limit.

The interpreter (TRITON_INTERPRET=1, set by conftest.py) hides compile errors and cannot compile, so
the compilation runs in one subprocess per architecture without TRITON_INTERPRET, both in parallel.
Triton's cache (~/.triton/cache) and the ptxas statistics cache (~/.cache/contrastgen_aot) make
repeated runs fast.
"""
import concurrent.futures
import importlib
import importlib.util
import pkgutil

import pytest

pytest.importorskip("triton")
if importlib.util.find_spec("triton.backends.nvidia") is None:  # pragma: no cover
    pytest.skip("triton has no NVIDIA backend (ptxas) here", allow_module_level=True)

from contrastgen.kernels import _aot  # noqa: E402


def _kernel_modules():
    import contrastgen.kernels as pkg
    return [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]


@pytest.fixture(scope="module")
def reports():
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(_aot.ARCHS)) as ex:
        futs = {arch: ex.submit(_aot.run_in_subprocess, arch) for arch in _aot.ARCHS}
        return {arch: f.result() for arch, f in futs.items()}


def test_every_kernel_module_ships_aot_configs():
    mods = _kernel_modules()
    assert "infonce" in mods
    for name in mods:
        mod = importlib.import_module(f"contrastgen.kernels.{name}")
        cfgs = getattr(mod, "AOT_CONFIGS", None)
        assert cfgs, f"contrastgen.kernels.{name} has no AOT_CONFIGS"
        assert all(isinstance(c, _aot.AotConfig) for c in cfgs)


def test_infonce_aot_configs_cover_the_launch_configs():
    """Each (kernel, tile, warps, stages) the launchers can launch, for each dtype, is in AOT_CONFIGS."""
    K = importlib.import_module("contrastgen.kernels.infonce")
    have = {(c.kernel_path.split(":")[1], c.signature["q_ptr"], c.constexprs.get("BLOCK_N"), c.constexprs.get("BLOCK_M"),
             c.constexprs.get("BLOCK_D"), c.num_warps, c.num_stages, c.constexprs.get("DK_ATOMIC"))
            for c in K.AOT_CONFIGS if "q_ptr" in c.signature}
    for dt, prec in (("*fp32", "fp32"), ("*bf16", "16bit"), ("*fp16", "16bit")):
        for cfg in K.FWD_CONFIGS[prec]:
            for kern in ("_infonce_fwd_kernel", "_siglip_fwd_kernel"):
                assert (kern, dt, *cfg, None) in have, (kern, dt, cfg)
        for cfg in K.BWD_CONFIGS[prec]:
            for kern in ("_infonce_bwd_kernel", "_siglip_bwd_kernel"):
                assert (kern, dt, *cfg, True) in have, (kern, dt, cfg)
        default = K.BWD_CONFIGS[prec][0]
        for kern, atomic in (("_infonce_bwd_kernel", False), ("_siglip_bwd_kernel", False),
                             ("_infonce_bwd_dk_kernel", None), ("_siglip_bwd_dk_kernel", None),
                             ("_infonce_pml_coef_kernel", None)):
            assert (kern, dt, *default, atomic) in have, (kern, dt)


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
def test_all_configs_compile_without_spills(reports, arch):
    rows = reports[arch]
    expected = sum(sum(arch in c.archs for c in getattr(importlib.import_module(f"contrastgen.kernels.{m}"),
                                                          "AOT_CONFIGS", []))
                   for m in _kernel_modules())
    assert len(rows) == expected
    errors = [f"{r['module']} {r['config']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    spills = [f"{r['config']}: {r['spill_bytes']} spill bytes ({r['registers']} registers)"
              for r in rows if r["spill_bytes"] > 0]
    assert not spills, "\n".join(spills)
    limit = _aot.SMEM_LIMIT[arch]
    over = [f"{r['config']}: {r['shared_mem']} B shared > {limit}" for r in rows if r["shared_mem"] > limit]
    assert not over, "\n".join(over)
    assert all(0 < r["registers"] <= 255 for r in rows)
