"""Fits run in subprocesses by `test_distribute.py` (not a test module).

Each mode prints one JSON object on its last line of stdout.

    python _distribute_worker.py fit [--backup DIR] [--kill-after-epoch N]
        Fits the radon model (full batch, `GLMM.fit`'s defaults), optionally with
        `keras.callbacks.BackupAndRestore(DIR)`; with `--kill-after-epoch N` the
        process dies by `os._exit(1)` at the end of epoch N (after the backup of
        that epoch is written), as a preempted job would.

    python _distribute_worker.py mirrored {radon,penicillin}
        Splits the CPU into 2 logical devices (before TensorFlow initializes), fits
        the model on the default (single-device) strategy, then tries it under a
        2-replica `MirroredStrategy` with the library as it is and with proposed
        library fixes installed one by one (`ATTEMPTS`), and reports each attempt:
        its estimates, or the error it stopped with.
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
        joint = kg.JointRandomEffects(
            [kg.RandomEffects(24, name="plate"), kg.RandomEffects(6, name="sample")], name="joint"
        )
        return kg.GLMM(random_effects=[joint])

    def estimates(model):
        plate, sample = model.random_effects[0].terms
        return {
            "intercept": float(model.coefficients()[0]),
            "plate_sd": float(plate.prior_stddev()[0]),
            "sample_sd": float(sample.prior_stddev()[0]),
            "residual_sd": float(model.dispersion()["scale"]),
        }

    return x, y, build, estimates


def fit_glm_without_variable(family, design, y, offset=None, params=None, max_iter=25):
    """`keras_glmm.initialization.fit_glm` with the coefficients as a watched tensor.

    The library's version keeps the Newton iterate in a scratch `tf.Variable`;
    created inside `strategy.scope()` that is a `MirroredVariable`, and
    `GradientTape.gradient(value, b)` outside a replica context then fails
    ("DistributedVariable.handle is not available outside the replica context").
    This is the proposed fix, line for line the library's function otherwise; the
    `mirrored` mode installs it (fix "init") to test what lies beyond.
    """
    import numpy as np
    import tensorflow as tf

    y = np.asarray(y, dtype="float64")
    trials = None
    if y.ndim == 2:
        y, trials = y[:, 0], y[:, 1]
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, "float64")
    if family.name == "binomial":
        n = np.ones_like(y) if trials is None else trials
        start = (y + 0.5) / (n + 1.0)
    elif family.name in ("poisson", "negative_binomial"):
        start = y + 0.1
    else:
        start = y
    eta_start = family.link(tf.constant(start)).numpy() - offset
    eta_start = np.where(np.isfinite(eta_start), eta_start, 0.0)
    beta = np.linalg.lstsq(design, eta_start, rcond=None)[0]

    X = tf.constant(design)
    y_t, off_t = tf.constant(y), tf.constant(offset)
    trials_t = None if trials is None else tf.constant(trials)
    params = {k: tf.constant(float(v), tf.float64) for k, v in (params or {}).items()}

    def log_lik(b):
        eta = tf.linalg.matvec(X, tf.constant(b)) + off_t
        return tf.reduce_sum(family.log_prob(y_t, eta, params, trials=trials_t))

    b = np.asarray(beta, "float64")
    current = float(log_lik(b))
    if not np.isfinite(current):
        b = np.zeros_like(beta)
        current = float(log_lik(b))
    ridge = 1e-8 * np.eye(len(beta))
    for _ in range(max_iter):
        b_t = tf.constant(b)
        with tf.GradientTape() as outer:
            outer.watch(b_t)
            with tf.GradientTape() as inner:
                inner.watch(b_t)
                eta = tf.linalg.matvec(X, b_t) + off_t
                value = tf.reduce_sum(family.log_prob(y_t, eta, params, trials=trials_t))
            grad = inner.gradient(value, b_t)
        hess = outer.jacobian(grad, b_t).numpy()
        try:
            step = np.linalg.solve(-hess + ridge * max(1.0, np.abs(hess).max()), grad.numpy())
        except np.linalg.LinAlgError:
            break
        start_b = b
        improved = False
        for _ in range(30):
            b = start_b + step
            new = float(log_lik(b))
            if np.isfinite(new) and new >= current - 1e-12 * abs(current):
                improved = True
                break
            step = step / 2
        if not improved:
            b = start_b
            break
        done = abs(new - current) <= 1e-10 * (abs(current) + 1.0)
        current = new
        if done:
            break
    return b, design @ b + offset


def maybe_symbolic_build_of_built_glmm(self, iterator=None, data_batch=None):
    """Proposed `GLMM._maybe_symbolic_build`: skip Keras's look at a data batch.

    Under a strategy Keras's `_maybe_symbolic_build` takes the first distributed
    batch and `strategy.reduce("MEAN", batch)`s it across replicas, which fails
    when the replicas' shares differ in size (919 radon rows on 2 replicas: 460
    and 459 -> "Inputs to operation AddN ... must have the same size and shape").
    A GLMM that `fit` (`prepare`) has built needs no data batch: only its optimizer
    may be unbuilt.
    """
    import keras

    if self.built and self._distribute_strategy is not None:
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
        return None
    return keras.Model._maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)


def compute_loss_replica_share(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    """Proposed `GLMM.compute_loss`: Keras's per-replica loss convention.

    Keras sums the replicas' gradients and expects each replica's loss divided by
    the number of replicas (`Trainer.compute_loss` does it through
    `scale_loss_for_distribution`, which GLMM's override skips). The library's
    version returns each replica's full loss, so under R replicas the summed
    gradient is that of R times the negative ELBO (harmless for Adam, not for
    SGD), and Keras's `loss` log, `unscale_loss_for_distribution(loss)`, is R
    times the negative ELBO (2.354 for 1.177 on radon). The trackers weight each
    replica's values by its rows, so that with unequal shards (919 rows -> 460 +
    459) the logs are the full-batch values.

    (Dividing by `all_reduce(SUM, rows) / rows` instead of R would make the
    replicas' losses sum to the full-batch loss exactly; the collective it adds
    collides with the previous strategy's when a process builds a second
    `MirroredStrategy`, "Shape mismatch in the collective instance", so 1/R it is.)
    """
    import tensorflow as tf

    ell = self.expected_log_likelihood(y, y_pred)
    if sample_weight is not None:
        ell = ell * tf.reshape(tf.cast(sample_weight, ell.dtype), [-1])
    nll = -tf.reduce_mean(ell)
    kl = tf.add_n(self.losses) if self.losses else tf.zeros_like(nll)
    kl = tf.cast(kl, nll.dtype)
    loss = nll + kl
    loss = tf.debugging.check_numerics(loss, "keras_glmm: the negative ELBO is NaN or inf.")
    rows = tf.cast(tf.shape(ell)[0], loss.dtype)
    self.nll_tracker.update_state(nll, sample_weight=rows)
    self.kl_tracker.update_state(kl, sample_weight=rows)
    self.elbo_tracker.update_state(-loss, sample_weight=rows)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss / tf.cast(replicas, loss.dtype)
    return loss


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


# Attempts of `mirrored` mode, in order: the proposed fixes each installs (they
# accumulate) and the `steps_per_execution` it compiles with (None: GLMM's default;
# 1 stands in for the proposed default under a strategy: Keras's multi-step
# `tf.while_loop` fails under MirroredStrategy, keras-team/keras#19246).
ATTEMPTS = {
    "defaults": ((), None),
    "init": (("init",), None),  # radon: the AddN error; penicillin: the while_loop one
    "fixed": (("init", "build"), 1),
    "loss_fix": (("init", "build", "loss"), 1),
}
# What the tests run (a full-batch mirrored fit with steps_per_execution=1 takes
# 13-25 s on 2 busy cores); `--attempts` picks others.
DEFAULT_ATTEMPTS = {
    "radon": ("defaults", "fixed", "loss_fix"),
    "penicillin": ("defaults", "fixed"),
}


def _install(fix):
    import keras_glmm as kg
    from keras_glmm import initialization

    if fix == "init":
        initialization.fit_glm = fit_glm_without_variable
    elif fix == "build":
        kg.GLMM._maybe_symbolic_build = maybe_symbolic_build_of_built_glmm
    elif fix == "loss":
        kg.GLMM.compute_loss = compute_loss_replica_share


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

    out["attempts"] = {}
    for name in args.attempts or DEFAULT_ATTEMPTS[args.data]:
        fixes, steps_per_execution = ATTEMPTS[name]
        for fix in fixes:
            _install(fix)
        keras.utils.set_random_seed(0)
        start = time.perf_counter()
        strategy = tf.distribute.MirroredStrategy(devices)
        out["num_replicas"] = int(strategy.num_replicas_in_sync)
        try:
            with strategy.scope():
                model = build()
                if steps_per_execution is None:
                    model.compile()
                else:
                    model.compile(steps_per_execution=steps_per_execution)
                history = model.fit(x, y)
            result = _fit_result(model, history, x, y, estimates)
            result["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported to the test
            lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
            # The first line, and the line naming the cause in a graph error.
            keep = lines[:1] + [l for l in lines[1:] if "must feed" in l or "AddN" in l][:1]
            result = {"ok": False, "error": f"{type(error).__name__}: {' | '.join(keep)[:500]}"}
        result["fixes"] = list(fixes)
        result["steps_per_execution"] = steps_per_execution
        result["seconds"] = round(time.perf_counter() - start, 1)
        out["attempts"][name] = result
        keras.backend.clear_session()
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    fit = sub.add_parser("fit")
    fit.add_argument("--backup")
    fit.add_argument("--kill-after-epoch", type=int)
    mirrored = sub.add_parser("mirrored")
    mirrored.add_argument("data", choices=("radon", "penicillin"))
    mirrored.add_argument("--attempts", nargs="+", choices=tuple(ATTEMPTS))
    args = parser.parse_args()
    {"fit": run_fit, "mirrored": run_mirrored}[args.mode](args)


if __name__ == "__main__":
    main()
