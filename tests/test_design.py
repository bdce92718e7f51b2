"""Tests for keras_glmm.design (data -> frozen schema -> numeric arrays; no TensorFlow)."""

from __future__ import annotations


import numpy as np
import pandas as pd

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_glmm as kg
from keras_glmm.datasets import (
    load_gcsemv,
    load_cbpp,
    load_grouseticks,
    load_penicillin,
    load_radon,
    load_sleepstudy,
)
from keras_glmm import levels
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
    # lme4 names the nested term b:a (inner factor first); R's b:a varies b slowest.
    assert (ra.name, rab.name) == ("a", "b_x_a")
    assert rab.term.group == "b:a"
    assert ra.levels == ["p", "q"]
    assert rab.levels == ["1:p", "1:q", "2:p", "2:q", "10:p"]  # b slowest, numeric order
    np.testing.assert_array_equal(rab.level_index(df), [2, 0, 1, 1, 4, 3])
    new = pd.DataFrame({"a": ["q", "p", "r"], "b": [10, 2, 1]})
    np.testing.assert_array_equal(rab.level_index(new), [-1, 2, -1])
    np.testing.assert_array_equal(ra.level_index(new), [1, 0, -1])


def test_grouseticks_and_penicillin():
    g = load_grouseticks()
    d = Design.from_data("TICKS ~ YEAR + HEIGHTs + (1 | LOCATION/BROOD) + (1 | INDEX)", g, "poisson")
    assert d.fixed_columns == ["(Intercept)", "YEAR96", "YEAR97", "HEIGHTs"]
    assert [r.name for r in d.random] == ["LOCATION", "BROOD_x_LOCATION", "INDEX"]
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


def test_level_keys_of_every_column_type():
    """One key per level whatever the column's type, in training and on new data."""
    y = np.arange(6.0)
    cases = {
        "int64": ([308, 309, 310, 308, 309, 310], [310, 308, 999]),
        "float64": ([308.0, 309.0, 310.0, 308.0, 309.0, 310.0], [310, "308", 308.5]),
        "bool": ([True, False, True, False, True, False], [False, True, False]),
        "string": (["308", "309", "310", "308", "309", "310"], [310.0, np.int32(308), "new"]),
    }
    for kind, (values, new) in cases.items():
        r = Design.from_data("y ~ (1 | g)", pd.DataFrame({"y": y, "g": values}), "gaussian").random[0]
        assert r.group_kinds == (kind,)
        assert r.keys == r.levels
        idx = r.level_index(pd.DataFrame({"g": pd.Series(new, dtype=object)}))
        if kind == "bool":
            assert r.levels == ["False", "True"]
            np.testing.assert_array_equal(idx, [0, 1, 0])
        else:
            assert r.levels == ["308", "309", "310"]
            np.testing.assert_array_equal(idx, [2, 0, -1])
    cat = pd.Categorical([308, 309, 310, 308, 309, 310])
    r = Design.from_data("y ~ (1 | g)", pd.DataFrame({"y": y, "g": cat}), "gaussian").random[0]
    assert r.group_kinds == ("int64",) and r.levels == ["308", "309", "310"]
    np.testing.assert_array_equal(r.level_index(pd.DataFrame({"g": [309.0, 1]})), [1, -1])


def test_interaction_levels_whose_parts_hold_colons_stay_apart():
    df = pd.DataFrame({"y": np.arange(4.0), "a": ["x:1", "x", "x:1", "x"], "b": ["y", "1:y", "y", "1:y"]})
    for formula, names in (("y ~ (1 | a:b)", ["x:1:y", "x:1:y"]), ("y ~ (1 | b/a)", ["x:1:y", "x:1:y"])):
        d = Design.from_data(formula, df, "gaussian")
        r = d.random[-1]
        assert r.n_levels == 2 and len(set(r.keys)) == 2
        assert r.levels == names  # lme4's names, shared; the keys differ
        np.testing.assert_array_equal(r.level_index(df), [1, 0, 1, 0])
        r2 = _restore(d).random[-1]
        np.testing.assert_array_equal(r2.level_index(df), [1, 0, 1, 0])
        new = pd.DataFrame({"a": ["x", "x:1"], "b": ["1:y", "1:y"]})
        np.testing.assert_array_equal(r.level_index(new), [0, -1])


