"""Packaging: what a user gets from ``pip install <sdist>`` / ``pip install .`` with build isolation.

The slow tests (marked ``slow``; CI runs them, ``-m "not slow"`` skips them) share one build: an sdist made from
a clean copy of the source tree, a wheel built from that sdist by pip with build isolation (setuptools and
pybind11 come from the package index into the isolated environment), and a throw-away venv that installs the
wheel with ``--no-deps`` and borrows the running interpreter's site-packages for torch & co.  Everything then
runs outside the source tree with PYTHONPATH unset, so the installed wheel is what is imported.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_IGNORE = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "contrastgen-bench",
           "results", "wheels", "_build_logs"}


def _copy_tree(dst: Path) -> Path:
    """The source tree without build artefacts (compiled files, build records, results) and without the
    ``contrastgen/kernels`` convenience symlink of a checkout."""
    def ignore(d, names):
        out = {n for n in names if n in _IGNORE or n.endswith((".so", ".egg-info", ".pyc")) or n == "_build_info.json"}
        return out | {n for n in names if os.path.islink(os.path.join(d, n))}
    shutil.copytree(ROOT, dst, ignore=ignore)
    (dst / "benches" / "results").mkdir(exist_ok=True)
    return dst


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "CONTRASTGEN_BACKEND")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd, cwd, timeout=900, env=None, check=True):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or _clean_env())
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    src = _copy_tree(base / "src")
    dist = base / "dist"
    dist.mkdir()
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"], src)
    sdist = next(dist.glob("contrastgen-*.tar.gz"))
    # the wheel from the sdist, with build isolation (pip's default): proves the sdist builds on its own
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(sdist)], base, timeout=1500)
    wheel = next(dist.glob("contrastgen-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip())
    (site / "_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")    # torch, numpy, pip, pytest ...
    _run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", str(wheel)], base)
    extracted = base / "sdist"
    with tarfile.open(sdist) as tf:
        tf.extractall(extracted, filter="data")
    return {"base": base, "sdist": sdist, "wheel": wheel, "venv": venv, "py": py, "site": site,
            "sdist_root": next(extracted.iterdir())}


@pytest.mark.slow
def test_sdist_carries_sources_tests_and_kernels(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in ("pyproject.toml", "setup.py", "LICENSE", "README.md", "MANIFEST.in", "csrc/infonce.cpp",
                 "csrc/dispersive.cpp", "kernels/infonce.py", "kernels/dispersive.py", "tests/conftest.py",
                 "tests/test_packaging.py", "tests/_tolerance.py", "contrastgen/py.typed", "contrastgen/ops/crossover.json",
                 "contrastgen/bench/run.py", "benches/gpu.sh", "benches/report.py", "requirements/cpu.txt"):
        assert need in names, need
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_info.json") or "/results/" in n]


@pytest.mark.slow
def test_wheel_contains_the_portable_extensions(built):
    wheel = built["wheel"]
    assert not wheel.name.endswith("py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = json.loads(z.read("contrastgen/_build_info.json"))
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    import platform
    variants = ["avx512", "avx2"] if platform.machine() in ("x86_64", "AMD64") else ["generic"]
    for ext in ("infonce", "dispersive"):
        for v in variants:
            assert any(n.startswith(f"contrastgen/_cpp_{ext}_{v}.") and n.endswith(".so") for n in names), (ext, v)
    assert all(rec["status"] == "built" for rec in info["extensions"].values()), info
    assert not info["native"] and not any("-march=native" in f for r in info["extensions"].values() for f in r["flags"])
    for need in ("contrastgen/py.typed", "contrastgen/ops/crossover.json", "contrastgen/kernels/infonce.py",
                 "contrastgen/bench/cases.py"):
        assert need in names, need
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for field in ("License-Expression: MIT", "Requires-Python: >=3.10", "Project-URL: Source",
                  "Provides-Extra: methods", "Provides-Extra: dev", "Provides-Extra: bench"):
        assert field in meta, field
    assert 'Requires-Dist: timm>=1.0; extra == "methods"' in meta


@pytest.mark.slow
def test_installed_wheel_runs_bench_outside_the_source_tree(built, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    exe = built["venv"] / "bin" / "contrastgen"
    p = _run([str(exe), "bench", "--quick", "--op", "clip_loss", "--threads", "1", "--no-progress"], work,
             timeout=900)
    out = list((work / "contrastgen-bench").glob("*.json"))
    assert len(out) == 1, p.stdout[-2000:]
    doc = json.loads(out[0].read_text())
    assert doc["schema_version"] == 2
    cpp = [r for r in doc["results"] if r["provider"] == "cpp" and r["status"] == "ok"]
    assert cpp, [r for r in doc["results"] if r["provider"] == "cpp"]
    assert doc["meta"]["cpp_build"]["loaded"]["infonce"] in ("avx512", "avx2", "generic")
    assert doc["meta"]["git_commit"] in ("", None) or len(doc["meta"]["git_commit"]) == 40
    where = _run([str(built["py"]), "-c", "import contrastgen; print(contrastgen.__file__)"], work).stdout
    assert where.startswith(str(built["site"])), where
    assert _run([str(exe), "--version"], work).stdout.strip().startswith("contrastgen ")


@pytest.mark.slow
def test_installed_warnings_point_at_the_callers_file(built, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import warnings, torch, contrastgen as cg
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cg.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0)          # CONTRASTGEN_BACKEND=triton on CPU
            cg.nn.SigLipLoss()(torch.randn(4, 3), torch.randn(4, 3), 10.0, -10.0)
        for x in w:
            print(x.filename, x.lineno, str(x.message).split(":")[0])
    """))
    p = _run([str(built["py"]), str(script)], tmp_path, env=_clean_env(CONTRASTGEN_BACKEND="triton"))
    lines = [ln.split() for ln in p.stdout.splitlines() if "contrastgen." in ln]
    assert len(lines) == 2, p.stdout + p.stderr
    assert all(ln[0] == str(script) for ln in lines), lines
    assert [ln[2] for ln in lines] == ["contrastgen.clip_loss", "contrastgen.siglip_loss"]


