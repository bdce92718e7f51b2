"""The prior of a grouping factor's random effects, and the KL of their posterior from it.

```
b_c ~ N(0, Sigma),   Sigma = diag(tau) Omega diag(tau)
```

`tau` is point-estimated (`log_scale`) or, under a `HalfNormal(scale_prior)`
hyperprior, has a Softplus-Normal posterior of its own (`scale_loc`,
`scale_raw_sd`), whose expectations use a Gauss-Hermite grid (`_scale_nodes`).
`Omega` is a point estimate (`correlation`, or the identity).
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm import gauss_hermite
from keras_glmm.layers import triangular
from keras_glmm.layers.table import gather_rows

tfd = tfp.distributions
tfb = tfp.bijectors


class VarianceComponents:
    """The prior covariance `Sigma` of a `RandomEffects` layer, its KL terms and its M-step.

    A mixin of `RandomEffects`, which builds the weights it reads (`log_scale`
    or `scale_loc` and `scale_raw_sd`, `correlation` when `num_correlations`,
    `level_counts`) and sets `num_effects`, `num_correlations`, `covariance`,
    `scale_prior` and `num_scale_points`. The KL terms take the levels'
    posteriors from `LevelPosterior` (`_split_row`, `conditional_mean`,
    `conditional_covariance`).
    """

    def prior_variance(self, z):
        """`z' Sigma z` per row, the variance of a new level's contribution."""
        taus, weights = self._scale_nodes()
        tau = tf.tensordot(weights, taus, axes=1)  # E[tau] under a hyperprior
        prior_tril = tau[:, None] * self._prior_correlation_tril()
        return tf.reduce_sum(tf.square(tf.linalg.matvec(prior_tril, z, transpose_a=True)), -1)

    def _prior_correlation_tril(self):
        k = self.num_effects
        if not self.num_correlations:
            return tf.eye(k, dtype=self.variable_dtype)
        return tfb.CorrelationCholesky()(self.correlation)

    def _scale_nodes(self):
        """Values of the prior sds `tau` and their weights: `(S, k)` and `(S,)`.

        A point estimate is one node of weight 1. Under a hyperprior,
        `tau_j = softplus(u_j)` with `u_j ~ N(loc_j, sd_j)` independently, and
        expectations over `q(tau)` use the Gauss-Hermite product grid in `u`.
        """
        if self.scale_prior is None:
            return tf.exp(self.log_scale)[None, :], tf.ones((1,), self.variable_dtype)
        x, w = gauss_hermite.product_grid(self.num_scale_points, self.num_effects)
        u = self.scale_loc + self._scale_sd() * tf.constant(x, self.variable_dtype)
        return tf.nn.softplus(u), tf.constant(w, self.variable_dtype)

    def _scale_sd(self):
        return tf.nn.softplus(self.scale_raw_sd) + 1e-6

    # ------------------------------------------------------------------- KL
    def _kl_per_row(self, level_index, mean, tril):
        """Mean over the batch of `KL_{g(i)} / n_{g(i)}` (+ the hyperprior's share)."""
        counts = gather_rows(self.level_counts, level_index)
        # A level in the batch with no counted training rows would divide by zero:
        # its count was never set (no `adapt`), which the model checks before fitting.
        kl = self.level_kl(mean, tril) / tf.maximum(counts, 1.0)
        loss = tf.reduce_mean(kl)
        if self.scale_prior is not None:
            # The hyperprior's KL is global: spread it over all training rows.
            total = tf.maximum(tf.reduce_sum(self.level_counts), 1.0)
            loss += self.scale_kl() / total
        return loss

    def level_kl(self, mean, tril):
        """`KL(N(mean, tril tril') || N(0, Sigma))` for each level given, shape `(n,)`.

        ```
        KL = 1/2 [ |A^-1 L|_F^2 + |A^-1 mu|^2 - k + 2 log|A| - 2 log|L| ],  Sigma = A A'
        ```
        Under a hyperprior it is the expectation over `q(tau)` (quadrature).
        """
        k = self.num_effects
        taus, weights = self._scale_nodes()  # (S, k), (S,)
        if k == 1:
            # The same formula, elementwise: batched 1x1 matrix products and solves
            # cost several times more per row.
            tau = taus[:, 0, None]  # (S, 1)
            sd = tril[None, :, 0, 0]
            kl = 0.5 * (tf.square(sd / tau) + tf.square(mean[None, :, 0] / tau) - 1.0) + tf.math.log(
                tau
            ) - tf.math.log(sd)
            return tf.tensordot(weights, kl, axes=1)
        omega = self._prior_correlation_tril()  # (k, k)
        prior_tril = taus[:, :, None] * omega[None]  # (S, k, k) = diag(tau) L_Omega
        eye = tf.eye(k, batch_shape=tf.shape(prior_tril)[:1], dtype=prior_tril.dtype)
        prior_inv = tf.linalg.triangular_solve(prior_tril, eye, lower=True)  # (S, k, k)
        a = tf.einsum("sij,bjk->sbik", prior_inv, tril)
        m = tf.einsum("sij,bj->sbi", prior_inv, mean)
        log_det_prior = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(prior_tril)), -1)
        log_det_q = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(tril)), -1)
        kl = 0.5 * (
            tf.reduce_sum(tf.square(a), axis=[-2, -1])
            + tf.reduce_sum(tf.square(m), axis=-1)
            - k
        ) + log_det_prior[:, None] - log_det_q[None, :]
        return tf.tensordot(weights, kl, axes=1)

    def scale_kl(self):
        """`KL(q(tau) || HalfNormal(scale_prior))`, summed over effects.

        With `tau = softplus(u)`, `u ~ N(loc, sd)`: `log q(tau) = log N(u) - log sigmoid(u)`,
        so `KL = -1/2 log(2 pi e) - log sd - E[log sigmoid(u) + log p(tau)]`, the
        expectation by one-dimensional Gauss-Hermite quadrature.
        """
        x, w = gauss_hermite.product_grid(self.num_scale_points, 1)
        x = tf.constant(x, self.variable_dtype)  # (S, 1)
        w = tf.constant(w, self.variable_dtype)
        sd = self._scale_sd()
        u = self.scale_loc + sd * x  # (S, k)
        prior = tfd.HalfNormal(tf.constant(self.scale_prior, self.variable_dtype))
        expected = tf.tensordot(w, tf.math.log_sigmoid(u) + prior.log_prob(tf.nn.softplus(u)), axes=1)
        return tf.reduce_sum(-0.5 * np.log(2 * np.pi * np.e) - tf.math.log(sd) - expected)

    def total_kl(self):
        """The whole `KL(q || p)` over all levels (and the hyperprior), a scalar.

        For reporting (the ELBO of a fit); touches every level.
        """
        mean, tril = self._split_row(tf.convert_to_tensor(self.posterior))
        # Levels without training rows are never seen by the per-row KL (their q
        # stays where it started): the ELBO of the data leaves them out.
        seen = tf.cast(self.level_counts > 0, mean.dtype)
        kl = tf.reduce_sum(self.level_kl(mean, tril) * seen)
        if self.scale_prior is not None:
            kl += self.scale_kl()
        return kl

    # ----------------------------------------------------- the prior's values
    def prior_stddev(self):
        """The standard deviations `tau` (posterior means under a hyperprior), `(k,)`."""
        if self.scale_prior is None:
            log_scale = self.log_scale.numpy().astype("float64")
            # `set_prior` stores an sd of 0 as the log of the dtype's smallest number.
            zero = log_scale <= np.log(np.finfo(self.variable_dtype).tiny) + 1e-3
            return np.where(zero, 0.0, np.exp(log_scale))
        taus, weights = self._scale_nodes()
        return tf.tensordot(weights, taus, axes=1).numpy()

    def prior_correlation(self):
        """The correlation matrix `Omega`, `(k, k)`."""
        if not self.num_correlations:
            return np.eye(self.num_effects)
        tril = triangular.correlation_cholesky(self.correlation.numpy())
        return tril @ tril.T

    def prior_covariance(self):
        """`Sigma = diag(tau) Omega diag(tau)`, `(k, k)`."""
        tau = self.prior_stddev()
        return tau[:, None] * self.prior_correlation() * tau[None, :]

    def update_prior(self, relaxation=1.0):
        """Moves the prior covariance to its optimum given the posterior (an M-step).

        For a point-estimated `Sigma` the ELBO's only `Sigma` terms are the levels'
        KLs, maximized by

        ```
        Sigma = mean over levels with training rows of (mu_c mu_c' + L_c L_c')
        ```

        Minibatch fits take this step once an epoch (`VarianceUpdate`): Adam steps on
        `tau` from minibatches are noisy and slow (the EM-like coupling of `tau` with
        every level's mean), while the exact update needs one pass over the table.
        Under a hyperprior (`scale_prior`) nothing is changed.

        Args:
            relaxation: over-relaxation `omega` of the sds' step in log space,
                `log tau <- log tau + omega (log tau_M - log tau)`: EM moves a variance
                by a fraction of the way to its fixed point when levels have few rows
                (`1 / (1 + n w tau^2)` of the information is missing), and `omega > 1`
                makes up for it.

        Returns:
            The step `log tau_M - log tau` of each effect (before relaxation).
        """
        if self.scale_prior is not None:
            return np.zeros(self.num_effects)
        seen = self.level_counts.numpy() > 0
        if not seen.any():
            return np.zeros(self.num_effects)
        mean = self.conditional_mean()[seen].astype("float64")
        cov = self.conditional_covariance()[seen].astype("float64")
        sigma = (mean.T @ mean + cov.sum(axis=0)) / seen.sum()
        if self.covariance == "diagonal":
            sigma = np.diag(np.diag(sigma))
        tau = np.sqrt(np.maximum(np.diag(sigma), 1e-12))
        old = self.log_scale.numpy().astype("float64")
        step = np.log(tau) - old
        relaxed = np.exp(old + relaxation * step)
        self.set_prior(relaxed, sigma / np.outer(tau, tau))
        return step

    def set_prior(self, stddev, correlation=None):
        """Sets the point-estimated prior: standard deviations `(k,)` and correlations `(k, k)`.

        A standard deviation of exactly 0 (a boundary fit) is stored as the smallest
        logarithm the weights' dtype holds, which reads back as 0.
        """
        if self.scale_prior is not None:
            raise ValueError(
                f"RandomEffects layer '{self.name}' has a `scale_prior`: its sds have a posterior, "
                "not a point estimate."
            )
        stddev = np.asarray(stddev, dtype="float64").reshape(self.num_effects)
        tiny = np.finfo(self.variable_dtype).tiny
        self.log_scale.assign(np.log(np.maximum(stddev, tiny)).astype(self.variable_dtype))
        if self.num_correlations and correlation is not None:
            corr = np.asarray(correlation, dtype="float64")
            tril = np.linalg.cholesky(corr + 1e-9 * np.eye(self.num_effects))
            raw = triangular.correlation_cholesky_inverse(tril / np.linalg.norm(tril, axis=1, keepdims=True))
            self.correlation.assign(raw.astype(self.variable_dtype))
