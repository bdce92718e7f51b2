"""The random effects of one grouping factor, as a Keras layer holding their posterior."""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm.layers.level_index import LevelIndex
from keras_glmm.layers.level_posterior import LevelPosterior
from keras_glmm.layers.table import TableColumns, gather_rows
from keras_glmm.layers.variance_components import VarianceComponents
from keras_glmm.transforms import softplus_inverse

__all__ = ["COVARIANCES", "OUTPUT_MODES", "RandomEffects", "TableColumns", "gather_rows"]

OUTPUT_MODES = ("sample", "mean", "moments")
COVARIANCES = ("full", "diagonal")


@keras.saving.register_keras_serializable(package="keras_glmm")
class RandomEffects(LevelIndex, LevelPosterior, VarianceComponents, keras.layers.Layer):
    """Random effects of one grouping factor with a Gaussian variational posterior.

    For a grouping factor with `num_levels` levels and `num_effects` effects per level
    (an intercept and/or slopes on covariates), row `i` in level `g(i)` with random-effect
    design row `z_i` gets the contribution `z_i' b_{g(i)}` to its linear predictor:

    ```
    b_c ~ N(0, Sigma),   Sigma = diag(tau) Omega diag(tau)          (prior)
    q(b_c) = N(mu_c, L_c L_c'),  L_c lower triangular               (posterior)
    z_i' b_{g(i)} ~ N(z_i' mu_{g(i)},  |L_{g(i)}' z_i|^2)   under q
    ```

    `tau` are the standard deviations, `Omega` the correlation matrix (lme4's
    `(x | g)`, `covariance="full"`), or the identity (lme4's `(x || g)`,
    `covariance="diagonal"`). Each level's posterior has a full covariance, so for a
    single grouping factor with point-estimated `Sigma` it holds the exact conditional
    posterior of a Gaussian model and the ELBO equals the marginal likelihood at the
    optimum (lme4's maximum-likelihood fit).

    `Sigma` is point-estimated by default (empirical Bayes). With `scale_prior=s` the
    standard deviations get a `HalfNormal(s)` hyperprior and a Softplus-Normal
    variational posterior of their own (as TFP's GLMM tutorial does for its county
    scale); `Omega` stays a point estimate.

    **The KL term.** The layer adds `KL(q || p)` as a loss, attributed to rows: a
    row of level `c` carries `KL_c / n_c`, with `n_c` the level's number of training
    rows (set by `adapt`). Averaged over a batch, this is an unbiased estimate of
    `sum_c KL_c / N`, the KL per observation, so that a data loss that is a mean
    negative log-likelihood per row plus this loss is the negative ELBO per
    observation. A step touches only the levels in its batch: the cost of a step and
    the gradient (a sparse `tf.IndexedSlices` over the table's rows) do not grow
    with `num_levels`.

    Args:
        num_levels: positive int, the number of levels of the grouping factor.
        num_effects: positive int, effects per level. With `intercept=True` the
            first is the intercept and the layer takes `num_effects - 1` covariate
            columns; with `intercept=False` it takes `num_effects` columns.
        intercept: whether the first effect is a random intercept.
        covariance: `"full"` (correlated effects) or `"diagonal"`.
        scale_prior: `None` for a point estimate of the standard deviations, or the
            scale of a `HalfNormal` hyperprior on each of them.
        effect_scale: float or list of `num_effects` floats, the typical magnitude
            of each effect. Weights are stored divided by it, so that an optimizer
            step means the same for every effect whatever the units of the data
            (`GLMM` sets it from the data). It also sets the initial prior sd.
        output_mode: `"sample"` (a reparameterized draw of `z_i' b_{g(i)}` in
            training, its mean at inference: for use beside arbitrary layers),
            `"mean"` (always the mean) or `"moments"` (a `(batch, 2)` tensor of
            mean and variance, used by `GLMM` for its closed-form ELBO).
        num_scale_points: Gauss-Hermite points per standard deviation for the
            expectations over `q(tau)` when `scale_prior` is set (a product grid,
            so `num_scale_points ** num_effects` nodes): the ELBO stays
            deterministic, with no Monte Carlo noise to confuse convergence.
        validate_indices: check in training that every level index lies in
            `[0, num_levels)` and fail with a clear error otherwise.
        level_counts: optional training-row counts per level (else call `adapt`).
        vocabulary: optional list of level names (strings): the layer then also
            takes level names, looked up in the graph (a name not in it is a new
            level, index -1), as a `keras.layers.StringLookup` would; a saved or
            exported model keeps it. `num_levels` may then be None (its length).
            `adapt` on strings learns it (sorted) when none was given.

    Input: the level index of each row, shape `(batch,)` (int; at inference `-1`
    marks a level never seen in training, whose effect is then 0 in the mean with
    the prior's variance, as lme4's `allow.new.levels`), alone when the
    layer has only an intercept, else `[level_index, covariates]` with covariates of
    shape `(batch, num_effects - intercept)`.

    Output: `(batch, 1)`, or `(batch, 2)` in `"moments"` mode.

    Example:

    >>> county = RandomEffects(num_levels=85)
    >>> county.adapt(county_code)                      # level counts for the KL
    >>> out = county(keras.ops.convert_to_tensor(county_code))
    """

    def __init__(
        self,
        num_levels=None,
        num_effects=1,
        intercept=True,
        covariance="full",
        scale_prior=None,
        effect_scale=1.0,
        output_mode="sample",
        num_scale_points=12,
        validate_indices=True,
        level_counts=None,
        vocabulary=None,
        **kwargs,
    ):
        if vocabulary is not None:
            vocabulary = [str(v) for v in np.asarray(vocabulary, dtype=object).reshape(-1)]
            if len(set(vocabulary)) != len(vocabulary):
                raise ValueError("`vocabulary` holds a level name more than once.")
            if num_levels is None:
                num_levels = len(vocabulary)
            elif len(vocabulary) > num_levels:
                raise ValueError(
                    f"`vocabulary` has {len(vocabulary)} names but num_levels={num_levels}."
                )
        if not isinstance(num_levels, (int, np.integer)) or num_levels <= 0:
            raise ValueError(
                "`num_levels` must be a positive integer. "
                f"Received: num_levels={num_levels!r}"
            )
        if not isinstance(num_effects, (int, np.integer)) or num_effects <= 0:
            raise ValueError(
                "`num_effects` must be a positive integer. "
                f"Received: num_effects={num_effects!r}"
            )
        if covariance not in COVARIANCES:
            raise ValueError(
                f"`covariance` must be one of {COVARIANCES}. Received: covariance={covariance!r}"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"`output_mode` must be one of {OUTPUT_MODES}. Received: output_mode={output_mode!r}"
            )
        if scale_prior is not None and not float(scale_prior) > 0:
            raise ValueError(
                "`scale_prior` must be None or a positive HalfNormal scale. "
                f"Received: scale_prior={scale_prior!r}"
            )
        effect_scale = np.broadcast_to(np.asarray(effect_scale, dtype="float64"), (num_effects,))
        if not np.all(np.isfinite(effect_scale) & (effect_scale > 0)):
            raise ValueError(
                "`effect_scale` must be positive and finite. "
                f"Received: effect_scale={effect_scale.tolist()}"
            )
        super().__init__(**kwargs)
        self.num_levels = int(num_levels)
        self.num_effects = int(num_effects)
        self.intercept = bool(intercept)
        self.covariance = covariance
        self.scale_prior = None if scale_prior is None else float(scale_prior)
        self.effect_scale = [float(s) for s in effect_scale]
        self.output_mode = output_mode
        self.num_scale_points = int(num_scale_points)
        self.validate_indices = bool(validate_indices)
        self._initial_level_counts = level_counts
        self.vocabulary = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        self.num_covariates = self.num_effects - int(self.intercept)
        self.num_correlations = (
            self.num_effects * (self.num_effects - 1) // 2 if covariance == "full" else 0
        )

    # ------------------------------------------------------------------ build
    def build(self, input_shape=None):
        k = self.num_effects
        scale = np.asarray(self.effect_scale)
        # One row per level: the posterior mean (k), then the Cholesky factor of the
        # posterior covariance as an unconstrained vector (softplus on the
        # diagonal), both in units of `effect_scale`. One table, not two: a step
        # then gathers and scatters each level's row once (a scatter of 65,536
        # one-wide rows costs about as much as one of two-wide rows).
        self.posterior = self.add_weight(
            name="posterior",
            shape=(self.num_levels, k + k * (k + 1) // 2),
            initializer=keras.initializers.Constant(np.tile(self._initial_row(), (self.num_levels, 1))),
        )
        # The optimizer finds the preconditioner through the variable.
        self.posterior.natural_gradient = self.natural_gradient
        if self.scale_prior is None:
            self.log_scale = self.add_weight(
                name="log_scale", shape=(k,), initializer=keras.initializers.Constant(np.log(scale))
            )
        else:
            # q(tau_j) = Softplus(N(loc_j, softplus(raw_j))).
            self.scale_loc = self.add_weight(
                name="scale_loc",
                shape=(k,),
                initializer=keras.initializers.Constant([softplus_inverse(s) for s in scale]),
            )
            self.scale_raw_sd = self.add_weight(
                name="scale_raw_sd",
                shape=(k,),
                initializer=keras.initializers.Constant(softplus_inverse(0.1)),
            )
        if self.num_correlations:
            self.correlation = self.add_weight(
                name="correlation", shape=(self.num_correlations,), initializer="zeros"
            )
        counts = self._initial_level_counts
        self.level_counts = self.add_weight(
            name="level_counts",
            shape=(self.num_levels,),
            initializer=keras.initializers.Constant(0.0 if counts is None else np.asarray(counts)),
            trainable=False,
        )
        # A non-trainable weight, not a constant, so that a data-driven
        # initialization can rescale the layer (`set_effect_scale`) after building.
        self.effect_scale_weight = self.add_weight(
            name="effect_scale",
            shape=(k,),
            initializer=keras.initializers.Constant(scale),
            trainable=False,
        )

    # ----------------------------------------------------------------- inputs
    def _design(self, covariates, batch):
        parts = []
        if self.intercept:
            parts.append(tf.ones((batch, 1), dtype=self.compute_dtype))
        if self.num_covariates:
            parts.append(tf.cast(covariates, self.compute_dtype))
        return tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]

    def _split_inputs(self, inputs):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 1:
                level_index, covariates = inputs[0], None
            elif len(inputs) == 2:
                level_index, covariates = inputs
            else:
                raise ValueError(
                    f"RandomEffects layer '{self.name}' takes `level_index` or "
                    f"`[level_index, covariates]`. Received {len(inputs)} inputs."
                )
        else:
            level_index, covariates = inputs, None
        if self.num_covariates and covariates is None:
            raise ValueError(
                f"RandomEffects layer '{self.name}' has {self.num_covariates} covariate "
                "column(s): call it on `[level_index, covariates]`."
            )
        if covariates is not None and not self.num_covariates:
            raise ValueError(
                f"RandomEffects layer '{self.name}' has no covariates "
                f"(num_effects={self.num_effects}, intercept={self.intercept}) but "
                "received a covariate tensor."
            )
        level_index = tf.reshape(tf.cast(level_index, "int64"), [-1])
        if covariates is not None:
            covariates = tf.reshape(covariates, [-1, self.num_covariates])
            if covariates.shape[-1] is not None and covariates.shape[-1] != self.num_covariates:
                raise ValueError(
                    f"RandomEffects layer '{self.name}' expects {self.num_covariates} "
                    f"covariate column(s). Received shape {covariates.shape}."
                )
        return level_index, covariates

    # ------------------------------------------------------------------ call
    def call(self, inputs, training=None):
        if self.vocabulary is not None:
            levels = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
            if levels.dtype == tf.string:
                index = self.lookup_tensor(levels)
                inputs = [index, inputs[1]] if isinstance(inputs, (list, tuple)) and len(inputs) == 2 else index
        level_index, covariates = self._split_inputs(inputs)
        if self.validate_indices:
            level_index = self.validated_index(level_index, training)
        z = self._design(covariates, tf.shape(level_index)[0])
        known = level_index >= 0
        safe_index = tf.maximum(level_index, 0)
        mean, tril = self._split_row(gather_rows(self.posterior, safe_index))
        if self.num_effects == 1:
            # Elementwise, with reshapes rather than slices (whose gradients are
            # zero-filled tensors); a random intercept (z = 1) needs no product.
            eta_mean, eta_sd = tf.reshape(mean, [-1]), tf.reshape(tril, [-1])
            if not self.intercept:
                eta_mean, eta_sd = z[:, 0] * eta_mean, z[:, 0] * eta_sd
            eta_var = tf.square(eta_sd)
        else:
            eta_mean = tf.reduce_sum(z * mean, axis=-1)
            # Var(z' b) = |L' z|^2 under q(b) = N(mu, L L').
            eta_var = tf.reduce_sum(tf.square(tf.einsum("bj,bjk->bk", z, tril)), axis=-1)
        if not training:
            # A new level (-1): effect 0 on average, with the prior's variance.
            eta_mean = tf.where(known, eta_mean, tf.zeros_like(eta_mean))
            eta_var = tf.where(known, eta_var, self.prior_variance(z))
        if training:
            self.add_loss(self._kl_per_row(safe_index, mean, tril))
        if self.output_mode == "moments":
            return tf.stack([eta_mean, eta_var], axis=-1)
        if self.output_mode == "sample" and training:
            noise = tf.random.normal(tf.shape(eta_mean), dtype=eta_mean.dtype)
            return (eta_mean + tf.sqrt(eta_var) * noise)[:, None]
        return eta_mean[:, None]

    # ---------------------------------------------------------------- keras
    def compute_output_shape(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        ) else input_shape
        return (shape[0], 2 if self.output_mode == "moments" else 1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_levels": self.num_levels,
                "num_effects": self.num_effects,
                "intercept": self.intercept,
                "covariance": self.covariance,
                "scale_prior": self.scale_prior,
                "effect_scale": self.effect_scale,
                "output_mode": self.output_mode,
                "num_scale_points": self.num_scale_points,
                "validate_indices": self.validate_indices,
            }
        )
        if self.vocabulary is not None:
            config["vocabulary"] = list(self.vocabulary)
        return config
