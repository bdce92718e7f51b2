"""Tests for keras_glmm.formula (pure text; no data, no TensorFlow)."""

from __future__ import annotations

import keyword

import formulaic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_glmm.formula import FormulaError, FormulaSpec, RandomTerm, parse_formula


def R(expr: str, group: str, correlated: bool = True) -> RandomTerm:
    return RandomTerm(expr, group, correlated)


def check_roundtrip(spec: FormulaSpec) -> None:
    """fixed must be valid formulaic; str(spec) must re-parse to the same spec."""
    formulaic.Formula(spec.fixed)
    again = parse_formula(str(spec))
    assert (again.response, again.fixed, again.random, again.offsets) == (
        spec.response,
        spec.fixed,
        spec.random,
        spec.offsets,
    )


# --------------------------------------------------------------------------
# Valid formulas: (formula, response, fixed, random, offsets)
# --------------------------------------------------------------------------

CASES = [
    # plain intercept / slopes
    ("y ~ x + (1|g)", "y", "y ~ x", (R("1", "g"),), ()),
    ("log_radon ~ floor + (1 + floor | county)", "log_radon", "log_radon ~ floor",
     (R("1 + floor", "county"),), ()),
    ("y ~ (x|g)", "y", "y ~ 1", (R("x", "g"),), ()),
    ("y ~ (0+x|g)", "y", "y ~ 1", (R("0 + x", "g"),), ()),
    ("y ~ (-1+x|g)", "y", "y ~ 1", (R("-1 + x", "g"),), ()),
    ("y ~ (1 + x + z | g)", "y", "y ~ 1", (R("1 + x + z", "g"),), ()),
    # removal leaves a valid fixed part
    ("y ~ (1|g)", "y", "y ~ 1", (R("1", "g"),), ()),
    ("y ~ 0 + (1|g)", "y", "y ~ 0", (R("1", "g"),), ()),
    ("y ~ -1 + (1|g)", "y", "y ~ -1", (R("1", "g"),), ()),
    ("y ~ (1|g) - 1", "y", "y ~ -1", (R("1", "g"),), ()),
    ("y ~ 0 + x + (1|g)", "y", "y ~ 0 + x", (R("1", "g"),), ()),
    ("y ~ x + (1|g) + z", "y", "y ~ x + z", (R("1", "g"),), ()),
    ("y ~ (1|g) + x", "y", "y ~ x", (R("1", "g"),), ()),
    ("y ~ x - 1 + (1|g)", "y", "y ~ x - 1", (R("1", "g"),), ()),
    ("y ~ x*z + (1|g)", "y", "y ~ x * z", (R("1", "g"),), ()),
    ("y ~ a:b + (1|g)", "y", "y ~ a:b", (R("1", "g"),), ()),
    # uncorrelated ||
    ("y ~ (x||g)", "y", "y ~ 1", (R("1", "g", False), R("0 + x", "g", False)), ()),
    ("y ~ (1+x||g)", "y", "y ~ 1", (R("1", "g", False), R("0 + x", "g", False)), ()),
    ("y ~ (0+x+z||g)", "y", "y ~ 1", (R("0 + x", "g", False), R("0 + z", "g", False)), ()),
    ("y ~ (-1+x||g)", "y", "y ~ 1", (R("0 + x", "g", False),), ()),
    ("y ~ (1||g)", "y", "y ~ 1", (R("1", "g", False),), ()),
    ("y ~ (x + log(z)||g)", "y", "y ~ 1",
     (R("1", "g", False), R("0 + x", "g", False), R("0 + log(z)", "g", False)), ()),
    # || splits the term labels, as lme4's expandDoubleVerts (R's terms()): a*b is a, b, a:b;
    # a factor's own columns stay one block (a factor is one term label)
    ("y ~ (a*b||g)", "y", "y ~ 1",
     (R("1", "g", False), R("0 + a", "g", False), R("0 + b", "g", False), R("0 + a:b", "g", False)), ()),
    ("y ~ (0 + x + x*f + (a+b)^2||g)", "y", "y ~ 1",
     (R("0 + x", "g", False), R("0 + f", "g", False), R("0 + x:f", "g", False), R("0 + a", "g", False),
      R("0 + b", "g", False), R("0 + a:b", "g", False)), ()),
    ("y ~ (a/b + I(x*2)||g)", "y", "y ~ 1",
     (R("1", "g", False), R("0 + a", "g", False), R("0 + a:b", "g", False), R("0 + I(x * 2)", "g", False)),
     ()),
    ("y ~ (`my x`*f||g)", "y", "y ~ 1",
     (R("1", "g", False), R("0 + `my x`", "g", False), R("0 + f", "g", False), R("0 + `my x`:f", "g", False)),
     ()),
    # nesting and interactions
    # (lme4's expandSlash names the nested term inner factor first: b:a)
    ("y ~ (1|a/b)", "y", "y ~ 1", (R("1", "a"), R("1", "b:a")), ()),
    ("y ~ (1|a/b/c)", "y", "y ~ 1", (R("1", "a"), R("1", "b:a"), R("1", "c:b:a")), ()),
    ("y ~ (1|a:b)", "y", "y ~ 1", (R("1", "a:b"),), ()),
    ("y ~ (1|a:b/c)", "y", "y ~ 1", (R("1", "a:b"), R("1", "c:a:b")), ()),
    ("y ~ (x||a/b)", "y", "y ~ 1",
     (R("1", "a", False), R("1", "b:a", False), R("0 + x", "a", False), R("0 + x", "b:a", False)),
     ()),
    # several terms on one factor, several factors
    ("y ~ (1|g) + (0+x|g)", "y", "y ~ 1", (R("1", "g"), R("0 + x", "g")), ()),
    ("y ~ x + (1|g) + (1|h)", "y", "y ~ x", (R("1", "g"), R("1", "h")), ()),
    # nested parentheses and calls
    # (I(x^2) is refused: inside an expression '^' is Python's exclusive or; test_formula_security.py)
    ("y ~ (I(x**2) | g)", "y", "y ~ 1", (R("I(x**2)", "g"),), ()),
    ("y ~ (log(x) | g)", "y", "y ~ 1", (R("log(x)", "g"),), ()),
    ("y ~ C(period) + (1|herd)", "y", "y ~ C(period)", (R("1", "herd"),), ()),
    ("y ~ C(period, Treatment(2)) + (1|herd)", "y", "y ~ C(period, Treatment(2))",
     (R("1", "herd"),), ()),
    ("y ~ ((1|g))", "y", "y ~ 1", (R("1", "g"),), ()),
    ("y ~ (x + z) + (1|g)", "y", "y ~ (x + z)", (R("1", "g"),), ()),
    # "|" inside a call is Python code, not a random effect
    ("y ~ I(a | b) + (1|g)", "y", "y ~ I(a | b)", (R("1", "g"),), ()),
    ("y ~ C(k, levels=['a|b', 'c']) + (1|g)", "y", "y ~ C(k, levels=['a|b', 'c'])",
     (R("1", "g"),), ()),
    # offsets
    ("y ~ x + offset(log(n)) + (1|g)", "y", "y ~ x", (R("1", "g"),), ("log(n)",)),
    ("y ~ offset(t) + (1|g)", "y", "y ~ 1", (R("1", "g"),), ("t",)),
    ("y ~ offset(log(a)) + offset(b) + x", "y", "y ~ x", (), ("log(a)", "b")),
    # responses
    ("cbind(incidence, size - incidence) ~ period + (1 | herd)",
     "cbind(incidence, size - incidence)", "cbind(incidence, size - incidence) ~ period",
     (R("1", "herd"),), ()),
    ("log(y) ~ x + (1|g)", "log(y)", "log(y) ~ x", (R("1", "g"),), ()),
    ("~ x + (1|g)", None, "~ x", (R("1", "g"),), ()),
    # no random terms at all
    ("y ~ x", "y", "y ~ x", (), ()),
    # backtick names
    ("y ~ (1|`my group`)", "y", "y ~ 1", (R("1", "`my group`"),), ()),
]


