"""contrastgen's benchmark harness: ``contrastgen bench`` (see ``benches/run.py``)."""
