"""The beta, zero-inflated and gamma families fitted by the engine against glmmTMB.

The numbers are glmmTMB 1.1.5's maximum-likelihood fits (Laplace approximation, R 4.2.2)
in `tests/reference/glmmtmb_reference.json`, made by `make_reference_glmmtmb.R` from the
CSV files in `tests/data/` (glmmTMB's Salamanders and Owls, pscl's UKHouseOfCommons,
MASS's Sitka, lme4's sleepstudy; each case's `notes` says what was derived). glmmTMB's
`sigma` is stored beside keras_glmm's parameters: beta `precision` = phi, negative
binomial `dispersion` = theta, gamma `shape` = 1 / sigma^2, `zi_odds` = exp(zi intercept)
for a constant zero-inflation. With covariates in glmmTMB's `ziformula` (the
`salamanders_*_zi*` cases) the zero-inflation coefficients are `zi_fixef`, with their
standard errors `zi_fixef_se`.

The fits use the in-memory engine directly (`VariationalSolver`, arrays from
`Design`), started where lme4 and glmmTMB users start: the fixed effects at least
squares on the linked response (R's `mustart`), relative sds 0.5, the family's
`default_params`. Tolerances are the acceptance criteria: fixed effects (and zero-inflation coefficients)
within 0.1 of glmmTMB's standard error, standard deviations and dispersion within 5%; and
the objective (the ELBO, or the log-likelihood once the engine refines the fit by adaptive
quadrature) within 0.1 nats of glmmTMB's Laplace log-likelihood.
"""

import inspect
import json
import pathlib
import warnings

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


def _ziformula(ref):
    """glmmTMB's ziformula of a zero-inflated case (`"~1"`, `"~mined"`), else None."""
    return ref["ziformula"] if ref["family"].startswith("zero_inflated") else None


def fit(case, **solver_kwargs):
    ref = REFERENCE[case]
    family = families.get_family(ref["family"], ref["link"])
    data = pd.read_csv(HERE / "data" / ref["data"])
    design = Design.from_data(ref["formula"], data, family.name, ziformula=_ziformula(ref))
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
                               zi_design=x.get("x_zi"), **solver_kwargs)
    solver.start([np.eye(t[2].shape[1]) * 0.5 for t in terms],
                 beta=_start_beta(family, x["x"], y, x.get("offset")),
                 dispersion=family.default_params(y))
    for _ in range(300):
        if solver.finished:
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
    if "zi" in res:
        zi, zi_se = np.array(list(ref["zi_fixef"].values())), np.array(list(ref["zi_fixef_se"].values()))
        np.testing.assert_array_less(np.abs(res["zi"] - zi), 0.1 * zi_se)


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


def check_zi_se(case, solver):
    """Standard errors of the zero-inflation coefficients: the inverse Hessian of the exact
    log-likelihood against glmmTMB's Laplace one, within 3% (salamanders_zinb_zimined's zi
    coefficients are weakly identified, SEs about 3 on the logit scale, where Laplace's and
    the exact likelihood's curvatures differ by 2%)."""
    ref = REFERENCE[case]
    se = np.sqrt(np.diag(solver.zi_covariance()))
    if case == "salamanders_zinb":  # pi heads to 0: glmmTMB's SE is 3341, ours as flat
        assert se[0] > 1000 and ref["zi_se"] > 1000
    else:
        np.testing.assert_allclose(se, list(ref["zi_fixef_se"].values()), rtol=0.03)


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_glmmtmb(case):
    solver = fit(case)
    check(case, solver, boundary_zi=case == "salamanders_zinb")
    if "zi_fixef_se" in REFERENCE[case]:
        check_zi_se(case, solver)


# glmmTMB's ziformula with covariates: logit(pi_i) = x_zi,i' gamma.
ZI_CASES = ["salamanders_zip_zimined", "salamanders_zip_zispp", "salamanders_zinb_zimined"]


@pytest.mark.parametrize("case", ZI_CASES)
def test_engine_matches_glmmtmb_with_zero_inflation_covariates(case):
    solver = fit(case)
    assert solver.phase == "quadrature"  # the exact ML, as for a constant zero-inflation
    check(case, solver)
    check_zi_se(case, solver)


