"""Exporting a fitted GLMM as a TensorFlow SavedModel for TF Serving.

The serving signature takes raw data columns, each in the dtype it had in training
(`keras_glmm.levels.column_kind`): `int64` for integer columns, `float32` or
`float64` for float columns, `bool` for boolean columns, `string` for string and
categorical columns (a categorical column takes the type of its categories:
integer categories come as `int64`). Numeric columns used only as covariates come
as `float32`. `serving_features(model, frame)` turns a data frame into such a
request.

Grouping factors: the graph turns each grouping column's values into level keys
exactly as the design does in Python (`keras_glmm.levels`, the one definition of a
level's key; the module's `graph_part_keys` is the TensorFlow twin of `level_key`),
combines the parts of an interaction `a:b` without ambiguity, and looks the key up
in the model's level table; a level never seen in training gets the population
value (index -1), as `predict_response` does. Taking each column in its training
dtype is the choice that makes this exact: an integer `308` is `"308"` by
`tf.strings.as_string`, a float `308.0` is found by its IEEE bits in a table built
at export from the training keys, so no float is ever formatted as text in the
graph. A client sending strings for a string column sends the key (`"308"`, not
`"308.0"`).

Designs: the fixed-effects design and each random-effect term's covariates are
rebuilt inside the graph from the raw columns when they are made of plain numeric
columns, treatment-coded categorical columns (`f` or `C(f)`, reduced or full rank,
as formulaic coded them) and their products (`x:f`, `x * f`): random slopes on
factors (`(gender | school)`, `(0 + Machine | Worker)`) included. Each compiled
design is checked against formulaic's on a prototype of the data at export time.
A level of a factor not seen in training makes the request fail
(`InvalidArgumentError` naming the column), as `predict_response` raises. Other
designs (`I(...)`, `np.log(x)`, splines, other contrasts) enter as their design
matrix instead: `x` for the fixed part, `<term>_z` (the term's non-intercept
columns) for a random-effect term. Offsets come as `offset`.

Bad requests name the input: `load(path)` gives the served function behind a
Python check of each request (`check_request`: every input present, in its dtype,
1-D (or `(rows, width)` for a design matrix), all of one length; a `ValueError`
naming the key, what was expected and what came), and the graph itself asserts the
shapes and lengths (an `InvalidArgumentError` whose message names the key: a
SavedModel's signature does not check shapes, so a client calling it directly
gets that). A dtype other than the signature's is refused by TensorFlow before the
graph runs; only `check_request` can name the key then. An export that cannot be
written (a full disk) is an `OSError` naming the directory.
"""

import contextlib
import errno
import itertools
import os
import re

import numpy as np
import tensorflow as tf

from keras_glmm import levels as levels_lib

