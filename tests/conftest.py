import os

# The Triton interpreter must be chosen before any @triton.jit module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Hypothesis profiles for tests/test_fuzz.py: "ci" (the default) is derandomized (a fixed seed per test, so CI is
# reproducible) and small; "deep" (`pytest --hypothesis-profile=deep tests/test_fuzz.py`) is random and ~20x
# larger, for local runs.  Both print the failing example and its reproduction blob.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in requirements/cpu.txt
    pass
else:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=24, derandomize=True, database=None, deadline=None,
                              print_blob=True, suppress_health_check=_quiet)
    settings.register_profile("deep", max_examples=500, deadline=None, print_blob=True, suppress_health_check=_quiet)
    settings.load_profile("ci")
