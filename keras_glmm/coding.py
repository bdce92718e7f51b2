"""formulaic's model matrices, frozen at fit time and reused on new data, named as lme4 names them.

The fixed part, each random-effect term's left-hand side and the
zero-inflation formula are each a formulaic right-hand side. :func:`build_matrix`
materializes one on the training rows (its ``model_spec`` is the frozen coding:
categories, contrasts, states of stateful transforms); :func:`spec_matrix`
evaluates that coding on any rows. Decisions of R's model frame kept here:

* an unused category of a categorical column is no level
  (:func:`drop_unused_categories`, R's ``drop.unused.levels``);
* a level of a categorical factor not seen in training is an error naming the
  column and level (:func:`check_known_levels`; formulaic would code it as zeros);
* a date-time column used as a number is refused (:func:`refuse_datetimes`);
* columns are named as lme4 names them (:func:`lme4_name`).

formulaic's errors become ``ValueError``s naming the part and the column.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.errors import FactorEvaluationError

from keras_glmm.data_columns import expr_columns, missing_name, unknown_column
from keras_glmm.expressions import FORMULA_CONTEXT, check_formula
from keras_glmm.formula import _unquote
from keras_glmm.levels import level_key

__all__ = [
    "C_CALL",
    "ZI_WHERE",
    "build_matrix",
    "categorical_factors",
    "check_known_levels",
    "dependent_columns",
    "drop_unused_categories",
    "formula_columns",
    "formula_variables",
    "formulaic_errors",
    "lme4_name",
    "refuse_datetimes",
    "spec_matrix",
]

ZI_WHERE = "the zero-inflation formula (ziformula)"  # how messages name the ziformula


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and backticks."""
    parts, depth, cur, quote = [], 0, [], None
    for c in text:
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
            continue
        if c in "`'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    parts.append("".join(cur))
    return parts


_LEVEL_RE = re.compile(r"^(?P<expr>.*)\[(?:[A-Za-z]+\.)?(?P<level>[^\[\]]*)\]$", re.S)
C_CALL = re.compile(r"^C\(\s*(?P<var>`[^`]+`|[A-Za-z_.][\w.]*)\s*(?:,.*)?\)$", re.S)


def lme4_name(name: str) -> str:
    """lme4/R-style name of a formulaic column name.

    ``"Intercept" -> "(Intercept)"``, ``"C(period)[T.2]" -> "period2"``,
    ``"f[T.b]" -> "fb"``, ``"x:C(f)[T.b]" -> "x:fb"``; anything else is kept.
    """
    if name == "Intercept":
        return "(Intercept)"
    out = []
    for part in _split_top(name, ":"):
        m = _LEVEL_RE.match(part)
        if m:
            expr = m.group("expr").strip()
            c = C_CALL.match(expr)
            var = c.group("var") if c else expr
            part = _unquote(var) + m.group("level")
        out.append(part)
    return ":".join(out)



@contextlib.contextmanager
def formulaic_errors(data: pd.DataFrame, where: str):
    """Translates formulaic's errors into clear ValueErrors naming the column or part."""
    try:
        yield
    except FactorEvaluationError as e:
        name = missing_name(e)
        if name is not None:
            raise unknown_column(name, where, data, e) from None
        raise ValueError(f"could not evaluate {where}: {e}") from e
    except Exception as e:
        raise ValueError(f"could not build the design of {where}: {e}") from e


