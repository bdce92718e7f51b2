"""lme4-style mixed-model formulas: parse a string into a :class:`FormulaSpec`.

This module only deals with text. It knows nothing about data, design matrices
or TensorFlow: it splits a formula such as ::

    log_radon ~ floor + offset(log(n)) + (1 + floor | county)

into the fixed-effects part (handed to formulaic later), the random-effect
terms (lme4's ``findbars``) and the ``offset()`` terms, following lme4's rules
and MixedModels.jl's handling of ``||`` and ``/``.

formulaic treats ``|`` as a separator between formula *parts*, so the random
terms must be removed by our own scanner before formulaic ever sees the
string. The scanner is a small tokenizer that tracks bracket nesting and
quoting, which makes it robust to things like ``(I(x^2) | g)``,
``(log(x) | g)``, ``C(period, Treatment(2))`` or Python code inside ``I()``
that happens to contain ``|``.

Supported random-effect syntax (lme4 semantics):

* ``(1 | g)``: random intercept per level of ``g``.
* ``(x | g)`` / ``(1 + x | g)``: correlated intercept and slope. The expression
  is kept as written (``"x"``); the design step adds the implicit intercept
  exactly as formulaic does for ordinary formulas.
* ``(0 + x | g)`` / ``(-1 + x | g)``: slope only.
* ``(x || g)``: uncorrelated, expanded like lme4's ``expandDoubleVerts`` into
  ``(1 || g) + (0 + x || g)``: one term per *term label* of the left-hand side,
  as R's ``terms()`` gives them, so ``(x * f || g)`` is ``(1 || g) + (0 + x || g)
  + (0 + f || g) + (0 + x:f || g)``. A factor's columns are not split: ``(f || g)``
  is ``(1 || g) + (0 + f || g)``, the second term one correlated block with a
  column for every level of ``f``, as in lme4 (whose documentation says ``||``
  works as intended only for numeric predictors).
* ``(1 | a/b)``: nesting, expanded as lme4 does to ``(1 | a) + (1 | b:a)``, the
  inner factor first in the nested term's name (lme4's VarCorr: ``cask:batch``);
  ``a/b/c`` gives ``a``, ``b:a`` and ``c:b:a``.
* ``(1 | a:b)``: one grouping factor whose levels are the combinations.
* Several terms may share a grouping factor: ``(1 | g) + (0 + x | g)``.

Whitespace is normalised throughout, so ``y~x+(1|g)`` and
``y ~ x + ( 1 | g )`` give equal specs.
"""

from __future__ import annotations

from dataclasses import dataclass

from keras_glmm.expressions import check_formula

__all__ = ["FormulaError", "FormulaSpec", "RandomTerm", "parse_formula"]


