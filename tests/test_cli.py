"""The contrastgen command: --version, env, python -m contrastgen, demo listing, plain help, usage on no command;
lazy submodule attributes of ``import contrastgen``."""
import json
import os
import re
import subprocess
import sys

import pytest

import contrastgen
from contrastgen.cli import DEMOS, main

MARKUP = re.compile(r"``|:func:|:class:|:mod:|:data:|\*\*")


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "contrastgen", *args], capture_output=True, text=True, timeout=180,
                          **kw)


def test_version_and_python_m():
    p = _run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"contrastgen {contrastgen.__version__}"


def test_no_command_exits_nonzero_with_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: contrastgen") and "bench" in err
    p = _run()
    assert p.returncode == 2 and "usage: contrastgen" in p.stderr
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["demo", "--help"], ["env", "--help"],
                                  ["bench", "report", "--help"]])
def test_help_is_plain_text(args, capsys):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("usage:"), out[:200]
    assert not MARKUP.search(out), MARKUP.search(out).group(0)


def test_demo_help_lists_every_demo(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for name, (desc, _) in DEMOS.items():
        assert name in out and desc in out
    assert main(["demo"]) == 2
    assert "dispersive" in capsys.readouterr().err


def test_env_reports_versions_cpu_cuda_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"contrastgen {contrastgen.__version__}" in out
    assert "torch " in out and "CPU:" in out and "CUDA:" in out and "C++ build:" in out
    for op in ("clip_loss", "dispersive_loss", "patch_nce", "alignment"):
        assert re.search(rf"^\s+{op}\s", out, re.M), op
    assert re.search(r"^\s+alignment\s+torch reference only", out, re.M)   # and why, for ops without a kernel
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["alignment"]["kernel_op"] is None
    assert set(info["cpp_build"]) >= {"build", "loaded", "why_not", "cpu_features"}


def test_env_explains_a_missing_extension(tmp_path):
    """Without the compiled files the report says why (here: no build record, no compiled file)."""
    code = ("import contrastgen.ops._backends as B, pathlib; B._PKG_DIR = pathlib.Path(%r); B._LOADED.clear(); "
            "B._WHY_NOT.clear(); print(B.cpp_extension('infonce')); print(B._WHY_NOT['infonce'])" % str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "None" in p.stdout and "not built" in p.stdout and "CONTRASTGEN_SKIP_CPP" not in p.stdout
    (tmp_path / "_build_info.json").write_text(json.dumps({"extensions": {"_cpp_infonce_avx2": {
        "status": "failed", "error": "csrc/infonce.cpp:1:10: fatal error: pybind11/numpy.h: No such file",
        "log": "_build_logs/_cpp_infonce_avx2.log"}}}))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "failed to compile at install time" in p.stdout and "fatal error: pybind11/numpy.h" in p.stdout
    assert "_build_logs/_cpp_infonce_avx2.log" in p.stdout


def test_forced_cpu_variant(monkeypatch):
    code = ("import contrastgen.ops._backends as B; from contrastgen.ops import _cpp_infonce as C; "
            "print(B.cpp_build_info()['loaded']['infonce'], C.PRODUCT)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CONTRASTGEN_CPU_VARIANT": "avx2"})
    if "no such build" in p.stdout + p.stderr or p.returncode != 0:
        pytest.skip(f"no avx2 build here: {p.stdout} {p.stderr[-300:]}")
    assert p.stdout.split() == ["avx2", "blas"]


def test_lazy_submodules():
    code = ("import sys, contrastgen as cg; assert 'contrastgen.methods' not in sys.modules; "
            "assert 'contrastgen.bench' not in sys.modules; "
            "print(cg.nn.ClipLoss.__name__, cg.methods.__name__, cg.distributed.__name__, cg.bench.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ClipLoss", "contrastgen.methods", "contrastgen.distributed", "contrastgen.bench"]
    with pytest.raises(AttributeError):
        contrastgen.no_such_thing  # noqa: B018
    assert {"nn", "methods", "distributed", "backend_for"} <= set(dir(contrastgen))


def test_optional_dependency_error_names_the_extra():
    from contrastgen._optional import require
    with pytest.raises(ImportError, match=r"contrastgen\[methods\]"):
        require("no_such_module_xyz", extra="methods", what="a test")
