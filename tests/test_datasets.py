"""Tests for keras_glmm.datasets: shapes, dtypes and known facts per data set."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest

from keras_glmm import datasets

_REFERENCE_RADON = pathlib.Path("/work/shared/data/radon.csv")


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


@pytest.mark.skipif(not _REFERENCE_RADON.exists(), reason="reference radon.csv absent")
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
