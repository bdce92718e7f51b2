"""Prior weights, as lme4 means them, in every fit (numbers in `tests/reference_data.py`).

A gaussian model's weights are precisions (row variance `sigma^2 / w`), a Poisson
model's multiply each row's log-likelihood; lme4 1.1-31 fitted both
(`weights_reference.json`, the Poisson at nAGQ = 25: the exact ML, as ours).
"""

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
import reference_data as refs


def _sleep():
    data = kg.datasets.load_sleepstudy()
    data["w"] = 1 + data["Days"] % 3
    return data


def _grouse():
    data = kg.datasets.load_grouseticks()
    data["w"] = 1 + np.arange(len(data)) % 3
    return data


def _check(fit, ref, rel_fixef, rel_sd, loglik=None, in_se=None):
    fixef = np.array(list(ref["fixef"].values()))
    if in_se is None:
        np.testing.assert_allclose(fit.fixef().values, fixef, rtol=rel_fixef)
    else:  # minibatch noise, in standard errors
        se = np.array(list(ref["se"].values()))
        assert np.all(np.abs(fit.fixef().values - fixef) <= in_se * se), (fit.fixef().values, fixef)
    want, got = refs.sdcor(ref), refs.fitted_sdcor(fit)
    for key, value in want.items():
        if refs.is_correlation(key):
            assert got[key] == pytest.approx(value, abs=rel_sd), key
        else:
            assert got[key] == pytest.approx(value, rel=rel_sd), key
    if loglik is not None:
        assert fit.fit_summary_["elbo"] == pytest.approx(ref["logLik"], abs=loglik)


@pytest.mark.parametrize("name,reml", [("sleepstudy_weights", False), ("sleepstudy_weights_reml", True)])
def test_gaussian_precision_weights_are_lme4s(name, reml):
    ref = refs.WEIGHTS[name]
    fit = kg.glmm(ref["formula"], _sleep(), weights="w", reml=reml)
    _check(fit, ref, 1e-5, 1e-4, loglik=1e-3)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov().values)), list(ref["se"].values()), rtol=1e-4)
    # Not the unweighted fit (what `weights=` used to give without a word).
    plain = kg.glmm(ref["formula"], _sleep(), reml=reml)
    assert abs(plain.fixef().values[0] - fit.fixef().values[0]) > 1.0


def test_gaussian_weights_by_stochastic_vi_minibatches_and_files(tmp_path):
    ref = refs.WEIGHTS["sleepstudy_weights"]
    data = _sleep()
    full = kg.glmm(ref["formula"], data, weights="w", posterior="mean_field")
    _check(full, ref, 1e-3, 0.01)
    minibatch = kg.glmm(ref["formula"], data, weights="w", batch_size=60, epochs=400)
    _check(minibatch, ref, None, 0.05, in_se=0.1)
    path = tmp_path / "sleep.csv"
    data.to_csv(path, index=False)
    streamed = kg.glmm(ref["formula"], kg.read_csv(str(path)), weights="w")
    _check(streamed, ref, 1e-3, 0.01)


def test_poisson_likelihood_weights_reach_lme4s_exact_ml():
    ref = refs.WEIGHTS["grouseticks_weights"]
    fit = kg.glmm(ref["formula"], _grouse(), family="poisson", weights="w")
    assert fit.fit_summary_["likelihood"] == "quadrature"
    # (lme4's logLik at nAGQ > 1 is relative to the saturated model: not compared.)
    _check(fit, ref, 1e-3, 0.01)
    # Stochastic VI honours them too (its ELBO's optimum is close to the ML).
    svi = kg.glmm(ref["formula"], _grouse(), family="poisson", weights="w", posterior="mean_field")
    np.testing.assert_allclose(svi.fixef().values, list(ref["fixef"].values()), atol=0.05)


@pytest.mark.parametrize(
    "values,message",
    [
        (lambda n: np.r_[np.ones(n - 1), -1.0], r"weights 'w' must be finite and non-negative: row 179 has -1.0"),
        (lambda n: np.r_[np.ones(3), np.nan, np.ones(n - 4)], r"missing values in column\(s\) \['weights'\]"),
    ],
)
def test_bad_weights_name_the_row(values, message):
    data = _sleep()
    data["w"] = values(len(data))
    with pytest.raises(ValueError, match=message):
        kg.glmm("Reaction ~ Days + (Days | Subject)", data, weights="w")


def test_weights_of_the_wrong_length_name_the_argument():
    with pytest.raises(ValueError, match=r"weights has shape \(3,\), expected \(180,\)"):
        kg.glmm("Reaction ~ Days + (Days | Subject)", _sleep(), weights=np.ones(3))
    model = kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")])
    radon = kg.datasets.load_radon()
    x = {"x": np.stack([np.ones(len(radon)), radon.floor.values], 1), "county": radon.county_code.values}
    with pytest.raises(ValueError, match="`sample_weight` has 5 values but the data have 919 rows"):
        model.fit(x, radon.log_radon.values, sample_weight=np.ones(5))


def test_posterior_predictive_uses_the_new_rows_weights():
    ref = refs.WEIGHTS["sleepstudy_weights"]
    fit = kg.glmm(ref["formula"], _sleep(), weights="w")
    new = pd.DataFrame({"Days": [4, 4], "Subject": ["308", "308"], "w": [1.0, 100.0]})
    draws = fit.posterior_predictive(new, num_draws=4000, seed=0)
    sigma = fit.dispersion()["scale"]
    # Row variance sigma^2 / w beside the (shared) linear predictor's variance.
    assert np.var(draws.iloc[0]) - np.var(draws.iloc[1]) == pytest.approx(sigma**2 * (1 - 1 / 100), rel=0.1)
