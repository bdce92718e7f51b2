"""StructuredGLMM: partially factorized VI for gaussian random-intercept models."""

import numpy as np
import pytest

import keras_glmm as kg
from keras_glmm.structured import StructuredGLMM


def _sds(fit):
    return dict(zip(fit.varcorr()["grp"], fit.varcorr()["sdcor"]))


def test_insteval_auto_picks_structured_and_matches_lme4():
    fit = kg.glmm("y ~ C(service) + (1|s) + (1|d) + (1|dept)", kg.datasets.load_insteval())
    assert isinstance(fit, StructuredGLMM)
    assert fit.posterior_kind == "structured"
    assert fit.converged_
    ref_fixef = np.array([3.2825809607, -0.092588542006])
    ref_se = np.array([0.028408338713, 0.013383152496])
    tol = np.maximum(0.01 * np.abs(ref_fixef), 0.05 * ref_se)
    assert np.all(np.abs(fit.fixef().values - ref_fixef) <= tol), fit.fixef().values
    se = np.sqrt(np.diag(fit.vcov().values))
    np.testing.assert_allclose(se, ref_se, rtol=0.10)
    sds = _sds(fit)
    ref = {"s": 0.32552770945, "d": 0.51498280367, "dept": 0.07851934835, "Residual": 1.1774930546}
    for grp, want in ref.items():
        assert abs(sds[grp] / want - 1) <= 0.02, (grp, sds[grp], want)
    # The History is the ELBO's: it never decreases under coordinate ascent.
    history = fit.history.history
    assert {"loss", "elbo", "nll", "kl"} <= set(history)
    assert np.all(np.diff(history["elbo"]) >= -1e-9)
    # The results API reads the layers the fit wrote.
    assert fit.ranef()["s"].shape == (2972, 2)
    assert np.all(np.isfinite(fit.predict_response()))
    assert "structured posterior" in fit.report()


def test_penicillin_structured_matches_lme4():
    df = kg.datasets.load_penicillin()
    fit = kg.glmm("diameter ~ 1 + (1|plate) + (1|sample)", df, posterior="structured")
    assert isinstance(fit, StructuredGLMM)
    assert fit.converged_
    assert fit.fit_summary_["exact"]
    sds = _sds(fit)
    for grp, want in {"plate": 0.84557251228, "sample": 1.7706474293, "Residual": 0.54993213952}.items():
        assert abs(sds[grp] / want - 1) <= 0.02, (grp, sds[grp], want)
    assert abs(fit.fixef().iloc[0] / 22.9722222222 - 1) <= 0.02


def test_penicillin_one_large_term_is_exact():
    # plate (24 levels) outside the joint block, sample (6) inside: still exact.
    df = kg.datasets.load_penicillin()
    fit = kg.glmm("diameter ~ 1 + (1|plate) + (1|sample)", df, posterior="structured", small_threshold=10)
    sds = _sds(fit)
    np.testing.assert_allclose([sds["plate"], sds["sample"], sds["Residual"]],
                               [0.84557251228, 1.7706474293, 0.54993213952], rtol=1e-3)


def test_dict_inputs_and_no_small_term():
    rng = np.random.default_rng(0)
    n, la, lb = 2000, 300, 250
    a, b = rng.integers(0, la, n), rng.integers(0, lb, n)
    x = np.stack([np.ones(n), rng.standard_normal(n)], 1)
    y = x @ [1.0, 0.5] + 0.7 * rng.standard_normal(la)[a] + 0.4 * rng.standard_normal(lb)[b] + rng.standard_normal(n)
    model = StructuredGLMM([kg.RandomEffects(la, name="a"), kg.RandomEffects(lb, name="b")])
    model.fit({"x": x, "a": a, "b": b}, y)
    assert model.converged_
    coef = model.fixef().values
    assert np.all(np.abs(coef - [1.0, 0.5]) < 0.15)
    assert np.sqrt(np.diag(model.vcov().values)).shape == (2,)
    pred = model.predict({"x": x, "a": a, "b": b}, verbose=0)["mean"]
    assert np.corrcoef(pred, y)[0, 1] > 0.6


def test_slopes_are_a_clear_error():
    with pytest.raises(ValueError, match="slopes are not supported by the structured posterior"):
        kg.GLMM.from_formula(
            "Reaction ~ Days + (Days|Subject)", kg.datasets.load_sleepstudy(), posterior="structured"
        )


def test_non_gaussian_is_an_error():
    with pytest.raises(ValueError, match="gaussian"):
        StructuredGLMM([kg.RandomEffects(5, name="g")], family="poisson")
