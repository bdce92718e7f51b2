"""The random effects of one grouping factor, as a Keras layer holding their posterior."""

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_probability as tfp

from keras_glmm import gauss_hermite
from keras_glmm.layers import triangular
from keras_glmm.transforms import softplus_inverse

tfd = tfp.distributions
tfb = tfp.bijectors

OUTPUT_MODES = ("sample", "mean", "moments")
COVARIANCES = ("full", "diagonal")


def gather_rows(variable, index):
    """Rows of a Keras variable, read without copying the whole table.

    `tf.gather` on a Keras variable first converts it to a tensor, a read of the
    whole table each step (40 MB at 10M levels); gathering from the underlying
    resource variable reads only the rows (ResourceGather), and its gradient is a
    `tf.IndexedSlices` over them.
    """
    value = getattr(variable, "value", variable)
    return tf.gather(value, index)


class TableColumns:
    """Some columns of a table variable, read and written like a variable of their own.

    A level's posterior lives in one row of one table (`RandomEffects.posterior`),
    so that a step gathers and scatters each level once; `posterior_mean` and
    `posterior_scale_tril` are these views of its columns, for reading results and
    setting starting values outside training steps (`assign` rewrites the table).
    """

    def __init__(self, variable, start, stop):
        self.variable = variable
        self.start, self.stop = int(start), int(stop)

    @property
    def shape(self):
        return (int(self.variable.shape[0]), self.stop - self.start)

    @property
    def dtype(self):
        return self.variable.dtype

    @property
    def value(self):
        """The columns as a tensor."""
        return tf.convert_to_tensor(self.variable)[:, self.start:self.stop]

    def numpy(self):
        return self.variable.numpy()[:, self.start:self.stop]

    def assign(self, value):
        table = self.variable.numpy()
        table[:, self.start:self.stop] = np.broadcast_to(np.asarray(value), self.shape)
        self.variable.assign(table)


def _initial_scale_tril(k, sd=0.5):
    """The unconstrained vector of `sd * I` in `fill_triangular`'s packing."""
    is_diag = triangular.fill_triangular_inverse(np.eye(k)) > 0
    return np.where(is_diag, softplus_inverse(sd), 0.0)


@keras.saving.register_keras_serializable(package="keras_glmm")
class RandomEffects(keras.layers.Layer):
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
            raw_tril[:, idx, idx] = np.log(np.expm1(np.maximum(diag - 1e-6, 1e-12)))
            table[:, k:] = triangular.fill_triangular_inverse(raw_tril)
            self.posterior.assign(table)
        self.effect_scale_weight.assign(new)
        self.effect_scale = [float(s) for s in new]

    # ------------------------------------------------------------ vocabulary
    def set_vocabulary(self, vocabulary):
        """Sets the level names (index `i` is `vocabulary[i]`) and the graph's lookup table."""
        vocabulary = [str(v) for v in vocabulary]
        if len(vocabulary) > self.num_levels:
            raise ValueError(
                f"RandomEffects layer '{self.name}': {len(vocabulary)} level names for "
                f"num_levels={self.num_levels}."
            )
        self.vocabulary = vocabulary
        self._level_index = pd.Index(vocabulary)
        with tf.init_scope():
            self._lookup_table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(vocabulary, tf.string), tf.range(len(vocabulary), dtype=tf.int64)
                ),
                default_value=-1,
            )

    def lookup(self, names):
        """Level indices of level names (numpy; -1 for a name not in the vocabulary)."""
        if self.vocabulary is None:
            raise ValueError(f"RandomEffects layer '{self.name}' has no vocabulary.")
        names = np.asarray(names).astype(str).reshape(-1)
        return self._level_index.get_indexer(names).astype("int64")

    def lookup_tensor(self, names):
        """Level indices of a string tensor, in the graph (-1 for unknown names)."""
        return self._lookup_table.lookup(tf.reshape(names, [-1]))

    # ------------------------------------------------------------ adaptation
    def adapt(self, level_index, sample_weight=None):
        """Counts each level's training rows, which scale the per-row KL.

        Args:
            level_index: integer array of the training rows' level indices, or
                their level names (strings): looked up in the vocabulary, which is
                learned here (the sorted names) when the layer has none.
            sample_weight: optional per-row weights (counted as fractional rows).
        """
        index = np.asarray(level_index).reshape(-1)
        if index.dtype.kind in "OUS":
            names = index.astype(str)
            if self.vocabulary is None:
                learned = np.unique(names)
                if len(learned) > self.num_levels:
                    raise ValueError(
                        f"RandomEffects layer '{self.name}': {len(learned)} level names for "
                        f"num_levels={self.num_levels}."
                    )
                self.set_vocabulary(learned.tolist())
            index = self.lookup(names)
            unknown = np.flatnonzero(index < 0)
            if unknown.size:
                raise ValueError(
                    f"RandomEffects layer '{self.name}': level {names[unknown[0]]!r} in row "
                    f"{int(unknown[0])} is not in the vocabulary ({unknown.size} rows)."
                )
        self._check_index_values(index)
        if not self.built:
            self.build()
        counts = np.bincount(index, weights=sample_weight, minlength=self.num_levels)
        self.level_counts.assign(counts.astype(self.level_counts.dtype))

    def _check_index_values(self, index, allow_new=False):
        if index.size and not np.issubdtype(index.dtype, np.integer):
            raise TypeError(
                f"RandomEffects layer '{self.name}': level indices must be integers. "
                f"Received dtype {index.dtype}."
            )
        bad = np.flatnonzero((index < (-1 if allow_new else 0)) | (index >= self.num_levels))
        if bad.size:
            raise ValueError(
                f"RandomEffects layer '{self.name}': level index {int(index[bad[0]])} in row "
                f"{int(bad[0])} is outside [0, {self.num_levels}) "
                f"({bad.size} rows out of range)."
            )

    # ------------------------------------------------------- the posterior
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

    def prior_variance(self, z):
        """`z' Sigma z` per row, the variance of a new level's contribution."""
        taus, weights = self._scale_nodes()
        tau = tf.tensordot(weights, taus, axes=1)  # E[tau] under a hyperprior
        prior_tril = tau[:, None] * self._prior_correlation_tril()
        return tf.reduce_sum(tf.square(tf.linalg.matvec(prior_tril, z, transpose_a=True)), -1)

    def validated_index(self, level_index, training):
        """Asserts level indices lie in `[0, num_levels)`, or `[-1, ...)` at inference."""
        check = tf.debugging.assert_less(
            level_index,
            tf.constant(self.num_levels, "int64"),
            # No quotes around the name: graph assert messages escape them.
            message=(
                f"RandomEffects layer {self.name}: a level index is >= num_levels="
                f"{self.num_levels} (an unknown level?)"
            ),
        )
        lowest = 0 if training else -1
        check_low = tf.debugging.assert_greater_equal(
            level_index,
            tf.constant(lowest, "int64"),
            message=(
                f"RandomEffects layer {self.name}: a level index is below {lowest} "
                "(-1 marks a new level, allowed only at inference)"
            ),
        )
        with tf.control_dependencies([check, check_low]):
            return tf.identity(level_index)

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

    # ------------------------------------------------------------- results
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

    def conditional_mean(self):
        """Posterior means of every level's effects, `(num_levels, k)` (lme4's ranef)."""
        return self.posterior_mean.numpy() * self._effect_scale.numpy()

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

