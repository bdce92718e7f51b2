"""Usability: R's habits, the array API's intercept, float64 results, pandas outputs."""

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
from keras_glmm import estimates

# lme4 1.1-31: summary(lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE))
SLEEP_ML_FIXEF = {"(Intercept)": 251.405104848, "Days": 10.467285959}


@pytest.fixture(scope="module")
def sleep():
    frame = kg.datasets.load_sleepstudy()
    frame.index = pd.RangeIndex(1000, 1180)  # an index of its own: results keep it
    return frame


@pytest.fixture(scope="module")
def sleep_fit(sleep):
    return kg.glmm("Reaction ~ Days + (Days | Subject)", sleep)


# ------------------------------------------------------------ R's habits
@pytest.mark.parametrize("spelling, family, link", [
    ('binomial(link="probit")', "binomial", "probit"),
    ("binomial(link = 'probit')", "binomial", "probit"),
    ('poisson(link="log")', "poisson", "log"),
    ('Gamma(link="inverse")', "gamma", "inverse"),
    ('Gamma("log")', "gamma", "log"),
    ("gaussian()", "gaussian", "identity"),
])
def test_r_family_calls_are_family_strings(spelling, family, link):
    got = kg.get_family(spelling)
    assert (got.name, got.link.name) == (family, link)


def test_r_family_call_and_link_must_agree():
    assert kg.get_family('binomial(link="probit")', link="probit").link.name == "probit"
    with pytest.raises(ValueError, match="names the link 'probit' but `link` is 'logit'"):
        kg.get_family('binomial(link="probit")', link="logit")
    with pytest.raises(ValueError, match="Unknown link 'foo'"):
        kg.get_family('binomial(link="foo")')


def test_probit_family_string_fits_as_link_argument():
    cbpp = kg.datasets.load_cbpp()
    formula = "cbind(incidence, size - incidence) ~ C(period) + (1 | herd)"
    a = kg.glmm(formula, cbpp, family='binomial(link = "probit")', agq_points=0)
    b = kg.glmm(formula, cbpp, family="binomial", link="probit", agq_points=0)
    assert a.family.link.name == "probit"
    np.testing.assert_allclose(a.fixef(), b.fixef(), rtol=1e-10)


@pytest.mark.parametrize("formula, hint", [
    ("Reaction ~ factor(Days) + (1 | Subject)", "use C(Days) for a factor (R's factor())"),
    ("Reaction ~ as.factor(Days) + (1 | Subject)", "use C(Days) for a factor (R's as.factor())"),
])
def test_r_factor_points_to_c(sleep, formula, hint):
    with pytest.raises(ValueError) as err:
        kg.glmm(formula, sleep)
    assert hint in str(err.value)


@pytest.mark.parametrize("keyword, value, message", [
    ("REML", True, "glmm() got an unexpected keyword argument 'REML': did you mean reml=True?"),
    ("nAGQ", 1, "did you mean agq_points=1?"),
    ("epoch", 3, "did you mean epochs=3?"),
    ("na_actoin", "omit", "did you mean na_action='omit'?"),
    ("offset", "x", "use an offset(...) term in the formula"),
    ("bogus", 1, "valid keyword arguments are agq_points, batch_size"),
])
def test_unknown_glmm_keywords_get_a_did_you_mean(sleep, keyword, value, message):
    with pytest.raises(TypeError) as err:
        kg.glmm("Reaction ~ Days + (1 | Subject)", sleep, **{keyword: value})
    assert message in str(err.value)


def test_from_formula_keywords_get_a_did_you_mean(sleep):
    with pytest.raises(TypeError, match=r"GLMM.from_formula\(\) got an unexpected keyword argument 'REML': "
                                        r"did you mean reml=True\?"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject)", sleep, REML=True)
    with pytest.raises(TypeError, match="did you mean memory_budget=10"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject)", sleep, memory_budgte=10)
    model = kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject)", sleep, name="sleep", memory_budget=2**30)
    assert model.name == "sleep" and model.memory_budget == 2**30


# ------------------------------------------------------- the intercept
def _groups(seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(50), 20)
    y = 1.5 + rng.normal(size=50)[g] + rng.normal(size=1000)
    return rng.normal(size=(1000, 1)), g, y


def test_array_api_refuses_an_x_without_intercept():
    x, g, y = _groups()
    model = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")])
    with pytest.raises(ValueError, match=r"Input 'x' \(1 column\(s\)\) has no intercept.*intercept=False"):
        model.fit({"x": x, "g": g}, y)


def test_array_api_with_an_intercept_or_saying_there_is_none():
    x, g, y = _groups()
    with_ones = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")])
    with_ones.fit({"x": np.c_[np.ones(1000), x], "g": g}, y)
    sd = float(with_ones.varcorr()["sdcor"].iloc[0])
    assert 0.8 < sd < 1.1  # the truth is 1.0
    # Saying so: the group sd takes up the mean (the overstated 1.82 the check prevents by default).
    without = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")], intercept=False)
    without.fit({"x": x, "g": g}, y)
    assert float(without.varcorr()["sdcor"].iloc[0]) > 1.5
    assert kg.GLMM.from_config(without.get_config()).intercept is False
    # A full dummy coding spans the constant: accepted.
    dummies = np.eye(3)[np.arange(1000) % 3]
    coded = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")])
    coded.fit({"x": dummies, "g": g}, y)
    assert coded.fixef().shape == (3,)


def test_formula_without_intercept_is_the_formulas_word(sleep):
    fit = kg.glmm("Reaction ~ 0 + Days + (1 | Subject)", sleep)
    assert list(fit.fixef().index) == ["Days"]