class FormulaError(ValueError):
    """A formula could not be parsed.

    The message shows the formula with a caret under the offending character,
    like Python's ``SyntaxError`` display.

    Attributes:
        message: The bare description of the problem.
        formula: The formula text that failed.
        position: 0-based character offset of the problem in ``formula``
            (may equal ``len(formula)`` for "unexpected end" problems).
    """

    def __init__(self, message: str, formula: str, position: int):
        self.message = message
        self.formula = formula
        self.position = position
        # Tabs/newlines would shift the caret, so they are shown as spaces;
        # every character keeps its column.
        shown = "".join(" " if c.isspace() else c for c in formula)
        super().__init__(f"{message}\n    {shown}\n    {' ' * position}^")


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term ``(expr | group)``, after ``||``/``/`` expansion.

    Attributes:
        expr: Left-hand side of the bar as a formulaic right-hand-side string,
            e.g. ``"1"``, ``"x"``, ``"0 + x"``, ``"1 + x + z"``.
        group: Grouping factor: a column name ``"g"`` or an interaction
            ``"a:b"`` whose levels are the observed combinations. Names that
            needed backticks keep them.
        correlated: ``False`` for terms that came from ``||``.
    """

    expr: str
    group: str
    correlated: bool = True

    def group_columns(self) -> tuple[str, ...]:
        """Column names making up the grouping factor (``("a", "b")`` for ``a:b``)."""
        scan = _Scan(self.group)
        return tuple(_unquote(t.text) for t in scan.tokens if t.kind == _NAME)

    def __str__(self) -> str:
        bar = "|" if self.correlated else "||"
        return f"({self.expr} {bar} {self.group})"


@dataclass(frozen=True)
class FormulaSpec:
    """A parsed mixed-model formula.

    Attributes:
        formula: The original text.
        response: Left-hand side (normalised), or ``None`` for a one-sided
            formula.
        fixed: Fixed-effects formula for formulaic, *including* the response,
            with random and ``offset()`` terms removed (``"y ~ 1"`` when
            nothing is left; ``0``/``-1`` are kept).
        random: Random-effect terms, in order of appearance, expanded.
        offsets: Expressions found inside top-level ``offset(...)`` terms.
    """

    formula: str
    response: str | None
    fixed: str
    random: tuple[RandomTerm, ...] = ()
    offsets: tuple[str, ...] = ()

    def cbind(self) -> tuple[str, str] | None:
        """The two arguments of a ``cbind(successes, failures)`` response, else ``None``."""
        if self.response is None:
            return None
        scan = _Scan(self.response)
        return _cbind_args(scan, scan.tokens)

    def fixed_rhs(self) -> str:
        """Right-hand side of :attr:`fixed` (e.g. ``"1 + x"``)."""
        prefix = f"{self.response} ~ " if self.response is not None else "~ "
        if self.fixed.startswith(prefix):
            return self.fixed[len(prefix):]
        return self.fixed.split("~", 1)[1].strip()  # pragma: no cover - defensive

    def __str__(self) -> str:
        """Normalised lme4 formula; ``parse_formula(str(spec))`` reproduces the spec."""
        parts = [self.fixed_rhs()]
        parts += [f"offset({o})" for o in self.offsets]
        parts += [str(r) for r in self.random]
        lhs = f"{self.response} ~ " if self.response is not None else "~ "
        return lhs + " + ".join(parts)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

_NAME, _NUMBER, _STRING, _OP, _OPEN, _CLOSE = "name", "number", "string", "op", "open", "close"
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _PAIRS.items()}
# Longest first so that "||" wins over "|" and "**" over "*".
_MULTI_OPS = ("||", "**", "==", "!=", "<=", ">=", "//", "<<", ">>", "->", "&&")
# Binary operators rendered with a space on each side. Everything else
# (":", "^", "**", "=", ".", ...) is rendered tight, which matches how
# people usually write formulas ("a:b", "I(x^2)", "levels=[...]").
_SPACED = {"+", "-", "~", "*", "/", "|", "||", "==", "!=", "<=", ">=", "<", ">", "//"}
_WORDS = (_NAME, _NUMBER, _STRING)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int
    index: int


def _tokenize(text: str) -> list[_Token]:
    """Split ``text`` into tokens, keeping each token's character offset."""
    tokens: list[_Token] = []
    i, n = 0, len(text)

    def add(kind: str, start: int, end: int) -> None:
        tokens.append(_Token(kind, text[start:end], start, len(tokens)))

    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "'\"`":
            # Quoted strings (Python) and backtick names (formulaic/R) may
            # contain anything, including "|" and parentheses.
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if (text[j] == "\\" and c != "`") else 1
            if j >= n:
                what = "backtick name" if c == "`" else "string"
                raise FormulaError(f"unterminated {what}", text, i)
            add(_NAME if c == "`" else _STRING, i, j + 1)
            i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "._"):
                # Exponents like 1e-3 carry a sign that is not an operator.
                if text[j] in "eE" and j + 1 < n and text[j + 1] in "+-":
                    j += 1
                j += 1
            add(_NUMBER, i, j)
            i = j
        elif c.isalpha() or c in "_.":
            # R allows dots in names (log.x); Python attribute access
            # (np.log) reads the same way, so dots are part of names.
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "_."):
                j += 1
            add(_NAME, i, j)
            i = j
        elif c in _PAIRS:
            add(_OPEN, i, i + 1)
            i += 1
        elif c in _CLOSERS:
            add(_CLOSE, i, i + 1)
            i += 1
        elif c == "%":
            # R operators such as %in%.
            j = text.find("%", i + 1)
            if j < 0:
                raise FormulaError("unterminated %...% operator", text, i)
            add(_OP, i, j + 1)
            i = j + 1
        else:
            for op in _MULTI_OPS:
                if text.startswith(op, i):
                    add(_OP, i, i + len(op))
                    i += len(op)
                    break
            else:
                add(_OP, i, i + 1)
                i += 1
    return tokens


