"""Networks inside a GLMM, and random effects inside Keras models.

Two directions, both trained on the negative ELBO per row with natural-gradient
steps for the random effects (`kg.NaturalGradient`), an M-step of the variance
components each epoch (`kg.VarianceUpdate`) and `kg.ELBOConvergence`:

- **A network as the fixed part**: `kg.GLMM(fixed_effects=network,
  random_effects=[...])`. The model's inputs are a dict: each random-effects
  term's levels under its name (integer indices, or level names as strings for a
  layer with a `vocabulary`), `name + "_z"` slope covariates, an optional
  `offset`, and every other entry a feature of the network (numeric arrays,
  integer codes, strings for Keras preprocessing layers inside the network). A
  network with one input takes the one feature (or `"x"`); a network with named
  inputs takes the dict of features by name. This module holds what `GLMM` needs
  for it: the data checks, the starting point, the optimizer, recentring and a
  SavedModel export over raw features.
- **Random effects inside your own model**: `kg.RandomEffects(...,
  output_mode="moments")` and any network feeding a `kg.FamilyHead(family,
  output_mode="packed")`, compiled with `kg.losses.NegativeExpectedLogLikelihood`
  (see `keras_glmm.losses`) and `kg.NaturalGradient`; `fit_callbacks()` gives the
  callbacks.
"""

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm import initialization
from keras_glmm.callbacks import ELBOConvergence, VarianceUpdate, output_bias
from keras_glmm.layers.fixed_effects import is_network
from keras_glmm.optimizers import NaturalGradient

# Rows per minibatch of a network's fit: small batches give a network many steps
# per epoch (full-batch steps of a network converge slowly), large ones amortize
# the per-step overhead; an epoch has at least 20 steps.
NETWORK_BATCH_ROWS = (512, 8192)
# The learning rate of the default optimizer of a network (Adam).
NETWORK_LEARNING_RATE = 3e-3


def reserved_keys(model):
    """The input keys that are not the network's: terms' levels and covariates, offset."""
    keys = {"offset"}
    for term in model.terms:
        keys.add(term.name)
        keys.add(term.name + "_z")
    return keys


def _network_takes_dict(network):
    inputs = getattr(network, "input", None)  # a functional model's inputs, as built
    return isinstance(inputs, dict) or (isinstance(getattr(network, "inputs", None), list)
                                         and len(network.inputs) > 1)


def network_inputs(model, inputs):
    """What the fixed part is called on: `inputs["x"]`, the one feature, or the features by name."""
    if not is_network(model.fixed_effects):
        return inputs["x"]
    reserved = reserved_keys(model)
    features = {k: v for k, v in inputs.items() if k not in reserved}
    if len(features) == 1 and not _network_takes_dict(model.fixed_effects):
        return next(iter(features.values()))
    return features


def _feature_array(key, value, num_rows, dtype):
    array = np.asarray(value)
    if array.dtype.kind in "OUS":
        missing = np.flatnonzero(pd.isna(array.reshape(len(array), -1)).any(axis=1)) if array.ndim else []
        if len(missing):
            raise ValueError(
                f"Input '{key}' holds a missing value in row {int(missing[0])} ({len(missing)} rows affected)."
            )
        array = array.astype(str)
    elif array.dtype.kind == "b":
        array = array.astype(dtype)
    elif array.dtype.kind in "iu":
        pass  # integer codes (an Embedding's input) stay integers
    elif array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise ValueError(
                f"Input '{key}' holds a non-finite value ({array[tuple(where)]}) in row {where[0]} "
                f"({int(bad.reshape(len(array), -1).any(axis=1).sum())} rows affected)."
            )
        array = array.astype(dtype)
    else:
        raise TypeError(f"Input '{key}' has dtype {array.dtype}: give numbers or strings.")
    if array.ndim == 0 or len(array) != num_rows:
        raise ValueError(
            f"Input '{key}' has {0 if array.ndim == 0 else len(array)} rows but the response has "
            f"{num_rows}: all inputs need one row per observation."
        )
    return array


