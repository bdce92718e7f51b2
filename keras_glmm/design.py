"""From a data frame to the numeric design of a mixed model.

The work is split in three steps, as in MixedModels.jl (formula -> schema ->
arrays) and formulaic (formula -> ``ModelSpec`` -> model matrix):

1. :func:`keras_glmm.formula.parse_formula` turns the text into a
   :class:`~keras_glmm.formula.FormulaSpec` (no data involved).
2. :meth:`Design.from_data` learns everything that depends on the *training*
   data, once: formulaic ``ModelSpec`` objects (categorical levels, contrasts,
   stateful transforms), the levels of every grouping factor, how the response
   is coded. The result is frozen.
3. :meth:`Design.arrays` (and the smaller methods it calls) turns any data
   frame, training data or new data, into NumPy arrays using that frozen
   schema, so predictions on new data are coded exactly as the fit was.

Decisions worth knowing:

* Grouping factors are always categorical. A level is matched by its key,
  defined once in :mod:`keras_glmm.levels` (also used by the streamed scan
  and the SavedModel graph): ``308 -> "308"``, ``308.0 -> "308"``,
  ``1.5 -> "1.5"``, a categorical's category ``c -> key(c)``; so a column
  that was categorical at fit time and integer at prediction time still
  matches. Level order: a categorical column's category order (unused
  categories dropped, like lme4's ``factor()``), otherwise sorted unique
  values (numerically when every value is numeric-like). An interaction
  ``a:b`` has the observed combinations, ``a`` varying slowest (R's
  ``a:b``); their keys encode the parts without ambiguity
  (:attr:`RandomTermDesign.keys`), their names are lme4's ``"la:lb"``
  (:attr:`RandomTermDesign.levels`).
* Levels never seen in training get index ``-1`` (``allow_new_levels``: the
  random effect of a new level is its prior mean, zero).
* An unseen level of a categorical variable in the *fixed* part is an error
  (formulaic would silently code it as all zeros). Unused categories of a
  categorical column are no levels (R's model frame drops them), in the fixed
  part as in the random one.
* lme4's guard rails of the design (:mod:`keras_glmm.checks`): a fixed-effect
  column that is a linear combination of earlier ones is dropped with lme4's
  warning (:attr:`Design.fixed_dropped`; :meth:`Design.fixed_matrix` leaves it
  out everywhere, saved designs included), and a right-hand-side term equal to
  the response is dropped with R's.
* Random slopes on factors are coded like the fixed part: formulaic with
  treatment contrasts and R's rank reduction, named as lme4 names them.
  ``(gender | school)`` has ``"(Intercept)"`` and ``"genderM"`` (the
  non-reference levels); ``(0 + Machine | Worker)`` has a column per level,
  ``"MachineA"``, ``"MachineB"``, ...; ``(x + f | g)`` has ``"(Intercept)"``,
  ``"x"``, then ``f``'s non-reference levels. Unused categories of a
  categorical column are dropped first (lme4's model frame drops unused
  levels), so no random-effect column is all zeros. A level of the factor
  not seen in training is an error at prediction, naming the column and the
  level, as in the fixed part.
* ``(f || g)`` follows lme4's ``expandDoubleVerts`` (done by
  :mod:`keras_glmm.formula`): one term per term label of the left-hand side
  (R's ``terms()``: ``x * f`` gives ``x``, ``f`` and ``x:f``), so
  ``(f || g)`` is ``(1 | g) + (0 + f | g)``, the second
  term holding a column for *every* level of ``f`` with a full correlation
  matrix among them. lme4 documents that ``||`` does not split a factor's
  columns ("works only for design matrices containing numeric (continuous)
  predictors"), and this is the same model: over-parameterized for a factor
  (the intercept and the full dummy coding overlap), as in lme4. For
  independent per-level effects, use numeric indicator columns.
* Fixed-effect names follow lme4/R: ``"(Intercept)"``, and treatment-coded
  levels ``"C(period)[T.2]" -> "period2"`` (variable name + level). R cannot
  always be reproduced from names alone (a 0/1 numeric column fitted as a
  numeric variable is named ``"service"`` in R, while ``C(service)`` gives
  ``"service1"`` here), so compare coefficients by position when in doubt.
  formulaic's names are kept in :attr:`Design.fixed_formulaic_columns`.
* A zero-inflated family's ``ziformula`` (glmmTMB's) is a one-sided formula of
  fixed effects, coded like the fixed part (formulaic: treatment contrasts,
  ``C()``, ``I()``, ``0 +``) and frozen with it: :meth:`Design.arrays` returns
  its columns as ``inputs["x_zi"]``. ``"~1"`` (the default) is a constant
  zero-inflation probability, the family's ``zi_odds``, and adds no columns.
  Random effects and offsets are refused there, and so is a zi design whose
  columns are linearly dependent (the error names the columns), since its
  coefficients would not be identified.
* :meth:`Design.get_config` / :meth:`Design.from_config` round-trip a fitted
  design through plain JSON (for Keras ``safe_mode`` saving). formulaic
  ``ModelSpec`` objects are stored as formula text plus their learned
  structure, encoder state (categories, contrasts) and transform state
  (``center()``/``scale()``/``poly()``/``bs()``... training statistics); the
  training data is not needed to load. States holding values JSON cannot
  carry (e.g. tz-aware timestamp categories) raise ``TypeError`` on save.
* No TensorFlow here: everything is NumPy/pandas/formulaic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.errors import FactorEvaluationError

from keras_glmm.expressions import (
    FORMULA_CONTEXT,
    ExpressionError,
    check_formula,
    check_saved_design,
    check_saved_random_term,
)
from keras_glmm.formula import _NAME, FormulaSpec, RandomTerm, _tokenize, _unquote, parse_formula
from keras_glmm import checks as checks_lib
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import response as response_lib
from keras_glmm.levels import (
    column_kind,
    combine_keys,
    frame_codes,
    level_key,
    level_keys,
    level_name,
    split_key,
)

__all__ = ["Design", "RandomTermDesign", "lme4_name"]

# Keys of the ``arrays()`` dict that are not random-effect terms.
_RESERVED_KEYS = {"x", "x_zi", "offset", "y", "weights"}
_MAX_LISTED_COLUMNS = 30
_MAX_LISTED_ROWS = 10
_INTEGER_TOL = 1e-8


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _as_frame(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, dict):
        return pd.DataFrame(data)
    raise TypeError(f"data must be a pandas DataFrame (or a dict of columns), got {type(data).__name__}")


def _available(data: pd.DataFrame) -> str:
    cols = [str(c) for c in data.columns]
    if len(cols) <= _MAX_LISTED_COLUMNS:
        return f"; available columns: {cols}"
    return f"; the data has {len(cols)} columns"


def _unknown_column(
    name: str, where: str, data: pd.DataFrame, exc: BaseException | None = None
) -> ValueError:
    detail = ""
    m = re.search(r"evaluate factor `([^`]+)`", str(exc)) if exc is not None else None
    if m and m.group(1) != name:
        detail = f" (in '{m.group(1)}')"
    return ValueError(f"unknown column '{name}' in {where}{detail}{_available(data)}")


def _missing_name(exc: BaseException) -> str | None:
    """The variable name in a formulaic/Python 'not found' error message, if any."""
    text = str(exc)
    for pattern in (r"`([^`]+)` is not present in the dataset", r"name '([^']+)' is not defined"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def _is_categorical(series: pd.Series) -> bool:
    """String, object or pandas categorical columns (booleans are numeric, as in formulaic)."""
    return isinstance(series.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype)
    )


# A level's key is defined in one place, keras_glmm.levels (design, scan and serving
# graph share it); these names are kept for the modules that import them.
_level_str = level_key
_level_strs = level_keys


def _numeric_like(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _column_levels(series: pd.Series) -> list[str]:
    """Observed levels of one grouping column, as strings, in level order."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        used = np.unique(series.cat.codes.to_numpy())
        cats = series.cat.categories
        raw = [cats[c] for c in used if c >= 0]
    else:
        raw = list(pd.unique(series.dropna()))
        if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
            raw.sort()
        else:
            strs = [_level_str(v) for v in raw]
            if strs and all(_numeric_like(s) for s in strs):
                keys = [float(s) for s in strs]
                raw = [r for _, r in sorted(zip(keys, raw, strict=True), key=lambda t: t[0])]
            else:
                raw = [r for _, r in sorted(zip(strs, raw, strict=True), key=lambda t: t[0])]
    out: list[str] = []
    seen: set[str] = set()
    for v in raw:
        s = _level_str(v)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _column_strings(series: pd.Series) -> np.ndarray:
    """Each row's level string (object array); ``None`` where missing."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    names = np.array(_level_strs(uniques) + [None], dtype=object)
    return names[np.where(codes < 0, len(uniques), codes)]


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
_C_RE = re.compile(r"^C\(\s*(?P<var>`[^`]+`|[A-Za-z_.][\w.]*)\s*(?:,.*)?\)$", re.S)


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
            c = _C_RE.match(expr)
            var = c.group("var") if c else expr
            part = _unquote(var) + m.group("level")
        out.append(part)
    return ":".join(out)


def _safe_name(text: str) -> str:
    name = _unquote(text).replace(":", "_x_")
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name or "group"


def _row_labels(index: pd.Index, mask: np.ndarray) -> str:
    rows = index[np.flatnonzero(mask)]
    shown = ", ".join(repr(r) if isinstance(r, str) else str(r) for r in rows[:_MAX_LISTED_ROWS])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > _MAX_LISTED_ROWS else ""
    return f"[{shown}{more}]"


# Names an offset/response expression may use besides the data columns.
_EVAL_NAMESPACE: dict[str, Any] = {
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


def _expr_columns(expr: str, data_columns) -> list[str]:
    """Data columns named in a Python/R expression (dotted and backticked names handled)."""
    cols = {str(c) for c in data_columns}
    out = []
    for tok in _tokenize(expr):
        if tok.kind == _NAME:
            name = _unquote(tok.text)
            if name in cols and name not in out:
                out.append(name)
    return out


def _eval_expr(expr: str, data: pd.DataFrame, where: str) -> Any:
    """Evaluate an offset / response expression against the data columns.

    Supports plain (or backticked) columns, arithmetic and ``log()``,
    ``np.log()``-style calls. Column names are substituted by placeholders
    first, so R-style dotted names (``log.x``) work.
    """
    if expr in data.columns:
        return data[expr]
    cols = {str(c): c for c in data.columns}
    tokens = _tokenize(expr)
    namespace: dict[str, Any] = dict(_EVAL_NAMESPACE)
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
            raise _unknown_column(name, where, data)
    pieces.append(expr[last:])
    code = "".join(pieces)
    try:
        return eval(code, {"__builtins__": {}}, namespace)  # noqa: S307 - formulas are code
    except NameError as e:
        name = _missing_name(e) or str(e)
        raise _unknown_column(name, where, data, e) from None
    except Exception as e:  # pragma: no cover - user expression errors
        raise ValueError(f"could not evaluate {where}: {type(e).__name__}: {e}") from e


def _float_array(values: Any, n: int, what: str) -> np.ndarray:
    if isinstance(values, pd.Series):
        if _is_categorical(values):
            raise ValueError(f"{what} must be numeric, got a {values.dtype} column")
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{what} has shape {arr.shape}, expected ({n},)")
    return arr


def _check_integer(arr: np.ndarray, what: str, index: pd.Index | None = None) -> np.ndarray:
    bad = ~np.isfinite(arr) | (arr < 0) | (np.abs(arr - np.round(arr)) > _INTEGER_TOL)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = i if index is None else index[i]
        raise ValueError(
            f"{what} must be non-negative integers (counts); row {row!r} has {float(arr[i])!r}"
        )
    return np.round(arr)


@contextlib.contextmanager
def _formulaic_errors(data: pd.DataFrame, where: str):
    """Translates formulaic's errors into clear ValueErrors naming the column or part."""
    try:
        yield
    except FactorEvaluationError as e:
        name = _missing_name(e)
        if name is not None:
            raise _unknown_column(name, where, data, e) from None
        raise ValueError(f"could not evaluate {where}: {e}") from e
    except Exception as e:
        raise ValueError(f"could not build the design of {where}: {e}") from e


