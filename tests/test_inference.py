"""lme4's inference after summary(): confint, profile, bootMer, anova, drop1, update, lmerTest's df,
intervals of predictions and simulate, on sleepstudy against lme4 1.1-31, lmerTest 3.1-3 and
pbkrtest 0.5-2 (tests/reference/make_reference_inference.R made every literal below)."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import keras_glmm as kg

# confint(fm, oldNames = FALSE) of the ML fit (profile), lme4 1.1-31.
LME4_PROFILE = {
    "sd_(Intercept)|Subject": (14.3814811165, 37.716018740),
    "cor_Days.(Intercept)|Subject": (-0.4815004432, 0.684986139),
    "sd_Days|Subject": (3.8011647624, 8.753366659),
    "sigma": (22.8982662150, 28.857997323),
    "(Intercept)": (237.6806954694, 265.129514692),
    "Days": (7.3586532953, 13.575918741),
}
# confint(fm, level = 0.9, oldNames = FALSE)
LME4_PROFILE_90 = {"sigma": (23.2983265687, 28.2878323234), "Days": (7.9005079919, 13.0340634893)}
# confint(fm, method = "Wald", oldNames = FALSE)
LME4_WALD = {"(Intercept)": (238.406383133, 264.40382656), "Days": (7.522968844, 13.41160308)}
# anova(fm0, fm): (1 | Subject) against (Days | Subject), ML (and the REML fits refitted).
LME4_ANOVA = {"npar": (4, 6), "AIC": (1802.078643, 1763.939344), "BIC": (1814.850470, 1783.097086),
              "logLik": (-897.0393215, -875.9696722), "Chisq": 42.13929852, "Df": 2, "p": 7.072412638e-10}
# drop1(fm, test = "Chisq")
LME4_DROP1 = {"AIC_none": 1763.939344, "AIC_Days": 1785.475882, "LRT": 23.53653747, "p": 1.225639973e-06}
# lmerTest: coef(summary(fit, ddf = "Satterthwaite")): df and Pr(>|t|) of (Intercept), Days.
LMERTEST_REML = {"df": (16.99972629, 16.99998373), "p": (1.171558111e-17, 3.263824470e-06)}
LMERTEST_ML = {"df": (18.00113477, 18.00017693), "p": (1.263751938e-18, 1.652227905e-06)}
LMERTEST_INTERCEPT_ONLY_REML = {"df": (22.81019896, 161.00000005), "p": (2.241350959e-18, 6.412601231e-27)}

FORMULA = "Reaction ~ Days + (Days | Subject)"
FORMULA0 = "Reaction ~ Days + (1 | Subject)"


@pytest.fixture(scope="module")
def sleep():
    return kg.datasets.load_sleepstudy()


@pytest.fixture(scope="module")
def fm(sleep):
    return kg.glmm(FORMULA, sleep)


@pytest.fixture(scope="module")
def fm0(sleep):
    return kg.glmm(FORMULA0, sleep)


@pytest.fixture(scope="module")
def fr(sleep):
    return kg.glmm(FORMULA, sleep, reml=True)


def _check_intervals(frame, reference, fraction):
    """Each end within `fraction` of lme4's interval width."""
    for name, (low, high) in reference.items():
        width = high - low
        assert abs(frame.loc[name].iloc[0] - low) < fraction * width, (name, frame.loc[name].tolist(), low)
        assert abs(frame.loc[name].iloc[1] - high) < fraction * width, (name, frame.loc[name].tolist(), high)


# ------------------------------------------------------------------ confint
def test_profile_confint_matches_lme4(fm):
    ci = fm.confint()
    assert list(ci.index) == list(LME4_PROFILE)
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    # lme4 interpolates a spline through its profile; ours solves for zeta = +-1.96:
    # the ends agree within 1e-3 of the width (the acceptance asks for 1%).
    _check_intervals(ci, LME4_PROFILE, 1e-3)


def test_profile_confint_level_and_parm(fm):
    ci = fm.confint(parm=["sigma", "Days"], level=0.9)
    assert list(ci.columns) == ["5 %", "95 %"]
    assert list(ci.index) == ["sigma", "Days"]
    _check_intervals(ci, LME4_PROFILE_90, 1e-3)


