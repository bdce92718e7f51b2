"""The gamma family: positive responses with a constant coefficient of variation."""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import special

from keras_glmm.families.array_ops import TENSORFLOW
from keras_glmm.families.base import Family, as_1d, first_bad, floored_mean, register_family


@register_family
class Gamma(Family):
    """Gamma response with mean ``mu`` and variance ``mu^2 / shape``::

        log p(y) = a log a - a log mu + (a - 1) log y - a y / mu - lgamma(a),   a = shape

    ``Gamma(concentration=shape, rate=shape / mu)``; the coefficient of
    variation is ``1 / sqrt(shape)`` (glmmTMB's ``sigma``). Under the identity
    link the mean, under the inverse link (lme4's default) ``eta = 1 / mu``
    itself, is clamped to a tiny positive floor (``ArrayOps.positive``), so
    ``eta`` outside the valid region gives a finite log-density with zero
    gradient rather than NaN: start a fit inside it (e.g. at the GLM fit; at
    ``eta = 0`` every row is on the floor and nothing moves). Under the log link
    ``E_q[log p]`` is closed form (``E[e^{-eta}] = e^{-m + v/2}``).
    """

    name = "gamma"
    canonical_link = "inverse"
    valid_links = ("inverse", "log", "identity")
    dispersion_params = ("shape",)

    def _log_mean_and_reciprocal(self, ops, eta):
        """``(log mu, 1 / mu)``, the mean floored where the link does not keep it positive."""
        if self.link.name == "log":
            return eta, ops.exp(-eta)
        if self.link.name == "inverse":
            # 1 / mu = eta itself, floored, without the reciprocal: 1 / eta is
            # infinite at eta = 0 (a NaN gradient) and jumps from +inf to -inf
            # there. The log-density stays finite and continuous below the floor
            # (about shape * log(shape * 1.5e-154) in float64) with zero gradient:
            # quadrature nodes that fall there cost a large but finite penalty.
            rate = ops.positive(eta)
            return -ops.log(rate), rate
        mu = ops.positive(self.link._inverse(ops, eta))
        return ops.log(mu), 1.0 / mu

    def _distribution(self, eta, params, trials):
        shape = params["shape"]
        log_mu, _ = self._log_mean_and_reciprocal(TENSORFLOW, eta)
        return tfp.distributions.Gamma(concentration=shape, log_rate=tf.math.log(shape) - log_mu)

    def _log_likelihood(self, ops, y, eta, params, trials):
        a = params["shape"]
        log_mu, inv_mu = self._log_mean_and_reciprocal(ops, eta)
        return a * ops.log(a) - a * log_mu + (a - 1.0) * ops.log(y) - a * y * inv_mu - ops.lgamma(a)

    def _expected_closed_form(self, ops, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        a = params["shape"]
        return a * ops.log(a) - a * m + (a - 1.0) * ops.log(y) - a * y * ops.exp(-m + 0.5 * v) - ops.lgamma(a)

    def _derivatives(self, y, eta, params, trials, value):
        a = params["shape"]
        if self.link.name == "log":
            inv_mu = np.exp(-eta)
            log_mu, d_log, d2_log = eta, np.ones_like(eta), np.zeros_like(eta)
            d_inv, d2_inv = -inv_mu, inv_mu
        elif self.link.name == "inverse":
            rate, inside = floored_mean(eta)
            inv_mu, log_mu = rate, -np.log(rate)
            d_log, d2_log = np.where(inside, -1.0 / rate, 0.0), np.where(inside, 1.0 / rate**2, 0.0)
            d_inv, d2_inv = np.where(inside, 1.0, 0.0), np.zeros_like(eta)
        else:
            mu, d_mu, d2_mu = self.link.inverse_derivatives(eta)
            mu, inside = floored_mean(mu)
            inv_mu, log_mu = 1.0 / mu, np.log(mu)
            d_log = np.where(inside, d_mu / mu, 0.0)
            d2_log = np.where(inside, d2_mu / mu - (d_mu / mu) ** 2, 0.0)
            d_inv = np.where(inside, -d_mu / mu**2, 0.0)
            d2_inv = np.where(inside, 2.0 * d_mu**2 / mu**3 - d2_mu / mu**2, 0.0)
        d_a = math.log(a) + 1.0 - log_mu + np.log(y) - y * inv_mu - special.digamma(a)
        return -a * d_log - a * y * d_inv, -a * d2_log - a * y * d2_inv, {"shape": d_a}

    def _expected_derivatives(self, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        a = params["shape"]
        e = y * np.exp(-m + 0.5 * v)
        d_a = math.log(a) + 1.0 - m + np.log(y) - e - special.digamma(a)
        return -a + a * e, -a * e, -0.5 * a * e, {"shape": d_a}

    def _check_response(self, y, trials, name):
        first_bad(name, y, y <= 0, "is not strictly positive (gamma response)")

    def default_params(self, y, trials=None):
        y = as_1d(y)
        var = y.var()
        shape = y.mean() ** 2 / var if var > 0 else np.inf
        return {"shape": float(np.clip(shape, 0.1, 1e3))}
