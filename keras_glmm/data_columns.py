"""Reading a data frame's columns for a design: values, and errors that name the column and rows.

Offsets and the response are evaluated here (formulaic evaluates the terms of
the fixed part and of the random terms, :mod:`keras_glmm.coding`). Their
expressions are checked against the formula language
(:mod:`keras_glmm.expressions`) before they get here; :func:`eval_expr` then
evaluates them with a namespace of :data:`EVAL_NAMESPACE` and the data's
columns only (no builtins).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import pandas as pd

from keras_glmm.formula import _NAME, _tokenize, _unquote

__all__ = [
    "EVAL_NAMESPACE",
    "as_frame",
    "available",
    "check_integer",
    "eval_expr",
    "expr_columns",
    "float_array",
    "frame_fingerprint",
    "is_categorical",
    "missing_name",
    "row_labels",
    "unknown_column",
]

MAX_LISTED_COLUMNS = 30
MAX_LISTED_ROWS = 10
INTEGER_TOL = 1e-8


def as_frame(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, dict):
        return pd.DataFrame(data)
    raise TypeError(f"data must be a pandas DataFrame (or a dict of columns), got {type(data).__name__}")


def available(data: pd.DataFrame) -> str:
    cols = [str(c) for c in data.columns]
    if len(cols) <= MAX_LISTED_COLUMNS:
        return f"; available columns: {cols}"
    return f"; the data has {len(cols)} columns"


def unknown_column(
    name: str, where: str, data: pd.DataFrame, exc: BaseException | None = None
) -> ValueError:
    detail = ""
    m = re.search(r"evaluate factor `([^`]+)`", str(exc)) if exc is not None else None
    if m and m.group(1) != name:
        detail = f" (in '{m.group(1)}')"
    return ValueError(f"unknown column '{name}' in {where}{detail}{available(data)}")


def missing_name(exc: BaseException) -> str | None:
    """The variable name in a formulaic/Python 'not found' error message, if any."""
    text = str(exc)
    for pattern in (r"`([^`]+)` is not present in the dataset", r"name '([^']+)' is not defined"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def is_categorical(series: pd.Series) -> bool:
    """String, object or pandas categorical columns (booleans are numeric, as in formulaic)."""
    return isinstance(series.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype)
    )


def row_labels(index: pd.Index, mask: np.ndarray) -> str:
    rows = index[np.flatnonzero(mask)]
    shown = ", ".join(repr(r) if isinstance(r, str) else str(r) for r in rows[:MAX_LISTED_ROWS])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > MAX_LISTED_ROWS else ""
    return f"[{shown}{more}]"


# Names an offset/response expression may use besides the data columns.
EVAL_NAMESPACE: dict[str, Any] = {
    "np": np,
    "numpy": np,
    "log": np.log,
    "log1p": np.log1p,
    "log2": np.log2,
    "log10": np.log10,
    "exp": np.exp,
    "expm1": np.expm1,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "I": lambda v: v,
    "True": True,
    "False": False,
}


def expr_columns(expr: str, data_columns) -> list[str]:
    """Data columns named in a Python/R expression (dotted and backticked names handled)."""
    cols = {str(c) for c in data_columns}
    out = []
    for tok in _tokenize(expr):
        if tok.kind == _NAME:
            name = _unquote(tok.text)
            if name in cols and name not in out:
                out.append(name)
    return out


def eval_expr(expr: str, data: pd.DataFrame, where: str) -> Any:
    """Evaluate an offset / response expression against the data columns.

    Supports plain (or backticked) columns, arithmetic and ``log()``,
    ``np.log()``-style calls. Column names are substituted by placeholders
    first, so R-style dotted names (``log.x``) work.
    """
    if expr in data.columns:
        return data[expr]
    cols = {str(c): c for c in data.columns}
    tokens = _tokenize(expr)
    namespace: dict[str, Any] = dict(EVAL_NAMESPACE)
    pieces, last = [], 0
    for tok in tokens:
        if tok.kind != _NAME:
            continue
        name = _unquote(tok.text)
        if name in cols:
            key = f"__col{len(namespace)}"
            namespace[key] = data[cols[name]]
            pieces.append(expr[last : tok.pos])
            pieces.append(key)
            last = tok.pos + len(tok.text)
        elif tok.text.startswith("`"):
            raise unknown_column(name, where, data)
    pieces.append(expr[last:])
    code = "".join(pieces)
    try:
        return eval(code, {"__builtins__": {}}, namespace)  # noqa: S307 - formulas are code
    except NameError as e:
        name = missing_name(e) or str(e)
        raise unknown_column(name, where, data, e) from None
    except Exception as e:  # pragma: no cover - user expression errors
        raise ValueError(f"could not evaluate {where}: {type(e).__name__}: {e}") from e


def float_array(values: Any, n: int, what: str) -> np.ndarray:
    if isinstance(values, pd.Series):
        if is_categorical(values):
            raise ValueError(f"{what} must be numeric, got a {values.dtype} column")
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{what} has shape {arr.shape}, expected ({n},)")
    return arr


def check_integer(arr: np.ndarray, what: str, index: pd.Index | None = None) -> np.ndarray:
    bad = ~np.isfinite(arr) | (arr < 0) | (np.abs(arr - np.round(arr)) > INTEGER_TOL)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = i if index is None else index[i]
        raise ValueError(
            f"{what} must be non-negative integers (counts); row {row!r} has {float(arr[i])!r}"
        )
    return np.round(arr)


def frame_fingerprint(data: pd.DataFrame, columns: list[str]):
    """What a data frame's ``columns`` hold, cheaply: the frame's identity, its
    index's, and per column its dtype, length, buffer address and CRC-32 of its
    bytes; ``None`` when a column is not a plain NumPy array of numbers or booleans
    (strings, categoricals, extension arrays), whose bytes say nothing.

    Two equal fingerprints mean, all but certainly, the same values in these
    columns: replacing a column or the index changes an identity or an address
    (an identity may be reused once its object is freed, so the CRC is what vouches
    for the values), and an edit in place changes the CRC where it is confined to 32
    consecutive bits (one float32 value; a burst, which CRC-32 always detects);
    other edits go unseen with probability about 2**-32 per column. A 32M-row column
    of float64 costs about 0.06 s (zlib's CRC-32 runs at some 4 GB/s).
    """
    parts: list[Any] = [id(data), id(data.index)]
    for column in columns:
        if column not in data.columns:
            return None
        series = data[column]
        if not isinstance(series.dtype, np.dtype) or series.dtype.kind not in "biuf":
            return None
        values = np.ascontiguousarray(series.to_numpy())
        parts.append((column, str(values.dtype), len(values), values.__array_interface__["data"][0],
                      zlib.crc32(values)))
    return tuple(parts)
