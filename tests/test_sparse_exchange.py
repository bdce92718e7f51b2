"""Random-effect gradients cross replicas as sparse slices, not dense tables.

Under a 2-replica `MirroredStrategy` (2 logical CPU devices, in a subprocess run
by `_sparse_exchange_worker.py`: the CPU must be split before TensorFlow
initializes), the gradients of a `RandomEffects` layer's `posterior` table (each
level's mean and Cholesky factor) are `tf.IndexedSlices` over the batch's rows. What the
optimizer's cross-replica aggregation exchanges is therefore bounded by the batch,
and is the same for a table of 10,000 levels as for one of 1,000,000.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_sparse_exchange_worker.py")
TIMEOUT = 300
BATCH = 4096
SMALL, LARGE = "10000", "1000000"
TABLES = ("glmm/g/posterior:0",)
WIDTH = 2  # a random intercept's row: the mean and the raw posterior sd


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(report, levels, variable):
    records = [r for r in report["levels"][levels]["records"] if r["variable"] == variable]
    assert len(records) == 2, records  # traced once per replica
    return records


@pytest.mark.slow
def test_random_effect_gradients_cross_replicas_as_bounded_sparse_slices(report):
    assert report["batch"] == BATCH
    exchanged = {}
    for levels in (SMALL, LARGE):
        run = report["levels"][levels]
        assert run["num_replicas"] == 2
        assert run["iterations"] == 3
        for variable in TABLES:
            for record in _records(report, levels, variable):
                assert record["variable_shape"] == [int(levels), WIDTH]
                # What each replica sends, and what the aggregation hands the optimizer.
                assert record["sent"]["type"] == "IndexedSlices", record
                assert record["reduced"]["type"] == "IndexedSlices", record
                # One replica's share of the batch: (rows x WIDTH) values + rows indices.
                assert record["sent"]["values_shape"] == [BATCH // 2, WIDTH]
                assert record["sent"]["indices_shape"] == [BATCH // 2]
                sent = BATCH // 2 * (WIDTH + 1)
                assert record["sent_elements"] == [sent] * 3  # every one of the 3 steps
                # Gathered from both replicas: the whole batch's rows, no more.
                assert record["reduced_elements"] == [2 * sent] * 3
                exchanged[levels, variable] = (
                    record["sent_elements"], record["reduced_elements"]
                )

    for variable in TABLES:
        # Independent of the table size...
        assert exchanged[SMALL, variable] == exchanged[LARGE, variable]
        # ...while the dense gradient of the large table would be 100x the small one's,
        # and well over 100x what is exchanged.
        small = math.prod(_records(report, SMALL, variable)[0]["variable_shape"])
        large = math.prod(_records(report, LARGE, variable)[0]["variable_shape"])
        assert large == 100 * small
        assert large >= 100 * max(exchanged[LARGE, variable][1])


@pytest.mark.slow
def test_other_gradients_are_small_dense_tensors(report):
    """The fixed effects and variance parameters are exchanged dense, at their own size."""
    for levels in (SMALL, LARGE):
        for record in report["levels"][levels]["records"]:
            if record["variable"] in TABLES:
                continue
            size = math.prod(record["variable_shape"])
            assert record["sent"]["type"] == "dense", record
            assert record["sent_elements"] == [size] * 3, record
            assert size <= 2, record
