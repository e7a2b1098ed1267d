"""The ``contrastgen`` command (also ``python -m contrastgen``): bench, demo, env, conform, edit, --version."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Tuple


def _dispersive_demo():
    from .methods import dispersive_demo
    return dispersive_demo


def _conform_demo():
    from .methods import conform_demo
    return conform_demo


def _cut_demo():
    from .methods import cut_demo
    return cut_demo


def _i2i_demo():
    from .methods import i2i_demo
    return i2i_demo


def _unclip_demo():
    from .methods import unclip_demo
    return unclip_demo


def _tulip_demo():
    from .methods import tulip_demo
    return tulip_demo


def _code_demo():
    from .methods import code_demo
    return code_demo


def _dcr_demo():
    from .methods import dcr_demo
    return dcr_demo


def _moco_demo():
    from .methods import moco_demo
    return moco_demo


def _simclr_demo():
    from .methods import simclr_demo
    return simclr_demo


# name -> (one-line description, loader of the module whose main(argv) runs it)
DEMOS: Dict[str, Tuple[str, Callable]] = {
    "dispersive": ("train a small SiT on 8x8 digits without and with Dispersive Loss (CPU; --quick: ~1 min)",
                   _dispersive_demo),
    "conform": ("CONFORM: train a tiny text-conditional UNet on drawn two-shape scenes, generate with and without "
                "CONFORM guidance, score object presence and colour binding", _conform_demo),
    "cut": ("CUT: unpaired translation of 8x8 digits to a restyled domain with and without PatchNCE; content "
            "accuracy and Frechet distance", _cut_demo),
    "i2i": ("pix2pix-zeroCon: edit one attribute of drawn scenes with contrastive-guided DDIM editing on a tiny "
            "trained model; structure preservation and edit success", _i2i_demo),
    "edit": ("alias of i2i", _i2i_demo),
    "unclip": ("DALL-E 2: a tiny two-tower CLIP, then a diffusion prior on its embeddings; retrieval accuracy",
               _unclip_demo),
    "tulip": ("TULIP: SigLIP image-text plus image-image / text-text view terms on a tiny CLIP", _tulip_demo),
    "code": ("CoDE: global-local InfoNCE with shared negatives, real vs fake images", _code_demo),
    "dcr": ("DCR: contrastive loss on a tiny diffusion UNet's predictions (per-anchor negatives)", _dcr_demo),
    "moco": ("MoCo: a queue of momentum-encoder keys as negatives; kNN accuracy", _moco_demo),
    "simclr": ("SimCLR: NT-Xent between two augmented views; kNN accuracy", _simclr_demo),
}

DESCRIPTION = "Fused contrastive losses (Triton on GPU, C++ on CPU): benchmarks, demos and an environment report."
EPILOG = """commands:
  bench [OPTIONS]       benchmark the losses against their references and peers (contrastgen bench --help)
  bench report [...]    markdown table of saved benchmark runs
  bench plot RUN.json   redraw the plot of a saved run
  demo NAME [OPTIONS]   run a demo (contrastgen demo --help lists them)
  conform [OPTIONS]     CONFORM-guided Stable Diffusion from local weights (contrastgen conform --help)
  edit [OPTIONS]        contrastive-guided image editing from local weights (contrastgen edit --help)
  env                   versions, CPU features, CUDA devices and which backends are available (and why not)

examples:
  contrastgen bench --quick
  contrastgen bench --crossover
  contrastgen env
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="contrastgen", usage="contrastgen [-h] [--version] {bench,demo,conform,edit,env} ...",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("command", nargs="?", choices=["bench", "demo", "conform", "edit", "env"], help=argparse.SUPPRESS)
    return p


def _version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------------------- bench
def _bench(argv: List[str]) -> int:
    if argv and argv[0] == "report":
        from .bench.report import main as report_main
        return report_main(argv[1:])
    if argv and argv[0] == "plot":
        from .bench.plot import main as plot_main
        return plot_main(argv[1:])
    from .bench.run import main as run_main
    return run_main(argv)