def _refuse_datetimes(data: pd.DataFrame, columns: dict, texts: dict) -> None:
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


def _model_matrix(formula: str, data: pd.DataFrame, where: str):
    """formulaic model matrix with errors translated to clear ValueErrors."""
    with _formulaic_errors(data, where):
        return model_matrix(formula, data, context=FORMULA_CONTEXT, na_action="raise", output="pandas")


def _categorical_factors(model_spec) -> list[str]:
    return [
        name
        for name, (kind, _state) in model_spec.encoder_state.items()
        if getattr(kind, "value", kind) == "categorical"
    ]


def _spec_matrix(model_spec, data: pd.DataFrame, where: str) -> np.ndarray:
    """Evaluate a frozen ModelSpec on (new) data, refusing unseen categorical levels."""
    _check_known_levels(model_spec, data, where)
    # A category the rows do not use is no level (R drops unused levels), and pandas
    # deprecates recoding a categorical whose categories the frozen coding lacks.
    data = _drop_unused_categories(data, model_spec.variables_by_source.get("data", set()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _formulaic_errors(data, where):
            mm = model_spec.get_model_matrix(data, context=FORMULA_CONTEXT)
    for w in caught:
        if type(w.message).__name__ == "DataMismatchWarning":
            raise ValueError(f"{where}: {w.message}")
    for w in caught:  # pass the others on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return np.asarray(mm, dtype=np.float64)


def _check_known_levels(model_spec, data: pd.DataFrame, where: str) -> None:
    """Name the column and level when new data has a categorical level unseen in training."""
    for factor, (kind, state) in model_spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        if factor in data.columns:
            var = factor
        else:
            m = _C_RE.match(factor)
            var = _unquote(m.group("var")) if m else None
            if var not in data.columns:
                continue  # a computed factor: left to formulaic's warning
        categories = list(state.get("categories", []))
        known = set(categories) | {_level_str(c) for c in categories}
        values = pd.unique(data[var].dropna())
        unseen = [v for v in values if v not in known and _level_str(v) not in known]
        if unseen:
            shown = ", ".join(repr(_level_str(v)) for v in unseen[:5])
            raise ValueError(
                f"column '{var}' has level(s) {shown} not seen when the model was fitted "
                f"({where}); known levels: {[_level_str(c) for c in categories]}"
            )


# --------------------------------------------------------------------------
# JSON round trip of formulaic ModelSpecs (for Keras ``get_config()``)
# --------------------------------------------------------------------------
#
# A fitted ModelSpec is rebuilt *without the training data*: the formula is
# re-parsed from its text, and everything formulaic learned at fit time is
# restored verbatim:
#
# * ``structure``: per term, its scoped terms (which factors, reduced rank or
#   not, scale) and output column names, so rank reduction and column names
#   are not re-derived;
# * ``encoder_state``: factor kind plus categories and contrasts
#   (``ContrastsState``) of categorical factors;
# * ``transform_state``: the state of stateful transforms (``center()``,
#   ``scale()``, ``poly()``, ``bs()``, ``cs()``, ...), e.g. the training mean.
#
# Values are written as plain JSON; what JSON cannot say is tagged
# (``{"__tuple__": [...]}``, ``{"__np__": "float64", "v": 1.5}``,
# ``{"__ndarray__": [...], "dtype": ..., "shape": ...}``, non-string dict keys,
# non-finite floats, tz-naive timestamps, formulaic enums and contrasts).
# Decoding only creates these whitelisted types (no imports by name, no
# pickles, no code). A state holding anything else (e.g. tz-aware timestamp or
# arbitrary-object categories) makes ``get_config()`` raise a ``TypeError``
# naming it, rather than silently approximating the coding. The formula text
# is re-parsed on load; if the installed formulaic parses it into other terms
# than at save time, loading raises a ``ValueError``.

_CONFIG_FORMAT = 1


def _formulaic_types() -> tuple[dict[str, type], dict[str, type]]:
    """Whitelisted formulaic enums and (data)classes that may appear in states."""
    from formulaic.materializers import ClusterBy, NAAction
    from formulaic.parser.types import Factor
    from formulaic.transforms import contrasts as _c
    from formulaic.utils.sentinels import Sentinel

    enums = {
        "Factor.Kind": Factor.Kind,
        "Factor.EvalMethod": Factor.EvalMethod,
        "NAAction": NAAction,
        "ClusterBy": ClusterBy,
        "Sentinel": Sentinel,
    }
    classes = {
        name: getattr(_c, name)
        for name in (
            "ContrastsState",
            "TreatmentContrasts",
            "SASContrasts",
            "SumContrasts",
            "HelmertContrasts",
            "DiffContrasts",
            "PolyContrasts",
            "CustomContrasts",
        )
        if hasattr(_c, name)
    }
    return enums, classes


def _to_json(value: Any, where: str) -> Any:
    """Encode a formulaic state value as plain JSON (tagging what JSON lacks)."""
    import dataclasses
    import enum

    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return {"__np__": value.dtype.name, "v": _to_json(value.item(), where)}
    if isinstance(value, pd.Timestamp) and value.tz is None:
        return {"__timestamp__": value.isoformat(), "unit": value.unit}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" and value.dtype != object:
            raise TypeError(f"cannot store {where}: array of dtype {value.dtype}")
        flat = [_to_json(v, where) for v in value.ravel().tolist()]
        return {"__ndarray__": flat, "dtype": value.dtype.str if value.dtype != object else "O",
                "shape": list(value.shape)}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_to_json(v, where) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v, where) for k, v in value.items()}
        return {"__dict__": [[_to_json(k, where), _to_json(v, where)] for k, v in value.items()]}
    enums, classes = _formulaic_types()
    if isinstance(value, enum.Enum):
        for name, cls in enums.items():
            if type(value) is cls:
                return {"__enum__": name, "v": value.value}
    else:
        name = type(value).__name__
        if classes.get(name) is type(value):
            if name == "CustomContrasts":
                fields = {"contrasts": value.contrasts, "names": value.contrast_names}
            else:
                fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return {"__formulaic__": name, "fields": _to_json(fields, where)}
    raise TypeError(
        f"cannot store {where} as JSON: {type(value).__module__}.{type(value).__qualname__} "
        f"value {value!r} is not supported"
    )