@pytest.mark.parametrize("formula,response,fixed,random,offsets", CASES)
def test_parse(formula, response, fixed, random, offsets):
    spec = parse_formula(formula)
    assert spec.formula == formula
    assert spec.response == response
    assert spec.fixed == fixed
    assert spec.random == random
    assert spec.offsets == offsets
    check_roundtrip(spec)


def test_whitespace_is_normalised():
    a = parse_formula("y~x+(1+x|g)+offset(log(n))")
    b = parse_formula("  y  ~\tx +\n( 1 + x | g ) + offset( log( n ) )  ")
    assert (a.response, a.fixed, a.random, a.offsets) == (b.response, b.fixed, b.random, b.offsets)


def test_str_normalised_lme4():
    spec = parse_formula("y~x+(x||a/b)+offset(log(n))")
    assert str(spec) == (
        "y ~ x + offset(log(n)) + (1 || a) + (1 || b:a) + (0 + x || a) + (0 + x || b:a)"
    )
    assert str(parse_formula("y ~ (1|g)")) == "y ~ 1 + (1 | g)"
    assert str(parse_formula("~ 0 + (x|g)")) == "~ 0 + (x | g)"


def test_random_term_str_and_columns():
    assert str(R("1 + x", "g")) == "(1 + x | g)"
    assert str(R("x", "g", False)) == "(x || g)"
    assert R("1", "g").group_columns() == ("g",)
    assert R("1", "a:b").group_columns() == ("a", "b")
    assert R("1", "`my g`:h").group_columns() == ("my g", "h")