def test_profile_of_a_reml_fit_is_the_ml_profile_as_lme4(fr):
    # lme4's confint of the REML fit equals the ML fit's (its profile refits by ML).
    ci = fr.confint(parm=["sd_(Intercept)|Subject", "(Intercept)"])
    _check_intervals(ci, {k: LME4_PROFILE[k] for k in ci.index}, 1e-3)


# confint(fit, oldNames = FALSE), ML: uncorrelated slopes, a singular fit, crossed terms.
MORE_PROFILES = [
    ("Reaction ~ Days + (Days || Subject)", "load_sleepstudy", {
        "sd_(Intercept)|Subject": (15.258646166, 37.78646394), "sd_Days|Subject": (3.964074373, 8.76916043),
        "sigma": (22.880554680, 28.78759756), "(Intercept)": (237.572148000, 265.23806177),
        "Days": (7.334066827, 13.60050511)}),
    ("Yield ~ 1 + (1 | Batch)", "load_dyestuff2", {
        "sd_(Intercept)|Batch": (0.0, 2.084043489), "sigma": (2.892831020, 4.815832552),
        "(Intercept)": (4.312100217, 7.019092347)}),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "load_penicillin", {
        "sd_(Intercept)|plate": (0.6335659660, 1.1821039851), "sd_(Intercept)|sample": (1.0957893965, 3.5562917781),
        "sigma": (0.4858454001, 0.6294534786), "(Intercept)": (21.2666273831, 24.6778176158)}),
]


@pytest.mark.parametrize("formula, loader, reference", MORE_PROFILES, ids=["uncorrelated", "singular", "crossed"])
def test_profile_confint_of_other_designs(formula, loader, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dyestuff2's singular-fit warning
        fit = kg.glmm(formula, getattr(kg.datasets, loader)())
    ci = fit.confint()
    assert list(ci.index) == list(reference)
    # Dyestuff2's sd is 0: its lower end is the bound, as lme4's; its intercept's ends are
    # 0.12% of the width from lme4's (the others within 1e-4).
    _check_intervals(ci, reference, 2e-3)


def test_wald_confint_as_lme4(fm):
    ci = fm.confint(method="Wald")
    assert ci.iloc[:4].isna().all().all()  # lme4: NA for the variance parameters
    _check_intervals(ci, LME4_WALD, 1e-4)


def test_confint_errors(fm, sleep):
    with pytest.raises(ValueError, match="method"):
        fm.confint(method="bootstrap")
    with pytest.raises(ValueError, match="level"):
        fm.confint(level=95)
    with pytest.raises(ValueError, match="sd_Days"):
        fm.confint(parm="Day")
    sleep = sleep.assign(slow=(sleep["Reaction"] > 300).astype(int))
    binomial = kg.glmm("slow ~ Days + (1 | Subject)", sleep, family="binomial")
    with pytest.raises(ValueError, match="method='Wald' or method='boot'"):
        binomial.confint()
    wald = binomial.confint(method="Wald")
    assert list(wald.index) == ["sd_(Intercept)|Subject", "(Intercept)", "Days"]


# ------------------------------------------------------------------ profile
def test_profile_trace_and_plot(fm):
    trace = fm.profile(parm="sigma")
    assert list(trace.columns) == [".par", ".zeta", "value"]
    assert set(trace[".par"]) == {"sigma"}
    # zeta is 0 at the estimate, increasing, and crosses +-1.96 at the profile interval.
    assert np.all(np.diff(trace[".zeta"]) > 0)
    centre = trace.loc[trace[".zeta"].abs().idxmin()]
    assert abs(centre["value"] - fm.sigma()) < 1e-3 and abs(centre[".zeta"]) < 1e-6
    low, high = LME4_PROFILE["sigma"]
    assert np.interp(low, trace["value"], trace[".zeta"]) == pytest.approx(-1.96, abs=0.02)
    assert np.interp(high, trace["value"], trace[".zeta"]) == pytest.approx(1.96, abs=0.02)
    assert trace[".zeta"].min() < -2.9 and trace[".zeta"].max() > 2.9
    fig = fm.plot_profile(parm="sigma")
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "sigma"


# ------------------------------------------------------------------ bootstrap
def test_parametric_bootstrap_intervals_near_the_profile(fm):
    # 50 samples only (a fast test): percentile ends within 30% of the profile width.
    ci = fm.confint(method="boot", nsim=50, seed=1)
    assert list(ci.index) == list(LME4_PROFILE)
    _check_intervals(ci, LME4_PROFILE, 0.3)
    draws = fm.bootMer(nsim=5, seed=7)
    assert draws.shape == (5, 6)
    pd.testing.assert_frame_equal(draws, fm.bootMer(nsim=5, seed=7))  # seeded


@pytest.mark.slow
def test_bootstrap_in_processes_equals_serial(fm):
    serial = fm.bootMer(nsim=4, seed=3)
    parallel = fm.bootMer(nsim=4, seed=3, n_jobs=2)
    np.testing.assert_allclose(parallel.to_numpy(), serial.to_numpy(), rtol=1e-8)


# ------------------------------------------------------------------ anova
def test_anova_likelihood_ratio_as_lme4(fm, fm0):
    table = kg.anova(fm, fm0, names=["fm", "fm0"])
    assert list(table.columns) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]
    assert list(table.index) == ["fm0", "fm"]  # ordered by npar, as lme4
    assert tuple(table["npar"]) == LME4_ANOVA["npar"]
    for column in ("AIC", "BIC", "logLik"):
        np.testing.assert_allclose(table[column], LME4_ANOVA[column], atol=1e-4)
    assert table["Chisq"].iloc[1] == pytest.approx(LME4_ANOVA["Chisq"], rel=1e-6)
    assert table["Df"].iloc[1] == LME4_ANOVA["Df"]
    assert table["Pr(>Chisq)"].iloc[1] == pytest.approx(LME4_ANOVA["p"], rel=1e-5)
    assert np.isnan(table["Chisq"].iloc[0])