# ------------------------------------------------------------------------------------------- demo
def _demo(argv: List[str]) -> int:
    listing = "\n".join(f"  {name:12s} {desc}" for name, (desc, _) in DEMOS.items())
    p = argparse.ArgumentParser(prog="contrastgen demo", description="Run a demo; its own options follow its name "
                                "(contrastgen demo NAME --help).", epilog="demos:\n" + listing,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(DEMOS), metavar="NAME", help="one of: " + ", ".join(sorted(DEMOS)))
    if not argv:
        p.print_usage(sys.stderr)
        print("\ndemos:\n" + listing, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    args = p.parse_args(argv[:1])
    try:
        module = DEMOS[args.name][1]()
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        from ._optional import PIP_NAMES
        pip = PIP_NAMES.get(str(missing).split(".")[0], missing)
        print(f"contrastgen demo {args.name} needs {pip}, which is not installed: "
              f"pip install 'contrastgen[methods]'", file=sys.stderr)
        return 1
    return module.main(argv[1:]) or 0


# ------------------------------------------------------------------------------------------- env
def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    """Everything ``contrastgen env`` prints, as a dict."""
    import torch

    from .bench.harness import cpu_model
    from .ops import _backends, _crossover, _dispatch

    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            cuda.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"sm_{cap[0]}{cap[1]}"})
    build = _backends.cpp_build_info()
    ops = {}
    for public, op in _backends.PUBLIC_OPS.items():
        if op is None:
            ops[public] = {"kernel_op": None, "backends": {"torch": "reference only (documented)"}}
            continue
        per = {}
        for b in ("triton", "cpp"):
            ok, why = _dispatch.backend_available(b, op)
            per[b] = "available" if ok else f"unavailable: {why}"
        ops[public] = {"kernel_op": op, "backends": per}
    try:
        crossover = _crossover.describe()
    except ValueError as e:
        crossover = [f"unreadable: {e}"]
    return {
        "contrastgen": _version(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {d: _dist_version(d) for d in ("torch", "triton", "numpy", "pybind11", "open-clip-torch",
                                                   "pytorch-metric-learning", "pykeops", "timm", "matplotlib")},
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "torch_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()},
        "cpp_build": build,
        "cuda": {"torch_cuda": torch.version.cuda, "devices": cuda},
        "ops": ops,
        "crossover": crossover,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CONTRASTGEN_") or k == "TRITON_INTERPRET"},
    }


def _env(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="contrastgen env", description="Versions, CPU features, CUDA devices, and which "
                                "backends can run each op here (and why not).")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    info = environment()
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"contrastgen {info['contrastgen']}  (Python {info['python']}, {info['platform']})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    missing = [k for k, v in info["versions"].items() if not v]
    if missing:
        print("not installed: " + ", ".join(missing))
    c = info["cpu"]
    b = info["cpp_build"]
    print(f"CPU: {c['model']}, {c['cores']} cores, torch threads {c['torch_threads']}, torch capability "
          f"{c['torch_capability']}; features: {' '.join(b['cpu_features']) or '-'}")
    print(f"C++ build: variants {b['build'].get('variants')}, loaded {b['loaded'] or 'none'}"
          + (f", skipped: {b['build']['skipped']}" if b["build"].get("skipped") else ""))
    for name, why in b["why_not"].items():
        print(f"  _cpp_{name}: {why}")
    devs = info["cuda"]["devices"]
    print(f"CUDA: torch built with {info['cuda']['torch_cuda'] or 'no CUDA'}; devices: "
          + (", ".join(f"{d['index']}: {d['name']} ({d['capability']})" for d in devs) if devs else "none"))
    print("backends per op (installed and importable; triton runs CUDA tensors, cpp CPU tensors):")
    for public, o in info["ops"].items():
        parts = "; ".join(f"{k} {v}" for k, v in o["backends"].items())
        print(f"  {public:16s} {parts}")
    for line in info["crossover"]:
        print(line)
    if info["env"]:
        print("environment: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    return 0


# ------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print("contrastgen: a command is needed (bench, demo, conform, edit, env); contrastgen --help for more", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        return _bench(rest)
    if cmd == "demo":
        return _demo(rest)
    if cmd == "env":
        return _env(rest)
    if cmd == "conform":
        from .methods.conform import cli_main
        return cli_main(rest)
    if cmd == "edit":
        from .methods.i2i import cli_main as edit_main
        return edit_main(rest)
    args = parser.parse_args(argv)          # --help, --version, or an error (exit 2 with usage)
    if args.version:
        print(f"contrastgen {_version()}")
        return 0
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
