"""Level keys: the one definition of how grouping values become a level's key.

Every place that maps a grouping value to a random-effect level goes through this
module: the design (training levels, ``level_index`` on new data, hence
``predict_response``), the streamed scan of files (level vocabularies and counts)
and the SavedModel graph (`keras_glmm.serving`). Python and TensorFlow versions of
the same function live side by side here, and ``tests/test_serving.py`` checks that
they agree value by value.

The key of one value (:func:`level_key`) is a canonical string, the same whatever
the column's type: ``308``, ``308.0``, ``np.int32(308)``, ``"308"`` and a
categorical's category ``308`` are all ``"308"``; a float that is not a whole
number is its shortest round-trip ``repr`` (``1.5 -> "1.5"``, ``0.1 -> "0.1"``);
booleans are ``"True"``/``"False"``; a date-time is pandas' ``str(Timestamp)``
(``"2020-01-31 00:00:00"``, ``"2020-01-31 12:00:00+01:00"`` with a time zone;
``numpy.datetime64`` values, whatever their unit, are keyed as Timestamps) and a
time difference ``str(Timedelta)`` (``"1 days 00:00:00"``); anything else is
``str(value)``. So a level matches across the types a column may take between
training and prediction, and a date-time grouping column (``(1 | day)``) has one
level per timestamp, named by its key.

A level of an interaction or nested term (``a:b``, the ``a:b`` of ``a/b``)
combines its parts' keys without ambiguity (:func:`combine_keys`): each part is
prefixed by its length in UTF-8 bytes, ``("x:1", "y") -> "3:x:11:y"`` while
``("x", "1:y") -> "1:x3:1:y"``. A single column's key is the part itself. Keys are
internal; the level *names* shown to users (``ranef()``'s index, errors) are
lme4's, the parts joined by ``":"`` (:func:`level_name`), which two levels may
share when their parts contain ``":"`` (lme4 would merge them; here they stay two
levels).

In the SavedModel graph (:func:`graph_part_keys`) a grouping column arrives in the
dtype it had at training (:func:`column_kind`, :func:`serving_dtype`): ``int64``
for integer columns (the key is ``tf.strings.as_string``, exactly ``str(int)``),
``float32``/``float64`` for float columns (the key is looked up by the value's
IEEE bits in a table built at export from the training keys, ``-0.0`` folded into
``0.0``; a value not in it has no key and is a new level), ``bool`` for boolean
columns, and ``string`` for everything else, string and categorical columns with
string categories (the client sends the key, e.g. ``"308"``; a categorical column
takes the type of its categories). Sending the training type removes the one
freedom that produced different keys (``str(308.0) == "308.0"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "KINDS",
    "column_codes",
    "column_kind",
    "column_levels",
    "column_strings",
    "combine_keys",
    "frame_codes",
    "level_key",
    "level_keys",
    "level_name",
    "serving_values",
    "split_key",
]

#: Serving kinds of a column: the dtype its raw values have in the SavedModel signature.
KINDS = ("string", "int64", "float32", "float64", "bool")

_INT_SAFE = 2.0**62  # floats below this convert to int64 exactly (vectorized path)


# --------------------------------------------------------------------------
# One value, one column
# --------------------------------------------------------------------------


def level_key(value: Any) -> str:
    """The key of one grouping value: ``308 -> "308"``, ``308.0 -> "308"``,
    ``1.5 -> "1.5"``, ``True -> "True"``, ``"a" -> "a"``."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, np.timedelta64):  # before np.integer: numpy makes it a subclass of it
        return str(pd.Timedelta(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v) and v == int(v):
            return str(int(v))
        return repr(v)
    if isinstance(value, np.datetime64):  # str() of one depends on its unit: "2020-01-31T00:00:00.000000"
        return str(pd.Timestamp(value))
    return str(value)


def level_keys(values: Any) -> list[str]:
    """:func:`level_key` of each value, vectorized for integer, boolean, float and
    string arrays (a chunk of a large file can hold 50,000 levels)."""
    arr = np.asarray(values)
    kind = arr.dtype.kind
    if kind in "mM":  # tolist() would give ints (ns) or datetime.datetime (us): key each as pandas does
        return [level_key(v) for v in arr]
    if kind in "iub":
        return arr.astype(str).tolist()
    if kind == "f":
        out = np.empty(arr.shape, dtype=object)
        whole = np.isfinite(arr) & (np.abs(arr) < _INT_SAFE)
        whole[whole] = arr[whole] == np.trunc(arr[whole])
        out[whole] = arr[whole].astype(np.int64).astype(str)
        rest = np.flatnonzero(~whole)
        out[rest] = [level_key(v) for v in arr[rest].tolist()]
        return out.tolist()
    return [v if type(v) is str else level_key(v) for v in arr.tolist()]


def column_kind(values: Any) -> str:
    """The serving kind of a column (one of :data:`KINDS`), from its dtype; a
    categorical column has the kind of its categories."""
    dtype = getattr(values, "dtype", None)
    if dtype is None:
        dtype = np.asarray(values).dtype
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = dtype.categories.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int64"
    if pd.api.types.is_float_dtype(dtype):
        return "float32" if np.dtype(getattr(dtype, "numpy_dtype", dtype)) == np.float32 else "float64"
    return "string"


def _numeric_like(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def column_levels(series: pd.Series) -> list[str]:
    """The keys of a column's observed levels, in level order: a categorical
    column's category order (unused categories dropped, like lme4's ``factor()``),
    otherwise the sorted unique values (numerically when every key is numeric-like).

    Keys are made by :func:`level_keys`, vectorized: a numeric column of 200,000
    levels costs milliseconds (a Python loop over them took a good part of a second).
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        used = np.unique(series.cat.codes.to_numpy())
        raw = series.cat.categories.take(used[used >= 0])
        keys = level_keys(raw.to_numpy() if raw.dtype.kind in "iufb" else raw.astype(object).to_numpy())
    elif pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        uniques = series.dropna().unique()
        values = np.asarray(uniques)
        if values.dtype.kind not in "iufb":  # an extension array of objects: value by value
            values = np.array(sorted(uniques), dtype=object)
        keys = level_keys(np.sort(values) if values.dtype.kind in "iufb" else values)
    else:
        raw = pd.unique(series.dropna())
        strs = level_keys(raw) if len(raw) else []
        if strs and all(_numeric_like(s) for s in strs):
            order = sorted(range(len(raw)), key=lambda i: float(strs[i]))
        else:
            order = sorted(range(len(raw)), key=lambda i: strs[i])
        keys = [strs[i] for i in order]
    return list(dict.fromkeys(keys))  # distinct values with one key (1 and "1") are one level


def column_strings(series: pd.Series) -> np.ndarray:
    """Each row's level key (object array); ``None`` where missing."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    names = np.array(level_keys(uniques) + [None], dtype=object)
    return names[np.where(codes < 0, len(uniques), codes)]


def column_codes(values: Any) -> tuple[np.ndarray, list[str]]:
    """Distinct keys of a column and each row's position among them.

    Returns:
        ``(codes, keys)``: ``codes`` int64, ``-1`` where the value is missing;
        ``keys`` the distinct keys, in order of first appearance. Values of
        different types with one key (``1``, ``1.0`` and ``"1"`` in an object
        column) share one code.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    codes = codes.astype(np.int64)
    keys = level_keys(uniques)
    if len(set(keys)) < len(keys):
        key_codes, distinct = pd.factorize(np.array(keys, dtype=object))
        codes = np.where(codes < 0, -1, key_codes[np.maximum(codes, 0)]).astype(np.int64)
        keys = [str(k) for k in distinct]
    return codes, keys


def frame_codes(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Distinct combinations of several columns' keys and each row's position among them.

    Keys are made once per distinct value, not per row: the codes of
    ``pd.factorize`` carry the rows.

    Returns:
        ``(codes, parts)``: ``codes`` int64, ``-1`` where any column is missing;
        ``parts`` the distinct combinations (tuples of part keys), in no
        particular order.
    """
    codes, keys = column_codes(frame[columns[0]])
    parts = [(k,) for k in keys]
    for column in columns[1:]:
        more, more_keys = column_codes(frame[column])
        missing = (codes < 0) | (more < 0)
        combined = np.where(missing, -1, codes * max(len(more_keys), 1) + more)
        values, inverse = np.unique(combined, return_inverse=True)
        inverse = inverse.reshape(-1).astype(np.int64)
        offset = int(values[0] < 0) if len(values) else 0
        parts = [
            parts[v // len(more_keys)] + (more_keys[v % len(more_keys)],) for v in values[offset:].tolist()
        ]
        codes = np.where(missing, -1, inverse - offset)
    return codes, parts


# --------------------------------------------------------------------------
# Several columns: interactions and nesting
# --------------------------------------------------------------------------


def combine_keys(parts: Sequence[str]) -> str:
    """The key of a combination of part keys: the part itself for one column, else
    each part prefixed by its length in UTF-8 bytes and ``":"`` (collision-free)."""
    if len(parts) == 1:
        return parts[0]
    return "".join(f"{len(p.encode('utf-8'))}:{p}" for p in parts)


def split_key(key: str, n: int) -> tuple[str, ...]:
    """Inverse of :func:`combine_keys` for ``n`` parts."""
    if n == 1:
        return (key,)
    data, parts, at = key.encode("utf-8"), [], 0
    for _ in range(n):
        colon = data.index(b":", at)
        length = int(data[at:colon])
        parts.append(data[colon + 1 : colon + 1 + length].decode("utf-8"))
        at = colon + 1 + length
    if at != len(data):
        raise ValueError(f"level key {key!r} does not hold {n} parts")
    return tuple(parts)


def level_name(parts: Sequence[str]) -> str:
    """The name shown to users (lme4's): the parts joined by ``":"``."""
    return ":".join(parts)


# --------------------------------------------------------------------------
# Serving: raw values in the signature's dtype, and the same keys in the graph
# --------------------------------------------------------------------------


def serving_dtype(kind: str):
    """The TensorFlow dtype of a column of this kind in the serving signature."""
    import tensorflow as tf

    return {"string": tf.string, "int64": tf.int64, "float32": tf.float32, "float64": tf.float64,
            "bool": tf.bool}[kind]


def serving_values(values: Any, kind: str, column: str = "column") -> np.ndarray:
    """A data column's raw values in the serving signature's dtype (what a client
    sends): keys for ``"string"``, numbers for numeric kinds, booleans for ``"bool"``.

    Raises:
        ValueError: a value the kind cannot hold (naming the column and value).
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    if kind == "string":
        return np.array(level_keys(series), dtype=object)
    if kind == "bool":
        if pd.api.types.is_bool_dtype(series.dtype):
            return series.to_numpy(dtype=bool)
        keys = level_keys(series)
        bad = [k for k in keys if k not in ("True", "False", "1", "0")]
        if bad:
            raise ValueError(f"column '{column}' is served as bool (its type in training); it holds {bad[0]!r}")
        return np.array([k in ("True", "1") for k in keys], dtype=bool)
    numbers = pd.to_numeric(series, errors="coerce")
    bad = (numbers.isna() & series.notna()).to_numpy()
    if bad.any():
        raise ValueError(
            f"column '{column}' is served as {kind} (its type in training); it holds "
            f"{series[bad].iloc[0]!r}, which is not a number"
        )
    arr = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    if kind == "int64":
        off = ~np.isfinite(arr) | (arr != np.trunc(arr))
        if off.any():
            raise ValueError(
                f"column '{column}' is served as int64 (its type in training); it holds "
                f"{series[off].iloc[0]!r}, which is not a whole number"
            )
        if pd.api.types.is_integer_dtype(series.dtype):
            return series.to_numpy(dtype=np.int64)
        return arr.astype(np.int64)
    return arr.astype(np.float32 if kind == "float32" else np.float64)


def _float_bits(x: float) -> int:
    return int(np.array([float(x) + 0.0], dtype=np.float64).view(np.int64)[0])


def float_key_table(keys: Sequence[str]):
    """A ``StaticHashTable`` from a float64 value's bits to its key, over the keys
    that a float column can produce (``"308"``, ``"1.5"``); ``""`` for others."""
    import tensorflow as tf

    bits, found = [], []
    for key in dict.fromkeys(keys):
        try:
            x = float(key)
        except (TypeError, ValueError):
            continue
        if level_key(x) == key:
            bits.append(_float_bits(x))
            found.append(key)
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(bits, tf.int64, shape=[len(bits)]), tf.constant(found, tf.string, shape=[len(found)])
    )
    return tf.lookup.StaticHashTable(init, default_value="")


def graph_part_keys(values, kind: str, table=None):
    """:func:`level_key` of a column's values as TensorFlow ops (see the module
    docstring); ``table`` is the column's :func:`float_key_table` for float kinds."""
    import tensorflow as tf

    if kind == "string":
        return values
    if kind == "int64":
        return tf.strings.as_string(tf.cast(values, tf.int64))
    if kind == "bool":
        return tf.where(tf.cast(values, tf.bool), tf.constant("True"), tf.constant("False"))
    if kind in ("float32", "float64"):
        if table is None:
            raise ValueError("a float column's keys need its float_key_table")
        bits = tf.bitcast(tf.cast(values, tf.float64) + 0.0, tf.int64)  # -0.0 + 0.0 == +0.0
        return table.lookup(bits)
    raise ValueError(f"unknown column kind {kind!r}; expected one of {KINDS}")


def graph_combine_keys(parts):
    """:func:`combine_keys` as TensorFlow ops on string tensors of part keys."""
    import tensorflow as tf

    if len(parts) == 1:
        return parts[0]
    pieces = []
    for p in parts:
        pieces += [tf.strings.as_string(tf.strings.length(p, unit="BYTE")), tf.fill(tf.shape(p), ":"), p]
    return tf.strings.join(pieces)
