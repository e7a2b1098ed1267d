"""The PatchNCE Triton specializations the launchers build for the benchmark shapes are listed in AOT_CONFIGS
(tests/test_aot_compile.py compiles every entry for sm_80 / sm_90a and asserts 0 spills)."""
import pytest
import torch

pytest.importorskip("triton")
K = pytest.importorskip("contrastgen.kernels.patchnce")
from contrastgen.bench import cases as C  # noqa: E402


def _have():
    return {(c.kernel_path.split(":")[1], c.archs, c.signature["Q0"], c.num_warps, c.num_stages,
             tuple(sorted((k, v) for k, v in c.constexprs.items() if k != "UPCAST"))) for c in K.AOT_CONFIGS}


def _benchmark_launches():
    """(dtype, c_max, key grads) of every patch_nce benchmark case on CUDA, for the dtypes benches/gpu.sh and the
    harness default run (float32, bfloat16) and float16."""
    out = set()
    for spec in C.all_specs():
        if spec.family != "patch_nce":
            continue
        for shape in spec.shapes["cuda"]:
            key_grads = spec.name.endswith("key_grads")
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                if dt == torch.float16 and spec.name.endswith("i2i"):
                    continue
                out.add((dt, max(C._patch_channels(shape)), key_grads))
    return out


@pytest.mark.parametrize("arch", [80, 90])
def test_benchmark_launches_are_in_aot_configs(arch):
    have = _have()
    ty = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    for dt, c_max, key_grads in _benchmark_launches():
        for kern, table, flags in (
                ("_patchnce_fwd_kernel", K.FWD_CONFIGS, {"NEED_DQ": True, "NEED_LSE": key_grads, "NEED_DT": False}),
                ("_patchnce_bwd_kernel", K.BWD_CONFIGS, {"MEAN": True, "NEED_DQ": True, "NEED_DK": key_grads,
                                                          "SCALE_BLOCK": K.SCALE_BLOCK})):
            bm, bn, bc, on_chip, w, s = K.launch_tiles(table, arch, dt, c_max)
            cx = {"TAU_PTR": False, "FP32_DOT": dt == torch.float32, **flags, "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_C": bc, "ON_CHIP": on_chip}
            key = (kern, (arch,), ty[dt], w, s, tuple(sorted(cx.items())))
            assert key in have, (arch, dt, c_max, key_grads, kern)


def test_sm90_products_have_64_rows():
    """sm_90: every product's M dimension is >= 64 (wgmma m64): BLOCK_M for the forward, BLOCK_N too for the key
    pass."""
    for table in (K.FWD_CONFIGS, K.BWD_CONFIGS):
        for (arch, prec, mode), (bm, bn, w, s) in table.items():
            if arch == 90:
                assert bm >= 64
                if table is K.BWD_CONFIGS:
                    assert bn >= 64, (prec, mode)
