"""glmmTMB's nbinom1 and ordinal::clmm's cumulative link mixed models, against R; gamma's
Residual row against lme4 and glmmTMB.

Reference numbers: `tests/reference/nbinom1_ordinal_reference.json`, made by
`make_reference_nbinom1_ordinal.R` (R 4.2.2, glmmTMB 1.1.5, ordinal 2022.11.16, lme4 1.1-31)
from the CSV files the tests read (`tests/data/salamanders.csv`, `owls.csv`, `sitka.csv`,
and the bundled `kg.datasets.load_wine()`). Acceptance: fixed effects and thresholds within
0.1 of R's standard error, sds and dispersion within 5%, logLik within 0.1.

Both kinds of model have one grouping factor, so the engine ends on the exact maximum
likelihood by adaptive quadrature: nbinom1 is compared with glmmTMB's Laplace fit (the
acceptance tolerances), the ordinal models with clmm's `nAGQ = 25` fit (the exact ML,
which we match to 1e-4 SE), and with its Laplace fit at the acceptance tolerances.
"""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
from keras_glmm import families

HERE = pathlib.Path(__file__).parent
REFERENCE = json.loads((HERE / "reference" / "nbinom1_ordinal_reference.json").read_text())
WINE = "rating ~ temp + contact + (1|judge)"


def _values(mapping):
    return np.array(list(mapping.values()), dtype=np.float64)


# ------------------------------------------------------------------ nbinom1
@pytest.mark.parametrize("case", ["salamanders_nbinom1", "owls_nbinom1"])
def test_nbinom1_matches_glmmtmb(case):
    ref = REFERENCE[case]
    data = pd.read_csv(HERE / "data" / ref["data"])
    fit = kg.glmm(ref["formula"], data, family="nbinom1")
    assert fit.family.name == "nbinom1" and fit.fit_summary_["likelihood"] == "quadrature"
    assert list(fit.fixef().index) == list(ref["fixef"])
    se = _values(ref["se"])
    np.testing.assert_array_less(np.abs(fit.fixef().to_numpy() - _values(ref["fixef"])), 0.1 * se)
    np.testing.assert_allclose(fit.varcorr()["sdcor"].to_numpy(), [ref["varcorr"][0]["sdcor"]], rtol=0.05)
    assert fit.dispersion()["dispersion"] == pytest.approx(ref["sigma"], rel=0.05)  # glmmTMB's sigma = phi
    assert fit.logLik() == pytest.approx(ref["logLik"], abs=0.1)
    np.testing.assert_allclose(fit.coef_table()["Std. Error"].to_numpy(), se, rtol=0.03)


def test_nbinom1_is_the_negative_binomial_of_size_mu_over_phi():
    """log p(y) = log NB(y; size = mu / phi, prob = 1 / (1 + phi)); mean mu, variance mu (1 + phi)."""
    from scipy import stats

    family = families.get_family("negative_binomial1")
    assert family.name == "nbinom1" and family.dispersion_params == ("dispersion",)
    y, eta, phi = np.array([0.0, 1.0, 5.0, 12.0]), np.array([-1.0, 0.3, 1.5, 2.2]), 1.7
    want = stats.nbinom.logpmf(y, np.exp(eta) / phi, 1.0 / (1.0 + phi))
    np.testing.assert_allclose(family.log_prob(y, eta, {"dispersion": phi}).numpy(), want, rtol=1e-12)
    dist = family.distribution(eta, {"dispersion": phi})
    np.testing.assert_allclose(dist.mean().numpy(), np.exp(eta), rtol=1e-12)
    np.testing.assert_allclose(dist.variance().numpy(), np.exp(eta) * (1.0 + phi), rtol=1e-12)


# ------------------------------------------------------------------ ordinal
@pytest.fixture(scope="module")
def wine():
    return kg.datasets.load_wine()


@pytest.fixture(scope="module")
def wine_logit(wine):
    return kg.glmm(WINE, wine, family="ordinal")


