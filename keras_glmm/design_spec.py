"""The saved form of a design: a documented, versioned JSON document.

A fitted model saves its frozen :class:`keras_glmm.design.Design` in the
``.keras`` file's ``config.json`` (``Design.get_config``), and a loaded model
rebuilds it from there, without the training data, so that ``predict`` codes
new data exactly as the fit did. This module is the one definition of that
document: :func:`write` makes it, :func:`read` checks and decodes it.

Security: a saved file is data, not code. :func:`read` checks every field's
name and type first (an unknown, missing or mistyped field is a
:class:`DesignSpecError` naming it), then every expression the document holds
(formula, terms, factors, stateful-transform calls) against the formula
language of :mod:`keras_glmm.expressions`, each name being one of the columns
the document records, before anything is built. Contrasts and transform states
are read into a closed set of types by name (no import or call named by the
file, no pickles). Only a user who turned Keras's safe mode off
(``load_model(..., safe_mode=False)``,
``keras.config.enable_unsafe_deserialization()``) skips the language check.

Old files: format version 1 (before this module) stored formulaic's internal
objects tagged by class name. It is not read: :func:`read` refuses it with a
message naming version 1 and saying to fit the model again (or to load it with
the keras_glmm release that saved it). A converter would have kept the decoder
of formulaic's private types that this format replaces.

Schema, format version 2 (``?`` marks a value that may be ``null``; every
field is required, no other field is allowed)::

    {
      "format": "keras_glmm.design",
      "format_version": 2,
      "formula": {                      # the parsed formula (keras_glmm.formula.FormulaSpec)
        "text": str,                    # as the user wrote it
        "response": str?,               # left-hand side, e.g. "Reaction", "cbind(s, f)"
        "fixed": str,                   # "response ~ fixed terms", random terms removed
        "random": [TERM],
        "offsets": [str]                # the expressions inside offset(...)
      },
      "family": str,                    # the family name the design was built for
      "na_action": "raise" | "omit",
      "weights": "trials" | "prior" | null,
      "response": {
        "kind": "continuous" | "binary" | "cbind" | "proportion" | "ordinal" | null,
        "levels": [str]?,               # a two-level factor's [failure, success]; ordinal categories
        "columns": [str]                # data columns the response reads
      },
      "offset_columns": [str],          # data columns the offsets read
      "fixed": {
        "coding": CODING,               # the fixed part's right-hand side
        "columns": [str],               # lme4's names of the kept columns ("(Intercept)", "period2")
        "formulaic_columns": [str],     # formulaic's names of the same columns
        "dropped": [str]                # lme4's names of aliased columns left out (check.rankX)
      },
      "random": [{
        "term": TERM,
        "name": str,                    # the term's key in the model's inputs
        "group_columns": [str],
        "group_kinds": [KIND],          # per grouping column, the dtype serving takes it in
        "levels": [str],                # lme4's level names, in index order
        "keys": [str],                  # level keys (keras_glmm.levels), in index order
        "columns": [str],               # lme4's names of the term's effects
        "intercept": bool,
        "coding": CODING                # of the term's left-hand side
      }],
      "zero_inflation": null | {
        "formula": str,                 # the ziformula as given ("~ mined", "~1")
        "coding": CODING?,              # null for a constant probability ("~1")
        "columns": [str],
        "formulaic_columns": [str]
      }
    }

    TERM = {"expr": str, "group": str, "correlated": bool}   # (expr | group), (expr || group)
    KIND = "string" | "int64" | "float32" | "float64" | "bool"

    CODING = {                          # what formulaic learned of one right-hand side
      "rhs": str,                       # e.g. "1 + x + C(f, Sum)"; parsed again on load
      "terms": [{                       # in column order
        "term": str,                    # formulaic's term, e.g. "x:C(f)"
        "columns": [str],               # its columns' formulaic names
        "scoped": [{"factors": [{"expr": str, "reduced": bool}], "scale": number}]
      }],
      "factors": {EXPR: {               # every factor of the terms, by its expression
        "kind": "numerical" | "categorical" | "constant" | "unknown" | null,  # null: not encoded
        "variables": [{"name": str, "source": "data" | "transforms" | "context" | null,
                       "roles": ["value" | "callable"]}],
        # categorical factors only:
        "value_type": "string" | "integer" | "float" | "boolean" | "timestamp[s|ms|us|ns]",
        "categories": [VALUE],          # in coding order (a timestamp as ISO text)
        "contrasts": CONTRASTS
      }},
      "transforms": {CALL: {            # state of each stateful transform, by its call text
        "function": "center" | "scale" | "standardize" | "poly" | "bs" | "cr" | "cs" | "cc" | "Q",
        "state": STATE                  # training statistics, e.g. {"center": 2.5, ...}
      }}
    }

    CONTRASTS = {"name": NAME, "levels": [VALUE], ...fields of NAME}:
      "treatment", "sas": "base": VALUE?      (null: the first level / SAS's last)
      "sum":              (no fields)
      "helmert":          "reverse": bool, "scale": bool
      "diff":             "backward": bool
      "poly":             "scores": [number]?
      "custom":           "matrix": [[number]], "names": [str]?

    STATE, by function (a field may be absent where formulaic stored none):
      center, scale, standardize: "center": number?, "scale": number?, "ddof": integer
      poly: "alpha": {degree: number}, "norms2": {degree: number}   (degrees as text)
      bs: "lower_bound": number, "upper_bound": number, "knots": [number]
      cr, cs, cc: "lower_bound", "upper_bound": number, "knots": [number],
                  "cyclic": bool, "constraints": [[number]]?
      Q: (no fields)

Numbers are finite; a state or category JSON cannot carry (a non-finite
number, categories of mixed or other types such as tz-aware timestamps) makes
:func:`write` raise ``TypeError`` naming it, rather than approximate the coding.
"""

