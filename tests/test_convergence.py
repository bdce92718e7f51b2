"""Fits that reach the optimum, or say that they did not (lme4's `checkConv`).

The engine's end point is checked by its derivatives (`keras_glmm.engine.convergence`):
lme4's scaled gradient and the Hessian's eigenvalues on the free parameters, and
the second-order conditions at every bound. Numbers from lme4 1.1-31:
`tests/reference/lme4_reference_maximal.json` (`make_reference_maximal.R`) and
`make_reference_boundary.R`.
"""

import pathlib
import re
import warnings

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
import reference_data as refs
from keras_glmm.engine import convergence
from keras_glmm.engine import verification

HERE = pathlib.Path(__file__).resolve().parent


def _fit_kb07_max():
    case = refs.MAXIMAL["kb07_max"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the singular-fit warning
        return kg.glmm(case["formula"], kg.datasets.load_kb07())


def test_kb07_maximal_model_reaches_lme4s_optimum():
    """Two 8 x 8 covariance matrices (72 variance parameters): lme4's bobyqa reaches
    logLik -14293.1588 in 222 s; the quasi-Newton method alone stopped at -14494.6."""
    case = refs.MAXIMAL["kb07_max"]
    fit = _fit_kb07_max()
    assert fit.logLik() >= case["logLik"] - 0.05
    assert fit.logLik() == pytest.approx(case["logLik"], abs=1e-3)
    fixef = np.array(list(case["fixef"].values()))
    se = np.array(list(case["se"].values()))
    assert np.all(np.abs(fit.fixef().values - fixef) <= 0.05 * se)
    assert fit.converged_
    check = fit.fit_summary_["convergence"]
    assert check["passed"] and check["max_gradient"] < 0.002 and check["negative_eigenvalues"] == 0
    assert "Converged" in fit.report() and "max|grad|" in fit.report()
    # A singular fit, as lme4's: every "at zero" names an sd that is (near) zero.
    assert fit.is_singular()
    sds = fit.varcorr()
    largest = sds.loc[sds["var2"].isna() & (sds["grp"] != "Residual"), "sdcor"].max()
    for value in re.findall(r"the sd of \S+ in \S+ is (\S+), at zero", fit.report()):
        assert float(value) < 1e-3 * largest


def test_a_false_convergence_is_caught_and_reported(monkeypatch):
    """Without L-BFGS-B and the restarts, the quasi-Newton method stops short on kb07's
    maximal model; the check says so with lme4's words and numbers, and `converged_`
    is False."""
    monkeypatch.setattr(verification, "MANY_PARAMETERS", 10_000)
    monkeypatch.setattr(verification, "MAX_POLISHES", 0)
    case = refs.MAXIMAL["kb07_max"]
    with pytest.warns(RuntimeWarning, match="Model failed to converge"):
        fit = kg.glmm(case["formula"], kg.datasets.load_kb07())
    assert fit.logLik() < case["logLik"] - 1.0
    assert not fit.converged_
    assert not fit.fit_summary_["convergence"]["passed"]
    assert "NOT CONVERGED" in fit.report()


def test_check_is_lme4s_scaled_gradient():
    """`max_j min(|(R^-1 g)_j|, |g_j|)` of the deviance, `H = R'R` (R's `chol`): by hand."""
    hessian = np.array([[4.0, 1.0], [1.0, 2.0]])  # of -log L
    gradient = np.array([0.01, -0.002])
    result = convergence.check(gradient, hessian, ["a", "b"])
    g, h = 2 * gradient, 2 * hessian
    scaled = np.linalg.solve(np.linalg.cholesky(h).T, g)  # R = L'
    assert result.max_gradient == pytest.approx(np.max(np.minimum(np.abs(scaled), np.abs(g))))
    assert result.max_gradient == pytest.approx(0.0076056, abs=1e-6)  # R^-1 g = (0.00761, -0.00214)
    assert result.passed is False and result.component == "a"
    # Newton's remaining gain in log L: g' H^-1 g / 2.
    assert result.predicted_decrease == pytest.approx(0.5 * gradient @ np.linalg.solve(hessian, gradient))
    assert "max|grad| = 0.00761 (tol = 0.002, component a)" in result.message()
    assert convergence.check(gradient / 100, hessian).passed


def test_check_refuses_a_saddle():
    result = convergence.check(np.zeros(2), np.diag([1.0, -0.5]))
    assert not result.passed and result.negative_eigenvalues == 1
    assert result.smallest_eigenvalue == pytest.approx(-1.0)  # deviance scale
    assert "1 negative eigenvalue" in result.message()


def test_rank_one_covariance_lands_on_the_boundary():
    """A correlation of exactly -1 (lme4: isSingular TRUE), named in the report."""
    data = pd.read_csv(HERE / "reference" / "rank_one_boundary.csv")
    with pytest.warns(RuntimeWarning, match="the correlation of \\(Intercept\\) and x in g is -1.0000, at"):
        fit = kg.glmm("y ~ x + (x | g)", data)
    got = refs.fitted_sdcor(fit)
    assert got[("g", "(Intercept)", "x")] == pytest.approx(-1.0, abs=1e-8)  # Lambda_22 exactly 0
    assert got[("g", "(Intercept)", None)] == pytest.approx(0.9003906178, rel=1e-4)
    assert got[("g", "x", None)] == pytest.approx(0.4581173511, rel=1e-4)
    assert got[("Residual", None, None)] == pytest.approx(0.7978287186, rel=1e-4)
    assert fit.logLik() == pytest.approx(-120.13388530, abs=1e-5)
    np.testing.assert_allclose(fit.fixef().values, [1.07478, 0.2097533333], rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov().values)), [0.2761791796, 0.2731545384], rtol=1e-3)
    assert fit.is_singular() and fit.converged_


def test_degenerate_nested_design_with_the_checks_off_reaches_the_model_it_contains():
    """`(1 | Subject/Days)` has one row per `Days:Subject` level: lme4 refuses it (the
    guard rails do too, `tests/test_guard_rails.py`). Asked to fit it anyway, the fit
    must reach at least the logLik of `(1 | Subject)`, which it contains (the engine
    once stopped 15 nats below, at -912.20, and called it converged): the residual and
    `Days:Subject` variances share one flat direction."""
    sleep = kg.datasets.load_sleepstudy()
    quiet = {"nobs_vs_nlev": "ignore", "nobs_vs_nre": "ignore"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = kg.glmm("Reaction ~ Days + (1 | Subject/Days)", sleep, checks=quiet)
    contained = kg.glmm("Reaction ~ Days + (1 | Subject)", sleep)
    assert fit.logLik() >= contained.logLik() - 1e-6
    assert contained.logLik() == pytest.approx(-897.0393, abs=1e-4)  # lme4's
    assert fit.converged_