def check_clmm(fit, ref, fixef_tol, sd_tol, loglik_tol, se_tol=None):
    assert list(fit.fixef().index) == list(ref["fixef"])
    thresholds = fit.fixef(component="thresholds")
    assert list(thresholds.index) == list(ref["thresholds"]) == ["1|2", "2|3", "3|4", "4|5"]
    np.testing.assert_array_less(np.abs(fit.fixef().to_numpy() - _values(ref["fixef"])),
                                 fixef_tol * _values(ref["se"]))
    np.testing.assert_array_less(np.abs(thresholds.to_numpy() - _values(ref["thresholds"])),
                                 fixef_tol * _values(ref["thresholds_se"]))
    assert fit.varcorr()["sdcor"].iloc[0] == pytest.approx(ref["varcorr"][0]["sdcor"], rel=sd_tol)
    assert fit.logLik() == pytest.approx(ref["logLik"], abs=loglik_tol)
    if se_tol is not None:
        np.testing.assert_allclose(fit.coef_table()["Std. Error"].to_numpy(), _values(ref["se"]), rtol=se_tol)
        np.testing.assert_allclose(fit.coef_table(component="thresholds")["Std. Error"].to_numpy(),
                                   _values(ref["thresholds_se"]), rtol=se_tol)


@pytest.mark.parametrize("link", ["logit", "probit"])
def test_ordinal_matches_clmm(wine, wine_logit, link):
    fit = wine_logit if link == "logit" else kg.glmm(WINE, wine, family=f"cumulative_{link}")
    assert fit.family.link.name == link and fit.fit_summary_["likelihood"] == "quadrature"
    # The exact ML: clmm's adaptive quadrature with 25 nodes, estimates to 1e-3 SE and SEs to 1e-3.
    check_clmm(fit, REFERENCE[f"wine_clmm_{link}_agq25"], 1e-3, 1e-3, 1e-4, se_tol=1e-3)
    # clmm's default, Laplace: the acceptance tolerances.
    check_clmm(fit, REFERENCE[f"wine_clmm_{link}_laplace"], 0.1, 0.05, 0.1, se_tol=0.03)
    assert fit.nobs() == 72 and fit.AIC() == pytest.approx(-2 * fit.logLik() + 2 * REFERENCE[
        f"wine_clmm_{link}_agq25"]["df"])


def test_ordinal_by_stochastic_vi_matches_clmm(wine):
    """Mean-field VI through TensorFlow (the Keras loss): a lower bound within 0.1 of clmm's logLik."""
    fit = kg.glmm(WINE, wine, family="ordinal", posterior="mean_field")
    assert fit.posterior_kind == "mean-field" and fit.converged_
    ref = REFERENCE["wine_clmm_logit_agq25"]
    check_clmm(fit, ref, 0.1, 0.05, 0.1)
    assert fit.logLik() <= ref["logLik"] + 1e-3
    with pytest.raises(ValueError, match="Standard errors of the thresholds"):
        fit.vcov(component="thresholds")


