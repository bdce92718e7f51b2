"""lme4's guard rails (keras_glmm.checks): lme4's decision on each, and lme4's numbers
where a fit happens.

The numbers are lme4 1.1-31's (R 4.2.2), printed by `tests/reference/guard_rails.R`
(its output: `tests/reference/guard_rails.Rout`).
"""

import os
import warnings

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
from keras_glmm import checks
from keras_glmm.design import Design

# lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE), and the same
# with Days2 = 2 * Days added (lme4 drops Days2: the same fit).
SLEEP_FIXEF = {"(Intercept)": 251.40510485, "Days": 10.46728596}
SLEEP_VCOV = [[43.985052067, -1.370510491], [-1.370510491, 2.256695615]]
SLEEP_LOGLIK = -875.9696722
LME4_RANK_MESSAGE = "fixed-effect model matrix is rank deficient so dropping 1 column / coefficient"


@pytest.fixture(scope="module")
def sleep():
    data = kg.datasets.load_sleepstudy()
    data["Days2"] = 2 * data["Days"]
    return data


def binary_36():
    """guard_rails.R's `b`: 36 binary rows, 12 groups of 3."""
    i = np.arange(36)
    return pd.DataFrame({"y": np.tile([0, 1, 1, 0, 1, 0], 6), "x": i % 6 + 1.0, "g": i // 3 + 1, "obs": i + 1})


def separation_data():
    """guard_rails.R's `d`: every row of f = "b" is a success; y2 = (x > 0)."""
    i = np.arange(48)
    data = pd.DataFrame({"g": i // 6 + 1, "x": (i % 6) - 2.5, "f": np.where(i % 3 == 0, "b", "a")})
    data["y"] = np.where(data["f"] == "b", 1, ((i * 7) % 5 < 2).astype(int))
    data["y2"] = (data["x"] > 0).astype(int)
    return data


# ------------------------------------------------------------ 1. rank deficiency


def test_rank_deficient_design_drops_the_aliased_column_as_lme4(sleep, tmp_path):
    with pytest.warns(UserWarning, match=LME4_RANK_MESSAGE + r": 'Days2' \('Days2' = 2 \* 'Days'\)"):
        fit = kg.glmm("Reaction ~ Days + Days2 + (Days | Subject)", sleep)
    assert fit.design.fixed_columns == ["(Intercept)", "Days"]
    assert fit.design.fixed_dropped == ["Days2"]
    np.testing.assert_allclose(fit.fixef().to_numpy(), list(SLEEP_FIXEF.values()), rtol=1e-5)
    np.testing.assert_allclose(fit.vcov().to_numpy(), SLEEP_VCOV, rtol=1e-3)
    assert list(fit.coef_table().index) == ["(Intercept)", "Days"]
    assert not [line for line in fit.report().splitlines() if line.strip().startswith("Days2")]
    assert abs(fit.logLik() - SLEEP_LOGLIK) < 1e-3
    # The fit without the aliased column is the same fit, and predicts the same.
    plain = kg.glmm("Reaction ~ Days + (Days | Subject)", sleep)
    np.testing.assert_allclose(fit.fixef().to_numpy(), plain.fixef().to_numpy(), rtol=1e-6)
    expected = plain.predict_response(sleep)
    np.testing.assert_allclose(fit.predict_response(sleep), expected, rtol=1e-5)
    # The saved design remembers which columns it keeps.
    fit.save(tmp_path / "rank.keras")
    loaded = kg.load_model(tmp_path / "rank.keras")
    assert loaded.design.fixed_dropped == ["Days2"]
    np.testing.assert_allclose(loaded.predict_response(sleep), expected, rtol=1e-5)


def test_rank_deficient_design_keeps_the_earlier_column(sleep):
    """R's pivoting keeps the earlier of two aliased columns: Days2 here (lme4: 5.23364298)."""
    with pytest.warns(UserWarning, match=LME4_RANK_MESSAGE + ": 'Days'"):
        fit = kg.glmm("Reaction ~ Days2 + Days + (Days | Subject)", sleep)
    assert list(fit.fixef().index) == ["(Intercept)", "Days2"]
    np.testing.assert_allclose(fit.fixef().to_numpy(), [251.40510485, 5.23364298], rtol=1e-5)


def test_rank_deficient_design_saved_as_json_and_served(sleep):
    with pytest.warns(UserWarning, match="rank deficient"):
        design = Design.from_data("Reaction ~ Days + Days2 + (Days | Subject)", sleep)
    restored = Design.from_config(design.get_config())
    assert restored.fixed_dropped == ["Days2"] and restored.fixed_columns == ["(Intercept)", "Days"]
    np.testing.assert_array_equal(restored.fixed_matrix(sleep), np.column_stack([np.ones(180), sleep["Days"]]))


def test_rank_deficiency_can_stop(sleep):
    with pytest.raises(ValueError, match=r"rank deficient \(rank\(X\) = 2 < 3 = p\): 'Days2' = 2 \* 'Days'"):
        Design.from_data("Reaction ~ Days + Days2 + (Days | Subject)", sleep, checks={"rank_x": "stop"})


def test_near_collinear_columns_are_named_with_the_condition_number(sleep):
    noise = 1e-3 * ((np.arange(180) * 7) % 11 - 5) / 5
    data = sleep.assign(Days2=2 * sleep["Days"] + noise)
    with pytest.warns(UserWarning, match=r"condition number .* is [0-9.e+]+ \(above 1e\+04\), involving \['Days', 'Days2'\]"):
        design = Design.from_data("Reaction ~ Days + Days2 + (Days | Subject)", data)
    assert design.fixed_dropped == []  # not aliased: kept, as lme4 keeps it
    kappa, involved = checks.collinearity(checks.r_factor(design.fixed_matrix(data)), design.fixed_columns)
    assert kappa > 1e4 and set(involved) == {"Days", "Days2"}


def test_well_conditioned_designs_pass_without_a_word(recwarn):
    data = kg.datasets.load_sleepstudy()
    Design.from_data("Reaction ~ Days + I(Days ** 2) + (Days | Subject)", data)
    kappa, involved = checks.collinearity(
        checks.r_factor(np.column_stack([np.ones(180), data["Days"]])), ["(Intercept)", "Days"]
    )
    assert kappa < 4 and involved == []
    assert not [w for w in recwarn if "rank deficient" in str(w.message)]


# --------------------------------------------------------- 2. lme4's checks


def test_default_checks_are_lme4s():
    # lmerControl()$checkControl / glmerControl()$checkControl (guard_rails.Rout).
    for family, lmer in (("gaussian", True), ("binomial", False), (kg.families.get_family("gaussian", link="log"), False)):
        resolved = checks.resolve_checks(None, kg.families.get_family(family) if isinstance(family, str) else family)
        assert (resolved.nlev_gtr_1, resolved.nobs_vs_nlev, resolved.nobs_vs_nre) == ("stop", "stop", "stop")
        assert resolved.rank_x == "warning" and resolved.response_not_const == "stop"
        assert resolved.lmer is lmer
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nobs_vs_levels'\]; the checks are \["):
        checks.resolve_checks({"nobs_vs_levels": "ignore"})
    with pytest.raises(ValueError, match=r"`checks\['nobs_vs_nlev'\]` must be one of .*Received: 'off'"):
        checks.resolve_checks({"nobs_vs_nlev": "off"})


def test_nested_factor_with_a_level_per_row_stops_as_lmer(sleep):
    with pytest.raises(
        ValueError,
        match=r"number of levels of each grouping factor must be < number of observations \(problems: "
        r"Days:Subject\): Days:Subject has 180 levels for 180 observations",
    ):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject/Days)", sleep)
    # lme4's control turns the check off; then 180 random effects for 180 rows stop
    # (lmer's check.nobs.vs.nRE), unless that is turned off too.
    with pytest.raises(ValueError, match=r"number of observations \(=180\) <= number of random effects \(=180"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject/Days)", sleep, checks={"nobs_vs_nlev": "ignore"})
    quiet = {"nobs_vs_nlev": "ignore", "nobs_vs_nre": "ignore"}
    model = kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject/Days)", sleep, checks=quiet)
    assert [t.num_levels for t in model.terms] == [18, 180]
    with pytest.warns(UserWarning, match="problems: Days:Subject"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject/Days)", sleep, checks={**quiet, "nobs_vs_nlev": "warning"})


def test_single_level_grouping_factor_stops(sleep):
    data = sleep.assign(one="a")
    with pytest.raises(ValueError, match=r"grouping factors must have > 1 sampled level: grouping factor 'one'"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | one)", data)
    model = kg.GLMM.from_formula("Reaction ~ Days + (1 | one)", data, checks={"nlev_gtr_1": "ignore"})
    assert model.terms[0].num_levels == 1


def test_more_random_effects_than_observations_stops_as_lmer(sleep):
    s36 = sleep[sleep["Days"].isin([0, 1])]
    with pytest.raises(
        ValueError,
        match=r"number of observations \(=36\) <= number of random effects \(=54: 18 levels x 3 effects\) "
        r"for term \(1 \+ Days \+ I\(Days\*\*2\) \| Subject\)",
    ):
        kg.GLMM.from_formula("Reaction ~ Days + (1 + Days + I(Days ** 2) | Subject)", s36)
    with pytest.raises(ValueError, match=r"number of observations \(=36\) <= number of random effects \(=36"):
        kg.GLMM.from_formula("Reaction ~ Days + (Days | Subject)", s36)


def test_glmer_allows_as_many_levels_and_effects_as_observations():
    data = binary_36()
    # glmer: 36 levels for 36 rows and 36 random effects for 36 rows pass its checks ...
    kg.GLMM.from_formula("y ~ x + (1 | g) + (1 | obs)", data, family="binomial")
    kg.GLMM.from_formula("y ~ x + (1 + x + I(x ** 2) | g)", data, family="binomial")
    # ... 48 random effects do not.
    with pytest.raises(
        ValueError,
        match=r"number of observations \(=36\) < number of random effects \(=48: 12 levels x 4 effects\) .*"
        r"the random-effects parameters are probably unidentifiable \(checks=",
    ):
        kg.GLMM.from_formula("y ~ x + (1 + x + I(x ** 2) + I(x ** 3) | g)", data, family="binomial")


def test_observation_level_random_effect_still_fits():
    """cbpp with an observation-level random effect (56 levels, 56 rows): glmer fits it."""
    data = kg.datasets.load_cbpp_olre()
    model = kg.GLMM.from_formula(
        "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)", data, family="binomial"
    )
    assert [t.num_levels for t in model.terms] == [15, 56]


# ---------------------------------------------------------- 3. unused levels


def test_unused_category_of_the_fixed_part_is_dropped_as_r(sleep):
    data = sleep.assign(
        f=pd.Categorical(np.where(sleep["Days"] < 5, "early", "late"), categories=["early", "late", "never"])
    )
    fit = kg.glmm("Reaction ~ f + (1 | Subject)", data)
    assert list(fit.fixef().index) == ["(Intercept)", "flate"]
    np.testing.assert_allclose(fit.fixef().to_numpy(), [271.63017889, 53.75542556], rtol=1e-5)


def test_unused_category_of_a_grouping_factor_is_no_level():
    data = kg.datasets.load_sleepstudy()
    data["Subject"] = data["Subject"].cat.add_categories(["999"])
    design = Design.from_data("Reaction ~ Days + (1 | Subject)", data)
    assert design.random[0].n_levels == 18 and "999" not in design.random[0].levels  # lme4: ngrps 18


def test_unused_category_of_a_binary_response_is_dropped():
    data = binary_36()
    data["y"] = pd.Categorical(np.where(data["y"] == 1, "yes", "no"), categories=["no", "yes", "maybe"])
    design = Design.from_data("y ~ x + (1 | g)", data, "binomial")
    assert design.response_levels == ["no", "yes"]


# ------------------------------------------------------------- 4. separation


def test_quasi_complete_separation_names_the_column():
    data = separation_data()
    assert checks.separated_columns(
        Design.from_data("y ~ x + f + (1 | g)", data, "binomial").fixed_matrix(data), data["y"].to_numpy()
    ) == [2]
    with pytest.warns(UserWarning, match=r"separate the binomial response 'y' .* moves \['fb'\], so their"):
        kg.GLMM.from_formula("y ~ x + f + (1 | g)", data, family="binomial")
    with pytest.raises(ValueError, match=r"moves \['fb'\]"):
        kg.GLMM.from_formula("y ~ x + f + (1 | g)", data, family="binomial", checks={"separation": "stop"})


def test_separated_fit_ends_with_infinite_standard_errors_not_a_crash():
    """lme4 returns fb 36.8 with SE 1.7e7 (where its optimizer stopped); the estimate is
    +infinity, so the fit heads there and its standard errors are NaN, after the warning."""
    data = separation_data()
    with pytest.warns(UserWarning, match=r"moves \['fb'\]"):
        fit = kg.glmm("y ~ x + f + (1 | g)", data, family="binomial")
    assert fit.fixef()["fb"] > 30
    assert np.isnan(fit.coef_table()["Std. Error"]["fb"])


def test_complete_separation_names_the_slope():
    data = separation_data()
    with pytest.warns(UserWarning, match=r"separate the binomial response 'y2' .* moves \['\(Intercept\)', 'x'\]"):
        kg.GLMM.from_formula("y2 ~ x + (1 | g)", data, family="binomial")


def test_separation_beyond_the_checks_rows_is_said_not_skipped(monkeypatch):
    """Where the linear programs would exceed SEPARATION_MAX_ROWS distinct rows the check
    cannot decide: a warning says so (before, the fit went on without a word)."""
    data = separation_data()
    monkeypatch.setattr(checks, "SEPARATION_MAX_ROWS", 5)
    with pytest.warns(UserWarning, match=r"could not check the binomial response 'y2' for separation: .* "
                                         r"more than 5 distinct rows"):
        kg.GLMM.from_formula("y2 ~ x + (1 | g)", data, family="binomial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kg.GLMM.from_formula("y2 ~ x + (1 | g)", data, family="binomial", checks={"separation": "ignore"})


def test_no_separation_no_warning(recwarn):
    data = separation_data()
    kg.GLMM.from_formula("y ~ x + (1 | g)", data, family="binomial")
    assert not [w for w in recwarn if "separate" in str(w.message)]
    # Aggregated rows: a row with successes and failures pins its direction to zero.
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(2000), rng.normal(size=(2000, 3))])
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-x @ [0.2, 1.0, -0.5, 0.3]))).astype(float)
    assert checks.separated_columns(x, y) == []
    assert checks.separated_columns(x, np.where(x[:, 1] > 0.3, 1.0, 0.0)) == [0, 1, 2, 3]
    trials = np.full(4, 5.0)
    assert checks.separated_columns(np.column_stack([np.ones(4), [0, 0, 1, 1]]), [0, 2, 5, 5], trials) == [1]