# The variational fit alone (no adaptive-quadrature refinement, where the engine has one).
VI_ONLY = {"agq_points": 0} if "agq_points" in inspect.signature(VariationalSolver).parameters else {}


@pytest.mark.parametrize("case", ["ukhoc_beta", "salamanders_zip", "sitka_gamma_log", "sitka_gamma_inverse",
                                  "sleepstudy_gamma_inverse", "salamanders_zip_zimined"])
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
        if solver.finished:
            break
        solver.step()
    check("sitka_gamma_log", solver)


def test_reference_file_is_complete():
    about = REFERENCE["_about"]
    assert about["glmmTMB"] == "1.1.5"
    for case in ZI_CASES:
        ref = REFERENCE[case]
        assert ref["ziformula"] in ("~mined", "~spp") and ref["pdHess"] is True
        assert list(ref["zi_fixef"]) == list(ref["zi_fixef_se"]) and "zi_odds" not in ref["dispersion"]
        assert ref["zi_fixef"]["(Intercept)"] == ref["zi_intercept"]
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
            assert ref["zi_fixef"] == {"(Intercept)": ref["zi_intercept"]}


@pytest.mark.parametrize("case", ["owls_zinb", "sleepstudy_gamma_inverse_slope", "ukhoc_beta",
                                  "salamanders_zip_zimined", "salamanders_zinb_zimined"])
