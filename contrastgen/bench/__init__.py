"""The benchmark harness behind ``contrastgen bench`` (installed with the package; runs from a wheel).

* :mod:`contrastgen.bench.cases`     the registry: op x shape x dtype x provider x mode
* :mod:`contrastgen.bench.harness`   timing (median and quartiles) and peak-memory measurement
* :mod:`contrastgen.bench.run`       ``contrastgen bench``: run, print the table, write JSON + PNG
* :mod:`contrastgen.bench.report`    the table of one run; markdown across runs (``contrastgen bench report``)
* :mod:`contrastgen.bench.plot`      time and peak memory per op, side by side
* :mod:`contrastgen.bench.crossover` ``contrastgen bench --crossover``: where the dense reference beats the kernel
"""
