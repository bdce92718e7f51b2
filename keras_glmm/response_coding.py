"""Reading a formula's response from a data frame, as the family needs it.

The kinds of response (:func:`learn_response`, frozen in the design):

* ``"continuous"``: any non-binomial family but the ordinal one (counts included);
* ``"binary"``: a binomial response of 0/1, booleans, or a two-level factor
  (``levels``: ``[failure, success]``, unused categories dropped as R does);
* ``"cbind"``: ``cbind(successes, failures)``, read as ``[successes, trials]``;
* ``"proportion"``: proportions with ``weights`` the number of trials, read as
  ``[successes, trials]``, each a whole number;
* ``"ordinal"``: ordered categories, read as codes ``1..K`` (:mod:`keras_glmm.ordinal`).

Errors name the response, the row and the value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from keras_glmm import ordinal as ordinal_lib
from keras_glmm.data_columns import (
    INTEGER_TOL,
    check_integer,
    eval_expr,
    float_array,
    is_categorical,
    row_labels,
    unknown_column,
)
from keras_glmm.formula import FormulaSpec
from keras_glmm.levels import column_levels, column_strings, level_key

__all__ = ["learn_response", "response_array", "weights_array"]


def weights_array(data: pd.DataFrame, weights: Any) -> np.ndarray:
    """``weights`` (a column name or an array of one value per row) as float64 ``(n,)``."""
    if isinstance(weights, str):
        if weights not in data.columns:
            raise unknown_column(weights, "weights", data)
        weights = data[weights]
    return float_array(weights, len(data), "weights")


def learn_response(
    spec: FormulaSpec, family_name: str, data: pd.DataFrame, weights: np.ndarray | None
) -> tuple[str, list[str] | None]:
    """How the response of ``spec`` is read for ``family_name``: ``(kind, levels)``
    (see :attr:`keras_glmm.design.Design.response_kind`), checked on ``data``."""
    levels = None
    if family_name == "ordinal":  # ordered categories, read as codes 1..K
        raw = eval_expr(spec.response, data, f"the response {spec.response}")
        series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
        levels = ordinal_lib.response_levels(series, spec.response)
        kind = "ordinal"
    elif family_name != "binomial":
        kind = "continuous"
    elif spec.cbind() is not None:
        kind = "cbind"
    else:
        raw = eval_expr(spec.response, data, f"the response {spec.response}")
        series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
        if is_categorical(series):
            if isinstance(series.dtype, pd.CategoricalDtype):  # unused categories dropped, as R does
                levels = [level_key(c) for c in series.cat.remove_unused_categories().cat.categories]
            else:
                levels = column_levels(series)
            if len(levels) != 2:
                raise ValueError(
                    f"binomial response '{spec.response}' is categorical with "
                    f"{len(levels)} level(s) {levels[:10]}; it needs exactly 2 "
                    "(the second is 'success'), or use 0/1, cbind(successes, failures) "
                    "or proportions with weights"
                )
            kind = "binary"
        elif weights is not None:
            kind = "proportion"
        else:
            kind = "binary"
    response_array(spec, family_name, kind, levels, data, weights)  # validate now
    return kind, levels


def response_array(
    spec: FormulaSpec, family_name: str, kind: str, levels: list[str] | None, data: pd.DataFrame,
    weights: Any = None,
) -> np.ndarray:
    """The response as float64: ``(n,)``, or ``(n, 2)`` ``[successes, trials]``
    for ``cbind`` and proportion responses (read as ``kind`` says, with ``levels``)."""
    if spec.response is None:
        raise ValueError("the formula has no response (left-hand side)")
    n = len(data)
    where = f"the response {spec.response}"
    if kind == "cbind":
        s_expr, f_expr = spec.cbind()
        s = float_array(eval_expr(s_expr, data, where), n, f"successes '{s_expr}'")
        f = float_array(eval_expr(f_expr, data, where), n, f"failures '{f_expr}'")
        s = check_integer(s, f"successes '{s_expr}' of cbind()", data.index)
        f = check_integer(f, f"failures '{f_expr}' of cbind()", data.index)
        return np.column_stack([s, s + f])
    raw = eval_expr(spec.response, data, where)
    series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
    name = spec.response
    if kind == "continuous":
        if is_categorical(series):
            raise ValueError(
                f"response '{name}' is categorical ({series.dtype}); the "
                f"{family_name} family needs a numeric response"
            )
        y = float_array(series, n, f"response '{name}'")
        if not np.isfinite(y).all():
            bad = ~np.isfinite(y)
            raise ValueError(f"response '{name}' is not finite at rows {row_labels(data.index, bad)}")
        return y
    if kind == "binary":
        return _binary(name, levels, series, data.index)
    if kind == "ordinal":
        return ordinal_lib.response_codes(series, levels, name, data.index)
    # proportion
    if weights is None:
        raise ValueError(
            f"binomial response '{name}' was fitted as proportions: pass weights (number of trials)"
        )
    w = weights_array(data, weights)
    if is_categorical(series):
        raise ValueError(f"binomial response '{name}' with weights must be numeric proportions")
    p = float_array(series, n, f"response '{name}'")
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise ValueError(
            f"binomial response '{name}' with weights must be proportions in [0, 1]; "
            f"rows {row_labels(data.index, bad)} are not"
        )
    w = check_integer(w, "binomial weights (number of trials)", data.index)
    s = p * w
    off = np.abs(s - np.round(s)) > INTEGER_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"binomial response '{name}' times weights must be whole numbers of successes; "
            f"row {data.index[i]!r}: {float(p[i])!r} * {float(w[i])!r} = {float(s[i])!r}"
        )
    return np.column_stack([np.round(s), w])


def _binary(name: str, levels: list[str] | None, series: pd.Series, index: pd.Index) -> np.ndarray:
    if is_categorical(series):
        if levels is None:
            raise ValueError(f"binomial response '{name}' was numeric at fit time, got {series.dtype}")
        strings = column_strings(series)
        known = {lvl: float(i) for i, lvl in enumerate(levels)}
        bad = np.array([s not in known for s in strings], dtype=bool)
        if bad.any():
            other = sorted({str(s) for s in strings[bad]})[:5]
            raise ValueError(
                f"binomial response '{name}' has value(s) {other} that are not among its levels "
                f"{levels} (rows {row_labels(index, bad)})"
            )
        return np.array([known[s] for s in strings], dtype=np.float64)
    y = float_array(series, len(series), f"response '{name}'")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if np.isfinite(y[bad]).all() and ((y[bad] > 0) & (y[bad] < 1)).all():
            hint = "proportions need weights= (the number of trials)"
        else:
            hint = "use cbind(successes, failures) for counts"
        raise ValueError(
            f"binomial response '{name}' must be 0/1 (or boolean, or a two-level factor); "
            f"row {index[i]!r} has {float(y[i])!r}: {hint}"
        )
    return y