from __future__ import annotations

import ast
import math
import sys
from typing import Any

import numpy as np
import pandas as pd
from formulaic import ModelSpec
from formulaic.materializers.base import EncodedTermStructure
from formulaic.materializers.types import EvaluatedFactor, ScopedFactor, ScopedTerm
from formulaic.parser.types import Factor
from formulaic.transforms import contrasts as formulaic_contrasts
from formulaic.utils.sentinels import UNSET
from formulaic.utils.variables import Variable

from keras_glmm import json_fields as field
from keras_glmm.coding import ZI_WHERE
from keras_glmm.expressions import (
    ExpressionError,
    check_expression,
    check_formula,
    check_group,
    check_response,
    check_terms,
    saved_columns,
)
from keras_glmm.formula import FormulaSpec, RandomTerm, parse_formula
from keras_glmm.levels import KINDS

__all__ = ["FORMAT", "FORMAT_VERSION", "DesignSpecError", "read", "unsafe_deserialization_enabled", "write"]

FORMAT = "keras_glmm.design"
FORMAT_VERSION = 2

_REFUSED = "The saved model's formula design (config.json) was refused under Keras's safe_mode:"
_TRUST = ("A saved file may have been altered to run code: load it with safe_mode=False only if you trust "
          "its source.")


class DesignSpecError(ValueError):
    """A saved design that is not a valid document of this format (the message names the field)."""


# --------------------------------------------------------------------------
# Contrasts and transform states: closed sets of types
# --------------------------------------------------------------------------

_CONTRASTS: dict[str, tuple[type, tuple[str, ...]]] = {
    "treatment": (formulaic_contrasts.TreatmentContrasts, ("base",)),
    "sas": (formulaic_contrasts.SASContrasts, ("base",)),
    "sum": (formulaic_contrasts.SumContrasts, ()),
    "helmert": (formulaic_contrasts.HelmertContrasts, ("reverse", "scale")),
    "diff": (formulaic_contrasts.DiffContrasts, ("backward",)),
    "poly": (formulaic_contrasts.PolyContrasts, ("scores",)),
    "custom": (formulaic_contrasts.CustomContrasts, ("matrix", "names")),
}

_SCALING = {"center": "number?", "scale": "number?", "ddof": "integer"}
_SPLINE = {"lower_bound": "number", "upper_bound": "number", "knots": "numbers"}
_TRANSFORM_STATES: dict[str, dict[str, str]] = {
    "center": _SCALING,
    "scale": _SCALING,
    "standardize": _SCALING,
    "poly": {"alpha": "degree_map", "norms2": "degree_map"},
    "bs": _SPLINE,
    "cr": {**_SPLINE, "cyclic": "boolean", "constraints": "matrix?"},
    "cs": {**_SPLINE, "cyclic": "boolean", "constraints": "matrix?"},
    "cc": {**_SPLINE, "cyclic": "boolean", "constraints": "matrix?"},
    "Q": {},  # formulaic's quoted-name lookup: stateful by formulaic's mark, with no state
}
_FACTOR_KINDS = ("numerical", "categorical", "constant", "unknown")
_SOURCES = ("data", "transforms", "context")
_ROLES = ("value", "callable")
_TIMESTAMP_UNITS = ("s", "ms", "us", "ns")


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return _number(value.item(), where)
        raise TypeError(f"cannot store {where}: {type(value).__name__} {value!r} is not a number")
    value = value.item() if isinstance(value, (np.integer, np.floating)) else value
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"cannot store {where}: {value!r} is not a finite number")
    return value


