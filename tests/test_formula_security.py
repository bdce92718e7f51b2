"""The formula language is data, not code (`keras_glmm.expressions`).

Every expression of a formula, and of a saved model's design, is checked by an
allow-list before anything evaluates it. Payloads here would create a sentinel
file; the tests check that it does not appear (and, under `safe_mode=False`, that
the payload is live: the refusal is what stops it). Numbers: lme4 1.1-31's oxboys
fit and the exact maximum-likelihood cbpp fit (`tests/reference/`).
"""

import glob
import json
import pathlib
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
import reference_data as refs
from keras_glmm import expressions
from keras_glmm.design import _EVAL_NAMESPACE, Design
from keras_glmm.design_spec import DesignSpecError
from keras_glmm.expressions import ExpressionError, check_expression, check_formula
from keras_glmm.formula import parse_formula


def payload(sentinel):
    return f"__import__('pathlib').Path('{sentinel}').touch()"


def frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "y": rng.poisson(2.0, n).astype(float),
        "x": rng.uniform(0.5, 2.0, n),
        "n": rng.integers(1, 6, n),
        "a": rng.choice(["p", "q"], n),
        "b": rng.choice(["r", "s", "t"], n),
        "f": np.tile(["u", "v", "w"], n // 3),
        "g": np.repeat([f"g{i}" for i in range(6)], n // 6),
        "log.x": rng.uniform(1.0, 2.0, n),
    })


# ------------------------------------------------------------ formulas that run code


@pytest.mark.parametrize("route, make", [
    ("the fixed effects", lambda p: dict(formula=f"y ~ I({p} or x) + (1 | g)")),
    ("random-effect term", lambda p: dict(formula=f"y ~ x + (I({p} or x) | g)")),
    ("offset", lambda p: dict(formula=f"y ~ x + offset({p} or x) + (1 | g)")),
    ("the response", lambda p: dict(formula=f"{p} or y ~ x + (1 | g)")),
    ("the zero-inflation formula", lambda p: dict(formula="y ~ x + (1 | g)", family="zip",
                                                  ziformula=f"~ I({p} or x)")),
])
def test_formulas_that_run_code_are_refused_before_evaluation(tmp_path, route, make):
    sentinel = tmp_path / "pwned"
    kwargs = make(payload(sentinel))
    formula = kwargs.pop("formula")
    with pytest.raises(ExpressionError) as info:
        kg.glmm(formula, frame(), **kwargs)
    message = str(info.value)
    assert route in message
    assert "__import__('pathlib').Path" in message and "is not allowed: a call of" in message
    assert "A formula expression may contain column names" in message  # says what is allowed
    assert not sentinel.exists()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("expr, what", [
    ("I(x^2)", "exclusive or"),  # R's power, Python's xor: I(x^2) would be x XOR 2
    ("I(__builtins__)", "names beginning with '__'"),
    ("log(x.real)", "attribute access"),
    ("I(x[0])", "a subscript"),
    ("I((lambda: x)())", "a call of 'lambda: x'"),
    ("I([v for v in x])", "a comprehension"),
    ("I(x if x else 1)", "a conditional expression"),
    ("I((v := x))", "an assignment expression"),
    ("I('x')", "a string"),
    ("np.random.seed(1)", "a call of 'np.random.seed'"),
    ("np.log(x, out=x)", "the keyword out="),
    ("C(f, eval)", "a contrast must be"),
    ("C(f, Treatment)", "Treatment is called"),
    ("C(f, Sum, hash_func=print)", "the keyword hash_func= of C()"),
    ("hashed(x, 10)", "a call of 'hashed'"),
    ("poly(x, degree=n)", "expected a literal"),
    ("log(*x)", "*-unpacking"),
    ("open('f')", "a call of 'open'"),
    ("`__class__`", "names beginning with '__'"),
])
def test_expressions_outside_the_language_are_refused(expr, what):
    with pytest.raises(ExpressionError, match="is not allowed") as info:
        check_expression(expr, "the fixed effects")
    assert what in str(info.value)
    with pytest.raises(ExpressionError):
        parse_formula(f"y ~ {expr} + (1 | g)")


