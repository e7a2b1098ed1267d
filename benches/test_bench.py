"""pytest-benchmark entry points (not collected by CI, which runs only tests/).

    pytest benches/test_bench.py --benchmark-only                       # small shapes, every op
    BENCH_REGIME=cuda pytest benches/test_bench.py --benchmark-only -k clip_loss
    pytest benches/test_bench.py --benchmark-only --benchmark-json out.json

Each case is one op x shape x provider x mode from the registry in ``contrastgen/bench/cases.py`` on CUDA when
available (else CPU); providers that cannot run are skipped with the harness' reason.  The full
harness (memory, ratios, peers, JSON, plot) is ``contrastgen bench``.
"""
import os

import pytest
import torch

from contrastgen.bench import cases as C
from contrastgen.bench.run import mode_callable

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
REGIME = os.environ.get("BENCH_REGIME", "quick")
DTYPE = C.DTYPES[os.environ.get("BENCH_DTYPE", "float32" if DEVICE == "cpu" else "bfloat16")]
PROVIDERS = os.environ.get("BENCH_PROVIDERS", "reference,compile,cpp,triton").split(",")
MODES = os.environ.get("BENCH_MODES", "fwd,fwd+bwd").split(",")

CASES = [pytest.param(spec, shape, provider, mode, id=f"{spec.name}-{C.shape_str(shape).replace(' ', '_')}-"
                      f"{provider}-{mode}")
         for spec in C.all_specs() for shape in spec.shapes[REGIME] for provider in PROVIDERS for mode in MODES]


@pytest.mark.parametrize("spec,shape,provider,mode", CASES)
def test_bench(benchmark, spec, shape, provider, mode):
    try:
        fn = C.build_provider(spec, provider, shape, DTYPE, DEVICE)
    except C.Skip as e:
        pytest.skip(str(e))
    inp = spec.make(shape, DTYPE, DEVICE)
    call = mode_callable(fn, inp, mode)
    call()                                                    # warm-up (compile, autotune)

    def run():
        out = call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    benchmark.extra_info.update(op=spec.name, shape=shape, provider=provider, mode=mode, device=DEVICE,
                                dtype=str(DTYPE).replace("torch.", ""),
                                flops=spec.flops(shape, mode) if spec.flops else None)
    benchmark(run)
