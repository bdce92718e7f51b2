"""GLMM model: bad input, other families against simulated truth, composition, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_glmm as kg


def simulate(family, n=3000, levels=60, sd=0.5, seed=0):
    """Simulated GLMM data: eta = b0 + b1 x + u_g, u_g ~ N(0, sd^2)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, levels, n)
    u = rng.normal(0, sd, levels)
    xcov = rng.normal(size=n)
    beta = np.array([0.5, -0.4]) if family != "gamma" else np.array([0.3, 0.2])
    eta = beta[0] + beta[1] * xcov + u[g]
    if family == "poisson":
        y = rng.poisson(np.exp(eta))
    elif family == "negative_binomial":
        theta = 3.0
        y = rng.negative_binomial(theta, theta / (theta + np.exp(eta)))
    elif family == "gamma":
        shape = 5.0
        y = rng.gamma(shape, np.exp(eta) / shape)
    elif family == "binomial":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    x = {"x": np.stack([np.ones(n), xcov], 1), "g": g}
    return x, y.astype(float), beta, u


@pytest.mark.parametrize(
    "family,link,truth",
    [
        ("poisson", None, {}),
        ("negative_binomial", None, {"dispersion": 3.0}),
        ("gamma", "log", {"shape": 5.0}),
        ("binomial", "probit", {}),
    ],
)
def test_families_recover_simulated_truth(family, link, truth):
    # The probit's quadrature (log Phi in both tails) is the slowest family: fewer rows.
    x, y, beta, u = simulate(family, n=1500 if link == "probit" else 3000)
    if link == "probit":
        # Same data generator on the probit scale.
        rng = np.random.default_rng(1)
        from scipy.stats import norm

        eta = x["x"] @ beta + u[x["g"]]
        y = rng.binomial(1, norm.cdf(eta)).astype(float)
    model = kg.GLMM(random_effects=[kg.RandomEffects(60, name="g")], family=family, link=link)
    model.fit(x, y)
    assert model.converged_
    np.testing.assert_allclose(model.coefficients(), beta, atol=0.15)
    assert abs(model.random_effects[0].prior_stddev()[0] - np.std(u)) < 0.15
    for name, value in truth.items():
        assert abs(np.log(model.dispersion()[name] / value)) < 0.3
    # Conditional means track the true group effects.
    est = model.random_effects[0].conditional_mean()[:, 0]
    assert np.corrcoef(est, u)[0, 1] > 0.8


def test_auto_keeps_the_engine_for_many_gaussian_rows(monkeypatch):
    """Beyond FULL_BATCH_ROWS rows (lowered here) "auto" keeps the engine for a gaussian
    model (no quadrature over the rows) and takes stochastic VI for the others."""
    from keras_glmm.fitting import driver  # the threshold's home (keras_glmm.model names it too)

    monkeypatch.setattr(driver, "FULL_BATCH_ROWS", 100)
    assert model_for("gaussian").engine_problem(num_rows=101) is None
    assert "FULL_BATCH_ROWS=100" in model_for("poisson").engine_problem(num_rows=101)
    assert model_for("poisson").engine_problem(num_rows=100) is None
    x, y, _, _ = simulate("poisson", n=300, levels=10)
    model = model_for("gaussian")
    model.fit(x, np.log1p(y), verbose=0)
    assert model._engine_fit is not None  # fitted by the engine, not stochastic VI


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small():
    x, y, _, _ = simulate("poisson", n=200, levels=10)
    return x, y


def model_for(family="poisson", levels=10):
    return kg.GLMM(random_effects=[kg.RandomEffects(levels, name="g")], family=family)


def test_level_index_out_of_range_names_layer_and_row(small):
    x, y = small
    x = dict(x, g=x["g"].copy())
    x["g"][7] = 10
    with pytest.raises(ValueError, match=r"'g'.*level index 10 in row 7.*\[0, 10\)"):
        model_for().fit(x, y)


def test_nan_in_response_is_named(small):
    x, y = small
    y = y.copy()
    y[3] = np.nan
    with pytest.raises(ValueError, match=r"y.*row 3"):
        model_for().fit(x, y)


def test_inf_in_x_is_named(small):
    x, y = small
    x = dict(x, x=x["x"].copy())
    x["x"][5, 1] = np.inf
    with pytest.raises(ValueError, match=r"Input 'x'.*row 5, column 1"):
        model_for().fit(x, y)


def test_negative_count_is_named(small):
    x, y = small
    y = y.copy()
    y[4] = -1
    with pytest.raises(ValueError, match=r"row 4"):
        model_for().fit(x, y)


def test_successes_above_trials(small):
    x, _ = small
    y = np.stack([np.full(200, 3.0), np.full(200, 2.0)], 1)
    with pytest.raises(ValueError, match=r"row 0"):
        model_for("binomial").fit(x, y)


def test_bernoulli_response_not_binary(small):
    x, _ = small
    y = np.zeros(200)
    y[9] = 2
    with pytest.raises(ValueError, match=r"row 9"):
        model_for("binomial").fit(x, y)