def test_config_of_format_version_1_is_refused_naming_the_version():
    """Designs saved in format 1 (formulaic's internal objects) are not read: the
    message names the version and what to do (keras_glmm.design_spec's decision)."""
    df = pd.DataFrame({"y": np.arange(6.0), "a": list("ppqqpq")})
    old = {"format": 1, "spec": {"formula": "y ~ 1 + (1 | a)"}, "fixed_spec": {}, "random": []}
    with pytest.raises(ValueError, match="format version 1.*Fit the model again"):
        Design.from_config(old)
    config = Design.from_data("y ~ (1 | a)", df, "gaussian").get_config()
    config["format_version"] = 3
    with pytest.raises(ValueError, match="unsupported field 'format_version' 3.*reads format version 2"):
        Design.from_config(config)


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


@pytest.mark.parametrize(
    "formula,columns",
    [
        # lme4 names: a reduced factor after an intercept, every level without one.
        ("y ~ x + (f | g)", [["(Intercept)", "fb", "fc"]]),
        ("y ~ x + (0 + f | g)", [["fa", "fb", "fc"]]),
        ("y ~ x + (1 | g) + (0 + f | g)", [["(Intercept)"], ["fa", "fb", "fc"]]),
        ("y ~ x + (x + f | g)", [["(Intercept)", "x", "fb", "fc"]]),
        ("y ~ x + (0 + x + f | g)", [["x", "fa", "fb", "fc"]]),
        ("y ~ x + (0 + C(n) | g)", [["n1", "n2", "n4", "n8", "n16", "n32"]]),
        # lme4's ||: one term per term label; a factor's columns stay together.
        ("y ~ x + (f || g)", [["(Intercept)"], ["fa", "fb", "fc"]]),
        ("y ~ x + (x * f || g)", [["(Intercept)"], ["x"], ["fa", "fb", "fc"], ["x:fa", "x:fb", "x:fc"]]),
    ],
)
def test_random_slopes_on_factors(formula, columns):
    df = small()
    d = Design.from_data(formula, df, "gaussian")
    assert [r.columns for r in d.random] == columns
    inputs, _ = d.arrays(df)
    for r in d.random:
        z = r.covariates(df)
        assert z.dtype == np.float64 and z.shape == (6, r.n_covariates)
        if r.n_covariates:
            np.testing.assert_array_equal(inputs[r.name + "_z"], z)
    # Dummy columns are the indicators of the levels.
    for r in d.random:
        z = r.covariates(df)
        for j, name in enumerate(r.columns[int(r.intercept):]):
            if name in ("fa", "fb", "fc"):
                np.testing.assert_array_equal(z[:, j], (df["f"] == name[1]).to_numpy(float))
    # JSON round trip (safe_mode .keras saving) codes new data identically.
    d2 = _restore(d)
    new = df.iloc[[5, 0, 3]]
    for r1, r2 in zip(d.random, d2.random, strict=True):
        assert r2.columns == r1.columns and r2.intercept == r1.intercept
        np.testing.assert_array_equal(r2.covariates(new), r1.covariates(new))


def test_random_factor_slope_new_level_is_an_error():
    df = small()
    d = Design.from_data("y ~ x + (f | g)", df, "gaussian")
    new = df.assign(f=["a", "b", "zzz", "a", "b", "a"])
    with pytest.raises(ValueError, match=r"column 'f' has level\(s\) 'zzz' not seen.*\(f \| g\)"):
        d.arrays(new)
    with pytest.raises(ValueError, match="'zzz'"):
        _restore(d).random[0].covariates(new)