_CATEGORICAL_CALL = re.compile(r"^C\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class DesignGraph:
    """A formulaic design (the fixed part, or a random-effect term's expression) as
    TensorFlow ops on raw columns (a supported subset).

    Args:
        model_spec: the frozen formulaic `ModelSpec`.
        what: what the design is, for messages ("the fixed effects", "random-effect
            term (gender | school)").
        drop_intercept: leave out the first column (a random-effect term's
            intercept: its covariates are the other columns).

    Raises:
        NotImplementedError: a factor outside the subset (the message says which).
    """

    def __init__(self, model_spec, what="the fixed effects", drop_intercept=False):
        state = model_spec.encoder_state
        self.what = what
        self.drop_intercept = drop_intercept
        self.columns = {}  # raw column -> ("numeric", None) | ("categorical", categories)
        self.blocks = []  # per scoped term: list of per-factor (column, kind, levels used or None)
        for structure in model_spec.structure:
            for scoped in structure.scoped_terms:
                factors = []
                for scoped_factor in scoped.factors:
                    expr = scoped_factor.factor.expr
                    kind, factor_state = state[expr]
                    kind = getattr(kind, "value", str(kind))
                    if kind == "numerical":
                        if not _NAME.match(expr):
                            raise NotImplementedError(f"the factor '{expr}' of {what} is a transform")
                        self.columns.setdefault(expr, ("numeric", None))
                        factors.append((expr, "numeric", None))
                    elif kind == "categorical":
                        call = _CATEGORICAL_CALL.match(expr)
                        if call:
                            column = call.group(1)
                        elif _NAME.match(expr):
                            column = expr
                        else:
                            raise NotImplementedError(f"the categorical factor '{expr}' of {what} is a transform")
                        inner = getattr(factor_state.get("contrasts"), "contrasts", None)
                        base = getattr(inner, "base", None)
                        if type(inner).__name__ != "TreatmentContrasts" or "UNSET" not in repr(base):
                            raise NotImplementedError(
                                f"the factor '{expr}' of {what} is not treatment-coded on its first level"
                            )
                        categories = list(factor_state["categories"])
                        if self.columns.get(column, ("categorical", categories)) != ("categorical", categories):
                            raise NotImplementedError(f"column '{column}' is coded twice in {what}")
                        self.columns[column] = ("categorical", categories)
                        used = categories[1:] if scoped_factor.reduced else categories
                        factors.append((column, "categorical", used))
                    else:
                        raise NotImplementedError(f"the factor '{expr}' of {what} is of kind {kind}")
                self.blocks.append(factors)

    def __call__(self, features, rows, part_keys):
        """The design matrix `(rows, width)` from raw columns.

        Args:
            features: the request's raw columns.
            rows: the batch size (a scalar tensor).
            part_keys: `column -> string tensor` of the column's level keys.
        """
        ones = tf.ones([rows], tf.float32)
        out = []
        checked = {}
        for factors in self.blocks:
            parts = []
            for column, kind, levels in factors:
                if kind == "numeric":
                    parts.append([tf.cast(features[column], tf.float32)])
                    continue
                if column not in checked:
                    checked[column] = self._known(column, part_keys(column))
                key = checked[column]
                parts.append([tf.cast(tf.equal(key, levels_lib.level_key(level)), tf.float32) for level in levels])
            # formulaic's column order for a product of factors: the first varies slowest.
            for combo in itertools.product(*parts):
                column = ones
                for piece in combo:
                    column = column * piece
                out.append(column)
        if self.drop_intercept:
            out = out[1:]
        return tf.stack(out, axis=-1) if out else tf.zeros([rows, 0], tf.float32)

    def _known(self, column, key):
        """`key`, after asserting every value is a level the factor was fitted with."""
        categories = self.columns[column][1]
        known_keys = tf.constant([levels_lib.level_key(c) for c in categories], tf.string)
        known = tf.reduce_any(tf.equal(key[:, None], known_keys[None, :]), axis=1)
        check = tf.debugging.Assert(
            tf.reduce_all(known),
            [f"column '{column}' has a level not seen when the model was fitted ({self.what}):",
             tf.boolean_mask(key, tf.logical_not(known))[:3]],
        )
        with tf.control_dependencies([check]):
            return tf.identity(key)

    def prototype(self, kinds, rows=24, seed=0):
        """A small data frame over the raw columns, every level present."""
        import pandas as pd

        rng = np.random.default_rng(seed)
        data = {}
        for column, (kind, levels) in self.columns.items():
            if kind == "categorical":
                data[column] = [levels[i % len(levels)] for i in range(rows)]
            elif kinds.get(column) == "int64":
                data[column] = rng.integers(-5, 6, size=rows)
            elif kinds.get(column) == "bool":
                data[column] = np.arange(rows) % 2 == 0
            else:
                data[column] = rng.normal(size=rows)
        return pd.DataFrame(data)


class FixedDesignGraph(DesignGraph):
    """The fixed-effects design as TensorFlow ops on raw columns (see `DesignGraph`)."""

    def __init__(self, design):
        super().__init__(design.fixed_spec, "the fixed effects")


class _Plan:
    """What the serving signature takes and how the graph rebuilds the model's inputs.

    Attributes:
        fixed: the fixed part's `DesignGraph`, or None (the signature takes `x`).
        random: per random-effect term with covariates, its `DesignGraph` or None
            (the signature takes `<term>_z`).
        kinds: raw column -> serving kind (`keras_glmm.levels.KINDS`).
        float_keys: float column -> the level keys its values may have.
    """

    def __init__(self, design):
        self.design = design
        self.fixed = self._graph(lambda: FixedDesignGraph(design))
        self.random = {}
        for r in design.random:
            if r.n_covariates:
                self.random[r.name] = self._graph(
                    lambda r=r: DesignGraph(r.model_spec, f"random-effect term {r.term}", r.intercept)
                )
        graphs = [g for g in [self.fixed, *self.random.values()] if g is not None]
        # One dtype per raw column: a grouping column's, else its categories', else float32.
        self.kinds, float_keys = {}, {}
        for r in design.random:
            n = len(r.group_columns)
            for j, (column, kind) in enumerate(zip(r.group_columns, r.group_kinds, strict=True)):
                self.kinds.setdefault(column, kind)
                float_keys.setdefault(column, {}).update(
                    dict.fromkeys(levels_lib.split_key(k, n)[j] for k in r.keys)
                )
        for graph in graphs:
            for column, (kind, categories) in graph.columns.items():
                if kind == "categorical":
                    self.kinds.setdefault(column, levels_lib.column_kind(_categories_array(categories)))
                    float_keys.setdefault(column, {}).update(
                        dict.fromkeys(levels_lib.level_key(c) for c in categories)
                    )
        for graph in graphs:
            for column, (kind, _) in graph.columns.items():
                self.kinds.setdefault(column, "float32")
        self.float_keys = {
            c: list(keys) for c, keys in float_keys.items() if self.kinds[c] in ("float32", "float64")
        }
        self._check()

    @staticmethod
    def _graph(build):
        try:
            return build()
        except NotImplementedError:
            return None

    def tables(self):
        """The float columns' key tables (`levels.float_key_table`), by column."""
        return {c: levels_lib.float_key_table(keys) for c, keys in self.float_keys.items()}

    def part_keys(self, features, tables):
        """`column -> level keys` of the request's raw columns, each made once."""
        cache = {}

        def keys(column):
            if column not in cache:
                cache[column] = levels_lib.graph_part_keys(
                    features[column], self.kinds[column], tables.get(column)
                )
            return cache[column]

        return keys

    def _check(self):
        """Drops a compiled design that does not reproduce formulaic's on a prototype."""
        tables = self.tables()
        checks = [("fixed", self.fixed, self.design.fixed_matrix)]
        checks += [(name, g, self.design.term(name).covariates) for name, g in self.random.items()]
        for name, graph, expected_of in checks:
            if graph is None:
                continue
            frame = graph.prototype(self.kinds)
            expected = expected_of(frame)
            features = {
                c: tf.constant(levels_lib.serving_values(frame[c], self.kinds[c], c)) for c in graph.columns
            }
            got = graph(features, len(frame), self.part_keys(features, tables)).numpy()
            if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5):
                if name == "fixed":
                    self.fixed = None
                else:
                    self.random[name] = None
        # Columns only a dropped design needed leave the signature.
        needed = {c for r in self.design.random for c in r.group_columns}
        for graph in [self.fixed, *self.random.values()]:
            if graph is not None:
                needed |= set(graph.columns)
        self.kinds = {c: k for c, k in self.kinds.items() if c in needed}
        self.float_keys = {c: k for c, k in self.float_keys.items() if c in needed}

    def signature(self):
        design = self.design
        spec = {
            column: tf.TensorSpec([None], levels_lib.serving_dtype(kind), name=column)
            for column, kind in self.kinds.items()
        }
        if self.fixed is None:
            spec["x"] = tf.TensorSpec([None, design.n_fixed], tf.float32, name="x")
        if design.spec.offsets:
            spec["offset"] = tf.TensorSpec([None], tf.float32, name="offset")
        for name, graph in self.random.items():
            if graph is None:
                width = design.term(name).n_covariates
                spec[name + "_z"] = tf.TensorSpec([None, width], tf.float32, name=name + "_z")
        return spec


