"""``python -m benches.report [--dir DIR] [--mode ...]``: the markdown report of ``contrastgen bench report``
(``contrastgen.bench.report``), reading the recorded results in ``benches/results/`` unless ``--dir`` is given."""
import sys
from pathlib import Path

from contrastgen.bench.report import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--dir" or a.startswith("--dir=") for a in argv):
        argv = ["--dir", str(Path(__file__).resolve().parent / "results")] + argv
    sys.exit(main(argv))
