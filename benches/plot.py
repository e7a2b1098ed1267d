"""``python -m benches.plot RUN.json [OUT.png]``: kept for old commands; see ``contrastgen.bench.plot``."""
import sys

from contrastgen.bench.plot import main

if __name__ == "__main__":
    sys.exit(main())