def test_mismatched_rows(small):
    x, y = small
    with pytest.raises(ValueError, match=r"response has 199 rows but 'x' has 200"):
        model_for().fit(x, y[:-1])
    with pytest.raises(ValueError, match=r"Input 'g' has 150 rows"):
        model_for().fit(dict(x, g=x["g"][:150]), y)


def test_unknown_input_key(small):
    x, y = small
    with pytest.raises(ValueError, match=r"Unexpected input\(s\) \['h'\]"):
        model_for().fit(dict(x, h=x["g"]), y)


def test_missing_covariates_for_slopes(small):
    x, y = small
    model = kg.GLMM(random_effects=[kg.RandomEffects(10, num_effects=2, name="g")], family="poisson")
    with pytest.raises(ValueError, match=r"'g_z'"):
        model.fit(x, y)


def test_bad_index_in_a_tf_data_pipeline_fails_clearly(small):
    """Data that skip the in-memory checks still fail with the layer's name, not a NaN."""
    x, y = small
    model = model_for()
    model.prepare(x, y)
    x_bad = dict(x, g=x["g"].copy())
    x_bad["g"][0] = 12
    ds = tf.data.Dataset.from_tensor_slices((x_bad, y)).batch(200)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"RandomEffects layer g: a level index is >= num_levels=10"):
        model.fit(ds, epochs=1)


def test_glmm_refuses_a_loss():
    with pytest.raises(ValueError, match="negative ELBO"):
        model_for().compile(loss="mse")


# --------------------------------------------------------------- composition
def make_composition_data(n=2000, levels=40, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.uniform(-2, 2, size=(n, 2)).astype("float32")
    g = rng.integers(0, levels, n)
    u = rng.normal(0, 1.0, levels)
    y = np.sin(feats[:, 0]) + 0.5 * feats[:, 1] ** 2 + u[g] + rng.normal(0, 0.3, n)
    return feats, g, u, y.astype("float32")


def test_random_effects_beside_an_mlp_functional():
    feats, g, u, y = make_composition_data()
    features = keras.Input(shape=(2,), name="features")
    level = keras.Input(shape=(), dtype="int64", name="level")
    hidden = keras.layers.Dense(32, activation="relu")(features)
    hidden = keras.layers.Dense(32, activation="relu")(hidden)
    mlp_out = keras.layers.Dense(1)(hidden)
    re = kg.RandomEffects(40, name="group", output_mode="sample")
    re.adapt(g)
    out = keras.layers.Add()([mlp_out, re(level)])
    model = keras.Model([features, level], out)
    model.compile(optimizer=kg.SparseAdam(0.01), loss="mse")
    history = model.fit([feats, g], y, batch_size=256, epochs=30, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    est = re.conditional_mean()[:, 0]
    assert np.corrcoef(est, u)[0, 1] > 0.9


def test_random_effects_in_sequential_and_subclassed_models():
    _, g, u, _ = make_composition_data()
    rng = np.random.default_rng(1)
    y = (u[g] + rng.normal(0, 0.3, len(g))).astype("float32")

    seq = keras.Sequential(
        [keras.Input(shape=(), dtype="int64"), kg.RandomEffects(40, output_mode="mean", name="re")]
    )
    seq.layers[0].adapt(g)
    seq.compile(optimizer=kg.SparseAdam(0.05), loss="mse")
    seq.fit(g, y, batch_size=500, epochs=40, verbose=0)
    assert np.corrcoef(seq.layers[0].conditional_mean()[:, 0], u)[0, 1] > 0.95

    class WithRandomIntercept(keras.Model):
        def __init__(self):
            super().__init__()
            self.re = kg.RandomEffects(40, output_mode="mean")
            self.bias = keras.layers.Dense(1)

        def call(self, inputs):
            level, ones = inputs
            return self.re(level) + self.bias(ones)

    sub = WithRandomIntercept()
    sub.re.adapt(g)
    sub.compile(optimizer=kg.SparseAdam(0.05), loss="mse")
    ones = np.ones((len(g), 1), "float32")
    sub.fit([g, ones], y + 2.0, batch_size=500, epochs=40, verbose=0)
    assert np.corrcoef(sub.re.conditional_mean()[:, 0], u)[0, 1] > 0.95


# ------------------------------------------------------------------- saving
def test_glmm_keras_round_trip(tmp_path):
    x, y, _, _ = simulate("poisson", n=500, levels=20)
    model = kg.GLMM(random_effects=[kg.RandomEffects(20, name="g")], family="poisson")
    model.fit(x, y)
    path = tmp_path / "glmm.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode, no custom_objects
    before = model.predict(x, verbose=0)
    after = loaded.predict(x, verbose=0)
    for key in ("mean", "eta", "eta_var"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6)
    assert loaded.family.name == "poisson"
    np.testing.assert_allclose(
        loaded.random_effects[0].prior_stddev(), model.random_effects[0].prior_stddev()
    )
    config = model.get_config()
    assert kg.GLMM.from_config(config).get_config() == config