def _matrix(value: Any, where: str) -> list[list[float]]:
    array = np.asarray(value)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise TypeError(f"cannot store {where}: expected a numeric matrix, got {value!r}")
    return [[_number(v, where) for v in row] for row in array.tolist()]


def _value_type(values: list[Any], where: str) -> str:
    """One JSON type for a factor's categories (see CATEGORIES in the module docstring)."""
    types = set()
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            types.add("boolean")
        elif isinstance(v, (int, np.integer)):
            types.add("integer")
        elif isinstance(v, (float, np.floating)):
            types.add("float")
        elif isinstance(v, str):
            types.add("string")
        elif isinstance(v, pd.Timestamp) and v.tz is None:
            types.add(f"timestamp[{v.unit}]")
        else:
            raise TypeError(f"cannot store {where}: category {v!r} of type {type(v).__name__} is not supported")
    if len(types) > 1:
        raise TypeError(f"cannot store {where}: its categories mix the types {sorted(types)}")
    return types.pop() if types else "string"


def _category(value: Any, value_type: str, where: str) -> Any:
    if value_type.startswith("timestamp"):
        return value.isoformat()
    if value_type == "boolean":
        return bool(value)
    if value_type == "string":
        return value
    return _number(value, where)


def _contrasts_json(state: Any, value_type: str, where: str) -> dict[str, Any]:
    contrasts = state.contrasts
    for name, (cls, fields) in _CONTRASTS.items():
        if type(contrasts) is not cls:
            continue
        out: dict[str, Any] = {"name": name, "levels": [_category(v, value_type, where) for v in state.levels]}
        if name in ("treatment", "sas"):
            out["base"] = None if contrasts.base is UNSET else _category(contrasts.base, value_type, where)
        elif name == "poly":
            out["scores"] = None if contrasts.scores is None else [_number(v, where) for v in contrasts.scores]
        elif name == "custom":
            out["matrix"] = _matrix(contrasts.contrasts, where)
            names = contrasts.contrast_names
            out["names"] = None if names is None else [str(n) for n in names]
        else:
            out.update({f: bool(getattr(contrasts, f)) for f in fields})
        return out
    raise TypeError(f"cannot store {where}: contrasts {contrasts!r} are not supported")


def _factor_json(kind: Any, state: Any, variables: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": None if kind is None else getattr(kind, "value", kind),
        "variables": [
            {"name": str(v), "source": getattr(v, "source", None),
             "roles": sorted(getattr(r, "value", r) for r in getattr(v, "roles", ()))}
            for v in sorted(variables or (), key=str)
        ],
    }
    if out["kind"] == "categorical":
        extra = set(state) - {"categories", "contrasts"}
        if extra:
            raise TypeError(f"cannot store {where}: unknown encoder state {sorted(extra)}")
        categories = list(state["categories"])
        value_type = _value_type(categories + list(state["contrasts"].levels), where)
        out["value_type"] = value_type
        out["categories"] = [_category(v, value_type, where) for v in categories]
        out["contrasts"] = _contrasts_json(state["contrasts"], value_type, where)
    elif state:
        raise TypeError(f"cannot store {where}: a {out['kind']} factor with encoder state {state!r}")
    return out


def _call_function(call: str) -> str | None:
    try:
        node = ast.parse(call, mode="eval").body
    except SyntaxError:
        return None
    return node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None


