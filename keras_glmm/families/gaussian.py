"""The Gaussian family: ``y ~ N(mu, scale^2)``."""

import math

import numpy as np
import tensorflow_probability as tfp

from keras_glmm.families import array_ops
from keras_glmm.families.base import Family, as_1d, register_family


@register_family
class Gaussian(Family):
    """Normal response: ``y ~ N(mu, scale^2)``; ``scale`` is the residual sd::

        log p(y) = -log(2 pi scale^2) / 2 - (y - mu)^2 / (2 scale^2)

    ``E_q[log p]`` is closed form under the identity link (``E[(y - eta)^2] =
    (y - m)^2 + v``) and the log link (lognormal moments).
    """

    name = "gaussian"
    aliases = ("normal",)
    canonical_link = "identity"
    valid_links = ("identity", "log", "inverse")
    dispersion_params = ("scale",)

    def _distribution(self, eta, params, trials):
        return tfp.distributions.Normal(loc=self.link.inverse(eta), scale=params["scale"])

    def _log_likelihood(self, ops, y, eta, params, trials):
        s2 = params["scale"] ** 2
        return -0.5 * ops.log(2.0 * math.pi * s2) - (y - self.link._inverse(ops, eta)) ** 2 / (2.0 * s2)

    def _expected_closed_form(self, ops, y, m, v, params, trials):
        squares = self._expected_squares(ops, y, m, v)
        if squares is None:
            return None
        s2 = params["scale"] ** 2
        return -0.5 * ops.log(2.0 * math.pi * s2) - squares / (2.0 * s2)

    def _expected_squares(self, ops, y, m, v):
        """``E[(y - mu)^2]`` for ``eta ~ N(m, v)``, or None without a closed form."""
        if self.link.name == "identity":
            return (y - m) ** 2 + v
        if self.link.name == "log":
            # E[(y - e^eta)^2] = y^2 - 2 y e^{m + v/2} + e^{2m + 2v} (lognormal moments).
            return y**2 - 2.0 * y * ops.exp(m + 0.5 * v) + ops.exp(2.0 * m + 2.0 * v)
        return None

    def _weight_terms(self, weights, params, ops):
        # log N(y | mu, sigma^2 / w) = w log N(y | mu, sigma^2) + [log w - (1 - w) log(2 pi sigma^2)] / 2
        ops = array_ops.namespace(ops)
        sigma = params["scale"]
        positive = weights > 0
        safe = ops.where(positive, weights, ops.ones_like(weights))
        value = ops.where(positive, 0.5 * ops.log(safe) - 0.5 * (1.0 - weights) * ops.log(
            2.0 * math.pi * sigma**2), ops.zeros_like(weights))
        return value, {"scale": ops.where(positive, -(1.0 - weights) / sigma, ops.zeros_like(weights))}

    def _derivatives(self, y, eta, params, trials, value):
        sigma = params["scale"]
        s2 = sigma**2
        mu, d_mu, d2_mu = self.link.inverse_derivatives(eta)
        r = y - mu
        return r * d_mu / s2, (r * d2_mu - d_mu**2) / s2, {"scale": -1.0 / sigma + r**2 / sigma**3}

    def _expected_derivatives(self, y, m, v, params, trials):
        squares = self._expected_squares(array_ops.NUMPY, y, m, v)
        if squares is None:
            return None
        sigma = params["scale"]
        s2 = sigma**2
        d_scale = {"scale": -1.0 / sigma + squares / sigma**3}
        if self.link.name == "identity":
            return (y - m) / s2, np.full_like(m, -1.0 / s2), np.full_like(m, -0.5 / s2), d_scale
        e1, e2 = np.exp(m + 0.5 * v), np.exp(2.0 * m + 2.0 * v)  # log link
        return (2 * y * e1 - 2 * e2) / (2 * s2), (2 * y * e1 - 4 * e2) / (2 * s2), (y * e1 - 2 * e2) / (2 * s2), d_scale

    def default_params(self, y, trials=None):
        sd = float(np.std(as_1d(y)))
        return {"scale": sd if sd > 0 else 1.0}