def _from_json(value: Any) -> Any:
    """Inverse of :func:`_to_json`."""
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__np__" in value:
        return np.dtype(value["__np__"]).type(_from_json(value["v"]))
    if "__ndarray__" in value:
        items = [_from_json(v) for v in value["__ndarray__"]]
        dtype = np.dtype(object) if value["dtype"] == "O" else np.dtype(value["dtype"])
        if dtype == object:
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
        else:
            arr = np.array(items, dtype=dtype)
        return arr.reshape(value["shape"])
    if "__timestamp__" in value:
        return pd.Timestamp(value["__timestamp__"]).as_unit(value["unit"])
    if "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if "__set__" in value:
        return {_from_json(v) for v in value["__set__"]}
    if "__dict__" in value:
        return {_hashable(_from_json(k)): _from_json(v) for k, v in value["__dict__"]}
    if "__enum__" in value:
        enums, _ = _formulaic_types()
        return enums[value["__enum__"]](value["v"])
    if "__formulaic__" in value:
        _, classes = _formulaic_types()
        cls = classes[value["__formulaic__"]]
        return cls(**_from_json(value["fields"]))
    return {k: _from_json(v) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _variables_to_json(variables) -> list | None:
    if variables is None:
        return None
    out = []
    for v in sorted(variables, key=str):
        roles = sorted(getattr(r, "value", r) for r in getattr(v, "roles", ()))
        out.append([str(v), roles, getattr(v, "source", None)])
    return out


def _variables_from_json(items) -> set | None:
    from formulaic.utils.variables import Variable

    if items is None:
        return None
    return {Variable(name, roles=roles, source=source) for name, roles, source in items}


def _model_spec_config(model_spec, rhs: str) -> dict[str, Any]:
    """JSON config of a materialized formulaic ModelSpec built from ``rhs``."""
    where = f"the formulaic model spec of '{rhs}'"
    structure = []
    for s in model_spec.structure:
        scoped = []
        for st in s.scoped_terms:
            factors = [
                {
                    "expr": sf.factor.expr,
                    "reduced": bool(sf.reduced),
                    "variables": _variables_to_json(sf.factor.variables),
                }
                for sf in st.factors
            ]
            scoped.append({"factors": factors, "scale": _to_json(st.scale, where)})
        structure.append(
            {"term": str(s.term), "scoped_terms": scoped, "columns": [str(c) for c in s.columns]}
        )
    encoder = {
        expr: [getattr(kind, "value", kind), _to_json(state, f"{where} (encoder state of '{expr}')")]
        for expr, (kind, state) in model_spec.encoder_state.items()
    }
    return {
        "rhs": rhs,
        "terms": [str(t) for t in model_spec.formula],
        "materializer": model_spec.materializer,
        "materializer_params": _to_json(model_spec.materializer_params, where),
        "ensure_full_rank": bool(model_spec.ensure_full_rank),
        "na_action": getattr(model_spec.na_action, "value", model_spec.na_action),
        "output": model_spec.output,
        "cluster_by": getattr(model_spec.cluster_by, "value", model_spec.cluster_by),
        "structure": structure,
        "encoder_state": encoder,
        "transform_state": _to_json(model_spec.transform_state, f"{where} (transform state)"),
    }


def _model_spec_from_config(config: dict[str, Any]):
    """Rebuild a materialized ModelSpec from :func:`_model_spec_config` (no data needed)."""
    from formulaic import ModelSpec
    from formulaic.materializers.base import EncodedTermStructure
    from formulaic.materializers.types import EvaluatedFactor, ScopedFactor, ScopedTerm
    from formulaic.parser.types import Factor

    rhs = config["rhs"]
    base = ModelSpec.from_spec(rhs, context={})
    terms = {str(t): t for t in base.formula}
    if [str(t) for t in base.formula] != list(config["terms"]):
        raise ValueError(
            f"formula '{rhs}' parses to terms {list(terms)} with this formulaic version, "
            f"but the saved design has {config['terms']}"
        )
    factors = {f.expr: f for t in base.formula for f in t.factors}
    structure = []
    for s in config["structure"]:
        if s["term"] not in terms:
            raise ValueError(f"saved design of '{rhs}' has unknown term '{s['term']}'")
        scoped = []
        for st in s["scoped_terms"]:
            scoped_factors = []
            for f in st["factors"]:
                factor = factors.get(f["expr"])
                if factor is None:
                    raise ValueError(f"saved design of '{rhs}' has unknown factor '{f['expr']}'")
                evaluated = EvaluatedFactor(
                    factor=factor, values=None, variables=_variables_from_json(f["variables"])
                )
                scoped_factors.append(ScopedFactor(evaluated, reduced=bool(f["reduced"])))
            scoped.append(ScopedTerm(scoped_factors, scale=_from_json(st["scale"])))
        structure.append(EncodedTermStructure(terms[s["term"]], scoped, list(s["columns"])))
    encoder_state = {
        expr: (Factor.Kind(kind), _from_json(state))
        for expr, (kind, state) in config["encoder_state"].items()
    }
    return base.update(
        materializer=config["materializer"],
        materializer_params=_from_json(config["materializer_params"]),
        ensure_full_rank=config["ensure_full_rank"],
        na_action=config["na_action"],
        output=config["output"],
        cluster_by=config["cluster_by"],
        structure=structure,
        encoder_state=encoder_state,
        transform_state=_from_json(config["transform_state"]),
    )


# --------------------------------------------------------------------------
# Random-effect terms
# --------------------------------------------------------------------------


@dataclass
class RandomTermDesign:
    """One random-effect term ``(expr | group)``, frozen at fit time.

    Attributes:
        term: The parsed term.
        name: Unique, Keras-safe name (``"g"``, ``"a_x_b"``, ``"g_2"``); also the
            key of its level index in :meth:`Design.arrays` (``name + "_z"``
            holds its covariates).
        levels: Level names (strings) of the grouping factor, in index order, as
            lme4 shows them (an interaction's parts joined by ``":"``).
        columns: lme4-style effect names (``"(Intercept)"``, ``"Days"``,
            ``"genderM"``).
        intercept: Whether ``columns[0]`` is the intercept.
        model_spec: formulaic ``ModelSpec`` of ``term.expr``.
        group_columns: Data columns making up the grouping factor.
        keys: Level keys (:mod:`keras_glmm.levels`), in index order: what
            :meth:`level_index` matches. A single column's key is its name; an
            interaction's key encodes its parts without ambiguity.
        group_kinds: Per grouping column, its serving kind
            (:func:`keras_glmm.levels.column_kind` of the training column): the
            dtype a SavedModel takes it in.
    """

    term: RandomTerm
    name: str
    levels: list[str]
    columns: list[str]
    intercept: bool
    model_spec: Any
    group_columns: tuple[str, ...] = ()
    keys: list[str] = field(default_factory=list)
    group_kinds: tuple[str, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.group_columns:
            self.group_columns = self.term.group_columns()
        n = len(self.group_columns)
        if not self.keys:
            self.keys = [_legacy_key(lvl, n, self.term) for lvl in self.levels]
        if len(self.keys) != len(self.levels):
            raise ValueError(f"{len(self.keys)} level keys for {len(self.levels)} levels of {self.term}")
        if not self.group_kinds:
            self.group_kinds = ("string",) * n
        self.group_kinds = tuple(self.group_kinds)
        if not self._index:
            self._index = {key: i for i, key in enumerate(self.keys)}

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_covariates(self) -> int:
        """Number of non-intercept columns (width of :meth:`covariates`)."""
        return len(self.columns) - int(self.intercept)

    def level_index(self, data: pd.DataFrame) -> np.ndarray:
        """Index of each row's level (int64); ``-1`` for a level unseen in training.

        Keys (:mod:`keras_glmm.levels`) are made once per distinct value
        (combination), not per row: the codes of ``pd.factorize`` carry the
        rows, so a chunk of 65,536 rows costs a few milliseconds (files are
        read chunk by chunk).
        """
        data = _as_frame(data)
        for col in self.group_columns:
            if col not in data.columns:
                raise ValueError(
                    f"grouping column '{col}' of random-effect term {self.term} is missing "
                    f"from the data{_available(data)}"
                )
            missing = data[col].isna().to_numpy()
            if missing.any():
                raise ValueError(
                    f"grouping column '{col}' has missing values at rows {_row_labels(data.index, missing)}"
                )
        if not len(data):
            return np.zeros(0, np.int64)
        codes, parts = frame_codes(data, self.group_columns)
        lookup = np.array([self._index.get(combine_keys(p), -1) for p in parts], dtype=np.int64)
        return lookup[codes]

    def covariates(self, data: pd.DataFrame) -> np.ndarray:
        """The term's non-intercept columns, float64 ``(n, len(columns) - intercept)``."""
        data = _as_frame(data)
        mat = _spec_matrix(self.model_spec, data, f"random-effect term {self.term}")
        return np.ascontiguousarray(mat[:, 1:] if self.intercept else mat)

    def get_config(self) -> dict[str, Any]:
        """Plain-JSON description of this term (see :meth:`Design.get_config`)."""
        return {
            "term": {
                "expr": self.term.expr,
                "group": self.term.group,
                "correlated": bool(self.term.correlated),
            },
            "name": self.name,
            "levels": [str(v) for v in self.levels],
            "columns": [str(c) for c in self.columns],
            "intercept": bool(self.intercept),
            "model_spec": _model_spec_config(self.model_spec, self.term.expr),
            "group_columns": [str(c) for c in self.group_columns],
            "keys": [str(k) for k in self.keys],
            "group_kinds": [str(k) for k in self.group_kinds],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RandomTermDesign":
        """Inverse of :meth:`get_config`."""
        check_saved_random_term(config)  # before formulaic parses anything of it (keras_glmm.expressions)
        t = config["term"]
        return cls(
            term=RandomTerm(expr=t["expr"], group=t["group"], correlated=bool(t["correlated"])),
            name=config["name"],
            levels=list(config["levels"]),
            columns=list(config["columns"]),
            intercept=bool(config["intercept"]),
            model_spec=_model_spec_from_config(config["model_spec"]),
            group_columns=tuple(config["group_columns"]),
            keys=list(config.get("keys", [])),  # older configs: derived from the names
            group_kinds=tuple(config.get("group_kinds", ())),
        )


def _legacy_key(name: str, n: int, term: RandomTerm) -> str:
    """The key of a level saved by name only (configs written before level keys)."""
    if n == 1:
        return name
    parts = name.split(":")
    if len(parts) != n:
        raise ValueError(
            f"level '{name}' of {term} cannot be split into its {n} grouping columns: this design "
            "was saved before level keys; build the model again from its data"
        )
    return combine_keys(parts)


def _group_levels(term: RandomTerm, data: pd.DataFrame) -> list[str]:
    """The keys of a grouping factor's levels, in level order (see the module docstring)."""
    cols = term.group_columns()
    for col in cols:
        if col not in data.columns:
            raise _unknown_column(col, f"the grouping factor of random-effect term {term}", data)
    if len(cols) == 1:
        keys = _column_levels(data[cols[0]])
    else:
        orders = [{lvl: i for i, lvl in enumerate(_column_levels(data[c]))} for c in cols]
        _, combos = frame_codes(data, cols)
        ordered = sorted(combos, key=lambda row: tuple(o[v] for o, v in zip(orders, row, strict=True)))
        keys = [combine_keys(row) for row in ordered]
    if not keys:
        raise ValueError(f"grouping factor '{_unquote(term.group)}' has no levels (no non-missing values)")
    return keys  # one level is lme4's check.nlev.gtr.1 (keras_glmm.checks.check_levels)


def _drop_unused_categories(data: pd.DataFrame, columns) -> pd.DataFrame:
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


def _build_random(
    term: RandomTerm, name: str, data: pd.DataFrame, keys: list[str] | None = None
) -> RandomTermDesign:
    """One term's design: its levels (``keys``: the scan's, else found in ``data``)
    and the columns of its expression, coded like the fixed part (formulaic,
    treatment contrasts, reduced rank where R reduces it; see the module docstring)."""
    where = f"random-effect term {term}"
    keys = _group_levels(term, data) if keys is None else list(keys)
    cols = term.group_columns()
    mm = _model_matrix(term.expr, data, where)
    if _categorical_factors(mm.model_spec):
        used = mm.model_spec.variables_by_source.get("data", set())
        trimmed = _drop_unused_categories(data, [c for c in data.columns if str(c) in used])
        if trimmed is not data:
            mm = _model_matrix(term.expr, trimmed, where)
    spec = mm.model_spec
    raw = list(spec.column_names)
    intercept = bool(raw) and raw[0] == "Intercept"
    return RandomTermDesign(
        term=term,
        name=name,
        levels=[level_name(split_key(k, len(cols))) for k in keys],
        columns=[lme4_name(c) for c in raw],
        intercept=intercept,
        model_spec=spec,
        group_columns=cols,
        keys=keys,
        group_kinds=tuple(column_kind(data[c]) for c in cols),
    )


def _unique_names(terms: tuple[RandomTerm, ...]) -> list[str]:
    used = set(_RESERVED_KEYS)
    names = []
    for term in terms:
        base = _safe_name(term.group)
        if base in _RESERVED_KEYS:
            base = base + "_group"
        name, k = base, 1
        while name in used or name + "_z" in used:
            k += 1
            name = f"{base}_{k}"
        used.update({name, name + "_z"})
        names.append(name)
    return names


# --------------------------------------------------------------------------
# The zero-inflation part (glmmTMB's ziformula)
# --------------------------------------------------------------------------

_ZI_WHERE = "the zero-inflation formula (ziformula)"


def _zi_rhs(ziformula: str) -> str:
    """The right-hand side of a one-sided ``ziformula``, or an error saying what is wrong with it."""
    if not isinstance(ziformula, str):
        raise TypeError(f"ziformula must be a one-sided formula string such as '~ x'. Received: {ziformula!r}")
    text = ziformula.strip()
    try:
        spec = parse_formula(text if "~" in text else "~ " + text)
    except ExpressionError as e:  # said of the ziformula, not of a formula's fixed effects
        raise e.for_part(_ZI_WHERE, ziformula) from None
    if spec.response is not None:
        raise ValueError(f"ziformula must be one-sided ('~ x'); '{ziformula}' has a response, '{spec.response}'")
    if spec.random:
        terms = ", ".join(str(t) for t in spec.random)
        raise ValueError(
            f"ziformula '{ziformula}' has the random-effect term(s) {terms}: only fixed effects are "
            "supported in the zero-inflation formula"
        )
    if spec.offsets:
        raise ValueError(f"ziformula '{ziformula}' has offset(...), which the zero-inflation formula does not take")
    return spec.fixed_rhs()


def _dependent_columns(matrix: np.ndarray, names: list[str]) -> list[str]:
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


def _without_response_term(spec: FormulaSpec) -> FormulaSpec:
    """``spec`` without a fixed term that is the response itself, with R's warning.

    R's ``model.matrix`` drops a right-hand-side term equal to the response
    (``Reaction ~ Reaction + Days``: "the response appeared on the right-hand
    side and was dropped"); an interaction with it (``Reaction:Days``) stays, as
    in R. The term is removed with formulaic's ``- term``, which the saved
    formula keeps.
    """
    if spec.response is None or spec.cbind() is not None:
        return spec
    from formulaic import Formula

    def bare(text):
        return re.sub(r"\s+", "", _unquote(str(text)))

    try:
        terms = list(Formula(spec.fixed_rhs()))
    except Exception:  # the fixed part's own errors are reported when it is built
        return spec
    if not any(bare(t) == bare(spec.response) for t in terms):
        return spec
    warnings.warn(
        f"the response appeared on the right-hand side and was dropped: '{spec.response}' is the response "
        f"of '{spec.formula}', so its term is not a fixed effect",
        UserWarning,
        stacklevel=3,
    )
    return dataclasses.replace(spec, fixed=f"{spec.fixed} - {spec.response}")


# --------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------


@dataclass
class Design:
    """The frozen numeric design of a mixed model (see the module docstring).

    Attributes:
        spec: The parsed formula.
        fixed_spec: formulaic ``ModelSpec`` of the fixed-effects right-hand side.
        fixed_columns: lme4-style fixed-effect names (``"(Intercept)"``, ``"period2"``).
        fixed_formulaic_columns: formulaic's names of the same columns.
        random: One :class:`RandomTermDesign` per random-effect term.
        response_kind: ``"continuous"`` (any non-binomial family, counts
            included), ``"binary"``, ``"cbind"``, ``"proportion"``, ``"ordinal"``
            (category codes ``1..K``); ``None`` for a one-sided formula.
        family_name: The family the design was built for.
        response_levels: For a binary response given as a two-level factor,
            ``[failure, success]``; for an ordinal one its categories in order;
            else ``None``.
        weights_kind: What ``weights`` mean: ``"trials"`` (the binomial trials of
            a proportion response), ``"prior"`` (prior weights, lme4's: the
            precisions of a gaussian response, likelihood weights of the other
            families; :meth:`arrays` returns them as ``inputs["weights"]``) or
            ``None`` (no weights).
        na_action: ``"raise"`` or ``"omit"`` (what :meth:`from_data` did).
        ziformula: The zero-inflation formula as given (``None`` when none was).
        zi_spec: formulaic ``ModelSpec`` of its right-hand side; ``None`` for a
            constant zero-inflation probability (``"~1"``).
        zi_columns: lme4-style names of its columns (``"(Intercept)"``, ``"minedyes"``).
        zi_formulaic_columns: formulaic's names of the same columns.
        fixed_dropped: lme4-style names of the fixed-effect columns dropped as
            linear combinations of earlier ones (lme4's ``check.rankX``:
            :func:`keras_glmm.checks.drop_aliased`); :meth:`fixed_matrix` leaves
            them out, so they are in no fit, prediction or saved model.
    """

    spec: FormulaSpec
    fixed_spec: Any
    fixed_columns: list[str]
    fixed_formulaic_columns: list[str]
    random: list[RandomTermDesign]
    response_kind: str | None
    family_name: str = "gaussian"
    response_levels: list[str] | None = None
    na_action: str = "raise"
    weights_kind: str | None = None
    ziformula: str | None = None
    zi_spec: Any = None
    zi_columns: list[str] = field(default_factory=list)
    zi_formulaic_columns: list[str] = field(default_factory=list)
    fixed_dropped: list[str] = field(default_factory=list)
    _response_columns: list[str] = field(default_factory=list, repr=False)
    _offset_columns: list[str] = field(default_factory=list, repr=False)

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        """Everything the frozen design knows, as plain JSON (str, numbers, bools,
        ``None``, lists, dicts): ``json.dumps(design.get_config())`` works, and
        :meth:`from_config` rebuilds a design whose :meth:`arrays` are identical
        on any data, without the training data.

        formulaic ``ModelSpec`` objects are stored as their formula text plus
        what was learned at fit time (term structure, categories and contrasts,
        states of stateful transforms such as ``center()``/``scale()``/``poly()``).
        Raises ``TypeError`` if such a state holds a value JSON cannot carry
        (e.g. datetime categories).
        """
        s = self.spec
        return {
            "format": _CONFIG_FORMAT,
            "spec": {
                "formula": s.formula,
                "response": s.response,
                "fixed": s.fixed,
                "random": [
                    {"expr": t.expr, "group": t.group, "correlated": bool(t.correlated)} for t in s.random
                ],
                "offsets": list(s.offsets),
            },
            "fixed_spec": _model_spec_config(self.fixed_spec, s.fixed_rhs()),
            "fixed_columns": [str(c) for c in self.fixed_columns],
            "fixed_formulaic_columns": [str(c) for c in self.fixed_formulaic_columns],
            "random": [r.get_config() for r in self.random],
            "response_kind": self.response_kind,
            "family_name": self.family_name,
            "response_levels": (
                None if self.response_levels is None else [str(v) for v in self.response_levels]
            ),
            "na_action": self.na_action,
            "weights_kind": self.weights_kind,
            "response_columns": [str(c) for c in self._response_columns],
            "offset_columns": [str(c) for c in self._offset_columns],
            "ziformula": self.ziformula,
            "zi_spec": None if self.zi_spec is None else _model_spec_config(
                self.zi_spec, _zi_rhs(self.ziformula)),
            "zi_columns": [str(c) for c in self.zi_columns],
            "zi_formulaic_columns": [str(c) for c in self.zi_formulaic_columns],
            "fixed_dropped": [str(c) for c in self.fixed_dropped],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Design":
        """Rebuild a design from :meth:`get_config` (e.g. after ``json.loads``)."""
        check_saved_design(config, parse_formula)  # every expression, before anything is rebuilt (keras_glmm.expressions)
        fmt = config.get("format")
        if fmt != _CONFIG_FORMAT:
            raise ValueError(f"unsupported Design config format {fmt!r} (expected {_CONFIG_FORMAT})")
        s = config["spec"]
        spec = FormulaSpec(
            formula=s["formula"],
            response=s["response"],
            fixed=s["fixed"],
            random=tuple(
                RandomTerm(expr=t["expr"], group=t["group"], correlated=bool(t["correlated"]))
                for t in s["random"]
            ),
            offsets=tuple(s["offsets"]),
        )
        levels = config["response_levels"]
        return cls(
            spec=spec,
            fixed_spec=_model_spec_from_config(config["fixed_spec"]),
            fixed_columns=list(config["fixed_columns"]),
            fixed_formulaic_columns=list(config["fixed_formulaic_columns"]),
            random=[RandomTermDesign.from_config(r) for r in config["random"]],
            response_kind=config["response_kind"],
            family_name=config["family_name"],
            response_levels=None if levels is None else list(levels),
            na_action=config["na_action"],
            weights_kind=config.get("weights_kind"),
            _response_columns=list(config["response_columns"]),
            _offset_columns=list(config["offset_columns"]),
            # Designs saved before ziformula existed have none of these keys.
            ziformula=config.get("ziformula"),
            zi_spec=None if config.get("zi_spec") is None else _model_spec_from_config(config["zi_spec"]),
            zi_columns=list(config.get("zi_columns", [])),
            zi_formulaic_columns=list(config.get("zi_formulaic_columns", [])),
            # The kept columns are `fixed_formulaic_columns`; older designs dropped none.
            fixed_dropped=list(config.get("fixed_dropped", [])),
        )

    # ---------------------------------------------------------------- build

    @classmethod
    def from_data(
        cls,
        spec_or_formula: FormulaSpec | str,
        data: pd.DataFrame,
        family_name: str = "gaussian",
        weights: Any = None,
        na_action: str = "raise",
        group_levels: list[list[str]] | None = None,
        ziformula: str | None = None,
        checks: Any = None,
    ) -> "Design":
        """Learn the design from training data.

        The guard rails of lme4's model frame and design (:mod:`keras_glmm.checks`)
        are applied here: a response term on the right-hand side is dropped
        with R's warning, unused categories are dropped (R's
        ``drop.unused.levels``), aliased fixed-effect columns are dropped
        (``check.rankX``), and the fixed design's conditioning and the number of
        each grouping factor's levels are checked as ``checks`` says. The checks
        against the number of rows and of the response are
        :func:`keras_glmm.checks.check_fit_data`'s, on the arrays of the fit.

        Args:
            spec_or_formula: A formula string or a parsed :class:`FormulaSpec`.
            data: Training data frame.
            family_name: Family name (``"binomial"`` changes how the response is read);
                a family object with a ``name`` attribute is accepted too.
            weights: A column name or an array of length ``n``: the binomial
                trials of a proportion response, else prior weights (lme4's
                ``weights``: each row's log-likelihood is multiplied by its
                weight; for a gaussian model the row's variance is ``sigma^2 / w``).
            na_action: ``"raise"`` (missing values in a used column are an
                error) or ``"omit"`` (the schema is learned from the complete
                rows; the caller drops the others, see :meth:`complete_rows`).
            group_levels: Optional level vocabulary of each random-effect term
                (one list of level *keys*, :mod:`keras_glmm.levels`, per term of
                the formula, in index order), used instead of the levels found
                in ``data``. :mod:`keras_glmm.streaming` learns them from files
                in one pass and passes a sample of rows as ``data``; the levels
                must be in :func:`_group_levels` order.
            ziformula: A zero-inflated family's one-sided zero-inflation formula
                (glmmTMB's ``ziformula``, e.g. ``"~ mined"``), fixed effects only;
                ``None`` or ``"~1"`` for a constant zero-inflation probability. The
                caller checks that the family is zero-inflated.
            checks: lme4's checks (:func:`keras_glmm.checks.resolve_checks`: a
                dict such as ``{"rank_x": "stop"}``, or ``None`` for lme4's
                defaults for the family).
        """
        spec = parse_formula(spec_or_formula) if isinstance(spec_or_formula, str) else spec_or_formula
        if not isinstance(spec, FormulaSpec):
            raise TypeError(f"expected a formula string or FormulaSpec, got {type(spec).__name__}")
        checks = checks_lib.resolve_checks(checks, family_name)
        spec = _without_response_term(spec)
        data = _as_frame(data)
        if na_action not in ("raise", "omit"):
            raise ValueError(f"na_action must be 'raise' or 'omit', got {na_action!r}")
        family = getattr(family_name, "name", family_name)
        family = str(family).lower()
        if spec.cbind() is not None and family != "binomial":
            raise ValueError(
                f"a cbind(successes, failures) response needs family='binomial', got {family!r}"
            )

        if group_levels is not None and len(group_levels) != len(spec.random):
            raise ValueError(
                f"group_levels has {len(group_levels)} entries for {len(spec.random)} random-effect terms"
            )
        zi_rhs = None if ziformula is None else _zi_rhs(ziformula)
        columns = cls._formula_columns(spec, data, zi_rhs)
        _refuse_datetimes(data, columns, {"fixed": spec.fixed_rhs(), "zi": zi_rhs or "",
                                          "random": " + ".join(t.expr for t in spec.random)})
        response_cols, offset_cols, used = columns["response"], columns["offset"], columns["used"]

        design = cls(
            spec=spec,
            fixed_spec=None,
            fixed_columns=[],
            fixed_formulaic_columns=[],
            random=[],
            response_kind=None,
            family_name=family,
            na_action=na_action,
            _response_columns=response_cols,
            _offset_columns=offset_cols,
        )

        weight_array = design._weights_array(data, weights) if weights is not None else None
        missing = data[used].isna().to_numpy().any(axis=1) if used else np.zeros(len(data), bool)
        if weight_array is not None:
            missing |= np.isnan(weight_array)
        if missing.any():
            if na_action == "raise":
                design._raise_missing(data, used, missing, weight_array)
            data = data.loc[~missing]
            if weight_array is not None:
                weight_array = weight_array[~missing]

        # Fixed effects: unused categories dropped (R's model frame drops unused
        # levels), then the aliased columns (lme4's check.rankX).
        fixed_data = _drop_unused_categories(data, columns["fixed"])
        mm = _model_matrix(spec.fixed_rhs(), fixed_data, "the fixed effects")
        design.fixed_spec = mm.model_spec
        formulaic_names = list(mm.model_spec.column_names)
        names = [lme4_name(c) for c in formulaic_names]
        kept, design.fixed_dropped = checks_lib.drop_aliased(mm, names, checks)
        design.fixed_formulaic_columns = [formulaic_names[j] for j in kept]
        design.fixed_columns = [names[j] for j in kept]

        # Random effects.
        names = _unique_names(spec.random)
        levels = group_levels or [None] * len(spec.random)
        design.random = [
            _build_random(t, n, data, lv) for t, n, lv in zip(spec.random, names, levels, strict=True)
        ]
        checks_lib.check_levels(design.random, len(data), checks, counts=False)  # counts: check_fit_data

        # Offsets are checked now so formula mistakes surface at fit time.
        design.offset(data)

        if ziformula is not None:
            design._learn_zero_inflation(ziformula, zi_rhs, data)

        # Response.
        if spec.response is not None:
            design._learn_response(data, weight_array)
        if weights is not None:
            if spec.response is None:
                raise ValueError("weights were given for a formula without a response")
            design.weights_kind = "trials" if design.response_kind == "proportion" else "prior"
            if design.weights_kind == "prior":  # validate now, naming the column
                design.prior_weights(data, weights if isinstance(weights, str) else weight_array)
        return design

    @classmethod
    def _formula_columns(
        cls, spec: FormulaSpec, data: pd.DataFrame, zi_rhs: str | None = None
    ) -> dict[str, list[str]]:
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
                response_cols += [c for c in _expr_columns(e, data.columns) if c not in response_cols]
        offset_cols: list[str] = []
        for e in spec.offsets:
            offset_cols += [c for c in _expr_columns(e, data.columns) if c not in offset_cols]

        # Unknown-column checks that do not need formulaic.
        group_cols: list[str] = []
        for term in spec.random:
            for col in term.group_columns():
                if col not in data.columns:
                    raise _unknown_column(col, f"the grouping factor of random-effect term {term}", data)
                if col not in group_cols:
                    group_cols.append(col)

        # formulaic's own variables are known only after a first pass over the data.
        fixed_vars = cls._formula_vars(spec.fixed_rhs(), data, "the fixed effects")
        random_vars = [
            v for t in spec.random for v in cls._formula_vars(t.expr, data, f"random-effect term {t}")
        ]
        zi_vars = [] if zi_rhs is None else cls._formula_vars(zi_rhs, data, _ZI_WHERE)
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

    @staticmethod
    def _formula_vars(rhs: str, data: pd.DataFrame, where: str) -> list[str]:
        """Data columns a formulaic rhs uses (without evaluating it on all rows)."""
        try:
            mm = model_matrix(rhs, data, context=FORMULA_CONTEXT, na_action="ignore")
        except FactorEvaluationError as e:
            name = _missing_name(e)
            if name is not None:
                raise _unknown_column(name, where, data, e) from None
            raise ValueError(f"could not evaluate {where}: {e}") from e
        except Exception:
            # Some transforms fail on missing values; fall back on the names.
            return _expr_columns(rhs, data.columns)
        found = mm.model_spec.variables_by_source.get("data", set())
        return [c for c in data.columns if str(c) in found]

    # ------------------------------------------------------- zero inflation

    def _learn_zero_inflation(self, ziformula: str, zi_rhs: str, data: pd.DataFrame) -> None:
        """Freezes the zero-inflation columns (none for a constant probability)."""
        self.ziformula = ziformula
        mm = _model_matrix(zi_rhs, data, _ZI_WHERE)
        columns = list(mm.model_spec.column_names)
        if not columns:
            raise ValueError(
                f"ziformula '{ziformula}' has no columns (a zero-inflation probability of 0): "
                "without zero inflation, use family='poisson' or 'negative_binomial'"
            )
        if columns == ["Intercept"]:
            return  # a constant probability: the family's own `zi_odds`
        self.zi_spec = mm.model_spec
        self.zi_formulaic_columns = columns
        self.zi_columns = [lme4_name(c) for c in columns]
        matrix = self._finite_zi(np.asarray(mm, dtype=np.float64), data.index)
        dependent = _dependent_columns(matrix, self.zi_columns)
        if dependent:
            raise ValueError(
                f"the zero-inflation design of ziformula '{ziformula}' is rank deficient, so its "
                f"coefficients are not identified: column {'; column '.join(dependent)}. "
                f"Its columns: {self.zi_columns}; drop the dependent ones"
            )

    def _finite_zi(self, matrix: np.ndarray, index: pd.Index) -> np.ndarray:
        bad = ~np.isfinite(matrix)
        if bad.any():
            col = int(np.flatnonzero(bad.any(axis=0))[0])
            raise ValueError(
                f"{_ZI_WHERE}: column '{self.zi_columns[col]}' is not finite at rows "
                f"{_row_labels(index, bad[:, col])}"
            )
        return matrix

    def zi_matrix(self, data: pd.DataFrame) -> np.ndarray:
        """Zero-inflation design ``(n, q)`` float64, through the frozen ModelSpec."""
        if self.zi_spec is None:
            raise ValueError("this design has no zero-inflation columns (a constant zero-inflation, or none)")
        data = _as_frame(data)
        return self._finite_zi(_spec_matrix(self.zi_spec, data, _ZI_WHERE), data.index)

    # ------------------------------------------------------------ response

    def _weights_array(self, data: pd.DataFrame, weights: Any) -> np.ndarray:
        if isinstance(weights, str):
            if weights not in data.columns:
                raise _unknown_column(weights, "weights", data)
            weights = data[weights]
        return _float_array(weights, len(data), "weights")

    def _learn_response(self, data: pd.DataFrame, weights: np.ndarray | None) -> None:
        if self.family_name == "ordinal":  # ordered categories, read as codes 1..K
            raw = _eval_expr(self.spec.response, data, f"the response {self.spec.response}")
            series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
            self.response_levels = ordinal_lib.response_levels(series, self.spec.response)
            self.response_kind = "ordinal"
        elif self.family_name != "binomial":
            self.response_kind = "continuous"
        elif self.spec.cbind() is not None:
            self.response_kind = "cbind"
        else:
            raw = _eval_expr(self.spec.response, data, f"the response {self.spec.response}")
            series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
            if _is_categorical(series):
                if isinstance(series.dtype, pd.CategoricalDtype):  # unused categories dropped, as R does
                    levels = [_level_str(c) for c in series.cat.remove_unused_categories().cat.categories]
                else:
                    levels = _column_levels(series)
                if len(levels) != 2:
                    raise ValueError(
                        f"binomial response '{self.spec.response}' is categorical with "
                        f"{len(levels)} level(s) {levels[:10]}; it needs exactly 2 "
                        "(the second is 'success'), or use 0/1, cbind(successes, failures) "
                        "or proportions with weights"
                    )
                self.response_levels = levels
                self.response_kind = "binary"
            elif weights is not None:
                self.response_kind = "proportion"
            else:
                self.response_kind = "binary"
        self.response(data, weights)  # validate now

    def response(self, data: pd.DataFrame, weights: Any = None) -> np.ndarray:
        """The response as float64: ``(n,)``, or ``(n, 2)`` ``[successes, trials]``
        for ``cbind`` and proportion responses."""
        data = _as_frame(data)
        if self.spec.response is None:
            raise ValueError("the formula has no response (left-hand side)")
        n = len(data)
        where = f"the response {self.spec.response}"
        if self.response_kind == "cbind":
            s_expr, f_expr = self.spec.cbind()
            s = _float_array(_eval_expr(s_expr, data, where), n, f"successes '{s_expr}'")
            f = _float_array(_eval_expr(f_expr, data, where), n, f"failures '{f_expr}'")
            s = _check_integer(s, f"successes '{s_expr}' of cbind()", data.index)
            f = _check_integer(f, f"failures '{f_expr}' of cbind()", data.index)
            return np.column_stack([s, s + f])
        raw = _eval_expr(self.spec.response, data, where)
        series = raw if isinstance(raw, pd.Series) else pd.Series(np.asarray(raw))
        name = self.spec.response
        if self.response_kind == "continuous":
            if _is_categorical(series):
                raise ValueError(
                    f"response '{name}' is categorical ({series.dtype}); the "
                    f"{self.family_name} family needs a numeric response"
                )
            y = _float_array(series, n, f"response '{name}'")
            if not np.isfinite(y).all():
                bad = ~np.isfinite(y)
                raise ValueError(f"response '{name}' is not finite at rows {_row_labels(data.index, bad)}")
            return y
        if self.response_kind == "binary":
            return self._binary(series, data.index)
        if self.response_kind == "ordinal":
            return ordinal_lib.response_codes(series, self.response_levels, name, data.index)
        # proportion
        if weights is None:
            raise ValueError(
                f"binomial response '{name}' was fitted as proportions: pass weights (number of trials)"
            )
        w = self._weights_array(data, weights)
        if _is_categorical(series):
            raise ValueError(f"binomial response '{name}' with weights must be numeric proportions")
        p = _float_array(series, n, f"response '{name}'")
        bad = ~np.isfinite(p) | (p < 0) | (p > 1)
        if bad.any():
            raise ValueError(
                f"binomial response '{name}' with weights must be proportions in [0, 1]; "
                f"rows {_row_labels(data.index, bad)} are not"
            )
        w = _check_integer(w, "binomial weights (number of trials)", data.index)
        s = p * w
        off = np.abs(s - np.round(s)) > _INTEGER_TOL
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise ValueError(
                f"binomial response '{name}' times weights must be whole numbers of successes; "
                f"row {data.index[i]!r}: {float(p[i])!r} * {float(w[i])!r} = {float(s[i])!r}"
            )
        return np.column_stack([np.round(s), w])

    def _binary(self, series: pd.Series, index: pd.Index) -> np.ndarray:
        name = self.spec.response
        if _is_categorical(series):
            if self.response_levels is None:
                raise ValueError(f"binomial response '{name}' was numeric at fit time, got {series.dtype}")
            strings = _column_strings(series)
            known = {lvl: float(i) for i, lvl in enumerate(self.response_levels)}
            bad = np.array([s not in known for s in strings], dtype=bool)
            if bad.any():
                other = sorted({str(s) for s in strings[bad]})[:5]
                raise ValueError(
                    f"binomial response '{name}' has value(s) {other} that are not among its levels "
                    f"{self.response_levels} (rows {_row_labels(index, bad)})"
                )
            return np.array([known[s] for s in strings], dtype=np.float64)
        y = _float_array(series, len(series), f"response '{name}'")
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

    # -------------------------------------------------------------- arrays

    def fixed_matrix(self, data: pd.DataFrame) -> np.ndarray:
        """Fixed-effects design ``(n, p)`` float64, through the frozen ModelSpec; the
        columns of :attr:`fixed_columns` only (aliased ones, :attr:`fixed_dropped`, left out)."""
        matrix = _spec_matrix(self.fixed_spec, _as_frame(data), "the fixed effects")
        if not self.fixed_dropped:
            return matrix
        position = {str(c): j for j, c in enumerate(self.fixed_spec.column_names)}
        return np.ascontiguousarray(matrix[:, [position[c] for c in self.fixed_formulaic_columns]])

    def offset(self, data: pd.DataFrame) -> np.ndarray:
        """Sum of the ``offset()`` expressions, float64 ``(n,)``; zeros if none."""
        data = _as_frame(data)
        n = len(data)
        total = np.zeros(n, dtype=np.float64)
        for expr in self.spec.offsets:
            value = _float_array(_eval_expr(expr, data, f"offset({expr})"), n, f"offset({expr})")
            bad = ~np.isfinite(value)
            if bad.any():
                raise ValueError(f"offset({expr}) is not finite at rows {_row_labels(data.index, bad)}")
            total += value
        return total

    def used_columns(self, data: pd.DataFrame | None = None, with_response: bool = True) -> list[str]:
        """Data columns the formula uses (response ones only if ``with_response``)."""
        cols = list(self.fixed_spec.variables_by_source.get("data", set()))
        if self.zi_spec is not None:
            cols += list(self.zi_spec.variables_by_source.get("data", set()))
        for r in self.random:
            cols += list(r.model_spec.variables_by_source.get("data", set()))
            cols += list(r.group_columns)
        cols += self._offset_columns
        if with_response:
            cols += self._response_columns
        cols = list(dict.fromkeys(cols))
        if data is not None:
            order = {str(c): i for i, c in enumerate(data.columns)}
            cols.sort(key=lambda c: order.get(c, len(order)))
        return cols

    def complete_rows(self, data: pd.DataFrame, with_response: bool = True) -> np.ndarray:
        """Boolean mask of rows without missing values in any column the formula uses."""
        data = _as_frame(data)
        cols = self.used_columns(data, with_response)
        for c in cols:
            if c not in data.columns:
                raise _unknown_column(c, "the formula", data)
        if not cols:
            return np.ones(len(data), dtype=bool)
        return ~data[cols].isna().to_numpy().any(axis=1)

    def check_rows(self, data: pd.DataFrame, with_response: bool = True) -> None:
        """Raise a ValueError listing rows and columns with missing values, if any."""
        data = _as_frame(data)
        complete = self.complete_rows(data, with_response)
        if not complete.all():
            self._raise_missing(data, self.used_columns(data, with_response), ~complete, None)

    @staticmethod
    def _raise_missing(data, cols, missing, weights) -> None:
        bad_cols = [str(c) for c in cols if data[c].isna().any()]
        if weights is not None and np.isnan(weights).any():
            bad_cols.append("weights")
        raise ValueError(
            f"missing values in column(s) {bad_cols} at rows {_row_labels(data.index, missing)}; "
            "drop those rows first, or use na_action='omit' and keep the rows of complete_rows()"
        )

    def prior_weights(self, data: pd.DataFrame, weights: Any) -> np.ndarray:
        """Prior weights, float64 ``(n,)``: finite and non-negative, or an error naming the row."""
        if weights is None:
            raise ValueError(
                "this model was fitted with prior weights: pass `weights` (a column name or array)"
            )
        what = f"weights '{weights}'" if isinstance(weights, str) else "weights"
        return response_lib.check_weights(self._weights_array(data, weights), what, data.index)

    def arrays(
        self, data: pd.DataFrame, weights: Any = None, with_response: bool = True
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Model inputs and response for ``data``.

        Returns:
            ``(inputs, y)``: ``inputs`` has ``"x"`` (fixed design), ``"x_zi"``
            (the zero-inflation design, only if the design has one), ``"offset"``
            (only if the formula has offsets), ``term.name`` (int64 level
            indices, ``-1`` for new levels), ``term.name + "_z"`` (the term's
            non-intercept covariates, only if it has any) and, with the response,
            ``"weights"`` (prior weights, when the design has them). ``y`` is
            :meth:`response` or ``None`` (``with_response=False`` or a
            one-sided formula).
        """
        data = _as_frame(data)
        with_response = with_response and self.spec.response is not None
        self.check_rows(data, with_response)
        inputs: dict[str, np.ndarray] = {"x": self.fixed_matrix(data)}
        if self.zi_spec is not None:
            inputs["x_zi"] = self.zi_matrix(data)
        if self.spec.offsets:
            inputs["offset"] = self.offset(data)
        for r in self.random:
            inputs[r.name] = r.level_index(data)
            if r.n_covariates:
                inputs[r.name + "_z"] = r.covariates(data)
        y = self.response(data, weights) if with_response else None
        if with_response and self.weights_kind == "prior":
            inputs["weights"] = self.prior_weights(data, weights)
        return inputs, y

    # ------------------------------------------------------------- helpers

    @property
    def n_fixed(self) -> int:
        return len(self.fixed_columns)

    @property
    def lme4_names(self) -> list[str]:
        """Alias of :attr:`fixed_columns` (lme4-style names)."""
        return list(self.fixed_columns)

    def term(self, name: str) -> RandomTermDesign:
        for r in self.random:
            if r.name == name:
                return r
        raise KeyError(f"no random-effect term named {name!r}; have {[r.name for r in self.random]}")
