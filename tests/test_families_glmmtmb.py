"""The beta, zero-inflated and gamma families fitted by the engine against glmmTMB.

The numbers are glmmTMB 1.1.5's maximum-likelihood fits (Laplace approximation, R 4.2.2)
in `tests/reference/glmmtmb_reference.json`, made by `make_reference_glmmtmb.R` from the
CSV files in `tests/data/` (glmmTMB's Salamanders and Owls, pscl's UKHouseOfCommons,
MASS's Sitka, lme4's sleepstudy; each case's `notes` says what was derived). glmmTMB's
`sigma` is stored beside keras_glmm's parameters: beta `precision` = phi, negative
binomial `dispersion` = theta, gamma `shape` = 1 / sigma^2, `zi_odds` = exp(zi intercept).

The fits use the in-memory engine directly (`VariationalSolver`, arrays from
`Design`), started where lme4 and glmmTMB users start: the fixed effects at least
squares on the linked response (R's `mustart`), relative sds 0.5, the family's
`default_params`. Tolerances are the acceptance criteria: fixed effects within 0.1 of
glmmTMB's standard error, standard deviations and dispersion within 5%; and the
objective (the ELBO, or the log-likelihood once the engine refines the fit by adaptive
quadrature) within 0.1 nats of glmmTMB's Laplace log-likelihood.
"""

import inspect
import json
import pathlib

import numpy as np
import pandas as pd
import pytest

from keras_glmm import families
from keras_glmm.design import Design
from keras_glmm.engine import VariationalSolver

HERE = pathlib.Path(__file__).parent
REFERENCE = json.loads((HERE / "reference" / "glmmtmb_reference.json").read_text())



def _start_beta(family, x, y, offset):
    """Least squares on the linked response (R's `mustart`): counts + 0.1."""
    ys = y + 0.1 if family.name.startswith("zero_inflated") else y
    eta = family.link(np.asarray(ys, np.float64)).numpy()
    if offset is not None:
        eta = eta - offset
    return np.linalg.lstsq(x, eta, rcond=None)[0]


def fit(case, **solver_kwargs):
    ref = REFERENCE[case]
    family = families.get_family(ref["family"], ref["link"])
    data = pd.read_csv(HERE / "data" / ref["data"])
    design = Design.from_data(ref["formula"], data, family.name)
    x, y = design.arrays(data)
    n = len(x["x"])
    terms = []
    for term in design.random:
        z = np.ones((n, 1)) if term.intercept else np.zeros((n, 0))
        if term.n_covariates:
            z = np.concatenate([z, x[term.name + "_z"]], axis=1)
        terms.append((term.name, x[term.name], z, term.n_levels, term.term.correlated))
    weights = data[ref["weights"]].to_numpy(np.float64) if ref.get("weights") else None
    solver = VariationalSolver(x["x"], terms, y, family, weights=weights, offset=x.get("offset"),
                               **solver_kwargs)
    solver.start([np.eye(t[2].shape[1]) * 0.5 for t in terms],
                 beta=_start_beta(family, x["x"], y, x.get("offset")),
                 dispersion=family.default_params(y))
    for _ in range(300):
        if solver.converged:
            break
        solver.step()
    assert solver.converged, case
    return solver


def _sds(ref):
    return np.array([r["sdcor"] for r in ref["varcorr"] if not r.get("var2")])


def check(case, solver, boundary_zi=False):
    ref = REFERENCE[case]
    res = solver.results()
    fixef, se = np.array(list(ref["fixef"].values())), np.array(list(ref["se"].values()))
    np.testing.assert_array_less(np.abs(res["beta"] - fixef), 0.1 * se)
    sds = np.concatenate([np.sqrt(np.diag(c)) for c in res["covariances"]])
    np.testing.assert_allclose(sds, _sds(ref), rtol=0.05)
    for cov in res["covariances"]:
        if len(cov) > 1:
            corr = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
            want = [r["sdcor"] for r in ref["varcorr"] if r.get("var2")]
            assert corr == pytest.approx(want[0], abs=0.05)
    for name, value in ref["dispersion"].items():
        if name == "zi_odds" and boundary_zi:
            # glmmTMB's pi is 1e-7 (the zi intercept heads to -inf): so is ours.
            assert value < 1e-6 and res["dispersion"][name] < 1e-4
        else:
            assert res["dispersion"][name] == pytest.approx(value, rel=0.05), name
    assert solver.report()["elbo"] == pytest.approx(ref["logLik"], abs=0.1)


