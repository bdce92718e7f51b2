"""lme4's vocabulary and ordinary requests that used to answer wrongly without a word.

Numbers: lme4 1.1-31's sleepstudy fit (`tests/reference_data.py`; AIC and BIC by
lme4's definitions from its logLik and 6 parameters), radon (county sd 0.3245).
"""

import math

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
import reference_data as refs

SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep_fit():
    return kg.glmm(SLEEP, kg.datasets.load_sleepstudy())


def test_lme4_generics(sleep_fit):
    ref = refs.LME4["sleepstudy"]
    assert sleep_fit.logLik() == pytest.approx(ref["logLik"], abs=1e-3)
    assert sleep_fit.nobs() == 180
    assert sleep_fit.deviance() == pytest.approx(-2 * ref["logLik"], abs=2e-3)
    assert sleep_fit.AIC() == pytest.approx(-2 * ref["logLik"] + 2 * 6, abs=2e-3)  # lme4: 1763.939
    assert sleep_fit.BIC() == pytest.approx(-2 * ref["logLik"] + math.log(180) * 6, abs=2e-3)  # 1783.097
    assert sleep_fit.sigma() == pytest.approx(refs.sdcor(ref)[("Residual", None, None)], rel=1e-4)
    assert not sleep_fit.is_singular()
    # lme4 prints t values for a linear mixed model, without p-values.
    table = sleep_fit.coef_table()
    assert list(table.columns) == ["Estimate", "Std. Error", "t value"]
    assert "t value" in sleep_fit.report()
    cbpp = kg.glmm("cbind(incidence, size - incidence) ~ C(period) + (1|herd)", kg.datasets.load_cbpp(),
                   family="binomial")
    assert list(cbpp.coef_table().columns) == ["Estimate", "Std. Error", "z value", "Pr(>|z|)"]
    assert cbpp.sigma() == 1.0


def test_predict_on_a_data_frame_is_predict_response(sleep_fit):
    """`model.predict(data_frame)` raised "Invalid dtype: str"."""
    frame = kg.datasets.load_sleepstudy().head(7)
    np.testing.assert_allclose(sleep_fit.predict(frame), sleep_fit.predict_response(frame))
    # Subject 308 on day 0: fixed effects plus its random intercept.
    ranef = sleep_fit.ranef()["Subject"]
    assert sleep_fit.predict(frame)[0] == pytest.approx(sleep_fit.fixef().iloc[0] + ranef.loc["308", "(Intercept)"],
                                                         rel=1e-5)


def test_re_form_names_the_terms_kept():
    data = kg.datasets.load_penicillin()
    fit = kg.glmm("diameter ~ 1 + (1|plate) + (1|sample)", data)
    plate = fit.predict_response(data, re_form="~(1|plate)")
    expected = fit.fixef().iloc[0] + fit.ranef()["plate"]["(Intercept)"].loc[data["plate"].astype(str)].values
    np.testing.assert_allclose(plate, expected, rtol=1e-6)
    np.testing.assert_allclose(fit.predict_response(data, re_form="~0"), fit.fixef().iloc[0])
    with pytest.raises(ValueError, match=r"does not have; its terms' groups are \['plate', 'sample'\]"):
        fit.predict_response(data, re_form="~(1|county)")


def test_posterior_predictive_draws_the_new_rows_trials():
    """The training rows' trials (or Bernoulli) were used for newdata with 50 trials."""
    data = kg.datasets.load_cbpp()
    fit = kg.glmm("cbind(incidence, size - incidence) ~ C(period) + (1|herd)", data, family="binomial")
    new = data.head(4).copy()
    new["incidence"] = 10
    new["size"] = 50
    draws = fit.posterior_predictive(new, num_draws=4000, seed=0)
    assert draws.to_numpy().max() <= 50 and draws.to_numpy().max() > 5  # out of 50 trials, not 0/1 or the old sizes
    mean = fit.predict_response(new)  # a probability
    np.testing.assert_allclose(draws.mean(axis=1), 50 * mean, rtol=0.15)  # rows x draws
    with pytest.raises(ValueError, match="need the new rows' trials"):
        fit.posterior_predictive(new.drop(columns=["incidence"]), num_draws=10)
    trials = fit.posterior_predictive({**fit._prediction_inputs(new, None, True)}, num_draws=50, seed=0,
                                      trials=np.full(4, 50.0))
    assert trials.max() <= 50


RADON = "log_radon ~ floor + (1|county)"
RADON_COUNTY_SD = refs.sdcor(refs.LME4["radon"])[("county", "(Intercept)", None)]


def test_fits_continue_in_any_order(tmp_path):
    """Minibatches then full batch used to end at a county sd of 0.3305 (frozen variances)."""
    radon = kg.datasets.load_radon()
    model = kg.GLMM.from_formula(RADON, radon)
    model.fit(radon, batch_size=128, epochs=30)
    model.fit(radon)
    assert model.posterior_kind == "joint" and model.converged_
    sd = model.random_effects[0].prior_stddev()[0]
    assert sd == pytest.approx(RADON_COUNTY_SD, rel=1e-4)
    # Full batch, minibatches, full batch by stochastic VI: nothing stays frozen.
    svi = kg.GLMM.from_formula(RADON, radon, posterior="mean_field")
    svi.fit(radon)
    svi.fit(radon, batch_size=128, epochs=20)
    svi.fit(radon)
    assert svi.converged_
    assert svi.random_effects[0].prior_stddev()[0] == pytest.approx(RADON_COUNTY_SD, rel=5e-3)
    # After loading: the default optimizer is still the default, and the engine continues.
    path = str(tmp_path / "radon.keras")
    svi.save(path)
    loaded = kg.load_model(path)
    loaded.fit(radon)
    assert loaded.random_effects[0].prior_stddev()[0] == pytest.approx(svi.random_effects[0].prior_stddev()[0],
                                                                       rel=5e-3)
    engine = kg.load_model(path)
    engine.posterior = "auto"
    engine.fit(radon)
    assert engine.posterior_kind == "joint"
    assert engine.random_effects[0].prior_stddev()[0] == pytest.approx(RADON_COUNTY_SD, rel=1e-4)


def test_factor_slope_round_trips_through_keras_files(tmp_path):
    data = kg.datasets.load_gcsemv()
    fit = kg.glmm("course ~ gender + (gender|school)", data, na_action="omit")
    path = str(tmp_path / "gcse.keras")
    fit.save(path)
    loaded = kg.load_model(path)
    frame = data.dropna(subset=["course"]).head(20)
    np.testing.assert_allclose(loaded.predict_response(frame), fit.predict_response(frame), rtol=1e-6)
    assert list(loaded.varcorr()["var1"][:2]) == ["(Intercept)", "genderM"]
    pd.testing.assert_frame_equal(loaded.varcorr(), fit.varcorr())