# ------------------------------------------------------------- float64
def test_results_are_the_engines_float64(sleep_fit):
    fixef = sleep_fit.fixef()
    assert fixef.dtype == np.float64
    for name, value in SLEEP_ML_FIXEF.items():
        assert fixef[name] == pytest.approx(value, rel=1e-6)
    kernel = sleep_fit.fixed_effects.kernel.numpy().reshape(-1)
    assert kernel.dtype == np.float32
    # Not the float32 weights cast up: the engine's value (float32 rounds at about 1e-5 here).
    assert not np.array_equal(fixef.to_numpy(), kernel.astype("float64"))
    np.testing.assert_allclose(fixef.to_numpy(), kernel, rtol=1e-6)
    assert all(dtype == np.float64 for dtype in sleep_fit.coef_table().dtypes)
    assert sleep_fit.vcov().to_numpy().dtype == np.float64
    assert sleep_fit.varcorr()["sdcor"].dtype == np.float64
    assert all(dtype == np.float64 for dtype in sleep_fit.ranef()["Subject"].dtypes)
    sd = sleep_fit.varcorr()["sdcor"].to_numpy()  # lme4's (tests/reference/lme4_reference.json)
    np.testing.assert_allclose(sd[[0, 1, 3]], [23.7797595895, 5.7167985139, 25.5919070365], rtol=1e-4)
    assert sd[2] == pytest.approx(0.081321093427, abs=1e-3)  # the correlation


def test_estimates_follow_the_weights():
    x, g, y = _groups()
    model = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")])
    model.fit({"x": np.c_[np.ones(1000), x], "g": g}, y)
    engine = model.fixef().to_numpy()
    assert estimates.current(model) is not None
    kernel = model.fixed_effects.kernel
    kernel.assign(kernel.numpy() * 2.0)  # weights moved: the recorded values no longer apply
    assert estimates.current(model) is None
    np.testing.assert_allclose(model.fixef().to_numpy(), 2.0 * engine, rtol=1e-6)
    assert model.fixef().dtype == np.float64


# -------------------------------------------------------- pandas outputs
def test_pandas_in_pandas_out(sleep_fit, sleep):
    fitted = sleep_fit.fitted()
    assert isinstance(fitted, pd.Series) and fitted.index.equals(sleep.index)
    residuals = sleep_fit.residuals()
    assert isinstance(residuals, pd.Series) and residuals.index.equals(sleep.index)
    np.testing.assert_allclose(residuals, sleep["Reaction"] - fitted, atol=1e-4)  # predictions are float32
    new = pd.DataFrame({"Days": [0, 9], "Subject": ["308", "a new subject"]}, index=["a", "b"])
    predicted = sleep_fit.predict_response(new)
    assert list(predicted.index) == ["a", "b"]
    assert predicted["b"] == pytest.approx(SLEEP_ML_FIXEF["(Intercept)"] + 9 * SLEEP_ML_FIXEF["Days"], rel=1e-5)
    assert list(sleep_fit.predict(new).index) == ["a", "b"]
    draws = sleep_fit.posterior_predictive(new, num_draws=5, seed=0)
    assert draws.shape == (2, 5) and list(draws.columns) == [f"draw_{i}" for i in range(1, 6)]
    assert list(draws.index) == ["a", "b"]
    sims = sleep_fit.simulate(3, seed=0)
    assert sims.shape == (180, 3) and list(sims.columns) == ["sim_1", "sim_2", "sim_3"]
    assert sims.index.equals(sleep.index)


def test_arrays_in_arrays_out(sleep_fit, sleep):
    x, _ = sleep_fit._frame_arrays(sleep.iloc[:4], with_response=False)
    assert isinstance(sleep_fit.predict_response(x), np.ndarray)
    assert sleep_fit.posterior_predictive(x, num_draws=3, seed=0).shape == (3, 4)
    x, g, y = _groups()
    model = kg.GLMM(random_effects=[kg.RandomEffects(50, name="g")])
    model.fit({"x": np.c_[np.ones(1000), x], "g": g}, y)
    assert isinstance(model.fitted(), np.ndarray) and isinstance(model.residuals(), np.ndarray)
    assert model.simulate(2, seed=0).shape == (2, 1000)


def test_omitted_rows_keep_their_labels():
    frame = kg.datasets.load_sleepstudy()
    frame.loc[[3, 7], "Reaction"] = np.nan
    with pytest.warns(RuntimeWarning, match="dropped 2 of 180 rows"):
        fit = kg.glmm("Reaction ~ Days + (1 | Subject)", frame, na_action="omit")
    assert list(fit.fitted().index) == [i for i in range(180) if i not in (3, 7)]
    new = frame.iloc[:5].assign(Days=[1.0, np.nan, 2.0, 3.0, 4.0])
    with pytest.warns(RuntimeWarning, match="dropped 1 of 5 rows"):
        predicted = fit.predict_response(new)
    assert list(predicted.index) == [0, 2, 3, 4]


def test_a_dict_of_columns_fits_as_its_frame(sleep):
    # `Design` takes a dict of columns; the formula front end codes it as its data frame.
    columns = {name: sleep[name].to_numpy() for name in sleep.columns}
    from_dict = kg.glmm("Reaction ~ Days + (1 | Subject)", columns)
    from_frame = kg.glmm("Reaction ~ Days + (1 | Subject)", sleep)
    np.testing.assert_allclose(from_dict.fixef().values, from_frame.fixef().values, rtol=1e-10)
    assert len(from_dict.fitted()) == len(sleep)
