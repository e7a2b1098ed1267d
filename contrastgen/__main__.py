"""``python -m contrastgen ...`` = the ``contrastgen`` command."""
import sys

from .cli import main

sys.exit(main())
