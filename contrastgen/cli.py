"""``contrastgen`` command line: ``contrastgen bench ...``, ``contrastgen demo NAME ...`` and ``contrastgen conform ...``
(and ``contrastgen edit ...``).

The benchmark harness lives in the repository's ``benches/`` folder (next to this package in a
source checkout / editable install); each subcommand forwards its remaining arguments."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEMOS = {"dispersive": "contrastgen.methods.dispersive_demo", "conform": "contrastgen.methods.conform_demo",
         "cut": "contrastgen.methods.cut_demo", "i2i": "contrastgen.methods.i2i_demo",
         "edit": "contrastgen.methods.i2i_demo"}


def _bench(argv):
    root = Path(__file__).resolve().parents[1]
    if not (root / "benches" / "run.py").exists():
        sys.exit("contrastgen bench needs the source checkout (benches/ next to the package); "
                 "install with `pip install -e .` from a clone")
    sys.path.insert(0, str(root))
    from benches.run import main
    return main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="contrastgen", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["bench", "demo", "conform", "edit"],
                        help="bench: benchmark every op; demo NAME: run a demo; conform: CONFORM text-to-image; "
                             "edit: contrastive-guided image-to-image editing")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\ndemos:", ", ".join(DEMOS))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        return _bench(rest)
    if cmd == "conform":
        from .methods.conform import cli_main
        return cli_main(rest)
    if cmd == "edit":
        from .methods.i2i import cli_main as edit_main
        return edit_main(rest)
    if cmd == "demo":
        if not rest or rest[0] not in DEMOS:
            parser.error(f"demo needs one of: {', '.join(DEMOS)}")
        return importlib.import_module(DEMOS[rest[0]]).main(rest[1:])
    parser.error(f"unknown command {cmd!r}")


if __name__ == "__main__":
    sys.exit(main())
