"""Fits run in subprocesses by `test_distribute.py` (not a test module).

Each mode prints one JSON object on its last line of stdout.

    python _distribute_worker.py fit [--backup DIR] [--kill-after-epoch N]
        Fits the radon model (full batch, `GLMM.fit`'s defaults), optionally with
        `keras.callbacks.BackupAndRestore(DIR)`; with `--kill-after-epoch N` the
        process dies by `os._exit(1)` at the end of epoch N (after the backup of
        that epoch is written), as a preempted job would.

    python _distribute_worker.py mirrored {radon,penicillin}
        Splits the CPU into 2 logical devices (before TensorFlow initializes), fits
        the model on the default (single-device) strategy, then under a 2-replica
        `MirroredStrategy`, and reports both fits' estimates and logs.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def radon():
    import numpy as np

    import keras_glmm as kg

    df = kg.datasets.load_radon()
    x = {"x": np.stack([np.ones(len(df)), df.floor.values], 1), "county": df.county_code.values}
    y = df.log_radon.values

    def build():
        return kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")])

    def estimates(model):
        return {
            "intercept": float(model.coefficients()[0]),
            "floor": float(model.coefficients()[1]),
            "county_sd": float(model.random_effects[0].prior_stddev()[0]),
            "residual_sd": float(model.dispersion()["scale"]),
        }

    return x, y, build, estimates


def penicillin():
    import numpy as np

    import keras_glmm as kg

    df = kg.datasets.load_penicillin()
    x = {
        "x": np.ones((len(df), 1)),
        "plate": df.plate.cat.codes.values,
        "sample": df["sample"].cat.codes.values,
    }
    y = df.diameter.values

    def build():
        # Stochastic VI on both sides: several replicas rule the engine out.
        terms = [kg.RandomEffects(24, name="plate"), kg.RandomEffects(6, name="sample")]
        return kg.GLMM(random_effects=terms, posterior="mean_field")

    def estimates(model):
        plate, sample = model.random_effects
        return {
            "intercept": float(model.coefficients()[0]),
            "plate_sd": float(plate.prior_stddev()[0]),
            "sample_sd": float(sample.prior_stddev()[0]),
            "residual_sd": float(model.dispersion()["scale"]),
        }

    return x, y, build, estimates


def _epoch_logger(epochs):
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs.append(int(epoch))

    return EpochLog()


def _killer(kill_epoch):
    import keras

    class Killer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == kill_epoch:
                sys.stdout.flush()
                os._exit(1)  # no cleanup, no on_train_end: a hard preemption

    return Killer()


def _history_summary(history):
    return {
        key: float(history.history[key][-1]) for key in ("loss", "elbo", "nll", "kl")
    } | {"epochs": len(history.epoch)}


def run_fit(args):
    import keras

    x, y, build, estimates = radon()
    model = build()
    epochs = []
    callbacks = []
    if args.backup:
        # Before the killer: the end-of-epoch backup is written before the kill.
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
    callbacks.append(_epoch_logger(epochs))
    if args.kill_after_epoch is not None:
        callbacks.append(_killer(args.kill_after_epoch))
    history = model.fit(x, y, callbacks=callbacks)
    out = estimates(model)
    out.update(_history_summary(history))
    out["logged_epochs"] = epochs
    out["converged"] = bool(model.converged_)
    out["elbo_total"] = float(model.elbo(x, y)["elbo"])
    print(json.dumps(out))


def _fit_result(model, history, x, y, estimates):
    result = estimates(model)
    result.update(_history_summary(history))
    result["converged"] = bool(model.converged_)
    elbo = model.elbo(x, y)
    result["elbo_total"] = float(elbo["elbo"])
    result["kl_total"] = float(elbo["kl"])
    result["num_rows"] = int(len(y))
    return result


def run_mirrored(args):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    x, y, build, estimates = {"radon": radon, "penicillin": penicillin}[args.data]()
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    out = {"devices": devices}

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model = build()
    out["single"] = _fit_result(model, model.fit(x, y), x, y, estimates)
    out["single"]["seconds"] = round(time.perf_counter() - start, 1)
    keras.backend.clear_session()

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    strategy = tf.distribute.MirroredStrategy(devices)
    out["num_replicas"] = int(strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build()
        history = model.fit(x, y)
    out["mirrored"] = _fit_result(model, history, x, y, estimates)
    out["mirrored"]["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    fit = sub.add_parser("fit")
    fit.add_argument("--backup")
    fit.add_argument("--kill-after-epoch", type=int)
    mirrored = sub.add_parser("mirrored")
    mirrored.add_argument("data", choices=("radon", "penicillin"))
    args = parser.parse_args()
    {"fit": run_fit, "mirrored": run_mirrored}[args.mode](args)


if __name__ == "__main__":
    main()