def test_unknown_names_are_refused_against_the_data_columns():
    df = frame()
    with pytest.raises(ExpressionError, match=r"unknown column 'pi' in the fixed effects \(in 'I\(x \* pi\)'\)"):
        Design.from_data("y ~ I(x * pi) + (1 | g)", df)
    with pytest.raises(ExpressionError, match=r"unknown column 'nope' in offset"):
        Design.from_data("y ~ x + offset(log(nope)) + (1 | g)", df)
    with pytest.raises(ExpressionError, match=r"unknown column 'zz' in the fixed effects"):
        Design.from_data("y ~ Q('zz') + (1 | g)", df)
    # a module, a builtin: names, not columns
    for name in ("np", "eval"):
        with pytest.raises(ExpressionError, match=f"unknown column '{name}'"):
            Design.from_data(f"y ~ I({name}) + (1 | g)", df)


# ------------------------------------------------------------ tampered .keras files


def tamper(path, out, old, new):
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(out, "w") as o:
        for item in z.infolist():
            data = z.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert old in text
                data = text.replace(old, new).encode()
            o.writestr(item, data)


def test_a_tampered_keras_file_is_refused_under_safe_mode(tmp_path):
    sleep = kg.datasets.load_sleepstudy()
    fit = kg.glmm("Reaction ~ I(Days * 1) + (1 | Subject)", sleep)
    path, bad = tmp_path / "m.keras", tmp_path / "bad.keras"
    fit.save(path)
    # The untouched file loads under safe_mode and predicts as the fit does.
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict_response(sleep), fit.predict_response(sleep), rtol=1e-6)

    sentinel = tmp_path / "pwned"
    tamper(path, bad, "Days * 1", f"{payload(sentinel)} or Days")
    for load in (lambda: keras.models.load_model(bad, safe_mode=True), lambda: keras.models.load_model(bad),
                 lambda: kg.load_model(bad)):
        with pytest.raises(ValueError, match="refused under Keras's safe_mode") as info:
            load()
        assert "__import__('pathlib').Path" in str(info.value)
        assert "safe_mode=False only if you trust its source" in str(info.value)
        assert not sentinel.exists()

    # safe_mode=False is the user's explicit choice: the file loads, and its payload
    # is live (what the refusal above stops).
    unsafe = kg.load_model(bad, safe_mode=False)
    assert not sentinel.exists()
    unsafe.predict_response(sleep.head())
    assert sentinel.exists()


def design_config(formula, df, **kwargs):
    return json.dumps(Design.from_data(formula, df, **kwargs).get_config())


@pytest.mark.parametrize("formula, kwargs, old", [
    ("y ~ I(x * 1) + (1 | g)", {}, "x * 1"),
    ("y ~ x + (I(x * 1) | g)", {}, "x * 1"),
    ("y ~ x + offset(x * 1) + (1 | g)", {}, "x * 1"),
    ("y ~ x + (1 | g)", dict(family_name="zero_inflated_poisson", ziformula="~ I(x * 1)"), "x * 1"),
    ("y ~ C(f, Sum) + (1 | g)", {}, "C(f, Sum)"),
])
def test_a_tampered_saved_design_is_refused(tmp_path, formula, kwargs, old):
    df = frame()
    sentinel = tmp_path / "pwned"
    text = design_config(formula, df, **kwargs)
    new = f"C(f, Sum({payload(sentinel)}))" if old == "C(f, Sum)" else f"{payload(sentinel)} or x"
    with pytest.raises(ExpressionError, match="refused under Keras's safe_mode"):
        Design.from_config(json.loads(text.replace(old, new)))
    assert not sentinel.exists()
    # A name the saved design does not record is refused too.
    if old == "x * 1":
        with pytest.raises(ExpressionError, match="unknown column 'open'.*the saved design records"):
            Design.from_config(json.loads(text.replace(old, "x * open")))
    # With safe mode off (keras's SafeModeScope, as load_model(safe_mode=False) opens it)
    # the user's choice stands: nothing is checked, and loading evaluates nothing.
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        unsafe = Design.from_config(json.loads(text.replace(old, new)))
    assert not sentinel.exists()
    if old == "x * 1" and "offset" not in formula:  # formulaic's eval: the payload is live
        unsafe.arrays(df)
        assert sentinel.exists()