def level_indices(layer, values):
    """A term's level input as indices: strings go through the layer's vocabulary."""
    array = np.asarray(values)
    if array.dtype.kind in "OUS":
        if getattr(layer, "vocabulary", None) is None:
            raise TypeError(
                f"RandomEffects layer '{layer.name}' received level names (strings) but has no "
                "`vocabulary`: build it with `vocabulary=[...]`, or `adapt` it on the names."
            )
        index = layer.lookup(array.astype(str))
        unknown = np.flatnonzero(index < 0)
        if unknown.size:
            raise ValueError(
                f"RandomEffects layer '{layer.name}': level {array[unknown[0]]!r} in row "
                f"{int(unknown[0])} is not in its vocabulary ({unknown.size} rows)."
            )
        return index
    return array


def check_data(model, x, y):
    """`initialization.check_data` for a GLMM whose fixed part is a network.

    The terms, covariates, offset and response are checked as for any GLMM; the
    network's features are checked for their row count and missing or non-finite
    values (naming the input and row), strings kept as strings, integers as
    integers and floats cast to the model's dtype.

    Returns:
        `(x, y, num_rows)`.
    """
    if not isinstance(x, dict):
        raise TypeError("A GLMM with a network as fixed effects takes a dict of input arrays.")
    reserved = reserved_keys(model)
    features = {k: v for k, v in x.items() if k not in reserved}
    if not features:
        raise ValueError(
            "The network (fixed effects) has no inputs: give its features in the input dict "
            f"beside the random-effect terms {[t.name for t in model.terms]}."
        )
    num_rows = len(np.asarray(y))
    known = {k: x[k] for k in x if k in reserved}
    for term in model.terms:
        if term.name in known:
            known[term.name] = level_indices(term, known[term.name])
    # The shared checks (terms, covariates, offset, response), with a stand-in design.
    checked, y, num_rows = initialization.check_data(model, {"x": np.zeros((num_rows, 1)), **known}, y)
    del checked["x"]
    for key, value in features.items():
        checked[key] = _feature_array(key, value, num_rows, model.compute_dtype)
    if len(features) == 1:
        model._network_feature_name = next(iter(features))
    network = model.fixed_effects
    if not network.built:
        network(network_inputs(model, {k: v[:2] for k, v in checked.items()}))
    return checked, y, num_rows


def prediction_inputs(model, x):
    """Inputs for `predict`: level names as indices (-1 for new ones), and string
    features as tensors (Keras's `predict` takes no numpy string arrays)."""
    x = dict(x)
    reserved = reserved_keys(model)
    for term in model.terms:
        if term.name in x and not tf.is_tensor(x[term.name]):
            levels = np.asarray(x[term.name])
            if levels.dtype.kind in "OUS":
                x[term.name] = term.lookup(levels)
    for key, value in x.items():
        if key not in reserved and not tf.is_tensor(value):
            array = np.asarray(value)
            if array.dtype.kind in "OUS":
                x[key] = tf.constant(array.astype(str))
    return x


