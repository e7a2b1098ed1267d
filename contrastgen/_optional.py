"""Optional dependencies: an ImportError that says which extra to install.

    from contrastgen._optional import require
    timm = require("timm", extra="methods", what="contrastgen.methods.sit")
"""
from __future__ import annotations

import importlib
from types import ModuleType

# import name -> pip distribution name, where they differ
PIP_NAMES = {"sklearn": "scikit-learn", "open_clip": "open-clip-torch", "pytorch_metric_learning":
             "pytorch-metric-learning", "pykeops": "pykeops", "inf_cl": "inf-cl"}


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the package and the contrastgen extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pip = PIP_NAMES.get(top, top)
        raise ImportError(f"{what} needs {pip}, which is not installed: pip install 'contrastgen[{extra}]' "
                          f"(or pip install {pip})") from e