class _Scan:
    """Tokens plus bracket structure (matching bracket, depth, parent)."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.match: dict[int, int] = {}
        # depth[i]: number of brackets enclosing token i (a bracket itself is
        # counted at its outer depth). parent[i]: innermost enclosing opener.
        self.depth: list[int] = []
        self.parent: list[int | None] = []
        stack: list[int] = []
        for i, tok in enumerate(self.tokens):
            if tok.kind == _CLOSE:
                if not stack:
                    self.error(f"unmatched '{tok.text}'", tok)
                j = stack.pop()
                opener = self.tokens[j]
                if _PAIRS[opener.text] != tok.text:
                    self.error(
                        f"'{tok.text}' does not match '{opener.text}' at column {opener.pos}", tok
                    )
                self.match[i], self.match[j] = j, i
            self.depth.append(len(stack))
            self.parent.append(stack[-1] if stack else None)
            if tok.kind == _OPEN:
                stack.append(i)
        if stack:
            self.error(f"'{self.tokens[stack[-1]].text}' was never closed", self.tokens[stack[-1]])

    def error(self, message: str, where: _Token | int) -> None:
        pos = where.pos if isinstance(where, _Token) else where
        raise FormulaError(message, self.text, pos)

    def end(self) -> int:
        """Position just after the last non-blank character."""
        return len(self.text.rstrip())

    def is_bare_paren(self, i: int) -> bool:
        """True for a grouping ``(`` (not a call like ``log(`` or ``f(x)(``)."""
        if self.tokens[i].text != "(":
            return False
        if i == 0:
            return True
        prev = self.tokens[i - 1]
        return not (prev.kind == _NAME or prev.kind == _CLOSE)

    def is_formula_bar(self, i: int) -> bool:
        """True for a ``|``/``||`` that belongs to the formula language.

        A bar inside a call, ``[...]`` or ``{...}`` is Python code (bitwise or
        inside ``I(a | b)``) and is left alone; only bars enclosed purely by
        grouping parentheses (or by none) are random-effect bars.
        """
        if self.tokens[i].text not in ("|", "||"):
            return False
        j = self.parent[i]
        while j is not None:
            if not self.is_bare_paren(j):
                return False
            j = self.parent[j]
        return True

    def split_terms(
        self, tokens: list[_Token], base: int
    ) -> list[tuple[str, _Token | None, list[_Token]]]:
        """Split on ``+``/``-`` at bracket depth ``base``.

        Returns ``(sign, sign_token, body)`` triples; the first term's sign is
        ``"+"`` with no token unless written explicitly (``-1 + x``).
        """
        terms: list[tuple[str, _Token | None, list[_Token]]] = []
        sign, sign_tok, cur = "+", None, []
        for tok in tokens:
            is_sum_op = tok.kind == _OP and tok.text in "+-" and self.depth[tok.index] == base
            # A sign right after another operator is unary ("x ** -1").
            if is_sum_op and not (cur and cur[-1].kind == _OP):
                if cur:
                    terms.append((sign, sign_tok, cur))
                elif terms or sign_tok is not None:
                    self.error(f"expected a term before '{tok.text}'", tok)
                sign, sign_tok, cur = tok.text, tok, []
            else:
                cur.append(tok)
        if cur:
            terms.append((sign, sign_tok, cur))
        elif sign_tok is not None:
            nxt = sign_tok.index + 1
            where = self.tokens[nxt] if nxt < len(self.tokens) else self.end()
            self.error(f"expected a term after '{sign_tok.text}'", where)
        return terms


def _render(tokens: list[_Token]) -> str:
    """Re-assemble tokens with canonical spacing (so spacing never matters)."""
    out: list[str] = []
    prev: _Token | None = None
    prev_spaced = False
    for tok in tokens:
        unary = tok.kind == _OP and tok.text in "+-" and (
            prev is None or prev.kind in (_OP, _OPEN) or prev.text == ","
        )
        spaced = tok.kind == _OP and tok.text in _SPACED and not unary
        if prev is None:
            sep = ""
        elif spaced or prev_spaced:
            sep = " "
        elif tok.kind == _CLOSE or tok.text == "," or prev.kind == _OPEN:
            sep = ""
        elif prev.text == ",":
            sep = " "
        elif tok.kind in _WORDS and prev.kind in _WORDS:
            sep = " "  # "x if y else z", "not x"
        else:
            sep = ""
        out.append(sep + tok.text)
        prev, prev_spaced = tok, spaced
    return "".join(out)


def _unquote(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == "`" else name


def _cbind_args(scan: _Scan, tokens: list[_Token]) -> tuple[str, str] | None:
    """Arguments of ``cbind(a, b)`` spanning all of ``tokens``, else ``None``."""
    if not (
        len(tokens) >= 3
        and tokens[0].kind == _NAME
        and tokens[0].text == "cbind"
        and tokens[1].text == "("
        and scan.match.get(tokens[1].index) == tokens[-1].index
    ):
        return None
    inner_depth = scan.depth[tokens[1].index] + 1
    args: list[list[_Token]] = [[]]
    for tok in tokens[2:-1]:
        if tok.text == "," and scan.depth[tok.index] == inner_depth:
            if not args[-1]:
                scan.error("empty argument in cbind()", tok)
            args.append([])
        else:
            args[-1].append(tok)
    if len(args) != 2 or not args[1]:
        scan.error(
            "cbind() response needs exactly two arguments: cbind(successes, failures)",
            tokens[0],
        )
    return _render(args[0]), _render(args[1])


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def parse_formula(formula: str) -> FormulaSpec:
    """Parse an lme4-style formula.

    Args:
        formula: e.g. ``"y ~ x + (1 + x | g) + offset(log(n))"``.

    Returns:
        The :class:`FormulaSpec`; ``spec.fixed`` is ready for formulaic.

    Raises:
        FormulaError: On any syntax problem; ``.position`` locates it.
        keras_glmm.expressions.ExpressionError: An expression outside the
            formula language (a ``ValueError`` naming it; see
            :mod:`keras_glmm.expressions`).
        TypeError: If ``formula`` is not a string.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, got {type(formula).__name__}")
    scan = _Scan(formula)
    toks = scan.tokens
    if not toks:
        scan.error("empty formula", 0)

    tildes = [t for t in toks if t.text == "~" and scan.depth[t.index] == 0]
    if not tildes:
        scan.error("missing '~' (expected 'response ~ terms')", scan.end())
    if len(tildes) > 1:
        scan.error("more than one '~' in formula", tildes[1])
    tilde = tildes[0]
    lhs, rhs = toks[: tilde.index], toks[tilde.index + 1 :]

    for tok in lhs:
        if scan.is_formula_bar(tok.index):
            scan.error("random-effect terms are not allowed on the left-hand side", tok)
    response = _render(lhs) or None
    _cbind_args(scan, lhs)  # validate the cbind() arity now rather than later
    if not rhs:
        scan.error("missing right-hand side after '~'", scan.end())

    fixed_parts: list[str] = []
    random: list[RandomTerm] = []
    offsets: list[str] = []
    for sign, sign_tok, body in scan.split_terms(rhs, 0):
        bars = [t for t in body if scan.is_formula_bar(t.index)]
        if bars:
            random.extend(_random_terms(scan, sign, sign_tok, body, bars))
            continue
        offset = _offset_expr(scan, body)
        if offset is not None:
            if sign == "-":
                scan.error("offset() terms cannot be subtracted", sign_tok)
            offsets.append(offset)
            continue
        text = _render(body)
        if not fixed_parts:
            fixed_parts.append(text if sign == "+" else "-" + text)
        else:
            fixed_parts.append(f"{sign} {text}")

    # formulaic needs a non-empty rhs; "1" is what removing everything means
    # in lme4 too (nobars(y ~ (1|g)) is y ~ 1).
    fixed_rhs = " ".join(fixed_parts) if fixed_parts else "1"
    fixed = f"{response} ~ {fixed_rhs}" if response is not None else f"~ {fixed_rhs}"
    spec = FormulaSpec(
        formula=formula,
        response=response,
        fixed=fixed,
        random=tuple(random),
        offsets=tuple(offsets),
    )
    # Every expression is data of the formula language (keras_glmm.expressions),
    # checked here, before formulaic or the design evaluates any of it.
    check_formula(spec)
    return spec


def _offset_expr(scan: _Scan, body: list[_Token]) -> str | None:
    """The expression of an ``offset(expr)`` term, or ``None`` if ``body`` is not one."""
    if not (
        len(body) >= 3
        and body[0].kind == _NAME
        and body[0].text == "offset"
        and body[1].text == "("
        and scan.match.get(body[1].index) == body[-1].index
    ):
        return None
    inner = body[2:-1]
    if not inner:
        scan.error("offset() needs an expression", body[-1])
    inner_depth = scan.depth[body[1].index] + 1
    for tok in inner:
        if tok.text == "," and scan.depth[tok.index] == inner_depth:
            scan.error("offset() takes a single expression", tok)
    return _render(inner)


def _random_terms(
    scan: _Scan,
    sign: str,
    sign_tok: _Token | None,
    body: list[_Token],
    bars: list[_Token],
) -> list[RandomTerm]:
    """Turn one rhs summand containing a bar into expanded :class:`RandomTerm`s."""
    if scan.depth[bars[0].index] == 0:
        scan.error(
            "'|' outside parentheses: write random effects as '(expr | group)'", bars[0]
        )
    # Strip the enclosing grouping parentheses; redundant extra ones such as
    # "((1 | g))" are tolerated, as lme4's findbars does.
    base = 0
    while (
        body
        and scan.is_bare_paren(body[0].index)
        and scan.match[body[0].index] == body[-1].index
    ):
        body, base = body[1:-1], base + 1
        if any(scan.depth[b.index] == base for b in bars):
            break
    top = [b for b in bars if scan.depth[b.index] == base]
    if base == 0 or not top:
        where = next((b for b in bars if scan.depth[b.index] > base), bars[0])
        scan.error(
            "a random-effect term must be a separate '+' term in parentheses, like '(1 | g)'",
            where,
        )
    if sign == "-":
        scan.error("random-effect terms cannot be subtracted", sign_tok)
    if len(top) > 1:
        scan.error("more than one '|' in a random-effect term", top[1])
    for b in bars:
        if scan.depth[b.index] > base:
            scan.error("random-effect terms cannot be nested", b)
    bar = top[0]
    correlated = bar.text == "|"
    cut = next(i for i, t in enumerate(body) if t is bar)
    left, right = body[:cut], body[cut + 1 :]
    if not left:
        scan.error(f"missing expression before '{bar.text}' (use 1 for an intercept)", bar)
    if not right:
        scan.error(f"missing grouping factor after '{bar.text}'", scan.tokens[bar.index + 1])
    groups = _parse_group(scan, right, after=bar)

    # Intercept bookkeeping mirrors R's terms(): "1" adds it, "0"/"-1" removes
    # it, and it is present by default.
    intercept = True
    effects: list[list[_Token]] = []
    for term_sign, term_tok, term in scan.split_terms(left, base):
        text = _render(term)
        if text in ("0", "1"):
            intercept = (term_sign, text) not in (("+", "0"), ("-", "1"))
        elif term_sign == "-" and not correlated:
            scan.error("only '-1' / '0' may be subtracted inside '||'", term_tok)
        else:
            effects.append(term)
    if not intercept and not effects:
        scan.error("random-effect term has no effects: nothing is left of the bar", bar)

    if correlated:
        exprs = [_render(left)]
    else:
        # lme4's expandDoubleVerts: one independent term per term label of the
        # left-hand side (R's terms(): "x * f" is x, f and x:f).
        labels = [label for t in effects for label in _term_labels(scan, t, base)]
        exprs = (["1"] if intercept else []) + ["0 + " + label for label in dict.fromkeys(labels)]
    # lme4 expands "||" first, then "/" (findbars on the expanded formula).
    return [RandomTerm(e, g, correlated) for e in exprs for g in groups]


def _term_labels(scan: _Scan, term: list[_Token], base: int) -> list[str]:
    """R's term labels of one summand: itself, unless it uses the term algebra
    (``*``, ``/``, ``^``/``**`` or a parenthesised sum) at the top level, which is
    expanded (``x * f -> x, f, x:f``; ``a/b -> a, a:b``) by formulaic's parser."""
    algebra = any(
        (t.kind == _OP and t.text in ("*", "/", "^", "**") and scan.depth[t.index] == base)
        or (t.kind == _OPEN and scan.depth[t.index] == base and scan.is_bare_paren(t.index))
        for t in term
    )
    text = _render(term)
    if not algebra:
        return [text]
    import ast

    from formulaic import Formula

    def quoted(expr: str) -> str:
        try:
            ast.parse(expr, mode="eval")
        except SyntaxError:
            return f"`{expr}`"
        return expr

    try:
        terms = list(Formula(text))
    except Exception as e:  # noqa: BLE001 - formulaic's parser errors vary
        scan.error(f"could not expand '{text}' into terms: {e}", term[0])
    labels = [":".join(quoted(f.expr) for f in t.factors) for t in terms]
    return [label for label in labels if label not in ("1", "0")]


def _parse_group(scan: _Scan, tokens: list[_Token], after: _Token) -> list[str]:
    """Parse ``a``, ``a:b`` or ``a/b/c`` into the expanded list of groups.

    ``:`` binds tighter than ``/`` as in R, so ``a:b/c`` is ``a:b`` and
    ``a:b:c``.
    """
    components: list[list[str]] = [[]]
    expect_name = True
    for i, tok in enumerate(tokens):
        if expect_name:
            if tok.kind == _NAME:
                components[-1].append(tok.text)
                expect_name = False
                continue
            scan.error("expected a grouping variable name", tok)
        elif tok.text == ":":
            expect_name = True
        elif tok.text == "/":
            components.append([])
            expect_name = True
        elif tok.text == "+":
            scan.error(
                "'+' is not allowed in a grouping factor; "
                "write separate terms such as '(1 | a) + (1 | b)'",
                tok,
            )
        elif tok.text == "(":
            scan.error(
                "grouping factor must be a variable name, an interaction 'a:b' or a "
                "nesting 'a/b' (compute transformed factors as columns first)",
                tokens[i - 1],
            )
        else:
            scan.error(
                "grouping factor must be a variable name, an interaction 'a:b' or a nesting 'a/b'",
                tok,
            )
    if expect_name:
        scan.error("expected a grouping variable name", scan.tokens[tokens[-1].index + 1])
    # lme4's expandSlash: a/b/c is a, b:a and c:b:a, the inner factor first
    # (its VarCorr and ranef name the nested term so).
    groups: list[str] = []
    names: list[str] = []
    for comp in components:
        names = comp + names
        groups.append(":".join(names))
    return groups
