"""Random effects of several grouping factors with one joint Gaussian posterior."""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm.layers.random_effects import RandomEffects


@keras.saving.register_keras_serializable(package="keras_glmm")
class JointRandomEffects(keras.layers.Layer):
    """Crossed or nested random-effect terms with a full-covariance Gaussian posterior.

    Mean-field VI, one independent posterior per level and factor, cannot represent
    the posterior dependence between crossed or nested factors: it shrinks the
    variance of a small factor nested in another towards zero (lme4's grouseticks,
    InstEval's departments) and biases crossed variance components by a few percent.
    This layer holds the posterior of all the terms' coefficients `b` (and,
    optionally, of the fixed effects `beta`) as one Gaussian:

    ```
    q(b, beta) = N(mu, L L'),  L a dense K x K lower-triangular matrix
    b_t,c ~ N(0, Sigma_t)       (each term's prior, held by its RandomEffects layer)
    beta ~ flat                 (when num_fixed > 0)
    ```

    For a Gaussian response with point-estimated `Sigma_t` and residual sd, `q` can
    equal the exact posterior, so the ELBO is the marginal likelihood at the optimum
    (lme4's ML fit); with the fixed effects inside `q` under a flat prior, the ELBO
    is the restricted likelihood instead (lme4's REML fit), and `q`'s covariance of
    `beta` gives the fixed effects' standard errors. A step costs `O(K^2 + batch * K)`,
    so this layer is for designs with up to a few thousand coefficients; beyond,
    use one `RandomEffects` layer per term.

    The KL divergence is global, so it is added divided by `num_observations`.

    Args:
        terms: `RandomEffects` layers, one per term, which keep each term's prior
            (standard deviations, correlations) and input conventions; their own
            posterior weights are not created (`own_posterior=False`).
        num_fixed: number of fixed-effect columns whose posterior is included
            (flat prior); 0 to leave the fixed effects to another layer.
        num_observations: training rows (the KL is divided by it).

    Input: a dict with each term's `name` (level indices, `-1` for a new level at
    inference) and `name + "_z"` (covariates, for terms with slopes), and `"x"`
    `(batch, num_fixed)` when `num_fixed > 0`.

    Output: `(batch, 2)`, mean and variance of each row's contribution.
    """

    def __init__(self, terms, num_fixed=0, num_observations=None, **kwargs):
        super().__init__(**kwargs)
        terms = [
            keras.saving.deserialize_keras_object(t) if isinstance(t, dict) else t for t in terms
        ]
        if not terms:
            raise ValueError("`terms` must hold at least one RandomEffects layer.")
        for term in terms:
            if not isinstance(term, RandomEffects):
                raise TypeError(f"`terms` must hold RandomEffects layers. Received: {term!r}")
            if term.scale_prior is not None:
                raise ValueError(
                    f"JointRandomEffects: term '{term.name}' has a `scale_prior`; the joint "
                    "posterior supports point-estimated variance components only."
                )
            term.own_posterior = False
        if int(num_fixed) < 0:
            raise ValueError(f"`num_fixed` must be >= 0. Received: num_fixed={num_fixed!r}")
        self.terms = terms
        self.num_fixed = int(num_fixed)
        self.num_observations = None if num_observations is None else int(num_observations)
        self.output_mode = "moments"
        sizes = [t.num_levels * t.num_effects for t in terms]
        self.offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
        self.num_random = int(sum(sizes))
        self.num_coefficients = self.num_random + self.num_fixed

    @property
    def name_keys(self):
        return [t.name for t in self.terms]

    def build(self, input_shape=None):
        for term in self.terms:
            if not term.built:
                term.build()
        k = self.num_coefficients
        self.posterior_mean = self.add_weight(name="posterior_mean", shape=(k,), initializer="zeros")
        self.posterior_scale_tril = self.add_weight(
            name="posterior_scale_tril",
            shape=(k * (k + 1) // 2,),
            initializer=keras.initializers.Constant(self._initial_tril(np.full(k, 0.5))),
        )
        # Units of each coefficient (see RandomEffects.effect_scale); 1 for fixed effects.
        self.coefficient_scale = self.add_weight(
            name="coefficient_scale", shape=(k,), initializer="ones", trainable=False
        )

    def _initial_tril(self, sd):
        """Unconstrained packing of `diag(sd)` (softplus on the diagonal)."""
        with tf.init_scope():
            raw = np.diag(np.log(np.expm1(np.asarray(sd, "float64"))))
            return tfp.math.fill_triangular_inverse(raw).numpy()

    def reset_posterior(self, fixed_mean=None, fixed_sd=None):
        """Restarts `q` from the terms' current effect scales (used before fitting).

        Random effects start at mean 0 with half their prior sd; fixed effects at
        `fixed_mean` (e.g. a GLM fit) with sd `fixed_sd`.
        """
        if not self.built:
            self.build()
        scale = np.concatenate(
            [np.tile(np.asarray(t.effect_scale), t.num_levels) for t in self.terms]
            + [np.ones(self.num_fixed)]
        )
        self.coefficient_scale.assign(scale)
        mean = np.zeros(self.num_coefficients)
        sd = np.full(self.num_coefficients, 0.5)
        if self.num_fixed:
            if fixed_mean is not None:
                mean[self.num_random:] = fixed_mean
            if fixed_sd is not None:
                sd[self.num_random:] = fixed_sd
        self.posterior_mean.assign(mean)
        self.posterior_scale_tril.assign(self._initial_tril(sd))

    # -------------------------------------------------------------- posterior
    def _posterior(self):
        """`(mu, L)` in the data's units."""
        scale = tf.convert_to_tensor(self.coefficient_scale)
        tril = tfp.math.fill_triangular(self.posterior_scale_tril)
        tril = tf.linalg.set_diag(tril, tf.nn.softplus(tf.linalg.diag_part(tril)) + 1e-6)
        return self.posterior_mean * scale, tril * scale[:, None]

    def call(self, inputs, training=None):
        mean, tril = self._posterior()
        acc_mean = None
        acc_rows = None
        new_level_var = None
        for term, offset in zip(self.terms, self.offsets):
            args = inputs[term.name]
            if term.num_covariates:
                args = [inputs[term.name], inputs[term.name + "_z"]]
            index, covariates = term._split_inputs(args)
            if term.validate_indices:
                index = term.validated_index(index, training)
            z = term._design(covariates, tf.shape(index)[0])
            known = index >= 0
            # Positions of the row's coefficients in the joint vector: (batch, k).
            pos = offset + tf.maximum(index, 0)[:, None] * term.num_effects + tf.range(
                term.num_effects, dtype=index.dtype
            )
            z_known = tf.where(known[:, None], z, tf.zeros_like(z))
            m = tf.reduce_sum(z_known * tf.gather(mean, pos), axis=-1)
            rows = tf.einsum("bj,bjk->bk", z_known, tf.gather(tril, pos))
            acc_mean = m if acc_mean is None else acc_mean + m
            acc_rows = rows if acc_rows is None else acc_rows + rows
            if not training:
                extra = tf.where(known, tf.zeros_like(m), term.prior_variance(z))
                new_level_var = extra if new_level_var is None else new_level_var + extra
        if self.num_fixed:
            x = tf.cast(inputs["x"], self.compute_dtype)
            acc_mean += tf.linalg.matvec(x, mean[self.num_random:])
            acc_rows += tf.matmul(x, tril[self.num_random:])
        var = tf.reduce_sum(tf.square(acc_rows), axis=-1)
        if new_level_var is not None:
            var += new_level_var
        if training:
            if self.num_observations is None:
                raise ValueError(
                    f"JointRandomEffects layer '{self.name}' needs `num_observations` "
                    "(the number of training rows) to scale its KL term."
                )
            self.add_loss(self.total_kl() / self.num_observations)
        return tf.stack([acc_mean, var], axis=-1)

    # --------------------------------------------------------------------- KL
    def total_kl(self):
        """`E_q[log q] - E_q[log p]` of all coefficients (flat prior on the fixed ones).

        ```
        KL = 1/2 [tr(P^-1 S_bb) + mu_b' P^-1 mu_b - K_b + log|P| - log|S|] - K_beta/2 log(2 pi e)
        ```
        with `P` block diagonal (`Sigma_t` once per level of term `t`).
        """
        mean, tril = self._posterior()
        total = 0.5 * (-float(self.num_random))
        for term, offset in zip(self.terms, self.offsets):
            k, n = term.num_effects, term.num_levels
            taus, _ = term._scale_nodes()
            prior_tril = taus[0][:, None] * term._prior_correlation_tril()
            prior_inv = tf.linalg.triangular_solve(prior_tril, tf.eye(k, dtype=prior_tril.dtype))
            rows = tf.reshape(tril[offset:offset + n * k], [n, k, -1])
            mu = tf.reshape(mean[offset:offset + n * k], [n, k])
            total += 0.5 * tf.reduce_sum(tf.square(tf.einsum("ij,njk->nik", prior_inv, rows)))
            total += 0.5 * tf.reduce_sum(tf.square(tf.einsum("ij,nj->ni", prior_inv, mu)))
            total += n * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(prior_tril)))
        total -= tf.reduce_sum(tf.math.log(tf.linalg.diag_part(tril)))
        total -= 0.5 * self.num_fixed * np.log(2 * np.pi * np.e)
        return total

    # ---------------------------------------------------------------- results
    def _term_slice(self, term):
        i = self.terms.index(term) if isinstance(term, RandomEffects) else self.name_keys.index(term)
        t = self.terms[i]
        return t, self.offsets[i], t.num_levels * t.num_effects

    def conditional_mean(self, term):
        """Posterior means of a term's effects, `(num_levels, k)`."""
        t, offset, size = self._term_slice(term)
        mean, _ = self._posterior()
        return tf.reshape(mean[offset:offset + size], [t.num_levels, t.num_effects]).numpy()

    def conditional_covariance(self, term):
        """Posterior covariance of each level's effects, `(num_levels, k, k)`."""
        t, offset, size = self._term_slice(term)
        _, tril = self._posterior()
        rows = tf.reshape(tril[offset:offset + size], [t.num_levels, t.num_effects, -1])
        return tf.matmul(rows, rows, transpose_b=True).numpy()

    def conditional_stddev(self, term):
        return np.sqrt(np.diagonal(self.conditional_covariance(term), axis1=-2, axis2=-1))

    def fixed_posterior(self):
        """Mean `(p,)` and covariance `(p, p)` of the fixed effects (when included)."""
        if not self.num_fixed:
            raise ValueError("This JointRandomEffects layer holds no fixed effects (num_fixed=0).")
        mean, tril = self._posterior()
        rows = tril[self.num_random:]
        return mean[self.num_random:].numpy(), tf.matmul(rows, rows, transpose_b=True).numpy()

    def compute_output_shape(self, input_shape):
        return (None, 2)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "terms": [keras.saving.serialize_keras_object(t) for t in self.terms],
                "num_fixed": self.num_fixed,
                "num_observations": self.num_observations,
            }
        )
        return config