# ------------------------------------------------- 5. the response on both sides


def test_response_on_the_right_hand_side_is_dropped_as_r(sleep):
    with pytest.warns(UserWarning, match="the response appeared on the right-hand side and was dropped"):
        fit = kg.glmm("Reaction ~ Reaction + Days + (1 | Subject)", sleep)
    # lme4: lmer(Reaction ~ Days + (1 | Subject), REML = FALSE)'s fixed effects.
    assert list(fit.fixef().index) == ["(Intercept)", "Days"]
    np.testing.assert_allclose(fit.fixef().to_numpy(), [251.40510485, 10.46728596], rtol=1e-5)
    with pytest.warns(UserWarning, match="right-hand side"):
        design = Design.from_data("Reaction ~ Reaction * Days + (1 | Subject)", sleep)
    assert design.fixed_columns == ["(Intercept)", "Days", "Reaction:Days"]  # R's columns


# -------------------------------------------------------- 6. a constant response


def test_constant_response_stops(sleep):
    """glmer stops ("Response is constant"); lmer ends at a residual sd of 1.8e-17 with
    convergence warnings: a gaussian fit stops whatever `checks` says."""
    for checks_ in (None, {"response_not_const": "ignore"}):
        with pytest.raises(ValueError, match=r"Response is constant: 'c' is 5.0 in all 180 rows: .* residual sd of 0"):
            kg.GLMM.from_formula("c ~ Days + (1 | Subject)", sleep.assign(c=5.0), checks=checks_)
    with pytest.raises(ValueError, match=r"Response is constant: 'b1' is 1.0 in all 180 rows \(glmer's"):
        kg.GLMM.from_formula("b1 ~ Days + (1 | Subject)", sleep.assign(b1=1), family="binomial")
    # Constant counts are a fine Poisson fit; glmer's check is lme4's decision, and it can be turned off.
    model = kg.GLMM.from_formula("c ~ Days + (1 | Subject)", sleep.assign(c=3), family="poisson",
                                 checks={"response_not_const": "ignore"})
    np.testing.assert_allclose(model.fixed_effects.get_weights()[0][:, 0], [np.log(3.0), 0.0], atol=1e-6)  # GLM start


