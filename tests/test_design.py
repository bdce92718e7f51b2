"""Tests for keras_glmm.design (data -> frozen schema -> numeric arrays; no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_glmm.datasets import (
    load_cbpp,
    load_grouseticks,
    load_penicillin,
    load_radon,
    load_sleepstudy,
)
from keras_glmm.design import Design, RandomTermDesign, lme4_name
from keras_glmm.formula import RandomTerm, parse_formula


@pytest.fixture(scope="module")
def sleep():
    return load_sleepstudy()


@pytest.fixture(scope="module")
def cbpp():
    return load_cbpp()


@pytest.fixture(scope="module")
def radon():
    return load_radon()


def small():
    return pd.DataFrame(
        {
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "x": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
            "f": ["a", "b", "a", "c", "b", "a"],
            "g": ["g1", "g2", "g1", "g2", "g3", "g3"],
            "n": [1, 2, 4, 8, 16, 32],
        }
    )


# ---------------------------------------------------------------- fixed part


def test_radon_fixed_and_random(radon):
    d = Design.from_data("log_radon ~ floor + (1 + floor | county)", radon, "gaussian")
    assert d.fixed_columns == ["(Intercept)", "floor"]
    assert d.response_kind == "continuous"
    (r,) = d.random
    assert r.name == "county"
    assert r.columns == ["(Intercept)", "floor"] and r.intercept
    assert r.levels == list(radon["county"].cat.categories)  # 85 counties, category order
    assert len(r.levels) == 85
    inputs, y = d.arrays(radon)
    assert set(inputs) == {"x", "county", "county_z"}
    np.testing.assert_array_equal(inputs["x"][:, 0], 1.0)
    np.testing.assert_array_equal(inputs["x"][:, 1], radon["floor"].to_numpy(float))
    np.testing.assert_array_equal(inputs["county"], radon["county"].cat.codes.to_numpy())
    assert inputs["county"].dtype == np.int64
    np.testing.assert_array_equal(inputs["county_z"], radon[["floor"]].to_numpy(float))
    np.testing.assert_array_equal(y, radon["log_radon"].to_numpy())
    assert y.dtype == np.float64 and y.shape == (919,)


def test_sleepstudy_days_slope(sleep):
    d = Design.from_data("Reaction ~ Days + (Days | Subject)", sleep, "gaussian")
    (r,) = d.random
    assert r.levels[:3] == ["308", "309", "310"] and len(r.levels) == 18
    assert r.columns == ["(Intercept)", "Days"]
    z = r.covariates(sleep)
    assert z.shape == (180, 1) and z.dtype == np.float64
    np.testing.assert_array_equal(z[:10, 0], np.arange(10.0))
    idx = r.level_index(sleep)
    np.testing.assert_array_equal(idx[:10], 0)
    np.testing.assert_array_equal(idx[10:20], 1)
    np.testing.assert_array_equal(idx[-10:], 17)
    # New data with integer subjects and an unseen subject: same coding, -1 for new.
    new = pd.DataFrame({"Days": [0, 3], "Subject": [309, 999]})
    np.testing.assert_array_equal(r.level_index(new), [1, -1])
    inputs, y = d.arrays(new, with_response=False)
    assert y is None
    np.testing.assert_array_equal(inputs["x"], [[1.0, 0.0], [1.0, 3.0]])
    np.testing.assert_array_equal(inputs["Subject"], [1, -1])


def test_slope_only_and_repeated_group_names(sleep):
    d = Design.from_data("Reaction ~ Days + (Days || Subject)", sleep, "gaussian")
    assert [r.name for r in d.random] == ["Subject", "Subject_2"]
    assert d.random[0].columns == ["(Intercept)"] and d.random[0].intercept
    assert d.random[1].columns == ["Days"] and not d.random[1].intercept
    inputs, _ = d.arrays(sleep)
    assert set(inputs) == {"x", "Subject", "Subject_2", "Subject_2_z"}
    np.testing.assert_array_equal(inputs["Subject_2_z"][:, 0], sleep["Days"].to_numpy(float))


def test_cbpp_period_names_and_cbind(cbpp):
    d = Design.from_data("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, "binomial")
    assert d.fixed_columns == ["(Intercept)", "period2", "period3", "period4"]
    assert d.fixed_formulaic_columns[1] == "period[T.2]"
    assert d.response_kind == "cbind"
    inputs, y = d.arrays(cbpp)
    assert y.shape == (56, 2)
    np.testing.assert_array_equal(y[:3], [[2, 14], [3, 12], [4, 9]])
    np.testing.assert_array_equal(y[:, 0], cbpp["incidence"])
    np.testing.assert_array_equal(y[:, 1], cbpp["size"])
    np.testing.assert_array_equal(inputs["x"][:4], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]])
    assert d.random[0].levels == [str(i) for i in range(1, 16)]  # numeric order, not "1", "10", ...
    np.testing.assert_array_equal(inputs["herd"][:5], [0, 0, 0, 0, 1])


def test_cbind_needs_counts(cbpp):
    df = cbpp.assign(half=cbpp["incidence"] / 2)
    with pytest.raises(ValueError, match="successes 'half'.*integers"):
        Design.from_data("cbind(half, size) ~ 1 + (1|herd)", df, "binomial")
    with pytest.raises(ValueError, match="binomial"):
        Design.from_data("cbind(incidence, size) ~ 1", cbpp, "poisson")


def test_proportion_with_weights(cbpp):
    df = cbpp.assign(prop=cbpp["incidence"] / cbpp["size"])
    d = Design.from_data("prop ~ period + (1|herd)", df, "binomial", weights="size")
    assert d.response_kind == "proportion"
    y = d.response(df, weights=df["size"].to_numpy())
    np.testing.assert_array_equal(y[:, 0], cbpp["incidence"])
    np.testing.assert_array_equal(y[:, 1], cbpp["size"])
    with pytest.raises(ValueError, match="pass weights"):
        d.response(df)
    bad = df.assign(prop=df["prop"] + 0.01)
    with pytest.raises(ValueError, match="whole numbers"):
        d.response(bad, weights="size")


def test_binary_responses():
    df = small().assign(
        yes=["no", "yes", "no", "yes", "yes", "no"],
        b=[True, False, True, False, True, True],
        z=[0, 1, 1, 0, 0, 1],
    )
    d = Design.from_data("yes ~ x + (1|g)", df, "binomial")
    assert d.response_kind == "binary" and d.response_levels == ["no", "yes"]
    np.testing.assert_array_equal(d.response(df), [0, 1, 0, 1, 1, 0])
    # A categorical's order decides: second category is success.
    df2 = df.assign(yes=pd.Categorical(df["yes"], categories=["yes", "no"]))
    d2 = Design.from_data("yes ~ x", df2, "binomial")
    np.testing.assert_array_equal(d2.response(df2), [1, 0, 1, 0, 0, 1])
    d3 = Design.from_data("b ~ x", df, "binomial")
    np.testing.assert_array_equal(d3.response(df), [1, 0, 1, 0, 1, 1])
    d4 = Design.from_data("z ~ x", df, "binomial")
    np.testing.assert_array_equal(d4.response(df), [0, 1, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="'f'.*3 level"):
        Design.from_data("f ~ x", df, "binomial")
    with pytest.raises(ValueError, match="'n'.*0/1.*cbind"):
        Design.from_data("n ~ x", df, "binomial")
    with pytest.raises(ValueError, match="weights"):
        Design.from_data("x ~ 1", df.assign(x=[0.5] * 6), "binomial")
    with pytest.raises(ValueError, match="not among its levels"):
        d.response(df.assign(yes=["no", "maybe", "no", "yes", "yes", "no"]))


# ------------------------------------------------------------ random effects


def test_nested_groups_levels_are_combinations():
    df = pd.DataFrame(
        {
            "y": np.arange(6.0),
            "a": ["p", "p", "q", "q", "p", "q"],
            "b": [2, 1, 1, 1, 10, 2],
        }
    )
    d = Design.from_data("y ~ 1 + (1 | a/b)", df, "gaussian")
    ra, rab = d.random
    assert (ra.name, rab.name) == ("a", "a_x_b")
    assert ra.levels == ["p", "q"]
    assert rab.levels == ["p:1", "p:2", "p:10", "q:1", "q:2"]  # a slowest, b numeric order
    np.testing.assert_array_equal(rab.level_index(df), [1, 0, 3, 3, 2, 4])
    new = pd.DataFrame({"a": ["q", "p", "r"], "b": [10, 2, 1]})
    np.testing.assert_array_equal(rab.level_index(new), [-1, 1, -1])
    np.testing.assert_array_equal(ra.level_index(new), [1, 0, -1])


def test_grouseticks_and_penicillin():
    g = load_grouseticks()
    d = Design.from_data("TICKS ~ YEAR + HEIGHTs + (1 | LOCATION/BROOD) + (1 | INDEX)", g, "poisson")
    assert d.fixed_columns == ["(Intercept)", "YEAR96", "YEAR97", "HEIGHTs"]
    assert [r.name for r in d.random] == ["LOCATION", "LOCATION_x_BROOD", "INDEX"]
    assert [len(r.levels) for r in d.random] == [63, 118, 403]
    inputs, y = d.arrays(g)
    assert inputs["x"].shape == (403, 4)
    np.testing.assert_array_equal(y, g["TICKS"].to_numpy(float))
    p = load_penicillin()
    d = Design.from_data("diameter ~ 1 + (1 | plate) + (1 | sample)", p, "gaussian")
    assert d.random[0].levels[:3] == ["a", "b", "c"] and len(d.random[0].levels) == 24
    assert d.random[1].levels == ["A", "B", "C", "D", "E", "F"]


def test_level_strings_from_floats_and_categories():
    df = pd.DataFrame({"y": np.arange(4.0), "g": [2.0, 1.0, 1.5, 2.0]})
    r = Design.from_data("y ~ (1|g)", df, "gaussian").random[0]
    assert r.levels == ["1", "1.5", "2"]
    np.testing.assert_array_equal(r.level_index(pd.DataFrame({"g": [2, "1.5", 3]})), [2, 1, -1])
    df = pd.DataFrame({"y": np.arange(4.0), "g": pd.Categorical(["z", "y", "z", "y"], ["z", "unused", "y"])})
    r = Design.from_data("y ~ (1|g)", df, "gaussian").random[0]
    assert r.levels == ["z", "y"]  # category order, unused categories dropped


def test_keras_safe_names():
    df = pd.DataFrame({"y": np.arange(4.0), "my group": ["a", "b", "a", "b"], "x": ["u", "v", "v", "u"]})
    d = Design.from_data("y ~ 1 + (1 | `my group`) + (1 | x)", df, "gaussian")
    assert [r.name for r in d.random] == ["my_group", "x_group"]  # "x" is the fixed-design key
    inputs, _ = d.arrays(df)
    assert set(inputs) == {"x", "my_group", "x_group"}


def test_single_level_group_error():
    df = small().assign(g=["a"] * 6)
    with pytest.raises(ValueError, match=r"grouping factor 'g' has a single level \('a'\): a random effect needs at least 2"):
        Design.from_data("y ~ x + (1 | g)", df, "gaussian")


def test_categorical_slope_error():
    with pytest.raises(ValueError, match=r"\(f \| g\): 'f' is categorical; random slopes on factors"):
        Design.from_data("y ~ x + (f | g)", small(), "gaussian")
    with pytest.raises(ValueError, match="'C\\(n\\)' is categorical"):
        Design.from_data("y ~ x + (0 + C(n) | g)", small(), "gaussian")


# ------------------------------------------------------------ errors, NA


def test_unknown_columns():
    df = small()
    with pytest.raises(ValueError, match="unknown column 'nope' in the fixed effects; available columns: \\['y', 'x'"):
        Design.from_data("y ~ x + nope + (1|g)", df, "gaussian")
    with pytest.raises(ValueError, match=r"unknown column 'nope' in the fixed effects \(in 'log\(nope\)'\)"):
        Design.from_data("y ~ log(nope)", df, "gaussian")
    with pytest.raises(ValueError, match="unknown column 'h' in the grouping factor"):
        Design.from_data("y ~ x + (1|h)", df, "gaussian")
    with pytest.raises(ValueError, match="unknown column 'z' in random-effect term"):
        Design.from_data("y ~ x + (z|g)", df, "gaussian")
    with pytest.raises(ValueError, match="unknown column 'w' in offset"):
        Design.from_data("y ~ x + offset(log(w))", df, "gaussian")
    with pytest.raises(ValueError, match="unknown column 'yy' in the response"):
        Design.from_data("yy ~ x", df, "gaussian")
    d = Design.from_data("y ~ x + (1|g)", df, "gaussian")
    with pytest.raises(ValueError, match="grouping column 'g'.*missing"):
        d.random[0].level_index(df.drop(columns="g"))
    with pytest.raises(ValueError, match="'x'"):
        d.arrays(df.drop(columns="x"), with_response=False)


def test_unseen_fixed_level_is_an_error(cbpp):
    d = Design.from_data("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, "binomial")
    new = pd.DataFrame({"period": ["1", "5"], "herd": ["1", "99"], "incidence": [0, 0], "size": [1, 1]})
    with pytest.raises(ValueError, match="column 'period' has level\\(s\\) '5' not seen"):
        d.fixed_matrix(new)
    df = small()
    d = Design.from_data("y ~ C(f) + x", df, "gaussian")
    assert d.fixed_columns == ["(Intercept)", "fb", "fc", "x"]
    with pytest.raises(ValueError, match="column 'f' has level\\(s\\) 'd'"):
        d.fixed_matrix(df.assign(f=["a", "d", "a", "a", "a", "a"]))
    # Known levels, any subset, any order: coded as in training.
    np.testing.assert_array_equal(
        d.fixed_matrix(pd.DataFrame({"f": ["c", "a"], "x": [1.0, 2.0]})), [[1, 0, 1, 1], [1, 0, 0, 2]]
    )


def test_missing_values_raise_and_omit():
    df = small()
    df.loc[[1, 4], "x"] = np.nan
    df.loc[3, "g"] = None
    with pytest.raises(ValueError, match=r"missing values in column\(s\) \['x', 'g'\] at rows \[1, 3, 4\]"):
        Design.from_data("y ~ x + (1|g)", df, "gaussian")
    d = Design.from_data("y ~ x + (1|g)", df, "gaussian", na_action="omit")
    keep = d.complete_rows(df)
    np.testing.assert_array_equal(keep, [True, False, True, False, False, True])
    inputs, y = d.arrays(df[keep])
    np.testing.assert_array_equal(y, [1.0, 3.0, 6.0])
    assert d.random[0].levels == ["g1", "g3"]  # learned from complete rows only
    with pytest.raises(ValueError, match="missing values"):
        d.arrays(df)
    # A column the formula does not use may be missing anywhere.
    ok = small().assign(unused=np.nan)
    assert Design.from_data("y ~ x", ok, "gaussian").complete_rows(ok).all()
    # Response NA only matters when the response is asked for.
    new = small()
    new.loc[0, "y"] = np.nan
    d = Design.from_data("y ~ x", small(), "gaussian")
    assert not d.complete_rows(new)[0] and d.complete_rows(new, with_response=False).all()
    d.arrays(new, with_response=False)


def test_many_missing_rows_are_truncated():
    df = pd.DataFrame({"y": np.arange(30.0), "x": [np.nan] * 25 + [1.0] * 5})
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(25 rows in all\)\]"):
        Design.from_data("y ~ x", df, "gaussian")


def test_offsets():
    df = small()
    d = Design.from_data("y ~ x + offset(log(n)) + offset(np.log(n)) + offset(x)", df, "poisson")
    inputs, _ = d.arrays(df)
    np.testing.assert_allclose(inputs["offset"], 2 * np.log(df["n"]) + df["x"])
    assert "offset" not in Design.from_data("y ~ x", df, "gaussian").arrays(df)[0]
    np.testing.assert_array_equal(Design.from_data("y ~ x", df, "gaussian").offset(df), np.zeros(6))
    df2 = df.rename(columns={"n": "log.n"})
    d = Design.from_data("y ~ offset(log.n)", df2, "poisson")
    np.testing.assert_array_equal(d.offset(df2), df["n"].to_numpy(float))


def test_intercept_only_and_no_intercept():
    df = small()
    d = Design.from_data("y ~ 1 + (1|g)", df, "gaussian")
    assert d.fixed_columns == ["(Intercept)"]
    np.testing.assert_array_equal(d.fixed_matrix(df), np.ones((6, 1)))
    d = Design.from_data("y ~ 0 + x + (0 + x | g)", df, "gaussian")
    assert d.fixed_columns == ["x"] and d.random[0].columns == ["x"]
    assert d.random[0].covariates(df).shape == (6, 1)


def test_accepts_spec_and_dataclass_fields(sleep):
    spec = parse_formula("Reaction ~ Days + (1 | Subject)")
    d = Design.from_data(spec, sleep, "gaussian")
    assert d.spec is spec
    assert isinstance(d.random[0], RandomTermDesign)
    assert d.random[0].term == RandomTerm("1", "Subject")
    assert d.lme4_names == d.fixed_columns


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Intercept", "(Intercept)"),
        ("C(period)[T.2]", "period2"),
        ("period[T.2]", "period2"),
        ("C(YEAR, Treatment('96'))[T.95]", "YEAR95"),
        ("x:C(f)[T.b]", "x:fb"),
        ("f[a]", "fa"),
        ("floor", "floor"),
        ("np.log(x)", "np.log(x)"),
        ("I(x ** 2)", "I(x ** 2)"),
    ],
)
def test_lme4_names(name, expected):
    assert lme4_name(name) == expected


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=4, max_size=30))
def test_level_index_roundtrip(groups):
    df = pd.DataFrame({"y": np.arange(len(groups), dtype=float), "g": groups})
    if len(set(groups)) < 2:
        with pytest.raises(ValueError, match="single level"):
            Design.from_data("y ~ (1|g)", df, "gaussian")
        return
    r = Design.from_data("y ~ (1|g)", df, "gaussian").random[0]
    assert r.levels == sorted(set(groups))
    idx = r.level_index(df)
    assert [r.levels[i] for i in idx] == groups
