"""Composition: a network inside a GLMM, and random effects inside Keras models.

The acceptance case of the composition work: 12,000 rows, a nonlinear fixed part
of 3 features through a 32-32 MLP, 300 groups of sd 1 and a residual sd of 2,
fitted (a) by `kg.GLMM(fixed_effects=mlp)` with the default `fit` and (b) by a
functional Keras model ending in `kg.FamilyHead(..., output_mode="packed")`,
compiled with `kg.losses.NegativeExpectedLogLikelihood` and `kg.NaturalGradient`.
Both must recover the sds (group within 12%, residual within 7.5%), converge, and
survive a `.keras` round trip under `safe_mode`. Then the layer harness for every
public layer and loss of the API, the exactness of a natural-gradient step, and
the errors for bad input.
"""

import os
import tempfile
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_glmm as kg
from testing import run_layer_test

NUM_ROWS, NUM_GROUPS, GROUP_SD, NOISE_SD = 12_000, 300, 1.0, 2.0


def simulate(n=NUM_ROWS, groups=NUM_GROUPS, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 3)).astype("float32")
    f = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + x[:, 0] * x[:, 2]
    b = rng.normal(0, GROUP_SD, groups)
    g = rng.integers(0, groups, n)
    y = f + b[g] + rng.normal(0, NOISE_SD, n)
    return x, g, y.astype("float32")


def mlp(name="mlp"):
    inputs = keras.Input((3,), name="x")
    h = keras.layers.Dense(32, activation="relu")(inputs)
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h), name=name)


def assert_calibrated(group_sd, residual_sd):
    assert abs(group_sd / GROUP_SD - 1) < 0.12, group_sd
    assert abs(residual_sd / NOISE_SD - 1) < 0.075, residual_sd


# ------------------------------------------------------- the acceptance case
def test_network_inside_a_glmm_is_calibrated_converges_and_round_trips(tmp_path):
    x, g, y = simulate()
    model = kg.GLMM(fixed_effects=mlp(), random_effects=[kg.RandomEffects(NUM_GROUPS, name="g")])
    start = time.perf_counter()
    model.fit({"x": x, "g": g}, y)
    seconds = time.perf_counter() - start
    print(f"GLMM(fixed_effects=mlp): {seconds:.1f} s, sd {model.random_effects[0].prior_stddev()}, "
          f"{model.dispersion()}, {model.fit_summary_['epochs']} epochs")
    assert model.converged_ is True
    assert isinstance(model.optimizer, kg.NaturalGradient)
    assert_calibrated(float(model.random_effects[0].prior_stddev()[0]), model.dispersion()["scale"])
    assert seconds < 120  # about 5 s here (2 busy cores); the target is 30 s

    path = tmp_path / "glmm_mlp.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode=True, no custom_objects
    rows = {"x": x[:64], "g": g[:64]}
    before, after = model.predict(rows, verbose=0), loaded.predict(rows, verbose=0)
    for key in ("mean", "eta", "eta_var", "scale"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.optimizer, kg.NaturalGradient)
    # A second fit goes on from the loaded state (no new start, the same optimizer).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # two epochs: "did not converge"
        history = loaded.fit({"x": x, "g": g}, y, epochs=2)
    assert history.history["loss"][0] < model.fit_summary_["elbo"] / -len(y) + 0.01
    assert_calibrated(float(loaded.random_effects[0].prior_stddev()[0]), loaded.dispersion()["scale"])


def functional_model(group_index, initial_scale):
    features = keras.Input((3,), name="x")
    group = keras.Input((), dtype="int64", name="g")
    h = keras.layers.Dense(32, activation="relu")(features)
    h = keras.layers.Dense(32, activation="relu")(h)
    network = keras.layers.Dense(1, name="network")(h)
    effects = kg.RandomEffects(NUM_GROUPS, output_mode="moments", name="group")
    effects.adapt(group_index)
    head = kg.FamilyHead("gaussian", output_mode="packed", initial_params={"scale": initial_scale},
                         name="head")
    model = keras.Model({"x": features, "g": group}, head([network, effects(group)]))
    return model, effects, head