def test_anova_refits_reml_fits_by_ml(fr, sleep):
    fr0 = kg.glmm(FORMULA0, sleep, reml=True)
    with pytest.warns(UserWarning, match=r"refitting model\(s\) with ML \(instead of REML\)"):
        table = kg.anova(fr0, fr)
    assert table["Chisq"].iloc[1] == pytest.approx(LME4_ANOVA["Chisq"], rel=1e-6)
    assert table["Pr(>Chisq)"].iloc[1] == pytest.approx(LME4_ANOVA["p"], rel=1e-5)
    assert fr.reml  # the fit given is left as it was


def test_anova_refuses_different_data_and_flags_non_nested(fm, fm0, sleep):
    fewer = kg.glmm(FORMULA, sleep.iloc[:170])
    with pytest.raises(ValueError, match="numbers of observations differ"):
        kg.anova(fm0, fewer)
    other = kg.glmm(FORMULA0, sleep.assign(Reaction=sleep["Reaction"] * 2))
    with pytest.raises(ValueError, match="different response values"):
        kg.anova(fm0, other)
    with pytest.raises(ValueError, match="two or more models"):
        kg.anova(fm)
    squared = kg.glmm("Reaction ~ I(Days**2) + (1 | Subject)", sleep)  # 4 parameters, as fm0
    with pytest.warns(UserWarning, match="not nested"):
        table = kg.anova(fm0, squared)
    assert table["Df"].iloc[1] == 0 and np.isnan(table["Pr(>Chisq)"].iloc[1])


# ------------------------------------------------------------------ drop1 / update
def test_drop1_as_lme4(fm):
    table = fm.drop1()
    assert list(table.index) == ["<none>", "Days"]
    assert list(table.columns) == ["npar", "AIC", "LRT", "Pr(Chi)"]
    assert table.loc["Days", "npar"] == 1
    assert table.loc["<none>", "AIC"] == pytest.approx(LME4_DROP1["AIC_none"], abs=1e-4)
    assert table.loc["Days", "AIC"] == pytest.approx(LME4_DROP1["AIC_Days"], abs=1e-4)
    assert table.loc["Days", "LRT"] == pytest.approx(LME4_DROP1["LRT"], rel=1e-6)
    assert table.loc["Days", "Pr(Chi)"] == pytest.approx(LME4_DROP1["p"], rel=1e-5)