def test_files_take_the_design_checks_and_refuse_the_all_row_checks(sleep, tmp_path):
    """A streamed fit honours `checks=` for the checks its scan runs (the rank check: 'stop'
    raises as for a frame) and refuses those it cannot run on files, rather than
    ignoring them."""
    path = tmp_path / "sleep.csv"
    sleep.assign(Days2=2 * sleep["Days"]).to_csv(path, index=False)
    source = kg.read_csv(str(path))
    with pytest.raises(ValueError, match=r"column rank deficient .*'Days2' = 2 \* 'Days'"):
        kg.GLMM.from_formula("Reaction ~ Days + Days2 + (1 | Subject)", source, checks={"rank_x": "stop"})
    with pytest.warns(UserWarning, match=LME4_RANK_MESSAGE):
        model = kg.GLMM.from_formula("Reaction ~ Days + Days2 + (1 | Subject)", source)
    assert model.design.fixed_dropped == ["Days2"]
    with pytest.raises(ValueError, match=r"checks \['separation'\] need every row in memory"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject)", source, checks={"separation": "stop"})


def test_separation_screen_on_many_rows():
    """Above SEPARATION_SCREEN_ROWS rows a sample's certificate proves non-separation; a
    separation the sample cannot see (a rare column's rows, all successes) is still found."""
    rng = np.random.default_rng(5)
    rows = checks.SEPARATION_SCREEN_ROWS + 50_000
    group = rng.integers(0, 2, rows).astype(float)
    y = (rng.random(rows) < 0.3 + 0.4 * group).astype(float)
    x = np.column_stack([np.ones(rows), group])
    assert checks.separated_columns(x, y) == []
    rare = np.zeros(rows)
    rare[rng.choice(rows, 3, replace=False)] = 1.0
    y[rare > 0] = 1.0
    assert checks.separated_columns(np.column_stack([x, rare]), y) == [2]
