"""The exact-ML phase (adaptive Gauss-Hermite quadrature): its node check and cost guard.

The phase is called exact only when its rule has converged in the nodes: one more
rung per dimension moves the log-likelihood, and what re-optimizing with the new
gradient would gain, by less than `AGQ_TOLERANCE` (1e-3 nats). By default it runs
only where it costs at most a few times the variational fit and fits
`memory_budget`; otherwise the VI answer stays and the fit says so.
"""

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
from keras_glmm import datasets, families
from keras_glmm.engine import VariationalSolver
from keras_glmm.engine import quadrature as quadrature_lib
from keras_glmm.engine import exact_likelihood


def _nested_binary(seed=3, clusters=40, mothers=8, sd_mother=5.0, sd_cluster=1.0):
    """Binary data, 1 to 3 rows per mother, a large mothers' sd: the inner integrand is
    far from Gaussian (most mothers' rows all 0 or all 1)."""
    rng = np.random.default_rng(seed)
    inner_levels = clusters * mothers
    per_mother = rng.integers(1, 4, inner_levels)
    mother = np.repeat(np.arange(inner_levels), per_mother)
    cluster = mother // mothers
    n = len(mother)
    x = np.column_stack([np.ones(n), rng.normal(size=n)])
    eta = 0.5 + 0.8 * x[:, 1] + sd_mother * rng.normal(size=inner_levels)[mother] + (
        sd_cluster * rng.normal(size=clusters)[cluster])
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    terms = [("mother", mother, np.ones((n, 1)), inner_levels, True),
             ("cluster", cluster, np.ones((n, 1)), clusters, True)]
    return x, terms, y


def _fit(solver, lambdas, beta):
    solver.start(lambdas, beta=beta)
    for _ in range(300):
        if solver.finished:
            break
        solver.step()
    assert solver.finished
    return solver


def _log_likelihood(solver, points):
    """The solver's log-likelihood at its estimates with another rule."""
    q = solver.quadrature
    kept = list(q.points)
    q.set_points(points)
    try:
        return q.log_likelihood(solver.state.beta, solver.state.lambdas, {})[0]
    finally:
        q.set_points(kept)


def test_five_nodes_are_nats_off_on_tiny_clusters_with_a_large_sd():
    """The premise of the node check: on these data a 5-node inner rule is not the
    log-likelihood (by far more than 1e-3), while 101 and 201 nodes agree."""
    x, terms, y = _nested_binary()
    solver = VariationalSolver(x, terms, y, families.get_family("binomial"), agq_points=5)
    lambdas = [np.array([[5.0]]), np.array([[1.0]])]

    def at(points):
        solver.quadrature.set_points(points)
        return solver.quadrature.log_likelihood(np.array([0.5, 0.8]), lambdas, {})[0]

    fine = at([25, 201])
    assert abs(at([25, 101]) - fine) < 1e-4
    assert abs(at([5, 5]) - fine) > 0.05
    assert abs(at([25, 25]) - fine) > 1e-3


def test_node_check_raises_an_unconverged_rule_until_it_is_exact():
    """Started at 5 nodes per dimension, the fit raises the inner (mothers') nodes
    until one more rung moves logLik by < 1e-3, and only then calls itself exact: its
    log-likelihood is that of a rule far finer, at its own estimates."""
    x, terms, y = _nested_binary()
    solver = VariationalSolver(x, terms, y, families.get_family("binomial"), agq_points=5)
    _fit(solver, [np.eye(1), np.eye(1)], np.zeros(2))
    status = solver.quadrature_status
    assert solver.likelihood == "quadrature" and status.exact
    outer, inner = solver.quadrature.points
    assert inner > 5  # raised where it mattered
    # Every rung below the last moved by more than the tolerance; the last did not.
    ladder = status.ladder
    assert any(r.loglik_change > exact_likelihood.AGQ_TOLERANCE for r in ladder)
    assert ladder[-1].loglik_change <= exact_likelihood.AGQ_TOLERANCE
    fine = _log_likelihood(solver, [51, 401])
    assert solver.report()["elbo"] == pytest.approx(fine, abs=2e-3)
    assert "exact ML by adaptive Gauss-Hermite quadrature" in solver.estimator


