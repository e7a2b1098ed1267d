"""contrastgen: builds one pybind11 extension per csrc/*.cpp file as contrastgen._cpp_<stem>.

CONTRASTGEN_SKIP_CPP=1 (or a failing compiler) gives a pure-Python install whose CPU ops fall
back to the PyTorch reference with a one-time warning."""
import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler, no OpenMP, ...
            print(f"contrastgen: C++ extensions not built ({e}); CPU ops will use the PyTorch reference", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"contrastgen: extension {ext.name} not built ({e})", file=sys.stderr)


def extensions():
    if os.environ.get("CONTRASTGEN_SKIP_CPP") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("contrastgen: pybind11 missing; C++ extensions not built", file=sys.stderr)
        return []
    exts = []
    for src in sorted(glob.glob("csrc/*.cpp")):
        stem = os.path.splitext(os.path.basename(src))[0]
        exts.append(Pybind11Extension(
            f"contrastgen._cpp_{stem}", [src], include_dirs=["csrc"], cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-march=native"] if sys.platform == "linux" else ["-O3"],
            extra_link_args=["-fopenmp"] if sys.platform == "linux" else [],
        ))
    return exts


setup(
    name="contrastgen",
    version="0.1.0",
    description="Fused Triton (GPU) and C++ (CPU) kernels for contrastive losses in generative-model research",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["contrastgen", "contrastgen.*"]) + ["contrastgen.kernels"],
    package_dir={"contrastgen.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=["torch>=2.4", "numpy", "tqdm", "triton>=3.6; platform_system=='Linux'"],
    extras_require={
        "methods": ["diffusers>=0.30", "transformers>=4.40", "timm>=1.0", "scikit-learn"],
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "open-clip-torch",
                "pytorch-metric-learning", "scikit-learn"],
        "bench": ["matplotlib", "pykeops", "inf-cl"],
    },
    entry_points={"console_scripts": ["contrastgen=contrastgen.cli:main"]},
)
