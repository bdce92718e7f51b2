"""Tests for keras_glmm.datasets: shapes, dtypes and known facts per data set."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest

from keras_glmm import datasets

# The shared reference copy of the tutorial's preprocessed radon data (tests/data).
_REFERENCE_RADON = pathlib.Path(__file__).parent / "data" / "radon_tutorial.csv"


def _assert_categorical(series: pd.Series, levels=None, n_levels=None):
    assert isinstance(series.dtype, pd.CategoricalDtype), series.name
    assert not series.dtype.ordered
    assert all(isinstance(c, str) for c in series.cat.categories)
    assert series.notna().all()
    if levels is not None:
        assert list(series.cat.categories) == list(levels)
    if n_levels is not None:
        assert len(series.cat.categories) == n_levels


@pytest.fixture(scope="module")
def radon():
    return datasets.load_radon()


@pytest.fixture(scope="module")
def insteval():
    return datasets.load_insteval()


def test_exports():
    for name in (
        "load_radon",
        "load_sleepstudy",
        "load_cbpp",
        "load_penicillin",
        "load_grouseticks",
        "load_insteval",
        "load_dyestuff",
        "load_dyestuff2",
        "load_pastes",
        "load_oxboys",
        "load_gcsemv",
        "load_scotssec",
        "load_egsingle",
        "load_star",
        "load_bacteria",
        "load_cbpp_olre",
        "load_guimmun",
        "load_fatalities",
    ):
        assert name in datasets.__all__
        assert callable(getattr(datasets, name))


# --------------------------------------------------------------------- radon
def test_radon_shape_and_columns(radon):
    assert radon.shape[0] == 919
    assert set(radon.columns) >= {
        "idnum",
        "state",
        "county",
        "county_code",
        "floor",
        "activity",
        "log_radon",
        "uranium",
        "log_uranium",
    }
    assert (radon["state"] == "MN").all()
    assert list(radon.index) == list(range(919))


def test_radon_dtypes(radon):
    _assert_categorical(radon["county"], n_levels=85)
    assert radon["county_code"].dtype == np.int64
    assert radon["floor"].dtype == np.int64
    assert radon["idnum"].dtype == np.int64
    for col in ("activity", "log_radon", "uranium", "log_uranium"):
        assert radon[col].dtype == np.float64, col


def test_radon_counties(radon):
    cats = list(radon["county"].cat.categories)
    assert cats == sorted(cats)
    assert cats[:3] == ["Aitkin", "Anoka", "Becker"]
    assert radon["county"].nunique() == 85
    np.testing.assert_array_equal(
        radon["county_code"].to_numpy(), radon["county"].cat.codes.to_numpy()
    )
    assert radon["county_code"].min() == 0
    assert radon["county_code"].max() == 84
    counts = radon["county"].value_counts()
    assert counts["Hennepin"] == 105
    assert counts["St Louis"] == 116
    assert counts["Dakota"] == 63
    assert radon.loc[radon["county"] == "Hennepin", "county_code"].iloc[0] == 25


def test_radon_values(radon):
    assert radon["log_radon"].sum() == pytest.approx(1125.4282260717373, abs=1e-6)
    assert radon["log_radon"].mean() == pytest.approx(1.2246226616667435, abs=1e-6)
    assert int((radon["floor"] == 1).sum()) == 153
    assert set(radon["floor"].unique()) == {0, 1}
    assert (radon["activity"] > 0).all()
    # Three zero activities are set to 0.1; one reading was 0.1 already.
    assert int((radon["activity"] == 0.1).sum()) == 4
    np.testing.assert_allclose(radon["log_radon"], np.log(radon["activity"]))


def test_radon_first_rows(radon):
    head = radon.head(3)
    assert list(head["idnum"]) == [5081, 5082, 5083]
    assert list(head["county"].astype(str)) == ["Aitkin"] * 3
    assert list(head["floor"]) == [1, 0, 0]
    np.testing.assert_allclose(head["activity"], [2.2, 2.2, 2.9])
    np.testing.assert_allclose(
        head["log_radon"], [0.7884573603642703, 0.7884573603642703, 1.0647107369924282]
    )


def test_radon_uranium(radon):
    assert radon["uranium"].notna().all()
    assert radon["uranium"].mean() == pytest.approx(0.9339116202393904, abs=1e-9)
    np.testing.assert_allclose(radon["log_uranium"], np.log(radon["uranium"]))
    aitkin = radon.loc[radon["county"] == "Aitkin", "uranium"]
    np.testing.assert_allclose(aitkin, 0.502054)
    # One uranium value per county.
    assert (radon.groupby("county", observed=True)["uranium"].nunique() == 1).all()


def test_radon_matches_reference(radon):
    ref = pd.read_csv(_REFERENCE_RADON)
    assert len(ref) == len(radon)
    np.testing.assert_allclose(radon["log_radon"], ref["log_radon"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(radon["floor"].to_numpy(), ref["floor"].to_numpy())
    np.testing.assert_array_equal(
        radon["county"].astype(str).to_numpy(), ref["county"].astype(str).to_numpy()
    )


def test_radon_other_state():
    az = datasets.load_radon("AZ")
    assert len(az) == 1507
    assert (az["state"] == "AZ").all()
    # R5 has counties without a uranium entry: kept, with NaN.
    r5 = datasets.load_radon("R5")
    assert len(r5) == 934
    assert int(r5["uranium"].isna().sum()) == 204
    assert r5["log_uranium"].isna().sum() == 204


def test_radon_returns_fresh_copy(radon):
    a = datasets.load_radon()
    a.loc[0, "log_radon"] = 99.0
    assert datasets.load_radon().loc[0, "log_radon"] != 99.0


def test_radon_unknown_state():
    with pytest.raises(ValueError, match="MN") as err:
        datasets.load_radon("XX")
    assert "AZ" in str(err.value) and "XX" in str(err.value)


# ---------------------------------------------------------------- sleepstudy
def test_sleepstudy():
    df = datasets.load_sleepstudy()
    assert df.shape == (180, 3)
    assert df["Reaction"].dtype == np.float64
    assert df["Days"].dtype == np.int64
    _assert_categorical(df["Subject"], n_levels=18)
    assert list(df["Subject"].cat.categories[:3]) == ["308", "309", "310"]
    assert sorted(df["Days"].unique()) == list(range(10))
    assert (df["Subject"].value_counts() == 10).all()
    assert df["Reaction"].sum() == pytest.approx(53731.4205, abs=1e-6)
    assert df.loc[0, "Reaction"] == pytest.approx(249.56)


# ---------------------------------------------------------------------- cbpp
def test_cbpp():
    df = datasets.load_cbpp()
    assert df.shape == (56, 4)
    _assert_categorical(df["herd"], levels=[str(i) for i in range(1, 16)])
    _assert_categorical(df["period"], levels=["1", "2", "3", "4"])
    assert df["incidence"].dtype == np.int64
    assert df["size"].dtype == np.int64
    assert df["incidence"].sum() == 99
    assert df["size"].sum() == 842
    assert (df["incidence"] <= df["size"]).all()


# ---------------------------------------------------------------- penicillin
def test_penicillin():
    df = datasets.load_penicillin()
    assert df.shape == (144, 3)
    _assert_categorical(df["plate"], levels=list("abcdefghijklmnopqrstuvwx"))
    _assert_categorical(df["sample"], levels=list("ABCDEF"))
    assert df["diameter"].dtype == np.int64
    assert df["diameter"].sum() == 3308
    # Fully crossed: each plate x sample once.
    assert (pd.crosstab(df["plate"], df["sample"]) == 1).all().all()


# --------------------------------------------------------------- grouseticks
def test_grouseticks():
    df = datasets.load_grouseticks()
    assert df.shape[0] == 403
    _assert_categorical(df["BROOD"], n_levels=118)
    _assert_categorical(df["LOCATION"], n_levels=63)
    _assert_categorical(df["YEAR"], levels=["95", "96", "97"])
    assert list(df["LOCATION"].cat.categories[:3]) == ["1", "2", "3"]
    assert df["TICKS"].dtype == np.int64
    assert df["TICKS"].sum() == 2567
    for col in ("HEIGHT", "HEIGHTs", "cHEIGHT"):
        assert df[col].dtype == np.float64, col
    assert df["HEIGHT"].mean() == pytest.approx(462.2406947890819, abs=1e-9)


# ------------------------------------------------------------------ insteval
def test_insteval(insteval):
    df = insteval
    assert df.shape == (73421, 7)
    _assert_categorical(df["s"], n_levels=2972)
    _assert_categorical(df["d"], n_levels=1128)
    _assert_categorical(df["dept"], n_levels=14)
    _assert_categorical(df["studage"], levels=["2", "4", "6", "8"])
    _assert_categorical(df["lectage"], levels=["1", "2", "3", "4", "5", "6"])
    _assert_categorical(df["service"], levels=["0", "1"])
    assert df["y"].dtype == np.int64
    assert set(df["y"].unique()) == {1, 2, 3, 4, 5}
    assert df["y"].sum() == 235369
    assert df["service"].value_counts()["1"] == 31783


def test_insteval_numeric_level_order(insteval):
    for col in ("s", "d", "dept"):
        levels = [int(c) for c in insteval[col].cat.categories]
        assert levels == sorted(levels), col
    assert insteval["d"].cat.categories[-1] == "2160"


# ------------------------------------------------ further lme4 reference cases
# Row counts and numbers of groups are those of the cases' notes in
# shared/reference/lme4_reference_more.json (lme4 1.1-31's ngrps()).
def _assert_dtypes(df, ints=(), floats=()):
    for col in ints:
        assert df[col].dtype == np.int64, col
    for col in floats:
        assert df[col].dtype == np.float64, col


def test_dyestuff():
    df = datasets.load_dyestuff()
    assert df.shape == (30, 2)
    _assert_categorical(df["Batch"], levels=list("ABCDEF"))
    _assert_dtypes(df, floats=["Yield"])
    assert (df["Batch"].value_counts() == 5).all()
    assert df["Yield"].mean() == pytest.approx(1527.5)


def test_dyestuff2():
    df = datasets.load_dyestuff2()
    assert df.shape == (30, 2)
    _assert_categorical(df["Batch"], levels=list("ABCDEF"))
    _assert_dtypes(df, floats=["Yield"])
    assert df["Yield"].mean() == pytest.approx(5.6656)


def test_pastes():
    df = datasets.load_pastes()
    assert df.shape == (60, 4)
    _assert_dtypes(df, floats=["strength"])
    _assert_categorical(df["batch"], levels=list("ABCDEFGHIJ"))
    _assert_categorical(df["cask"], levels=["a", "b", "c"])
    _assert_categorical(df["sample"], n_levels=30)
    # sample is batch:cask.
    joined = df["batch"].astype(str) + ":" + df["cask"].astype(str)
    assert (joined == df["sample"].astype(str)).all()
    assert df["strength"].mean() == pytest.approx(60.0533333333)


def test_oxboys():
    df = datasets.load_oxboys()
    assert df.shape == (234, 4)
    _assert_categorical(df["Subject"], levels=[str(i) for i in range(1, 27)])
    _assert_categorical(df["Occasion"], levels=[str(i) for i in range(1, 10)])
    _assert_dtypes(df, floats=["age", "height"])
    assert (df["Subject"].value_counts() == 9).all()


def test_gcsemv_keeps_rows_with_missing_values():
    df = datasets.load_gcsemv()
    assert df.shape == (1905, 5)
    _assert_categorical(df["school"], n_levels=73)
    _assert_categorical(df["student"], n_levels=649)
    _assert_categorical(df["gender"], levels=["F", "M"])
    _assert_dtypes(df, floats=["written", "course"])
    assert int(df["course"].isna().sum()) == 180
    assert int(df["written"].isna().sum()) == 202
    # lme4's na.omit leaves 1,725 rows for a model of course, in all 73 schools.
    complete = df[df["course"].notna()]
    assert len(complete) == 1725
    assert complete["school"].nunique() == 73


def test_scotssec():
    df = datasets.load_scotssec()
    assert df.shape == (3435, 6)
    _assert_categorical(df["primary"], n_levels=148)
    _assert_categorical(df["second"], n_levels=19)
    # R's level order: reference M.
    _assert_categorical(df["sex"], levels=["M", "F"])
    _assert_dtypes(df, ints=["verbal", "attain", "social"])


def test_egsingle():
    df = datasets.load_egsingle()
    assert df.shape == (7230, 12)
    _assert_categorical(df["childid"], n_levels=1721)
    _assert_categorical(df["schoolid"], n_levels=60)
    for col in ("retained", "black", "hispanic"):
        _assert_categorical(df[col], levels=["0", "1"])
    _assert_categorical(df["female"], levels=["Female", "Male"])
    _assert_dtypes(df, ints=["grade", "size"], floats=["year", "math", "lowinc", "mobility"])
    # Children are nested in schools.
    assert (df.groupby("childid", observed=True)["schoolid"].nunique() == 1).all()
    assert sorted(df["year"].unique()) == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]


def test_star():
    df = datasets.load_star()
    assert df.shape == (24578, 12)
    _assert_categorical(df["id"], n_levels=10732)
    _assert_categorical(df["sch"], n_levels=80)
    _assert_categorical(df["tch"], n_levels=1374)
    _assert_categorical(df["gr"], levels=["K", "1", "2", "3"])
    _assert_categorical(df["sx"], levels=["M", "F"])
    _assert_categorical(df["eth"], levels=["W", "B", "A", "H", "I", "O"])
    _assert_categorical(df["cltype"], levels=["small", "reg", "reg+A"])
    _assert_categorical(df["schtype"], levels=["inner", "suburb", "rural", "urban"])
    _assert_dtypes(df, ints=["yrs", "math"], floats=["read"])
    # ses and read keep their missing values (not "nan" levels).
    ses = df["ses"]
    assert isinstance(ses.dtype, pd.CategoricalDtype)
    assert list(ses.cat.categories) == ["F", "N"]
    assert int(ses.isna().sum()) == 596
    assert int(df["read"].isna().sum()) == 432
    assert df["eth"].value_counts().to_dict() == {"W": 16288, "B": 8159, "A": 62, "O": 35, "H": 26, "I": 8}
    assert df["gr"].value_counts()["K"] == 5870


def test_bacteria():
    df = datasets.load_bacteria()
    assert df.shape == (220, 8)
    _assert_categorical(df["ID"], n_levels=50)
    _assert_categorical(df["y"], levels=["n", "y"])
    _assert_categorical(df["trt"], levels=["placebo", "drug", "drug+"])
    _assert_categorical(df["ap"], levels=["a", "p"])
    _assert_categorical(df["hilo"], levels=["hi", "lo"])
    _assert_dtypes(df, ints=["week", "yn", "week2"])
    np.testing.assert_array_equal(df["yn"], (df["y"] == "y").astype(int))
    np.testing.assert_array_equal(df["week2"], (df["week"] > 2).astype(int))


def test_cbpp_olre():
    df = datasets.load_cbpp_olre()
    assert df.shape == (56, 5)
    _assert_categorical(df["herd"], n_levels=15)
    _assert_categorical(df["obs"], levels=[str(i) for i in range(1, 57)])
    _assert_categorical(df["period"], levels=["1", "2", "3", "4"])
    _assert_dtypes(df, ints=["incidence", "size"])
    cbpp = datasets.load_cbpp()
    pd.testing.assert_frame_equal(df.drop(columns="obs"), cbpp)


def test_guimmun():
    df = datasets.load_guimmun()
    assert df.shape == (2159, 14)
    _assert_categorical(df["kid"], n_levels=2159)
    _assert_categorical(df["mom"], n_levels=1595)
    _assert_categorical(df["comm"], n_levels=161)
    _assert_categorical(df["ord"], levels=["01", "23", "46", "7p"])
    _assert_categorical(df["husEd"], levels=["N", "P", "S", "U"])
    for col in ("immun", "kid2p", "mom25p", "momWork", "rural"):
        _assert_categorical(df[col], levels=["N", "Y"])
    _assert_dtypes(df, ints=["immun01"], floats=["pcInd81"])
    np.testing.assert_array_equal(df["immun01"], (df["immun"] == "Y").astype(int))
    # Mothers are nested in communities.
    assert (df.groupby("mom", observed=True)["comm"].nunique() == 1).all()


def test_fatalities():
    df = datasets.load_fatalities()
    assert df.shape == (336, 7)
    _assert_categorical(df["state"], n_levels=48)
    _assert_dtypes(df, ints=["year", "fatal", "yr"], floats=["pop", "beertax", "unemp"])
    np.testing.assert_array_equal(df["yr"], df["year"] - 1985)
    assert (df["state"].value_counts() == 7).all()


def test_salamanders():
    df = datasets.load_salamanders()
    assert df.shape == (644, 9) and "load_salamanders" in datasets.__all__
    _assert_categorical(df["site"], n_levels=23)
    assert list(df["site"].cat.categories[:2]) == ["R-1", "R-2"] and df["site"].cat.categories[-1] == "VF-11"
    _assert_categorical(df["mined"], levels=["yes", "no"])  # R's order: glmmTMB's `minedno`
    _assert_categorical(df["spp"], levels=["GP", "PR", "DM", "EC-A", "EC-L", "DES-L", "DF"])
    assert df["count"].dtype == np.int64 and int(df["count"].sum()) == 852 and int((df["count"] == 0).sum()) == 387
    # The same rows as the glmmTMB reference cases' copy (tests/data/salamanders.csv).
    reference = pd.read_csv(pathlib.Path(__file__).parent / "data" / "salamanders.csv")
    for column in reference.columns:
        if reference[column].dtype == object:
            assert (df[column].astype(str) == reference[column]).all(), column
        else:
            np.testing.assert_array_equal(df[column].to_numpy(), reference[column].to_numpy())
    from keras_glmm.design import Design

    design = Design.from_data("count ~ spp + mined + (1|site)", df, family_name="poisson")
    assert design.fixed_columns[-1] == "minedno" and design.fixed_columns[1] == "sppPR"


@pytest.mark.parametrize(
    "loader, formula, family, n_fixed, groups",
    [
        ("load_dyestuff", "Yield ~ 1 + (1|Batch)", "gaussian", 1, {"Batch": 6}),
        ("load_pastes", "strength ~ 1 + (1|batch/cask)", "gaussian", 1, {"batch": 10, "cask:batch": 30}),
        ("load_oxboys", "height ~ age + I(age**2) + (age|Subject)", "gaussian", 3, {"Subject": 26}),
        ("load_egsingle", "math ~ year + (year|childid) + (year|schoolid)", "gaussian", 2,
         {"childid": 1721, "schoolid": 60}),
        ("load_scotssec", "attain ~ C(sex, levels=['M','F']) + verbal + (1|primary) + (1|second)",
         "gaussian", 3, {"primary": 148, "second": 19}),
        ("load_star", "math ~ C(gr, levels=['K','1','2','3']) + C(sx, levels=['M','F']) "
         "+ C(eth, levels=['W','B','A','H','I','O']) + C(cltype, levels=['small','reg','reg+A']) "
         "+ (1|id) + (1|sch)", "gaussian", 12, {"id": 10732, "sch": 80}),
        ("load_guimmun", "immun01 ~ kid2p + mom25p + ord + ethn + momEd + husEd + momWork + rural "
         "+ pcInd81 + (1|mom) + (1|comm)", "binomial", 16, {"mom": 1595, "comm": 161}),
        ("load_bacteria", "yn ~ C(trt, levels=['placebo','drug','drug+']) + week2 + (1|ID)",
         "binomial", 4, {"ID": 50}),
        ("load_cbpp_olre", "cbind(incidence, size - incidence) ~ C(period) + (1|herd) + (1|obs)",
         "binomial", 4, {"herd": 15, "obs": 56}),
        ("load_fatalities", "fatal ~ yr + (yr|state)", "poisson", 2, {"state": 48}),
    ],
)
def test_reference_formulas_build_a_design(loader, formula, family, n_fixed, groups):
    """Each case's formula (lme4_reference_more.json) works on the loaded frame."""
    from keras_glmm.design import Design

    df = getattr(datasets, loader)()
    design = Design.from_data(formula, df, family_name=family)
    assert len(design.fixed_columns) == n_fixed
    found = {r.term.group: r.n_levels for r in design.random}
    assert found == groups
