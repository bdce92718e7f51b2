"""GLMM fits through the layer API against lme4's reference fits.

Reference numbers come from `lme4_reference.json` (lme4 1.1-31, R 4.2.2; ML fits,
glmer's Laplace approximation for cbpp), copied here as facts so the tests run from
a fresh clone. Each data set is fitted once per module and reused (as MixedModels.jl's
test/modelcache.jl does).
"""

import numpy as np
import pytest

import keras_glmm as kg
import reference_data as refs

RADON_ML = refs.named("radon") | {"county": refs.named("radon")["county.(Intercept)"]}
SLEEPSTUDY_ML = refs.named("sleepstudy") | {"corr": refs.named("sleepstudy")["Subject.corr"]}
CBPP_FIXEF = refs.fixef("cbpp")
CBPP_SE = refs.se("cbpp")
CBPP_HERD_SD = refs.named("cbpp")["herd.(Intercept)"]
TUTORIAL = refs.TUTORIAL


def relerr(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def radon():
    df = kg.datasets.load_radon()
    x = {"x": np.stack([np.ones(len(df)), df.floor.values], 1), "county": df.county_code.values}
    return x, df.log_radon.values


@pytest.fixture(scope="module")
def radon_fit(radon):
    x, y = radon
    model = kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")], family="gaussian")
    history = model.fit(x, y)
    return model, history


def test_radon_matches_lme4_ml(radon, radon_fit):
    model, history = radon_fit
    x, y = radon
    assert model.converged_
    intercept, floor = model.coefficients()
    assert relerr(intercept, RADON_ML["(Intercept)"]) < 0.005
    assert relerr(floor, RADON_ML["floor"]) < 0.005
    assert relerr(model.random_effects[0].prior_stddev()[0], RADON_ML["county"]) < 0.005
    assert relerr(model.dispersion()["scale"], RADON_ML["Residual"]) < 0.005
    # With point-estimated variances the Gaussian q holds the exact posterior, so the
    # ELBO is the marginal log-likelihood at its maximum.
    assert abs(model.elbo(x, y)["elbo"] - RADON_ML["logLik"]) < 0.05


def test_history_holds_elbo_parts(radon_fit):
    _, history = radon_fit
    for key in ("loss", "elbo", "nll", "kl"):
        assert key in history.history
    h = {k: np.array(v) for k, v in history.history.items()}
    np.testing.assert_allclose(h["elbo"], -(h["nll"] + h["kl"]), rtol=1e-5)
    np.testing.assert_allclose(h["loss"], -h["elbo"], rtol=1e-5)
    # The per-observation ELBO times n is the total: -1081.8 / 919.
    assert abs(h["elbo"][-1] * 919 - RADON_ML["logLik"]) < 0.1


def test_radon_county_effects_are_the_exact_conditional_posterior(radon, radon_fit):
    """Given the ML estimates, each county's effect is N(m_c, v_c) in closed form."""
    model, _ = radon_fit
    x, y = radon
    beta = model.coefficients()
    sigma = model.dispersion()["scale"]
    tau = model.random_effects[0].prior_stddev()[0]
    resid = y - x["x"] @ beta
    counts = np.bincount(x["county"], minlength=85)
    sums = np.bincount(x["county"], weights=resid, minlength=85)
    precision = counts / sigma**2 + 1 / tau**2
    np.testing.assert_allclose(
        model.random_effects[0].conditional_mean()[:, 0], sums / sigma**2 / precision, atol=2e-3
    )
    np.testing.assert_allclose(
        model.random_effects[0].conditional_stddev()[:, 0], precision**-0.5, rtol=2e-3
    )


def test_sleepstudy_correlated_slopes_match_lme4():
    df = kg.datasets.load_sleepstudy()
    x = {
        "x": np.stack([np.ones(len(df)), df.Days.values], 1),
        "Subject": df.Subject.cat.codes.values,
        "Subject_z": df.Days.values[:, None].astype(float),
    }
    model = kg.GLMM(random_effects=[kg.RandomEffects(18, num_effects=2, name="Subject")])
    model.fit(x, df.Reaction.values)
    assert model.converged_
    re = model.random_effects[0]
    intercept, days = model.coefficients()
    assert relerr(intercept, SLEEPSTUDY_ML["(Intercept)"]) < 0.005
    assert relerr(days, SLEEPSTUDY_ML["Days"]) < 0.005
    sd = re.prior_stddev()
    assert relerr(sd[0], SLEEPSTUDY_ML["Subject.(Intercept)"]) < 0.01
    assert relerr(sd[1], SLEEPSTUDY_ML["Subject.Days"]) < 0.01
    assert abs(re.prior_correlation()[0, 1] - SLEEPSTUDY_ML["corr"]) < 0.02
    assert relerr(model.dispersion()["scale"], SLEEPSTUDY_ML["Residual"]) < 0.01
    assert abs(model.elbo(x, df.Reaction.values)["elbo"] - SLEEPSTUDY_ML["logLik"]) < 0.05


def test_cbpp_binomial_matches_lme4():
    df = kg.datasets.load_cbpp()
    design = np.column_stack(
        [np.ones(len(df))] + [(df.period == p).values.astype(float) for p in ["2", "3", "4"]]
    )
    x = {"x": design, "herd": df.herd.cat.codes.values}
    y = np.stack([df.incidence.values, df["size"].values], 1)
    model = kg.GLMM(random_effects=[kg.RandomEffects(15, name="herd")], family="binomial")
    model.fit(x, y)
    assert model.converged_
    assert np.all(np.abs(model.coefficients() - CBPP_FIXEF) < 0.25 * CBPP_SE)
    assert relerr(model.random_effects[0].prior_stddev()[0], CBPP_HERD_SD) < 0.10


def test_tutorial_model_lands_on_the_tutorial_numbers(radon):
    """The tutorial's exact model: N(0, 1) priors, HalfNormal(1) county scale, sd 1.

    Our ELBO for this model is deterministic (quadrature over q(tau)) and converges;
    the tutorial's noisy 3000 steps stop a little short of the same optimum, hence
    the county-scale tolerance.
    """
    x, y = radon
    model = kg.GLMM(
        random_effects=[kg.RandomEffects(85, scale_prior=1.0, name="county")],
        fixed_effects=kg.VariationalFixedEffects(prior_scale=1.0),
        fixed_params={"scale": 1.0},
    )
    model.fit(x, y)
    assert model.converged_
    (intercept, floor), _ = model.fixed_effects.coefficients()
    assert abs(intercept - TUTORIAL["intercept"]) < 0.01
    assert abs(floor - TUTORIAL["floor"]) < 0.01
    assert abs(model.random_effects[0].prior_stddev()[0] - TUTORIAL["county_scale"]) < 0.025
    # ...and far from lme4, because the likelihood scale is fixed at 1.
    assert relerr(intercept, RADON_ML["(Intercept)"]) > 0.01


def test_float64_reaches_lme4_to_many_digits(radon):
    """float64 for small exact problems: the ELBO is lme4's logLik to 1e-6 nats."""
    x, y = radon
    model = kg.GLMM(
        random_effects=[kg.RandomEffects(85, name="county", dtype="float64")], dtype="float64"
    )
    model.fit(x, y)
    assert model.coefficients().dtype == np.float64
    assert abs(model.elbo(x, y)["elbo"] - RADON_ML["logLik"]) < 1e-6
    np.testing.assert_allclose(model.coefficients(), [RADON_ML["(Intercept)"], RADON_ML["floor"]], rtol=1e-6)
