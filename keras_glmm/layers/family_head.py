"""The distribution head: linear predictor -> the response distribution's parameters."""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm import families as families_lib


@keras.saving.register_keras_serializable(package="keras_glmm")
class FamilyHead(keras.layers.Layer):
    """Maps the linear predictor's posterior moments to the response's parameters.

    The head owns the family's dispersion parameters (gaussian residual sd `scale`,
    negative binomial `dispersion`, gamma `shape`), learned on the log scale so they
    stay positive, or held fixed (the TFP tutorial fixes the gaussian scale at 1).
    It returns tensors, not a distribution: the loss builds the `tfp` distribution
    from them (`Family.expected_log_prob`), which keeps the layer saveable.

    Args:
        family: a family name (`"gaussian"`, `"binomial"`, `"poisson"`,
            `"negative_binomial"`, `"gamma"`) or a `keras_glmm.families.Family`.
        link: optional link name; the family's canonical link by default.
        fixed_params: dict of dispersion parameters held fixed, e.g. `{"scale": 1.0}`.
        initial_params: dict of initial values of the learned ones.

    Input: `(batch, 2)`, the mean and variance of each row's linear predictor.

    Output: a dict of `(batch,)` tensors: `eta` (linear predictor), `eta_var` (its
    posterior variance), `mean` (the response mean at `eta`: a probability for the
    binomial) and one entry per dispersion parameter.

    Example:

    >>> head = FamilyHead("gaussian")
    >>> out = head(np.zeros((3, 2), "float32"))   # out["scale"], out["mean"], ...
    """

    def __init__(self, family="gaussian", link=None, fixed_params=None, initial_params=None, **kwargs):
        super().__init__(**kwargs)
        self.family = families_lib.get_family(family, link=link)
        self.link = self.family.link.name
        names = self.family.dispersion_params
        for arg, values in (("fixed_params", fixed_params), ("initial_params", initial_params)):
            for key, value in (values or {}).items():
                if key not in names:
                    raise ValueError(
                        f"`{arg}` names '{key}', which family '{self.family.name}' does not "
                        f"have. Its dispersion parameters: {list(names)}."
                    )
                if not (np.isfinite(value) and value > 0):
                    raise ValueError(f"`{arg}['{key}']` must be positive and finite. Received: {value!r}")
        self.fixed_params = {k: float(v) for k, v in (fixed_params or {}).items()}
        self.initial_params = {k: float(v) for k, v in (initial_params or {}).items()}

    def build(self, input_shape=None):
        self.log_params = {}
        for name in self.family.dispersion_params:
            if name in self.fixed_params:
                continue
            self.log_params[name] = self.add_weight(
                name=f"log_{name}",
                shape=(),
                initializer=keras.initializers.Constant(np.log(self.initial_params.get(name, 1.0))),
            )

    def params(self):
        """The dispersion parameters as scalar tensors, by name."""
        out = {}
        for name in self.family.dispersion_params:
            if name in self.fixed_params:
                out[name] = tf.constant(self.fixed_params[name], self.compute_dtype)
            else:
                out[name] = tf.exp(tf.cast(self.log_params[name], self.compute_dtype))
        return out

    def set_params(self, values):
        """Sets learned dispersion parameters (e.g. to data-driven initial values)."""
        for name, value in values.items():
            if name in self.log_params:
                self.log_params[name].assign(np.log(value))

    def call(self, moments):
        moments = tf.cast(moments, self.compute_dtype)
        eta, eta_var = tf.unstack(moments, axis=-1)
        out = {"eta": eta, "eta_var": eta_var, "mean": self.family.mean(eta)}
        for name, value in self.params().items():
            out[name] = tf.broadcast_to(value, tf.shape(eta))
        return out

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0],)
        keys = ["eta", "eta_var", "mean", *self.family.dispersion_params]
        return {k: shape for k in keys}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "family": self.family.name,
                "link": self.link,
                "fixed_params": self.fixed_params,
                "initial_params": self.initial_params,
            }
        )
        return config
