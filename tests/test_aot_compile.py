"""Every shipped Triton configuration (``AOT_CONFIGS`` of each module in ``contrastgen.kernels``) compiles ahead of
time for sm_80 and sm_90a, with the CI's Triton and with Triton 3.6 (the GPU machines'), on this CPU machine:
zero register spills, shared memory within the architecture's limit, every product of a 16-bit sm_90 config on
wgmma (HGMMA, no HMMA), and no acquire/release atomics (no ``atom.acq_rel`` in the PTX, no MEMBAR.GPU /
CCTL.IVALL in the SASS).

The interpreter (TRITON_INTERPRET=1, set by conftest.py) hides compile errors and cannot compile, so the
compilation runs in one subprocess per (Triton, architecture) without TRITON_INTERPRET, all four in parallel.
Triton 3.6 is unpacked from its wheel into the test's cache (``~/.cache/contrastgen_aot/triton-3.6.0``, never over
the CI's Triton); the tests for it are skipped, with the reason, where the wheel cannot be downloaded.  Triton's
caches and the statistics cache (``~/.cache/contrastgen_aot``) make repeated runs take seconds.
"""
import importlib
import importlib.util
import pkgutil

import pytest
import torch

pytest.importorskip("triton")
if importlib.util.find_spec("triton.backends.nvidia") is None:  # pragma: no cover
    pytest.skip("triton has no NVIDIA backend (ptxas) here", allow_module_level=True)

from contrastgen.kernels import _aot  # noqa: E402

VERSIONS = ("ci", _aot.GPU_TRITON)
MATRIX = [(v, a) for v in VERSIONS for a in _aot.ARCHS]


def _kernel_modules():
    import contrastgen.kernels as pkg
    return [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "roofline"]


@pytest.fixture(scope="module")
def reports():
    return _aot.run_matrix(_aot.ARCHS, ("", _aot.GPU_TRITON))


def _rows(reports, version, arch):
    rows = reports[(version, arch)]
    if isinstance(rows, str):
        pytest.skip(f"Triton {version}: {rows}")
    return rows


def test_every_kernel_module_ships_aot_configs():
    mods = _kernel_modules()
    assert "infonce" in mods
    for name in mods:
        mod = importlib.import_module(f"contrastgen.kernels.{name}")
        cfgs = getattr(mod, "AOT_CONFIGS", None)
        assert cfgs, f"contrastgen.kernels.{name} has no AOT_CONFIGS"
        assert all(isinstance(c, _aot.AotConfig) for c in cfgs)
        assert all(set(c.archs) <= set(_aot.ARCHS) for c in cfgs)


# ----------------------------------------------------------------------------------------------- the launches
class _Recorder:
    """Stands in for a @triton.jit kernel: records the specialization of every launch, then launches it."""

    def __init__(self, fn, seen):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = list(self.fn.arg_names)
            ptr = next((a.dtype for n, a in zip(names, args) if n in ("q_ptr", "rec_ptr")), None)
            cx = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
            cx["UPCAST"] = False if "UPCAST" in cx else None
            self.seen.add((self.fn.__name__, str(ptr), tuple(sorted((k, v) for k, v in cx.items() if v is not None)),
                           kw.get("num_warps", 4), kw.get("num_stages", 1)))
            return self.fn[grid](*args, **kw)
        return launch


_DT = {"*bf16": "torch.bfloat16", "*fp16": "torch.float16", "*fp32": "torch.float32"}


