"""The formula expression language: data, not code.

formulaic evaluates the expressions of a formula (``log(x)``, ``I(x**2)``,
``C(f, Sum)``) with Python's ``eval``, and :mod:`keras_glmm.design` evaluates
offsets and the response the same way. Left alone, a formula — or a ``.keras``
file's ``config.json``, which stores the formula and every expression of the
design — would run any Python it holds when the model is fitted or predicts.
This module is the one definition of what an expression may contain. Every
expression is parsed with :mod:`ast` and checked against the allow-list
*before* anything is evaluated:

* by :func:`keras_glmm.formula.parse_formula` (the fixed part, the random
  terms' left-hand sides and grouping factors, ``offset()``, the response),
  and so for ``ziformula`` and ``re_form`` too;
* by :meth:`keras_glmm.design.Design.from_data`, again with the data's
  columns: every name must be a column;
* by ``Design.from_config`` (loading a saved model), with the columns the
  saved design records, unless Keras's safe mode was turned off explicitly
  (``load_model(..., safe_mode=False)``,
  ``keras.config.enable_unsafe_deserialization()``).

The language (``e`` an expression):

* column names (backticks for any other name: ```my col```, ```log.x```; R's
  dotted names plain in offsets and the response), numbers, ``True``/``False``;
* ``e + e``, ``e - e``, ``e * e``, ``e / e``, ``e ** e``, ``e // e``, ``-e``;
  comparisons ``== != < <= > >=``; ``e & e``, ``e | e``, ``~e``, ``not``,
  ``and``, ``or``. ``^`` is refused: inside an expression Python reads it as
  exclusive or (``I(x^2)`` would be ``x XOR 2``), so powers are ``**``;
* calls of :data:`VALUE_FUNCTIONS` (``log``, ``log1p``, ``log2``, ``log10``,
  ``exp``, ``expm1``, ``sqrt``, ``abs``), ``I(e)`` and ``np.<f>(...)`` /
  ``numpy.<f>(...)`` for ``f`` in :data:`NUMPY_FUNCTIONS`;
* in the fixed part, random terms and ``ziformula`` (formulaic's terms) also
  ``C(e, contrast, levels=[...], spans_intercept=...)`` with a contrast
  ``Treatment``, ``Sum``, ``Helmert``, ``Poly``, ``Diff``, ``contr.<name>``
  (``treatment``, ``sum``, ``helmert``, ``poly``, ``diff``, ``SAS``), either
  called with literal arguments (``Treatment(2)``,
  ``contr.treatment(base='b')``) or a literal matrix / dict of weights;
  ``Q('name')``; ``scale``, ``center``, ``standardize``, ``poly``, ``bs``,
  ``cr``, ``cs``, ``cc`` with literal arguments (:data:`DESIGN_FUNCTIONS`);
* ``cbind(e, e)`` as a whole response, ``offset(e)`` as a whole term.

Nothing else: no attribute access but ``np.``/``numpy.``/``contr.``, no
subscripts, lambdas, comprehensions, conditional expressions, strings outside
``Q()``/literal arguments, ``*args``/``**kwargs``, names beginning with
``__``, keywords other than the function's own. A refused expression raises
:class:`ExpressionError` (a ``ValueError``) naming it and saying what is
allowed.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "DESIGN_FUNCTIONS",
    "ExpressionError",
    "FORMULA_CONTEXT",
    "NUMPY_FUNCTIONS",
    "VALUE_FUNCTIONS",
    "check_expression",
    "check_formula",
    "check_saved_design",
    "check_saved_random_term",
    "check_terms",
    "unsafe_deserialization_enabled",
]


class ExpressionError(ValueError):
    """An expression of a formula (or of a saved design) is not in the language.

    Attributes:
        where: The part of the model it is in (``"the fixed effects"``), if known.
        detail: The message without the part and the formula.
    """

    def __init__(self, message: str, where: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.where, self.detail = where, detail

    def for_part(self, part: str, text: str) -> "ExpressionError":
        """The same refusal, said of ``part`` (e.g. the ziformula, parsed as a formula of its own)."""
        detail = self.detail if self.detail is not None else str(self)
        return ExpressionError(f"{part} '{text}': {detail}", part, detail)


def _refusal(where: str, detail: str) -> ExpressionError:
    return ExpressionError(f"{where}: {detail}", where, detail)


# --------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------

# Elementwise functions of one value: offsets, the response and formulaic's terms.
VALUE_FUNCTIONS = ("log", "log1p", "log2", "log10", "exp", "expm1", "sqrt", "abs")

# numpy functions callable as np.<name>(...) / numpy.<name>(...): ufuncs of one
# or two values, positional arguments only (no out=, where=).
_NUMPY_UNARY = (
    "log", "log1p", "log2", "log10", "exp", "expm1", "exp2", "sqrt", "cbrt", "square",
    "abs", "absolute", "fabs", "sign", "negative", "reciprocal", "floor", "ceil", "rint", "trunc",
    "sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "arcsinh", "arccosh", "arctanh", "deg2rad", "rad2deg", "isnan", "isfinite",
)
_NUMPY_BINARY = ("power", "maximum", "minimum", "fmax", "fmin", "hypot", "arctan2", "logaddexp")
NUMPY_FUNCTIONS = _NUMPY_UNARY + _NUMPY_BINARY

# Names formulaic's own namespace lacks (it has np, log, log2, log10, exp):
# passed as its evaluation context so that every VALUE_FUNCTION works in every part.
FORMULA_CONTEXT: dict[str, Any] = {
    "numpy": np,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "sqrt": np.sqrt,
    "abs": np.abs,
}

# Contrasts: formulaic's patsy-style names and its registry contr.<name>, with
# the keywords of their constructors.
_CONTRASTS = {
    "Treatment": ("reference",),
    "Sum": (),
    "Helmert": ("reverse", "scale"),
    "Poly": ("scores",),
    "Diff": ("backward",),
}
_CONTR_REGISTRY = {
    "treatment": ("base",),
    "sum": (),
    "helmert": ("reverse", "scale"),
    "poly": ("scores",),
    "diff": ("backward",),
    "SAS": ("base",),
}

# Argument kinds: "value" (an expression), "literal" (numbers, strings,
# booleans, None, lists/tuples of them), "contrast", "column" (a string naming
# a column).


@dataclass(frozen=True)
class _Signature:
    positional: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...] = ()
    required: int = 1

    def keyword_kind(self, name: str) -> str | None:
        return dict(self.keywords).get(name)


_LIT = "literal"
_SPLINE_KW = (("df", _LIT), ("knots", _LIT), ("lower_bound", _LIT), ("upper_bound", _LIT),
              ("constraints", _LIT), ("extrapolation", _LIT))
_VALUE_SIGNATURES = {name: _Signature(("value",)) for name in VALUE_FUNCTIONS}
_VALUE_SIGNATURES["I"] = _Signature(("value",))

# formulaic's transforms (fixed part, random terms, ziformula only).
DESIGN_FUNCTIONS: dict[str, _Signature] = {
    "C": _Signature(("value", "contrast"), (("contrasts", "contrast"), ("levels", _LIT),
                                           ("spans_intercept", _LIT))),
    "Q": _Signature(("column",)),
    "center": _Signature(("value",)),
    "scale": _Signature(("value", _LIT, _LIT, _LIT), (("center", _LIT), ("scale", _LIT), ("ddof", _LIT))),
    "standardize": _Signature(("value", _LIT, _LIT, _LIT),
                              (("center", _LIT), ("rescale", _LIT), ("ddof", _LIT))),
    "poly": _Signature(("value", _LIT, _LIT), (("degree", _LIT), ("raw", _LIT))),
    "bs": _Signature(("value",) + (_LIT,) * 6, (("df", _LIT), ("knots", _LIT), ("degree", _LIT),
                                              ("include_intercept", _LIT), ("lower_bound", _LIT),
                                              ("upper_bound", _LIT), ("extrapolation", _LIT))),
    "cr": _Signature(("value",) + (_LIT,) * 5, _SPLINE_KW),
    "cs": _Signature(("value",) + (_LIT,) * 5, _SPLINE_KW),
    "cc": _Signature(("value",) + (_LIT,) * 5, _SPLINE_KW),
}

_BINARY_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
               ast.FloorDiv: "//", ast.BitAnd: "&", ast.BitOr: "|"}
_UNARY_OPS = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_NAMESPACES = ("np", "numpy")

_LANGUAGE = (
    "A formula expression may contain column names (in backticks if not plain names), numbers, "
    "+ - * / ** // and unary -, comparisons, & | ~ not and or, and calls of "
    + ", ".join(VALUE_FUNCTIONS)
    + ", I(), np./numpy. functions (" + ", ".join(NUMPY_FUNCTIONS[:6]) + ", ...; "
    "keras_glmm.expressions.NUMPY_FUNCTIONS), and in the fixed part, random terms and ziformula also "
    "C(x, Treatment|Sum|Helmert|Poly|Diff|contr.<name>, levels=[...]), Q('name'), "
    + ", ".join(f"{n}()" for n in DESIGN_FUNCTIONS if n not in ("C", "Q"))
    + " with literal arguments; cbind(a, b) as the response and offset(e) as a term"
)

_WHAT = {
    ast.Subscript: "a subscript", ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension",
    ast.IfExp: "a conditional expression", ast.NamedExpr: "an assignment expression",
    ast.Starred: "*-unpacking", ast.JoinedStr: "an f-string", ast.Attribute: "attribute access",
    ast.Dict: "a dict", ast.List: "a list", ast.Tuple: "a tuple", ast.Set: "a set",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
}


# --------------------------------------------------------------------------
# Columns a name may refer to
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """The columns names must be: the data's (fitting) or the saved design's (loading)."""

    names: tuple[str, ...]
    saved: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self._set

    @functools.cached_property
    def _set(self) -> frozenset[str]:
        return frozenset(self.names)

    def unknown(self, name: str, where: str, factor: str) -> ExpressionError:
        detail = f" (in '{factor}')" if factor != name else ""
        if self.saved:
            return ExpressionError(
                f"unknown column '{name}' in {where}{detail}: not one of the columns the saved design "
                f"records {list(self.names)}"
            )
        listed = (f"; available columns: {list(self.names)}" if len(self.names) <= 30
                  else f"; the data has {len(self.names)} columns")
        return ExpressionError(f"unknown column '{name}' in {where}{detail}{listed}")


def _columns(columns: Iterable[Any] | _Columns | None) -> _Columns | None:
    if columns is None or isinstance(columns, _Columns):
        return columns
    return _Columns(tuple(str(c) for c in columns))


# --------------------------------------------------------------------------
# One expression
# --------------------------------------------------------------------------

_BACKTICK = re.compile(r"`([^`]*)`")


class _Checker:
    """Walks one parsed expression; every node must be on the list."""

    def __init__(self, text: str, where: str, role: str, columns: _Columns | None, aliases: dict[str, str]):
        self.text, self.where, self.role, self.columns, self.aliases = text, where, role, columns, aliases

    # -- messages
    def show(self, node: ast.AST) -> str:
        out = ast.unparse(node)
        for alias, name in self.aliases.items():
            out = out.replace(alias, f"`{name}`")
        return out

    def refuse(self, node: ast.AST, reason: str) -> ExpressionError:
        shown = self.show(node)
        inside = "" if shown == self.text else f" (in '{self.text}')"
        return _refusal(self.where, f"'{shown}'{inside} is not allowed: {reason}. {_LANGUAGE}.")

    # -- names
    def name(self, name: str, node: ast.AST) -> None:
        if name.startswith("__") or any(part.startswith("__") for part in name.split(".")):
            raise self.refuse(node, "names beginning with '__' are not allowed")
        if self.columns is not None and name not in self.columns:
            raise self.columns.unknown(name, self.where, self.text)

    def dotted(self, node: ast.AST) -> str | None:
        """``a.b.c`` of plain names, else None."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(node.id)
        return ".".join(reversed(parts))

    # -- values
    def value(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            self.name(self.aliases.get(node.id, node.id), node)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or type(node.value) in (int, float):
                return
            if isinstance(node.value, str):
                raise self.refuse(node, "a string is allowed only in Q('name') and literal arguments")
            raise self.refuse(node, f"a {type(node.value).__name__} constant")
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.BitXor):
                raise self.refuse(
                    node, "'^' is Python's exclusive or inside an expression, not a power: write ** "
                    "(I(x**2))")
            if type(node.op) not in _BINARY_OPS:
                raise self.refuse(node, f"the operator {type(node.op).__name__}")
            self.value(node.left)
            self.value(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARY_OPS):
                raise self.refuse(node, f"the operator {type(node.op).__name__}")
            self.value(node.operand)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                self.value(v)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if not isinstance(op, _COMPARISONS):
                    raise self.refuse(node, f"the comparison {type(op).__name__}")
            self.value(node.left)
            for v in node.comparators:
                self.value(v)
        elif isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, ast.Attribute):
            dotted = self.dotted(node)
            if self.role == "value" and dotted is not None and dotted.split(".")[0] not in _NAMESPACES:
                # offsets and the response take R's dotted column names (log.x) as names
                self.name(dotted, node)
                return
            raise self.refuse(
                node, "attribute access (a column whose name has a dot is written in backticks: `log.x`)"
                if dotted is not None and dotted.split(".")[0] not in _NAMESPACES + ("contr",)
                else "attribute access outside a call of np./numpy. functions")
        else:
            raise self.refuse(node, _WHAT.get(type(node), f"a {type(node).__name__} expression"))

    def literal(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and (
            node.value is None or isinstance(node.value, (bool, str)) or type(node.value) in (int, float)
        ):
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            if isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
                return
        if isinstance(node, (ast.List, ast.Tuple)):
            for e in node.elts:
                self.literal(e)
            return
        raise self.refuse(node, "expected a literal (a number, string, True/False/None or a list of them)")

    def contrast(self, node: ast.AST) -> None:
        target = node.func if isinstance(node, ast.Call) else node
        keywords: tuple[str, ...] | None = None
        if isinstance(target, ast.Name):
            keywords = _CONTRASTS.get(target.id)
            if target.id == "Treatment" and not isinstance(node, ast.Call):
                # formulaic's Treatment is a function, not a class: bare, it codes nothing
                raise self.refuse(node, "Treatment is called: Treatment(), Treatment('level') or contr.treatment")
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "contr":
            keywords = _CONTR_REGISTRY.get(target.attr)
        if keywords is None:
            if isinstance(node, ast.Dict):  # {"name": [weights], ...}
                for k, v in zip(node.keys, node.values, strict=True):
                    if k is None:
                        raise self.refuse(node, "**-unpacking")
                    self.literal(k)
                    self.literal(v)
                return
            if isinstance(node, (ast.List, ast.Tuple)):  # a contrast matrix
                self.literal(node)
                return
            raise self.refuse(
                node, "a contrast must be Treatment, Sum, Helmert, Poly, Diff or contr."
                + "/contr.".join(_CONTR_REGISTRY) + " (called with literal arguments or not), "
                "or a literal matrix or dict of weights")
        if isinstance(node, ast.Call):
            if len(node.args) > max(1, len(keywords)):
                raise self.refuse(node, "too many arguments")
            for a in node.args:
                self.literal(a)
            for kw in node.keywords:
                if kw.arg not in keywords:
                    raise self.refuse(node, f"the keyword {kw.arg or '**'}= (allowed: {list(keywords)})")
                self.literal(kw.value)

    def argument(self, kind: str, node: ast.AST) -> None:
        if isinstance(node, ast.Starred):
            raise self.refuse(node, "*-unpacking")
        if kind == "value":
            self.value(node)
        elif kind == _LIT:
            self.literal(node)
        elif kind == "contrast":
            self.contrast(node)
        elif kind == "column":
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                raise self.refuse(node, "Q() takes a column name as a string")
            self.name(node.value, node)

    def call(self, node: ast.Call) -> None:
        func = node.func
        signature = None
        if isinstance(func, ast.Name):
            signature = _VALUE_SIGNATURES.get(func.id)
            if signature is None and self.role == "design":
                signature = DESIGN_FUNCTIONS.get(func.id)
            what = func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _NAMESPACES:
            what = f"{func.value.id}.{func.attr}"
            if func.attr in _NUMPY_BINARY:
                signature = _Signature(("value", "value"), required=2)
            elif func.attr in _NUMPY_UNARY:
                signature = _Signature(("value",))
        else:
            what = self.show(func)
        if signature is None:
            where = (" (offsets and the response take no C(), Q() or splines)"
                     if self.role == "value" and isinstance(func, ast.Name) and func.id in DESIGN_FUNCTIONS else "")
            raise self.refuse(node, f"a call of '{what}'{where}{_r_hint(what, node, self)}")
        if len(node.args) < signature.required and not node.keywords:
            raise self.refuse(node, f"{what}() needs {signature.required} argument(s)")
        if len(node.args) > len(signature.positional):
            raise self.refuse(node, f"{what}() takes at most {len(signature.positional)} positional argument(s)")
        for kind, arg in zip(signature.positional, node.args):
            self.argument(kind, arg)
        for kw in node.keywords:
            kind = None if kw.arg is None else signature.keyword_kind(kw.arg)
            if kind is None:
                allowed = [k for k, _ in signature.keywords]
                raise self.refuse(node, f"the keyword {kw.arg or '**'}= of {what}() (allowed: {allowed or 'none'})")
            self.argument(kind, kw.value)


# R's functions of a formula and what this language says instead (`_r_hint`).
_R_FUNCTIONS = {
    "factor": "use C({arg}) for a factor (R's factor())",
    "as.factor": "use C({arg}) for a factor (R's as.factor())",
    "ordered": "use C({arg}, Poly) for an ordered factor's polynomial contrasts (R's ordered())",
    "relevel": "use C({arg}, Treatment('level')) for another reference level (R's relevel())",
    "as.numeric": "a numeric column needs no call: write {arg}",
}


def _r_hint(what: str, node: ast.Call, visitor) -> str:
    """`: use C(period) for a factor (R's factor())` for R's spelling, else ''."""
    hint = _R_FUNCTIONS.get(what)
    if hint is None:
        return ""
    arg = visitor.show(node.args[0]) if node.args else "x"
    return ": " + hint.format(arg=arg)


def _parse(text: str, where: str) -> tuple[ast.AST, dict[str, str]]:
    """``text`` parsed as one Python expression, backticked names replaced by aliases."""
    aliases: dict[str, str] = {}

    def alias(m: re.Match) -> str:
        key = f"_kg_name_{len(aliases)}_"
        aliases[key] = m.group(1)
        return key

    code = _BACKTICK.sub(alias, text) if "`" in text else text
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise _refusal(
            where, f"'{text}' is not an expression of the formula language ({e.msg}). {_LANGUAGE}."
        ) from None
    return tree.body, aliases


def check_expression(text: str, where: str, role: str = "design", columns=None) -> None:
    """Refuses ``text`` unless it is an expression of the language (see the module docstring).

    Args:
        text: One expression, e.g. ``"log(x)"``, ``"C(f, Sum)"``, ``"I(x**2)"``.
        where: What it is part of, for the message (``"the fixed effects"``).
        role: ``"design"`` (a formulaic factor: C(), Q(), splines allowed) or
            ``"value"`` (an offset or response, evaluated by the design).
        columns: The columns names must be (an iterable of labels), or None to
            check the structure only.

    Raises:
        ExpressionError: naming the expression, what in it is refused, and the language.
    """
    if not isinstance(text, str):
        raise _refusal(where, f"expected an expression string, got {type(text).__name__} {text!r}")
    columns = _columns(columns)
    if columns is None:
        _check_structure(text, where, role)
        return
    node, aliases = _parse(text, where)
    _Checker(text, where, role, columns, aliases).value(node)


@functools.lru_cache(maxsize=4096)
def _check_structure(text: str, where: str, role: str) -> None:
    node, aliases = _parse(text, where)
    _Checker(text, where, role, None, aliases).value(node)


def _check_response(text: str, where: str, columns) -> None:
    """A response: ``cbind(a, b)`` of two expressions, or one expression."""
    node, _ = _parse(text, where)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cbind":
        if len(node.args) != 2 or node.keywords:
            raise _refusal(where, "cbind() takes exactly two arguments: cbind(successes, failures)")
        for arg in node.args:
            check_expression(_unparse_with_backticks(text, arg), where, "value", columns)
        return
    check_expression(text, where, "value", columns)


def _unparse_with_backticks(text: str, node: ast.AST) -> str:
    _, aliases = _parse(text, "")
    out = ast.unparse(node)
    for alias, name in aliases.items():
        out = out.replace(alias, f"`{name}`")
    return out


# --------------------------------------------------------------------------
# formulaic right-hand sides
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _factors(rhs: str, available: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """(expr, eval method) of every factor of a formulaic right-hand side, parsed
    (never evaluated) by formulaic's own parser: what formulaic would evaluate."""
    from formulaic.parser import DefaultFormulaParser

    context = {"__formulaic_variables_available__": list(available or ())}
    terms = DefaultFormulaParser().get_terms(rhs, context=context)
    groups = list(terms._flatten()) if hasattr(terms, "_flatten") else [terms]
    out = []
    for group in groups:
        for term in group:
            for factor in term.factors:
                out.append((factor.expr, getattr(factor.eval_method, "value", str(factor.eval_method))))
    return tuple(dict.fromkeys(out))


def check_terms(rhs: str, where: str, columns=None) -> None:
    """Refuses a formulaic right-hand side (``"1 + x + C(f)"``) any of whose factors is
    not in the language; with ``columns``, each name must be one of them."""
    if not isinstance(rhs, str):
        raise _refusal(where, f"expected a formula string, got {type(rhs).__name__} {rhs!r}")
    columns = _columns(columns)
    try:
        factors = _factors(rhs, None if columns is None else columns.names)
    except Exception as e:  # noqa: BLE001 - formulaic's parser errors vary
        call = re.search(r"\bas\.factor\(\s*([^()]*?)\s*\)", rhs)  # `as` is Python's keyword
        hint = "" if call is None else "; " + _R_FUNCTIONS["as.factor"].format(arg=call.group(1) or "x")
        raise _refusal(where, f"formulaic cannot parse '{rhs}': {e}{hint}") from None
    for expr, method in factors:
        if method == "literal":
            continue  # formulaic reads these with ast.literal_eval
        if method == "lookup":
            if expr.startswith("__"):
                raise _refusal(where, f"names beginning with '__' are not allowed: '{expr}'. {_LANGUAGE}.")
            if columns is not None and expr not in columns:
                raise columns.unknown(expr, where, expr)
            continue
        check_expression(expr, where, "design", columns)


def _check_group(group: str, where: str, columns) -> None:
    """A grouping factor: ``g`` or ``a:b`` of column names (backticks allowed)."""
    parts = re.findall(r"`[^`]*`|[^:]+", group) if isinstance(group, str) else []
    if not parts or ":".join(parts) != group:
        raise _refusal(where, f"grouping factor {group!r} is not a column name or an interaction a:b")
    for part in parts:
        part = part.strip()
        name = part[1:-1] if part.startswith("`") else part
        if not (part.startswith("`") or re.fullmatch(r"[A-Za-z_.][\w.]*", name)) or name.startswith("__"):
            raise _refusal(
                where, f"grouping factor {group!r}: '{part}' is not a column name (backticks for other names)")
        if columns is not None and name not in columns:
            raise columns.unknown(name, where, name)


# --------------------------------------------------------------------------
# A whole formula
# --------------------------------------------------------------------------


def check_formula(spec, columns=None, ziformula_rhs: str | None = None) -> None:
    """Checks every expression of a parsed formula (a ``FormulaSpec``) before any is evaluated.

    The response (``cbind(a, b)`` or an expression), the fixed part, each random
    term's left-hand side and grouping factor, and each offset; ``ziformula_rhs``
    (the zero-inflation formula's right-hand side) when given. With ``columns``
    (the data's), every name must be a column, named as the design names them.
    """
    columns = _columns(columns)
    try:
        if spec.response is not None:
            _check_response(spec.response, f"the response {spec.response}", columns)
        check_terms(spec.fixed_rhs(), "the fixed effects", columns)
        for term in spec.random:
            _check_group(term.group, f"the grouping factor of random-effect term {term}", columns)
            check_terms(term.expr, f"random-effect term {term}", columns)
        for offset in spec.offsets:
            check_expression(offset, f"offset({offset})", "value", columns)
        if ziformula_rhs is not None:
            check_terms(ziformula_rhs, "the zero-inflation formula (ziformula)", columns)
    except ExpressionError as e:
        if columns is None and getattr(spec, "formula", None):
            raise ExpressionError(f"formula '{spec.formula}': {e}", e.where, e.detail) from None
        raise


# --------------------------------------------------------------------------
# A saved design (config.json of a .keras file)
# --------------------------------------------------------------------------


_REFUSED = "The saved model's formula design (config.json) was refused under Keras's safe_mode:"
_TRUST = ("A saved file may have been altered to run code: load it with safe_mode=False only if you trust "
          "its source.")


def unsafe_deserialization_enabled() -> bool:
    """Whether the user turned Keras's safe mode off (``load_model(..., safe_mode=False)``,
    ``keras.config.enable_unsafe_deserialization()``); see
    `keras_glmm.compat.unsafe_deserialization_enabled`.
    """
    if "keras" not in sys.modules:  # nothing turned it off; formulas alone need no Keras
        return False
    from keras_glmm import compat  # Keras (and TensorFlow) are loaded already

    return compat.unsafe_deserialization_enabled()


def _saved_columns(config: dict[str, Any]) -> _Columns:
    """The columns a saved design records: its formulaic specs' data variables, the
    response's, the offsets' and the grouping columns."""
    names: list[str] = []

    def spec_columns(spec_config):
        if not isinstance(spec_config, dict):
            return
        for structure in spec_config.get("structure", []):
            for scoped in structure.get("scoped_terms", []):
                for factor in scoped.get("factors", []):
                    for item in factor.get("variables") or []:
                        if len(item) == 3 and item[2] == "data":
                            names.append(str(item[0]))

    spec_columns(config.get("fixed_spec"))
    spec_columns(config.get("zi_spec"))
    for term in config.get("random", []):
        spec_columns(term.get("model_spec"))
        names.extend(str(c) for c in term.get("group_columns", []))
    names.extend(str(c) for c in config.get("response_columns", []))
    names.extend(str(c) for c in config.get("offset_columns", []))
    return _Columns(tuple(dict.fromkeys(names)), saved=True)


def _check_model_spec_config(spec_config: Any, where: str, columns: _Columns) -> None:
    # Only the right-hand side is parsed on load; the saved structure's factors
    # must be among its factors (design.py refuses others), so checking it
    # checks every factor formulaic will evaluate.
    if spec_config is None:
        return
    if not isinstance(spec_config, dict) or "rhs" not in spec_config:
        raise _refusal(where, "a saved model spec without its formula")
    check_terms(spec_config["rhs"], where, columns)


def check_saved_design(config: dict[str, Any], parse_formula: Callable[[str], Any]) -> None:
    """Refuses a saved design (``Design.get_config()``) any expression of which is
    not in the language, before anything is rebuilt or evaluated, unless the user
    turned Keras's safe mode off. Every name must be a column the design records.

    Args:
        config: The design's config, as read from ``config.json``.
        parse_formula: :func:`keras_glmm.formula.parse_formula` (passed in: that
            module imports this one), for the stored formula and ziformula.
    """
    if unsafe_deserialization_enabled():
        return
    try:
        _check_saved_design(config, parse_formula)
    except ExpressionError as e:
        raise ExpressionError(f"{_REFUSED} {e} {_TRUST}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ExpressionError(f"{_REFUSED} the design is malformed ({type(e).__name__}: {e}). {_TRUST}") from None


def _parsed(parse_formula: Callable[[str], Any], text: Any, what: str):
    if not isinstance(text, str):
        raise ExpressionError(f"{what} {text!r} is not a formula string")
    try:
        return parse_formula(text)  # checks its structure
    except ExpressionError:
        raise
    except ValueError as e:
        raise ExpressionError(f"{what} '{text}' does not parse: {e}") from None


def _check_saved_design(config: dict[str, Any], parse_formula: Callable[[str], Any]) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise ExpressionError("the design has no formula spec")
    columns = _saved_columns(config)
    s = config["spec"]
    check_formula(_parsed(parse_formula, s["formula"], "the formula"), columns)
    # The stored pieces are what is used, not a parse of the formula: each is checked.
    if s.get("response") is not None:
        _check_response(s["response"], f"the response {s['response']}", columns)
    fixed = s.get("fixed")
    if not isinstance(fixed, str) or "~" not in fixed:
        raise ExpressionError(f"the fixed part {fixed!r} is not a formula")
    lhs, rhs = fixed.split("~", 1)
    if lhs.strip():
        _check_response(lhs.strip(), f"the response {lhs.strip()}", columns)
    check_terms(rhs, "the fixed effects", columns)
    for t in s.get("random", []):
        _check_group(t["group"], f"the grouping factor of random-effect term ({t['expr']} | {t['group']})", columns)
        check_terms(t["expr"], f"random-effect term ({t['expr']} | {t['group']})", columns)
    for offset in s.get("offsets", []):
        check_expression(offset, f"offset({offset})", "value", columns)
    _check_model_spec_config(config.get("fixed_spec"), "the fixed effects", columns)
    for r in config.get("random", []):
        _check_saved_random_term(r, columns)
    zi = config.get("ziformula")
    if zi is not None:
        text = zi.strip() if isinstance(zi, str) else zi
        check_formula(_parsed(parse_formula, text if "~" in text else "~ " + text, "the ziformula"), columns)
    _check_model_spec_config(config.get("zi_spec"), "the zero-inflation formula (ziformula)", columns)


def check_saved_random_term(config: dict[str, Any]) -> None:
    """Refuses a saved random-effect term (``RandomTermDesign.get_config()``) whose
    expression, grouping factor or model spec is not in the language, unless the
    user turned Keras's safe mode off (see :func:`check_saved_design`)."""
    if unsafe_deserialization_enabled():
        return
    try:
        _check_saved_random_term(config, _saved_columns({"random": [config]}))
    except ExpressionError as e:
        raise ExpressionError(f"{_REFUSED} {e} {_TRUST}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise ExpressionError(f"{_REFUSED} the term is malformed ({type(e).__name__}: {e}). {_TRUST}") from None


def _check_saved_random_term(config: dict[str, Any], columns: _Columns) -> None:
    t = config.get("term") if isinstance(config, dict) else None
    if not isinstance(t, dict):
        raise ExpressionError("a saved random-effect term without its term")
    where = f"random-effect term ({t.get('expr')} | {t.get('group')})"
    _check_group(t.get("group"), f"the grouping factor of {where}", columns)
    check_terms(t.get("expr"), where, columns)
    _check_model_spec_config(config.get("model_spec"), where, columns)