def test_ordinal_probabilities_are_clmms_model(wine, wine_logit):
    """P(y <= k) = F(theta_k - eta), eta = x' beta (+ the judge's effect): by hand from fixef and ranef."""
    fit = wine_logit
    beta, theta = fit.fixef(), fit.fixef(component="thresholds").to_numpy()
    new = wine.iloc[[0, 5, 30, 70]]
    eta = (beta["tempwarm"] * (new["temp"] == "warm").to_numpy() + beta["contactyes"] * (
        new["contact"] == "yes").to_numpy())
    cumulative = 1.0 / (1.0 + np.exp(-(theta[None, :] - eta[:, None])))
    want = np.diff(np.concatenate([np.zeros((4, 1)), cumulative, np.ones((4, 1))], axis=1), axis=1)
    population = fit.predict_response(new, re_form="~0")
    assert list(population.columns) == ["1", "2", "3", "4", "5"] and list(population.index) == list(new.index)
    np.testing.assert_allclose(population.to_numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fit.predict_response(new, re_form="~0", type="link"), eta, atol=1e-5)
    # Conditional on the judges: eta + b_judge.
    b = fit.ranef()["judge"]["(Intercept)"]
    eta_j = eta + new["judge"].astype(str).map(b).to_numpy()
    cumulative = 1.0 / (1.0 + np.exp(-(theta[None, :] - eta_j[:, None])))
    want = np.diff(np.concatenate([np.zeros((4, 1)), cumulative, np.ones((4, 1))], axis=1), axis=1)
    np.testing.assert_allclose(fit.predict_response(new).to_numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fit.predict_response(new).sum(axis=1), 1.0, rtol=1e-12)
    assert fit.fitted().shape == (72, 5)
    draws = fit.simulate(nsim=3, seed=0)
    assert set(np.unique(draws)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_ordinal_report_and_keras_round_trip(wine, wine_logit, tmp_path):
    import keras

    text = wine_logit.report()
    assert "Threshold coefficients:" in text and "3|4" in text.split("Threshold coefficients:")[1]
    assert "(Intercept)" not in text.split("Fixed effects:")[1]
    path = tmp_path / "wine.keras"
    wine_logit.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.family == wine_logit.family
    pd.testing.assert_series_equal(loaded.fixef(component="thresholds"), wine_logit.fixef(component="thresholds"))
    pd.testing.assert_frame_equal(loaded.predict_response(wine.iloc[::7]), wine_logit.predict_response(wine.iloc[::7]))


def test_ordinal_responses_and_their_errors(wine, wine_logit):
    # Integer codes: the same categories and fit.
    codes = wine.assign(rating=wine["rating"].astype(int))
    fit = kg.glmm(WINE, codes, family="cumulative_logit")
    np.testing.assert_allclose(fit.fixef(component="thresholds"), wine_logit.fixef(component="thresholds"),
                               atol=1e-4)
    with pytest.raises(ValueError, match="needs the formula's intercept"):
        kg.glmm("rating ~ 0 + temp + contact + (1|judge)", wine, family="ordinal")
    letters = wine.assign(rating=wine["rating"].map(dict(zip("12345", "abcde"))).astype(str))
    with pytest.raises(ValueError, match="ordinal response 'rating' holds strings .* with no order"):
        kg.glmm(WINE, letters, family="ordinal")
    with pytest.raises(ValueError, match="has the probit link. Received: link='logit'"):
        families.get_family("cumulative_probit", link="logit")
    with pytest.raises(ValueError, match="component='thresholds' is an ordinal model's"):
        kg.glmm("Reaction ~ Days + (1|Subject)", kg.datasets.load_sleepstudy()).fixef(component="thresholds")
    # An unused category is dropped, with a warning (R drops unused levels).
    six = wine.assign(rating=pd.Categorical(wine["rating"].astype(str), categories=list("123456"), ordered=True))
    with pytest.warns(UserWarning, match=r"dropped unused categories \['6'\]"):
        fit = kg.glmm(WINE, six, family="ordinal")
    assert fit.family.levels == list("12345")


ORDINAL_PARAMS = {"gap_2": 2.5, "gap_3": 0.4, "gap_4": 1.9}


@pytest.mark.parametrize("link", ["logit", "probit"])
def test_ordinal_analytic_derivatives_are_autodiff(link):
    """As tests/test_engine.py's check of the other families, with an ordinal response and far tails."""
    import tensorflow as tf

    from keras_glmm.families.autodiff import derivatives_function

    fam = families.Ordinal(link, levels=list("12345"))
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(1, 6, n).astype(float)
    eta = rng.normal(0.0, 3.0, n)
    eta[:4] = [-12.0, 12.0, 15.0, -15.0]
    v = rng.uniform(0, 2, n)
    v[:5] = 0.0
    names = tuple(sorted(ORDINAL_PARAMS))
    ones = np.ones(n)
    for num_points in (fam.quadrature_points, 0):
        mine = fam.expected_log_prob_derivatives(y, eta, v, ORDINAL_PARAMS, num_points=num_points)
        traced = derivatives_function(fam, num_points, names, False)(
            tf.constant(y), tf.constant(eta), tf.constant(v), tf.constant(ones), tf.constant(ones),
            *[tf.constant(ORDINAL_PARAMS[k], tf.float64) for k in names])
        for got, want in zip(mine[:3], traced[:3]):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-9)
        if num_points:
            np.testing.assert_allclose(mine[3][5:], traced[3].numpy()[5:], rtol=1e-9, atol=1e-9)
        for name, g in zip(names, traced[4]):
            assert mine[4][name] == pytest.approx(float(g), rel=1e-9)
    # log p is the log of the category's probability, and concave in eta.
    probs = fam.category_probabilities(eta, ORDINAL_PARAMS)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    value, _, second, _ = fam.log_prob_derivatives(y, eta, ORDINAL_PARAMS)
    chosen = probs[np.arange(n), y.astype(int) - 1]
    plain = chosen > 1e-6  # elsewhere the difference of two cdfs cancels (or underflows): the kernel does not
    np.testing.assert_allclose(value[plain], np.log(chosen[plain]), rtol=1e-9, atol=1e-15)
    assert np.all(np.isfinite(value)) and np.all(second < 0) and (value < -15).any()


