"""Composition: a random-effects layer beside an MLP in an ordinary Keras model, calibrated.

Simulated data: 200 groups, each with its own offset b_g ~ N(0, 1), and a smooth
nonlinear function of two numeric features:

    y = sin(x1) + x2^2 + b_group + noise,   noise ~ N(0, 1.5^2)

The model is a plain functional Keras model: an MLP on (x1, x2) and a
`kg.RandomEffects` layer on the group index (`output_mode="moments"`: each row's
posterior mean and variance of its group effect) feed a `kg.FamilyHead`, which
adds them and holds the residual sd. Compiled with
`kg.losses.NegativeExpectedLogLikelihood("gaussian")` the training loss is the
mean over rows of `-E_q[log N(y | eta, sd)]` plus the layer's KL per row (its
`add_loss`, scaled by the level counts from `adapt`): the negative ELBO per row,
with the residual sd learned. `kg.NaturalGradient` moves the groups' posteriors by
natural-gradient steps while Adam trains the MLP and the sd; the callbacks of
`kg.composition.fit_callbacks()` take the M-step of the group sd each epoch and stop
when the ELBO has converged.

(An earlier version compiled `Add()([mlp, effects])` with `loss="mse"`: that weighs
the KL as if the residual variance were 1/2, so its sds were only right when the
noise happened to have that variance.)

Run: `python examples/mlp_random_effects.py` (about 10-30 s on a CPU).
"""

import time

import keras
import numpy as np

import keras_glmm as kg

NUM_GROUPS = 200
ROWS_PER_GROUP = 25
GROUP_SD = 1.0
NOISE_SD = 1.5


def simulate(seed=0):
    rng = np.random.default_rng(seed)
    n = NUM_GROUPS * ROWS_PER_GROUP
    group_effects = rng.normal(0.0, GROUP_SD, NUM_GROUPS)
    group = rng.integers(0, NUM_GROUPS, n)
    features = rng.uniform(-2.0, 2.0, (n, 2))
    signal = np.sin(features[:, 0]) + features[:, 1] ** 2
    y = signal + group_effects[group] + rng.normal(0.0, NOISE_SD, n)
    return features.astype("float32"), group.astype("int64"), y.astype("float32"), group_effects


def build_model(group, y):
    features = keras.Input(shape=(2,), name="features")
    level = keras.Input(shape=(), dtype="int64", name="group")
    h = keras.layers.Dense(32, activation="relu")(features)
    h = keras.layers.Dense(32, activation="relu")(h)
    mlp_out = keras.layers.Dense(1, name="mlp_out")(h)
    effects = kg.RandomEffects(NUM_GROUPS, output_mode="moments", name="group_effects")
    effects.adapt(group)  # each row carries KL_g / n_g of its group's KL
    head = kg.FamilyHead("gaussian", output_mode="packed", initial_params={"scale": float(np.std(y))},
                         name="head")
    output = head([mlp_out, effects(level)])  # columns: mean, eta, eta_var, scale
    return keras.Model({"features": features, "group": level}, output), effects, head


def main():
    keras.utils.set_random_seed(0)
    features, group, y, true_effects = simulate()
    model, effects, head = build_model(group, y)
    model.compile(optimizer=kg.NaturalGradient(keras.optimizers.Adam(3e-3)),
                  loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    callbacks = kg.composition.fit_callbacks()  # VarianceUpdate (M-step) + ELBOConvergence

    start = time.perf_counter()
    history = model.fit({"features": features, "group": group}, y, batch_size=250, epochs=200,
                        callbacks=callbacks, verbose=0)
    seconds = time.perf_counter() - start

    estimated_sd = float(effects.prior_stddev()[0])
    residual_sd = float(head.params()["scale"])
    corr = float(np.corrcoef(effects.conditional_mean()[:, 0], true_effects)[0, 1])

    grid = np.random.default_rng(1).uniform(-2.0, 2.0, (2000, 2)).astype("float32")
    mlp = keras.Model(model.inputs["features"] if isinstance(model.inputs, dict) else model.inputs[0],
                      model.get_layer("mlp_out").output)
    resid = mlp.predict(grid, verbose=0)[:, 0] - (np.sin(grid[:, 0]) + grid[:, 1] ** 2)
    mlp_rmse = float(np.sqrt(np.mean((resid - resid.mean()) ** 2)))

    print(f"{len(y)} rows, {NUM_GROUPS} groups; {len(history.epoch)} epochs in {seconds:.1f} s, "
          f"converged: {callbacks[1].converged}; final loss {history.history['loss'][-1]:.4f} (-ELBO per row)")
    print(f"group sd: estimated {estimated_sd:.3f}, true {GROUP_SD:.3f} "
          f"(the simulated effects' sd {true_effects.std(ddof=1):.3f})")
    print(f"residual sd: estimated {residual_sd:.3f}, true {NOISE_SD:.3f}")
    print(f"correlation of estimated and true group effects: {corr:.3f}")
    print(f"MLP vs sin(x1) + x2^2 on a grid (up to a constant): RMSE {mlp_rmse:.3f}")
    return dict(estimated_sd=estimated_sd, residual_sd=residual_sd, corr=corr, mlp_rmse=mlp_rmse,
                seconds=seconds, converged=callbacks[1].converged)


if __name__ == "__main__":
    main()