def test_a_malformed_saved_design_is_refused_with_a_message():
    config = json.loads(design_config("y ~ x + (1 | g)", frame()))
    del config["formula"]["text"]
    with pytest.raises(DesignSpecError, match=r"missing field 'formula.text'"):
        Design.from_config(config)
    config = json.loads(design_config("y ~ x + (1 | g)", frame()))
    config["random"][0]["term"]["group"] = "g[0]"
    with pytest.raises(ExpressionError, match=r"grouping factor 'g\[0\]': 'g\[0\]' is not a column name"):
        Design.from_config(config)


def test_a_saved_design_whose_parts_disagree_is_refused():
    """Lists that describe the same thing twice must agree (a hand-edited file would code
    new data against the wrong columns or levels); so must the model's layers and its design."""
    text = design_config("y ~ x + (x | g)", frame())
    edits = [
        (lambda c: c["fixed"]["columns"].append("z"), r"field 'fixed' names 3 columns but 2 formulaic"),
        (lambda c: c["random"][0]["term"].update(correlated=False), r"field 'random\[0\]' is the term"),
        (lambda c: c["random"][0]["keys"].__setitem__(1, c["random"][0]["keys"][0]), "lists a level key twice"),
        (lambda c: c["random"][0].update(columns=["x", "(Intercept)"]), r"has effects \['x', '\(Intercept\)'\]"),
        (lambda c: c["formula"]["random"].append(dict(c["formula"]["random"][0])), "the formula has 2 random terms"),
    ]
    for edit, message in edits:
        config = json.loads(text)
        edit(config)
        with pytest.raises(DesignSpecError, match=message):
            Design.from_config(config)
    model = kg.GLMM.from_formula("y ~ x + (x | g)", frame())
    config = model.get_config()
    for key in ("levels", "keys"):
        config["design"]["random"][0][key] = config["design"]["random"][0][key][:-1]
    with pytest.raises(DesignSpecError, match=r"the design's term 'g' has \d+ levels x 2 effects, the model a layer"):
        kg.GLMM.from_config(config)


def _hostile_fields(config):
    """Edits of a saved design that name code or smuggle fields in (each must be refused)."""
    coding = config["fixed"]["coding"]
    yield ("an unknown field", r"unknown field 'fixed.coding.factors.C\(f, Sum\).__reduce__'",
           lambda c: c["fixed"]["coding"]["factors"]["C(f, Sum)"].update(__reduce__="os.system"))
    yield ("a contrast named by its class", r"field 'fixed.coding.factors.C\(f, Sum\).contrasts.name' must be one of",
           lambda c: c["fixed"]["coding"]["factors"]["C(f, Sum)"]["contrasts"].update(
               name="formulaic.transforms.contrasts.CustomContrasts"))
    yield ("a transform of another function", r"field 'fixed.coding.transforms.scale\(x\).function' must be one of",
           lambda c: c["fixed"]["coding"]["transforms"]["scale(x)"].update(function="eval"))
    yield ("a state that is not a number", r"field 'fixed.coding.transforms.scale\(x\).state.center' must be a "
           "finite number", lambda c: c["fixed"]["coding"]["transforms"]["scale(x)"]["state"].update(
               center={"__np__": "object"}))
    yield ("a top-level field", r"unknown field 'pickle'", lambda c: c.update(pickle="gASV"))
    assert "C(f, Sum)" in coding["factors"] and "scale(x)" in coding["transforms"]


