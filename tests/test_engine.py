"""The inference engine against dense linear algebra, finite differences and closed forms.

`keras_glmm.engine` is numpy: the blocked factorization and its selected inverse are
checked entry by entry against the dense matrices they stand for, the profiled
objective's gradients against central differences, the bounded quasi-Newton method
on problems with known minimizers.
"""

import numpy as np
import pytest

from keras_glmm import families
from keras_glmm.families import binomial as binomial_family
from keras_glmm.engine import Structure, TooLarge, VariationalSolver
from keras_glmm.engine import blocked
from keras_glmm.engine.blocked import BlockedSystem
from keras_glmm.engine.covariances import conditional_covariance
from keras_glmm.engine.quasi_newton import BoundedBFGS


def _design(seed=0, n=300):
    """Three terms: `g` (2 effects, 40 levels), `h` crossed with it, `k` nesting `g`."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 40, n)
    h = rng.integers(0, 7, n)
    k = g // 10  # g nested in k
    x = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    zg = np.column_stack([np.ones(n), rng.normal(size=n)])
    terms = [("g", g, zg, 40, True), ("h", h, np.ones((n, 1)), 7, True), ("k", k, np.ones((n, 1)), 4, True)]
    return x, terms, rng


def _dense(structure, lambdas, weights):
    """The precision `A` of the module docstring, built densely in `Structure.blocks` order."""
    n = structure.num_rows
    columns = []
    for b, block in enumerate(structure.random_blocks):
        z = np.zeros((n, block.size))
        for e in range(block.num_effects):
            z[np.arange(n), block.index * block.num_effects + e] = (block.z @ lambdas[b])[:, e]
        columns.append(z)
    m = np.concatenate(columns + [structure.fixed_block.z], axis=1)
    a = m.T @ (weights[:, None] * m)
    k = sum(block.size for block in structure.random_blocks)
    a[:k, :k] += np.eye(k)
    return a, k


def _positions(structure, a, b):
    """Row/column positions in the dense matrix of pair `(a, b)`'s `(P, ka, kb)` entries."""
    offsets = np.cumsum([0] + [block.size for block in structure.blocks])
    pair = structure.pairs[a, b]
    ka, kb = structure.blocks[a].num_effects, structure.blocks[b].num_effects
    rows = offsets[a] + pair.levels_first[:, None, None] * ka + np.arange(ka)[None, :, None]
    cols = offsets[b] + pair.levels_second[:, None, None] * kb + np.arange(kb)[None, None, :]
    return np.broadcast_arrays(rows, cols)


@pytest.mark.parametrize("dense_g", [False, True])
def test_blocked_factorization_and_selected_inverse_match_dense_algebra(dense_g, monkeypatch):
    """Both ways to `G = F S^-1`: the triples, and the dense product (forced here)."""
    monkeypatch.setattr(blocked, "DENSE_G_SPEEDUP", 1e12 if dense_g else 0.0)
    x, terms, rng = _design()
    structure = Structure(x, terms)
    assert [b.name for b in structure.blocks] == ["g", "h", "k", "(fixed)"]  # g has most coefficients
    system = BlockedSystem(structure)
    assert system.dense_g is dense_g
    lambdas = [np.array([[0.8, 0.0], [0.3, 0.5]]), np.array([[1.3]]), np.array([[0.4]])]
    weights = rng.uniform(0.2, 2.0, structure.num_rows)
    factor = system.factor(lambdas, structure.cross_products(weights))
    a, k = _dense(structure, lambdas, weights)
    assert factor.logdet == pytest.approx(np.linalg.slogdet(a)[1], abs=1e-9)
    assert factor.logdet_random == pytest.approx(np.linalg.slogdet(a[:k, :k])[1], abs=1e-9)
    # A solve, in the block layout.
    rhs = rng.normal(size=len(a))
    k0 = structure.blocks[0].size
    x0, xd, quad = factor.solve(rhs[:k0].reshape(-1, 2), rhs[k0:])
    exact = np.linalg.solve(a, rhs)
    np.testing.assert_allclose(np.concatenate([x0.reshape(-1), xd]), exact, atol=1e-10)
    assert quad == pytest.approx(rhs @ exact, rel=1e-10)
    # Selected inverses, entry by entry on the pattern.
    for mode, inverse in (("random", np.linalg.inv(a[:k, :k])), ("full", np.linalg.inv(a))):
        selected = factor.selected_inverse(mode)
        fixed = len(structure.blocks) - 1
        expected_pairs = {p for p in structure.pairs if mode == "full" or fixed not in p}
        assert set(selected) == expected_pairs
        for (p, q), values in selected.items():
            rows, cols = _positions(structure, p, q)
            np.testing.assert_allclose(values, inverse[rows, cols], atol=1e-10, err_msg=f"{mode} {(p, q)}")
    # The fixed effects' covariance is the fixed block of A^-1.
    np.testing.assert_allclose(factor.fixed_covariance(), np.linalg.inv(a)[-3:, -3:], atol=1e-10)
    # Without fixed effects (`y ~ 0 + ...`): the same factorization of the random block.
    structure = Structure(np.zeros((structure.num_rows, 0)), terms)
    factor = BlockedSystem(structure).factor(lambdas, structure.cross_products(weights))
    assert factor.logdet == pytest.approx(np.linalg.slogdet(a[:k, :k])[1], abs=1e-9)


