"""On a GPU: the radon fit matches lme4, with the random effects' tables on the GPU; the
minibatch natural-gradient path and a GLMM with a network, with every variable on the
GPU (`benchmarks/gpu_check.sh` runs these, and checks the ops' placement too).

Skipped where TensorFlow sees no GPU.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_glmm as kg

# lme4 maximum-likelihood fit of log_radon ~ floor + (1 | county).
RADON_LME4 = {"intercept": 1.4612, "floor": -0.6926, "county_sd": 0.3245, "residual_sd": 0.7552}


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
def test_radon_fit_on_gpu_matches_lme4():
    df = kg.datasets.load_radon()
    x = {"x": np.stack([np.ones(len(df)), df.floor.values], 1), "county": df.county_code.values}
    y = df.log_radon.values
    model = kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")])
    model.fit(x, y)

    layer = model.random_effects[0]
    assert "GPU" in layer.posterior.value.device, layer.posterior.value.device

    estimates = {
        "intercept": float(model.coefficients()[0]),
        "floor": float(model.coefficients()[1]),
        "county_sd": float(layer.prior_stddev()[0]),
        "residual_sd": float(model.dispersion()["scale"]),
    }
    bad = {
        k: (estimates[k], v) for k, v in RADON_LME4.items()
        if abs(estimates[k] - v) > 0.005 * abs(v)
    }
    assert not bad, f"relative difference above 0.5% from lme4: {bad}"


requires_gpu = pytest.mark.skipif(not tf.config.list_physical_devices("GPU"),
                                  reason="no GPU visible to TensorFlow")


def _on_gpu(variables):
    return [v.path for v in variables if "GPU" not in v.value.device]


@requires_gpu
def test_minibatch_natural_steps_on_gpu():
    """A minibatch logistic fit (SparseAdam's natural-gradient steps, the M-step):
    tables and optimizer state on the GPU, the sd recovered."""
    rng = np.random.default_rng(0)
    rows, levels = 400_000, 20_000
    g = rng.integers(0, levels, rows)
    x = np.stack([np.ones(rows), rng.normal(size=rows)], 1)
    b = rng.normal(0, 1.0, levels)
    y = rng.binomial(1, 1 / (1 + np.exp(-(-0.5 + 0.5 * x[:, 1] + b[g]))))
    model = kg.GLMM(random_effects=[kg.RandomEffects(levels, name="g")], family="binomial")
    model.fit({"x": x, "g": g}, y, batch_size=65536)
    assert not _on_gpu(list(model.variables) + list(model.optimizer.variables))
    assert model.converged_
    assert abs(float(model.random_effects[0].prior_stddev()[0]) - 1.0) < 0.05


@requires_gpu
def test_network_glmm_on_gpu():
    """A GLMM with an MLP as fixed effects (NaturalGradient around Adam) on the GPU."""
    rng = np.random.default_rng(1)
    rows, levels = 50_000, 500
    x = rng.uniform(-2, 2, (rows, 3)).astype("float32")
    g = rng.integers(0, levels, rows)
    y = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + rng.normal(0, 1, levels)[g]
         + rng.normal(0, 2, rows)).astype("float32")
    inputs = keras.Input((3,), name="x")
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Dense(32, activation="relu")(inputs))
    model = kg.GLMM(fixed_effects=keras.Model(inputs, keras.layers.Dense(1)(h)),
                    random_effects=[kg.RandomEffects(levels, name="g")])
    model.fit({"x": x, "g": g}, y)
    assert isinstance(model.optimizer, kg.NaturalGradient)
    assert not _on_gpu(list(model.variables) + list(model.optimizer.variables))
    assert model.converged_
    assert abs(float(model.random_effects[0].prior_stddev()[0]) - 1.0) < 0.12
    assert abs(model.dispersion()["scale"] - 2.0) < 0.15