def test_cbind():
    spec = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)")
    assert spec.cbind() == ("incidence", "size - incidence")
    assert parse_formula("cbind( a ,b ) ~ 1").cbind() == ("a", "b")
    assert parse_formula("y ~ x").cbind() is None
    assert parse_formula("~ x").cbind() is None


def test_formula_error_is_value_error():
    with pytest.raises(ValueError):
        parse_formula("y x")
    with pytest.raises(TypeError):
        parse_formula(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Errors: (formula, position, message fragment)
# --------------------------------------------------------------------------

ERRORS = [
    ("", 0, "empty formula"),
    ("   ", 0, "empty formula"),
    ("y x", 3, "missing '~'"),
    ("y ~ x ~ z", 6, "more than one '~'"),
    ("y ~", 3, "missing right-hand side"),
    ("y ~ (1|g", 4, "never closed"),
    ("y ~ log((x) + (1|g)", 7, "never closed"),
    ("y ~ x)", 5, "unmatched ')'"),
    ("y ~ f(x]", 7, "does not match"),
    ("y ~ ( | g)", 6, "missing expression before '|'"),
    ("y ~ (1 | )", 9, "missing grouping factor"),
    ("y ~ (1 || )", 10, "missing grouping factor"),
    ("y ~ x | g", 6, "outside parentheses"),
    ("y ~ x || g", 6, "outside parentheses"),
    ("y ~ (1 | log(g))", 9, "grouping factor must be"),
    ("y ~ (1 | 2)", 9, "expected a grouping variable name"),
    ("y ~ (x | a + b)", 11, "'+' is not allowed in a grouping factor"),
    ("y ~ (1 | a/)", 11, "expected a grouping variable name"),
    ("y ~ (1 | a b)", 11, "grouping factor must be"),
    ("y ~ x:(1|g)", 8, "separate '+' term"),
    ("y ~ - (1|g)", 4, "cannot be subtracted"),
    ("y ~ (0|g)", 6, "no effects"),
    ("y ~ (-1||g)", 7, "no effects"),
    ("y ~ (1|g|h)", 8, "more than one '|'"),
    ("y ~ (1 + (x|h) | g)", 11, "cannot be nested"),
    ("y ~ (x - z || g)", 7, "subtracted inside '||'"),
    ("y ~ x +", 7, "expected a term after '+'"),
    ("y ~ x + + z", 8, "expected a term before '+'"),
    ("y ~ offset()", 11, "offset() needs an expression"),
    ("y ~ offset(a, b)", 12, "single expression"),
    ("y ~ x - offset(n)", 6, "offset() terms cannot be subtracted"),
    ("y | z ~ x", 2, "left-hand side"),
    ("cbind(a) ~ x", 0, "exactly two arguments"),
    ("y ~ 'abc", 4, "unterminated string"),
]


@pytest.mark.parametrize("formula,position,fragment", ERRORS)
def test_errors(formula, position, fragment):
    with pytest.raises(FormulaError) as info:
        parse_formula(formula)
    err = info.value
    assert err.position == position
    assert fragment in err.message
    assert err.formula == formula
    # The displayed message has the formula line followed by a caret line
    # whose caret sits under the offending column.
    lines = str(err).split("\n")
    assert fragment in lines[0]
    assert lines[1] == "    " + "".join(" " if c.isspace() else c for c in formula)
    assert lines[2] == "    " + " " * position + "^"


def test_caret_display_example():
    with pytest.raises(FormulaError) as info:
        parse_formula("y ~ x | g")
    assert str(info.value).endswith("    y ~ x | g\n          ^")


# --------------------------------------------------------------------------
# Property-based: names and spacing don't matter
# --------------------------------------------------------------------------

_RESERVED = {"offset", "cbind", "I", "C"} | set(keyword.kwlist)
names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(lambda s: s not in _RESERVED)
spaces = st.sampled_from(["", " ", "  ", "\t", " \n "])


@st.composite
def formulas(draw):
    """Draw a random formula as a token list together with its expected spec."""
    response = draw(names)
    fixed = draw(st.lists(names, max_size=3, unique=True))
    no_intercept = draw(st.booleans())
    randoms = []  # (tokens, expected terms)
    for _ in range(draw(st.integers(1, 3))):
        slopes = draw(st.lists(names, max_size=2, unique=True))
        drop = draw(st.booleans()) and bool(slopes)
        double = draw(st.booleans())
        nest = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        lhs_tokens = ["0", "+"] if drop else ["1", "+"] * (not slopes or draw(st.booleans()))
        for i, s in enumerate(slopes):
            lhs_tokens += ([] if i == 0 else ["+"]) + [s]
        if lhs_tokens and lhs_tokens[-1] == "+":
            lhs_tokens.pop()
        group_tokens = []
        for i, g in enumerate(nest):
            group_tokens += ([] if i == 0 else ["/"]) + [g]
        tokens = ["(", *lhs_tokens, "||" if double else "|", *group_tokens, ")"]
        groups = [":".join(reversed(nest[: k + 1])) for k in range(len(nest))]
        if double:
            exprs = ([] if drop else ["1"]) + [f"0 + {s}" for s in slopes]
        else:
            exprs = [" ".join(lhs_tokens)]
        randoms.append((tokens, [RandomTerm(e, g, not double) for e in exprs for g in groups]))
    offsets = draw(st.lists(names, max_size=2))

    # Interleave fixed, random and offset terms in a random order; the
    # relative order within each kind is what the spec records.
    items = [("f", f) for f in fixed] + [("r", r) for r in randoms] + [("o", o) for o in offsets]
    order = draw(st.permutations(range(len(items))))
    kinds = {}
    seq = [items[i] for i in order]
    for kind in "fro":
        kinds[kind] = [v for k, v in seq if k == kind]

    rhs: list[list[str]] = [["0"]] if no_intercept else []
    for kind, value in seq:
        if kind == "f":
            rhs.append([value])
        elif kind == "r":
            rhs.append(value[0])
        else:
            rhs.append(["offset", "(", "log", "(", value, ")", ")"])
    if not rhs:
        rhs.append(["1"])
    tokens = [response, "~"]
    for i, term in enumerate(rhs):
        tokens += ([] if i == 0 else ["+"]) + term

    fixed_rhs = " + ".join((["0"] if no_intercept else []) + kinds["f"]) or "1"
    expected = (
        response,
        f"{response} ~ {fixed_rhs}",
        tuple(t for _, terms in kinds["r"] for t in terms),
        tuple(f"log({o})" for o in kinds["o"]),
    )
    return tokens, expected


def _join(draw, tokens):
    out = ""
    for tok in tokens:
        # The grammar above never puts two words side by side, so an empty
        # separator is always legal.
        out += draw(spaces) + tok
    return out + draw(spaces)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), case=formulas())
def test_property_spacing_and_names(data, case):
    tokens, expected = case
    canonical = parse_formula(" ".join(tokens))
    spaced = parse_formula(_join(data.draw, tokens))
    got = (spaced.response, spaced.fixed, spaced.random, spaced.offsets)
    assert got == (canonical.response, canonical.fixed, canonical.random, canonical.offsets)
    assert got == expected
    check_roundtrip(spaced)
