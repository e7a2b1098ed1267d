"""Dispatch that explains itself: backend_for, CONTRASTGEN_BACKEND (per device), fallback warnings pointing at the
caller, reference-only ops, logging once per (op, device, backend), and the default's shape rule (crossover)."""
import json
import logging
import warnings

import pytest
import torch

import contrastgen as cg
from contrastgen import nn as cnn
from contrastgen.ops import _backends, _crossover, _dispatch


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ("CONTRASTGEN_BACKEND", "CONTRASTGEN_CROSSOVER", "CONTRASTGEN_DENSE_MAX_BYTES", "CONTRASTGEN_LOG"):
        monkeypatch.delenv(var, raising=False)
    _dispatch._WARNED.clear()
    _dispatch._LOGGED.clear()
    cg.set_crossover(None)                      # shape rule off unless a test sets one
    yield
    cg.set_crossover("default")
    _dispatch._WARNED.clear()


def _no_cpp(monkeypatch, why="the C++ extension is not built (test)"):
    monkeypatch.setitem(_backends.PROBES, "cpp", lambda op: (False, why))


def _x(n=6, d=5):
    return torch.randn(n, d)


def _ours(w):
    return [x for x in w if "contrastgen" in str(x.message)]


# ------------------------------------------------------------------------------------------- backend_for
def test_backend_for_reports_choice_and_reason():
    a, b = _x(), _x()
    c = cg.backend_for("clip_loss", a, b)
    assert (c.backend, c.source, c.op, c.kernel_op) == ("cpp", "default", "clip_loss", "infonce")
    assert "clip_loss" in str(c) and "cpp" in str(c)
    assert cg.backend_for("clip_loss", a, b, backend="torch").source == "argument"
    r = cg.backend_for("alignment", a, b)
    assert (r.backend, r.source) == ("torch", "reference-only")
    r = cg.backend_for("patch_nce", [torch.randn(1, 4, 3)], [torch.randn(1, 4, 3)])
    assert (r.backend, r.source, r.kernel_op) == ("cpp", "default", "patch_nce")   # fused since issue 10
    with pytest.raises(ValueError, match="unknown op"):
        cg.backend_for("no_such_loss", a)


def test_backend_for_never_warns(monkeypatch):
    _no_cpp(monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = cg.backend_for("info_nce", _x(), _x())
    assert c.backend == "torch" and c.source == "fallback" and "not built" in c.reason
    assert not _ours(w)


# ------------------------------------------------------------------------------------------- warnings
def test_fallback_warning_names_public_op_and_points_at_caller(monkeypatch):
    _no_cpp(monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cg.siglip_loss(_x(), _x(), 10.0, -10.0)
        cg.siglip_loss(_x(), _x(), 10.0, -10.0)
    ours = _ours(w)
    assert len(ours) == 1                                                  # once
    assert "contrastgen.siglip_loss" in str(ours[0].message) and "falls back" in str(ours[0].message)
    assert ours[0].filename == __file__


def test_warning_through_module_and_distributed_wrapper_points_at_caller(monkeypatch):
    _no_cpp(monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cnn.ClipLoss()(_x(), _x(), 10.0)                                  # nn.Module.__call__ -> forward -> ops
    ours = _ours(w)
    assert len(ours) == 1 and ours[0].filename == __file__, [(x.filename, x.lineno) for x in ours]
    _dispatch._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cnn.DispersiveLoss()(torch.randn(4, 9))
    assert [x.filename for x in _ours(w)] == [__file__]


def test_reference_only_ops_do_not_warn():
    maps = torch.rand(4, 4, 77)
    p = torch.randn(1, 5, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cg.alignment(_x(), _x())
        cg.patch_nce(p, p.flip(1))
        cg.attention_nce(maps, [[2, 3]])
    assert not _ours(w)


def test_reference_only_is_read_from_the_table(monkeypatch):
    """A row that gains a cpp launcher stops being reference-only: if it cannot run, the default warns."""
    monkeypatch.setitem(_backends.BACKEND_TABLE, "patch_nce", {"cpp": lambda: None})
    monkeypatch.setitem(_backends.CPP_EXTENSION, "patch_nce", "patchnce_test_missing")
    p = torch.randn(1, 5, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("patch_nce", None, torch.device("cpu"), api="patch_nce") == "torch"
    assert len(_ours(w)) == 1 and "contrastgen.patch_nce" in str(_ours(w)[0].message)
    del p


# ------------------------------------------------------------------------------------------- CONTRASTGEN_BACKEND
def test_env_per_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "cuda:triton,cpu:torch")
    assert _dispatch.resolve_backend("infonce", None, cpu) == "torch"
    assert cg.backend_for("clip_loss", _x(), _x()).source == "CONTRASTGEN_BACKEND"
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "cuda:triton")                   # nothing for cpu: the default
    assert _dispatch.resolve_backend("infonce", None, cpu) == "cpp"
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "CPU:cpp, cuda:auto")
    assert _dispatch.resolve_backend("infonce", None, cpu) == "cpp"
    assert _dispatch.parse_env("cuda:triton,cpu:cpp") == {"cuda": "triton", "cpu": "cpp"}
    assert _dispatch.parse_env("torch") == {"*": "torch"}


def test_env_that_cannot_run_falls_back_with_warning_naming_the_variable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)                       # Triton cannot run CPU tensors
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "triton")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = cg.clip_loss(_x(), _x(), 10.0)
    ours = _ours(w)
    assert len(ours) == 1 and "CONTRASTGEN_BACKEND='triton'" in str(ours[0].message)
    assert ours[0].filename == __file__
    assert torch.isfinite(got)
    assert _dispatch.resolve_backend("infonce", None, torch.device("cpu")) == "cpp"    # the default instead
    with pytest.raises(ValueError, match="triton"):                                 # explicit still raises
        cg.clip_loss(_x(), _x(), 10.0, backend="triton")


