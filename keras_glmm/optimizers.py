"""Optimizers whose cost per step does not grow with the number of random-effect levels.

Keras 3's `Adam` updates both moment estimates of a whole variable every step, also
when the gradient is a `tf.IndexedSlices` that touches a handful of rows (keras
#19992): a random-effects table of 10M levels then costs 10M-row work per step.
`SparseAdam` is the "lazy" Adam of TensorFlow Addons and PyTorch's `SparseAdam`:
for a sparse gradient it reads, updates and writes back only the rows present in
the batch; dense gradients get the ordinary Adam update. With every row in every
step (full-batch fits) the two are identical.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm import compat
from keras_glmm.transforms import softplus_inverse


@keras.saving.register_keras_serializable(package="keras_glmm")
class SparseAdam(keras.optimizers.Adam):
    """Adam with row-wise ("lazy") updates for sparse gradients.

    For a gradient `g` given as `tf.IndexedSlices` over rows `R` of a variable, only
    rows `R` of the variable and of its moments change:

    ```
    m[R] <- beta_1 m[R] + (1 - beta_1) g[R]
    v[R] <- beta_2 v[R] + (1 - beta_2) g[R]^2
    w[R] <- w[R] - lr_t m[R] / (sqrt(v[R]) + epsilon)
    ```

    with the usual bias correction `lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)`
    taken at the global step `t`. Rows absent from a batch keep their moments (they
    are not decayed), which is what makes the step cost independent of the table size.

    With `natural_step` set, a sparse gradient of a variable that carries a
    `natural_gradient` preconditioner (the `posterior` table of a `RandomEffects`
    layer) takes a plain step along the natural gradient instead,
    `w[R] <- w[R] - natural_step * B * (lr / lr_0) * F^-1 g[R]` for a batch of `B`
    rows, scattered row by row without summing duplicates first (it is linear in
    the gradient): the step that minibatch fits use for the random effects.

    Args:
        natural_step: None, or the natural-gradient step size (1.0: an epoch's steps
            add up to one Newton step of every level's posterior mean).
        Others: as `keras.optimizers.Adam` (amsgrad is not supported).

    Example:

    >>> opt = SparseAdam(learning_rate=0.05)
    """

    def __init__(self, *args, natural_step=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("`SparseAdam` does not support `amsgrad=True`.")
        if natural_step is not None and not float(natural_step) > 0:
            raise ValueError(f"`natural_step` must be positive. Received: natural_step={natural_step}")
        self.natural_step = None if natural_step is None else float(natural_step)
        lr = kwargs.get("learning_rate", args[0] if args else 0.001)
        # The natural step anneals with a float learning rate (not with a schedule).
        self._initial_learning_rate = float(lr) if isinstance(lr, (int, float)) else None

    def get_config(self):
        config = super().get_config()
        config["natural_step"] = self.natural_step
        return config

    def _natural_update(self, gradient, variable, learning_rate, keras_variable):
        """Natural-gradient SGD on random-effect posteriors (see the class docstring)."""
        dtype = variable.dtype
        # The loss is a mean over the batch's rows: B times its gradient is the
        # batch's share of the ELBO's, and `natural_step` = 1 makes an epoch's steps
        # add up to one Newton step of every level's posterior mean.
        batch = tf.cast(tf.shape(gradient.indices)[0], dtype)
        step = tf.constant(self.natural_step, dtype)
        if self._initial_learning_rate:
            # Anneal with the learning rate (ELBOConvergence lowers it on plateaus).
            step = step * tf.cast(learning_rate, dtype) / self._initial_learning_rate
        # The preconditioned gradient is linear in the gradient: each of a level's
        # rows can be scattered as it is (the scatter adds duplicates), without the
        # unique/segment-sum that the Adam path needs.
        rows = gradient.indices
        update = keras_variable.natural_gradient(rows, tf.cast(gradient.values, dtype))
        self.assign_sub(variable, tf.IndexedSlices(step * batch * update, rows))

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        # The backend passes the underlying tf.Variable; the Keras variable that
        # carries the layer's preconditioner is the optimizer's own entry.
        keras_variable = compat.optimizer_variable(self, variable)
        if self.natural_step is not None and hasattr(keras_variable, "natural_gradient"):
            return self._natural_update(gradient, variable, learning_rate, keras_variable)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        # The same arithmetic as Adam's: Python-float (1 - beta) factors, so a
        # float64 table gets the exact update, not one with float32-rounded betas.
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)

        # A batch names a level once per row: sum duplicate rows first, so each
        # level gets one moment update with its whole gradient.
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(
            tf.cast(gradient.values, dtype), position, tf.shape(rows)[0]
        )
        m, v = compat.adam_moments(self, variable)
        # Read the slots' rows through their resource variables: converting a Keras
        # variable to a tensor would copy the whole table every step.
        m_old = tf.gather(m.value, rows)
        v_old = tf.gather(v.value, rows)
        m_rows = m_old + (grad - m_old) * (1 - self.beta_1)
        v_rows = v_old + (tf.square(grad) - v_old) * (1 - self.beta_2)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        step_rows = (m_rows * alpha) / (tf.sqrt(v_rows) + self.epsilon)
        self.assign_sub(variable, tf.IndexedSlices(step_rows, rows))


def random_effect_layer(variable):
    """The `RandomEffects` layer whose `posterior` table `variable` is, or None."""
    method = getattr(variable, "natural_gradient", None)
    return getattr(method, "__self__", None)


def check_adapted(layers):
    """Raises a clear error for a random-effects layer whose level counts were never set.

    Each row's share of its level's KL is `KL_c / n_c`: with no counts the KL is
    weighed as if every level had one row, and the fit is not the ELBO's.
    """
    for layer in layers:
        if layer is None or not layer.built:
            continue
        with tf.init_scope():  # read the counts' value also while a step is traced
            total = float(np.sum(keras.ops.convert_to_numpy(layer.level_counts)))
        if total <= 0:
            raise ValueError(
                f"RandomEffects layer '{layer.name}' was never adapted to its level counts: call "
                f"`layer.adapt(level_index)` on the training rows' level indices (or pass "
                f"`level_counts=`) before fitting. Each row carries KL_c / n_c of its level's KL, "
                f"which needs n_c."
            )


@keras.saving.register_keras_serializable(package="keras_glmm")
class NaturalGradient(keras.optimizers.Optimizer):
    """Natural-gradient steps for random-effect posteriors, any optimizer for the rest.

    Wraps the optimizer that trains a model's other weights (a network, the
    dispersion, the prior sds when they have no M-step): every `posterior` table of
    a `RandomEffects` layer (the levels' Gaussian posteriors) is instead moved by
    stochastic natural-gradient steps, and every other variable by
    `optimizer.apply` unchanged (its own schedule, clipping, weight decay, EMA).

    For a random intercept (one effect per level) the step is stochastic
    variational inference in the natural parameters (Hoffman et al. 2013; Khan &
    Lin 2017): with `B` rows in the batch and the loss a mean over them,

    ```
    precision_c <- precision_c + rho * B * dLoss/ds_c / s_c       (s_c: posterior sd)
    mu_c        <- mu_c - rho * s_c_new^2 * B * dLoss/dmu_c
    ```

    summed over the batch's rows of level `c`, `rho = natural_step * lr / lr_0`.
    An epoch of steps with `rho = 1` adds up to the level's exact posterior
    precision (the Gaussian case) whatever its starting value, and moves the mean by
    one Newton step: no Laplace start is needed, and the precision stays positive.
    Terms with several effects per level take Tan's (2021) natural-gradient step of
    the Cholesky factor (`RandomEffects.natural_gradient`), which needs a posterior
    near its Laplace value to start (`GLMM.fit` sets it).

    The point-estimated prior sds and correlations of those layers are left to the
    exact M-step of `kg.VarianceUpdate` at each epoch's end (gradient steps between
    epochs would undo its over-relaxation): fit with that callback
    (`kg.composition.fit_callbacks()`; `GLMM.fit` adds it). Sds with a hyperprior
    (`scale_prior`) are trained by the inner optimizer.

    The step is calibrated when the loss is the negative ELBO per row: a per-row
    mean of the negative expected log-likelihood (`kg.losses`) plus the layers' KL
    (their `add_loss`, which `adapt` scales). The first step checks, before any
    update, that every random-effects layer was adapted.

    Args:
        optimizer: the optimizer of the other weights (default `keras.optimizers.Adam(1e-3)`).
        natural_step: the step `rho` at the inner optimizer's initial learning rate;
            it shrinks in proportion when the learning rate is lowered (e.g. by
            `ELBOConvergence` on plateaus), which averages out minibatch noise.

    `learning_rate` and `iterations` are the inner optimizer's.

    Example:

    >>> model.compile(optimizer=kg.NaturalGradient(keras.optimizers.Adam(1e-3)),
    ...               loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
    """

    def __init__(self, optimizer=None, natural_step=1.0, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"NaturalGradient takes `optimizer` and `natural_step`; set other options on the "
                f"inner optimizer. Received: {sorted(kwargs)}"
            )
        super().__init__(learning_rate=0.0, name=name)
        if optimizer is None:
            optimizer = keras.optimizers.Adam(1e-3)
        elif isinstance(optimizer, (str, dict)):
            optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"`optimizer` must be a Keras optimizer. Received: {optimizer!r}")
        if isinstance(optimizer, NaturalGradient):
            raise TypeError("NaturalGradient cannot wrap another NaturalGradient.")
        if not float(natural_step) > 0:
            raise ValueError(f"`natural_step` must be positive. Received: natural_step={natural_step}")
        self.inner_optimizer = optimizer
        self.natural_step = float(natural_step)
        lr = optimizer.get_config().get("learning_rate")  # a schedule's config is a dict
        self._initial_learning_rate = None if isinstance(lr, dict) or lr is None else float(lr)

    # ------------------------------------------------------------ the parts
    @staticmethod
    def _is_table(variable):
        return hasattr(variable, "natural_gradient")

    def _priors(self, var_list):
        """Ids of the point-estimated prior sds and correlations of the tables' layers."""
        ids = set()
        for v in var_list:
            layer = random_effect_layer(v) if self._is_table(v) else None
            if layer is not None and layer.scale_prior is None:
                ids.add(id(layer.log_scale))
                if layer.num_correlations:
                    ids.add(id(layer.correlation))
        return ids

    def build(self, var_list):
        var_list = list(var_list)
        tables = [v for v in var_list if self._is_table(v)]
        priors = self._priors(var_list)
        rest = [v for v in var_list if not self._is_table(v) and id(v) not in priors]
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(rest)
        super().build(tables)

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = (compat.built_variables(self)
                                   + compat.built_variables(self.inner_optimizer))
        grads, trainable_variables = list(grads), list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        priors = self._priors(trainable_variables)
        tables = [(g, v) for g, v in zip(grads, trainable_variables) if self._is_table(v)]
        rest = [(g, v) for g, v in zip(grads, trainable_variables)
                if not self._is_table(v) and id(v) not in priors]
        if not getattr(self, "_adapted_checked", False):
            # Once (when the first step is traced), before any update.
            check_adapted(random_effect_layer(v) for _, v in tables)
            self._adapted_checked = True
        if rest:
            self.inner_optimizer.apply([g for g, _ in rest], [v for _, v in rest])
        if tables:
            super().apply([g for g, _ in tables], [v for _, v in tables])

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(
            [v for v in var_list if not self._is_table(v)])

    # ------------------------------------------------------------- the step
    def _step(self, dtype):
        step = tf.constant(self.natural_step, dtype)
        if self._initial_learning_rate:
            lr = tf.cast(self.inner_optimizer.learning_rate, dtype)
            step = step * lr / self._initial_learning_rate
        return step

    def update_step(self, gradient, variable, learning_rate):
        keras_variable = compat.optimizer_variable(self, variable)
        layer = random_effect_layer(keras_variable)
        dtype = variable.dtype
        if not isinstance(gradient, tf.IndexedSlices):
            raise ValueError(
                f"NaturalGradient: the gradient of RandomEffects layer '{layer.name}' is dense; its "
                "steps need the sparse gradient of the rows the batch gathered (one row per "
                "observation). Do not clip or transform gradients of the posterior tables."
            )
        # The loss is a mean over the batch's rows: B times its gradient is the batch's
        # share of the ELBO's (one gathered table row per observation).
        batch = tf.cast(tf.shape(gradient.indices)[0], dtype)
        step = self._step(dtype)
        values = tf.cast(gradient.values, dtype)
        if layer.num_effects != 1:
            # Tan's Cholesky step (linear in the gradient: scattered row by row).
            update = layer.natural_gradient(gradient.indices, values)
            self.assign_sub(variable, tf.IndexedSlices(step * batch * update, gradient.indices))
            return
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(values, position, tf.shape(rows)[0]) * batch
        old = tf.gather(variable, rows)
        mean, raw = old[:, 0], old[:, 1]
        sd = tf.nn.softplus(raw) + 1e-6  # in units of effect_scale
        grad_sd = grad[:, 1] / tf.sigmoid(raw)
        precision = 1.0 / tf.square(sd)
        # The precision falls at most 4-fold per step: a safeguard for curvature that
        # is not log-concave (log-concave families keep it positive anyway).
        new_precision = tf.maximum(precision + step * grad_sd / sd, 0.25 * precision)
        new_sd = tf.math.rsqrt(new_precision)
        new_mean = mean - step * tf.square(new_sd) * grad[:, 0]
        new_raw = softplus_inverse(tf.maximum(new_sd - 1e-6, 1e-12))
        self.assign(variable, tf.IndexedSlices(tf.stack([new_mean, new_raw], axis=-1), rows))

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "natural_step": self.natural_step,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, **config)
