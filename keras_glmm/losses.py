"""Keras losses for random effects inside your own Keras models.

A model that ends in `kg.FamilyHead(family, output_mode="packed")` and holds
`kg.RandomEffects` layers is compiled with the matching loss:

```python
head = kg.FamilyHead("gaussian", output_mode="packed")
out = head([network(features), group_effects(group)])      # group_effects: output_mode="moments"
model = keras.Model(inputs, out)
model.compile(optimizer=kg.NaturalGradient(keras.optimizers.Adam(1e-3)),
              loss=kg.losses.NegativeExpectedLogLikelihood("gaussian"))
```

The compiled loss is the mean over the batch's rows of `-E_q[log p(y_i | eta_i)]`,
in closed form or by Gauss-Hermite quadrature (no sampling noise), with the
dispersion (gaussian residual sd, negative binomial size, gamma shape) the head's
learned weight; Keras adds the random-effects layers' KL (`add_loss`, scaled per
row by `RandomEffects.adapt`), so the training loss is the negative ELBO per row,
as `kg.GLMM` computes it.
"""

import keras
import tensorflow as tf

from keras_glmm import families as families_lib


@keras.saving.register_keras_serializable(package="keras_glmm")
class NegativeExpectedLogLikelihood(keras.losses.Loss):
    """`-E_q[log p(y | eta)]` per row, from a packed `FamilyHead` output.

    Args:
        family: a family name (`"gaussian"`, `"binomial"`, `"poisson"`,
            `"negative_binomial"`, `"gamma"`) or a `keras_glmm.families.Family`;
            it must be the head's.
        link: optional link name (the family's canonical link by default); it must
            be the head's.
        quadrature_points: Gauss-Hermite nodes for families without a closed form.
        reduction, name, dtype: as for any Keras loss (the default reduction, a mean
            over the batch, makes the loss per row as the layers' KL is).

    `y_true`: the response, `(batch,)` or `(batch, 1)`; for a binomial also
    `(batch, 2)` successes and trials. `y_pred`: the head's packed output
    `(batch, 3 + d)` (`mean`, `eta`, `eta_var`, the `d` dispersion parameters).

    Raises:
        ValueError (when the model is first traced, before any step): `y_pred` has
        the wrong number of columns, or comes from a `FamilyHead` of another family
        or link.
    """

    def __init__(self, family="gaussian", link=None, quadrature_points=None,
                 reduction="sum_over_batch_size", name=None, dtype=None):
        self.family = families_lib.get_family(family, link=link)
        self.quadrature_points = quadrature_points
        super().__init__(
            name=name or f"{self.family.name}_nell", reduction=reduction, dtype=dtype)

    @property
    def columns(self):
        return ["mean", "eta", "eta_var", *self.family.dispersion_params]

    def check(self, y_pred):
        """Raises if `y_pred` is not a packed output of a head of this loss's family."""
        tag = getattr(y_pred, "_keras_glmm_family", None)
        mine = (self.family.name, self.family.link.name)
        if tag is not None and tuple(tag) != mine:
            raise ValueError(
                f"The loss is for family '{mine[0]}' (link '{mine[1]}') but the model's FamilyHead "
                f"is family '{tag[0]}' (link '{tag[1]}'): give both the same family and link, e.g. "
                f"kg.losses.NegativeExpectedLogLikelihood({tag[0]!r}, link={tag[1]!r})."
            )
        width = y_pred.shape[-1] if len(y_pred.shape) else None
        if len(y_pred.shape) != 2 or (width is not None and width != len(self.columns)):
            raise ValueError(
                f"NegativeExpectedLogLikelihood('{self.family.name}') takes the packed output of "
                f"kg.FamilyHead('{self.family.name}', output_mode='packed'): shape (batch, "
                f"{len(self.columns)}), columns {self.columns}. Received shape {tuple(y_pred.shape)}"
                + (" (a FamilyHead of another family?)." if tag is None and width else ".")
            )

    def __call__(self, y_true, y_pred, sample_weight=None):
        if not isinstance(y_pred, dict):
            self.check(y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        if isinstance(y_pred, dict):
            raise ValueError(
                "NegativeExpectedLogLikelihood takes the packed output of a FamilyHead: build it "
                "with output_mode='packed' (Keras applies a loss to each entry of a dict output)."
            )
        self.check(y_pred)
        y_pred = tf.convert_to_tensor(y_pred)
        columns = tf.unstack(y_pred, num=len(self.columns), axis=-1)
        parts = dict(zip(self.columns, columns))
        y_true = tf.cast(y_true, y_pred.dtype)
        trials = None
        if self.family.name == "binomial" and y_true.shape.rank == 2 and y_true.shape[-1] == 2:
            y_true, trials = y_true[:, 0], y_true[:, 1]
        else:
            y_true = tf.reshape(y_true, [-1])
        params = {name: parts[name] for name in self.family.dispersion_params}
        return -self.family.expected_log_prob(
            y_true, parts["eta"], parts["eta_var"], params, trials=trials,
            num_points=self.quadrature_points,
        )

    def get_config(self):
        config = super().get_config()
        config.update({
            "family": self.family.name,
            "link": self.family.link.name,
            "quadrature_points": self.quadrature_points,
        })
        return config


def get(identifier):
    """A loss from a name (`"gaussian"` etc.), a config, or a loss object."""
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        return NegativeExpectedLogLikelihood(identifier)
    return keras.saving.deserialize_keras_object(identifier)