def test_random_effects_inside_a_functional_model_are_calibrated_and_round_trip(tmp_path):
    x, g, y = simulate()
    model, effects, head = functional_model(g, float(np.std(y)))
    model.compile(optimizer=kg.NaturalGradient(keras.optimizers.Adam(3e-3)),
                  loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    callbacks = kg.composition.fit_callbacks()
    start = time.perf_counter()
    model.fit({"x": x, "g": g}, y, batch_size=600, epochs=200, callbacks=callbacks, verbose=0)
    seconds = time.perf_counter() - start
    residual_sd = float(head.params()["scale"])
    print(f"functional: {seconds:.1f} s, sd {effects.prior_stddev()}, residual {residual_sd}")
    assert callbacks[1].converged is True
    assert_calibrated(float(effects.prior_stddev()[0]), residual_sd)

    path = tmp_path / "functional.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    rows = {"x": x[:64], "g": g[:64]}
    np.testing.assert_allclose(loaded.predict(rows, verbose=0), model.predict(rows, verbose=0), rtol=1e-6)
    parts = head.unpack(model.predict(rows, verbose=0))
    assert set(parts) == {"mean", "eta", "eta_var", "scale"}
    np.testing.assert_allclose(parts["scale"], residual_sd, rtol=1e-6)


def test_natural_gradient_step_is_exact_for_a_gaussian_model():
    """One full-batch step with natural_step=1 gives each level its exact posterior."""
    rng = np.random.default_rng(3)
    levels, n, sigma, tau = 7, 300, 1.5, 0.8
    g = rng.integers(0, levels, n)
    y = (rng.normal(0, tau, levels)[g] + rng.normal(0, sigma, n)).astype("float32")
    group = keras.Input((), dtype="int64")
    zero = keras.Input((1,))
    effects = kg.RandomEffects(levels, output_mode="moments", effect_scale=tau)
    effects.adapt(g)
    head = kg.FamilyHead("gaussian", output_mode="packed", fixed_params={"scale": sigma})
    model = keras.Model([group, zero], head([zero, effects(group)]))
    model.compile(optimizer=kg.NaturalGradient(keras.optimizers.SGD(0.0)),
                  loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    model.fit([g, np.zeros((n, 1), "float32")], y, batch_size=n, epochs=1, verbose=0, shuffle=False)
    counts = np.bincount(g, minlength=levels)
    precision = counts / sigma**2 + 1 / tau**2
    mean = np.bincount(g, weights=y, minlength=levels) / sigma**2 / precision
    np.testing.assert_allclose(effects.conditional_mean()[:, 0], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(effects.conditional_stddev()[:, 0], 1 / np.sqrt(precision), rtol=1e-4)


# ------------------------------------------------- Sequential and subclassed
def test_random_effects_in_sequential_and_subclassed_models_with_the_loss():
    rng = np.random.default_rng(1)
    levels, n = 40, 4000
    g = rng.integers(0, levels, n)
    u = rng.normal(0, 1.0, levels)
    counts = rng.poisson(np.exp(0.5 + u[g])).astype("float32")

    seq = keras.Sequential([
        keras.Input((), dtype="int64"),
        kg.RandomEffects(levels, output_mode="moments", name="re"),
        kg.FamilyHead("poisson", output_mode="packed"),
    ])
    seq.layers[0].adapt(g)
    seq.compile(optimizer=kg.NaturalGradient(), loss=kg.losses.NegativeExpectedLogLikelihood("poisson"))
    seq.fit(g, counts, batch_size=500, epochs=40, verbose=0, callbacks=kg.composition.fit_callbacks())
    assert np.corrcoef(seq.layers[0].conditional_mean()[:, 0], u)[0, 1] > 0.95

    class WithRandomIntercept(keras.Model):
        def __init__(self):
            super().__init__()
            self.re = kg.RandomEffects(levels, output_mode="moments")
            self.bias = keras.layers.Dense(1)
            self.head = kg.FamilyHead("poisson", output_mode="packed")

        def call(self, inputs):
            level, ones = inputs
            return self.head([self.bias(ones), self.re(level)])

    sub = WithRandomIntercept()
    sub.re.adapt(g)
    sub.compile(optimizer=kg.NaturalGradient(keras.optimizers.Adam(0.05)),
                loss=kg.losses.NegativeExpectedLogLikelihood("poisson"))
    ones = np.ones((n, 1), "float32")
    sub.fit([g, ones], counts, batch_size=500, epochs=30, verbose=0,
            callbacks=kg.composition.fit_callbacks(intercept=sub.bias))
    assert np.corrcoef(sub.re.conditional_mean()[:, 0], u)[0, 1] > 0.95
    assert abs(float(sub.re.prior_stddev()[0]) - np.std(u)) < 0.25


# ----------------------------------------------------------- layer harness
BATCH = 8


def _moments(batch=BATCH, seed=2):
    m = np.random.default_rng(seed).normal(size=(batch, 2)).astype("float32")
    m[:, 1] = np.abs(m[:, 1])
    return m


@pytest.mark.parametrize("family", ["gaussian", "binomial", "poisson", "negative_binomial", "gamma"])
def test_family_head_packed_layer(family):
    head = kg.FamilyHead(family)
    width = 3 + len(head.family.dispersion_params)
    point = np.random.default_rng(0).normal(size=(BATCH, 1)).astype("float32")
    run_layer_test(kg.FamilyHead, dict(family=family, output_mode="packed"), [point, _moments()],
                   (BATCH, width), run_eagerly=family != "gamma")


def test_family_head_list_input_in_dict_mode():
    point = np.ones((BATCH, 1), "float32")
    out = kg.FamilyHead("gaussian")([point, _moments(), np.ones((BATCH,), "float32")])
    np.testing.assert_allclose(out["eta"], 2.0 + _moments()[:, 0], rtol=1e-6)
    np.testing.assert_allclose(out["eta_var"], _moments()[:, 1], rtol=1e-6)
    run_layer_test(kg.FamilyHead, dict(family="poisson"), [point, _moments()],
                   {k: (BATCH,) for k in ("eta", "eta_var", "mean")})


def test_random_effects_with_a_vocabulary_layer():
    vocabulary = ["b", "a", "c", "d", "e"]
    index = np.random.default_rng(0).integers(0, 5, BATCH).astype("int32")
    run_layer_test(kg.RandomEffects, dict(vocabulary=vocabulary, output_mode="moments"), index, (BATCH, 2))
    # Level names: looked up in the graph, unknown names at the population value.
    layer = kg.RandomEffects(vocabulary=vocabulary, output_mode="moments", name="g")
    names = np.array(vocabulary)[index]
    layer.adapt(names)
    np.testing.assert_array_equal(layer.level_counts.numpy(), np.bincount(index, minlength=5))
    layer.posterior_mean.assign(np.arange(5, dtype="float32")[:, None])
    out = layer(tf.constant(list(names) + ["new"]))
    np.testing.assert_allclose(out[:-1, 0], index, rtol=1e-6)
    assert float(out[-1, 0]) == 0.0
    level = keras.Input((), dtype="string")
    model = keras.Model(level, layer(level))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(tf.constant(names)), model(tf.constant(names)), rtol=1e-6)
    learned = kg.RandomEffects(num_levels=5, name="h")
    learned.adapt(np.array(["z", "y", "y"]))
    assert learned.vocabulary == ["y", "z"]


@pytest.mark.parametrize("family", ["gaussian", "binomial", "poisson", "negative_binomial", "gamma"])
def test_negative_expected_log_likelihood_loss(family):
    loss = kg.losses.NegativeExpectedLogLikelihood(family)
    # Config and serialization round trips (registered name, no custom_objects).
    config = loss.get_config()
    assert type(loss).from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "keras_glmm>NegativeExpectedLogLikelihood"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    # Eager call: the mean over rows of -E_q[log p(y | eta)].
    head = kg.FamilyHead(family, output_mode="packed")
    packed = head([np.zeros((BATCH, 1), "float32"), _moments()])
    rng = np.random.default_rng(4)
    y = {"gaussian": rng.normal(size=BATCH), "binomial": rng.integers(0, 2, BATCH),
         "gamma": rng.gamma(2.0, size=BATCH)}.get(family, rng.poisson(2.0, BATCH)).astype("float32")
    value = float(loss(y, packed))
    parts = head.unpack(packed)
    params = {k: parts[k] for k in head.family.dispersion_params}
    expected = -np.mean(head.family.expected_log_prob(y, parts["eta"], parts["eta_var"], params).numpy())
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # Symbolic use and one fit step (the head's dispersion is trained by it).
    inputs = keras.Input((2,))
    out = kg.FamilyHead(family, output_mode="packed")([keras.layers.Dense(1)(inputs)])
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    history = model.fit(rng.normal(size=(BATCH, 2)).astype("float32"), y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_natural_gradient_optimizer_config():
    opt = kg.NaturalGradient(keras.optimizers.Adam(2e-3), natural_step=0.5)
    config = opt.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert isinstance(revived, kg.NaturalGradient) and revived.get_config() == config
    assert float(revived.learning_rate) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="natural_step"):
        kg.NaturalGradient(natural_step=0)


# --------------------------------------------------------------- bad input
def test_a_layer_never_adapted_fails_before_training():
    x, g, y = simulate(n=600, groups=20)
    features = keras.Input((3,), name="x")
    group = keras.Input((), dtype="int64", name="g")
    effects = kg.RandomEffects(20, output_mode="moments", name="group")
    out = kg.FamilyHead("gaussian", output_mode="packed")([keras.layers.Dense(1)(features), effects(group)])
    model = keras.Model({"x": features, "g": group}, out)
    before = effects.posterior.numpy().copy()
    model.compile(optimizer=kg.NaturalGradient(), loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    with pytest.raises(ValueError, match=r"RandomEffects layer 'group' was never adapted.*adapt"):
        model.fit({"x": x, "g": g}, y, batch_size=100, epochs=1, verbose=0)
    np.testing.assert_array_equal(effects.posterior.numpy(), before)
    # The callbacks check too, whatever the optimizer.
    model.compile(optimizer="adam", loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    with pytest.raises(ValueError, match="never adapted"):
        model.fit({"x": x, "g": g}, y, batch_size=100, epochs=1, verbose=0,
                  callbacks=kg.composition.fit_callbacks())


@pytest.mark.parametrize("head_family, loss_family", [("gaussian", "poisson"), ("binomial", "poisson")])
def test_loss_and_head_of_different_families_fail_before_training(head_family, loss_family):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 10, 200)
    y = rng.integers(0, 2, 200).astype("float32")
    group = keras.Input((), dtype="int64")
    effects = kg.RandomEffects(10, output_mode="moments")
    effects.adapt(g)
    model = keras.Model(group, kg.FamilyHead(head_family, output_mode="packed")([effects(group)]))
    before = effects.posterior.numpy().copy()
    model.compile(optimizer=kg.NaturalGradient(), loss=kg.losses.NegativeExpectedLogLikelihood(loss_family))
    with pytest.raises(ValueError, match=f"loss is for family '{loss_family}'.*FamilyHead is family "
                                         f"'{head_family}'|takes the packed output"):
        model.fit(g, y, batch_size=50, epochs=1, verbose=0)
    np.testing.assert_array_equal(effects.posterior.numpy(), before)


def test_a_dict_output_head_with_the_loss_fails_clearly():
    group = keras.Input((), dtype="int64")
    effects = kg.RandomEffects(10, output_mode="moments")
    effects.adapt(np.arange(10))
    model = keras.Model(group, kg.FamilyHead("gaussian")([effects(group)]))
    model.compile(optimizer=kg.NaturalGradient(), loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    with pytest.raises((ValueError, KeyError)):
        model.fit(np.arange(10), np.zeros(10, "float32"), epochs=1, verbose=0)


def test_glmm_network_input_errors():
    x, g, y = simulate(n=300, groups=10)
    model = kg.GLMM(fixed_effects=mlp(), random_effects=[kg.RandomEffects(10, name="g")])
    with pytest.raises(ValueError, match="has no inputs"):
        model.fit({"g": g}, y)
    bad = x.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"Input 'x' holds a non-finite value \(nan\) in row 5"):
        model.fit({"x": bad, "g": g}, y)
    with pytest.raises(ValueError, match=r"Input 'x' has 299 rows"):
        model.fit({"x": x[:-1], "g": g}, y)


# ------------------------------------------- features of any kind, and serving
def test_network_with_named_and_string_features_and_level_names_exports(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    num = rng.normal(size=(n, 2)).astype("float32")
    dept = rng.choice(["a", "b", "c", "d"], n)[:, None]
    names = np.array([f"s{i}" for i in range(60)])
    level = rng.choice(names, n)
    effect = dict(zip(names, rng.normal(0, 1, 60)))
    shift = {"a": 0.0, "b": 1.0, "c": -1.0, "d": 0.5}
    eta = np.sin(num[:, 0]) + num[:, 1] + np.vectorize(shift.get)(dept[:, 0]) + np.vectorize(effect.get)(level)
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype("float32")

    numeric = keras.Input((2,), name="num")
    text = keras.Input((1,), dtype="string", name="dept")
    one_hot = keras.layers.StringLookup(vocabulary=["a", "b", "c", "d"], output_mode="one_hot")(text)
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([numeric, one_hot]))
    network = keras.Model({"num": numeric, "dept": text}, keras.layers.Dense(1)(hidden))
    term = kg.RandomEffects(name="s", vocabulary=sorted(names))
    model = kg.GLMM(fixed_effects=network, random_effects=[term], family="binomial")
    model.fit({"num": num, "dept": dept, "s": level}, y)
    assert model.converged_
    assert 0.6 < float(term.prior_stddev()[0]) < 1.5

    rows = {"num": num[:20], "dept": dept[:20], "s": level[:20]}
    live = model.predict_response(rows)
    population = model.predict_response(rows, re_form="~0")
    names_in = model.export(tmp_path / "served")
    assert names_in == ["dept", "num", "s"]
    serve = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    out = serve(num=tf.constant(num[:20]), dept=tf.constant(dept[:20]), s=tf.constant(level[:20]))
    np.testing.assert_allclose(out["mean"].numpy(), live, rtol=1e-5)
    unseen = serve(num=tf.constant(num[:20]), dept=tf.constant(dept[:20]), s=tf.constant(["new"] * 20))
    np.testing.assert_allclose(unseen["mean"].numpy(), population, rtol=1e-5)


def test_glmm_network_missing_strings_fail_clearly():
    x, g, y = simulate(n=200, groups=10)
    text = keras.Input((1,), dtype="string", name="dept")
    numeric = keras.Input((3,), name="x")
    one_hot = keras.layers.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(text)
    network = keras.Model({"x": numeric, "dept": text},
                          keras.layers.Dense(1)(keras.layers.Concatenate()([numeric, one_hot])))
    dept = np.array([["a"], ["b"]] * 100, dtype=object)
    dept[7, 0] = None
    model = kg.GLMM(fixed_effects=network, random_effects=[kg.RandomEffects(10, name="g")])
    with pytest.raises(ValueError, match=r"Input 'dept' holds a missing value in row 7"):
        model.fit({"x": x, "dept": dept, "g": g}, y)