def test_node_check_that_cannot_run_says_not_exact():
    """When the next rung is beyond the nodes allowed (AGQ_MAX_NODES), the fit stops
    on its rule and says it is not verified, with the log-likelihood's last move."""
    x, terms, y = _nested_binary()
    solver = VariationalSolver(x, terms, y, families.get_family("binomial"), agq_points=5)
    max_nodes = exact_likelihood.AGQ_MAX_NODES
    exact_likelihood.AGQ_MAX_NODES = 5 * 23
    try:
        _fit(solver, [np.eye(1), np.eye(1)], np.zeros(2))
    finally:
        exact_likelihood.AGQ_MAX_NODES = max_nodes
    assert solver.likelihood == "approximate"
    assert not solver.quadrature_status.exact
    assert "NOT verified exact" in solver.estimator and "AGQ_MAX_NODES" in solver.estimator


def test_cost_guard_keeps_the_variational_answer_and_says_so():
    """A memory_budget that the VI posterior fits but one evaluation's (rows x nodes)
    arrays do not: the default keeps the VI fit and says why and how to ask;
    agq_points=25 asks, and runs in chunks of clusters within the budget."""
    rng = np.random.default_rng(0)
    groups, n = 60, 1200
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    eta = -0.5 + x + rng.normal(size=groups)[g] + 0.5 * rng.normal(size=groups)[g] * x
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": g.astype(str)})
    # One evaluation needs 1,200 x 625 x 80 bytes = 57 MiB; the largest group, ~35 rows,
    # at the check's 51^2 nodes 7 MiB.
    budget = 16 * 2**20
    fit = kg.glmm("y ~ x + (x | g)", df, family="binomial", memory_budget=budget)
    summary = fit.fit_summary_
    assert summary["likelihood"] == "bound" and not summary["exact"]
    assert "Gaussian VI" in summary["estimator"] and "memory_budget" in summary["estimator"]
    assert "agq_points=25 asks for it" in summary["estimator"]
    assert "Estimator: Gaussian VI" in fit.report()
    forced = kg.glmm("y ~ x + (x | g)", df, family="binomial", memory_budget=budget, agq_points=25)
    assert forced.fit_summary_["likelihood"] == "quadrature"
    assert "exact ML by adaptive Gauss-Hermite quadrature" in forced.fit_summary_["estimator"]
    assert forced.logLik() > fit.logLik()  # the ELBO bounds the log-likelihood


def test_chunks_give_the_same_log_likelihood_and_stay_within_the_budget():
    x, terms, y = _nested_binary()
    solver = VariationalSolver(x, terms, y, families.get_family("binomial"), agq_points=25)
    q = solver.quadrature
    lambdas = [np.array([[3.0]]), np.array([[1.0]])]
    beta = np.array([0.5, 0.8])
    whole, grads = q.log_likelihood(beta, lambdas, {})
    assert len(q.chunks()) == 1
    q.memory_budget = q.largest_cluster_bytes() * 3
    q._chunks = None
    assert len(q.chunks()) > 5
    assert max(len(c.rows) for c in q.chunks()) * q.nodes_per_row() * quadrature_lib.BYTES_PER_NODE <= q.memory_budget
    chunked, chunked_grads = q.log_likelihood(beta, lambdas, {})
    assert chunked == pytest.approx(whole, abs=1e-9)
    np.testing.assert_allclose(chunked_grads["beta"], grads["beta"], rtol=1e-10)
    q.memory_budget = q.largest_cluster_bytes() // 2
    q._chunks = None
    with pytest.raises(ValueError, match="memory_budget"):
        q.chunks()


GUPRENAT = ("prenat01 ~ childAge + motherAge + indig + momEd + husEd + husEmpl + toilet + pcInd81 + ssDist"
            " + (1|cluster/mom)")


def test_guprenat_is_bundled():
    df = datasets.load_guprenat()
    assert len(df) == 2449 and df["mom"].nunique() == 1558 and df["cluster"].nunique() == 161
    assert df["momEd"].isna().sum() == 0  # "None" is a level, not a missing value
    assert df["prenat01"].sum() == int((df["prenat"] == "Modern").sum())


@pytest.mark.slow
def test_guprenat_default_fit_does_not_claim_to_be_exact():
    """guPrenat (1 to 4 births per mother, mothers' sd ~7): 25 nodes per dimension are
    nats off the log-likelihood (the exact ML is logLik -1056.94 at sds 7.02 and 3.65;
    the reviewer's rule of 25 x 201 nodes, checked at 41 x 201 and 25 x 401). The
    default fit cannot afford the rungs that would verify its rule within its time
    allowance: it must say it is not exact."""
    fit = kg.glmm(GUPRENAT, datasets.load_guprenat(), family="binomial")
    summary = fit.fit_summary_
    assert not summary["exact"]
    assert summary["likelihood"] in ("bound", "approximate")
    assert "NOT verified exact" in summary["estimator"] or "Gaussian VI" in summary["estimator"]