def test_formula_front_end_matches_glmmtmb(case):
    """What a user types, `kg.glmm(formula, data, family=..., ziformula=...)`, reaches glmmTMB's fit.

    sleepstudy with the inverse link has eta ~ 1e-3 (sds 4e-4 and 5e-5) and a boundary
    local optimum (intercept sd 0, 23 nats lower) that the fit must not stop at."""
    import keras_glmm as kg

    ref = REFERENCE[case]
    data = pd.read_csv(HERE / "data" / ref["data"])
    options = {} if _ziformula(ref) is None else {"ziformula": _ziformula(ref)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no singular-fit or convergence warning
        model = kg.glmm(ref["formula"], data, family=ref["family"], link=ref["link"], **options)
    fixef, se = np.array(list(ref["fixef"].values())), np.array(list(ref["se"].values()))
    np.testing.assert_array_less(np.abs(model.fixef().to_numpy() - fixef), 0.1 * se)
    vc = model.varcorr()
    np.testing.assert_allclose(vc[vc.var2.isna() & (vc.grp != "Residual")].sdcor.to_numpy(), _sds(ref), rtol=0.05)
    for name, value in ref["dispersion"].items():
        assert model.dispersion()[name] == pytest.approx(value, rel=0.05), name
    assert not model.is_singular()
    assert float(model.logLik()) == pytest.approx(ref["logLik"], abs=0.1)
    if "zi_fixef" in ref:  # glmmTMB's fixef(fit)$zi and its standard errors, by name
        table = model.coef_table(component="zi")
        assert list(table.index) == list(ref["zi_fixef"])
        zi_se = np.array(list(ref["zi_fixef_se"].values()))
        np.testing.assert_array_less(np.abs(table["Estimate"].to_numpy() - list(ref["zi_fixef"].values())),
                                     0.1 * zi_se)
        np.testing.assert_allclose(table["Std. Error"].to_numpy(), zi_se, rtol=0.03)


# ------------------------------------------------ ziformula through the model
SALAMANDERS = "count ~ spp + mined + (1|site)"


@pytest.fixture(scope="module")
def salamanders():
    return pd.read_csv(HERE / "data" / "salamanders.csv")


@pytest.fixture(scope="module")
def zi_fit(salamanders):
    import keras_glmm as kg

    return kg.glmm(SALAMANDERS, salamanders, family="zip", ziformula="~ mined")


def _by_hand(model, frame):
    """`eta`, `pi` and `(1 - pi) mu` of `frame`'s rows from fixef, ranef and fixef(component="zi")."""
    beta, gamma = model.fixef(), model.fixef(component="zi")
    site = model.ranef()["site"]["(Intercept)"]
    mined = (frame["mined"] == "yes").to_numpy(float)
    eta = beta["(Intercept)"] + beta["minedyes"] * mined
    for name in beta.index:
        if name.startswith("spp"):
            eta = eta + beta[name] * (frame["spp"] == name[3:]).to_numpy(float)
    eta = eta + frame["site"].map(site).fillna(0.0).to_numpy()  # a new site: the population
    pi = 1.0 / (1.0 + np.exp(-(gamma["(Intercept)"] + gamma["minedyes"] * mined)))
    return eta, pi, (1.0 - pi) * np.exp(eta)


def test_ziformula_predict_response_is_one_minus_pi_times_mu(zi_fit, salamanders):
    new = salamanders.iloc[[0, 40, 300, 500]].copy()
    new["mined"] = ["no", "yes", "no", "yes"]  # other than their sites' own
    new.iloc[3, new.columns.get_loc("site")] = "a site never seen"
    eta, pi, mean = _by_hand(zi_fit, new)
    assert len(set(np.round(pi, 6))) == 2  # two zero-inflation probabilities
    np.testing.assert_allclose(zi_fit.predict_response(new), mean, rtol=1e-5)
    np.testing.assert_allclose(zi_fit.predict_response(new, type="link"), eta, rtol=1e-5, atol=1e-6)
    # Training rows, fitted(): the same formula.
    np.testing.assert_allclose(zi_fit.fitted(), _by_hand(zi_fit, salamanders)[2], rtol=1e-5)


def test_ziformula_draws_use_each_rows_probability(zi_fit, salamanders):
    """simulate: P(y_i = 0) = pi_i + (1 - pi_i) E_b[exp(-e^(x_i' beta + b))], b ~ N(0, sd^2);
    posterior_predictive at a new site: mean (1 - pi_i) exp(eta_i + v_i / 2), v_i = sd^2 + x_i' V x_i."""
    sd = float(zi_fit.varcorr()["sdcor"].iloc[0])
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / weights.sum()
    eta, pi, _ = _by_hand(zi_fit, salamanders.assign(site="none"))  # without the sites' effects
    p0 = pi + (1.0 - pi) * (np.exp(-np.exp(eta[:, None] + sd * nodes[None, :])) @ weights)
    draws = zi_fit.simulate(nsim=300, seed=3).to_numpy().T  # (nsim, rows)
    mined = (salamanders["mined"] == "yes").to_numpy()
    for rows in (mined, ~mined):
        assert np.mean(draws[:, rows] == 0) == pytest.approx(np.mean(p0[rows]), abs=0.01)
    new = salamanders.iloc[[0, 300]].assign(site="a site never seen")
    eta, pi, _ = _by_hand(zi_fit, new)
    x = zi_fit.design.fixed_matrix(new)
    v = sd**2 + np.einsum("ij,jk,ik->i", x, zi_fit.vcov().to_numpy(), x)
    draws = zi_fit.posterior_predictive(new, num_draws=100_000, seed=4)
    np.testing.assert_allclose(draws.mean(axis=1), (1.0 - pi) * np.exp(eta + v / 2), rtol=0.04)


def test_ziformula_keras_round_trip(zi_fit, salamanders, tmp_path):
    import keras

    path = tmp_path / "salamanders_zip.keras"
    zi_fit.save(path)
    loaded = keras.models.load_model(path)  # safe_mode, no custom_objects
    assert loaded.design.ziformula == "~ mined" and loaded.design.zi_columns == ["(Intercept)", "minedyes"]
    assert loaded.get_config()["zero_inflation"] is not None
    new = salamanders.iloc[::37]
    np.testing.assert_array_equal(loaded.predict_response(new), zi_fit.predict_response(new))
    pd.testing.assert_series_equal(loaded.fixef(component="zi"), zi_fit.fixef(component="zi"))


def test_ziformula_report_and_generics(zi_fit):
    ref = REFERENCE["salamanders_zip_zimined"]
    text = zi_fit.report()
    assert "Zero-inflation (logit of the zero-inflation probability, ziformula ~ mined):" in text
    assert "minedyes" in text.split("Zero-inflation")[1]
    # glmmTMB's df: 8 fixed, 2 zero-inflation, 1 sd.
    assert zi_fit.AIC() == pytest.approx(-2 * zi_fit.logLik() + 2 * 11)
    assert "zi_odds" not in zi_fit.dispersion()
    vcov = zi_fit.vcov(component="zi")
    assert list(vcov.index) == list(ref["zi_fixef"])
    with pytest.raises(ValueError, match="'cond' or 'zi'"):
        zi_fit.fixef(component="disp")


@pytest.mark.parametrize("ziformula,family,match", [
    ("~ mined", "poisson", r"`ziformula` is for a zero-inflated family"),
    ("~ mined + (1|site)", "zip", r"random-effect term\(s\) \(1 \| site\): only fixed effects are supported"),
    ("~ minde", "zip", r"unknown column 'minde' in the zero-inflation formula"),
    ("~ mined + I(2*cover) + cover", "zinb",
     r"rank deficient.*column 'cover' is a linear combination of \['I\(2 \* cover\)'\]"),
    ("~ 0", "zip", r"has no columns"),
    ("count ~ mined", "zip", r"must be one-sided"),
])
def test_ziformula_bad_input_names_what_is_wrong(salamanders, ziformula, family, match):
    import keras_glmm as kg

    with pytest.raises(ValueError, match=match):
        kg.GLMM.from_formula(SALAMANDERS, salamanders, family=family, ziformula=ziformula)


def test_ziformula_missing_and_non_finite_covariates_name_column_and_row(salamanders):
    import keras_glmm as kg

    data = salamanders.copy()
    data.loc[5, "cover"] = np.nan
    with pytest.raises(ValueError, match=r"missing values in column\(s\) \['cover'\] at rows \[5\]"):
        kg.GLMM.from_formula(SALAMANDERS, data, family="zip", ziformula="~ cover")
    data.loc[5, "cover"] = 0.0
    with pytest.raises(ValueError, match=r"column 'I\(1 / cover\)' is not finite at rows \[5\]"):
        kg.GLMM.from_formula(SALAMANDERS, data, family="zip", ziformula="~ I(1 / cover)")
    # na_action="omit" drops the row, as for the conditional part.
    data.loc[5, "cover"] = np.nan
    with pytest.warns(RuntimeWarning, match="dropped 1 of 644 rows"):
        model = kg.GLMM.from_formula(SALAMANDERS, data, family="zip", ziformula="~ cover", na_action="omit")
    assert model.design.zi_columns == ["(Intercept)", "cover"]


def test_ziformula_with_covariates_is_fitted_in_memory_only(zi_fit, salamanders, tmp_path):
    import keras_glmm as kg

    for options in ({"posterior": "mean_field"}, {"batch_size": 128}):
        with pytest.raises(ValueError, match="fitted in memory by the engine"):
            kg.glmm(SALAMANDERS, salamanders, family="zip", ziformula="~ mined", **options)
    path = tmp_path / "salamanders.csv"
    salamanders.to_csv(path, index=False)
    with pytest.raises(ValueError, match="fitted in memory by the engine only, not from files"):
        kg.glmm(SALAMANDERS, kg.read_csv(str(path)), family="zip", ziformula="~ mined")
    with pytest.raises(ValueError, match="no SavedModel export"):
        zi_fit.export(str(tmp_path / "served"))


def test_engine_refuses_a_rank_deficient_zi_design(salamanders):
    family = families.get_family("zip")
    design = Design.from_data(SALAMANDERS, salamanders, family.name)
    x, y = design.arrays(salamanders)
    mined = (salamanders["mined"] == "yes").to_numpy(float)
    term = design.random[0]
    with pytest.raises(ValueError, match="`zi_design` has rank 2 with 3 columns"):
        VariationalSolver(x["x"], [(term.name, x[term.name], np.ones((len(y), 1)), term.n_levels, True)], y,
                          family, zi_design=np.column_stack([np.ones(len(y)), mined, 1.0 - mined]))
