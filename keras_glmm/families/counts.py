"""Count families: Poisson, and the negative binomials NB2 (mean-squared variance) and NB1 (linear)."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import special

from keras_glmm.families.array_ops import NUMPY, TENSORFLOW
from keras_glmm.families.base import Family, as_1d, check_counts, floored_mean, register_family

tfd = tfp.distributions


@register_family
class Poisson(Family):
    """Poisson response: ``y ~ Poisson(mu)``, ``log p(y) = y log(mu) - mu - log y!``.

    Under the log link ``E_q[log p] = y m - e^{m + v/2} - log y!`` (closed form);
    under the identity link the mean is floored (``ArrayOps.positive``).
    """

    name = "poisson"
    canonical_link = "log"
    valid_links = ("log", "identity")

    def _distribution(self, eta, params, trials):
        if self.link.name == "log":
            return tfd.Poisson(log_rate=eta)
        return tfd.Poisson(rate=TENSORFLOW.positive(self.link.inverse(eta)))

    def _log_likelihood(self, ops, y, eta, params, trials):
        if self.link.name == "log":
            return y * eta - ops.exp(eta) - ops.lgamma(y + 1.0)
        mu = ops.positive(self.link._inverse(ops, eta))
        return y * ops.log(mu) - mu - ops.lgamma(y + 1.0)

    def _expected_closed_form(self, ops, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        return y * m - ops.exp(m + 0.5 * v) - ops.lgamma(y + 1.0)

    def _derivatives(self, y, eta, params, trials, value):
        if self.link.name == "log":
            mu = np.exp(eta)
            return y - mu, -mu, {}
        mu, inside = floored_mean(eta)  # identity link
        return np.where(inside, y / mu - 1.0, 0.0), np.where(inside, -y / mu**2, 0.0), {}

    def _expected_derivatives(self, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        e = np.exp(m + 0.5 * v)
        return y - e, -e, -0.5 * e, {}

    def _check_response(self, y, trials, name):
        check_counts(y, name)


def nb2_log_prob(ops, y, eta, theta):
    """NB2 ``log p(y)`` with mean ``e^eta`` and size ``theta``, over ``ops``::

        lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
            + theta log(theta / (theta + mu)) + y log(mu / (theta + mu))

    with ``log(theta / (theta + mu)) = -softplus(eta - log theta)`` and
    ``log(mu / (theta + mu)) = -softplus(log theta - eta)``, stable for any ``mu / theta``.
    """
    log_theta = ops.log(theta)
    return (ops.lgamma(y + theta) - ops.lgamma(theta) - ops.lgamma(y + 1.0)
            - theta * ops.softplus(eta - log_theta) - y * ops.softplus(log_theta - eta))


def nb2_derivatives(y, eta, theta):
    """``(d/deta, d2/deta2, d/dtheta)`` of :func:`nb2_log_prob` (numpy)."""
    x = eta - np.log(theta)
    share = special.expit(x)  # mu / (theta + mu)
    d_theta = (special.digamma(y + theta) - special.digamma(theta) - NUMPY.softplus(x)
               + share - y * (1.0 - share) / theta)
    return y - (y + theta) * share, -(y + theta) * share * (1.0 - share), d_theta


@register_family
class NegativeBinomial(Family):
    """NB2 response: mean ``mu``, variance ``mu + mu^2 / dispersion`` (:func:`nb2_log_prob`).

    ``dispersion`` is theta, the NB "size"; theta -> inf recovers Poisson.
    TFP's ``NegativeBinomial(total_count=theta, logits=log(mu / theta))`` has
    mean ``theta * exp(logits) = mu`` and variance ``mu / (1 - p)`` with
    ``1 - p = theta / (theta + mu)``, i.e. exactly NB2.
    """

    name = "negative_binomial"
    aliases = ("negbin", "nb")
    canonical_link = "log"
    valid_links = ("log",)
    dispersion_params = ("dispersion",)

    def _distribution(self, eta, params, trials):
        theta = params["dispersion"]
        return tfd.NegativeBinomial(total_count=theta, logits=eta - tf.math.log(theta),
                                    require_integer_total_count=False)  # theta is continuous

    def _log_likelihood(self, ops, y, eta, params, trials):
        return nb2_log_prob(ops, y, eta, params["dispersion"])

    def _derivatives(self, y, eta, params, trials, value):
        d1, d2, d_theta = nb2_derivatives(y, eta, params["dispersion"])
        return d1, d2, {"dispersion": d_theta}

    def _check_response(self, y, trials, name):
        check_counts(y, name)

    def default_params(self, y, trials=None):
        # Method of moments: var = mu + mu^2 / theta; underdispersed or
        # degenerate data -> upper clip (near-Poisson).
        y = as_1d(y)
        mu, var = y.mean(), y.var()
        theta = mu**2 / (var - mu) if var > mu else np.inf
        return {"dispersion": float(np.clip(theta, 0.1, 1e3))}


@register_family
class NegativeBinomial1(Family):
    """NB1 response (glmmTMB's ``nbinom1``): mean ``mu``, variance ``mu (1 + phi)``.

    A negative binomial whose size grows with the mean, ``size = mu / phi``, and
    whose success probability is constant, ``p = 1 / (1 + phi)``::

        log p(y) = lgamma(y + s) - lgamma(s) - lgamma(y + 1) - s log(1 + phi)
                   + y log(phi / (1 + phi)),      s = mu / phi

    ``dispersion`` is ``phi``, glmmTMB's ``sigma(fit)`` for ``nbinom1`` (unlike
    :class:`NegativeBinomial`, whose ``dispersion`` is the size theta, the variance
    here grows linearly in the mean; ``phi -> 0`` recovers the Poisson). TFP's
    ``NegativeBinomial(total_count=s, logits=log(phi))`` has mean
    ``s * phi = mu`` and variance ``mu (1 + phi)``. The expected log-likelihood
    has no closed form (``lgamma(y + e^eta / phi)``): Gauss-Hermite quadrature.
    """

    name = "nbinom1"
    aliases = ("negative_binomial1",)
    canonical_link = "log"
    valid_links = ("log",)
    dispersion_params = ("dispersion",)

    def _distribution(self, eta, params, trials):
        phi = params["dispersion"]
        return tfd.NegativeBinomial(total_count=tf.exp(eta) / phi, logits=tf.math.log(phi) * tf.ones_like(eta),
                                    require_integer_total_count=False)

    def _log_likelihood(self, ops, y, eta, params, trials):
        log_phi = ops.log(params["dispersion"])
        s = ops.exp(eta - log_phi)
        # log(1 + phi) = softplus(log phi); log(phi / (1 + phi)) = -softplus(-log phi).
        return (ops.lgamma(y + s) - ops.lgamma(s) - ops.lgamma(y + 1.0)
                - s * ops.softplus(log_phi) - y * ops.softplus(-log_phi))

    def _derivatives(self, y, eta, params, trials, value):
        phi = params["dispersion"]
        s = np.exp(eta - np.log(phi))
        # d f / d s, and s' = s in eta, s' = -s / phi in phi.
        d_s = special.digamma(y + s) - special.digamma(s) - NUMPY.softplus(np.log(phi))
        d1 = s * d_s
        d2 = d1 + s**2 * (special.polygamma(1, y + s) - special.polygamma(1, s))
        d_phi = -s * d_s / phi - s / (1.0 + phi) + y / (phi * (1.0 + phi))
        return d1, d2, {"dispersion": d_phi}

    def _check_response(self, y, trials, name):
        check_counts(y, name)

    def default_params(self, y, trials=None):
        # Method of moments: var = mu (1 + phi); underdispersed data -> the lower clip (near-Poisson).
        y = as_1d(y)
        mu, var = y.mean(), y.var()
        phi = var / mu - 1.0 if mu > 0 else 0.0
        return {"dispersion": float(np.clip(phi, 0.01, 1e3))}