def test_a_hostile_field_of_a_saved_design_is_refused_even_with_safe_mode_off(tmp_path):
    from keras.src.saving.serialization_lib import SafeModeScope

    text = design_config("y ~ C(f, Sum) + scale(x) + (1 | g)", frame())
    for what, message, edit in _hostile_fields(json.loads(text)):
        for safe in (True, False):
            config = json.loads(text)
            edit(config)
            with SafeModeScope(safe), pytest.raises(DesignSpecError, match=message):
                Design.from_config(config)
    # A stateful-transform call that is not in the language is refused under safe mode.
    sentinel = tmp_path / "pwned"
    config = json.loads(text)
    transforms = config["fixed"]["coding"]["transforms"]
    transforms[f"scale({payload(sentinel)})"] = transforms.pop("scale(x)")
    with pytest.raises(ExpressionError, match="refused under Keras's safe_mode"):
        Design.from_config(config)
    assert not sentinel.exists()


# ------------------------------------------------------------ the language users rely on


def _formulas(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("formula", "ziformula") and isinstance(value, str):
                yield key, value
            else:
                yield from _formulas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _formulas(value)


def reference_formulas():
    """Every formula of the reference files: the bundled copies, and the shared folder where present."""
    files = sorted(glob.glob(str(refs.FOLDER / "*.json")))
    # The project's shared reference folder beside the clone, where present (CI has one).
    files += sorted(glob.glob(str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "*.json")))
    found = {}
    for name in files:
        with open(name) as f:
            for key, text in _formulas(json.load(f)):
                found[(key, text)] = pathlib.Path(name).name
    return sorted(found)


def test_every_reference_formula_is_in_the_language():
    formulas = reference_formulas()
    assert len(formulas) >= 25  # the bundled files alone hold 26
    for key, text in formulas:
        if key == "ziformula":
            spec = parse_formula(text if "~" in text else "~ " + text)
            assert spec.response is None and not spec.random
        else:
            spec = parse_formula(text)
            assert spec.fixed.startswith(f"{spec.response} ~ ")
    # With the data's columns, every name of every lme4 case is a column.
    for name, case in refs.LME4.items():
        check_formula(parse_formula(case["formula"]), refs.data(name).columns)


def test_reference_fits_with_I_cbind_and_C():
    # oxboys: I(age**2) (lme4's I(age^2)), lme4's estimates to 1e-4 of the estimate or its SE.
    fit = kg.glmm(refs.LME4["oxboys"]["formula"], refs.data("oxboys"))
    want, se = refs.fixef("oxboys"), refs.se("oxboys")
    got = fit.fixef().values
    assert list(fit.fixef().index) == ["(Intercept)", "age", "I(age ** 2)"]
    assert np.all(np.abs(got - want) <= 1e-4 * np.maximum(np.abs(want), se))
    # cbpp: cbind(incidence, size - incidence) ~ C(period): the exact ML estimates.
    case = refs.LME4["cbpp"]
    fit = kg.glmm(case["formula"], refs.data("cbpp"), family="binomial")
    exact = refs.EXACT_ML["cbpp"]
    np.testing.assert_allclose(fit.fixef().values, refs.fixef("cbpp", exact),
                               atol=0.01 * refs.se("cbpp", exact).min())


