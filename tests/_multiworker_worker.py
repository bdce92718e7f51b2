"""One worker of a multi-worker fit, run by `test_multiworker.py` (not a test module).

    TF_CONFIG=... python _multiworker_worker.py fit [--timeout SECONDS]
        Builds the strategy with `kg.distribute.multi_worker_strategy()`, fits the
        radon model under its scope (`GLMM.fit`'s defaults) and prints one JSON
        object on its last line of stdout: the estimates, the total ELBO and the
        history's last logs.

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

from _distribute_worker import _history_summary, radon


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
    out = estimates(model)
    out.update(_history_summary(history))
    out["converged"] = bool(model.converged_)
    elbo = model.elbo(x, y)
    out["elbo_total"] = float(elbo["elbo"])
    out["kl_total"] = float(elbo["kl"])
    out["num_rows"] = len(y)
    out["num_replicas"] = int(strategy.num_replicas_in_sync)
    out["strategy_seconds"] = round(ready, 1)
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out), flush=True)


def run_strategy(args):
    import keras_glmm as kg
    import keras_glmm.distribute

    strategy = kg.distribute.multi_worker_strategy(timeout=args.timeout)
    print(json.dumps({"num_replicas": int(strategy.num_replicas_in_sync)}), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fit", "strategy"))
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    {"fit": run_fit, "strategy": run_strategy}[args.mode](args)


if __name__ == "__main__":
    main()
