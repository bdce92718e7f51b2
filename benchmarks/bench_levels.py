"""Step time against the number of random-effect levels, at a fixed batch.

A training step must cost what its batch touches, not what the table holds: the
per-row KL attribution gives sparse gradients (`tf.IndexedSlices` over the batch's
levels), and `SparseAdam` updates only those rows. Keras's own Adam updates its two
moment tables in full every step (keras #19992), which this script shows beside it.

Usage:
    python benchmarks/bench_levels.py [--levels 10000 1000000 10000000] [--batch 65536]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402

import keras_glmm as kg  # noqa: E402
from keras_glmm.batches import minibatches  # noqa: E402
from _results import append_results  # noqa: E402


def step_time(num_levels, batch, optimizer_name, steps=40, seed=0):
    """Median seconds per training step of a random-intercept GLMM."""
    rng = np.random.default_rng(seed)
    rows = 4 * batch
    level = rng.integers(0, num_levels, rows).astype("int64")
    y = (rng.normal(size=rows) + 0.3 * rng.normal(size=num_levels)[level]).astype("float32")
    x = {"x": np.ones((rows, 1), "float32"), "g": level}
    model = kg.GLMM(random_effects=[kg.RandomEffects(num_levels, name="g")])
    optimizer = {
        "SparseAdam": lambda: kg.SparseAdam(0.01),
        "keras Adam": lambda: keras.optimizers.Adam(0.01),
        "keras SGD": lambda: keras.optimizers.SGD(0.01),
    }[optimizer_name]()
    model.compile(optimizer=optimizer, steps_per_execution=1)
    model.prepare(x, y, initialize=False)
    ds = minibatches((x, y), batch)

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    keras.Model.fit(model, ds, epochs=1, steps_per_epoch=5, verbose=0)  # trace and warm up
    timer = Timer()
    keras.Model.fit(model, ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return float(np.median(timer.times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--optimizers", nargs="+", default=["SparseAdam", "keras SGD", "keras Adam"])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.optimizers:
        row = {"optimizer": name}
        for levels in args.levels:
            seconds = step_time(levels, args.batch, name)
            row[f"{levels:,} levels (ms)"] = round(seconds * 1000, 1)
            print(f"{name:>12} {levels:>12,} levels: {seconds * 1000:.1f} ms/step", flush=True)
        first, last = args.levels[0], args.levels[-1]
        row["ratio largest/1M" if 1_000_000 in args.levels else "ratio last/first"] = round(
            row[f"{last:,} levels (ms)"]
            / row[f"{(1_000_000 if 1_000_000 in args.levels else first):,} levels (ms)"],
            2,
        )
        rows.append(row)
    if not args.no_record:
        append_results(
            "Step time against the number of levels (random intercept, fixed batch)",
            "python benchmarks/bench_levels.py " + " ".join(sys.argv[1:]),
            rows,
            notes=(
                f"- Batch {args.batch:,} rows, levels drawn uniformly, float32, one training step "
                "per call (`steps_per_execution=1`), median of 40 steps after 5 warm-up steps.\n"
                "- The acceptance line: at a fixed batch, step time at 10M levels within 1.5x of "
                "the time at 1M levels. SparseAdam reads and writes only the batch's rows; keras "
                "Adam rewrites both moment tables every step."
            ),
        )


if __name__ == "__main__":
    main()
