"""`glmm(formula, data, family)` on every case of lme4's reference file.

The numbers are lme4 1.1-31's fits (R 4.2.2), copied from
`shared/reference/lme4_reference.json` as facts: ML unless `reml`, glmer's Laplace
approximation for the binomial and Poisson cases. Tolerances are the project's
acceptance criteria:

- gaussian: fixed effects within max(1%, 0.05 lme4 SE), sds within 2%;
- binomial and Poisson: fixed effects within max(5%, 0.25 lme4 SE), sds within 10%,
  correlations within 0.05;
- fixed-effect standard errors within 10% of lme4's.
"""

import numpy as np
import pytest

import keras_glmm as kg

REFERENCE = {
    "radon": dict(
        data="radon", formula="log_radon ~ 1 + floor + (1|county)", family="gaussian", reml=False,
        fixef=[1.46115822, -0.69263647124], se=[0.051239934589, 0.070360216313],
        sdcor=[0.32446402067, 0.75515962093], logLik=-1081.8252865969,
    ),
    "radon_reml": dict(
        data="radon", formula="log_radon ~ 1 + floor + (1|county)", family="gaussian", reml=True,
        fixef=[1.4615978814, -0.69299373941], se=[0.051576225079, 0.070430813078],
        sdcor=[0.32822241145, 0.7555891498], logLik=-1085.6526463898,
    ),
    "sleepstudy": dict(
        data="sleepstudy", formula="Reaction ~ Days + (Days|Subject)", family="gaussian", reml=False,
        fixef=[251.4051048485, 10.4672859596], se=[6.6321227422, 1.5022302138],
        sdcor=[23.7797595895, 5.7167985139, 0.081321093427, 25.5919070365], logLik=-875.9696722445,
    ),
    "sleepstudy_uncorr": dict(
        data="sleepstudy", formula="Reaction ~ Days + (Days||Subject)", family="gaussian", reml=False,
        fixef=[251.4051048485, 10.4672859596], se=[6.707737453, 1.519305372],
        sdcor=[24.1715878781, 5.79936618, 25.5561229567], logLik=-876.0016275723,
    ),
    "penicillin": dict(
        data="penicillin", formula="diameter ~ 1 + (1|plate) + (1|sample)", family="gaussian",
        reml=False, fixef=[22.9722222222], se=[0.74459626575],
        sdcor=[0.84557251228, 1.7706474293, 0.54993213952], logLik=-166.0941743343,
    ),
    "cbpp": dict(
        data="cbpp", formula="cbind(incidence, size - incidence) ~ C(period) + (1|herd)",
        family="binomial", reml=False,
        fixef=[-1.3983428645, -0.99192497498, -1.1282162159, -1.5797454136],
        se=[0.2312140481, 0.30315064454, 0.32283015323, 0.42204915943],
        sdcor=[0.64206992773], logLik=-92.0265663895,
    ),
    "grouseticks": dict(
        data="grouseticks", formula="TICKS ~ C(YEAR) + HEIGHTs + (1|BROOD) + (1|LOCATION)",
        family="poisson", reml=False,
        fixef=[0.46687207123, 1.1655742052, -0.97793219272, -0.84663141666],
        se=[0.19202109401, 0.22978798106, 0.25482199326, 0.12459437666],
        sdcor=[0.76965337057, 0.57413573704], logLik=-987.9381569341,
    ),
    "insteval": dict(
        data="insteval", formula="y ~ C(service) + (1|s) + (1|d) + (1|dept)", family="gaussian",
        reml=False, fixef=[3.2825809607, -0.092588542006], se=[0.028408338713, 0.013383152496],
        sdcor=[0.32552770945, 0.51498280367, 0.07851934835, 1.1774930546], logLik=-118860.884387946,
    ),
}

# Which varcorr rows hold correlations (the rest are standard deviations).
CORRELATION_ROWS = {"sleepstudy": [2]}


def load(name):
    return getattr(kg.datasets, f"load_{name}")()


def check_against_lme4(name, fit):
    ref = REFERENCE[name]
    gaussian = ref["family"] == "gaussian"
    fixef = fit.fixef().values
    ref_fixef, ref_se = np.array(ref["fixef"]), np.array(ref["se"])
    rel, in_se = (0.01, 0.05) if gaussian else (0.05, 0.25)
    tol = np.maximum(rel * np.abs(ref_fixef), in_se * ref_se)
    assert np.all(np.abs(fixef - ref_fixef) <= tol), (fixef, ref_fixef, tol)

    se = np.sqrt(np.diag(fit.vcov().values))
    assert np.all(np.abs(se / ref_se - 1) <= 0.10), (se, ref_se)

    sdcor = fit.varcorr()["sdcor"].values
    assert len(sdcor) == len(ref["sdcor"])
    corr_rows = CORRELATION_ROWS.get(name, [])
    for i, (got, want) in enumerate(zip(sdcor, ref["sdcor"])):
        if i in corr_rows:
            assert abs(got - want) <= 0.05, (i, got, want)
        else:
            assert abs(got / want - 1) <= (0.02 if gaussian else 0.10), (i, got, want)
    assert fit.converged_


@pytest.mark.parametrize(
    "name", ["radon", "radon_reml", "sleepstudy", "sleepstudy_uncorr", "penicillin", "cbpp"]
)
def test_glmm_matches_lme4(name):
    ref = REFERENCE[name]
    fit = kg.glmm(ref["formula"], load(ref["data"]), family=ref["family"], reml=ref["reml"])
    check_against_lme4(name, fit)
    if ref["family"] == "gaussian":
        # The posterior is exact here (single factor, or the joint posterior), so the
        # ELBO is lme4's (restricted) log-likelihood.
        assert abs(fit.fit_summary_["elbo"] - ref["logLik"]) < 0.05