def test_random_factor_slope_drops_unused_categories():
    df = small().assign(f=pd.Categorical(small()["f"], categories=["a", "unused", "b", "c"]))
    r = Design.from_data("y ~ x + (0 + f | g)", df, "gaussian").random[0]
    assert r.columns == ["fa", "fb", "fc"]  # no all-zero column for "unused"


def test_gcsemv_factor_slope_design():
    """lme4's reference case `course ~ gender + (gender | school)` (na.omit: 1725 rows)."""
    data = load_gcsemv()
    complete = data.dropna(subset=["course", "gender", "school"])
    assert len(complete) == 1725 and len(data) == 1905
    d = Design.from_data("course ~ gender + (gender | school)", complete, "gaussian")
    assert d.fixed_columns == ["(Intercept)", "genderM"]
    (r,) = d.random
    assert r.columns == ["(Intercept)", "genderM"] and r.intercept
    np.testing.assert_array_equal(r.covariates(complete)[:, 0], (complete["gender"] == "M").to_numpy(float))
    assert r.n_levels == complete["school"].nunique()
    # na_action="omit" learns the same design from all the rows.
    omit = Design.from_data("course ~ gender + (gender | school)", data, "gaussian", na_action="omit")
    assert omit.random[0].columns == r.columns and omit.random[0].keys == r.keys


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


# ------------------------------------------------ JSON config (Keras safe_mode)

import json  # noqa: E402


