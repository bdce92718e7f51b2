"""Zero-inflated count families: a structural zero with probability ``pi``, else a count."""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm.families.array_ops import NUMPY, TENSORFLOW, float_tensor
from keras_glmm.families.base import Family, as_1d, check_counts, register_family
from keras_glmm.families.counts import nb2_derivatives, nb2_log_prob

tfd = tfp.distributions


class _ZeroInflated(Family):
    """A count family with a zero-inflation probability ``pi``::

        p(0) = pi + (1 - pi) f(0 | mu),    p(y) = (1 - pi) f(y | mu)  (y > 0)

    with ``f`` the count component (``_count_log_prob``) and ``log(mu) = eta``.
    Dispersion parameters must be positive, so ``pi`` is parameterized by its odds
    ``zi_odds = pi / (1 - pi)``: ``log(zi_odds)`` is glmmTMB's zero-inflation
    intercept (``ziformula = ~1``, logit scale) and ``pi = zi_odds / (1 + zi_odds)``.
    Log-probabilities use ``log pi = -softplus(-log zi_odds)``, ``log(1 - pi) =
    -softplus(log zi_odds)`` and a log-sum-exp for zeros, so neither ``pi`` near 0
    or 1 nor ``f(0)`` near 0 loses precision.

    With covariates (glmmTMB's ``ziformula = ~ x``), ``zi_odds`` is one value per
    row, ``log(zi_odds_i) = x_zi,i' gamma``: every method here takes it broadcast
    against ``eta``, and the engine's numpy kernels return its gradient per row.

    ``mean(eta)`` is the count component's mean ``mu`` (what the link models):
    it cannot see ``zi_odds``. The response mean ``(1 - pi) mu`` is
    :meth:`response_mean`.
    """

    canonical_link = "log"
    valid_links = ("log",)

    @staticmethod
    def _log_pi(ops, params):
        """``(log pi, log(1 - pi))`` from ``zi_odds``."""
        log_odds = ops.log(params["zi_odds"])
        return -ops.softplus(-log_odds), -ops.softplus(log_odds)

    def _count_distribution(self, eta, params):
        raise NotImplementedError

    def _count_log_prob(self, ops, y, eta, params):
        """The count component's ``log f(y | e^eta)`` over ``ops`` (at ``y = 0``, ``log f(0)``)."""
        raise NotImplementedError

    def _count_derivatives(self, y, eta, params):
        """``(d/deta, d2/deta2, {param: d/dparam})`` of ``_count_log_prob`` (numpy)."""
        raise NotImplementedError

    @staticmethod
    def _mixture(ops, y, eta, count, log_pi, log_rest):
        """``log p(y)`` from the count component's ``log f(y)``."""
        zero = ops.logaddexp(log_pi + ops.zeros_like(eta), log_rest + count)
        # Both branches are finite everywhere, so tf.where passes clean gradients.
        return ops.where(y > 0, log_rest + count, zero)

    def _distribution(self, eta, params, trials):
        odds = params["zi_odds"]
        pi = odds / (1.0 + odds) * tf.ones_like(eta)
        return tfd.Inflated(self._count_distribution(eta, params), inflated_loc_probs=pi)

    def _log_likelihood(self, ops, y, eta, params, trials):
        log_pi, log_rest = self._log_pi(ops, params)
        return self._mixture(ops, y, eta, self._count_log_prob(ops, y, eta, params), log_pi, log_rest)

    def _derivatives(self, y, eta, params, trials, value):
        odds = params["zi_odds"]  # a number, or one per row (broadcast against `eta`)
        log_pi, log_rest = self._log_pi(NUMPY, params)
        pi = np.exp(log_pi)
        count = self._count_log_prob(NUMPY, y, eta, params)  # at y = 0: log f(0)
        d1, d2, dp = self._count_derivatives(y, eta, params)
        s = np.exp(log_rest + count - value)    # P(count component | y = 0)
        not_s = np.exp(log_pi - value)          # P(structural zero | y = 0) = 1 - s
        is_zero = y == 0
        out_d1 = np.where(is_zero, s * d1, d1)
        out_d2 = np.where(is_zero, s * d2 + s * not_s * d1**2, d2)
        grads = {k: np.where(is_zero, s * g, g) for k, g in dp.items()}
        # d/d log(odds): log pi' = 1 - pi, log(1 - pi)' = -pi.
        grads["zi_odds"] = np.where(is_zero, not_s * (1.0 - pi) - s * pi, -pi) / odds
        return out_d1, out_d2, grads

    def response_mean(self, eta, params):
        """Response mean ``(1 - pi) * mu`` (``mean(eta)`` is ``mu``).

        Args:
          eta: linear predictor.
          params: dict with ``zi_odds`` (and the count component's params).
        """
        eta = float_tensor(eta)
        odds = tf.cast(tf.convert_to_tensor(params["zi_odds"], dtype_hint=eta.dtype), eta.dtype)
        return self.link.inverse(eta) / (1.0 + odds)

    def _check_response(self, y, trials, name):
        check_counts(y, name)

    @staticmethod
    def _zero_inflated_poisson_moments(y):
        """``(pi, mu)`` of the ZIP with the data's mean and fraction of zeros.

        ``1 - p0 = (1 - pi)(1 - e^-mu)`` and ``mean = (1 - pi) mu`` give
        ``(1 - e^-mu) / mu = (1 - p0) / mean``, decreasing in ``mu``: bisection.
        ``pi`` is 0 when there are no more zeros than a Poisson's.
        """
        m, p0 = y.mean(), np.mean(y == 0)
        if m <= 0 or p0 <= math.exp(-m):
            return 0.0, max(m, 1e-3)
        target = (1.0 - p0) / m
        lo, hi = m, m / max(1.0 - p0, 1e-12) + 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if -math.expm1(-mid) / mid > target:
                lo = mid
            else:
                hi = mid
        mu = 0.5 * (lo + hi)
        return 1.0 - m / mu, mu