def test_env_cpp_not_built_falls_back_to_reference(monkeypatch):
    _no_cpp(monkeypatch)
    monkeypatch.setenv("CONTRASTGEN_BACKEND", "cpu:cpp")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("infonce", None, torch.device("cpu"), api="info_nce") == "torch"
    assert any("CONTRASTGEN_BACKEND" in str(x.message) for x in _ours(w))


@pytest.mark.parametrize("value", ["garbage", "cpu:garbage", "cpu=cpp", "cpu:cpp,cpu:torch"])
def test_env_garbage_raises_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("CONTRASTGEN_BACKEND", value)
    with pytest.raises(ValueError, match="CONTRASTGEN_BACKEND"):
        cg.clip_loss(_x(), _x(), 10.0)


# ------------------------------------------------------------------------------------------- logging
def test_logs_each_dispatch_once(caplog):
    with caplog.at_level(logging.DEBUG, logger="contrastgen"):
        for _ in range(3):
            cg.clip_loss(_x(), _x(), 10.0)
            cg.clip_loss(_x(), _x(), 10.0, backend="torch")
    msgs = [r.getMessage() for r in caplog.records if r.name == "contrastgen"]
    assert len(msgs) == 2, msgs
    assert any("clip_loss on cpu: cpp" in m for m in msgs) and any("clip_loss on cpu: torch" in m for m in msgs)


def test_contrastgen_log_env_prints_to_stderr(tmp_path):
    import subprocess
    import sys
    code = "import torch, contrastgen as cg; cg.uniformity(torch.randn(5, 3)); cg.uniformity(torch.randn(5, 3))"
    p = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "CONTRASTGEN_LOG": "1"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "dispatch" in ln]
    assert len(lines) == 1 and "uniformity on cpu" in lines[0], p.stderr


# ------------------------------------------------------------------------------------------- the shape rule
def test_crossover_picks_dense_below_threshold_and_honours_explicit_backend():
    cg.set_crossover(op="clip_loss", device="cpu", pairs_below=100 * 100)
    small, big = _x(50, 8), _x(200, 8)
    c = cg.backend_for("clip_loss", small, small)
    assert (c.backend, c.source) == ("torch", "shape rule") and "2500 pairs" in c.rule
    c = cg.backend_for("clip_loss", big, big)
    assert c.backend == "cpp" and "40000 pairs >= crossover" in c.rule
    assert cg.backend_for("clip_loss", small, small, backend="cpp").backend == "cpp"
    assert cg.backend_for("info_nce", small, small).backend == "cpp"              # other ops keep their rule
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.testing.assert_close(cg.clip_loss(small, small, 10.0), cg.clip_loss(small, small, 10.0, backend="cpp"))
    assert not _ours(w)                                                         # the shape rule is silent


def test_crossover_memory_budget_bounds_the_dense_path():
    cg.set_crossover(op="clip_loss", device="cpu", pairs_below=10**9, dense_max_bytes=4 * 100 * 100)
    try:
        assert cg.backend_for("clip_loss", _x(100, 4), _x(100, 4)).backend == "torch"
        c = cg.backend_for("clip_loss", _x(101, 4), _x(101, 4))
        assert c.backend == "cpp" and "budget" in c.rule
    finally:
        cg.set_crossover("default")


def test_crossover_env_file_and_off(monkeypatch, tmp_path):
    doc = {"schema": _crossover.SCHEMA, "rules": {"nt_xent": {"cpu": {"points": [{"dim": 8, "pairs_below": 10**4},
                                                                                  {"dim": 512, "pairs_below": 100}]}}}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    cg.set_crossover("default")
    monkeypatch.setenv("CONTRASTGEN_CROSSOVER", str(path))
    assert cg.backend_for("nt_xent", _x(20, 8), _x(20, 8)).backend == "torch"     # (2*20)^2 = 1600 < 1e4
    assert cg.backend_for("nt_xent", _x(20, 512), _x(20, 512)).backend == "cpp"   # 1600 >= 100 at dim 512
    mid = _crossover.threshold("nt_xent", "cpu", 64)                             # log-log interpolation
    assert 100 < mid < 10**4
    monkeypatch.setenv("CONTRASTGEN_CROSSOVER", "off")
    assert cg.backend_for("nt_xent", _x(20, 8), _x(20, 8)).backend == "cpp"
    monkeypatch.setenv("CONTRASTGEN_CROSSOVER", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="CONTRASTGEN_CROSSOVER"):
        cg.backend_for("nt_xent", _x(20, 8), _x(20, 8))


def test_packaged_crossover_data_covers_the_measured_ops():
    doc = json.loads(_crossover.DATA_FILE.read_text())
    assert doc["schema"] == _crossover.SCHEMA
    for op in ("clip_loss", "info_nce", "siglip_loss", "nt_xent", "dispersive_loss", "uniformity"):
        pts = doc["rules"][op]["cpu"]["points"]
        assert pts and all(p["pairs_below"] >= 0 and p["dim"] > 0 for p in pts), op
    assert doc["meta"]["cpu"]["load_average"], "the load of the measurement is recorded"


def test_shape_rule_under_torch_compile_fullgraph():
    cg.set_crossover(op="clip_loss", device="cpu", pairs_below=30 * 30)
    f = torch.compile(lambda a, b: cg.clip_loss(a, b, 10.0), fullgraph=True, backend="eager")
    for n in (20, 40):
        a = _x(n, 8)
        torch.testing.assert_close(f(a, a), cg.clip_loss(a, a, 10.0, backend="torch"))