def test_factorization_with_a_standard_deviation_at_zero():
    """Lambda = 0 (a boundary fit) leaves A's random block the identity: no division by 0."""
    x, terms, rng = _design(1)
    structure = Structure(x, terms)
    lambdas = [np.zeros((2, 2)), np.array([[0.0]]), np.array([[0.7]])]
    weights = np.ones(structure.num_rows)
    factor = BlockedSystem(structure).factor(lambdas, structure.cross_products(weights))
    a, k = _dense(structure, lambdas, weights)
    assert factor.logdet == pytest.approx(np.linalg.slogdet(a)[1], abs=1e-9)
    np.testing.assert_allclose(factor.selected_inverse()[0, 0], np.broadcast_to(np.eye(2), (40, 2, 2)),
                               atol=1e-12)


def test_conditional_covariance_is_the_schur_complement_of_the_random_effects():
    """The fixed effects' Laplace covariance (`results.fixed_vcov` after stochastic VI, the
    engine's at a VI optimum): `(X'WX - X'WZ (Z'WZ + Sigma^-1)^-1 Z'WX)^-1` densely, and with
    an sd at 0 (no `Sigma^-1`) the same in `Lambda`'s coordinates."""
    x, terms, rng = _design(4)
    structure = Structure(x, terms)
    system = BlockedSystem(structure)
    weights = rng.uniform(0.2, 2.0, structure.num_rows)
    lambdas = [np.array([[0.9, 0.0], [0.3, 0.5]]), np.array([[0.7]]), np.array([[0.4]])]
    a, k = _dense(structure, lambdas, weights)
    expected = np.linalg.inv(a[k:, k:] - a[k:, :k] @ np.linalg.solve(a[:k, :k], a[:k, k:]))
    np.testing.assert_allclose(conditional_covariance(system, lambdas, weights), expected, rtol=1e-10)
    # Through Sigma^-1 = (Lambda Lambda')^-1, as the sparse formula of stochastic VI's results had it.
    n = structure.num_rows
    design = []
    precision = []
    for b, block in enumerate(structure.random_blocks):
        rows = np.zeros((n, block.size))
        for e in range(block.num_effects):
            rows[np.arange(n), block.index * block.num_effects + e] = block.z[:, e]
        design.append(rows)
        precision.append(np.kron(np.eye(block.num_levels), np.linalg.inv(lambdas[b] @ lambdas[b].T)))
    z = np.concatenate(design, axis=1)
    zwz = z.T @ (weights[:, None] * z) + _block_diagonal(precision)
    zwx = z.T @ (weights[:, None] * x)
    schur = x.T @ (weights[:, None] * x) - zwx.T @ np.linalg.solve(zwz, zwx)
    np.testing.assert_allclose(conditional_covariance(system, lambdas, weights), np.linalg.inv(schur), rtol=1e-8)
    lambdas[1] = np.zeros((1, 1))  # a variance at 0: Sigma has no inverse, Lambda's coordinates do not need one
    a, k = _dense(structure, lambdas, weights)
    expected = np.linalg.inv(a[k:, k:] - a[k:, :k] @ np.linalg.solve(a[:k, :k], a[:k, k:]))
    np.testing.assert_allclose(conditional_covariance(system, lambdas, weights), expected, rtol=1e-10)


