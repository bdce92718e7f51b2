"""10M rows, 1M users and 100k items: throughput, epochs to converge, peak memory, accuracy.

`y ~ x + z + (1 | user) + (1 | item)`, binomial: users drawn uniformly (10 rows each
on average), items from a Zipf law (P(item k) ~ 1/k: a few items have hundreds of
thousands of rows, most a handful), by `synthetic.crossed` (seed 2, or `--seed`). No other tool
fits this on 2 cores in reasonable time (glmer needs about 47 minutes for a tenth
of it, `benchmarks/bench_crossed.py`), so the reference is the simulation's truth.

Figures: rows per second of each epoch (rows / the epoch's wall time: a pass of
coordinate ascent, `keras_glmm.engine.coordinate_ascent`, or with `--batch` an epoch
of minibatches), epochs to convergence, the process's peak resident memory (data included), and
the estimates against the truth.

Usage:
    python benchmarks/bench_scale.py [--rows 10000000] [--users 1000000] [--items 100000] [--seed 2]
        [--batch ROWS]   (minibatch stochastic VI instead of the default full-batch fit)
"""

import argparse
import os
import resource
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import keras_glmm as kg  # noqa: E402
import synthetic  # noqa: E402
from _results import append_results  # noqa: E402

FORMULA = "y ~ x + z + (1 | user) + (1 | item)"


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        print(f"epoch {epoch}: {self.seconds[-1]:.2f} s, loss {logs['loss']:.6f}", flush=True)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=None,
                        help="minibatch rows (stochastic VI); default: fit(data)'s full-batch coordinate ascent")
    parser.add_argument("--seed", type=int, default=2, help="the simulation's seed")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    data, truth = synthetic.crossed(
        args.rows, args.users, args.items, user_slope=False, item_zipf=args.zipf, seed=args.seed
    )
    generate = time.perf_counter() - start
    start = time.perf_counter()
    model = kg.GLMM.from_formula(FORMULA, data, family="binomial")
    build = time.perf_counter() - start
    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(data, batch_size=args.batch, callbacks=[timer])
    print(f"model construction {build:.1f} s, fit {time.perf_counter() - start:.1f} s", flush=True)
    fit_seconds = time.perf_counter() - start
    peak = peak_gib()

    rates = args.rows / np.asarray(timer.seconds)
    path = "minibatch" if args.batch else "full batch, coordinate ascent"
    names = ["(Intercept)", "x", "z", "sd user", "sd item"]
    truth_values = [truth[k] for k in ("(Intercept)", "x", "z", "sd_user", "sd_item")]
    values = [*model.fixef().values, *model.varcorr()["sdcor"].values]
    fixed_error = max(abs(a - b) for a, b in zip(values[:3], truth_values[:3]))
    sample_fixed = [truth["sample"][k] for k in ("(Intercept)", "x", "z")]
    sample_error = max(abs(a - b) for a, b in zip(values[:3], sample_fixed))
    sd_error = max(abs(values[i] / truth_values[i] - 1) for i in (3, 4))
    items_seen = int(np.unique(data["item"]).size)
    rows = [
        {"fit": "truth (simulation)", **{n: v for n, v in zip(names, truth_values)}},
        {"fit": "truth, this sample's fixed effects",
         **{n: round(float(v), 4) for n, v in zip(names, [*sample_fixed, *truth_values[3:]])}},
        {"fit": f"keras_glmm (mean-field, {path})", **{n: round(float(v), 4) for n, v in zip(names, values)},
         "max abs fixed error": round(fixed_error, 4), "vs sample's": round(sample_error, 4),
         "max sd rel. error": f"{sd_error:.1%}"},
    ]
    notes = "\n".join([
        f"- Data (seed {args.seed}): {args.rows:,} rows, {args.users:,} users (uniform), {args.items:,} items "
        f"(Zipf exponent {args.zipf}; {items_seen:,} items drawn at least once; the most "
        f"popular has {int(np.bincount(data['item']).max()):,} rows); generated in {generate:.1f} s "
        "(not counted below).",
        f"- Throughput: **{np.median(rates) / 1e6:.2f}M rows/s** per epoch (median over "
        f"{len(rates)} epochs; min {rates.min() / 1e6:.2f}M, max {rates.max() / 1e6:.2f}M), "
        + (f"batches of {args.batch:,} rows." if args.batch else "an epoch is a pass of coordinate ascent."),
        f"- Epochs to converge: {len(timer.seconds)} (converged: {model.converged_}); "
        f"**{build + fit_seconds:.0f} s from data frame to fitted model**: model construction (design, "
        f"level counts, checks, GLM start) {build:.1f} s, fit {fit_seconds:.1f} s.",
        f"- Peak resident memory of the whole process (data frame, design arrays, model, "
        f"optimizer state): **{peak:.2f} GiB**.",
        f"- Against the truth: fixed effects within {fixed_error:.4f} (of the sample's fixed "
        f"effects, which add the drawn levels' means: {sample_error:.4f}), sds within {sd_error:.1%}.",
    ])
    if not args.no_record:
        append_results(
            f"Scale: {args.rows:,} rows, {args.users:,} users, {args.items:,} items (logistic)",
            "python benchmarks/bench_scale.py", rows, notes=notes,
        )
    for r in rows:
        print(r)
    print(notes)


if __name__ == "__main__":
    main()
