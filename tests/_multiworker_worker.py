"""One worker of a multi-worker fit, run by `test_multiworker.py` (not a test module).

    TF_CONFIG=... python _multiworker_worker.py fit [--timeout SECONDS]
        Builds the strategy with `kg.distribute.multi_worker_strategy()`, fits the
        radon model under its scope (`GLMM.fit`'s defaults) and prints one JSON
        object on its last line of stdout: the estimates, the total ELBO and the
        history's last logs.

    [TF_CONFIG=...] python _multiworker_worker.py files PATTERN [--batch-size N] [--epochs N]
        Fits "log_radon ~ floor + (1 | county)" from the CSV files PATTERN by
        streamed stochastic VI (`memory_budget=1`: never read into memory), under
        the multi-worker strategy when TF_CONFIG is set (each worker reading its
        share of the files), else in this one process; prints the estimates, the
        final ELBO, the files this worker trained on and the optimizer used.

    TF_CONFIG=... python _multiworker_worker.py strategy [--timeout SECONDS]
        Only builds the strategy (for the error paths); prints its replica count.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

from _distribute_worker import _fit_result, radon

RADON_FORMULA = "log_radon ~ floor + (1 | county)"


def run_fit(args):
    import keras

    import keras_glmm as kg
    import keras_glmm.distribute

    start = time.perf_counter()
    strategy = kg.distribute.multi_worker_strategy(timeout=args.timeout)
    ready = time.perf_counter() - start
    keras.utils.set_random_seed(0)
    x, y, build, estimates = radon()
    with strategy.scope():
        model = build()
        history = model.fit(x, y)
    out = _fit_result(model, history, x, y, estimates)
    out["num_replicas"] = int(strategy.num_replicas_in_sync)
    out["strategy_seconds"] = round(ready, 1)
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out), flush=True)


def run_files(args):
    import keras
    import tensorflow as tf

    import keras_glmm as kg
    import keras_glmm.distribute
    from keras_glmm import streaming

    start = time.perf_counter()
    if os.environ.get("TF_CONFIG"):
        strategy = kg.distribute.multi_worker_strategy(timeout=args.timeout)
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    source = kg.read_csv(args.pattern)
    with strategy.scope():
        model = kg.GLMM.from_formula(RADON_FORMULA, source, memory_budget=1)
        shares = streaming.multi_worker_shares()
        history = model.fit(source, batch_size=args.batch_size, epochs=args.epochs, seed=0)
    files = range(len(source.paths)) if shares is None else streaming.worker_files(source.paths, *shares)
    out = {
        "fixef": [float(v) for v in model.fixef().values],
        "sdcor": [float(v) for v in model.varcorr()["sdcor"].values],
        "elbo_total": float(model.fit_summary_["elbo"]),
        "converged": bool(model.converged_),
        "epochs": len(history.epoch),
        "elbo_per_row": [float(v) for v in history.history["elbo"]],
        "natural_step": getattr(model.optimizer, "natural_step", None),
        "num_replicas": int(strategy.num_replicas_in_sync),
        "trained_on": [os.path.basename(source.paths[i]) for i in files],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out), flush=True)


def run_strategy(args):
    import keras_glmm as kg
    import keras_glmm.distribute

    strategy = kg.distribute.multi_worker_strategy(timeout=args.timeout)
    print(json.dumps({"num_replicas": int(strategy.num_replicas_in_sync)}), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fit", "files", "strategy"))
    parser.add_argument("pattern", nargs="?")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()
    {"fit": run_fit, "files": run_files, "strategy": run_strategy}[args.mode](args)


if __name__ == "__main__":
    main()