def test_transforms_interactions_and_offsets_keep_working():
    df = frame()
    formula = ("y ~ C(f) + log(x) + sqrt(x) + poly(x, 2) + a*b + a:f "
               "+ offset(log(n)) + (1 + x | g)")
    design = Design.from_data(formula, df)
    inputs, _ = design.arrays(df)
    x = dict(zip(design.fixed_columns, inputs["x"].T))
    np.testing.assert_allclose(x["log(x)"], np.log(df["x"]))
    # np.log(x) beside log(x) would be the same column, and I(x**2) beside poly(x, 2) a
    # combination of columns: dropped as aliased (lme4's rank check), so apart.
    other = Design.from_data("y ~ np.log(x) + I(x**2) + (1 | g)", df)
    other_x = dict(zip(other.fixed_columns, other.arrays(df)[0]["x"].T))
    np.testing.assert_allclose(other_x["np.log(x)"], np.log(df["x"]))
    np.testing.assert_allclose(other_x["I(x ** 2)"], df["x"] ** 2)
    np.testing.assert_allclose(x["sqrt(x)"], np.sqrt(df["x"]))
    np.testing.assert_allclose(x["fv"], (df["f"] == "v").astype(float))  # C(f): lme4's name
    # poly(x, 2): orthonormal columns, orthogonal to the intercept
    p = np.column_stack([x["poly(x, 2)1"], x["poly(x, 2)2"]])
    np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-10)
    np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-10)
    # a*b: a, b and their interaction; a:f the interaction only (lme4's names)
    assert {"aq", "bs", "bt", "aq:bs", "aq:bt"} <= set(x)
    np.testing.assert_allclose(x["aq:bs"], ((df["a"] == "q") & (df["b"] == "s")).astype(float))
    np.testing.assert_allclose(x["ap:fw"], ((df["a"] == "p") & (df["f"] == "w")).astype(float))
    np.testing.assert_allclose(inputs["offset"], np.log(df["n"]))
    np.testing.assert_allclose(inputs["g_z"][:, 0], df["x"])
    # Saved and restored under the check: the same arrays.
    restored = Design.from_config(json.loads(json.dumps(design.get_config())))
    again, _ = restored.arrays(df)
    for key, value in inputs.items():
        np.testing.assert_allclose(again[key], value)


@pytest.mark.parametrize("formula", [
    "y ~ C(f, Treatment('v')) + (1 | g)",
    "y ~ C(f, Treatment(reference='w')) + (1 | g)",
    "y ~ C(f, contr.sum) + C(b, Sum) + (1 | g)",
    "y ~ C(f, contr.treatment(base='w')) + (1 | g)",
    "y ~ C(f, levels=['w', 'v', 'u']) + (1 | g)",
    "y ~ C(f, Helmert) + C(b, Poly) + C(a, Diff) + (1 | g)",
    "y ~ scale(x) + center(n) + standardize(x) + (1 | g)",
    "y ~ bs(x, df=4, extrapolation='extend') + (1 | g)",
    "y ~ Q('log.x') + `log.x` + I(`log.x` * 2) + (1 | g)",
    "y ~ log1p(x) + expm1(x) + abs(x) + log2(x) + log10(x) + exp(x) + (1 | g)",
    "y ~ numpy.sqrt(x) + np.maximum(x, 1.2) + np.power(x, 3) + (1 | g)",
    "y ~ I(x > 1) + I((x > 1) & (n < 3)) + I(-x // 2) + (1 | g)",
    "y ~ x + offset(log.x) + offset(np.log(n)) + offset(I(x / 2)) + (1 | g)",
    "y ~ x + (1 + center(x) | g) + (0 + I(x**2) | f:a)",
    "y ~ x + (x || g)",
    "cbind(y, n) ~ x + (1 | g)",
])
def test_formula_features_build_and_round_trip(formula):
    df = frame()
    family = "binomial" if formula.startswith("cbind") else "gaussian"
    design = Design.from_data(formula, df, family)
    inputs, y = design.arrays(df)
    assert np.all(np.isfinite(inputs["x"])) and np.all(np.isfinite(y))
    restored = Design.from_config(json.loads(json.dumps(design.get_config())))
    again, y_again = restored.arrays(df)
    for key, value in inputs.items():
        np.testing.assert_allclose(again[key], value)
    np.testing.assert_allclose(y_again, y)


def test_the_functions_listed_are_the_ones_that_evaluate():
    # Offsets and the response are evaluated by the design with its own namespace.
    assert set(expressions.VALUE_FUNCTIONS) <= set(_EVAL_NAMESPACE)
    assert all(callable(getattr(np, name)) for name in expressions.NUMPY_FUNCTIONS)
    from formulaic.transforms import TRANSFORMS

    available = set(TRANSFORMS) | set(expressions.FORMULA_CONTEXT)
    assert set(expressions.VALUE_FUNCTIONS) | set(expressions.DESIGN_FUNCTIONS) | {"I"} <= available
