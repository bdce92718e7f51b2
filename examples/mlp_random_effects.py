"""Composition: a random-effects layer beside an MLP in an ordinary Keras model.

Simulated data: 200 groups, each with its own offset b_g ~ N(0, 1), and a smooth
nonlinear function of two numeric features:

    y = sin(x1) + x2^2 + b_group + noise,   noise ~ N(0, 1/2)

The model is a plain functional Keras model: an MLP on (x1, x2) plus a
`kg.RandomEffects` layer on the group index, outputs added, compiled with
`loss="mse"` and trained with `model.fit`. In training the layer outputs a
reparameterized draw of each row's group effect from its Gaussian posterior and
adds its KL divergence to the model's losses (`layer.adapt` counts each group's
rows so the KL is shared out per row); the prior sd of the group effects is
learned by the same gradient steps.

A note on calibration: `mse` is the negative log-likelihood of a Normal with its
sd fixed at 1/sqrt(2) (up to a constant), i.e. variance 1/2, so the KL and the
data term are weighted as in an ELBO only if that is the residual variance. The
simulated noise is given exactly that variance here; with real data the balance
between the data and the prior would be off by the ratio of the variances. The
example shows composition, not calibrated inference: for the latter use
`kg.GLMM` (learned residual sd, closed-form ELBO).

Run: `python examples/mlp_random_effects.py` (about 10-30 s on a CPU).
"""

import time

import keras
import numpy as np

import keras_glmm as kg

NUM_GROUPS = 200
ROWS_PER_GROUP = 25
GROUP_SD = 1.0
NOISE_SD = np.sqrt(0.5)  # the sd that `loss="mse"` implies


def simulate(seed=0):
    rng = np.random.default_rng(seed)
    n = NUM_GROUPS * ROWS_PER_GROUP
    group_effects = rng.normal(0.0, GROUP_SD, NUM_GROUPS)
    group = rng.integers(0, NUM_GROUPS, n)
    features = rng.uniform(-2.0, 2.0, (n, 2))
    signal = np.sin(features[:, 0]) + features[:, 1] ** 2
    y = signal + group_effects[group] + rng.normal(0.0, NOISE_SD, n)
    return features.astype("float32"), group.astype("int32"), y.astype("float32"), group_effects


def build_model(num_groups):
    features = keras.Input(shape=(2,), name="features")
    group = keras.Input(shape=(), dtype="int32", name="group")
    h = keras.layers.Dense(32, activation="relu")(features)
    h = keras.layers.Dense(32, activation="relu")(h)
    mlp_out = keras.layers.Dense(1, name="mlp_out")(h)
    # effect_scale=0.5 starts the prior sd at 0.5, away from the truth (1.0).
    re_layer = kg.RandomEffects(num_groups, name="group_effects", output_mode="sample",
                                effect_scale=0.5)
    re_out = re_layer(group)
    output = keras.layers.Add()([mlp_out, re_out])
    return keras.Model({"features": features, "group": group}, output), re_layer


def main():
    keras.utils.set_random_seed(0)
    features, group, y, true_effects = simulate()
    model, re_layer = build_model(NUM_GROUPS)
    # Per-group row counts: each row carries KL_g / n_g, so the batch mean of the
    # added loss is the KL per observation, as the mse is a per-row data term.
    re_layer.adapt(group)
    # 3e-2 rather than 1e-2: at 1e-2 the prior sd is still climbing after 40 epochs.
    model.compile(optimizer=kg.SparseAdam(3e-2), loss="mse")

    start = time.perf_counter()
    history = model.fit({"features": features, "group": group}, y[:, None],
                        batch_size=256, epochs=30, verbose=0)
    seconds = time.perf_counter() - start

    estimated_sd = float(re_layer.prior_stddev()[0])
    estimated = re_layer.conditional_mean()[:, 0]
    corr = float(np.corrcoef(estimated, true_effects)[0, 1])

    # The MLP part on a grid, against the truth (up to a constant: the MLP's
    # bias and the group effects' mean share it).
    grid = np.random.default_rng(1).uniform(-2.0, 2.0, (2000, 2)).astype("float32")
    mlp = keras.Model(model.inputs[0], model.get_layer("mlp_out").output)
    f_hat = mlp.predict(grid, verbose=0)[:, 0]
    f_true = np.sin(grid[:, 0]) + grid[:, 1] ** 2
    resid = f_hat - f_true
    mlp_rmse = float(np.sqrt(np.mean((resid - resid.mean()) ** 2)))

    print(f"{len(y)} rows, {NUM_GROUPS} groups; fit: {len(history.epoch)} epochs in {seconds:.1f} s, "
          f"final loss {history.history['loss'][-1]:.4f} (mse + KL per row)")
    print(f"random-effect sd: estimated {estimated_sd:.3f}, true {GROUP_SD:.3f} "
          f"(sample sd of the simulated effects {true_effects.std(ddof=1):.3f})")
    print(f"correlation of estimated and true group effects: {corr:.3f}")
    print(f"mean posterior sd of a group effect: {re_layer.conditional_stddev()[:, 0].mean():.3f} "
          f"(about noise sd / sqrt(rows per group) = {NOISE_SD / np.sqrt(ROWS_PER_GROUP):.3f})")
    print(f"MLP vs sin(x1) + x2^2 on a grid (up to a constant): RMSE {mlp_rmse:.3f} "
          f"(noise sd {NOISE_SD:.3f})")
    return dict(estimated_sd=estimated_sd, corr=corr, mlp_rmse=mlp_rmse, seconds=seconds)


if __name__ == "__main__":
    main()