def _json_only(obj, path="config"):
    """Assert ``obj`` is made of plain JSON types only (what safe_mode loading accepts)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str, f"{path}: non-string key {k!r}"
            _json_only(v, f"{path}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _json_only(v, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"{path}: {type(obj).__name__} {obj!r}"


def _restore(design):
    cfg = design.get_config()
    _json_only(cfg)
    text = json.dumps(cfg, allow_nan=False)
    restored = Design.from_config(json.loads(text))
    # Saving the restored design again gives the same config.
    assert json.dumps(restored.get_config(), allow_nan=False) == text
    return restored


def _assert_same_design(d1, d2, frames, weights=None):
    assert d2.spec == d1.spec
    assert d2.fixed_columns == d1.fixed_columns
    assert d2.fixed_formulaic_columns == d1.fixed_formulaic_columns
    assert d2.response_kind == d1.response_kind
    assert d2.response_levels == d1.response_levels
    assert d2.family_name == d1.family_name and d2.na_action == d1.na_action
    assert [r.name for r in d2.random] == [r.name for r in d1.random]
    for r1, r2 in zip(d1.random, d2.random, strict=True):
        assert r2.term == r1.term
        assert r2.levels == r1.levels
        assert r2.keys == r1.keys and r2.group_kinds == r1.group_kinds
        assert r2.columns == r1.columns
        assert r2.intercept == r1.intercept
        assert r2.group_columns == r1.group_columns
        assert list(r2.model_spec.column_names) == list(r1.model_spec.column_names)
    for frame in frames:
        assert d2.used_columns(frame) == d1.used_columns(frame)
        a1, y1 = d1.arrays(frame, weights=weights)
        a2, y2 = d2.arrays(frame, weights=weights)
        assert list(a1) == list(a2)
        for key in a1:
            assert a1[key].dtype == a2[key].dtype, key
            np.testing.assert_array_equal(a1[key], a2[key], err_msg=key)
        if y1 is None:
            assert y2 is None
        else:
            np.testing.assert_array_equal(y1, y2)


def _synthetic(n=24, seed=0):
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, 6, n)
    trials = succ + rng.integers(0, 6, n)
    trials = np.maximum(trials, 1)
    return pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.uniform(1.0, 3.0, n),
            "e": rng.uniform(1.0, 2.0, n),
            "f": np.array(list("abc"))[np.arange(n) % 3],
            "g": [f"g{i % 4}" for i in range(n)],
            "a": [f"a{i % 3}" for i in range(n)],
            "b": [f"b{(i // 3) % 2}" for i in range(n)],
            "cat": pd.Categorical(
                np.array(["lo", "hi"])[np.arange(n) % 2], categories=["hi", "lo", "unused"]
            ),
            "bo": np.arange(n) % 3 == 0,
            "yb": np.array(["no", "yes"])[rng.integers(0, 2, n)],
            "succ": succ,
            "fail": trials - succ,
            "prop": succ / trials,
            "w": trials.astype(float),
        }
    )


def _new_frame(data, group_cols):
    """New data: shuffled rows, shifted covariates, an unseen level in each grouping column."""
    new = data.iloc[::-1].reset_index(drop=True).copy()
    new["x"] = new["x"] * 1.3 + 0.1
    for col in group_cols:
        values = new[col].astype(str).to_numpy(dtype=object)
        values[:3] = "never_seen"
        new[col] = values
    return new


_CONFIG_CASES = [
    ("y ~ C(f) + (1 | g)", "gaussian", None),
    ("y ~ C(f, levels=['c', 'a', 'b']) + (1 | g)", "gaussian", None),
    ("y ~ x:f + (1 | g)", "gaussian", None),
    ("y ~ x * f + cat + bo + (1 | g)", "gaussian", None),
    ("y ~ I(x**2) + np.log(x) + (1 | g)", "gaussian", None),
    ("y ~ 0 + f + x + (1 | g)", "gaussian", None),
    ("y ~ center(x) + scale(x) + (1 | g)", "gaussian", None),
    ("y ~ poly(x, 2) + bs(x, df=4, extrapolation='extend') + C(f, contr.sum) + (1 | g)", "gaussian", None),
    ("y ~ x + offset(np.log(e)) + offset(e) + (1 | g)", "gaussian", None),
    ("cbind(succ, fail) ~ x + (1 | g)", "binomial", None),
    ("yb ~ x + f + (1 | g)", "binomial", None),
    ("prop ~ x + (1 | g)", "binomial", "w"),
    ("y ~ x + (1 | a/b)", "gaussian", None),
    ("y ~ x + (x || g)", "gaussian", None),
    ("y ~ x + (1 + center(x) | g) + (0 + I(x**2) | a:b)", "gaussian", None),
    ("~ x + f + (1 | g)", "gaussian", None),
]


@pytest.mark.parametrize("formula,family,weights", _CONFIG_CASES)
def test_config_roundtrip_synthetic(formula, family, weights):
    data = _synthetic()
    d1 = Design.from_data(formula, data, family, weights=weights)
    d2 = _restore(d1)
    group_cols = sorted({c for r in d1.random for c in r.group_columns})
    new = _new_frame(data, group_cols)
    _assert_same_design(d1, d2, [data, new], weights=weights)
    inputs, _ = d2.arrays(new, weights=weights)
    for r in d2.random:
        assert (inputs[r.name][:3] == -1).all()
        assert (inputs[r.name][3:] >= 0).all()


@pytest.mark.parametrize("ziformula,columns", [
    ("~ C(f) + I(x**2)", ["(Intercept)", "fb", "fc", "I(x ** 2)"]),
    ("~ 0 + f + center(x)", ["fa", "fb", "fc", "center(x)"]),
])
def test_ziformula_columns_and_config_roundtrip(ziformula, columns):
    # glmmTMB's ziformula is coded like the fixed part and frozen with it: new data get
    # the training categories and the training centre.
    data = _synthetic().assign(count=np.arange(24) % 5)
    d1 = Design.from_data("count ~ x + (1 | g)", data, "zero_inflated_poisson", ziformula=ziformula)
    assert d1.zi_columns == columns and d1.ziformula == ziformula
    d2 = _restore(d1)
    assert d2.ziformula == ziformula and d2.zi_columns == columns
    new = _new_frame(data, ["g"])
    _assert_same_design(d1, d2, [data, new])
    np.testing.assert_array_equal(d1.arrays(new)[0]["x_zi"], d2.zi_matrix(new))
    assert "x_zi" in d1.arrays(data)[0] and "x_zi" not in Design.from_data(
        "count ~ x + (1 | g)", data, "zero_inflated_poisson", ziformula="~1").arrays(data)[0]
    # Without a ziformula the saved design has no zero-inflation part.
    config = Design.from_data("count ~ x + (1 | g)", data, "zero_inflated_poisson").get_config()
    assert config["zero_inflation"] is None and Design.from_config(config).zi_spec is None
    with pytest.raises(ValueError, match="level\\(s\\) 'd' not seen"):
        d2.arrays(new.assign(f="d"))


def test_config_keeps_training_state_of_stateful_transforms():
    data = _synthetic()
    # One transform per design: center(x) and scale(x) together are aliased (lme4's
    # check.rankX drops the second).
    centred = _restore(Design.from_data("y ~ center(x) + (1 | g)", data))
    scaled = _restore(Design.from_data("y ~ scale(x) + (1 | g)", data))
    new = _new_frame(data, ["g"])
    mean, sd = data["x"].mean(), data["x"].std(ddof=1)
    np.testing.assert_allclose(centred.fixed_matrix(new)[:, 1], new["x"] - mean, rtol=1e-12)
    np.testing.assert_allclose(scaled.fixed_matrix(new)[:, 1], (new["x"] - mean) / sd, rtol=1e-12)


def test_config_restored_design_keeps_fixed_level_checks():
    data = _synthetic()
    d2 = _restore(Design.from_data("y ~ C(f, levels=['c', 'a', 'b']) + cat + (1 | g)", data))
    new = data.copy()
    new.loc[0, "f"] = "zzz"
    with pytest.raises(ValueError, match="zzz"):
        d2.arrays(new)
    # A categorical's unused category is no level (R's model frame drops unused levels).
    assert not any("unused" in c for c in d2.fixed_formulaic_columns)


def test_config_numeric_and_timestamp_categories():
    data = _synthetic()
    data["n"] = np.arange(len(data)) % 3 + 1
    data["c"] = pd.Categorical(np.array([1.5, 2.5])[np.arange(len(data)) % 2], categories=[2.5, 1.5, 9.0])
    data["t"] = pd.to_datetime(np.array(["2020-01-01", "2021-06-30"])[np.arange(len(data)) % 2])
    d1 = Design.from_data("y ~ C(n) + c + C(t) + (1 | g)", data)
    _assert_same_design(d1, _restore(d1), [data])


def test_a_timedelta_grouping_column_has_keys_as_pandas_prints_them():
    # numpy makes timedelta64 a subclass of np.integer: its keys are durations, not ints.
    durations = pd.Series(pd.to_timedelta([1, 2, 1, 3], unit="D"))
    assert levels.column_levels(durations) == ["1 days 00:00:00", "2 days 00:00:00", "3 days 00:00:00"]
    assert levels.level_key(np.timedelta64(90, "m")) == "0 days 01:30:00"


@pytest.mark.parametrize("formula", [
    "y ~ C(f, [[1, 0], [0, 1], [1, 1]]) + C(a, contr.SAS) + (1 | g)",
    "y ~ C(f, Poly) + C(b, Treatment('b1')) + cr(x, df=4) + (1 | g)",
    "y ~ cc(x, df=4) + (1 | g)",
    "y ~ cs(x, df=4) + C(f, Diff) + (1 | g)",
])
def test_config_round_trips_every_contrast_and_transform_state(formula):
    data = _synthetic(n=36)
    d1 = Design.from_data(formula, data)
    d2 = _restore(d1)
    _assert_same_design(d1, d2, [data, _new_frame(data, ["g"])])


def test_config_is_the_documented_document():
    """The saved design is keras_glmm.design_spec's format: its fields, version and codings."""
    data = _synthetic()
    config = Design.from_data("y ~ scale(x) + C(f, Sum) + (1 + x | g)", data).get_config()
    assert config["format"] == "keras_glmm.design" and config["format_version"] == 2
    assert list(config) == ["format", "format_version", "formula", "family", "na_action", "weights",
                            "response", "offset_columns", "fixed", "random", "zero_inflation"]
    coding = config["fixed"]["coding"]
    assert coding["rhs"] == "scale(x) + C(f, Sum)"
    assert [t["term"] for t in coding["terms"]] == ["1", "scale(x)", "C(f, Sum)"]
    factor = coding["factors"]["C(f, Sum)"]
    assert factor["kind"] == "categorical" and factor["value_type"] == "string"
    assert factor["categories"] == ["a", "b", "c"]
    assert factor["contrasts"] == {"name": "sum", "levels": ["a", "b", "c"]}
    scale = coding["transforms"]["scale(x)"]
    assert scale["function"] == "scale" and scale["state"]["ddof"] == 1
    np.testing.assert_allclose([scale["state"]["center"], scale["state"]["scale"]],
                               [data["x"].mean(), data["x"].std(ddof=1)], rtol=1e-12)
    term = config["random"][0]
    assert term["term"] == {"expr": "1 + x", "group": "g", "correlated": True}
    assert term["columns"] == ["(Intercept)", "x"] and term["group_kinds"] == ["string"]


