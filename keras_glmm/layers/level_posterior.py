"""The posterior of a grouping factor's levels: one row of a table per level.

Level `c` has the Gaussian posterior `q(b_c) = N(mu_c, L_c L_c')`. Its row of
the `posterior` table holds `mu_c` and the unconstrained Cholesky factor `L_c`
(softplus on the diagonal), both in units of `effect_scale`.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm.layers import triangular
from keras_glmm.layers.table import TableColumns, gather_rows
from keras_glmm.transforms import softplus_inverse


def _initial_scale_tril(k, sd=0.5):
    """The unconstrained vector of `sd * I` in `fill_triangular`'s packing."""
    is_diag = triangular.fill_triangular_inverse(np.eye(k)) > 0
    return np.where(is_diag, softplus_inverse(sd), 0.0)


class LevelPosterior:
    """The levels' posterior table of a `RandomEffects` layer: its views, units and natural gradient.

    A mixin of `RandomEffects`, which builds the weights it reads: `posterior`
    (`(num_levels, k + k(k+1)/2)`), `effect_scale_weight` and, for
    `set_effect_scale`, `log_scale` or `scale_loc`; and sets `num_levels`,
    `num_effects`, `effect_scale` and `scale_prior`.
    """

    def _initial_row(self):
        """A level's starting row: mean 0, posterior sds half the prior sds."""
        return np.concatenate([np.zeros(self.num_effects), _initial_scale_tril(self.num_effects)])

    @property
    def posterior_mean(self):
        """The levels' posterior means in units of `effect_scale`: `(num_levels, k)` columns of `posterior`."""
        return TableColumns(self.posterior, 0, self.num_effects)

    @property
    def posterior_scale_tril(self):
        """The unconstrained Cholesky factors, `(num_levels, k(k+1)/2)` columns of `posterior`."""
        k = self.num_effects
        return TableColumns(self.posterior, k, k + k * (k + 1) // 2)

    def _split_row(self, row):
        """`(mean in effect units, Cholesky factor)` of gathered rows of `posterior`."""
        k = self.num_effects
        # tf.split, not slicing: the gradient of a split is one concat, that of two
        # slices two zero-filled (batch, width) tensors and a sum.
        mean, raw = tf.split(row, [k, k * (k + 1) // 2], axis=-1)
        return mean * self._effect_scale, self._scale_tril(raw)

    @property
    def _effect_scale(self):
        return tf.convert_to_tensor(self.effect_scale_weight)

    def set_effect_scale(self, effect_scale, reset=True):
        """Sets the units in which the weights are stored.

        With `reset=True` (before fitting) the prior sds are set to `effect_scale`,
        the posterior means to 0 and the posterior sds to half the prior sds.
        Otherwise the stored weights are rescaled so the posterior is unchanged.
        """
        if not self.built:
            self.build()
        new = np.broadcast_to(np.asarray(effect_scale, dtype="float64"), (self.num_effects,))
        if not np.all(np.isfinite(new) & (new > 0)):
            raise ValueError(f"`effect_scale` must be positive and finite. Received: {new.tolist()}")
        if reset:
            self.posterior.assign(np.tile(self._initial_row(), (self.num_levels, 1)))
            if self.scale_prior is None:
                self.log_scale.assign(np.log(new))
            else:
                self.scale_loc.assign([softplus_inverse(s) for s in new])
        else:
            k = self.num_effects
            table = self.posterior.numpy()
            table[:, :k] *= self.effect_scale_weight.numpy() / new
            # Rows of L scale with the effect; the softplus diagonal makes an exact
            # rescale of the raw vector impossible, so rebuild it from L itself.
            tril = self._scale_tril(table[:, k:]).numpy() / new[:, None]
            diag = np.diagonal(tril, axis1=-2, axis2=-1)
            raw_tril = tril.copy()
            idx = np.arange(k)
            raw_tril[:, idx, idx] = softplus_inverse(np.maximum(diag - 1e-6, 1e-12))
            table[:, k:] = triangular.fill_triangular_inverse(raw_tril)
            self.posterior.assign(table)
        self.effect_scale_weight.assign(new)
        self.effect_scale = [float(s) for s in new]

    def set_posterior(self, mean, covariance):
        """Sets each level's posterior from its mean `(L, k)` and covariance `(L, k, k)` (data units)."""
        k = self.num_effects
        scale = np.asarray(self.effect_scale, dtype="float64")
        mean = np.asarray(mean, dtype="float64").reshape(self.num_levels, k)
        covariance = np.asarray(covariance, dtype="float64").reshape(self.num_levels, k, k)
        # A boundary fit's covariance is singular (a zero sd, a correlation of +-1):
        # jitter far below each level's own scale, and the effects' units, keeps it
        # factorizable (the stored sd is floored at 1e-12 units anyway).
        trace = np.trace(covariance, axis1=1, axis2=2)
        jitter = (1e-12 * trace)[:, None, None] * np.eye(k) + 1e-24 * np.diag(scale**2)
        tril = np.linalg.cholesky(covariance + jitter) / scale[:, None]
        diag = np.diagonal(tril, axis1=-2, axis2=-1)
        raw_diag = softplus_inverse(np.maximum(diag - 1e-6, 1e-12))
        if k == 1:
            raw = raw_diag
        else:
            idx = np.arange(k)
            tril = tril.copy()
            tril[:, idx, idx] = raw_diag
            raw = triangular.fill_triangular_inverse(tril)
        table = np.concatenate([mean / scale, raw], axis=1)
        self.posterior.assign(table.astype(self.variable_dtype))

    def conditional_mean(self):
        """Posterior means of every level's effects, `(num_levels, k)` (lme4's ranef)."""
        return self.posterior_mean.numpy() * self._effect_scale.numpy()

    def conditional_covariance(self):
        """Posterior covariances of every level's effects, `(num_levels, k, k)`."""
        k = self.num_effects
        raw = self.posterior.numpy()[:, k:].astype("float64")
        scale = np.asarray(self.effect_scale, dtype="float64")
        if k == 1:
            sd = (np.logaddexp(raw, 0.0) + 1e-6) * scale
            return sd[:, :, None] ** 2
        tril = triangular.fill_triangular(raw)
        idx = np.arange(k)
        tril[:, idx, idx] = np.logaddexp(tril[:, idx, idx], 0.0) + 1e-6
        tril = tril * scale[:, None]
        return tril @ np.swapaxes(tril, 1, 2)

    def conditional_stddev(self):
        """Posterior standard deviations, `(num_levels, k)` (lme4's condVar, as sds)."""
        return np.sqrt(np.diagonal(self.conditional_covariance(), axis1=-2, axis2=-1))

    def natural_gradient(self, rows, gradient):
        """Preconditions a gradient of `posterior` rows by the inverse Fisher information.

        For `q(b) = N(mu, S)`, `S = L L'`, the Fisher information is block diagonal
        in `(mu, L)`. For `mu` it is `S^-1`, so the natural gradient is `S` times
        the gradient; in the stored units (`mu = effect_scale * m`,
        `L = diag(effect_scale) C`) that is `C C'` times the gradient in `m`. For the
        Cholesky factor it is (Tan 2021, "Analytic natural gradient updates for
        Cholesky factor in Gaussian variational approximation")

        ```
        natural gradient in C = C Phi(C' G),   Phi(A) = lower triangle of A, diagonal halved
        ```

        with `G` the gradient in `C` (the units cancel: the Fisher information of a
        covariance is invariant to rescaling). The diagonal of `C` is
        `softplus(r) + 1e-6`, so on the diagonal the gradient in `r` is divided by
        `sigmoid(r)` on the way in and the natural gradient once more on the way out;
        for one effect this is `(softplus(r) + 1e-6)^2 / (2 sigmoid(r)^2)` times the
        gradient. `SparseAdam(natural_step=...)` steps the random effects of
        minibatch fits along it.

        Args:
            rows: level indices `(r,)`.
            gradient: gradient of the loss in `posterior[rows]`, `(r, k + k(k+1)/2)`.

        Returns:
            The natural gradient, shaped as `gradient`.
        """
        k = self.num_effects
        widths = [k, k * (k + 1) // 2]
        raw = tf.cast(tf.split(gather_rows(self.posterior, rows), widths, axis=-1)[1], gradient.dtype)
        grad_mean, grad_raw = tf.split(gradient, widths, axis=-1)
        if k == 1:
            sd = tf.nn.softplus(raw) + 1e-6
            return tf.concat(
                [tf.square(sd) * grad_mean, 0.5 * tf.square(sd / tf.sigmoid(raw)) * grad_raw], axis=-1
            )
        raw = tfp.math.fill_triangular(raw)
        slope = tf.sigmoid(tf.linalg.diag_part(raw))  # d C_jj / d r_jj
        chol = tf.linalg.set_diag(raw, tf.nn.softplus(tf.linalg.diag_part(raw)) + 1e-6)
        mean_step = tf.linalg.matvec(chol, tf.linalg.matvec(chol, grad_mean, transpose_a=True))
        grad_chol = tfp.math.fill_triangular(grad_raw)
        grad_chol = tf.linalg.set_diag(grad_chol, tf.linalg.diag_part(grad_chol) / slope)
        inner = tf.matmul(chol, grad_chol, transpose_a=True)
        phi = tf.linalg.band_part(inner, -1, 0) - 0.5 * tf.linalg.diag(tf.linalg.diag_part(inner))
        step = tf.matmul(chol, phi)
        step = tf.linalg.set_diag(step, tf.linalg.diag_part(step) / slope)
        return tf.concat([mean_step, tfp.math.fill_triangular_inverse(step)], axis=-1)

    def _scale_tril(self, raw):
        """Cholesky factors from unconstrained rows: `(..., k(k+1)/2) -> (..., k, k)`."""
        if self.num_effects == 1:
            # One effect: elementwise (fill_triangular's gathers cost more per row).
            return (tf.nn.softplus(raw) + 1e-6)[..., None] * self._effect_scale
        tril = tfp.math.fill_triangular(raw)
        diag = tf.linalg.diag_part(tril)
        tril = tf.linalg.set_diag(tril, tf.nn.softplus(diag) + 1e-6)
        return tril * self._effect_scale[..., :, None]
