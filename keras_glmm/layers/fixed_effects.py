"""Fixed effects with a Gaussian variational posterior (point estimates: `keras.layers.Dense`)."""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm.transforms import softplus_inverse

OUTPUT_MODES = ("sample", "mean", "moments")


@keras.saving.register_keras_serializable(package="keras_glmm")
class VariationalFixedEffects(keras.layers.Layer):
    """A linear predictor `x' beta` with a mean-field Gaussian posterior over `beta`.

    ```
    beta_j ~ N(0, prior_scale^2)                      (prior)
    q(beta_j) = N(m_j, s_j^2)                         (posterior)
    x_i' beta ~ N(x_i' m, sum_j x_ij^2 s_j^2)        under q
    ```

    This is the TFP tutorial's treatment of the intercept and the floor effect
    (`Normal(0, 1)` priors). For lme4's point estimates use `keras.layers.Dense(1)`.
    The KL divergence, `sum_j KL(q(beta_j) || p(beta_j))`, is global: it is added
    divided by `num_observations`, the number of training rows, so that it is a
    per-observation share of the negative ELBO like the data loss beside it.

    Args:
        num_observations: number of training rows (the KL is divided by it).
            `GLMM` sets it when fitting; standalone users pass it.
        prior_scale: standard deviation of the Normal prior of each coefficient.
        use_bias: add an intercept coefficient (with the same prior).
        output_mode: `"sample"` (a reparameterized draw in training, the mean at
            inference), `"mean"`, or `"moments"` (`(batch, 2)`: mean and variance).

    Input: `(batch, num_features)` float. Output: `(batch, 1)` or `(batch, 2)`.

    Example:

    >>> fixed = VariationalFixedEffects(num_observations=919, prior_scale=1.0)
    >>> out = fixed(np.ones((4, 2), "float32"))
    """

    def __init__(
        self,
        num_observations=None,
        prior_scale=1.0,
        use_bias=False,
        output_mode="sample",
        **kwargs,
    ):
        if not float(prior_scale) > 0:
            raise ValueError(
                f"`prior_scale` must be positive. Received: prior_scale={prior_scale!r}"
            )
        if num_observations is not None and int(num_observations) <= 0:
            raise ValueError(
                "`num_observations` must be a positive integer. "
                f"Received: num_observations={num_observations!r}"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"`output_mode` must be one of {OUTPUT_MODES}. Received: output_mode={output_mode!r}"
            )
        super().__init__(**kwargs)
        self.num_observations = None if num_observations is None else int(num_observations)
        self.prior_scale = float(prior_scale)
        self.use_bias = bool(use_bias)
        self.output_mode = output_mode

    def build(self, input_shape):
        num_features = int(input_shape[-1]) + int(self.use_bias)
        self.num_features = num_features
        self.kernel_mean = self.add_weight(
            name="kernel_mean", shape=(num_features,), initializer="zeros"
        )
        self.kernel_raw_scale = self.add_weight(
            name="kernel_raw_scale",
            shape=(num_features,),
            initializer=keras.initializers.Constant(softplus_inverse(0.1)),
        )

    def _design(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        if self.use_bias:
            x = tf.concat([tf.ones_like(x[:, :1]), x], axis=-1)
        return x

    def kernel_stddev(self):
        return tf.nn.softplus(self.kernel_raw_scale) + 1e-6

    def call(self, inputs, training=None):
        x = self._design(inputs)
        mean = tf.linalg.matvec(x, self.kernel_mean)
        var = tf.linalg.matvec(tf.square(x), tf.square(self.kernel_stddev()))
        if training:
            if self.num_observations is None:
                raise ValueError(
                    f"VariationalFixedEffects layer '{self.name}' needs `num_observations` "
                    "(the number of training rows) to scale its KL term."
                )
            self.add_loss(self.total_kl() / self.num_observations)
        if self.output_mode == "moments":
            return tf.stack([mean, var], axis=-1)
        if self.output_mode == "sample" and training:
            noise = tf.random.normal(tf.shape(mean), dtype=mean.dtype)
            return (mean + tf.sqrt(var) * noise)[:, None]
        return mean[:, None]

    def total_kl(self):
        """`sum_j KL(N(m_j, s_j^2) || N(0, prior_scale^2))` (closed form)."""
        s = self.kernel_stddev()
        p = tf.constant(self.prior_scale, s.dtype)
        return tf.reduce_sum(
            tf.math.log(p / s) + (tf.square(s) + tf.square(self.kernel_mean)) / (2 * p * p) - 0.5
        )

    def set_coefficients(self, values):
        """Sets the posterior means (e.g. to a GLM fit) in design-column order."""
        self.kernel_mean.assign(np.asarray(values, dtype=self.kernel_mean.dtype).reshape(-1))

    def coefficients(self):
        """Posterior means and standard deviations, each `(num_features,)`."""
        return self.kernel_mean.numpy(), self.kernel_stddev().numpy()

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 if self.output_mode == "moments" else 1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_observations": self.num_observations,
                "prior_scale": self.prior_scale,
                "use_bias": self.use_bias,
                "output_mode": self.output_mode,
            }
        )
        return config


def is_network(layer):
    """Whether a GLMM's fixed part is a network (anything but `Dense` / `VariationalFixedEffects`)."""
    return not isinstance(layer, (keras.layers.Dense, VariationalFixedEffects))