def _aot_keys(mod, arch, dtype):
    keys = set()
    for c in mod.AOT_CONFIGS:
        if arch not in c.archs:
            continue
        ptr = c.signature.get("q_ptr", c.signature.get("rec_ptr"))
        if c.kernel_path.endswith("_infonce_merge_kernel"):
            ptr = "*fp32"
        elif _DT.get(ptr) != str(dtype):
            continue
        keys.add((c.kernel_path.split(":")[1], _DT[ptr], tuple(sorted(c.constexprs.items())), c.num_warps,
                  c.num_stages))
    return keys


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
def test_infonce_aot_configs_are_the_launched_specializations(arch, monkeypatch):
    """Run the benchmark cases' calls (benches/cases.py: clip_loss, siglip_loss, nt_xent, info_nce diagonal / supcon /
    pml / bank) through the launchers, with this architecture's GPU tiles under the interpreter, record every kernel
    specialization they build, and compare with AOT_CONFIGS: exactly the same set (bf16, D multiple of 16)."""
    import contrastgen
    K = importlib.import_module("contrastgen.kernels.infonce")
    monkeypatch.setattr(K, "INTERPRET_WITH_GPU_CONFIGS", arch)
    seen = set()
    for name in ("_infonce_fwd_kernel", "_infonce_bwd_kernel", "_infonce_pml_kernel", "_infonce_merge_kernel",
                 "_siglip_fwd_kernel", "_siglip_bwd_kernel"):
        monkeypatch.setattr(K, name, _Recorder(getattr(K, name), seen))
    g = torch.Generator().manual_seed(0)
    n, d, dt = 136, 64, torch.bfloat16
    x = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dt).requires_grad_()  # noqa: E731
    lab = torch.arange(n) % (n // 4)
    losses = [
        contrastgen.clip_loss(x(n, d), x(n, d), torch.tensor(14.3), backend="triton"),
        contrastgen.siglip_loss(x(n, d), x(n, d), torch.tensor(10.0), torch.tensor(-10.0), backend="triton"),
        contrastgen.nt_xent(x(n, d), x(n, d), temperature=0.5, backend="triton"),
        contrastgen.info_nce(x(n, d), x(n, d), temperature=0.07, backend="triton"),
        contrastgen.info_nce(x(n, d), labels=lab, positives="supcon", temperature=0.1, backend="triton"),
        contrastgen.info_nce(x(n, d), labels=lab, positives="pml", temperature=0.1, backend="triton"),
        contrastgen.info_nce(x(n, d), x(n, d), negatives=x(300, d).detach(), temperature=0.07, backend="triton"),
    ]
    torch.autograd.backward([lo.float() for lo in losses])
    want = _aot_keys(K, arch, dt) | _aot_keys(K, arch, "merge")
    missing = seen - want
    assert not missing, "launched but not in AOT_CONFIGS:\n" + "\n".join(map(str, sorted(missing)))
    # listed beyond the benchmark shapes, for the CUDA tests: the odd-D pointer tiles (TMA=False) and the merge of
    # the column records between row chunks (FINAL=False, problems larger than the workspace)
    extra = {k for k in want if ("TMA", False) in k[2] or ("FINAL", False) in k[2]}
    unused = {k for k in want if k[1] == str(dt) or k[0] == "_infonce_merge_kernel"} - seen - extra
    assert not unused, "in AOT_CONFIGS (bf16) but never launched by the benchmark cases:\n" + "\n".join(
        map(str, sorted(unused)))


# ----------------------------------------------------------------------------------------------- compile results
@pytest.mark.parametrize("version,arch", MATRIX, ids=lambda x: str(x))
def test_all_configs_compile_without_spills(reports, version, arch):
    rows = _rows(reports, version, arch)
    expected = sum(sum(arch in c.archs for c in getattr(importlib.import_module(f"contrastgen.kernels.{m}"),
                                                          "AOT_CONFIGS", []))
                   for m in _kernel_modules())
    assert len(rows) == expected
    errors = [f"{r['module']} {r['config']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    spills = [f"triton {r['triton']} sm_{arch} {r['config']}: {r['spill_bytes']} spill bytes ({r['registers']} registers)"
              for r in rows if r["spill_bytes"] > 0]
    assert not spills, "\n".join(spills)
    limit = _aot.SMEM_LIMIT[arch]
    over = [f"{r['config']}: {r['shared_mem']} B shared > {limit}" for r in rows if r["shared_mem"] > limit]
    assert not over, "\n".join(over)
    assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.parametrize("version", VERSIONS)
def test_sm90_16bit_products_are_wgmma(reports, version):
    """Every tl.dot of every 16-bit sm_90 config is a wgmma (HGMMA): none fell back to mma.sync (HMMA)."""
    rows = _rows(reports, version, 90)
    bad = [f"{r['config']}: {r['sass']['counts'].get('HMMA', 0)} HMMA, {r['sass']['counts'].get('HGMMA', 0)} HGMMA"
           for r in rows if "error" not in r and any(t in ("*bf16", "*fp16") for t in r["signature"].values())
           and r["sass"]["counts"].get("HMMA", 0) > 0]
    assert not bad, "\n".join(bad)
    with_dots = [r for r in rows if "error" not in r and r["sass"]["counts"].get("HGMMA", 0) > 0]
    assert with_dots  # the check saw the tensor-core kernels


@pytest.mark.parametrize("version,arch", MATRIX, ids=lambda x: str(x))
def test_no_acquire_release_atomics(reports, version, arch):
    """Atomics are relaxed where any remain: no acq_rel / acquire / release atom or red in the PTX, and no ATOM / RED
    wrapped in the device-wide fences they turn into (MEMBAR.*.GPU, CCTL.IVALL) in the SASS."""
    rows = _rows(reports, version, arch)
    bad = [f"{r['config']}: PTX fenced atomics {r['fenced_atomics']}, SASS fenced atomics "
           f"{r['sass']['counts'].get('fenced_atomics', 0)} (MEMBAR.GPU {r['sass']['counts'].get('MEMBAR.GPU', 0)}, "
           f"CCTL.IVALL {r['sass']['counts'].get('CCTL.IVALL', 0)})"
           for r in rows if "error" not in r and (r["fenced_atomics"] or r["sass"]["counts"].get("fenced_atomics", 0))]
    assert not bad, "\n".join(bad)


def test_fenced_atomic_detection():
    """The PTX / SASS checks see what they are meant to see (tl.atomic_add's default sem is acq_rel)."""
    ptx = ("\t@%p1 atom.global.gpu.acq_rel.add.v4.f32 {%r1, %r2}, [%rd1], {%r3, %r4};\n"
           "\tred.global.gpu.relaxed.add.f32 [%rd2], %r5;\n\tatom.global.relaxed.gpu.add.f32 %r6, [%rd3], %r7;\n")
    assert _aot.ptx_fenced_atomics(ptx) == 1
    sass = ("        /*0010*/                   MEMBAR.ALL.GPU ;        /* 0x0 */\n"
            "        /*0020*/                   CCTL.IVALL ;            /* 0x0 */\n"
            "        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;   /* 0x0 */\n"
            "        /*0040*/              @!P0 BRA 0x10 ;              /* 0x0 */\n")
    s = _aot.sass_summary(sass)
    assert s["counts"]["MEMBAR.GPU"] == 1 and s["counts"]["CCTL.IVALL"] == 1 and s["counts"]["HGMMA"] == 1
    assert s["counts"]["fenced_atomics"] == 0   # no atomic next to the fences
    fenced = _aot.sass_summary(sass.replace("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24", "RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5"))
    assert fenced["counts"]["fenced_atomics"] == 1
    assert s["loops"][0]["start"] == 0x10 and s["loops"][0]["end"] == 0x40 and s["hgmma_shapes"] == ["64x128x16"]
