"""SavedModel export: raw grouping levels in, the live model's predictions out."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import keras_glmm as kg
from keras_glmm import levels
from keras_glmm.serving import serving_features


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = kg.datasets.load_sleepstudy()
    fit = kg.glmm("Reaction ~ Days + (Days | Subject)", data)
    path = tmp_path_factory.mktemp("serving") / "1"  # TF Serving's version folder
    inputs = fit.export(path)
    new = data.iloc[:6].copy()
    new["Subject"] = new["Subject"].astype(str)
    new.loc[[1, 4], "Subject"] = ["999", "a new subject"]
    return fit, path, inputs, new


def request(features):
    return {k: tf.constant(v) for k, v in features.items()}


def test_signature_takes_raw_levels(exported):
    fit, path, inputs, new = exported
    assert inputs == ["Days", "Subject"]  # raw columns: the slope's covariate is rebuilt from Days
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = served(**request(serving_features(fit, new)))
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-6)
    np.testing.assert_allclose(out["eta"].numpy(), fit.predict_response(new, type="link"), rtol=1e-6)
    # Unseen subjects get the population prediction.
    population = fit.predict_response(new, re_form="~0")
    np.testing.assert_allclose(out["mean"].numpy()[[1, 4]], population[[1, 4]], rtol=1e-6)
    assert abs(out["mean"].numpy()[0] - population[0]) > 1.0


def test_tfsm_layer_reload(exported):
    fit, path, _, new = exported
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    out = layer(request(serving_features(fit, new)))
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-6)


def test_bad_requests_name_the_column(exported):
    fit, path, _, new = exported
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    features = request(serving_features(fit, new))
    missing = dict(features)
    del missing["Subject"]
    with pytest.raises(TypeError, match="Subject"):
        served(**missing)
    wrong = dict(features, Subject=tf.constant([1, 2, 3, 4, 5, 6]))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="Subject|string"):
        served(**wrong)


def test_export_needs_a_formula_model():
    x = {"x": np.ones((10, 1)), "g": np.arange(10) % 2}
    model = kg.GLMM(random_effects=[kg.RandomEffects(2, name="g")])
    model.prepare(x, np.arange(10.0))
    from keras_glmm.serving import export_saved_model

    with pytest.raises(ValueError, match="formula"):
        export_saved_model(model, "/tmp/unused")


@pytest.mark.parametrize(
    "formula,raw",
    [
        ("cbind(incidence, size - incidence) ~ C(period) * size + (1|herd)", True),
        # A transform in the fixed part: the design matrix enters as `x` instead.
        ("cbind(incidence, size - incidence) ~ C(period) + I(size / 10) + (1|herd)", False),
    ],
)
def test_fixed_part_from_raw_columns(tmp_path, formula, raw):
    data = kg.datasets.load_cbpp()
    fit = kg.GLMM.from_formula(formula, data, family="binomial")
    fit.fit(data, epochs=3)  # the check is of the export, not of convergence
    inputs = fit.export(tmp_path / "1")
    assert ("x" not in inputs) == raw
    if raw:
        assert inputs == ["herd", "period", "size"]
    new = data.assign(herd=data["herd"].astype(str))
    new.loc[0, "herd"] = "new herd"
    features = serving_features(fit, new)
    out = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"](**request(features))
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-5)


# ------------------------------------------------ level keys: Python and graph agree


@pytest.mark.parametrize(
    "kind,values",
    [
        ("int64", [0, -5, 308, 2**62, -(2**63), 10**18]),
        ("float64", [308.0, -0.0, 0.0, 1.5, 0.1, 1e-5, 1e20, 1e300, 2.0**53 + 2, -3.25, 1 / 3, np.inf]),
        ("float32", np.array([1.1, 308.0, 0.1, 3e38, -2.5, 1e-30], dtype=np.float32)),
        ("bool", [True, False]),
        ("string", ["308", "a:b", "", "é", "1:y"]),
    ],
)
def test_graph_keys_are_the_python_keys(kind, values):
    values = np.asarray(values)
    python = [levels.level_key(v) for v in values.tolist()]
    assert levels.level_keys(values) == python
    table = levels.float_key_table(python) if kind.startswith("float") else None
    tensor = tf.constant(values, dtype=levels.serving_dtype(kind))
    graph = [k.decode() for k in levels.graph_part_keys(tensor, kind, table).numpy().tolist()]
    assert graph == python
    if table is not None:  # a value the table does not hold has no key: a new level
        other = tf.constant([7.25], dtype=levels.serving_dtype(kind))
        assert levels.graph_part_keys(other, kind, table).numpy().tolist() == [b""]


def test_graph_combined_keys_are_the_python_keys():
    rows = [("x:1", "y"), ("x", "1:y"), ("é", ""), ("12", "3:4")]
    python = [levels.combine_keys(r) for r in rows]
    assert len(set(python)) == len(rows)  # collision-free where ":".join collides
    assert [levels.split_key(k, 2) for k in python] == rows
    parts = [tf.constant([r[j] for r in rows]) for j in range(2)]
    graph = [k.decode() for k in levels.graph_combine_keys(parts).numpy().tolist()]
    assert graph == python


# ------------------------------------------ grouping columns of every type, served


def _grouped(kind, n=60, seed=0):
    """~60 rows, strong group effects; and new rows: known levels and new ones."""
    rng = np.random.default_rng(seed)
    k = 2 if kind == "bool" else 6
    g = np.arange(n) % k
    effect = np.linspace(-3.0, 3.0, k)
    data = pd.DataFrame({"x": rng.uniform(0.0, 2.0, n)})
    slope = np.resize([0.8, -0.5, 0.3, -1.0, 0.6, -0.2], k)  # not collinear with the intercepts
    data["y"] = 1.0 + (0.5 + slope[g]) * data["x"] + effect[g] + rng.normal(0.0, 0.3, n)
    if kind == "int":
        data["g"], unseen = 308 + g, [999, 3]
    elif kind == "float":
        data["g"], unseen = 308.0 + g, [999.0, 308.5]
    elif kind == "bool":
        data["g"], unseen = g == 1, None
    elif kind == "string":
        data["g"], unseen = np.array(["308", "309", "310", "330", "x:y", "é"])[g], ["999", "308.0"]
    elif kind == "categorical":
        names = np.array(["b", "a", "c", "d", "e", "f"])
        data["g"] = pd.Categorical(names[g], categories=["f", "e", "d", "unused", "c", "b", "a"])
        unseen = ["unused", "zzz"]
    elif kind == "interaction":
        data["a"] = np.array(["x:1", "x", "x:1", "x", "z", "z"])[g]
        data["b"] = np.array(["y", "1:y", "1:y", "y", "y", "1:y"])[g]
        unseen = None
    new = data.iloc[:8].copy()
    if kind == "interaction":
        new["a"] = new["a"].astype(object)
        new.loc[[2, 5], "a"] = ["w", "x:1:y"]  # new levels (the second: a part of a known name)
    elif unseen is not None:
        if kind == "categorical":
            new["g"] = new["g"].astype(object)
        new.loc[[2, 5], "g"] = unseen
    return data, new


@pytest.mark.parametrize(
    "kind,formula,dtype",
    [
        ("int", "y ~ x + (1 | g)", np.int64),
        ("float", "y ~ x + (1 | g)", np.float64),
        ("bool", "y ~ x + (1 | g)", np.bool_),
        ("string", "y ~ x + (x | g)", object),
        ("categorical", "y ~ x + (1 | g)", object),
        ("interaction", "y ~ x + (1 | a:b)", object),
    ],
)
def test_grouping_columns_of_every_type_serve_predict_response(tmp_path, kind, formula, dtype):
    data, new = _grouped(kind)
    fit = kg.glmm(formula, data)
    inputs = fit.export(tmp_path / "1")
    groups = ["a", "b"] if kind == "interaction" else ["g"]
    assert inputs == sorted(["x", *groups])
    features = serving_features(fit, new)
    for column in groups:
        assert features[column].dtype == dtype  # the column's training type
    served = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"]
    out = served(**request(features))
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-5, atol=1e-5)
    population = fit.predict_response(new, re_form="~0")
    fresh = [2, 5] if kind != "bool" else []
    known = [i for i in range(len(new)) if i not in fresh]
    np.testing.assert_allclose(out["mean"].numpy()[fresh], population[fresh], rtol=1e-5)
    assert np.all(np.abs(out["mean"].numpy()[known] - population[known]) > 0.1)  # not the population
    if kind == "float":  # what a client sends: numbers, whole or not
        raw = served(x=tf.constant([1.0, 1.0, 1.0], tf.float32), g=tf.constant([308.0, 308.5, -0.0], tf.float64))
        frame = pd.DataFrame({"x": [1.0, 1.0, 1.0], "g": [308.0, 308.5, -0.0]})
        np.testing.assert_allclose(raw["mean"].numpy(), fit.predict_response(frame), rtol=1e-5)
    if kind == "interaction":  # two levels named "x:1:y" by lme4, apart in the model and the graph
        term = fit.design.random[0]
        assert term.levels.count("x:1:y") == 2 and len(set(term.keys)) == term.n_levels


# ---------------------------------------------- random slopes on factors, served


def _schools(n=60, seed=1):
    rng = np.random.default_rng(seed)
    school = np.arange(n) % 6
    gender = np.where(rng.random(n) < 0.5, "F", "M")
    intercept = np.linspace(-4.0, 4.0, 6)[school]
    slope = np.array([2.0, -2.0, 1.0, -1.0, 3.0, -3.0])[school]
    y = 70.0 + intercept + (gender == "M") * (-5.0 + slope) + rng.normal(0.0, 0.5, n)
    return pd.DataFrame({"course": y, "gender": gender, "school": [f"s{i}" for i in school]})


@pytest.mark.parametrize(
    "formula,columns",
    [
        ("course ~ gender + (gender | school)", ["(Intercept)", "genderM"]),
        ("course ~ gender + (0 + gender | school)", ["genderF", "genderM"]),
    ],
)
def test_factor_slopes_served_from_the_raw_column(tmp_path, formula, columns):
    data = _schools()
    fit = kg.glmm(formula, data)
    assert fit.design.random[0].columns == columns
    inputs = fit.export(tmp_path / "1")
    assert inputs == ["gender", "school"]  # the slope's dummies are rebuilt in the graph
    new = data.iloc[:6].copy()
    new.loc[[1, 4], "school"] = ["new school", "s1:x"]
    served = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"]
    out = served(**request(serving_features(fit, new)))
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-5)
    population = fit.predict_response(new, re_form="~0")
    np.testing.assert_allclose(out["mean"].numpy()[[1, 4]], population[[1, 4]], rtol=1e-5)
    # A gender the model was not fitted with fails, in Python and in the graph.
    bad = new.assign(gender=["F", "X", "M", "F", "M", "F"])
    with pytest.raises(ValueError, match="column 'gender' has level"):
        fit.predict_response(bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"column \\*'gender\\*' has a level not seen.*\[X\]"):
        served(**request({**serving_features(fit, new), "gender": np.array(bad["gender"], dtype=object)}))


def test_random_term_with_a_transform_takes_its_covariates(tmp_path):
    data, new = _grouped("string")
    fit = kg.GLMM.from_formula("y ~ x + (I(x * 2) | g)", data)
    fit.fit(data, epochs=3)  # the check is of the export, not of convergence
    inputs = fit.export(tmp_path / "1")
    assert inputs == ["g", "g_z", "x"]
    out = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"](
        **request(serving_features(fit, new))
    )
    np.testing.assert_allclose(out["mean"].numpy(), fit.predict_response(new), rtol=1e-5)