def test_config_rejects_unknown_format():
    cfg = Design.from_data("y ~ x + (1 | g)", _synthetic()).get_config()
    cfg["format"] = 99
    with pytest.raises(ValueError, match="format"):
        Design.from_config(cfg)


@pytest.mark.parametrize(
    "loader,formula,family,weights,groups",
    [
        (load_sleepstudy, "Reaction ~ Days + (Days | Subject)", "gaussian", None, ["Subject"]),
        (load_sleepstudy, "Reaction ~ Days + (Days || Subject)", "gaussian", None, ["Subject"]),
        (
            load_sleepstudy,
            "Reaction ~ center(Days) + I(Days**2) + (1 | Subject)",
            "gaussian",
            None,
            ["Subject"],
        ),
        (load_cbpp, "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial", None, ["herd"]),
        (load_cbpp, "incidence ~ period + offset(np.log(size)) + (1 | herd)", "poisson", None, ["herd"]),
        (
            load_grouseticks,
            "TICKS ~ YEAR + HEIGHTs + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
            "poisson",
            None,
            ["BROOD", "INDEX", "LOCATION"],
        ),
        (
            load_grouseticks,
            "TICKS ~ YEAR * scale(HEIGHT) + (1 | LOCATION/BROOD)",
            "poisson",
            None,
            ["LOCATION", "BROOD"],
        ),
    ],
)
def test_config_roundtrip_datasets(loader, formula, family, weights, groups):
    data = loader()
    d1 = Design.from_data(formula, data, family, weights=weights)
    d2 = _restore(d1)
    new = data.iloc[::-1].reset_index(drop=True).copy()
    for col in groups:
        values = new[col].astype(str).to_numpy(dtype=object)
        values[:2] = "never_seen"
        new[col] = values
    _assert_same_design(d1, d2, [data, new], weights=weights)
    inputs, _ = d2.arrays(new, weights=weights)
    for r in d2.random:
        assert (inputs[r.name][:2] == -1).all()


def test_fit_reuses_the_coded_frame_only_while_it_is_unchanged():
    """`fit(data)` on the very frame `from_formula` coded takes its arrays; a copy, an edit in
    place, a replaced column or index is coded again."""
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"y": rng.integers(0, 2, 300).astype(float), "x": rng.normal(size=300),
                         "g": rng.integers(0, 12, 300)})
    model = kg.GLMM.from_formula("y ~ x + (1 | g)", data, family="binomial")
    coded = model._formula_arrays
    assert model._frame_arrays(data) is coded
    assert model._frame_arrays(data.copy()) is not coded
    data.loc[3, "x"] += 1.0
    x, _ = model._frame_arrays(data)
    assert x["x"][3, 1] == data["x"].iloc[3]
    data["g"] = data["g"].to_numpy()[::-1].copy()
    x, _ = model._frame_arrays(data)
    np.testing.assert_array_equal(x["g"], model.design.random[0].level_index(data))
    assert model._frame_arrays(data) is not coded