def _categories_array(categories):
    import pandas as pd

    return pd.Index(categories) if len(categories) else pd.Index([], dtype=object)


class _ServingModule(tf.Module):
    """Holds the model (its variables), one level table per random-effect term and
    the float columns' key tables."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # tracked: its variables are saved
        design = model.design
        self.plan = _Plan(design)
        self.terms = [(r.name, tuple(r.group_columns), list(r.keys)) for r in design.random]
        self.level_tables = {}
        for name, _, keys in self.terms:
            init = tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.string), tf.range(len(keys), dtype=tf.int64)
            )
            self.level_tables[name] = tf.lookup.StaticHashTable(init, default_value=-1)
        self.key_tables = self.plan.tables()
        self.serve = tf.function(self._serve, input_signature=[self.plan.signature()])

    def _serve(self, features):
        plan = self.plan
        first = next(c for c in plan.kinds) if plan.kinds else None
        rows = tf.shape(features[first])[0] if first is not None else tf.shape(features["x"])[0]
        features = _asserted(features, first or "x", rows)
        part_keys = plan.part_keys(features, self.key_tables)
        inputs = {"x": features["x"] if plan.fixed is None else plan.fixed(features, rows, part_keys)}
        if "offset" in features:
            inputs["offset"] = features["offset"]
        for name, columns, _ in self.terms:
            key = levels_lib.graph_combine_keys([part_keys(c) for c in columns])
            inputs[name] = self.level_tables[name].lookup(key)
            if name in plan.random:
                graph = plan.random[name]
                inputs[name + "_z"] = (
                    features[name + "_z"] if graph is None else graph(features, rows, part_keys)
                )
        out = self.model(inputs, training=False)
        return {"mean": out["mean"], "eta": out["eta"]}


def _asserted(features, first, rows):
    """The request's inputs after graph assertions of their shapes and lengths, naming the key.

    The shape is checked as text (`"6, 1"`): the signature's `[None]` lets TensorFlow fold
    `tf.rank` to 1 whatever comes, and a loaded SavedModel does not check shapes. Keys
    are in backticks: TensorFlow escapes quotes in an assertion's message.
    """
    checks = []
    for key in sorted(features):
        value = features[key]
        width = value.shape[1] if value.shape.rank == 2 else None
        shape = tf.strings.reduce_join(tf.strings.as_string(tf.shape(value)), separator=", ")
        expected = r"\d+" if width is None else rf"\d+, {width}"
        what = "(rows,): one value per row" if width is None else f"(rows, {width})"
        checks.append(tf.debugging.Assert(
            tf.strings.regex_full_match(shape, expected),
            [f"serving input `{key}` must have shape {what}; received shape (", shape, ")"]))
        checks.append(tf.debugging.Assert(
            tf.equal(tf.shape(value)[0], rows),
            [f"serving input `{key}` has", tf.shape(value)[0], f"rows where `{first}` has", rows,
             ": every input needs one value per row"]))
    with tf.control_dependencies(checks):
        return {key: tf.identity(value) for key, value in features.items()}


def check_request(features, signature):
    """Checks a serving request against the signature's inputs, naming the key at fault.

    Args:
        features: the request, input name -> array or tensor.
        signature: input name -> `tf.TensorSpec` (a loaded signature's
            ``structured_input_signature[1]``, or `_Plan.signature`).

    Raises:
        ValueError: a missing or unknown input, a dtype other than the signature's,
            a shape other than `(rows,)` (`(rows, width)` for a design matrix), or
            inputs of different lengths.
    """
    missing = [k for k in signature if k not in features]
    if missing:
        raise ValueError(f"serving input(s) {missing} missing: the signature takes {sorted(signature)}")
    unknown = [k for k in features if k not in signature]
    if unknown:
        raise ValueError(f"unknown serving input(s) {unknown}: the signature takes {sorted(signature)}")
    rows = {}
    for key, spec in signature.items():
        value = features[key]
        if isinstance(value, tf.Tensor):
            dtype, shape = value.dtype, tuple(value.shape)
        else:
            value = np.asarray(value)
            dtype = tf.string if value.dtype.kind in "OUS" else tf.as_dtype(value.dtype)
            shape = value.shape
        if dtype != spec.dtype:
            hint = "strings, the levels' keys" if spec.dtype == tf.string else f"np.asarray(values, '{spec.dtype.name}')"
            raise ValueError(
                f"serving input '{key}' must be {spec.dtype.name} (the signature's dtype); "
                f"received {dtype.name}: send {hint}"
            )
        expected = tuple(spec.shape)
        if len(shape) != len(expected) or any(e is not None and e != g for e, g in zip(expected, shape)):
            what = "(rows,): one value per row" if len(expected) == 1 else f"(rows, {expected[1]})"
            raise ValueError(f"serving input '{key}' must have shape {what}; received shape {shape}")
        rows[key] = shape[0]
    if len(set(rows.values())) > 1:
        raise ValueError(
            f"serving inputs of different lengths, {dict(sorted(rows.items()))}: every input needs "
            "one value per row"
        )


class ServingFunction:
    """A SavedModel's `serving_default` behind `check_request` (see `load`).

    Calling it with the request's inputs (keywords or a dict) returns `mean` and `eta`
    as numpy arrays.
    """

    def __init__(self, path):
        self.path = str(path)
        self.function = tf.saved_model.load(self.path).signatures["serving_default"]
        self.signature = dict(self.function.structured_input_signature[1])

    def __call__(self, features=None, **kwargs):
        features = {**(features or {}), **kwargs}
        check_request(features, self.signature)
        out = self.function(**{k: tf.convert_to_tensor(v, self.signature[k].dtype) for k, v in features.items()})
        return {k: v.numpy() for k, v in out.items()}


def load(path):
    """The exported model at `path` as a `ServingFunction`: requests checked, naming the key."""
    return ServingFunction(path)


@contextlib.contextmanager
def written_to(filepath):
    """TensorFlow's write errors of an export (a full disk: `OutOfRangeError`) as an OSError
    naming the directory."""
    try:
        yield
    except (tf.errors.OutOfRangeError, tf.errors.ResourceExhaustedError, tf.errors.DataLossError,
            tf.errors.PermissionDeniedError, tf.errors.UnknownError) as err:
        full = isinstance(err, (tf.errors.OutOfRangeError, tf.errors.ResourceExhaustedError))
        raise OSError(
            errno.ENOSPC if full else errno.EIO,
            f"Could not write the SavedModel to '{os.fspath(filepath)}'"
            + (" (is the disk full?)" if full else "") + f": {err.message}",
            os.fspath(filepath),
        ) from err


def check_exportable(zero_inflated_with_covariates, ordinal):
    """Refuses the models whose answer the serving graph does not compute: a ValueError."""
    if zero_inflated_with_covariates:
        raise ValueError(
            "A model with a zero-inflation probability with covariates (ziformula) has no SavedModel "
            "export: save it with model.save('model.keras') and predict with predict_response.")
    if ordinal:
        # Its answer is a probability per category (predict_response): refused rather
        # than serving something else.
        raise ValueError(
            "An ordinal model has no SavedModel export (its predictions are category probabilities): "
            "save it with model.save('model.keras') and predict with predict_response.")


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
    with written_to(filepath):
        tf.saved_model.save(module, str(filepath), signatures={"serving_default": module.serve})
    return sorted(module.serve.input_signature[0])


def serving_features(model, data):
    """The serving signature's inputs for the rows of a data frame (numpy arrays, each
    raw column in its training dtype: what a client sends)."""
    design = model.design
    plan = _Plan(design)
    features = {c: levels_lib.serving_values(data[c], kind, c) for c, kind in plan.kinds.items()}
    dropped = [name for name, graph in plan.random.items() if graph is None]
    if plan.fixed is None or design.spec.offsets or dropped:
        x, _ = design.arrays(data, with_response=False)
        if plan.fixed is None:
            features["x"] = np.asarray(x["x"], "float32")
        if "offset" in x:
            features["offset"] = np.asarray(x["offset"], "float32")
        for name in dropped:
            features[name + "_z"] = np.asarray(x[name + "_z"], "float32")
    check_request(features, plan.signature())
    return features
