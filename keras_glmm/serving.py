"""Exporting a fitted GLMM as a TensorFlow SavedModel for TF Serving.

The serving signature takes raw feature columns. Each grouping factor's levels come
as strings and are mapped to the model's level indices inside the graph, a level
never seen in training getting the population value (index -1), as
`predict_response` does. The fixed-effects design is rebuilt inside the graph from
the raw columns when the formula's fixed part is made of plain numeric columns,
treatment-coded categorical columns (`f` or `C(f)`) and their products (`x:f`,
`x * f`); the compiled design is checked against formulaic's on a prototype of the
data at export time. Other fixed parts (`I(...)`, `np.log(x)`, splines, other
contrasts) enter as their design matrix `x` instead. Offsets come as `offset`, each
term's slope covariates as `<term>_z`.
"""

import itertools
import re

import numpy as np
import tensorflow as tf

_CATEGORICAL_CALL = re.compile(r"^C\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class FixedDesignGraph:
    """The fixed-effects design as TensorFlow ops on raw columns (a supported subset).

    Raises:
        NotImplementedError: a factor outside the subset (the message says which).
    """

    def __init__(self, design):
        spec = design.fixed_spec
        state = spec.encoder_state
        self.columns = {}  # raw column -> ("numeric" | "categorical", levels)
        self.blocks = []  # per scoped term: list of per-factor (column, kind, levels or None)
        for structure in spec.structure:
            for scoped in structure.scoped_terms:
                factors = []
                for scoped_factor in scoped.factors:
                    expr = scoped_factor.factor.expr
                    kind, factor_state = state[expr]
                    kind = getattr(kind, "value", str(kind))
                    if kind == "numerical":
                        if not _NAME.match(expr):
                            raise NotImplementedError(f"the fixed-effects factor '{expr}' is a transform")
                        self.columns[expr] = ("numeric", None)
                        factors.append((expr, "numeric", None))
                    elif kind == "categorical":
                        call = _CATEGORICAL_CALL.match(expr)
                        if call:
                            column = call.group(1)
                        elif _NAME.match(expr):
                            column = expr
                        else:
                            raise NotImplementedError(f"the categorical factor '{expr}' is a transform")
                        inner = getattr(factor_state.get("contrasts"), "contrasts", None)
                        base = getattr(inner, "base", None)
                        if type(inner).__name__ != "TreatmentContrasts" or "UNSET" not in repr(base):
                            raise NotImplementedError(
                                f"the factor '{expr}' is not treatment-coded on its first level"
                            )
                        levels = list(factor_state["categories"])
                        self.columns[column] = ("categorical", levels)
                        used = levels[1:] if scoped_factor.reduced else levels
                        factors.append((column, "categorical", used))
                    else:
                        raise NotImplementedError(f"the fixed-effects factor '{expr}' is of kind {kind}")
                self.blocks.append(factors)

    def signature(self):
        return {
            column: tf.TensorSpec([None], tf.float32 if kind == "numeric" else tf.string, name=column)
            for column, (kind, _) in self.columns.items()
        }

    def __call__(self, features, rows):
        """The design matrix `(rows, p)` from raw columns (`rows`: the batch size)."""
        ones = tf.ones([rows], tf.float32)
        out = []
        for factors in self.blocks:
            parts = []
            for column, kind, levels in factors:
                if kind == "numeric":
                    parts.append([tf.cast(features[column], tf.float32)])
                else:
                    value = features[column]
                    parts.append([tf.cast(tf.equal(value, str(level)), tf.float32) for level in levels])
            # formulaic's column order for a product of factors: the first varies slowest.
            for combo in itertools.product(*parts):
                column = ones
                for piece in combo:
                    column = column * piece
                out.append(column)
        return tf.stack(out, axis=-1)

    def prototype(self, rows=24, seed=0):
        """A small data frame over the raw columns, every level present."""
        import pandas as pd

        rng = np.random.default_rng(seed)
        data = {}
        for column, (kind, levels) in self.columns.items():
            if kind == "numeric":
                data[column] = rng.normal(size=rows)
            else:
                data[column] = [levels[i % len(levels)] for i in range(rows)]
        return pd.DataFrame(data)

    def check(self, design):
        """Raises NotImplementedError unless the graph reproduces formulaic's design."""
        frame = self.prototype()
        expected = design.fixed_matrix(frame)
        features = {
            c: tf.constant(frame[c].to_numpy("float32") if kind == "numeric"
                           else np.array([str(v) for v in frame[c]], dtype=object))
            for c, (kind, _) in self.columns.items()
        }
        got = self(features, len(frame)).numpy()
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5):
            raise NotImplementedError("the compiled design does not reproduce formulaic's on a prototype")


class _ServingModule(tf.Module):
    """Holds the model (its variables) and one lookup table per grouping factor."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # tracked: its variables are saved
        design = model.design
        self.terms = [(r.name, tuple(r.group_columns), list(r.levels)) for r in design.random]
        self.tables = {}
        for name, _, levels in self.terms:
            init = tf.lookup.KeyValueTensorInitializer(
                tf.constant(levels, tf.string), tf.range(len(levels), dtype=tf.int64)
            )
            self.tables[name] = tf.lookup.StaticHashTable(init, default_value=-1)
        try:
            self.fixed = FixedDesignGraph(design)
            self.fixed.check(design)
            spec = self.fixed.signature()
        except NotImplementedError:
            self.fixed = None
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
        if self.fixed is None:
            inputs = {"x": features["x"]}
        else:
            first = self.terms[0][1][0] if self.terms else next(iter(features))
            rows = tf.shape(features[first])[0]
            inputs = {"x": self.fixed(features, rows)}
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
    try:
        fixed = FixedDesignGraph(model.design)
        fixed.check(model.design)
    except NotImplementedError:
        features = {"x": np.asarray(x["x"], "float32")}
    else:
        features = {
            column: data[column].to_numpy("float32") if kind == "numeric"
            else np.array([str(v) for v in data[column]], dtype=object)
            for column, (kind, _) in fixed.columns.items()
        }
    if "offset" in x:
        features["offset"] = np.asarray(x["offset"], "float32")
    for r in model.design.random:
        for column in r.group_columns:
            values = data[column]
            features[column] = np.array([str(v) for v in values.astype(object)], dtype=object)
        if r.n_covariates:
            features[r.name + "_z"] = np.asarray(x[r.name + "_z"], "float32")
    return features
