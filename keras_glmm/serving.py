"""Exporting a fitted GLMM as a TensorFlow SavedModel for TF Serving.

The serving signature takes each grouping factor's raw levels (strings, as the data
frame holds them) and maps them to the model's level indices inside the graph, with
a level never seen in training getting the population value (index -1), as
`predict_response` does. The fixed-effects part enters as its design matrix `x`
(the columns of `model.fixef()`); offsets as `offset` when the formula has them, and
each term's slope covariates as `<term>_z`.
"""

import numpy as np
import tensorflow as tf


class _ServingModule(tf.Module):
    """Holds the model (its variables) and one lookup table per grouping factor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        design = model.design
        self.terms = [(r.name, tuple(r.group_columns), list(r.levels)) for r in design.random]
        self.tables = {}
        for name, _, levels in self.terms:
            init = tf.lookup.KeyValueTensorInitializer(
                tf.constant(levels, tf.string), tf.range(len(levels), dtype=tf.int64)
            )
            self.tables[name] = tf.lookup.StaticHashTable(init, default_value=-1)
        spec = {"x": tf.TensorSpec([None, design.n_fixed], tf.float32, name="x")}
        if design.spec.offsets:
            spec["offset"] = tf.TensorSpec([None], tf.float32, name="offset")
        for r in design.random:
            for column in r.group_columns:
                spec[column] = tf.TensorSpec([None], tf.string, name=column)
            if r.n_covariates:
                spec[r.name + "_z"] = tf.TensorSpec([None, r.n_covariates], tf.float32, name=r.name + "_z")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, features):
        inputs = {"x": features["x"]}
        if "offset" in features:
            inputs["offset"] = features["offset"]
        for name, columns, _ in self.terms:
            levels = [features[c] for c in columns]
            # An interaction a:b is keyed by "level_a:level_b", as the design does.
            key = levels[0] if len(levels) == 1 else tf.strings.join(levels, separator=":")
            inputs[name] = self.tables[name].lookup(key)
            if name + "_z" in features:
                inputs[name + "_z"] = features[name + "_z"]
        out = self.model(inputs, training=False)
        return {"mean": out["mean"], "eta": out["eta"]}


def export_saved_model(model, filepath):
    """Writes `model` (a fitted formula GLMM) as a SavedModel with a `serving_default`.

    Args:
        model: a `GLMM` built by `GLMM.from_formula` (its level vocabularies are needed).
        filepath: the SavedModel directory (what TF Serving loads as a version folder).

    Returns:
        The serving signature's input names.
    """
    if getattr(model, "design", None) is None:
        raise ValueError(
            "export_saved_model needs a model built from a formula (GLMM.from_formula or "
            "glmm()), whose level vocabularies it puts into the graph."
        )
    if model.compute_dtype != "float32":
        raise ValueError(f"Serving exports float32 models. This model computes in {model.compute_dtype}.")
    module = _ServingModule(model)
    tf.saved_model.save(module, str(filepath), signatures={"serving_default": module.serve})
    return sorted(module.serve.input_signature[0])


def serving_features(model, data):
    """The serving signature's inputs for the rows of a data frame (as numpy arrays)."""
    x, _ = model._frame_arrays(data, with_response=False)
    features = {"x": np.asarray(x["x"], "float32")}
    if "offset" in x:
        features["offset"] = np.asarray(x["offset"], "float32")
    for r in model.design.random:
        for column in r.group_columns:
            values = data[column]
            features[column] = np.array([str(v) for v in values.astype(object)], dtype=object)
        if r.n_covariates:
            features[r.name + "_z"] = np.asarray(x[r.name + "_z"], "float32")
    return features
