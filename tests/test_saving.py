"""Saving and loading fitted models: `.keras` round trips under safe_mode."""

import keras
import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg


@pytest.fixture(scope="module")
def cbpp_fit():
    data = kg.datasets.load_cbpp()
    fit = kg.glmm("cbind(incidence, size - incidence) ~ C(period) + (1|herd)", data, family="binomial")
    return data, fit


def test_formula_model_round_trip(tmp_path, cbpp_fit):
    data, fit = cbpp_fit
    path = tmp_path / "cbpp.keras"
    fit.save(path)
    loaded = keras.models.load_model(path)  # safe_mode=True, no custom_objects
    assert isinstance(loaded, kg.GLMM)
    assert loaded.design.spec.formula == fit.design.spec.formula
    new = data.assign(herd=data["herd"].astype(str))
    new.loc[0, "herd"] = "a herd never seen"
    np.testing.assert_allclose(loaded.predict_response(new), fit.predict_response(new), rtol=1e-6)
    np.testing.assert_allclose(loaded.predict_response(new, type="link"),
                               fit.predict_response(new, type="link"), rtol=1e-6)
    pd.testing.assert_series_equal(loaded.fixef(), fit.fixef())
    pd.testing.assert_frame_equal(loaded.varcorr(), fit.varcorr())
    pd.testing.assert_frame_equal(loaded.ranef()["herd"], fit.ranef()["herd"])
    # A new level predicts at the population level after loading too.
    population = fit.predict_response(new.iloc[:1], re_form="~0")
    np.testing.assert_allclose(loaded.predict_response(new.iloc[:1]), population, rtol=1e-6)


def test_fit_continues_after_loading(tmp_path, cbpp_fit):
    data, fit = cbpp_fit
    path = tmp_path / "cbpp.keras"
    fit.save(path)
    loaded = kg.load_model(path)
    assert loaded.optimizer is not None
    loaded.fit(data)
    assert loaded.converged_
    # Already at the optimum: continuing moves the estimates by a hair at most.
    np.testing.assert_allclose(loaded.fixef().values, fit.fixef().values, atol=2e-3)


def test_load_model_names_what_is_wrong(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a Keras archive"):
        kg.load_model(text)
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    other_path = tmp_path / "dense.keras"
    other.save(other_path)
    with pytest.raises(ValueError, match="holds a Sequential, not a keras_glmm GLMM"):
        kg.load_model(other_path)
    with pytest.raises(FileNotFoundError):
        kg.load_model(tmp_path / "missing.keras")
