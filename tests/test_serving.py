"""SavedModel export: raw grouping levels in, the live model's predictions out."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_glmm as kg
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
    assert inputs == ["Days", "Subject", "Subject_z"]  # raw columns
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
