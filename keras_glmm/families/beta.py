"""The beta family: proportions strictly between 0 and 1."""

import math

import numpy as np
import tensorflow_probability as tfp
from scipy import special

from keras_glmm.families.array_ops import NUMPY, TENSORFLOW
from keras_glmm.families.base import Family, as_1d, first_bad, floored_mean, register_family


@register_family
class Beta(Family):
    """Beta response for proportions in (0, 1), mean ``mu`` and precision ``phi``::

        y ~ Beta(mu * phi, (1 - mu) * phi),   E[y] = mu,   Var[y] = mu (1 - mu) / (1 + phi)

    glmmTMB's ``beta_family()`` (its ``sigma(fit)`` is ``phi``); ``precision`` is
    ``phi``. ``mu`` and ``1 - mu`` are each computed without cancellation for every
    link (``sigmoid(eta)`` and ``sigmoid(-eta)`` for the logit) and floored at
    ``sqrt(tiny)`` (``ArrayOps.positive``), so the density stays finite in the
    far tails of the quadrature.
    """

    name = "beta"
    canonical_link = "logit"
    valid_links = ("logit", "probit", "cloglog")
    dispersion_params = ("precision",)

    def _mean_and_complement(self, ops, eta):
        """``(mu, 1 - mu)``, not yet floored."""
        if self.link.name == "logit":
            return ops.sigmoid(eta), ops.sigmoid(-eta)
        if self.link.name == "probit":
            return ops.ndtr(eta), ops.ndtr(-eta)
        # cloglog: 1 - mu = exp(-e^eta); capped so that e^eta stays finite
        t = ops.exp(ops.minimum(eta, 0.5 * math.log(ops.float_info(eta).max)))
        return -ops.expm1(-t), ops.exp(-t)

    def _shapes(self, ops, eta, params):
        """The beta distribution's ``(mu phi, (1 - mu) phi)``, each part of the mean floored."""
        mu, rest = self._mean_and_complement(ops, eta)
        return ops.positive(mu) * params["precision"], ops.positive(rest) * params["precision"]

    def _distribution(self, eta, params, trials):
        a, b = self._shapes(TENSORFLOW, eta, params)
        return tfp.distributions.Beta(concentration1=a, concentration0=b)

    def _log_likelihood(self, ops, y, eta, params, trials):
        a, b = self._shapes(ops, eta, params)
        return (ops.lgamma(params["precision"]) - ops.lgamma(a) - ops.lgamma(b)
                + (a - 1.0) * ops.log(y) + (b - 1.0) * ops.log1p(-y))

    def _derivatives(self, y, eta, params, trials, value):
        phi = params["precision"]
        mu, rest = self._mean_and_complement(NUMPY, eta)
        # d = dmu / deta and d2 = d2mu / deta2 per link.
        if self.link.name == "logit":
            d, d2 = mu * rest, mu * rest * (rest - mu)
        elif self.link.name == "probit":
            d = np.exp(-0.5 * eta**2) / math.sqrt(2.0 * math.pi)
            d2 = -eta * d
        else:
            cap = 0.5 * math.log(np.finfo(np.float64).max)
            t = np.exp(np.minimum(eta, cap))
            d = np.where(eta < cap, t * rest, 0.0)
            d2 = d * (1.0 - t)
        # mu and 1 - mu are floored separately, as `_shapes` does.
        mu, in_mu = floored_mean(mu)
        rest, in_rest = floored_mean(rest)
        a, b = phi * mu, phi * rest
        ga = np.log(y) - special.digamma(a)
        gb = np.log1p(-y) - special.digamma(b)
        da, d2a = np.where(in_mu, d, 0.0), np.where(in_mu, d2, 0.0)
        db, d2b = np.where(in_rest, -d, 0.0), np.where(in_rest, -d2, 0.0)
        curvature = (np.where(in_mu, special.polygamma(1, a) * da**2, 0.0)
                     + np.where(in_rest, special.polygamma(1, b) * db**2, 0.0))
        d1 = phi * (ga * da + gb * db)
        d2 = phi * (ga * d2a + gb * d2b) - phi**2 * curvature
        return d1, d2, {"precision": special.digamma(phi) + mu * ga + rest * gb}

    def _check_response(self, y, trials, name):
        first_bad(name, y, (y <= 0) | (y >= 1), "is not strictly between 0 and 1 (beta response)")

    def default_params(self, y, trials=None):
        # Method of moments: var = mu (1 - mu) / (1 + phi).
        y = as_1d(y)
        mu, var = y.mean(), y.var()
        phi = mu * (1.0 - mu) / var - 1.0 if var > 0 else np.inf
        return {"precision": float(np.clip(phi, 0.1, 1e4))}