CASES = [
    "ukhoc_beta",
    "salamanders_zip",
    "salamanders_zinb",
    "owls_zinb",
    "sitka_gamma_log",
    "sitka_gamma_log_weighted",
    "sitka_gamma_inverse",
    "sleepstudy_gamma_inverse",
    "sleepstudy_gamma_inverse_slope",
]


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_glmmtmb(case):
    check(case, fit(case), boundary_zi=case == "salamanders_zinb")


# The variational fit alone (no adaptive-quadrature refinement, where the engine has one).
VI_ONLY = {"agq_points": 0} if "agq_points" in inspect.signature(VariationalSolver).parameters else {}


@pytest.mark.parametrize("case", ["ukhoc_beta", "salamanders_zip", "sitka_gamma_log", "sitka_gamma_inverse",
                                  "sleepstudy_gamma_inverse"])
def test_variational_fit_matches_glmmtmb(case):
    solver = fit(case, **VI_ONLY)
    check(case, solver)
    # A lower bound of the marginal likelihood, which Laplace approximates.
    assert solver.report()["elbo"] <= REFERENCE[case]["logLik"] + 0.02


def test_gamma_log_link_from_zero():
    """The log link needs no starting point inside a domain: from beta = 0 (eta = 0 while
    y is about 5) the fit is the same."""
    ref = REFERENCE["sitka_gamma_log"]
    data = pd.read_csv(HERE / "data" / ref["data"])
    family = families.get_family("gamma", "log")
    design = Design.from_data(ref["formula"], data, family.name)
    x, y = design.arrays(data)
    term = design.random[0]
    solver = VariationalSolver(x["x"], [(term.name, x[term.name], np.ones((len(y), 1)), term.n_levels, True)],
                               y, family)
    solver.start([np.eye(1) * 0.5], dispersion=family.default_params(y))
    for _ in range(300):
        if solver.converged:
            break
        solver.step()
    check("sitka_gamma_log", solver)


def test_reference_file_is_complete():
    about = REFERENCE["_about"]
    assert about["glmmTMB"] == "1.1.5"
    for case in CASES:
        name = case.values[0] if hasattr(case, "values") else case
        ref = REFERENCE[name]
        assert (HERE / "data" / ref["data"]).exists()
        assert ref["pdHess"] is True and ref["nobs"] > 100
        family = families.get_family(ref["family"], ref["link"])
        assert set(ref["dispersion"]) == set(family.dispersion_params)
        if ref["family"] == "gamma":
            assert ref["dispersion"]["shape"] == pytest.approx(1.0 / ref["sigma"] ** 2)
        if ref["family"].startswith("zero_inflated"):
            assert ref["dispersion"]["zi_odds"] == pytest.approx(np.exp(ref["zi_intercept"]))


@pytest.mark.parametrize("case", ["owls_zinb", "sleepstudy_gamma_inverse_slope", "ukhoc_beta"])
def test_formula_front_end_matches_glmmtmb(case):
    """What a user types, `kg.glmm(formula, data, family=...)`, reaches glmmTMB's fit.

    sleepstudy with the inverse link has eta ~ 1e-3 (sds 4e-4 and 5e-5) and a boundary
    local optimum (intercept sd 0, 23 nats lower) that the fit must not stop at."""
    import warnings

    import keras_glmm as kg

    ref = REFERENCE[case]
    data = pd.read_csv(HERE / "data" / ref["data"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no singular-fit or convergence warning
        model = kg.glmm(ref["formula"], data, family=ref["family"], link=ref["link"])
    fixef, se = np.array(list(ref["fixef"].values())), np.array(list(ref["se"].values()))
    np.testing.assert_array_less(np.abs(model.fixef().to_numpy() - fixef), 0.1 * se)
    vc = model.varcorr()
    np.testing.assert_allclose(vc[vc.var2.isna()].sdcor.to_numpy(), _sds(ref), rtol=0.05)
    for name, value in ref["dispersion"].items():
        assert model.dispersion()[name] == pytest.approx(value, rel=0.05), name
    assert not model.is_singular()
    assert float(model.logLik()) == pytest.approx(ref["logLik"], abs=0.1)
