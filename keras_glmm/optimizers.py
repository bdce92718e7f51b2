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
import tensorflow as tf


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
        index = self._get_variable_index(variable)
        # The backend passes the underlying tf.Variable; the Keras variable that
        # carries the layer's preconditioner is the optimizer's own entry.
        keras_variable = self._trainable_variables[index]
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
        m = self._momentums[index]
        v = self._velocities[index]
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