def refuse_datetimes(data: pd.DataFrame, columns: dict, texts: dict) -> None:
    """A ValueError naming a date-time column used as a number (formulaic fails on it with
    a numpy error). As a factor, ``C(t)``, it is categorical, and grouping columns may be
    date-times: their levels are the timestamps (see `keras_glmm.levels`)."""
    parts = [("response", "the response"), ("offset", "an offset"), ("fixed", "the fixed effects"),
             ("random", "a random-effect term's covariates"), ("zi", "the zero-inflation formula")]
    for part, where in parts:
        for c in columns.get(part, []):
            if c not in data.columns or not (pd.api.types.is_datetime64_any_dtype(data[c].dtype)
                                             or pd.api.types.is_timedelta64_dtype(data[c].dtype)):
                continue
            text = texts.get(part)
            if text is not None:
                # Only a use outside C(c, ...) is numeric.
                text = re.sub(rf"\bC\(\s*{re.escape(c)}\s*(,[^()]*(\([^()]*\)[^()]*)*)?\)", "", text)
                if not re.search(rf"(?<![\w.]){re.escape(c)}(?![\w.])", text):
                    continue
            raise ValueError(
                f"column '{c}' (used by {where}) holds date-times ({data[c].dtype}), which a "
                "design cannot use as numbers: convert it to a number, e.g. days since the "
                f"first, (data['{c}'] - data['{c}'].min()).dt.days, or data['{c}'].dt.year; "
                f"as a factor, C({c}); as a grouping factor, (1 | {c}), its timestamps are levels"
            )


def build_matrix(formula: str, data: pd.DataFrame, where: str):
    """formulaic model matrix with errors translated to clear ValueErrors."""
    with formulaic_errors(data, where):
        return model_matrix(formula, data, context=FORMULA_CONTEXT, na_action="raise", output="pandas")


def categorical_factors(model_spec) -> list[str]:
    return [
        name
        for name, (kind, _state) in model_spec.encoder_state.items()
        if getattr(kind, "value", kind) == "categorical"
    ]


