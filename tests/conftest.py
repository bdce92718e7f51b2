"""Shared pytest configuration: quiet TensorFlow, deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    # pyproject declares it; registering again is harmless and keeps a bare
    # `pytest tests/x.py -c /dev/null` run free of unknown-marker warnings.
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    keras.utils.set_random_seed(0)
    yield