def _state_json(function: str, state: dict[str, Any], where: str) -> dict[str, Any]:
    kinds = _TRANSFORM_STATES[function]
    unknown = set(state) - set(kinds)
    if unknown:
        raise TypeError(f"cannot store {where}: unknown state {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, kind in kinds.items():  # in the schema's order, as read() gives them back
        if name not in state:
            continue
        value = state[name]
        at = f"{where} ({name})"
        if value is None and kind.endswith("?"):
            out[name] = None
        elif kind in ("number", "number?", "integer"):
            out[name] = _number(value, at)
        elif kind == "boolean":
            out[name] = bool(value)
        elif kind == "numbers":
            out[name] = [_number(v, at) for v in np.asarray(value).ravel().tolist()]
        elif kind == "degree_map":
            out[name] = {str(int(k)): _number(v, at) for k, v in sorted(value.items())}
        else:  # matrix
            out[name] = _matrix(value, at)
    return out


def coding_json(model_spec: Any, rhs: str, where: str) -> dict[str, Any]:
    """The CODING of a materialized formulaic ``ModelSpec`` built from ``rhs``."""
    encoder = dict(model_spec.encoder_state)
    factors: dict[str, dict[str, Any]] = {}
    terms = []
    for structure in model_spec.structure:
        scoped = []
        for scoped_term in structure.scoped_terms:
            for scoped_factor in scoped_term.factors:
                expr = scoped_factor.factor.expr
                if expr not in factors:
                    kind, state = encoder.get(expr, (None, {}))
                    factors[expr] = _factor_json(kind, state, scoped_factor.factor.variables,
                                                 f"factor '{expr}' of {where}")
            scoped.append({
                "factors": [{"expr": f.factor.expr, "reduced": bool(f.reduced)} for f in scoped_term.factors],
                "scale": _number(scoped_term.scale, f"the scale of a term of {where}"),
            })
        terms.append({"term": str(structure.term), "columns": [str(c) for c in structure.columns],
                      "scoped": scoped})
    for expr, (kind, state) in encoder.items():  # encoded factors of no term: kept as formulaic has them
        if expr not in factors:
            factors[expr] = _factor_json(kind, state, (), f"factor '{expr}' of {where}")
    transforms = {}
    for call, state in model_spec.transform_state.items():
        function = _call_function(call)
        if function not in _TRANSFORM_STATES:
            raise TypeError(f"cannot store {where}: the state of '{call}' is of no known stateful transform")
        transforms[call] = {"function": function,
                            "state": _state_json(function, state, f"the state of '{call}' of {where}")}
    return {"rhs": rhs, "terms": terms, "factors": factors, "transforms": transforms}


def _term_json(term: RandomTerm) -> dict[str, Any]:
    return {"expr": term.expr, "group": term.group, "correlated": bool(term.correlated)}


def write(design: Any, zi_rhs: str | None) -> dict[str, Any]:
    """The document of a frozen design (a :class:`keras_glmm.design.Design`), as plain JSON.

    Args:
        design: The design.
        zi_rhs: The right-hand side of its ziformula (what its zero-inflation
            coding was built from), or ``None``.

    Raises:
        TypeError: a state or category JSON cannot carry (the message names it).
    """
    spec = design.spec
    zero_inflation = None
    if design.ziformula is not None:
        zero_inflation = {
            "formula": design.ziformula,
            "coding": None if design.zi_spec is None else coding_json(design.zi_spec, zi_rhs, ZI_WHERE),
            "columns": [str(c) for c in design.zi_columns],
            "formulaic_columns": [str(c) for c in design.zi_formulaic_columns],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "formula": {
            "text": spec.formula,
            "response": spec.response,
            "fixed": spec.fixed,
            "random": [_term_json(t) for t in spec.random],
            "offsets": list(spec.offsets),
        },
        "family": design.family_name,
        "na_action": design.na_action,
        "weights": design.weights_kind,
        "response": {
            "kind": design.response_kind,
            "levels": None if design.response_levels is None else [str(v) for v in design.response_levels],
            "columns": [str(c) for c in design._response_columns],
        },
        "offset_columns": [str(c) for c in design._offset_columns],
        "fixed": {
            "coding": coding_json(design.fixed_spec, spec.fixed_rhs(), "the fixed effects"),
            "columns": [str(c) for c in design.fixed_columns],
            "formulaic_columns": [str(c) for c in design.fixed_formulaic_columns],
            "dropped": [str(c) for c in design.fixed_dropped],
        },
        "random": [
            {
                "term": _term_json(r.term),
                "name": r.name,
                "group_columns": [str(c) for c in r.group_columns],
                "group_kinds": [str(k) for k in r.group_kinds],
                "levels": [str(v) for v in r.levels],
                "keys": [str(k) for k in r.keys],
                "columns": [str(c) for c in r.columns],
                "intercept": bool(r.intercept),
                "coding": coding_json(r.model_spec, r.term.expr, f"random-effect term {r.term}"),
            }
            for r in design.random
        ],
        "zero_inflation": zero_inflation,
    }


# --------------------------------------------------------------------------
# The schema: each field checked by name and type, and decoded (keras_glmm.json_fields)
# --------------------------------------------------------------------------

_TERM = field.object_of({"expr": field.string, "group": field.string, "correlated": field.boolean})


def _category_value(value_type: str) -> field.Check:
    if value_type.startswith("timestamp"):
        unit = value_type[len("timestamp["):-1]

        def timestamp(value, path):
            try:
                return pd.Timestamp(field.string(value, path)).as_unit(unit)
            except ValueError:
                raise field.invalid(path, "an ISO timestamp", value) from None
        return timestamp
    return {"string": field.string, "integer": field.integer, "float": field.finite,
            "boolean": field.boolean}[value_type]


def _contrasts(value: Any, path: str, value_type: str) -> Any:
    if not isinstance(value, dict):
        raise field.invalid(path, "an object", value)
    name = field.one_of(*_CONTRASTS)(value.get("name"), f"{path}.name")
    category = _category_value(value_type)
    fields: dict[str, field.Check] = {"name": field.string, "levels": field.list_of(category)}
    if name in ("treatment", "sas"):
        fields["base"] = field.nullable(category)
    elif name in ("helmert",):
        fields.update(reverse=field.boolean, scale=field.boolean)
    elif name == "diff":
        fields["backward"] = field.boolean
    elif name == "poly":
        fields["scores"] = field.nullable(field.numbers)
    elif name == "custom":
        fields.update(matrix=field.matrix, names=field.nullable(field.strings))
    checked = field.fields_of(value, path, fields)
    cls, _ = _CONTRASTS[name]
    if name in ("treatment", "sas"):
        contrasts = cls() if checked["base"] is None else cls(base=checked["base"])
    elif name == "custom":
        contrasts = cls(np.array(checked["matrix"]), names=checked["names"])
    else:
        contrasts = cls(**{k: v for k, v in checked.items() if k not in ("name", "levels")})
    return formulaic_contrasts.ContrastsState(contrasts=contrasts, levels=checked["levels"])


def _variable(value: Any, path: str) -> Variable:
    checked = field.fields_of(value, path, {
        "name": field.string,
        "source": field.nullable(field.one_of(*_SOURCES)),
        "roles": field.list_of(field.one_of(*_ROLES)),
    })
    return Variable(checked["name"], roles=checked["roles"], source=checked["source"])


def _factor(value: Any, path: str) -> dict[str, Any]:
    given = value.get("kind") if isinstance(value, dict) else None
    kind = field.nullable(field.one_of(*_FACTOR_KINDS))(given, f"{path}.kind")
    fields: dict[str, field.Check] = {"kind": lambda v, p: kind, "variables": field.list_of(_variable)}
    if kind != "categorical":
        return field.fields_of(value, path, fields)
    value_type = value.get("value_type")
    types = ("string", "integer", "float", "boolean") + tuple(f"timestamp[{u}]" for u in _TIMESTAMP_UNITS)
    field.one_of(*types)(value_type, f"{path}.value_type")
    fields.update(value_type=field.string, categories=field.list_of(_category_value(value_type)),
                  contrasts=lambda v, p: _contrasts(v, p, value_type))
    return field.fields_of(value, path, fields)


def _state_value(kind: str) -> field.Check:
    check = {
        "number": field.finite,
        "integer": field.integer,
        "boolean": field.boolean,
        "numbers": field.numbers,
        "matrix": lambda v, p: np.array(field.matrix(v, p)),
        "degree_map": lambda v, p: {_degree(k, p): x for k, x in field.map_of(field.finite)(v, p).items()},
    }[kind.rstrip("?")]
    return field.nullable(check) if kind.endswith("?") else check


def _degree(key: str, path: str) -> int:
    if not key.isdigit():
        raise field.invalid(f"{path} key", "a degree (a whole number as text)", key)
    return int(key)


def _transform(value: Any, path: str) -> dict[str, Any]:
    given = value.get("function") if isinstance(value, dict) else None
    function = field.one_of(*_TRANSFORM_STATES)(given, f"{path}.function")
    kinds = _TRANSFORM_STATES[function]
    state = field.object_of({name: _state_value(kind) for name, kind in kinds.items()}, tuple(kinds))
    return field.fields_of(value, path, {"function": field.string, "state": state})


_coding = field.object_of({
    "rhs": field.string,
    "terms": field.list_of(field.object_of({
        "term": field.string,
        "columns": field.strings,
        "scoped": field.list_of(field.object_of({
            "factors": field.list_of(field.object_of({"expr": field.string, "reduced": field.boolean})),
            "scale": field.finite,
        })),
    })),
    "factors": field.map_of(_factor),
    "transforms": field.map_of(_transform),
})

_DOCUMENT = field.object_of({
    "format": field.one_of(FORMAT),
    "format_version": field.integer,
    "formula": field.object_of({
        "text": field.string,
        "response": field.nullable(field.string),
        "fixed": field.string,
        "random": field.list_of(_TERM),
        "offsets": field.strings,
    }),
    "family": field.string,
    "na_action": field.one_of("raise", "omit"),
    "weights": field.nullable(field.one_of("trials", "prior")),
    "response": field.object_of({
        "kind": field.nullable(field.one_of("continuous", "binary", "cbind", "proportion", "ordinal")),
        "levels": field.nullable(field.strings),
        "columns": field.strings,
    }),
    "offset_columns": field.strings,
    "fixed": field.object_of({
        "coding": _coding, "columns": field.strings, "formulaic_columns": field.strings, "dropped": field.strings,
    }),
    "random": field.list_of(field.object_of({
        "term": _TERM,
        "name": field.string,
        "group_columns": field.strings,
        "group_kinds": field.list_of(field.one_of(*KINDS)),
        "levels": field.strings,
        "keys": field.strings,
        "columns": field.strings,
        "intercept": field.boolean,
        "coding": _coding,
    })),
    "zero_inflation": field.nullable(field.object_of({
        "formula": field.string,
        "coding": field.nullable(_coding),
        "columns": field.strings,
        "formulaic_columns": field.strings,
    })),
})


def _check_version(config: Any) -> None:
    if not isinstance(config, dict):
        raise field.invalid("the document", "an object", config)
    if "format_version" not in config and config.get("format") == 1 and "spec" in config:
        raise DesignSpecError(
            "saved design: this model was saved in design format version 1 (keras_glmm's earlier format, "
            f"which stored formulaic's internal objects); this keras_glmm reads format version {FORMAT_VERSION} "
            "only. Fit the model again from its data, or load it with the keras_glmm release that saved it")
    version = config.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise DesignSpecError(
            f"saved design: unsupported field 'format_version' {version!r}: this keras_glmm reads format "
            f"version {FORMAT_VERSION} ({FORMAT})")


# --------------------------------------------------------------------------
# Checking the document's expressions (the formula language)
# --------------------------------------------------------------------------


def unsafe_deserialization_enabled() -> bool:
    """Whether the user turned Keras's safe mode off (``load_model(..., safe_mode=False)``,
    ``keras.config.enable_unsafe_deserialization()``); Keras has no public reader of
    the flag: `keras_glmm.compat.unsafe_deserialization_enabled` owns the workaround.
    """
    if "keras" not in sys.modules:  # nothing turned it off; formulas alone need no Keras
        return False
    from keras_glmm import compat  # imported here, not above: reading a design must not load TensorFlow

    return compat.unsafe_deserialization_enabled()


def _codings(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("the fixed effects", doc["fixed"]["coding"])]
    for r in doc["random"]:
        t = r["term"]
        out.append((f"random-effect term ({t['expr']} | {t['group']})", r["coding"]))
    zero = doc["zero_inflation"]
    if zero is not None and zero["coding"] is not None:
        out.append((ZI_WHERE, zero["coding"]))
    return out


def _recorded_columns(doc: dict[str, Any]) -> list[str]:
    """The data columns the document records: names in its expressions must be among them."""
    names = [str(v) for _, coding in _codings(doc) for factor in coding["factors"].values()
             for v in factor["variables"] if v.source == "data"]
    for r in doc["random"]:
        names += r["group_columns"]
    return names + doc["response"]["columns"] + doc["offset_columns"]


def _parsed(text: str, what: str) -> FormulaSpec:
    try:
        return parse_formula(text)  # checks its structure
    except ExpressionError:
        raise
    except ValueError as e:
        raise ExpressionError(f"{what} '{text}' does not parse: {e}") from None


def _check_expressions(doc: dict[str, Any]) -> None:
    """Every expression of the document is in the language, every name a recorded column."""
    columns = saved_columns(_recorded_columns(doc))
    formula = doc["formula"]
    check_formula(_parsed(formula["text"], "the formula"), columns)
    # The stored pieces are what is used, not a parse of the formula: each is checked.
    if formula["response"] is not None:
        check_response(formula["response"], f"the response {formula['response']}", columns)
    if "~" not in formula["fixed"]:
        raise ExpressionError(f"the fixed part {formula['fixed']!r} is not a formula")
    lhs, rhs = formula["fixed"].split("~", 1)
    if lhs.strip():
        check_response(lhs.strip(), f"the response {lhs.strip()}", columns)
    check_terms(rhs, "the fixed effects", columns)
    for t in formula["random"] + [r["term"] for r in doc["random"]]:
        where = f"random-effect term ({t['expr']} | {t['group']})"
        check_group(t["group"], f"the grouping factor of {where}", columns)
        check_terms(t["expr"], where, columns)
    for offset in formula["offsets"]:
        check_expression(offset, f"offset({offset})", "value", columns)
    zero = doc["zero_inflation"]
    if zero is not None:
        text = zero["formula"].strip()
        check_formula(_parsed(text if "~" in text else "~ " + text, "the ziformula"), columns)
    for where, coding in _codings(doc):
        # formulaic evaluates the factors of the parsed rhs; the saved terms must be
        # its terms (checked when the coding is built), so checking it checks them.
        check_terms(coding["rhs"], where, columns)
        for expr in coding["factors"]:
            check_terms(expr, where, columns)
        for call in coding["transforms"]:
            check_expression(call, where, "design", columns)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def coding_spec(coding: dict[str, Any], where: str) -> Any:
    """A materialized formulaic ``ModelSpec`` from a checked CODING (no data needed)."""
    rhs = coding["rhs"]
    base = ModelSpec.from_spec(rhs, context={})
    terms = {str(t): t for t in base.formula}
    saved_terms = [t["term"] for t in coding["terms"]]
    if list(terms) != saved_terms:
        raise DesignSpecError(
            f"saved design: {where}: formula '{rhs}' parses to the terms {list(terms)} with this formulaic "
            f"version, but the saved design has {saved_terms}")
    factors = {f.expr: f for t in base.formula for f in t.factors}
    structure = []
    for term in coding["terms"]:
        scoped = []
        for scoped_term in term["scoped"]:
            scoped_factors = []
            for f in scoped_term["factors"]:
                factor, saved = factors.get(f["expr"]), coding["factors"].get(f["expr"])
                if factor is None or saved is None:
                    raise DesignSpecError(f"saved design: {where}: unknown factor '{f['expr']}' of '{rhs}'")
                evaluated = EvaluatedFactor(factor=factor, values=None, variables=set(saved["variables"]))
                scoped_factors.append(ScopedFactor(evaluated, reduced=f["reduced"]))
            scoped.append(ScopedTerm(scoped_factors, scale=scoped_term["scale"]))
        structure.append(EncodedTermStructure(terms[term["term"]], scoped, list(term["columns"])))
    encoder_state = {}
    for expr, factor in coding["factors"].items():
        if factor["kind"] == "categorical":
            state = {"categories": factor["categories"], "contrasts": factor["contrasts"]}
            encoder_state[expr] = (Factor.Kind("categorical"), state)
        elif factor["kind"] is not None:
            encoder_state[expr] = (Factor.Kind(factor["kind"]), {})
    transform_state = {call: dict(t["state"]) for call, t in coding["transforms"].items()}
    for call, t in coding["transforms"].items():
        if _call_function(call) != t["function"]:
            raise DesignSpecError(f"saved design: {where}: the state of '{call}' is said to be of {t['function']}()")
    # As keras_glmm.coding.build_matrix builds every coding (model_matrix, na_action="raise", pandas).
    return base.update(na_action="raise", output="pandas", structure=structure,
                       encoder_state=encoder_state, transform_state=transform_state)


def _check_consistent(doc: dict[str, Any]) -> None:
    """Fields that describe the same thing twice must agree: a document edited by hand (or
    by an attacker) whose lists disagree would code new data against the wrong columns
    or levels without a word."""
    def refuse(message: str) -> None:
        raise DesignSpecError(f"saved design: {message}")

    for where, part in (("fixed", doc["fixed"]), ("zero_inflation", doc["zero_inflation"])):
        if part is not None and len(part["columns"]) != len(part["formulaic_columns"]):
            refuse(f"field '{where}' names {len(part['columns'])} columns but {len(part['formulaic_columns'])} "
                   "formulaic columns")
    formula_terms = doc["formula"]["random"]
    if len(formula_terms) != len(doc["random"]):
        refuse(f"the formula has {len(formula_terms)} random terms but field 'random' describes {len(doc['random'])}")
    names = set()
    for i, (term, r) in enumerate(zip(formula_terms, doc["random"])):
        if r["term"] != term:
            refuse(f"field 'random[{i}]' is the term {r['term']} where the formula has {term}")
        if r["name"] in names:
            refuse(f"field 'random[{i}]' repeats the name '{r['name']}'")
        names.add(r["name"])
        if len(set(r["keys"])) != len(r["keys"]):
            refuse(f"field 'random[{i}]' lists a level key twice")
        if not r["columns"] or (r["intercept"] and r["columns"][0] != "(Intercept)"):
            refuse(f"field 'random[{i}]' has effects {r['columns']} (intercept={r['intercept']})")


def check_model_matches(design: Any, model: Any) -> None:
    """A loaded model's random-effects layers must have the sizes its saved design codes data
    for, each term's levels and effects (a ValueError naming them). The fixed effects'
    kernel is not built yet when a model is rebuilt from its config: it is not checked here."""
    terms = {term.name: term for term in model.random_effects}
    for r in design.random:
        term = terms.get(r.name)
        if term is None or term.num_levels != len(r.levels) or term.num_effects != len(r.columns):
            got = "no layer" if term is None else f"a layer of {term.num_levels} levels x {term.num_effects} effects"
            raise DesignSpecError(f"saved model: the design's term '{r.name}' has {len(r.levels)} levels x "
                                  f"{len(r.columns)} effects, the model {got}")
    if len(terms) != len(design.random):
        raise DesignSpecError(f"saved model: {len(terms)} random-effects layers for the design's "
                              f"{len(design.random)} terms")


def read(config: Any) -> dict[str, Any]:
    """Checks a saved design (the document of :func:`write`, e.g. after ``json.loads``) and decodes it.

    Returns:
        ``{"fields": {...}, "random": [{...}]}``: the fields of the
        :class:`~keras_glmm.design.Design` but its random terms, and one dict of
        :class:`~keras_glmm.random_terms.RandomTermDesign` fields per term.

    Raises:
        DesignSpecError: an unknown version, or a field unknown, missing or of
            the wrong type (the message names it).
        ExpressionError: an expression outside the formula language, under
            Keras's safe mode (the default).
    """
    try:
        _check_version(config)
        doc = _DOCUMENT(config, "")
    except field.FieldError as e:
        raise DesignSpecError(f"saved design: {e}") from None
    if not unsafe_deserialization_enabled():
        try:
            _check_expressions(doc)
        except ExpressionError as e:
            raise ExpressionError(f"{_REFUSED} {e} {_TRUST}") from None
    _check_consistent(doc)
    formula = doc["formula"]
    spec = FormulaSpec(
        formula=formula["text"], response=formula["response"], fixed=formula["fixed"],
        random=tuple(RandomTerm(**t) for t in formula["random"]), offsets=tuple(formula["offsets"]))
    zero = doc["zero_inflation"] or {"formula": None, "coding": None, "columns": [], "formulaic_columns": []}
    fields = {
        "spec": spec,
        "family_name": doc["family"],
        "na_action": doc["na_action"],
        "weights_kind": doc["weights"],
        "response_kind": doc["response"]["kind"],
        "response_levels": doc["response"]["levels"],
        "_response_columns": doc["response"]["columns"],
        "_offset_columns": doc["offset_columns"],
        "fixed_spec": coding_spec(doc["fixed"]["coding"], "the fixed effects"),
        "fixed_columns": doc["fixed"]["columns"],
        "fixed_formulaic_columns": doc["fixed"]["formulaic_columns"],
        "fixed_dropped": doc["fixed"]["dropped"],
        "ziformula": zero["formula"],
        "zi_spec": None if zero["coding"] is None else coding_spec(zero["coding"], ZI_WHERE),
        "zi_columns": zero["columns"],
        "zi_formulaic_columns": zero["formulaic_columns"],
    }
    random = []
    for i, r in enumerate(doc["random"]):
        term = RandomTerm(**r["term"])
        if len(r["keys"]) != len(r["levels"]) or len(r["group_kinds"]) != len(r["group_columns"]):
            raise DesignSpecError(
                f"saved design: field 'random[{i}]' has {len(r['keys'])} keys for {len(r['levels'])} levels "
                f"and {len(r['group_kinds'])} kinds for {len(r['group_columns'])} grouping columns")
        random.append({
            "term": term, "name": r["name"], "levels": r["levels"], "columns": r["columns"],
            "intercept": r["intercept"], "model_spec": coding_spec(r["coding"], f"random-effect term {term}"),
            "group_columns": tuple(r["group_columns"]), "keys": r["keys"], "group_kinds": tuple(r["group_kinds"]),
        })
    return {"fields": fields, "random": random}
