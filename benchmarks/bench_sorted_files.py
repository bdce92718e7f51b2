"""Streaming from files sorted by group: what block shuffling does to the estimates.

Exports are often ordered by user. A streamed fit reads chunks in order and shuffles
them through a bounded buffer (`keras_glmm.streaming.block_shuffle`): with sorted
files and data larger than the buffer, each minibatch holds the few users of one
window of the file. This script writes the same synthetic crossed logistic data
(`synthetic.crossed`) twice, in random row order and sorted by user, as Parquet
files, fits both streamed with a buffer smaller than the data, and compares the
estimates with the truth (and with the in-memory fit).

    python benchmarks/bench_sorted_files.py [--rows 200000] [--buffer 20000]
"""

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synthetic  # noqa: E402
from _results import append_results  # noqa: E402

import keras_glmm as kg  # noqa: E402

FORMULA = "y ~ x + z + (1 | user) + (1 | item)"


def write(frame, folder, name, files=4):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), files)):
        frame.iloc[part].to_parquet(os.path.join(folder, name, f"part-{i}.parquet"), index=False)
    return os.path.join(folder, name, "*.parquet")


def summary(fit):
    vc = fit.varcorr()
    sds = dict(zip(vc["grp"], vc["sdcor"]))
    return {**fit.fixef().to_dict(), "sd user": sds["user"], "sd item": sds["item"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--buffer", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=4_096)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    frame, truth = synthetic.crossed(args.rows, args.users, args.items, user_slope=False, seed=3)
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, data in (("random order", frame),
                           ("sorted by user", frame.sort_values("user", kind="stable").reset_index(drop=True))):
            path = write(data, folder, name.replace(" ", "_"))
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fit = kg.glmm(FORMULA, kg.read_parquet(path), family="binomial", batch_size=args.batch,
                                  shuffle_buffer=args.buffer, seed=0)
                    result = summary(fit)
                    note = ""
                except ValueError as err:
                    result, note = None, str(err).split(":")[0]
            epochs = "" if result is None else f"{fit.fit_summary_['epochs']} epochs"
            messages = [str(w.message)[:80] for w in caught if issubclass(w.category, RuntimeWarning)]
            rows.append((name, time.perf_counter() - t, result, note or "; ".join([epochs, *messages])))
    truth_row = {"(Intercept)": truth["sample"]["(Intercept)"], "x": truth["x"], "z": truth["z"],
                 "sd user": truth["sd_user"], "sd item": truth["sd_item"]}
    table = [{"files": "truth", "time (s)": "", **truth_row, "note": ""}]
    for name, seconds, result, note in rows:
        values = {k: ("—" if result is None else result[k]) for k in truth_row}
        table.append({"files": name, "time (s)": seconds, **values, "note": note})
    for row in table:
        print(row)
    if not args.no_results:
        append_results(
            f"Streaming from files sorted by group ({args.rows:,} rows, buffer {args.buffer:,})",
            " ".join(["python benchmarks/bench_sorted_files.py", *sys.argv[1:]]),
            table,
            notes=(f"Crossed logistic data, {args.users:,} users x {args.items:,} items, 4 Parquet files, "
                   f"batches of {args.batch:,} rows, a shuffle buffer of {args.buffer:,} rows (smaller than "
                   "the data)."),
        )


if __name__ == "__main__":
    main()