def _block_diagonal(blocks):
    size = sum(len(block) for block in blocks)
    out = np.zeros((size, size))
    start = 0
    for block in blocks:
        out[start:start + len(block), start:start + len(block)] = block
        start += len(block)
    return out


def test_memory_budget_names_the_term():
    rng = np.random.default_rng(0)
    n = 2000
    x = np.ones((n, 1))
    terms = [("user", rng.integers(0, 900, n), np.ones((n, 1)), 900, True),
             ("item", rng.integers(0, 800, n), np.ones((n, 1)), 800, True)]
    with pytest.raises(TooLarge, match=r"term 'item' alone has 800 \(800 levels x 1\) beside 'user'"):
        BlockedSystem(Structure(x, terms), memory_budget=1_000_000)
    # One term: only the fixed effects are dense, and a budget below them says so
    # (it used to fail on max() of no blocks).
    with pytest.raises(TooLarge, match=r"dense block of 1 coefficients .*budget 10 bytes\): the 1 fixed effects alone"):
        BlockedSystem(Structure(x, terms[:1]), memory_budget=10)


def _gaussian_data(seed=0, n=400):
    x, terms, rng = _design(seed, n)
    g, h = terms[0][1], terms[1][1]
    b_g = rng.normal(size=(40, 2)) * [1.0, 0.5]
    y = x @ [1.0, 0.5, -0.3] + np.einsum("ik,ik->i", terms[0][2], b_g[g]) + 0.8 * rng.normal(size=7)[h]
    return x, terms, y + rng.normal(size=n)


