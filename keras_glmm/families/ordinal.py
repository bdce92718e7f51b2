"""The ordinal family: cumulative link models for ordered categories (`ordinal::clmm`)."""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import special

from keras_glmm.families.array_ops import NUMPY, TENSORFLOW, float_tensor
from keras_glmm.families.base import Family, as_1d, first_bad, register_family

# Cumulative-link models stand the intercept in for the first threshold: beyond
# these distances a cumulative probability is 0 or 1 in float32 and float64 alike.
_ORDINAL_BEYOND = 1e6


@register_family
class Ordinal(Family):
    """Ordered categorical response, a cumulative link model (`ordinal::clmm`'s)::

        P(y <= k | eta) = F(theta_k - eta),   k = 1, ..., K - 1,   theta_1 < ... < theta_{K-1}

    with ``F`` the logistic (``link="logit"``, the proportional-odds model) or the
    standard normal cdf (``link="probit"``), and ``eta = x' beta + z' b`` without an
    intercept: the thresholds ``theta_k`` replace it. The response is coded
    ``1, ..., K`` (``levels`` are the categories' labels, in order).

    Parameterization. The fixed part keeps the formula's intercept ``a`` (so the
    engine, the GLM start and the Keras layers see an ordinary linear predictor
    ``eta* = a + x' beta + z' b``) and the cut points are measured from it::

        c_1 = 0,   c_k = gap_2 + ... + gap_k,   P(y <= k) = F(c_k - eta*)

    The gaps ``gap_k = theta_k - theta_{k-1} > 0`` (``k = 2, ..., K-1``) are the
    family's dispersion parameters (learned on the log scale, so the thresholds stay
    ordered), and clmm's thresholds are ``theta_k = c_k - a`` (`thresholds`). This is
    the same model and likelihood, reparameterized one to one.

    ``log p(y = k) = log(F(u) - F(l))`` with ``u = c_k - eta*``, ``l = c_{k-1} - eta*``
    (``u = +inf`` for ``k = K``, ``l = -inf`` for ``k = 1``), computed as
    ``log F(u) + log(1 - F(l) / F(u))`` below the middle of the interval and from
    the survival function above it (``F(-x) = 1 - F(x)`` for both links), so that
    neither tail loses precision. The expected log-likelihood under a Gaussian
    ``eta*`` has no closed form: Gauss-Hermite quadrature. Both ``F`` are
    log-concave, so ``log p`` is concave in ``eta*`` (the engine's Newton steps).

    Build one with the categories: ``Ordinal("logit", levels=["1", ..., "5"])``;
    `kg.glmm` does it from the response (`for_design`). ``get_family("ordinal")``
    without levels knows no thresholds yet.
    """

    name = "ordinal"
    aliases = ("cumulative", "clmm")
    canonical_link = "logit"
    valid_links = ("logit", "probit")
    quadrature_points = 20

    def __init__(self, link=None, levels=None):
        super().__init__(link)
        self.levels = None if levels is None else [str(v) for v in levels]
        if self.levels is not None and len(self.levels) < 2:
            raise ValueError(f"An ordinal response needs at least 2 categories. Received: levels={self.levels}")
        self.dispersion_params = tuple(f"gap_{k}" for k in range(2, self.num_categories))

    @property
    def num_categories(self):
        """``K``, the number of categories (0 while the levels are unknown)."""
        return 0 if self.levels is None else len(self.levels)

    def threshold_names(self):
        """clmm's names of the thresholds: ``"1|2"``, ``"2|3"``, ..."""
        self._require_levels()
        return [f"{a}|{b}" for a, b in zip(self.levels[:-1], self.levels[1:])]

    def cut_points(self, params):
        """``(c_1, ..., c_{K-1})`` from the gaps (numpy): ``c_1 = 0``, ``c_k = c_{k-1} + gap_k``."""
        self._require_levels()
        gaps = [float(params[name]) for name in self.dispersion_params]
        return np.concatenate([[0.0], np.cumsum(gaps)])

    def thresholds(self, params, intercept):
        """clmm's thresholds ``theta_k = c_k - a`` as a pandas-ready ``{name: value}`` dict."""
        return dict(zip(self.threshold_names(), self.cut_points(params) - float(intercept)))

    def for_design(self, design):
        """This family with the categories of `design`'s response (`kg.glmm` calls it).

        Raises:
            ValueError: if the fixed part has no intercept, which the first threshold
                replaces (see the class docstring).
        """
        if "(Intercept)" not in list(design.fixed_columns):
            raise ValueError(
                f"The ordinal family needs the formula's intercept: the thresholds take its place "
                f"(clmm's model has none; '{design.spec.formula}' removes it). Keep the intercept; "
                "`fixef(component='thresholds')` reports the thresholds.")
        return type(self)(self.link, levels=design.response_levels)

    def with_link(self, link):
        return type(self)(link, levels=self.levels)  # its categories stay

    def get_config(self):
        return {"name": self.name, "link": self.link.name, "levels": self.levels}

    @classmethod
    def from_config(cls, config):
        return cls(config.get("link"), levels=config.get("levels"))

    def __eq__(self, other):
        return super().__eq__(other) and self.levels == other.levels

    def __hash__(self):
        return hash((type(self), self.link.name, None if self.levels is None else tuple(self.levels)))

    def __repr__(self):
        return f"Ordinal(link={self.link.name!r}, levels={self.levels!r})"

    def _require_levels(self):
        if self.levels is None:
            raise ValueError("The ordinal family does not know its categories yet: build it as "
                             "Ordinal(link, levels=[...]) or fit it with kg.glmm, which reads them from the response.")

    # -- the likelihood, over an array namespace ------------------------------

    def _cdf(self, ops, x):
        return ops.sigmoid(x) if self.link.name == "logit" else ops.ndtr(x)

    def _log_cdf(self, ops, x):
        return ops.log_sigmoid(x) if self.link.name == "logit" else ops.log_ndtr(x)

    def _bounds(self, ops, y, eta, params):
        """``(u, l)``: the category's upper and lower cut point minus ``eta``."""
        # c_y = sum_{j <= y} gap_j and c_{y-1} = sum_{j <= y-1} gap_j (c_1 = 0).
        upper = lower = 0.0
        for j, name in enumerate(self.dispersion_params, start=2):
            upper = upper + params[name] * ops.cast(y >= j, eta)
            lower = lower + params[name] * ops.cast(y - 1 >= j, eta)
        beyond = _ORDINAL_BEYOND * ops.ones_like(eta)
        return ops.where(y >= self.num_categories, beyond, upper - eta), ops.where(y <= 1, -beyond, lower - eta)

    def _log_likelihood(self, ops, y, eta, params, trials):
        self._require_levels()
        y = y + ops.zeros_like(eta)
        params = {k: v + ops.zeros_like(eta) for k, v in params.items()}
        u, l = self._bounds(ops, y, eta, params)
        log_f_u, log_f_l = self._log_cdf(ops, u), self._log_cdf(ops, l)
        log_s_u, log_s_l = self._log_cdf(ops, -u), self._log_cdf(ops, -l)
        below = log_f_u + ops.log1mexp(log_f_l - log_f_u)
        above = log_s_l + ops.log1mexp(log_s_u - log_s_l)
        return ops.where(u + l > 0.0, above, below)

    def _distribution(self, eta, params, trials):
        self._require_levels()
        cuts = [tf.zeros_like(eta)]
        for name in self.dispersion_params:
            cuts.append(cuts[-1] + params[name])
        cdf = [self._cdf(TENSORFLOW, c - eta) for c in cuts] + [tf.ones_like(eta)]
        probs = tf.stack([cdf[0]] + [b - a for a, b in zip(cdf[:-1], cdf[1:])], axis=-1)
        outcomes = tf.range(1, self.num_categories + 1, dtype=eta.dtype)
        return tfp.distributions.FiniteDiscrete(outcomes, probs=tf.maximum(probs, 0.0))

    def response_mean(self, eta, params):
        """The expected category number ``E[y] = 1 + sum_k P(y > k) = 1 + sum_k F(eta* - c_k)``.

        `category_probabilities` gives the whole distribution.
        """
        self._require_levels()
        eta = float_tensor(eta)
        total, cut = tf.ones_like(eta), tf.zeros_like(eta)
        for k in range(self.num_categories - 1):
            if k:
                cut = cut + tf.cast(tf.convert_to_tensor(params[f"gap_{k + 1}"], dtype_hint=eta.dtype), eta.dtype)
            total = total + self._cdf(TENSORFLOW, eta - cut)
        return total

    def mean(self, eta, trials=None):
        raise ValueError("The ordinal family's mean needs its thresholds: use response_mean(eta, params) or "
                         "category_probabilities(eta, params).")

    # -- numpy ----------------------------------------------------------------

    def category_probabilities(self, eta, params):
        """``P(y = k | eta*)`` for every row and category, ``(n, K)`` (numpy)."""
        eta = np.asarray(eta, np.float64).reshape(-1)
        cuts = self.cut_points(params)
        cdf = np.concatenate([np.zeros((len(eta), 1)), self._cdf(NUMPY, cuts[None, :] - eta[:, None]),
                              np.ones((len(eta), 1))], axis=1)
        return np.diff(cdf, axis=1)

    def _log_density_and_slope(self, x):
        """``log F'(x)`` and ``F''(x) / F'(x)`` (numpy)."""
        if self.link.name == "logit":
            return self._log_cdf(NUMPY, x) + self._log_cdf(NUMPY, -x), np.tanh(-0.5 * x)
        return -0.5 * x**2 - 0.5 * math.log(2.0 * math.pi), -x

    def _derivatives(self, y, eta, params, trials, value):
        u, l = self._bounds(NUMPY, y, eta, params)
        # r = F'(.) / P(y = k): the scores in the upper and the lower cut point.
        log_d_u, slope_u = self._log_density_and_slope(u)
        log_d_l, slope_l = self._log_density_and_slope(l)
        r_u, r_l = np.exp(log_d_u - value), np.exp(log_d_l - value)
        d1 = r_l - r_u
        d2 = r_u * slope_u - r_l * slope_l - d1**2
        grads = {name: (y >= j) * r_u - (y - 1 >= j) * r_l
                 for j, name in enumerate(self.dispersion_params, start=2)}
        return d1, d2, grads

    def _check_response(self, y, trials, name):
        self._require_levels()
        first_bad(name, y, (y < 1) | (y > self.num_categories) | (y != np.round(y)),
                  f"is not a category code 1..{self.num_categories} (ordinal response)")

    def default_params(self, y, trials=None):
        # The marginal cumulative proportions: c_k - c_1 = F^-1(P(y <= k)) - F^-1(P(y <= 1)).
        self._require_levels()
        y = as_1d(y)
        share = np.array([np.mean(y <= k) for k in range(1, self.num_categories)])
        share = np.clip(share, 1e-3, 1.0 - 1e-3)
        cuts = special.logit(share) if self.link.name == "logit" else special.ndtri(share)
        gaps = np.maximum(np.diff(cuts), 0.1)
        return {name: float(g) for name, g in zip(self.dispersion_params, gaps)}