def initialize(model, x, y):
    """The starting point of a GLMM with a network: dispersion and random-effect units from
    the data, and the network's output bias at the intercept-only GLM.

    A model whose optimizer has taken steps (a loaded model fitted again) goes on from
    its weights."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built and int(optimizer.iterations) > 0:
        return
    x, y = initialization._row_sample(x, y, initialization.GLM_SAMPLE_ROWS)
    family = model.family
    y64 = np.asarray(y, "float64")
    response = y64[:, 0] if y64.ndim == 2 else y64
    trials = y64[:, 1] if y64.ndim == 2 else None
    params = family.default_params(response, trials)
    params.update(model.head.fixed_params)
    ones = np.ones((len(response), 1))
    beta, eta = initialization.fit_glm(family, ones, y64, x.get("offset"), params)
    bias = output_bias(model.fixed_effects)
    if bias is not None:
        bias.assign(np.full(bias.shape, beta[0], bias.dtype))
    spread = 1.0
    if family.link.name == "identity":
        spread = float(np.sqrt(np.mean((response - eta) ** 2)))
        if family.name == "gaussian":
            params["scale"] = spread
    spread = spread if np.isfinite(spread) and spread > 0 else 1.0
    model.head.set_params({k: v for k, v in params.items() if k not in model.head.fixed_params})
    for layer in model.terms:
        scales = [0.5 * spread] if layer.intercept else []
        if layer.num_covariates:
            z = np.asarray(x[layer.name + "_z"], "float64")
            sd = np.sqrt(np.mean(z**2, axis=0))
            scales.extend(0.5 * spread / np.where(sd > 0, sd, 1.0))
        layer.set_effect_scale(scales, reset=True)


def fit_batch_size(model, num_rows, batch_size):
    """The minibatch size of a fit: the caller's, or for a network about 1/20 of the rows
    within `NETWORK_BATCH_ROWS` (None: the GLMM's own rule)."""
    if batch_size is not None or not is_network(model.fixed_effects):
        return batch_size
    low, high = NETWORK_BATCH_ROWS
    return int(min(high, max(low, num_rows // 20)))


def use_network_optimizer(model, x, y):
    """Wraps the model's optimizer in `NaturalGradient` for a GLMM with a network.

    A default-compiled model gets `NaturalGradient(Adam(NETWORK_LEARNING_RATE))`; a
    model compiled with an optimizer of its own keeps it for the network and the
    dispersion. The random effects' posterior sds start at their Laplace values and
    the prior sds move by the M-step of `VarianceUpdate` only.
    """
    if isinstance(model.optimizer, NaturalGradient):  # e.g. a loaded model: keep its state
        _freeze_prior(model)
        model._default_optimizer = True
        return
    if getattr(model, "_default_optimizer", True):
        inner = keras.optimizers.Adam(NETWORK_LEARNING_RATE)
    else:
        inner = model.optimizer
    if int(model.optimizer.iterations) == 0:
        initialization.start_posterior_scales(model, x, y)
    _freeze_prior(model)
    with model.distribute_strategy.scope():
        model.compile(optimizer=NaturalGradient(inner), steps_per_execution=model.steps_per_execution,
                      jit_compile=False)
        model.optimizer.build(model.trainable_variables)
    model._default_optimizer = True


def _freeze_prior(model):
    """The prior sds and correlations move by `VarianceUpdate`'s M-step only."""
    for term in model.terms:
        if term.scale_prior is None:
            term.log_scale.trainable = False
            if term.num_correlations:
                term.correlation.trainable = False


def fit_callbacks(intercept=None):
    """The callbacks of a Keras model of your own with random effects: the M-step of the
    variance components (recentring the intercepts into `intercept`, a `Dense(1)` layer or
    its bias, found automatically when a linear `Dense(1)` feeds the `FamilyHead`) and
    `ELBOConvergence` for minibatches."""
    return [VarianceUpdate(intercept=intercept), ELBOConvergence.for_minibatches()]


# ---------------------------------------------------------------- serving
def serving_signature(model):
    """`tf.TensorSpec`s of a network GLMM's raw inputs: the network's features (from its
    `keras.Input`s) and each term's levels (strings when it has a vocabulary)."""
    network = model.fixed_effects
    spec = {}
    inputs = getattr(network, "inputs", None)
    if not inputs:
        raise ValueError(
            "Exporting a GLMM with a network needs a functional or Sequential network with "
            "`keras.Input`s (their names, dtypes and shapes make the signature)."
        )
    reserved = reserved_keys(model)
    if len(inputs) == 1 and not _network_takes_dict(network):
        names = [getattr(model, "_network_feature_name", None) or inputs[0].name]
    else:
        names = [t.name for t in inputs]
    for name, tensor in zip(names, inputs):
        if name in reserved:
            raise ValueError(f"The network's input '{name}' has the name of a random-effect input.")
        spec[name] = tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=name)
    for term in model.terms:
        dtype = tf.string if getattr(term, "vocabulary", None) is not None else tf.int64
        spec[term.name] = tf.TensorSpec([None], dtype, name=term.name)
        if term.num_covariates:
            spec[term.name + "_z"] = tf.TensorSpec([None, term.num_covariates], tf.float32,
                                                   name=term.name + "_z")
    return spec


def export(model, filepath):
    """A SavedModel of a GLMM with a network: `serving_default` takes the raw features and
    each term's levels (names as strings for a layer with a vocabulary; an unknown name,
    or index -1, predicts at the population value) and returns `mean` and `eta`.

    Returns:
        The signature's input names.
    """
    spec = serving_signature(model)

    class _Serving(tf.Module):
        def __init__(self, glmm):
            super().__init__()
            self.model = glmm

        @tf.function(input_signature=[spec])
        def serve(self, features):
            features = dict(features)
            for term in self.model.terms:
                if features[term.name].dtype == tf.string:
                    features[term.name] = term.lookup_tensor(features[term.name])
            out = self.model(features, training=False)
            return {"mean": out["mean"], "eta": out["eta"]}

    module = _Serving(model)
    tf.saved_model.save(module, str(filepath), signatures={"serving_default": module.serve})
    return sorted(spec)