@pytest.mark.slow
def test_tests_from_the_sdist_pass_against_the_installed_wheel(built, tmp_path):
    root = built["sdist_root"]
    p = _run([str(built["py"]), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
              str(root / "tests" / "test_dispatch.py"), str(root / "tests" / "test_nn.py"),
              str(root / "tests" / "test_cli.py")], tmp_path, env=_clean_env(TRITON_INTERPRET="1"), check=False,
             timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout


def test_failed_build_is_recorded_and_explained(tmp_path):
    """A compiler that fails: the install still succeeds, the compiler's error is kept inside the package and the
    run-time warning quotes it (fast: nothing is really compiled)."""
    pytest.importorskip("pybind11")
    src = _copy_tree(tmp_path / "src")
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'csrc/infonce.cpp:1:1: error: simulated compiler failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    p = _run([sys.executable, "setup.py", "build_ext", "--inplace"], src, env=_clean_env(CC=str(fake), CXX=str(fake)),
             check=False, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((src / "contrastgen" / "_build_info.json").read_text())
    recs = info["extensions"]
    assert recs and all(r["status"] == "failed" for r in recs.values())
    rec = next(iter(recs.values()))
    assert "simulated compiler failure" in rec["error"]
    assert "simulated compiler failure" in (src / "contrastgen" / rec["log"]).read_text()
    (src / "contrastgen" / "kernels").symlink_to("../kernels")
    code = ("import warnings, torch, contrastgen as cg\nwarnings.simplefilter('always')\n"
            "cg.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0)\n")
    p = _run([sys.executable, "-c", code], src, env=_clean_env(PYTHONPATH=str(src)))
    assert "failed to compile at install time" in p.stderr and "simulated compiler failure" in p.stderr, p.stderr
    assert "_build_logs" in p.stderr and "CONTRASTGEN_SKIP_CPP" not in p.stderr


def test_skip_cpp_is_recorded(tmp_path):
    src = _copy_tree(tmp_path / "src")
    _run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], src,
         env=_clean_env(CONTRASTGEN_SKIP_CPP="1"), timeout=300)
    info = json.loads((tmp_path / "lib" / "contrastgen" / "_build_info.json").read_text())
    assert info["skipped"] == "CONTRASTGEN_SKIP_CPP=1 was set at build time" and not info["extensions"]


def test_metadata_extras_match_imports():
    """The extras list what the code imports: contrastgen.methods (timm, diffusers, transformers) and its demos
    (scikit-learn, matplotlib); the bench's peers; nothing that no module imports."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    names = {k: {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in v} for k, v in extras.items()}
    assert {"timm", "diffusers", "transformers", "scikit-learn", "matplotlib"} <= names["methods"]
    src = "\n".join(p.read_text() for p in (ROOT / "contrastgen").rglob("*.py"))
    imports = {"timm": "timm", "diffusers": "diffusers", "transformers": "transformers", "scikit-learn": "sklearn", "matplotlib": "matplotlib", "tqdm": "tqdm",
               "open-clip-torch": "open_clip", "pytorch-metric-learning": "pytorch_metric_learning",
               "pykeops": "pykeops", "inf-cl": "inf_cl"}
    for extra in ("methods", "bench"):
        for dist in names[extra]:
            assert imports[dist] in src, (extra, dist)
    assert meta["requires-python"] == ">=3.10" and meta["license"] == "MIT"
    assert {"setuptools>=77", "pybind11>=2.12"} <= set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])