def spec_matrix(model_spec, data: pd.DataFrame, where: str) -> np.ndarray:
    """Evaluate a frozen ModelSpec on (new) data, refusing unseen categorical levels."""
    check_known_levels(model_spec, data, where)
    # A category the rows do not use is no level (R drops unused levels), and pandas
    # deprecates recoding a categorical whose categories the frozen coding lacks.
    data = drop_unused_categories(data, model_spec.variables_by_source.get("data", set()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with formulaic_errors(data, where):
            mm = model_spec.get_model_matrix(data, context=FORMULA_CONTEXT)
    for w in caught:
        if type(w.message).__name__ == "DataMismatchWarning":
            raise ValueError(f"{where}: {w.message}")
    for w in caught:  # pass the others on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return np.asarray(mm, dtype=np.float64)


def check_known_levels(model_spec, data: pd.DataFrame, where: str) -> None:
    """Name the column and level when new data has a categorical level unseen in training."""
    for factor, (kind, state) in model_spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        if factor in data.columns:
            var = factor
        else:
            m = C_CALL.match(factor)
            var = _unquote(m.group("var")) if m else None
            if var not in data.columns:
                continue  # a computed factor: left to formulaic's warning
        categories = list(state.get("categories", []))
        known = set(categories) | {level_key(c) for c in categories}
        values = pd.unique(data[var].dropna())
        unseen = [v for v in values if v not in known and level_key(v) not in known]
        if unseen:
            shown = ", ".join(repr(level_key(v)) for v in unseen[:5])
            raise ValueError(
                f"column '{var}' has level(s) {shown} not seen when the model was fitted "
                f"({where}); known levels: {[level_key(c) for c in categories]}"
            )


def drop_unused_categories(data: pd.DataFrame, columns) -> pd.DataFrame:
    """``data`` with the unused categories of its categorical ``columns`` removed
    (lme4's model frame drops unused levels: no all-zero random-effect column)."""
    cats = []
    for c in columns:
        if c in data.columns and isinstance(data[c].dtype, pd.CategoricalDtype):
            codes = data[c].cat.codes.to_numpy()
            used = np.bincount(codes[codes >= 0], minlength=len(data[c].cat.categories))
            if (used == 0).any():
                cats.append(c)
    if not cats:
        return data
    data = data.copy(deep=False)  # only the trimmed columns are new
    for c in cats:
        data[c] = data[c].cat.remove_unused_categories()
    return data


def dependent_columns(matrix: np.ndarray, names: list[str]) -> list[str]:
    """Each column that is zero or a linear combination of the columns before it, described.

    R's pivoting order (``lm`` reports the later of two collinear columns as
    ``NA``): columns are taken left to right, and one whose least-squares
    residual on the kept ones is below ``1e-7`` of its norm is dependent.
    """
    kept: list[int] = []
    out = []
    for j in range(matrix.shape[1]):
        column = matrix[:, j]
        norm = float(np.linalg.norm(column))
        if norm == 0.0:
            out.append(f"'{names[j]}' is all zeros")
            continue
        if kept:
            coef = np.linalg.lstsq(matrix[:, kept], column, rcond=None)[0]
            residual = float(np.linalg.norm(column - matrix[:, kept] @ coef))
            if residual <= 1e-7 * norm:
                parts = [names[kept[i]] for i in np.flatnonzero(np.abs(coef) > 1e-9)]
                out.append(f"'{names[j]}' is a linear combination of {parts}")
                continue
        kept.append(j)
    return out


def formula_variables(rhs: str, data: pd.DataFrame, where: str) -> list[str]:
    """Data columns a formulaic rhs uses (without evaluating it on all rows)."""
    try:
        mm = model_matrix(rhs, data, context=FORMULA_CONTEXT, na_action="ignore")
    except FactorEvaluationError as e:
        name = missing_name(e)
        if name is not None:
            raise unknown_column(name, where, data, e) from None
        raise ValueError(f"could not evaluate {where}: {e}") from e
    except Exception:
        # Some transforms fail on missing values; fall back on the names.
        return expr_columns(rhs, data.columns)
    found = mm.model_spec.variables_by_source.get("data", set())
    return [c for c in data.columns if str(c) in found]


def formula_columns(spec: Any, data: pd.DataFrame, zi_rhs: str | None = None) -> dict[str, list[str]]:
    """The data columns each part of the formula uses, checked to exist in ``data``.

    Returns:
        A dict of column lists: ``"response"`` and ``"offset"`` (named in
        those expressions), ``"group"`` (grouping factors), ``"fixed"`` and
        ``"random"`` (variables of the fixed part and of the random-effect
        terms' left-hand sides, as formulaic finds them), ``"zi"`` (those of
        the zero-inflation formula's right-hand side ``zi_rhs``) and ``"used"``
        (all of them, in ``data``'s column order).
    """
    check_formula(spec, data.columns, zi_rhs)  # in the language, names are columns: before any evaluation
    # Columns named by the response and offsets (evaluated by us, not formulaic).
    response_cols: list[str] = []
    if spec.response is not None:
        exprs = spec.cbind() or (spec.response,)
        for e in exprs:
            response_cols += [c for c in expr_columns(e, data.columns) if c not in response_cols]
    offset_cols: list[str] = []
    for e in spec.offsets:
        offset_cols += [c for c in expr_columns(e, data.columns) if c not in offset_cols]

    # Unknown-column checks that do not need formulaic.
    group_cols: list[str] = []
    for term in spec.random:
        for col in term.group_columns():
            if col not in data.columns:
                raise unknown_column(col, f"the grouping factor of random-effect term {term}", data)
            if col not in group_cols:
                group_cols.append(col)

    # formulaic's own variables are known only after a first pass over the data.
    fixed_vars = formula_variables(spec.fixed_rhs(), data, "the fixed effects")
    random_vars = [
        v for t in spec.random for v in formula_variables(t.expr, data, f"random-effect term {t}")
    ]
    zi_vars = [] if zi_rhs is None else formula_variables(zi_rhs, data, ZI_WHERE)
    used_set = {*response_cols, *offset_cols, *group_cols, *fixed_vars, *random_vars, *zi_vars}
    used = [c for c in data.columns if c in used_set or str(c) in used_set]
    return {
        "response": response_cols,
        "offset": offset_cols,
        "group": group_cols,
        "fixed": fixed_vars,
        "random": list(dict.fromkeys(random_vars)),
        "zi": zi_vars,
        "used": used,
    }