def _check_gradient(objective, vector, steps=1e-6, rtol=2e-4, atol=2e-5):
    value, grad = objective(vector)
    numeric = np.empty_like(vector)
    for j in range(len(vector)):
        e = np.zeros_like(vector)
        e[j] = steps
        numeric[j] = (objective(vector + e)[0] - objective(vector - e)[0]) / (2 * steps)
    np.testing.assert_allclose(grad, numeric, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reml", [False, True])
def test_gaussian_profiled_gradient_matches_finite_differences(reml):
    x, terms, y = _gaussian_data()
    solver = VariationalSolver(x, terms, y, families.get_family("gaussian"), reml=reml)
    vector = np.array([0.9, 0.2, 0.4, 0.7, 0.3])
    _check_gradient(solver.stage.objective, vector)


def test_gaussian_average_information_matches_the_hessian_at_the_optimum():
    x, terms, y = _gaussian_data(2)
    solver = VariationalSolver(x, terms, y, families.get_family("gaussian"))
    solver.start([np.eye(2) * 0.5, np.eye(1) * 0.5, np.eye(1) * 0.5])
    while not solver.converged:
        solver.step()
    vector = solver.optimizer.x
    ai = solver.stage.curvature(vector)
    hessian = np.empty_like(ai)
    for j in range(len(vector)):
        e = np.zeros_like(vector)
        e[j] = 1e-5
        hessian[:, j] = (solver.stage.objective(vector + e)[1] - solver.stage.objective(vector - e)[1]) / 2e-5
    # AI-REML's approximation is the expected information: close to the observed one.
    np.testing.assert_allclose(np.diag(ai), np.diag(hessian), rtol=0.1)
    assert np.linalg.norm(ai - hessian) < 0.1 * np.linalg.norm(hessian)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_glmm_envelope_gradient_matches_finite_differences(family):
    x, terms, rng = _design(3, 300)
    eta = x @ [-0.3, 0.5, 0.2] + rng.normal(size=40)[terms[0][1]] + 0.5 * rng.normal(size=7)[terms[1][1]]
    mean = families.get_family(family).link.inverse(eta).numpy()
    y = rng.binomial(1, mean) if family == "binomial" else rng.poisson(mean)
    terms = terms[:2]
    solver = VariationalSolver(x, terms, y, families.get_family(family))
    solver.start([np.eye(2) * 0.5, np.eye(1) * 0.5])
    # The envelope theorem needs q at its optimum for each evaluation: the inner loop
    # converges tightly, so differences of the profiled ELBO are its gradient.
    vector = np.array([0.8, 0.1, 0.3, 0.6])
    _check_gradient(solver.stage.objective, vector, steps=1e-5, rtol=1e-3, atol=1e-4)


def test_bounded_bfgs_stops_on_the_bound_of_a_quadratic():
    target = np.array([1.0, -2.0, 3.0])

    def f(v):
        d = v - target
        return float(d @ np.diag([1.0, 10.0, 100.0]) @ d), 2 * np.diag([1.0, 10.0, 100.0]) @ d

    opt = BoundedBFGS(f, np.array([2.0, 2.0, 2.0]), np.array([0.0, 0.0, -np.inf]))
    while not opt.converged and opt.iterations < 100:
        opt.step()
    np.testing.assert_allclose(opt.x, [1.0, 0.0, 3.0], atol=1e-6)
    assert opt.x[1] == 0.0  # exactly on the bound


def test_bounded_bfgs_probes_a_stationary_bound():
    """`f(t) = (t^2 - 1)^2` in a standard deviation `t >= 0`: 0 is stationary, 1 the minimum."""

    def f(v):
        t = v[0]
        return float((t * t - 1.0) ** 2), np.array([4.0 * t * (t * t - 1.0)])

    opt = BoundedBFGS(f, np.array([0.0]), np.array([0.0]))
    while not opt.converged and opt.iterations < 100:
        opt.step()
    assert opt.x[0] == pytest.approx(1.0, abs=1e-6)


def test_bounded_bfgs_keeps_a_true_boundary_optimum():
    def f(v):
        t = v[0]
        return float((t * t + 1.0) ** 2), np.array([4.0 * t * (t * t + 1.0)])

    opt = BoundedBFGS(f, np.array([0.7]), np.array([0.0]))
    while not opt.converged and opt.iterations < 100:
        opt.step()
    assert opt.x[0] == 0.0


@pytest.mark.parametrize(
    "family,link,y,params,trials",
    [
        ("gaussian", "log", 2.5, {"scale": 0.7}, None),
        ("binomial", "logit", 3.0, {}, 7.0),
        ("binomial", "probit", 1.0, {}, None),
        ("poisson", "log", 4.0, {}, None),
        ("negative_binomial", "log", 4.0, {"dispersion": 2.5}, None),
        ("gamma", "log", 1.7, {"shape": 3.0}, None),
    ],
)
def test_family_derivatives_are_those_of_the_expected_log_prob(family, link, y, params, trials):
    fam = families.get_family(family, link=link)
    m = np.array([0.2, -0.4, 0.9])
    v = np.array([0.3, 0.0, 1.1])
    yy = np.full(3, y)
    tt = None if trials is None else np.full(3, trials)

    def value(mm, vv, pp=params):
        return fam.expected_log_prob_derivatives(yy, mm, vv, pp, trials=tt)[0]

    val, first, second, d_var, grads = fam.expected_log_prob_derivatives(yy, m, v, params, trials=tt)
    eps = 1e-5
    np.testing.assert_allclose(first, (value(m + eps, v) - value(m - eps, v)) / (2 * eps), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        second, (value(m + eps, v) - 2 * val + value(m - eps, v)) / eps**2, rtol=1e-3, atol=1e-5)
    positive = v > 0
    dv = (value(m, v + eps) - value(m, np.maximum(v - eps, 0))) / (2 * eps)
    np.testing.assert_allclose(d_var[positive], dv[positive], rtol=1e-5, atol=1e-8)
    # Price's theorem: d/dv E[f] = E[f''] / 2, up to the quadrature's error.
    np.testing.assert_allclose(d_var[positive], second[positive] / 2, rtol=1e-3, atol=1e-6)
    for name, g in grads.items():
        up = dict(params, **{name: params[name] + eps})
        down = dict(params, **{name: params[name] - eps})
        assert g == pytest.approx(float(np.sum(value(m, v, up) - value(m, v, down))) / (2 * eps), rel=1e-5)


NUMPY_KERNEL_CASES = [
    ("gaussian", "identity", {"scale": 0.7}, None), ("gaussian", "log", {"scale": 0.7}, None),
    ("gaussian", "inverse", {"scale": 0.7}, None), ("binomial", "logit", {}, None), ("binomial", "logit", {}, 7.0),
    ("binomial", "probit", {}, None), ("binomial", "probit", {}, 5.0), ("binomial", "cloglog", {}, None),
    ("binomial", "cloglog", {}, 4.0), ("poisson", "log", {}, None), ("poisson", "identity", {}, None),
    ("negative_binomial", "log", {"dispersion": 2.5}, None), ("nbinom1", "log", {"dispersion": 1.7}, None),
    ("gamma", "log", {"shape": 3.0}, None),
    ("gamma", "inverse", {"shape": 3.0}, None), ("gamma", "identity", {"shape": 3.0}, None),
]


@pytest.mark.parametrize("family,link,params,trials", NUMPY_KERNEL_CASES)
def test_numpy_kernels_are_the_tensorflow_maths(family, link, params, trials):
    """The engine's numpy derivatives equal autodiff of the TF `expected_log_prob` / `log_prob`."""
    import tensorflow as tf

    from keras_glmm.families.autodiff import derivatives_function

    fam = families.get_family(family, link=link)
    rng = np.random.default_rng(0)
    n = 200
    tt = None if trials is None else np.full(n, trials)
    if family == "binomial":
        y = rng.integers(0, (1 if trials is None else int(trials)) + 1, n).astype(float)
    elif family in ("poisson", "negative_binomial", "nbinom1"):
        y = rng.poisson(3, n).astype(float)
    else:
        y = rng.gamma(2, 1, n) + 0.1
    eta = rng.uniform(0.5, 3, n) if link in ("inverse", "identity") else rng.normal(0, 1.5, n)
    if link == "cloglog":
        eta[-4:] = [-25.0, -30.0, 3.5, 5.0]  # the series and overflow branches
    v = rng.uniform(0, 1, n)
    v[:5] = 0.0
    names = tuple(sorted(params))
    ones = np.ones(n)
    for num_points, numpy_out in ((fam.quadrature_points, fam.expected_log_prob_derivatives(y, eta, v, params, trials=tt)),
                                  (0, fam.expected_log_prob_derivatives(y, eta, v, params, trials=tt, num_points=0))):
        traced = derivatives_function(fam, num_points, names, tt is not None)(
            tf.constant(y), tf.constant(eta), tf.constant(v), tf.constant(ones if tt is None else tt),
            tf.constant(ones), *[tf.constant(params[k], tf.float64) for k in names])
        for got, want in zip(numpy_out[:3], traced[:3]):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)
        if num_points:  # d/dv (TF's quadrature takes it as 0 at v = 0)
            np.testing.assert_allclose(numpy_out[3][5:], traced[3].numpy()[5:], rtol=1e-10, atol=1e-10)
        for name, g in zip(names, traced[4]):
            assert numpy_out[4][name] == pytest.approx(float(g), rel=1e-10, abs=1e-10)