@pytest.mark.slow
def test_glmm_grouseticks_crossed_poisson():
    ref = REFERENCE["grouseticks"]
    fit = kg.glmm(ref["formula"], load(ref["data"]), family=ref["family"])
    assert fit.posterior_kind == "joint"
    check_against_lme4("grouseticks", fit)


@pytest.mark.slow
def test_glmm_insteval_crossed_and_nested():
    ref = REFERENCE["insteval"]
    fit = kg.glmm(ref["formula"], load(ref["data"]), family=ref["family"])
    # 4,114 coefficients: too many for the joint posterior; the structured one keeps
    # the departments (nested) with the fixed effects in a joint block.
    assert fit.posterior_kind == "structured"
    check_against_lme4("insteval", fit)


# ------------------------------------------------------------------ results
@pytest.fixture(scope="module")
def sleepstudy_fit():
    return kg.glmm("Reaction ~ Days + (Days|Subject)", load("sleepstudy"))


def test_results_vocabulary(sleepstudy_fit):
    fit = sleepstudy_fit
    assert list(fit.fixef().index) == ["(Intercept)", "Days"]
    vc = fit.varcorr()
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert list(vc["grp"]) == ["Subject", "Subject", "Subject", "Residual"]
    ranef = fit.ranef()["Subject"]
    assert ranef.shape == (18, 4)
    assert list(ranef.columns) == ["(Intercept)", "Days", "(Intercept) sd", "Days sd"]
    # lme4's first conditional modes (ranef(fit)$Subject["308", ]): 2.8158, 9.0755.
    np.testing.assert_allclose(ranef.loc["308", ["(Intercept)", "Days"]], [2.8158, 9.0755], atol=0.01)
    coef = fit.coef()["Subject"]
    np.testing.assert_allclose(coef["Days"].values, fit.fixef()["Days"] + ranef["Days"].values)
    table = fit.coef_table()
    assert list(table.columns) == ["Estimate", "Std. Error", "z value", "Pr(>|z|)"]
    np.testing.assert_allclose(table["z value"], table["Estimate"] / table["Std. Error"])
    text = fit.report()
    for piece in ["Reaction ~ Days + (Days|Subject)", "Random effects:", "Fixed effects:",
                  "Subject", "Residual", "Std. Error", "Converged", "AIC"]:
        assert piece in text


def test_predict_fitted_and_new_levels(sleepstudy_fit):
    import pandas as pd

    fit = sleepstudy_fit
    data = load("sleepstudy")
    np.testing.assert_allclose(fit.predict_response(data), fit.fitted(), rtol=1e-6)
    np.testing.assert_allclose(
        fit.residuals(), data["Reaction"].values - fit.fitted(), rtol=1e-6, atol=1e-4
    )
    new = pd.DataFrame({"Days": [0.0, 5.0, 5.0], "Subject": ["308", "999", "1000"]})
    population = fit.predict_response(new, re_form="~0")
    np.testing.assert_allclose(population, fit.fixef()["(Intercept)"] + fit.fixef()["Days"] * new["Days"], rtol=1e-6)
    pred = fit.predict_response(new)
    # A new level gets the population value, a known one its own.
    np.testing.assert_allclose(pred[1:], population[1:], rtol=1e-6)
    assert abs(pred[0] - population[0]) > 1.0
    with pytest.raises(ValueError, match="not seen in training"):
        fit.predict_response(new, allow_new_levels=False)
    # Prediction intervals include the random effects' uncertainty: a new subject's
    # interval is wider than a known subject's at the same day.
    draws = fit.posterior_predictive(new, num_draws=4000, seed=0)
    width = np.percentile(draws, 97.5, axis=0) - np.percentile(draws, 2.5, axis=0)
    assert width[1] > width[0] * 1.2
    sims = fit.simulate(3, seed=0)
    assert sims.shape == (3, 180)
    assert abs(sims.mean() - data["Reaction"].mean()) < 40


# ----------------------------------------------------------------- bad input
def test_formula_errors_are_clear():
    data = load("sleepstudy")
    with pytest.raises(ValueError, match=r"\^"):
        kg.glmm("Reaction ~ Days + (Days | Subject", data)
    with pytest.raises(ValueError, match="Dayz"):
        kg.glmm("Reaction ~ Dayz + (1 | Subject)", data)
    one = data.assign(g="a")
    with pytest.raises(ValueError, match="single level"):
        kg.glmm("Reaction ~ Days + (1 | g)", one)
    with pytest.raises(ValueError, match="categorical"):
        kg.glmm("Reaction ~ Days + (Subject | Days)", data.assign(Days=data.Days.astype(str)))
    with pytest.raises(ValueError, match="REML|reml"):
        kg.glmm("incidence ~ 1 + (1|herd)", load("cbpp"), family="poisson", reml=True)


def test_missing_values_raise_or_are_omitted():
    data = load("sleepstudy").copy()
    data.loc[[3, 7], "Reaction"] = np.nan
    with pytest.raises(ValueError, match=r"missing values.*Reaction"):
        kg.glmm("Reaction ~ Days + (1 | Subject)", data)
    with pytest.warns(RuntimeWarning, match="dropped 2 of 180 rows"):
        fit = kg.glmm("Reaction ~ Days + (1 | Subject)", data, na_action="omit")
    assert fit.fit_summary_["nobs"] == 178


def test_response_outside_support_is_named():
    data = load("grouseticks").copy()
    data.loc[5, "TICKS"] = -2
    with pytest.raises(ValueError, match="row 5"):
        kg.glmm("TICKS ~ 1 + (1|BROOD)", data, family="poisson")