# ------------------------------------------------------------------ gamma's Residual row
def test_gamma_varcorr_has_the_residual_row():
    """lme4 prints a Residual row for a Gamma glmer fit, its sigma(): the coefficient of variation.
    Ours is the ML one, 1 / sqrt(shape), glmmTMB's sigma(fit) (lme4's glmer sigma is a moment
    estimate, sqrt(pwrss / n) = 0.0545 here, against the ML 0.0412)."""
    ref = REFERENCE["sitka_gamma_log_lme4"]
    assert [r["grp"] for r in ref["varcorr"]] == ["tree", "Residual"]
    assert ref["sigma"] == pytest.approx(np.sqrt(ref["pwrss"] / ref["nobs"]), rel=1e-9)
    data = pd.read_csv(HERE / "data" / ref["data"])
    fit = kg.glmm("size ~ treat + t + I(t**2) + (1|tree)", data, family="gamma", link="log")
    vc = fit.varcorr()
    assert list(vc["grp"]) == ["tree", "Residual"] and pd.isna(vc["var1"].iloc[1])
    assert vc["sdcor"].iloc[1] == pytest.approx(fit.sigma()) == pytest.approx(1.0 / np.sqrt(fit.dispersion()["shape"]))
    assert vc["vcov"].iloc[1] == pytest.approx(fit.sigma() ** 2)
    assert fit.sigma() == pytest.approx(ref["sigma_glmmTMB"], rel=0.05)
    # The tree sd is glmmTMB's ML one; lme4's glmer, which profiles its moment sigma, says 0.077.
    glmmtmb = json.loads((HERE / "reference" / "glmmtmb_reference.json").read_text())["sitka_gamma_log"]
    assert vc["sdcor"].iloc[0] == pytest.approx(glmmtmb["varcorr"][0]["sdcor"], rel=0.05)
    assert ref["varcorr"][0]["sdcor"] == pytest.approx(0.0770356, rel=1e-5)
    assert "Residual" in fit.report()


def test_two_categories_are_the_binomial_model(wine):
    """K = 2: P(y = 2) = F(eta - theta_1), the logit GLMM of y == 2 with intercept -theta_1."""
    two = wine.assign(high=pd.Categorical(np.where(wine["rating"].astype(int) >= 3, "high", "low"),
                                          categories=["low", "high"], ordered=True))
    ordinal = kg.glmm("high ~ temp + contact + (1|judge)", two, family="ordinal")
    assert ordinal.family.dispersion_params == () and list(ordinal.fixef(component="thresholds").index) == [
        "low|high"]
    binomial = kg.glmm("high ~ temp + contact + (1|judge)", two.assign(high=(two["high"] == "high").astype(int)),
                       family="binomial")
    np.testing.assert_allclose(ordinal.fixef(), binomial.fixef().drop("(Intercept)"), atol=1e-4)
    assert ordinal.fixef(component="thresholds").iloc[0] == pytest.approx(-binomial.fixef()["(Intercept)"], abs=1e-4)
    assert ordinal.logLik() == pytest.approx(binomial.logLik(), abs=1e-6)


def test_ordinal_models_refuse_files_and_export(tmp_path):
    """Neither path computes an ordinal model's answer (category probabilities from every
    row's categories): both are refused with a message, not run."""
    wine = kg.datasets.load_wine()
    path = tmp_path / "wine.csv"
    wine.to_csv(path, index=False)
    with pytest.raises(ValueError, match="ordinal model is fitted in memory"):
        kg.GLMM.from_formula("rating ~ temp + contact + (1|judge)", kg.read_csv(str(path)), family="ordinal")
    fit = kg.glmm("rating ~ temp + contact + (1|judge)", wine, family="ordinal", epochs=2)
    with pytest.raises(ValueError, match="ordinal model has no SavedModel export"):
        fit.export(str(tmp_path / "served"))