def test_a_posterior_beyond_the_budget_names_the_term_and_the_way_out():
    import keras_glmm as kg

    data = kg.datasets.load_penicillin()
    with pytest.raises(TooLarge, match=r"term 'sample' alone has 6 .*posterior='mean_field'"):
        kg.glmm("diameter ~ 1 + (1|plate) + (1|sample)", data, posterior="joint", memory_budget=100)
    with pytest.warns(RuntimeWarning, match=r"Falling back to stochastic VI"):
        fit = kg.glmm("diameter ~ 1 + (1|plate) + (1|sample)", data, memory_budget=100, epochs=5)
    assert fit.posterior_kind == "mean-field"


@pytest.mark.parametrize("trials", [None, 6.0])
def test_binomial_logit_kernel_is_the_generic_quadrature(trials):
    """The logit kernel (one exp and one log per node, rows in chunks) gives the generic
    kernel's numbers across chunk boundaries, in both tails and at zero variance."""
    chunk = binomial_family.QUADRATURE_CHUNK_ROWS
    fam = families.get_family("binomial", link="logit")
    rng = np.random.default_rng(1)
    n = 2 * chunk + 3
    eta = rng.normal(0, 2, n)
    eta[[0, 1, chunk, n - 2, n - 1]] = [-800.0, -40.0, 35.0, 800.0, -29.0]
    v = rng.uniform(0, 1.5, n)
    v[[2, chunk + 1, n - 3]] = 0.0
    trials_per_row = None if trials is None else np.full(n, trials)
    y = rng.integers(0, 2 if trials is None else int(trials) + 1, n).astype(float)
    with np.errstate(all="ignore"):
        generic = families.Family._numpy_quadrature(fam, y, eta, v, {}, trials_per_row, fam.quadrature_points)
    kernel = fam.expected_log_prob_derivatives(y, eta, v, {}, trials=trials_per_row)
    for got, want in zip(kernel[:4], generic[:4]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_pilot_on_a_share_of_the_levels_starts_a_large_fit_at_the_same_optimum(monkeypatch):
    """Beyond `PILOT_FROM_ROWS` rows the engine starts from a fit to whole levels of the
    largest term (`keras_glmm.engine.pilot`): the same end point as without."""
    from keras_glmm.engine import pilot as pilot_module

    rng = np.random.default_rng(4)
    n, groups = 6000, 300
    g = rng.integers(0, groups, n)
    h = g % 30  # g nested in h
    xcol = rng.normal(size=n)
    x = np.column_stack([np.ones(n), xcol])
    u = rng.normal(size=(groups, 2)) * [0.7, 0.3]
    eta = -0.2 + 0.5 * xcol + u[g, 0] + u[g, 1] * xcol + 0.6 * rng.normal(size=30)[h]
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta))).astype(float)
    terms = [("g", g, np.column_stack([np.ones(n), xcol]), groups, True), ("h", h, np.ones((n, 1)), 30, True)]
    start = dict(lambdas=[np.eye(2) * 0.5, np.eye(1) * 0.5], beta=np.zeros(2), dispersion={})

    def fit():
        solver = VariationalSolver(x, terms, y, families.get_family("binomial"))
        solver.start(**start)
        while not solver.finished:
            solver.step()
        return solver

    plain = fit()
    shares = []
    pilot_start = pilot_module.pilot_start

    def recording(*args, **kwargs):
        out = pilot_start(*args, **kwargs)
        shares.append(out)
        return out

    monkeypatch.setattr(pilot_module, "PILOT_FROM_ROWS", 4000)
    monkeypatch.setattr(pilot_module, "PILOT_SHARE", 1 / 3)
    monkeypatch.setattr(pilot_module, "pilot_start", recording)
    piloted = fit()
    assert len(shares) == 1 and shares[0] is not None
    assert piloted.converged and plain.converged
    np.testing.assert_allclose(piloted.optimizer.x, plain.optimizer.x, atol=2e-3)
    np.testing.assert_allclose(piloted.state.beta, plain.state.beta, atol=1e-4)
    assert abs(piloted.optimizer.f - plain.optimizer.f) < 1e-6