@register_family
class ZeroInflatedPoisson(_ZeroInflated):
    """Zero-inflated Poisson: ``f = Poisson(mu)``, constant zero-inflation ``pi``.

    glmmTMB's ``family = poisson, ziformula = ~1``. See :class:`_ZeroInflated`
    for ``zi_odds``. For ``y > 0`` the expected log-likelihood is closed form
    (``log(1 - pi) + y m - e^{m + v/2} - log y!``); zeros use quadrature.
    """

    name = "zero_inflated_poisson"
    aliases = ("zip",)
    dispersion_params = ("zi_odds",)

    def _count_distribution(self, eta, params):
        return tfd.Poisson(log_rate=eta)

    def _count_log_prob(self, ops, y, eta, params):
        return y * eta - ops.exp(eta) - ops.lgamma(y + 1.0)

    def _count_derivatives(self, y, eta, params):
        mu = np.exp(eta)
        return y - mu, -mu, {}

    def _positive_counts_expected(self, ops, y, m, v, params):
        """``E_q[log p(y)]`` for ``y > 0``: ``log(1 - pi) + y m - e^{m + v/2} - log y!``."""
        _, log_rest = self._log_pi(ops, params)
        return log_rest + y * m - ops.exp(m + 0.5 * v) - ops.lgamma(y + 1.0)

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        quadrature = self._quadrature(y, m, v, params, trials, num_points)
        return tf.where(y > 0, self._positive_counts_expected(TENSORFLOW, y, m, v, params), quadrature)

    def _numpy_quadrature(self, y, m, v, params, trials, num_points):
        value, first, second, d_var, grads = super()._numpy_quadrature(y, m, v, params, trials, num_points)
        if num_points:  # the closed form of `_expected_log_prob` for y > 0
            e = np.exp(m + 0.5 * v)
            positive = y > 0
            value = np.where(positive, self._positive_counts_expected(NUMPY, y, m, v, params), value)
            first = np.where(positive, y - e, first)
            second = np.where(positive, -e, second)
            d_var = np.where(positive, -0.5 * e, d_var)
            grads = {"zi_odds": np.where(positive, -1.0 / (1.0 + params["zi_odds"]), grads["zi_odds"])}
        return value, first, second, d_var, grads

    def default_params(self, y, trials=None):
        # Marginal moments (mean and fraction of zeros): covariates that explain
        # zeros make this pi too large, which the fit then lowers.
        pi, _ = self._zero_inflated_poisson_moments(as_1d(y))
        pi = float(np.clip(pi, 0.01, 0.9))
        return {"zi_odds": pi / (1.0 - pi)}


@register_family
class ZeroInflatedNegativeBinomial(_ZeroInflated):
    """Zero-inflated NB2: ``f`` as :class:`NegativeBinomial` (``dispersion`` = theta).

    glmmTMB's ``family = nbinom2, ziformula = ~1`` (its ``sigma(fit)`` is theta).
    See :class:`_ZeroInflated` for ``zi_odds``, and ``counts.nb2_log_prob`` for
    the count component.
    """

    name = "zero_inflated_negative_binomial"
    aliases = ("zinb",)
    dispersion_params = ("dispersion", "zi_odds")

    def _count_distribution(self, eta, params):
        theta = params["dispersion"]
        return tfd.NegativeBinomial(
            total_count=theta, logits=eta - tf.math.log(theta), require_integer_total_count=False)

    def _count_log_prob(self, ops, y, eta, params):
        return nb2_log_prob(ops, y, eta, params["dispersion"])

    def _count_derivatives(self, y, eta, params):
        d1, d2, d_theta = nb2_derivatives(y, eta, params["dispersion"])
        return d1, d2, {"dispersion": d_theta}

    def default_params(self, y, trials=None):
        # Marginal mean m, variance s2 and zero fraction p0 against the ZINB's
        # m = (1 - pi) mu, s2 = m (1 + mu (pi + 1/theta)),
        # p0 = pi + (1 - pi) (1 + mu / theta)^-theta: on a grid of mu, pi and
        # 1/theta follow from the first two; keep the mu that matches p0.
        y = as_1d(y)
        m, s2, p0 = y.mean(), y.var(), np.mean(y == 0)
        pi, theta = 0.01, 1e3
        if m > 0:
            mu = m * np.geomspace(1.0 + 1e-6, 1e3, 2000)
            pis = 1.0 - m / mu
            inv_theta = (s2 / m - 1.0) / mu - pis
            valid = inv_theta > 0
            if valid.any():
                mu, pis, inv_theta = mu[valid], pis[valid], inv_theta[valid]
                zeros = pis + (1.0 - pis) * np.exp(-np.log1p(mu * inv_theta) / inv_theta)
                best = int(np.argmin(np.abs(zeros - p0)))
                pi, theta = pis[best], 1.0 / inv_theta[best]
        pi = float(np.clip(pi, 0.01, 0.9))
        return {"dispersion": float(np.clip(theta, 0.1, 1e3)), "zi_odds": pi / (1.0 - pi)}
