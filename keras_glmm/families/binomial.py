"""The binomial family: ``y ~ Binomial(trials, mu)`` under the logit, probit or cloglog link."""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm import gauss_hermite
from keras_glmm.families.array_ops import NUMPY, TENSORFLOW
from keras_glmm.families.base import Family, check_counts, first_bad, quadrature_nodes, register_family

# Below this linear predictor the cloglog link's log(mu) is its series
# eta - e^eta / 2 + O(e^{2 eta}) (and e^eta would underflow log(1 - exp(-e^eta))).
_CLOGLOG_SERIES_BELOW = -20.0

# Rows per chunk of the logit kernel's (rows, nodes) arrays (see `Binomial._numpy_quadrature`).
QUADRATURE_CHUNK_ROWS = 8192


@register_family
class Binomial(Family):
    """Binomial response: ``y ~ Binomial(trials, mu)``, y = number of successes::

        log p(y) = y log(mu) + (n - y) log(1 - mu) + log C(n, y)

    ``trials=None`` means one trial (Bernoulli, y in {0, 1}, no coefficient).
    ``mean`` returns the probability ``mu``. ``log(mu)`` and ``log(1 - mu)`` are
    computed stably for every link (rather than from clipped probabilities), so
    tails keep informative gradients:

      * logit: ``log(mu) = -softplus(-eta)``, ``log(1 - mu) = log(mu) - eta``;
      * probit: ``log Phi(eta)`` and ``log Phi(-eta)``;
      * cloglog: ``log(1 - mu) = -e^eta`` and ``log(mu) = log(1 - exp(-e^eta))``.
    """

    name = "binomial"
    aliases = ("bernoulli",)
    canonical_link = "logit"
    valid_links = ("logit", "probit", "cloglog")

    def __init__(self, link=None):
        super().__init__(link)
        if self.link.name == "logit":
            # E[softplus(eta)] is smooth: 12 nodes are exact to 2e-8 at sd(eta) = 1
            # and to 4e-5 at sd 2, at 3/8 of the cost of 32 per row (the quadrature
            # is the largest cost of a minibatch step). Probit and cloglog keep 32.
            self.quadrature_points = 12

    def _log_mean_and_complement(self, ops, eta):
        """``(log(mu), log(1 - mu))``, each without clipping."""
        if self.link.name == "logit":
            log_mu = ops.log_sigmoid(eta)
            return log_mu, log_mu - eta
        if self.link.name == "probit":
            return ops.log_ndtr(eta), ops.log_ndtr(-eta)
        # cloglog. The cap (e^eta = sqrt(max float)) leaves headroom for the
        # arithmetic in the log-likelihood and its gradient; mu == 1 to machine
        # precision long before it. Every branch is clipped: the unused one must
        # stay finite or its zero gradient becomes 0 * inf = NaN.
        cap = 0.5 * math.log(ops.float_info(eta).max)
        series = eta - 0.5 * ops.exp(ops.minimum(eta, _CLOGLOG_SERIES_BELOW))
        log_mu = ops.where(eta < _CLOGLOG_SERIES_BELOW, series,
                           ops.log(-ops.expm1(-ops.exp(ops.clip(eta, _CLOGLOG_SERIES_BELOW, cap)))))
        return log_mu, -ops.exp(ops.minimum(eta, cap))

    @staticmethod
    def _log_coefficient(ops, y, trials):
        """``log C(n, y)``."""
        return ops.lgamma(trials + 1.0) - ops.lgamma(y + 1.0) - ops.lgamma(trials - y + 1.0)

    def _from_logs(self, ops, y, log_mu, log_not, trials):
        """``log p(y)`` from ``log(mu)`` and ``log(1 - mu)``."""
        value = y * log_mu + ((1.0 if trials is None else trials) - y) * log_not
        return value if trials is None else value + self._log_coefficient(ops, y, trials)

    def _log_likelihood(self, ops, y, eta, params, trials):
        return self._from_logs(ops, y, *self._log_mean_and_complement(ops, eta), trials)

    def _distribution(self, eta, params, trials):
        total = tf.ones_like(eta) if trials is None else trials
        if self.link.name == "logit":
            logits = eta
        else:
            log_mu, log_not = self._log_mean_and_complement(TENSORFLOW, eta)
            logits = log_mu - log_not
        return tfp.distributions.Binomial(total_count=total, logits=logits)

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        if self.link.name != "logit":
            return super()._expected_log_prob(y, m, v, params, trials, num_points)
        # log p = y eta - n softplus(eta) + log C(n, y): only E[softplus(eta)] needs
        # quadrature, and the binomial coefficient is computed once per row instead
        # of at every node.
        nodes, weights, _, _ = quadrature_nodes(TENSORFLOW, m, v, num_points)
        expected_softplus = tf.reduce_sum(tf.nn.softplus(nodes) * weights, axis=-1)
        expected = y * m - expected_softplus * (1.0 if trials is None else trials)
        if trials is not None:
            expected += self._log_coefficient(TENSORFLOW, y, trials)
        return expected

    def _numpy_quadrature(self, y, m, v, params, trials, num_points):
        """`Family._numpy_quadrature` for the logit link, with the nodes' work cut to one `exp`
        and one `log`: the engine's largest cost on binary data.

        `f = y eta - n softplus(eta) [+ log C(n, y)]`, and with `e = exp(-eta)`:
        `log p = -log(1 + e)`, `p = 1 / (1 + e)`, `f' = y - n p`, `f'' = -n p (1 - p)`.
        The rule integrates `eta` exactly (`sum_k w_k = 1`, `sum_k w_k x_k = 0`), so
        only `E[log p]`, `E[p]`, `E[p x]` and `E[p (1 - p)]` are sums over nodes; the
        derivative in the variance is `sum_k w_k f'(node_k) x_k / (2 sd) = -n E[p x] / (2 sd)`.
        The same rule and numbers as the generic kernel to rounding (`log(1 + e)` and
        `log(expit)` share its absolute error, 1e-16), at a third of its time on
        1e5 rows x 12 nodes.
        """
        if self.link.name != "logit" or num_points == 0:
            return super()._numpy_quadrature(y, m, v, params, trials, num_points)
        # In chunks of rows: (rows, nodes) temporaries of a few hundred KiB stay in
        # cache and in the allocator's pool; 1e5 x 12 at once page-faults fresh
        # memory for each one (measured: 11 ms against 20 ms of CPU per call).
        out = np.empty((4, len(m)))
        for start in range(0, len(m), QUADRATURE_CHUNK_ROWS):
            rows = slice(start, start + QUADRATURE_CHUNK_ROWS)
            out[:, rows] = self._logit_quadrature(y[rows], m[rows], v[rows], None if trials is None else trials[rows],
                                                  num_points)
        value, first, second, d_var = out
        return value, first, second, d_var, {}

    def _logit_quadrature(self, y, m, v, trials, num_points):
        """`_numpy_quadrature`'s value and derivatives in `m` and `v` for a chunk of rows."""
        x, w = gauss_hermite.rule(num_points)
        sd = np.sqrt(np.maximum(v, 0.0))
        nodes = sd[:, None] * x[None, :]
        nodes += m[:, None]
        one_plus = np.exp(-nodes)  # overflows to inf below eta = -709: p = 0 there
        one_plus += 1.0
        log_p = np.log(one_plus)
        log_p *= -1.0
        if np.min(m - sd * x[-1], initial=0.0) <= -37.0:
            # Below -37, log(expit) is eta to rounding (e^-37 = 8.5e-17 of it; and
            # log(1 + e) is inf below -709).
            log_p = np.where(nodes > -37.0, log_p, nodes)
        p = np.reciprocal(one_plus, out=one_plus)
        mean_p, mean_px = p @ w, p @ (w * x)
        p *= 1.0 - p
        n = 1.0 if trials is None else trials
        value = n * (log_p @ w) - (n - y) * m
        if trials is not None:
            value = value + self._log_coefficient(NUMPY, y, trials)
        second = -n * (p @ w)
        positive = sd > 0
        d_var = np.where(positive, -n * mean_px / (2.0 * np.where(positive, sd, 1.0)), 0.5 * second)
        return value, y - n * mean_p, second, d_var

    def _numpy_log_prob(self, y, eta, params, trials):
        # log(mu) and log(1 - mu) once, for the value and its derivatives (log_ndtr is costly).
        logs = self._log_mean_and_complement(NUMPY, eta)
        return (self._from_logs(NUMPY, y, *logs, trials), *self._derivatives_from_logs(y, eta, trials, *logs))

    def _derivatives(self, y, eta, params, trials, value):
        return self._derivatives_from_logs(y, eta, trials, *self._log_mean_and_complement(NUMPY, eta))

    def _derivatives_from_logs(self, y, eta, trials, log_mu, log_not):
        """The derivatives in ``eta`` of ``y log(mu) + (n - y) log(1 - mu)``, per link (numpy)."""
        n = 1.0 if trials is None else trials
        if self.link.name == "logit":
            p = np.exp(log_mu)
            return y - n * p, -n * p * (1.0 - p), {}
        if self.link.name == "probit":
            log_phi = -0.5 * eta**2 - 0.5 * math.log(2.0 * math.pi)
            r_pos, r_neg = np.exp(log_phi - log_mu), np.exp(log_phi - log_not)  # phi/Phi(+-eta)
            d_mu, d_not = r_pos, -r_neg
            d2_mu, d2_not = -r_pos * (eta + r_pos), -r_neg * (r_neg - eta)
        else:  # cloglog: log(1 - mu) = -e^eta
            e = -log_not
            d_not = d2_not = log_not
            small = eta < _CLOGLOG_SERIES_BELOW
            es = np.where(small, 1.0, np.minimum(e, 700.0))
            em1 = np.expm1(es)
            ratio = es / em1  # d log(mu) / d eta = e / (e^e - 1)
            d_mu = np.where(small, 1.0 - 0.5 * e, ratio)
            d2_mu = np.where(small, -0.5 * e, ratio * (1.0 - es * np.exp(es) / em1))
        return y * d_mu + (n - y) * d_not, y * d2_mu + (n - y) * d2_not, {}

    def _check_response(self, y, trials, name):
        if trials is None:
            first_bad(name, y, (y != 0) & (y != 1), "is not 0 or 1 (no trials given: Bernoulli)")
            return
        tname = f"trials for {name}"
        if trials.size not in (1, y.size):
            raise ValueError(f"{tname}: length {trials.size} does not match {name} length {y.size}.")
        first_bad(tname, trials, ~np.isfinite(trials), "is not finite")
        first_bad(tname, trials, (trials < 1) | (trials != np.round(trials)), "is not a positive integer")
        check_counts(y, name)
        trials = np.broadcast_to(trials, y.shape)
        first_bad(name, y, y > trials, "exceeds the number of trials")
