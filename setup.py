"""contrastgen's C++ extensions (the package metadata is in pyproject.toml).

Each csrc/<name>.cpp is compiled into portable variants, ``contrastgen._cpp_<name>_<variant>``:

    avx512   -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma   (x86-64; the AVX-512 micro-kernel)
    avx2     -mavx2 -mfma                                              (x86-64)
    generic  no ISA flags                                              (other architectures)
    native   -march=native          only with CONTRASTGEN_NATIVE=1 (then the only variant: not portable)

and ``contrastgen/ops/_backends.py`` picks one at import from the CPU's features, so a wheel built on one
machine runs (and keeps its AVX-512 speed) on another.  No ``-march=native`` unless asked for.

CONTRASTGEN_SKIP_CPP=1 gives a pure-Python install (CPU ops then use the PyTorch reference).  A variant that
fails to compile does not fail the install: its compiler output is kept in ``contrastgen/_build_logs/`` and
``contrastgen/_build_info.json`` records what was built, so the run-time warning can say why."""
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

VARIANT_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
    "native": ["-march=native"],
}
BUILD_INFO = "_build_info.json"
BUILD_LOGS = "_build_logs"


def variants():
    if os.environ.get("CONTRASTGEN_NATIVE") == "1":
        return ["native"]
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
        return ["avx512", "avx2"]
    return ["generic"]


def skip_reason():
    if os.environ.get("CONTRASTGEN_SKIP_CPP") == "1":
        return "CONTRASTGEN_SKIP_CPP=1 was set at build time"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 was not installed in the build environment"
    return None


def extensions():
    if skip_reason():
        print(f"contrastgen: C++ extensions not built ({skip_reason()})", file=sys.stderr)
        return []
    from pybind11.setup_helpers import Pybind11Extension
    openmp = ["-fopenmp"] if sys.platform == "linux" else []
    exts = []
    for src in sorted(glob.glob("csrc/*.cpp")):
        stem = os.path.splitext(os.path.basename(src))[0]
        for v in variants():
            ext = Pybind11Extension(f"contrastgen._cpp_{stem}_{v}", [src], include_dirs=["csrc"], cxx_std=17,
                                    extra_compile_args=["-O3", "-Wno-psabi"] + openmp + VARIANT_FLAGS[v], extra_link_args=openmp)
            ext.cg_variant, ext.cg_source = v, src
            exts.append(ext)
    return exts


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def _write_info(pkg_dir, info):
    os.makedirs(pkg_dir, exist_ok=True)
    with open(os.path.join(pkg_dir, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1)


def _base_info():
    return {"schema": 1, "skipped": skip_reason(), "native": os.environ.get("CONTRASTGEN_NATIVE") == "1",
            "variants": variants(), "platform": platform.platform(), "python": platform.python_version(),
            "git_commit": _git_commit(), "extensions": {}}


class BuildPy(build_py):
    """Records the build's outcome when no extension is built at all (CONTRASTGEN_SKIP_CPP=1, no pybind11)."""

    def run(self):
        super().run()
        if not self.distribution.ext_modules:
            _write_info(os.path.join(self.build_lib, "contrastgen"), _base_info())


class OptionalBuildExt(build_ext):
    """Builds every variant it can; a failure is recorded (compiler output kept) instead of failing the install."""

    def run(self):
        self._info = _base_info()
        try:
            super().run()
        except Exception as e:  # no compiler at all, ...
            print(f"contrastgen: C++ extensions not built ({e}); CPU ops will use the PyTorch reference",
                  file=sys.stderr)
            self._info["error"] = f"{type(e).__name__}: {e}"
        # next to the installed extensions (an in-place build builds in build/ first, then copies: not yet there)
        pkg_dir = os.path.dirname(self.get_ext_fullpath("contrastgen._probe"))
        for rec in self._info["extensions"].values():
            text = rec.pop("log_text", None)
            if text is not None:
                os.makedirs(os.path.join(pkg_dir, BUILD_LOGS), exist_ok=True)
                with open(os.path.join(pkg_dir, rec["log"]), "w") as f:
                    f.write(text)
        _write_info(pkg_dir, self._info)

    def build_extension(self, ext):
        short = ext.name.rsplit(".", 1)[-1]
        rec = {"variant": getattr(ext, "cg_variant", None), "source": getattr(ext, "cg_source", None),
               "flags": list(ext.extra_compile_args)}
        # The compiler writes its diagnostics to the inherited stdout/stderr: send both file descriptors to a
        # file for the duration of the build, then echo it back (and keep it if the build failed).
        with tempfile.TemporaryFile(mode="w+b") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            err = None
            try:
                super().build_extension(ext)
            except Exception as e:
                err = e
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
        sys.stderr.write(text)
        if err is None:
            rec["status"] = "built"
        else:
            lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or [str(err)]
            rec.update(status="failed", error=lines[0][:500])
            rec.update(log=f"{BUILD_LOGS}/{short}.log", log_text=f"# {ext.name}: {type(err).__name__}: {err}\n"
                       + text[-20000:])
            rel = rec["log"]
            print(f"contrastgen: extension {ext.name} not built ({err}); compiler output kept in "
                  f"contrastgen/{rel}", file=sys.stderr)
        self._info["extensions"][short] = rec


def packages():
    """contrastgen and its subpackages, plus contrastgen.kernels (the top-level kernels/ folder, see pyproject's
    package-dir; a checkout's contrastgen/kernels symlink must not be needed, e.g. in an sdist)."""
    return sorted(set(find_packages(include=["contrastgen", "contrastgen.*"])) | {"contrastgen.kernels"})


setup(
    packages=packages(),
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPy},
)
