"""Full-batch mean-field VI by coordinate ascent (`keras_glmm.engine.coordinate_ascent`).

With one random-effect term the mean-field family holds the joint posterior (the
levels are independent given the fixed effects), so the coordinate ascent must
reach the engine's variational optimum (`agq_points=0`: the engine's VI estimates):
checked for the binomial, Poisson and gaussian families. Crossed terms are checked
against the simulation's truth, and `GLMM.fit` must route data beyond the engine's
rows (`FULL_BATCH_ROWS`) to it.
"""

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
from keras_glmm import families
from keras_glmm.fitting import large_data
from keras_glmm.engine import coordinate_ascent
from keras_glmm.engine.coordinate_ascent import CoordinateAscent
from keras_glmm.model import FULL_BATCH_ROWS


def _one_term(family, num_rows=6000, num_levels=150, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, num_levels, num_rows)
    x = rng.standard_normal(num_rows)
    eta = 0.2 + 0.5 * x + 0.6 * rng.standard_normal(num_levels)[g]
    if family == "binomial":
        y = (rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    else:
        y = eta + 0.8 * rng.standard_normal(num_rows)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _fit_by_ascent(data, family, num_levels, start_scale=None):
    x = np.column_stack([np.ones(len(data)), data.x.values])
    fixed = {} if start_scale is None else {}
    solver = CoordinateAscent(x, [("g", data.g.values, None, True, num_levels, False)], data.y.values,
                              families.get_family(family), fixed_params=fixed)
    dispersion = {} if start_scale is None else {"scale": start_scale}
    solver.start(lambdas=[np.array([[0.5]])], beta=np.zeros(2), u=[np.zeros((num_levels, 1))],
                 dispersion=dispersion)
    while not solver.finished:
        solver.step()
    return solver


@pytest.mark.parametrize("family", ["binomial", "poisson", "gaussian"])
def test_one_term_reaches_the_engines_optimum(family):
    data = _one_term(family)
    engine = kg.GLMM.from_formula("y ~ x + (1 | g)", data, family=family, agq_points=0)
    engine.fit(data)
    solver = _fit_by_ascent(data, family, 150, start_scale=1.0 if family == "gaussian" else None)
    assert solver.converged and solver.check.passed
    assert solver.check.largest_step <= coordinate_ascent.STEP_TOLERANCE and solver.check.nonpositive_levels == 0
    results = solver.results()
    np.testing.assert_allclose(results["beta"], engine.fixef().values, atol=2e-3)
    sd = np.sqrt(results["covariances"][0][0, 0])
    np.testing.assert_allclose(sd, engine.varcorr()["sdcor"].values[0], rtol=3e-3)
    if family == "gaussian":
        np.testing.assert_allclose(results["dispersion"]["scale"], engine.varcorr()["sdcor"].values[-1], rtol=1e-3)
    # The ELBO is the engine's at the same optimum (float32 rows: to 1e-6 per row).
    assert abs(solver.report()["elbo"] - engine.fit_summary_["elbo"]) < 1e-6 * len(data) + 1e-3


def test_the_end_check_fails_where_the_last_pass_still_moves_a_mean(monkeypatch):
    """`PassCheck`: where the ELBO's change says stop but a Newton step is still above its
    tolerance, the passes go on; a fit that ends so is not converged, and says where."""
    monkeypatch.setattr(coordinate_ascent, "STEP_TOLERANCE", 0.0)
    monkeypatch.setattr(coordinate_ascent, "MAX_PASSES", 12)
    solver = _fit_by_ascent(_one_term("binomial"), "binomial", 150)
    assert solver.finished and not solver.converged and solver.passes == 12
    assert not solver.check.passed and solver.check.largest_step > 0
    message = solver.check.message()
    assert message.startswith("Model failed to converge: the last pass moved ") and "posterior sds" in message


def test_crossed_terms_reach_the_joint_posteriors_sds():
    """Users of 8 rows crossed with items: mean field's M-step alone puts the sds ~2% low;
    with the levels' covariance under the other term's uncertainty they are the
    joint posterior's (the engine's) to 1%."""
    rng = np.random.default_rng(5)
    num_rows, num_users, num_items = 12_000, 1500, 150
    user, item = rng.integers(0, num_users, num_rows), rng.integers(0, num_items, num_rows)
    x = rng.standard_normal(num_rows)
    eta = -0.5 + 0.8 * x + 0.8 * rng.standard_normal(num_users)[user] + 0.5 * rng.standard_normal(num_items)[item]
    data = pd.DataFrame({"y": (rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(float), "x": x,
                         "user": user, "item": item})
    engine = kg.GLMM.from_formula("y ~ x + (1 | user) + (1 | item)", data, family="binomial", agq_points=0)
    engine.fit(data)
    solver = CoordinateAscent(np.column_stack([np.ones(num_rows), x]),
                              [("user", user, None, True, num_users, False), ("item", item, None, True, num_items, False)],
                              data.y.values, families.get_family("binomial"))
    solver.start(lambdas=[np.array([[0.5]])] * 2, beta=np.zeros(2), u=[np.zeros((num_users, 1)), np.zeros((num_items, 1))])
    while not solver.finished:
        solver.step()
    assert solver.converged
    sd = [np.sqrt(c[0, 0]) for c in solver.results()["covariances"]]
    np.testing.assert_allclose(sd, engine.varcorr()["sdcor"].values, rtol=0.01)
    np.testing.assert_allclose(solver.results()["beta"], engine.fixef().values, atol=0.01)


def test_routing_rule():
    data = _one_term("binomial", num_rows=2000)
    model = kg.GLMM.from_formula("y ~ x + (1 | g)", data, family="binomial")
    assert large_data.problem(model, FULL_BATCH_ROWS + 1) is None
    assert large_data.problem(model, FULL_BATCH_ROWS) == "the engine fits it"
    assert "batch_size" in large_data.problem(model, FULL_BATCH_ROWS + 1, batch_size=1000)
    negbin = kg.GLMM.from_formula("y ~ x + (1 | g)", data, family="negative_binomial")
    assert "negative_binomial" in large_data.problem(negbin, FULL_BATCH_ROWS + 1)


def test_a_nested_design_keeps_the_engine_beyond_its_rows(monkeypatch):
    """Mean field collapses a factor another is nested in: such a design stays with the
    engine's joint posterior however many rows it has (the row limit lowered here)."""
    from keras_glmm.fitting import driver, engine

    rng = np.random.default_rng(5)
    num_rows = 3000
    school = rng.integers(0, 30, num_rows)
    klass = school * 4 + rng.integers(0, 4, num_rows)  # 4 classes in each school
    x = rng.standard_normal(num_rows)
    eta = 0.5 * x + 0.6 * rng.standard_normal(30)[school] + 0.4 * rng.standard_normal(120)[klass]
    y = (rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(float)
    data = pd.DataFrame({"y": y, "x": x, "school": school, "klass": klass})
    monkeypatch.setattr(driver, "FULL_BATCH_ROWS", 1000)
    model = kg.GLMM.from_formula("y ~ x + (1 | school) + (1 | klass)", data, family="binomial")
    inputs, _ = model.design.arrays(data)
    assert engine.nested_terms(model, inputs) == [("klass", "school")]
    assert "FULL_BATCH_ROWS=1,000" in model.engine_problem(num_rows)
    assert large_data.problem(model, num_rows, x=inputs) == (
        "term 'klass' is nested in 'school' (mean field would collapse 'school')")
    other = rng.integers(0, 120, num_rows)  # classes crossed with schools
    eta = 0.5 * x + 0.6 * rng.standard_normal(30)[school] + 0.4 * rng.standard_normal(120)[other]
    crossed = data.assign(klass=other, y=(rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(float))
    crossed_model = kg.GLMM.from_formula("y ~ x + (1 | school) + (1 | klass)", crossed, family="binomial")
    assert engine.nested_terms(crossed_model, crossed_model.design.arrays(crossed)[0]) == []
    model.fit(data)
    assert model.posterior_kind == "joint"
    crossed_model.fit(crossed)
    assert crossed_model.posterior_kind == "mean-field" and crossed_model.converged_


def test_crossed_binomial_beyond_the_engines_rows():
    """300k rows, 3,000 users x 300 items: routed by `fit`, sds within 3% of the drawn effects'."""
    rng = np.random.default_rng(3)
    num_rows, num_users, num_items = 300_000, 3000, 300
    user = rng.integers(0, num_users, num_rows)
    item = rng.integers(0, num_items, num_rows)
    x = rng.standard_normal(num_rows)
    user_effects, item_effects = 0.8 * rng.standard_normal(num_users), 0.5 * rng.standard_normal(num_items)
    eta = -0.5 + 0.8 * x + user_effects[user] + item_effects[item]
    y = (rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(float)
    data = pd.DataFrame({"y": y, "x": x, "user": user, "item": item})
    model = kg.GLMM.from_formula("y ~ x + (1 | user) + (1 | item)", data, family="binomial")
    model.fit(data)
    assert model.converged_
    assert "coordinate ascent" in model.fit_summary_["estimator"]
    assert model.posterior_kind == "mean-field"
    sd = model.varcorr()["sdcor"].values
    # Against the sds of the drawn effects (300 items' sd is 0.5 give or take 4%).
    np.testing.assert_allclose(sd, [np.std(user_effects), np.std(item_effects)], rtol=0.03)
    np.testing.assert_allclose(model.fixef().values[1], 0.8, atol=0.02)
    assert model.vcov().shape == (2, 2) and np.all(np.diag(model.vcov().values) > 0)
