"""Tests for keras_glmm.families: numbers against scipy, quadrature, validation."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special, stats

from keras_glmm import families as fam

# numpy reference inverse links
INV = {
    "identity": lambda e: e,
    "log": np.exp,
    "logit": special.expit,
    "probit": stats.norm.cdf,
    "cloglog": lambda e: -np.expm1(-np.exp(e)),
    "inverse": lambda e: 1.0 / e,
}


def scipy_logp(family, link, y, eta, params, trials=None):
    eta = np.asarray(eta, dtype=np.float64)
    mu = INV[link](eta)
    if family == "binomial" and link != "logit":
        # tail-stable reference for the numerical integrals (p rounds to 1)
        n = 1.0 if trials is None else np.asarray(trials, dtype=np.float64)
        if link == "probit":
            lp, lq = stats.norm.logcdf(eta), stats.norm.logcdf(-eta)
        else:
            lp, lq = np.log(-np.expm1(-np.exp(eta))), -np.exp(eta)
        return special.gammaln(n + 1) - special.gammaln(y + 1) - special.gammaln(n - y + 1) + y * lp + (n - y) * lq
    if family == "gaussian":
        return stats.norm.logpdf(y, loc=mu, scale=params["scale"])
    if family == "binomial":
        if trials is None:
            return stats.bernoulli.logpmf(y, mu)
        return stats.binom.logpmf(y, trials, mu)
    if family == "poisson":
        return stats.poisson.logpmf(y, mu)
    if family == "negative_binomial":
        th = params["dispersion"]
        return stats.nbinom.logpmf(y, n=th, p=th / (th + mu))
    if family == "nbinom1":  # size mu / phi, prob 1 / (1 + phi): variance mu (1 + phi)
        phi = params["dispersion"]
        return stats.nbinom.logpmf(y, n=mu / phi, p=1.0 / (1.0 + phi))
    if family == "gamma":
        a = params["shape"]
        return stats.gamma.logpdf(y, a=a, scale=mu / a)
    if family == "beta":
        # 1 - mu from its own tail formula; mu and 1 - mu floored at sqrt(tiny) as the
        # family documents (cloglog's 1 - mu = exp(-e^eta) reaches it at eta = 5.9).
        phi = params["precision"]
        rest = {"logit": lambda e: special.expit(-e), "probit": lambda e: stats.norm.cdf(-e),
                "cloglog": lambda e: np.exp(-np.exp(e))}[link](eta)
        floor = np.sqrt(np.finfo(np.float64).tiny)
        a, b = np.maximum(mu, floor) * phi, np.maximum(rest, floor) * phi
        np.testing.assert_allclose(stats.beta.logpdf(y, a, b), special.gammaln(phi) - special.gammaln(a)
                                   - special.gammaln(b) + (a - 1) * np.log(y) + (b - 1) * np.log1p(-y),
                                   rtol=1e-9, atol=1e-9)
        return stats.beta.logpdf(y, a, b)
    if family in ("zero_inflated_poisson", "zero_inflated_negative_binomial"):
        pi = params["zi_odds"] / (1.0 + params["zi_odds"])
        if family == "zero_inflated_poisson":
            count = stats.poisson.logpmf(y, mu)
        else:
            th = params["dispersion"]
            count = stats.nbinom.logpmf(y, n=th, p=th / (th + mu))
        return np.where(y == 0, np.log(pi + (1 - pi) * np.exp(count)), np.log1p(-pi) + count)
    raise AssertionError(family)


# (family, link, eta rows, y rows, params, trials); eta chosen inside the valid region.
CASES = [
    ("gaussian", "identity", [-1.0, 0.3, 2.5], [-0.5, 0.0, 4.0], {"scale": 1.7}, None),
    ("gaussian", "log", [-1.0, 0.3, 1.5], [0.2, 1.5, 4.0], {"scale": 0.8}, None),
    ("gaussian", "inverse", [0.5, 1.3, 2.5], [1.5, 0.8, 0.3], {"scale": 0.6}, None),
    ("binomial", "logit", [-2.0, 0.1, 3.0], [0.0, 1.0, 1.0], {}, None),
    ("binomial", "logit", [-2.0, 0.1, 3.0], [1.0, 4.0, 9.0], {}, [5.0, 7.0, 10.0]),
    ("binomial", "probit", [-1.5, 0.2, 1.0], [0.0, 1.0, 0.0], {}, None),
    ("binomial", "probit", [-1.5, 0.2, 1.0], [2.0, 3.0, 6.0], {}, [4.0, 6.0, 8.0]),
    ("binomial", "cloglog", [-2.0, -0.3, 0.8], [1.0, 0.0, 1.0], {}, None),
    ("binomial", "cloglog", [-2.0, -0.3, 0.8], [0.0, 2.0, 5.0], {}, [3.0, 4.0, 5.0]),
    ("poisson", "log", [-1.0, 0.5, 2.3], [0.0, 2.0, 12.0], {}, None),
    ("poisson", "identity", [0.7, 3.0, 8.0], [0.0, 4.0, 6.0], {}, None),
    ("negative_binomial", "log", [-0.5, 1.0, 2.5], [0.0, 3.0, 20.0], {"dispersion": 2.5}, None),
    ("nbinom1", "log", [-0.5, 1.0, 2.5], [0.0, 3.0, 20.0], {"dispersion": 1.7}, None),
    ("gamma", "inverse", [0.5, 1.0, 2.0], [1.5, 0.7, 0.4], {"shape": 3.0}, None),
    ("gamma", "log", [-0.5, 0.4, 1.5], [0.3, 2.0, 5.0], {"shape": 1.7}, None),
    ("gamma", "identity", [0.5, 2.0, 6.0], [0.8, 1.5, 7.0], {"shape": 4.0}, None),
    ("beta", "logit", [-2.0, 0.1, 3.0], [0.1, 0.6, 0.97], {"precision": 8.0}, None),
    ("beta", "probit", [-1.5, 0.2, 1.0], [0.05, 0.5, 0.9], {"precision": 3.0}, None),
    ("beta", "cloglog", [-2.0, -0.3, 0.8], [0.2, 0.45, 0.99], {"precision": 20.0}, None),
    ("zero_inflated_poisson", "log", [-1.0, 0.5, 2.3], [0.0, 2.0, 12.0], {"zi_odds": 0.4}, None),
    ("zero_inflated_negative_binomial", "log", [-0.5, 2.5, 1.0], [0.0, 0.0, 5.0],
     {"dispersion": 2.5, "zi_odds": 1.5}, None),
]
IDS = [f"{c[0]}-{c[1]}-{'trials' if c[5] else 'n1'}" for c in CASES]

# The ordinal family needs its categories (tests/test_families_nbinom1_ordinal.py, and below).
ALL_PAIRS = [(n, link) for n, cls in fam.base._FAMILIES.items() for link in cls.valid_links if n != "ordinal"]


def _t(x):
    return tf.constant(np.asarray(x, dtype=np.float64))


def _params(params):
    return {k: _t(v) for k, v in params.items()}


# ---------------------------------------------------------------- log_prob


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_prob_matches_scipy(case):
    name, link, eta, y, params, trials = case
    f = fam.get_family(name, link)
    got = f.log_prob(_t(y), _t(eta), _params(params), None if trials is None else _t(trials))
    assert got.dtype == tf.float64 and got.shape == (3,)
    want = scipy_logp(name, link, np.array(y), np.array(eta), params, trials)
    if name == "binomial":  # the plain scipy.stats pmf too
        n = 1 if trials is None else np.array(trials)
        np.testing.assert_allclose(want, stats.binom.logpmf(y, n, INV[link](np.array(eta))), rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    # distribution() and mean() agree with the link
    np.testing.assert_allclose(f.mean(_t(eta)).numpy(), INV[link](np.array(eta)), rtol=1e-12)


def test_all_family_link_pairs_covered():
    assert {(c[0], c[1]) for c in CASES} == set(ALL_PAIRS)


def test_negative_binomial_moments():
    f = fam.get_family("nb")
    d = f.distribution(_t([np.log(3.0), np.log(10.0)]), {"dispersion": _t(2.0)})
    np.testing.assert_allclose(d.mean().numpy(), [3.0, 10.0])
    np.testing.assert_allclose(d.variance().numpy(), [3.0 + 9.0 / 2, 10.0 + 100.0 / 2])


def test_gamma_moments():
    d = fam.get_family("gamma", "log").distribution(_t([np.log(2.0)]), {"shape": _t(4.0)})
    np.testing.assert_allclose(d.mean().numpy(), [2.0])
    np.testing.assert_allclose(d.variance().numpy(), [4.0 / 4.0])


def test_binomial_tails_stable():
    # Far tails: probabilities underflow float32 but logits-based log_prob stays finite.
    for link in ("logit", "probit", "cloglog"):
        f = fam.get_family("binomial", link)
        eta = tf.constant([-40.0, -150.0, 40.0, 200.0], tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(eta)
            lp = f.log_prob(tf.constant([1.0, 1.0, 0.0, 0.0]), eta)
        assert np.all(np.isfinite(lp.numpy())), link
        assert np.all(lp.numpy() < -10.0), link
        assert np.all(np.isfinite(tape.gradient(lp, eta).numpy())), link
    # cloglog: log mu ~ eta in the lower tail
    lp = fam.get_family("binomial", "cloglog").log_prob(_t([1.0, 1.0]), _t([-25.0, -500.0]))
    np.testing.assert_allclose(lp.numpy(), [-25.0, -500.0], rtol=1e-12)


def test_float32_preserved():
    f = fam.get_family("gamma")
    lp = f.log_prob(np.array([1.0, 2.0]), tf.constant([0.5, 1.0]), {"shape": 2.0})
    elp = f.expected_log_prob(np.array([1.0, 2.0]), tf.constant([0.5, 1.0]), [0.01, 0.02], {"shape": 2.0})
    assert lp.dtype == tf.float32 and elp.dtype == tf.float32


def test_missing_param_raises():
    with pytest.raises(ValueError, match="scale"):
        fam.get_family("gaussian").log_prob(_t([1.0]), _t([0.0]), {})


# ------------------------------------------------------ expected_log_prob

def _quad_reference(name, link, y, m, v, params, trials):
    out = []
    for i in range(len(m)):
        t = None if trials is None else trials[i]
        s = np.sqrt(v[i])

        def integrand(e, i=i, t=t, s=s):
            return scipy_logp(name, link, y[i], e, params, t) * stats.norm.pdf(e, m[i], s)

        val, _ = integrate.quad(integrand, m[i] - 12 * s, m[i] + 12 * s, epsabs=1e-12, epsrel=1e-12, limit=200)
        out.append(val)
    return np.array(out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expected_log_prob_vs_numerical_integral(case):
    name, link, eta, y, params, trials = case
    f = fam.get_family(name, link)
    m, y = np.array(eta), np.array(y)
    # keep nodes inside the valid region for inverse/identity links: small v
    if link in ("inverse", "identity") and (name, link) != ("gaussian", "identity"):
        # eta must stay away from 0 (mean singular / non-positive): sd = m / 15
        v = (m / 15.0) ** 2
    elif (name, link) == ("beta", "cloglog"):
        # log p ~ -e^eta for y near 1 grows double-exponentially: at sd 0.9 the
        # 32-node rule is good to 1e-6 relative only, at sd 0.55 to 1e-9.
        v = np.array([0.05, 0.3, 0.3])
    else:
        v = np.array([0.05, 0.3, 0.8])
    tr = None if trials is None else _t(trials)
    got = f.expected_log_prob(_t(y), _t(m), _t(v), _params(params), tr).numpy()
    want = _quad_reference(name, link, y, m, v, params, trials)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
    # generic quadrature agrees with any closed form
    quad = f._quadrature(_t(y), _t(m), _t(v), _params(params), tr, 32).numpy()
    np.testing.assert_allclose(quad, got, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expected_log_prob_zero_variance_and_gradients(case):
    name, link, eta, y, params, trials = case
    f = fam.get_family(name, link)
    tr = None if trials is None else _t(trials)
    m = tf.Variable(np.array(eta))
    v = tf.Variable(np.zeros(3))
    pv = {k: tf.Variable(np.float64(p)) for k, p in params.items()}
    with tf.GradientTape(persistent=True) as tape:
        elp = f.expected_log_prob(_t(y), m, v, pv, tr)
        total = tf.reduce_sum(elp)
        lp = tf.reduce_sum(f.log_prob(_t(y), m, pv, tr))
    np.testing.assert_allclose(elp.numpy(), f.log_prob(_t(y), _t(eta), _params(params), tr).numpy(), rtol=1e-12)
    grads = tape.gradient(total, [m, v, *pv.values()])
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy()))
    # at v = 0 the m-gradient is that of log_prob
    np.testing.assert_allclose(grads[0].numpy(), tape.gradient(lp, m).numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "name,link,params",
    [("gaussian", "identity", {"scale": 1.3}), ("gaussian", "log", {"scale": 1.3}),
     ("poisson", "log", {}), ("gamma", "log", {"shape": 2.2}),
     ("zero_inflated_poisson", "log", {"zi_odds": 0.5})],
)
def test_closed_form_gradient_in_variance(name, link, params):
    # d/dv E[f] = 0.5 E[f''] (Price's theorem); compare to quadrature of f''
    # via finite differences of the quadrature path.
    f = fam.get_family(name, link)
    y, m = _t([0.7, 3.0]), _t([0.2, 1.1])
    v = tf.Variable([0.1, 0.4], dtype=tf.float64)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(f.expected_log_prob(y, m, v, _params(params)))
    g = tape.gradient(total, v).numpy()
    h = 1e-5
    fd = (
        f._quadrature(y, m, v + h, _params(params), None, 32) - f._quadrature(y, m, v - h, _params(params), None, 32)
    ).numpy() / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_quadrature_num_points_and_default():
    f = fam.get_family("binomial", "probit")
    assert f.quadrature_points == 32
    args = (_t([1.0]), _t([0.3]), _t([0.5]))
    a = f.expected_log_prob(*args).numpy()
    b = f.expected_log_prob(*args, num_points=64).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-10)


# ------------------------------------------------------------- properties

LINK_RANGES = {
    "identity": (-1e3, 1e3),
    "log": (-50.0, 50.0),
    "logit": (-15.0, 15.0),
    "probit": (-5.0, 5.0),
    "cloglog": (-15.0, 2.5),
    "inverse": (0.01, 100.0),
}


@pytest.mark.parametrize("link", sorted(LINK_RANGES))
def test_link_round_trip(link):
    lo, hi = LINK_RANGES[link]
    g = fam.get_link(link)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.floats(lo, hi), min_size=1, max_size=8))
    def check(etas):
        eta = _t(etas)
        back = g(g.inverse(eta))
        assert back.dtype == tf.float64
        np.testing.assert_allclose(back.numpy(), etas, rtol=1e-6, atol=1e-9)

    check()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ALL_PAIRS))
def test_family_config_round_trip(pair):
    f = fam.get_family(*pair)
    cfg = f.get_config()
    assert cfg == {"name": pair[0], "link": pair[1]}
    assert fam.Family.from_config(cfg) == f
    assert fam.get_family(cfg["name"], cfg["link"]) == f
    assert fam.get_family(f) is f


@pytest.mark.parametrize("name", ["ordinal", "cumulative_logit", "cumulative_probit", "clmm"])
def test_ordinal_config_round_trip(name):
    f = fam.get_family(name)
    assert f.dispersion_params == () and f.num_categories == 0
    with pytest.raises(ValueError, match="does not know its categories yet"):
        f.threshold_names()
    g = fam.Ordinal(f.link, levels=["low", "mid", "high"])
    cfg = g.get_config()
    assert cfg == {"name": "ordinal", "link": "probit" if name.endswith("probit") else "logit",
                   "levels": ["low", "mid", "high"]}
    assert fam.Ordinal.from_config(cfg) == g and g != f
    assert g.dispersion_params == ("gap_2",) and g.threshold_names() == ["low|mid", "mid|high"]
    assert fam.get_family(g, "probit").levels == ["low", "mid", "high"]


def test_canonical_links_and_aliases():
    want = {"gaussian": "identity", "binomial": "logit", "poisson": "log",
            "negative_binomial": "log", "gamma": "inverse"}
    for name, link in want.items():
        assert fam.get_family(name).link.name == link
    assert isinstance(fam.get_family("Normal"), fam.Gaussian)
    assert isinstance(fam.get_family("negbin"), fam.NegativeBinomial)
    assert isinstance(fam.get_family("nb"), fam.NegativeBinomial)
    assert fam.get_family("gaussian").dispersion_params == ("scale",)
    assert fam.get_family("poisson").dispersion_params == ()


def test_register_user_family():
    @fam.register_family
    class MyPoisson(fam.Poisson):
        name = "my_poisson_test"

    try:
        f = fam.get_family("my_poisson_test", "identity")
        assert isinstance(f, MyPoisson) and fam.Family.from_config(f.get_config()) == f
    finally:
        fam.base._FAMILIES.pop("my_poisson_test")


# ------------------------------------------------------------- validation


def test_invalid_link_message():
    with pytest.raises(ValueError, match=r"probit.*poisson.*log, identity"):
        fam.get_family("poisson", "probit")
    with pytest.raises(ValueError, match="valid links"):
        fam.Gamma(link="logit")


def test_unknown_family_and_link_message():
    with pytest.raises(ValueError, match=r"tweedie.*gaussian.*negative_binomial"):
        fam.get_family("tweedie")
    with pytest.raises(ValueError, match=r"sqrt.*cloglog.*probit"):
        fam.get_link("sqrt")


@pytest.mark.parametrize(
    "name,y,trials,row",
    [
        ("gaussian", [1.0, np.nan, 2.0], None, 1),
        ("poisson", [1.0, 2.0, np.inf], None, 2),
        ("poisson", [1.0, -1.0, 2.0], None, 1),
        ("negative_binomial", [0.0, 1.5, 2.0], None, 1),
        ("binomial", [1.0, 0.0, 2.0], None, 2),
        ("binomial", [0.5, 0.0, 1.0], None, 0),
        ("binomial", [1.0, 6.0, 2.0], [3.0, 5.0, 4.0], 1),
        ("binomial", [1.0, -1.0, 2.0], [3.0, 5.0, 4.0], 1),
        ("gamma", [1.0, 2.0, 0.0], None, 2),
        ("gamma", [-1.0, 2.0, 1.0], None, 0),
        ("beta", [0.5, 0.0, 0.3], None, 1),
        ("beta", [0.5, 0.2, 1.0], None, 2),
        ("beta", [1.2, 0.2, 0.3], None, 0),
        ("zero_inflated_poisson", [0.0, 2.0, -1.0], None, 2),
        ("zip", [0.0, 2.5, 1.0], None, 1),
        ("zero_inflated_negative_binomial", [0.0, 0.5, 1.0], None, 1),
        ("zinb", [np.nan, 0.0, 1.0], None, 0),
    ],
)
def test_check_response_rejects(name, y, trials, row):
    with pytest.raises(ValueError, match=rf"incidence: row {row} "):
        fam.get_family(name).check_response(np.array(y), trials=trials, name="incidence")


def test_check_response_bad_trials():
    with pytest.raises(ValueError, match=r"trials for k: row 1"):
        fam.get_family("binomial").check_response([1, 1], trials=[2, 0], name="k")
    with pytest.raises(ValueError, match=r"trials for k: row 0"):
        fam.get_family("binomial").check_response([1, 1], trials=[2.5, 3], name="k")


@pytest.mark.parametrize(
    "name,y,trials",
    [
        ("gaussian", [-1.2, 0.0, 3.4], None),
        ("binomial", [0, 1, 1, 0], None),
        ("binomial", [0, 3, 5], [4, 5, 5]),
        ("poisson", [0, 3, 17], None),
        ("negative_binomial", np.array([0, 3, 17], dtype=np.int64), None),
        ("gamma", [0.1, 2.0, 30.0], None),
        ("beta", [1e-6, 0.5, 1.0 - 1e-6], None),
        ("zip", [0, 0, 3, 17], None),
        ("zinb", np.array([0, 0, 3, 17], dtype=np.int64), None),
    ],
)
def test_check_response_accepts(name, y, trials):
    assert fam.get_family(name).check_response(y, trials=trials) is None


def test_default_params():
    rng = np.random.default_rng(0)
    assert fam.get_family("poisson").default_params([1, 2]) == {}
    y = rng.normal(3.0, 2.0, 20000)
    assert abs(fam.get_family("gaussian").default_params(y)["scale"] - 2.0) < 0.05
    theta, mu = 2.0, 5.0
    y = rng.negative_binomial(theta, theta / (theta + mu), 20000)
    assert abs(fam.get_family("nb").default_params(y)["dispersion"] - theta) < 0.2
    assert fam.get_family("nb").default_params(rng.poisson(3.0, 100) * 0 + 3)["dispersion"] == 1e3
    y = rng.gamma(3.0, 2.0 / 3.0, 20000)
    assert abs(fam.get_family("gamma").default_params(y)["shape"] - 3.0) < 0.15


# ------------------------------------------- beta, zero-inflated, gamma near 0


def test_new_families_by_name_and_alias():
    assert isinstance(fam.get_family("beta"), fam.Beta)
    assert isinstance(fam.get_family("zero_inflated_poisson"), fam.ZeroInflatedPoisson)
    assert isinstance(fam.get_family("ZIP"), fam.ZeroInflatedPoisson)
    assert isinstance(fam.get_family("zero_inflated_negative_binomial"), fam.ZeroInflatedNegativeBinomial)
    assert isinstance(fam.get_family("zinb"), fam.ZeroInflatedNegativeBinomial)
    assert fam.get_family("beta").link.name == "logit"
    assert fam.get_family("zip").link.name == "log" and fam.get_family("zinb").link.name == "log"
    assert fam.get_family("beta").dispersion_params == ("precision",)
    assert fam.get_family("zip").dispersion_params == ("zi_odds",)
    assert fam.get_family("zinb").dispersion_params == ("dispersion", "zi_odds")
    with pytest.raises(ValueError, match="valid links"):
        fam.get_family("zip", "identity")


def test_beta_moments_and_tails():
    f = fam.get_family("beta")
    mu, phi = np.array([0.2, 0.5, 0.9]), 12.0
    d = f.distribution(_t(special.logit(mu)), {"precision": _t(phi)})
    np.testing.assert_allclose(d.mean().numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(d.variance().numpy(), mu * (1 - mu) / (1 + phi), rtol=1e-12)
    for link in ("logit", "probit", "cloglog"):
        f = fam.get_family("beta", link)
        eta = tf.Variable([-40.0, -8.0, 8.0, 40.0], dtype=tf.float64)
        with tf.GradientTape() as tape:
            lp = f.log_prob(_t([0.3, 0.3, 0.7, 0.7]), eta, {"precision": _t(5.0)})
        assert np.all(np.isfinite(lp.numpy())) and np.all(lp.numpy() < 0), link
        assert np.all(np.isfinite(tape.gradient(lp, eta).numpy())), link


@pytest.mark.parametrize("name", ["zero_inflated_poisson", "zero_inflated_negative_binomial"])
def test_zero_inflated_moments_and_response_mean(name):
    f = fam.get_family(name)
    odds, theta = 0.6, 2.0
    pi = odds / (1 + odds)
    params = {"zi_odds": _t(odds), "dispersion": _t(theta)} if "negative" in name else {"zi_odds": _t(odds)}
    eta = np.log([0.5, 3.0, 20.0])
    mu = np.exp(eta)
    d = f.distribution(_t(eta), params)
    np.testing.assert_allclose(d.mean().numpy(), (1 - pi) * mu, rtol=1e-12)
    extra = pi + (1 / theta if "negative" in name else 0.0)
    np.testing.assert_allclose(d.variance().numpy(), (1 - pi) * mu * (1 + mu * extra), rtol=1e-10)
    np.testing.assert_allclose(f.response_mean(_t(eta), {"zi_odds": odds}).numpy(), (1 - pi) * mu, rtol=1e-12)
    np.testing.assert_allclose(f.mean(_t(eta)).numpy(), mu, rtol=1e-12)  # the count component's
    y = _t([0.0, 2.0, 15.0])
    np.testing.assert_allclose(f.log_prob(y, _t(eta), params).numpy(), d.log_prob(y).numpy(), rtol=1e-10)


def test_zero_inflated_limits_and_stability():
    # zi_odds -> 0 is the count family; log(zi_odds) is glmmTMB's zi intercept (logit of pi).
    eta, y = _t([-1.0, 0.5, 2.0]), _t([0.0, 1.0, 6.0])
    zip_, zinb = fam.get_family("zip"), fam.get_family("zinb")
    np.testing.assert_allclose(zip_.log_prob(y, eta, {"zi_odds": 1e-14}).numpy(),
                               fam.get_family("poisson").log_prob(y, eta).numpy(), rtol=1e-12)
    np.testing.assert_allclose(zinb.log_prob(y, eta, {"zi_odds": _t(1e-14), "dispersion": _t(1.5)}).numpy(),
                               fam.get_family("nb").log_prob(y, eta, {"dispersion": _t(1.5)}).numpy(), rtol=1e-10)
    zi = 0.7  # glmmTMB's zi intercept: p(0) -> pi = plogis(zi) when mu is huge
    np.testing.assert_allclose(zip_.log_prob(_t([0.0]), _t([40.0]), {"zi_odds": _t(np.exp(zi))}).numpy(),
                               [special.log_expit(zi)], rtol=1e-12)
    for f, params in ((zip_, {}), (zinb, {"dispersion": 0.8})):
        for dtype in (tf.float32, tf.float64):
            for odds in (1e-12, 1.0, 1e12):
                eta = tf.Variable([-60.0, -5.0, 0.0, 5.0, 60.0], dtype=dtype)
                p = {k: tf.constant(v, dtype) for k, v in dict(params, zi_odds=odds).items()}
                with tf.GradientTape() as tape:
                    lp = f.log_prob(tf.constant([0.0, 0.0, 3.0, 0.0, 0.0], dtype), eta, p)
                assert lp.dtype == dtype
                assert np.all(np.isfinite(lp.numpy())) and np.all(lp.numpy() <= 0), (f.name, dtype, odds)
                assert np.all(np.isfinite(tape.gradient(lp, eta).numpy())), (f.name, dtype, odds)


def test_gamma_inverse_link_at_and_below_zero():
    # 1 / eta is infinite at eta = 0: the family works with rate = shape * eta and
    # clamps eta at sqrt(tiny), so values and gradients stay finite and continuous.
    f = fam.get_family("gamma")
    floor = np.sqrt(np.finfo(np.float64).tiny)
    eta = tf.Variable([0.5, 1e-3, floor * 2, 0.0, -0.5], dtype=tf.float64)
    with tf.GradientTape() as tape:
        lp = f.log_prob(_t([1.0] * 5), eta, {"shape": _t(3.0)})
    grad = tape.gradient(lp, eta).numpy()
    lp = lp.numpy()
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(lp[:2], stats.gamma.logpdf(1.0, a=3.0, scale=1.0 / (3.0 * np.array([0.5, 1e-3]))))
    np.testing.assert_allclose(lp[3:], f.log_prob(_t([1.0]), _t([floor]), {"shape": _t(3.0)}).numpy()[0])
    np.testing.assert_allclose(lp[2], lp[3] + 3.0 * np.log(2.0), rtol=1e-12)  # continuous at the floor
    assert grad[0] > 0 and grad[1] > 0 and grad[3] == 0 and grad[4] == 0
    # Quadrature nodes on both sides of 0: finite value and derivatives, and the
    # engine's derivative function too.
    m, v = np.array([0.01, 0.3]), np.array([1e-4, 0.04])
    value, d1, d2, dv, pg = f.expected_log_prob_derivatives(np.array([80.0, 2.0]), m, v, {"shape": 4.0})
    for a in (value, d1, d2, dv, np.array(list(pg.values()))):
        assert np.all(np.isfinite(a))
    assert d1[0] > 0  # pushes the mean back into the domain


def test_gamma_log_link_default_shape_and_elp():
    rng = np.random.default_rng(1)
    shape = 25.0  # coefficient of variation 0.2
    y = rng.gamma(shape, 40.0 / shape, 20000)
    assert abs(fam.get_family("gamma", "log").default_params(y)["shape"] - shape) < 1.0
    # closed form at realistic scales (y ~ 40, eta ~ log 40) against quadrature
    f = fam.get_family("gamma", "log")
    args = (_t([31.0, 45.0, 52.0]), _t(np.log([38.0, 41.0, 45.0])), _t([1e-4, 0.01, 0.2]), {"shape": _t(shape)})
    np.testing.assert_allclose(f.expected_log_prob(*args).numpy(), f._quadrature(*args, None, 32).numpy(),
                               rtol=1e-10)


def test_default_params_new_families():
    rng = np.random.default_rng(2)
    mu, phi = 0.3, 12.0
    y = rng.beta(mu * phi, (1 - mu) * phi, 20000)
    assert abs(fam.get_family("beta").default_params(y)["precision"] - phi) < 0.5
    pi, lam = 0.3, 4.0
    y = np.where(rng.random(50000) < pi, 0, rng.poisson(lam, 50000))
    assert abs(fam.get_family("zip").default_params(y)["zi_odds"] - pi / (1 - pi)) < 0.03
    theta, lam = 2.0, 5.0
    y = np.where(rng.random(50000) < pi, 0, rng.negative_binomial(theta, theta / (theta + lam), 50000))
    got = fam.get_family("zinb").default_params(y)
    assert abs(got["zi_odds"] - pi / (1 - pi)) < 0.1 and abs(got["dispersion"] - theta) < 0.3
    # no excess zeros: pi starts at its floor, 0.01
    y = rng.poisson(3.0, 5000)
    np.testing.assert_allclose(fam.get_family("zip").default_params(y)["zi_odds"], 0.01 / 0.99)
    assert fam.get_family("zip").default_params(np.zeros(10))["zi_odds"] > 0
    assert set(fam.get_family("zinb").default_params(np.zeros(10))) == {"dispersion", "zi_odds"}


NEW_KERNEL_CASES = [
    ("beta", "logit", {"precision": 6.0}), ("beta", "probit", {"precision": 2.5}),
    ("beta", "cloglog", {"precision": 15.0}), ("zero_inflated_poisson", "log", {"zi_odds": 0.7}),
    ("zero_inflated_poisson", "log", {"zi_odds": 1e-7}),
    ("zero_inflated_negative_binomial", "log", {"dispersion": 1.8, "zi_odds": 0.4}),
    ("zero_inflated_negative_binomial", "log", {"dispersion": 0.3, "zi_odds": 3.0}),
]


@pytest.mark.parametrize("name,link,params", NEW_KERNEL_CASES)
def test_new_families_analytic_derivatives_are_autodiff(name, link, params):
    # The engine's analytic numpy derivatives (d/dm, d2/dm2, d/dv, d/dparams) equal
    # autodiff of the TF expected_log_prob, quadrature and zero-variance paths; the
    # value is the one log-likelihood evaluated over numpy and over TensorFlow.
    f = fam.get_family(name, link)
    assert f._has_numpy_kernel()
    rng = np.random.default_rng(0)
    n = 120
    if name == "beta":
        y = rng.uniform(0.01, 0.99, n)
        eta = rng.normal(0, 1.5, n)
        if link == "cloglog":
            eta[-3:] = [4.0, 6.5, 400.0]  # near and past the floor of 1 - mu, past the cap
    else:
        y = np.where(rng.random(n) < 0.4, 0.0, rng.poisson(3, n)).astype(float)
        eta = rng.normal(0.5, 1.5, n)
    v = rng.uniform(0, 1, n)
    v[:5] = 0.0
    for num_points in (f.quadrature_points, 0):
        got = f.expected_log_prob_derivatives(y, eta, v, params, num_points=num_points)
        # autodiff, eagerly (as the traced `_derivatives_function` does)
        m, vv = tf.Variable(eta), tf.Variable(v)
        pv = {k: tf.Variable(np.float64(p)) for k, p in params.items()}
        with tf.GradientTape() as outer:
            with tf.GradientTape(persistent=True) as inner:
                value = f.expected_log_prob(_t(y), m, vv if num_points else tf.zeros_like(vv), pv,
                                            num_points=num_points or None)
                total = tf.reduce_sum(value)
            first = inner.gradient(total, m)
            first_sum = tf.reduce_sum(first)
        second = outer.gradient(first_sum, m)
        np.testing.assert_allclose(got[0], value.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[1], first.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[2], second.numpy(), rtol=1e-9, atol=1e-9)
        if num_points:
            d_var = inner.gradient(total, vv).numpy()
            np.testing.assert_allclose(got[3][5:], d_var[5:], rtol=1e-9, atol=1e-9)
        for k, p in pv.items():
            assert got[4][k] == pytest.approx(float(inner.gradient(total, p)), rel=1e-9, abs=1e-9), k


@pytest.mark.parametrize("name,params", [("zero_inflated_poisson", {}),
                                         ("zero_inflated_negative_binomial", {"dispersion": 1.8})])
def test_zero_inflation_per_row_is_the_tensorflow_maths(name, params):
    # glmmTMB's ziformula with covariates: one zi_odds per row. The numpy kernels take the
    # array and return each row's weighted gradient, which equals autodiff of the TF
    # expected_log_prob in each row's odds, and the value is the scalar path's row by row.
    f = fam.get_family(name)
    rng = np.random.default_rng(1)
    n = 60
    y = np.where(rng.random(n) < 0.4, 0.0, rng.poisson(3, n)).astype(float)
    eta, v = rng.normal(0.5, 1.0, n), rng.uniform(0, 1, n)
    v[:4] = 0.0
    odds = np.exp(rng.normal(-0.5, 1.5, n))
    w = rng.uniform(0.5, 2.0, n)
    for num_points in (f.quadrature_points, 0):
        got = f.expected_log_prob_derivatives(y, eta, v, dict(params, zi_odds=odds), num_points=num_points,
                                              weights=w)
        assert got[4]["zi_odds"].shape == (n,)
        for i in (0, 7, 31):
            one = f.expected_log_prob_derivatives(y[i:i + 1], eta[i:i + 1], v[i:i + 1],
                                                  dict(params, zi_odds=odds[i]), num_points=num_points)
            assert got[0][i] == pytest.approx(one[0][0], rel=1e-12)
            assert got[4]["zi_odds"][i] == pytest.approx(w[i] * one[4]["zi_odds"], rel=1e-12)
        pv = tf.Variable(odds)
        with tf.GradientTape() as tape:
            value = f.expected_log_prob(_t(y), _t(eta), _t(v) if num_points else tf.zeros(n, tf.float64),
                                        {**{k: _t(p) for k, p in params.items()}, "zi_odds": pv},
                                        num_points=num_points or None)
            total = tf.reduce_sum(_t(w) * value)
        np.testing.assert_allclose(got[0], value.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[4]["zi_odds"], tape.gradient(total, pv).numpy(), rtol=1e-9, atol=1e-12)
    # The response mean (1 - pi_i) mu_i, row by row.
    np.testing.assert_allclose(f.response_mean(_t(eta), {"zi_odds": _t(odds)}).numpy(),
                               np.exp(eta) / (1.0 + odds), rtol=1e-12)
    with pytest.raises(ValueError, match="one value per row"):
        f.expected_log_prob_derivatives(y, eta, v, dict(params, zi_odds=odds[:5]))
