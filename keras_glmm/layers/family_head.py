"""The distribution head: linear predictor -> the response distribution's parameters."""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm import families as families_lib

OUTPUT_MODES = ("dict", "packed")


@keras.saving.register_keras_serializable(package="keras_glmm")
class FamilyHead(keras.layers.Layer):
    """Maps the linear predictor's posterior moments to the response's parameters.

    The head owns the family's dispersion parameters (gaussian residual sd `scale`,
    negative binomial `dispersion`, gamma `shape`), learned on the log scale so they
    stay positive, or held fixed (the TFP tutorial fixes the gaussian scale at 1).
    A zero-inflated family's `zi_odds` is one of them (a constant zero-inflation
    probability), or, with `zi_covariates=True` (glmmTMB's `ziformula` with
    covariates), comes per row from the model: `call(..., zi_logit=...)`,
    `zi_odds_i = exp(zi_logit_i)`, the odds of `pi_i`.
    It returns tensors, not a distribution: the loss builds the `tfp` distribution
    from them (`Family.expected_log_prob`), which keeps the layer saveable.

    In a Keras model of your own, the head ends the model and a
    `kg.losses.NegativeExpectedLogLikelihood` of the same family is its loss: the
    compiled loss (a mean over rows of `-E_q[log p(y_i | eta_i)]`) plus the
    random-effects layers' KL (their `add_loss`) is then the negative ELBO per
    row, with the dispersion learned by the optimizer.

    Args:
        family: a family name (`"gaussian"`, `"binomial"`, `"poisson"`,
            `"negative_binomial"`, `"gamma"`) or a `keras_glmm.families.Family`.
        link: optional link name; the family's canonical link by default.
        fixed_params: dict of dispersion parameters held fixed, e.g. `{"scale": 1.0}`.
        initial_params: dict of initial values of the learned ones.
        output_mode: `"dict"` (a dict of tensors; `GLMM` uses it) or `"packed"`
            (one `(batch, 3 + d)` tensor: `mean`, `eta`, `eta_var` and the `d`
            dispersion parameters, the form Keras's `compile(loss=...)` takes;
            `unpack` turns it, or `model.predict`'s array, into the dict).
        zi_covariates: for a zero-inflated family, take the logit of each row's
            zero-inflation probability as `call`'s `zi_logit` instead of learning
            one constant `zi_odds`.

    Input: `(batch, 2)`, the mean and variance of each row's linear predictor; or a
    list of its additive parts, each `(batch,)` or `(batch, 1)` (a value: a
    network's output, a `Dense` layer) or `(batch, 2)` (mean and variance:
    `RandomEffects(output_mode="moments")`, `VariationalFixedEffects`), summed.

    Output: a dict of `(batch,)` tensors: `eta` (linear predictor), `eta_var` (its
    posterior variance), `mean` (the response mean at `eta`: a probability for the
    binomial, `(1 - pi) mu` for a zero-inflated family) and one entry per dispersion
    parameter; or the packed tensor.

    Example:

    >>> head = FamilyHead("gaussian")
    >>> out = head(np.zeros((3, 2), "float32"))   # out["scale"], out["mean"], ...
    >>> packed = FamilyHead("gaussian", output_mode="packed")([network_out, re_moments])
    """

    def __init__(self, family="gaussian", link=None, fixed_params=None, initial_params=None,
                 output_mode="dict", zi_covariates=False, **kwargs):
        super().__init__(**kwargs)
        if output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"`output_mode` must be one of {OUTPUT_MODES}. Received: output_mode={output_mode!r}"
            )
        self.output_mode = output_mode
        self.family = families_lib.get_family(family, link=link)
        self.link = self.family.link.name
        self.zi_covariates = bool(zi_covariates)
        names = self.family.dispersion_params
        if self.zi_covariates:
            if "zi_odds" not in names:
                raise ValueError(
                    f"`zi_covariates=True` needs a zero-inflated family. Received: family={self.family.name!r}")
            names = tuple(n for n in names if n != "zi_odds")  # per row, from the model
        for arg, values in (("fixed_params", fixed_params), ("initial_params", initial_params)):
            for key, value in (values or {}).items():
                if key == "zi_odds" and self.zi_covariates:
                    raise ValueError(f"`{arg}` names 'zi_odds', which comes per row with zi_covariates=True.")
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
        for name in self._scalar_params():
            if name in self.fixed_params:
                continue
            self.log_params[name] = self.add_weight(
                name=f"log_{name}",
                shape=(),
                initializer=keras.initializers.Constant(np.log(self.initial_params.get(name, 1.0))),
            )

    def _scalar_params(self):
        """The dispersion parameters the head holds (not those that come per row)."""
        return tuple(n for n in self.family.dispersion_params if not (self.zi_covariates and n == "zi_odds"))

    def params(self):
        """The dispersion parameters the head holds, as scalar tensors, by name."""
        out = {}
        for name in self._scalar_params():
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

    def _moments(self, inputs):
        """`(eta, eta_var)` from a `(batch, 2)` tensor or a list of additive parts."""
        if not isinstance(inputs, (list, tuple)):
            moments = tf.cast(inputs, self.compute_dtype)
            return tuple(tf.unstack(moments, axis=-1))
        eta, eta_var = None, None
        for i, part in enumerate(inputs):
            part = tf.cast(part, self.compute_dtype)
            width = part.shape[-1] if part.shape.rank == 2 else None
            if part.shape.rank == 1 or width == 1:
                mean, var = tf.reshape(part, [-1]), None
            elif width == 2:
                mean, var = tf.unstack(part, axis=-1)
            else:
                raise ValueError(
                    f"FamilyHead '{self.name}': part {i} of the linear predictor has shape "
                    f"{tuple(part.shape)}; each part must be (batch,) or (batch, 1) (a value) or "
                    "(batch, 2) (mean and variance, e.g. RandomEffects(output_mode='moments'))."
                )
            eta = mean if eta is None else eta + mean
            if var is not None:
                eta_var = var if eta_var is None else eta_var + var
        if eta is None:
            raise ValueError(f"FamilyHead '{self.name}' received an empty list of parts.")
        return eta, tf.zeros_like(eta) if eta_var is None else eta_var

    def call(self, inputs, zi_logit=None):
        eta, eta_var = self._moments(inputs)
        params = self.params()
        if self.zi_covariates:
            if zi_logit is None:
                raise ValueError(f"FamilyHead '{self.name}' has zi_covariates=True: pass `zi_logit`, each "
                                 "row's logit of the zero-inflation probability.")
            params["zi_odds"] = tf.exp(tf.reshape(tf.cast(zi_logit, self.compute_dtype), [-1]))
        out = {"eta": eta, "eta_var": eta_var, "mean": self.family.response_mean(eta, params)}
        for name in self.family.dispersion_params:
            out[name] = tf.broadcast_to(params[name], tf.shape(eta))
        if self.output_mode == "dict":
            return out
        packed = tf.stack([out[k] for k in self.packed_columns()], axis=-1)
        # The loss checks that it was built for this head's family (see kg.losses).
        packed._keras_glmm_family = (self.family.name, self.family.link.name)
        return packed

    def packed_columns(self):
        """The columns of the packed output, in order."""
        return ["mean", "eta", "eta_var", *self.family.dispersion_params]

    def unpack(self, packed):
        """The dict of a packed output (a tensor, or `model.predict`'s numpy array)."""
        columns = self.packed_columns()
        if packed.shape[-1] != len(columns):
            raise ValueError(
                f"FamilyHead '{self.name}' ({self.family.name}) packs {len(columns)} columns "
                f"{columns}; received shape {tuple(packed.shape)}."
            )
        return {name: packed[..., j] for j, name in enumerate(columns)}

    def compute_output_shape(self, input_shape):
        first = input_shape[0]
        shape = (first[0] if isinstance(first, (list, tuple)) else first,)
        if self.output_mode == "packed":
            return shape + (len(self.packed_columns()),)
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
                "output_mode": self.output_mode,
                "zi_covariates": self.zi_covariates,
            }
        )
        return config