def test_update_formula_and_options(fm, fm0, sleep):
    assert kg.inference.update_formula(FORMULA, ". ~ . - Days") == "Reaction ~ (Days | Subject)"
    assert kg.inference.update_formula(FORMULA, ". ~ . - (Days | Subject) + (1 | Subject)") == FORMULA0
    assert kg.inference.update_formula("y ~ a*b", "log(.) ~ . - a:b") == "log(y) ~ a*b - a:b"
    smaller = fm.update(". ~ . - (Days|Subject) + (1|Subject)")
    assert smaller.logLik() == pytest.approx(fm0.logLik(), abs=1e-6)
    reml = fm.update(reml=True)
    assert reml.reml and reml.design.spec.formula == FORMULA
    with pytest.raises(ValueError, match="'~'"):
        fm.update("- Days")


# ------------------------------------------------------------------ degrees of freedom
@pytest.mark.parametrize("formula, reml, reference", [
    (FORMULA, True, LMERTEST_REML),
    (FORMULA, False, LMERTEST_ML),
    (FORMULA0, True, LMERTEST_INTERCEPT_ONLY_REML),
])
def test_satterthwaite_as_lmertest(sleep, formula, reml, reference):
    fit = kg.glmm(formula, sleep, reml=reml)
    table = fit.coef_table(ddf="Satterthwaite")
    assert list(table.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    # Within lmerTest's own numerical-derivative error (its ML df 18.0011 where the balanced
    # design's df is 18; ours 18.000001).
    np.testing.assert_allclose(table["df"], reference["df"], rtol=1e-4)
    # p of 1e-18 moves by 0.2% with a t value 3e-5 off (the fit's SE, within 1e-4 of lme4's).
    np.testing.assert_allclose(np.log10(table["Pr(>|t|)"]), np.log10(reference["p"]), atol=2e-3)
    np.testing.assert_allclose(table[["Estimate", "Std. Error", "t value"]], fit.coef_table(), rtol=1e-10)


# pbkrtest via lmerTest: coef(summary(fit, ddf = "Kenward-Roger")), REML.
PBKRTEST = {FORMULA: {"df": (17.0, 17.0)}, FORMULA0: {"df": (22.81019909, 161.0)}}
# Every 7th row of sleepstudy left out: Satterthwaite and Kenward-Roger differ, and KR adjusts the SEs.
UNBALANCED = {
    "Satterthwaite": {"df": (17.10854245, 16.81555269), "se": (6.858379383, 1.757663919)},
    "Kenward-Roger": {"df": (16.97411341, 16.98983571), "se": (6.860445302, 1.757972254)},
}


@pytest.mark.parametrize("formula", [FORMULA, FORMULA0])
def test_kenward_roger_as_pbkrtest(sleep, formula):
    fit = kg.glmm(formula, sleep, reml=True)
    table = fit.coef_table(ddf="Kenward-Roger")
    np.testing.assert_allclose(table["df"], PBKRTEST[formula]["df"], rtol=1e-6)


@pytest.mark.parametrize("ddf", ["Satterthwaite", "Kenward-Roger"])
def test_degrees_of_freedom_of_an_unbalanced_design(sleep, ddf):
    fit = kg.glmm(FORMULA, sleep.drop(index=sleep.index[::7]), reml=True)
    table = fit.coef_table(ddf=ddf)
    np.testing.assert_allclose(table["df"], UNBALANCED[ddf]["df"], rtol=1e-4)
    # Within the fit's own agreement with lme4 (1e-5 relative).
    np.testing.assert_allclose(table["Std. Error"], UNBALANCED[ddf]["se"], rtol=3e-5)
    np.testing.assert_allclose(table["t value"], table["Estimate"] / table["Std. Error"], rtol=1e-6)


def test_degrees_of_freedom_errors(fm, fr):
    with pytest.raises(ValueError, match="reml=True.*Satterthwaite"):
        fm.coef_table(ddf="Kenward-Roger")  # pbkrtest's KR is for REML fits
    with pytest.raises(ValueError, match="ddf"):
        fr.coef_table(ddf="residual")


# ------------------------------------------------------------------ prediction intervals
def test_confidence_interval_of_the_population_mean_is_wald(fm, sleep):
    new = sleep.iloc[[0, 1, 15]]
    table = fm.predict_response(new, interval="confidence", re_form="~0")
    assert list(table.columns) == ["fit", "lower", "upper"] and list(table.index) == [0, 1, 15]
    # Days = 0: the interval of the intercept, lme4's Wald interval.
    assert table.loc[0, "lower"] == pytest.approx(LME4_WALD["(Intercept)"][0], abs=1e-3)
    assert table.loc[0, "upper"] == pytest.approx(LME4_WALD["(Intercept)"][1], abs=1e-3)
    np.testing.assert_allclose(table["fit"], fm.predict_response(new, re_form="~0"), rtol=1e-6)
    # The subject's own mean: wider (its conditional variance added), centred on its prediction.
    own = fm.predict_response(new, interval="confidence")
    np.testing.assert_allclose(own["fit"], fm.predict_response(new), rtol=1e-6)
    assert np.all(own["upper"] - own["lower"] > table["upper"] - table["lower"])
    assert isinstance(fm.predict_response(new), pd.Series)  # no interval: one value per row


def test_prediction_interval_of_a_new_subject(fm, sleep):
    new = sleep.iloc[[0, 13]].assign(Subject="new")
    table = fm.predict_response(new, interval="prediction", level=0.9)
    x = np.column_stack([np.ones(2), new["Days"]])
    sd = fm.varcorr()
    s0, s1, rho = sd["sdcor"].iloc[0], sd["sdcor"].iloc[1], sd["sdcor"].iloc[2]
    sigma_b = np.array([[s0**2, rho * s0 * s1], [rho * s0 * s1, s1**2]])
    var = np.einsum("ij,jk,ik->i", x, fm.vcov().to_numpy() + sigma_b, x) + fm.sigma() ** 2
    half = stats.norm.ppf(0.95) * np.sqrt(var)
    np.testing.assert_allclose(table["upper"] - table["fit"], half, rtol=1e-5)
    np.testing.assert_allclose(table["fit"] - table["lower"], half, rtol=1e-5)
    sleep = sleep.assign(slow=(sleep["Reaction"] > 300).astype(int))
    binomial = kg.glmm("slow ~ Days + (1 | Subject)", sleep, family="binomial")
    with pytest.raises(ValueError, match="posterior_predictive"):
        binomial.predict_response(sleep, interval="prediction")
    ci = binomial.predict_response(sleep.iloc[:3], interval="confidence")
    assert np.all((ci["lower"] < ci["fit"]) & (ci["fit"] < ci["upper"]) & (ci["upper"] < 1))


# ------------------------------------------------------------------ simulate
def test_simulate_re_form_and_newdata(fm, sleep):
    sigma = fm.sigma()
    # re_form=None: every random effect held at its conditional mean, only the residual drawn.
    # A data-frame fit answers in lme4's layout (rows x sim_1..); (nsim, rows) here.
    held = fm.simulate(4000, seed=0, re_form=None).to_numpy().T
    np.testing.assert_allclose(held.mean(axis=0), fm.fitted(), atol=5 * sigma / math.sqrt(4000))  # 180 rows
    assert held.std(axis=0).mean() == pytest.approx(sigma, rel=0.02)
    # The default (lme4's re.form = NA): subjects drawn afresh, Var = z' Sigma z + sigma^2.
    drawn = fm.simulate(4000, seed=0).to_numpy().T
    s0 = fm.varcorr()["sdcor"].iloc[0]
    assert drawn[:, 0].var() == pytest.approx(s0**2 + sigma**2, rel=0.08)  # Days = 0
    np.testing.assert_array_equal(drawn, fm.simulate(4000, seed=0).to_numpy().T)
    # newdata with two new subjects: each drawn once for all its rows.
    new = pd.DataFrame({"Days": [0, 0, 0], "Subject": ["a", "a", "b"], "Reaction": 0.0})
    sims = fm.simulate(3000, seed=1, newdata=new, re_form=None)
    assert list(sims.index) == [0, 1, 2] and list(sims.columns[:2]) == ["sim_1", "sim_2"]
    sims = sims.to_numpy().T
    assert sims.shape == (3000, 3)
    cov = np.cov(sims.T)
    assert cov[0, 1] == pytest.approx(s0**2, rel=0.15)  # the same new subject
    assert abs(cov[0, 2]) < 0.15 * s0**2  # different subjects
