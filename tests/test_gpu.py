"""On a GPU: the radon fit matches lme4, with the random effects' tables on the GPU.

Skipped where TensorFlow sees no GPU.
"""

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
