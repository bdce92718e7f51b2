"""Loaders for the data sets bundled with :mod:`keras_glmm.datasets`.

Every loader reads a file shipped inside the package (through
:mod:`importlib.resources`, so it works from an installed wheel as well as
from a source checkout) and returns a fresh :class:`pandas.DataFrame` with
tidy dtypes: grouping columns are unordered pandas categoricals whose levels
are strings, ordered naturally (levels that look like numbers are sorted
numerically, others lexicographically); counts are ``int64`` and measurements
``float64``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "load_cbpp",
    "load_grouseticks",
    "load_insteval",
    "load_penicillin",
    "load_radon",
    "load_sleepstudy",
]

_DATA_PACKAGE = "keras_glmm.datasets"


def _read_bytes(name: str) -> bytes:
    """Returns the raw bytes of a bundled data file.

    Args:
        name: File name inside ``keras_glmm/datasets/data``.

    Returns:
        The file contents; gzip-compressed files (``*.gz``) are decompressed.
    """
    resource = importlib.resources.files(_DATA_PACKAGE).joinpath("data", name)
    raw = resource.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw


def _read_csv(name: str, **kwargs) -> pd.DataFrame:
    """Reads a bundled CSV file into a DataFrame.

    Args:
        name: File name inside ``keras_glmm/datasets/data``.
        **kwargs: Passed on to :func:`pandas.read_csv`.

    Returns:
        The parsed DataFrame.
    """
    return pd.read_csv(io.BytesIO(_read_bytes(name)), **kwargs)


def _natural_key(level: str):
    """Sort key that orders numeric-looking strings numerically, first."""
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def _categorical(values: Iterable, categories: Iterable[str] | None = None) -> pd.Categorical:
    """Builds an unordered categorical of strings with natural level order.

    Args:
        values: The raw values (any type; converted to stripped strings).
        categories: Explicit level order. When ``None`` the observed levels
            are used, numeric-looking ones sorted numerically.

    Returns:
        A :class:`pandas.Categorical` whose categories are strings.
    """
    strings = pd.Series(values).astype(str).str.strip()
    if categories is None:
        categories = sorted(strings.unique(), key=_natural_key)
    return pd.Categorical(strings, categories=list(categories), ordered=False)


@functools.lru_cache(maxsize=1)
def _srrs2() -> pd.DataFrame:
    """Parses ``srrs2.dat`` (all states) once; callers must copy."""
    df = _read_csv("srrs2.dat", skipinitialspace=True, dtype={"county": str})
    df.columns = df.columns.str.strip()
    for col in ("state", "state2", "county"):
        df[col] = df[col].astype(str).str.strip()
    return df


@functools.lru_cache(maxsize=1)
def _county_uranium() -> pd.DataFrame:
    """County uranium from ``cty.dat``, one row per (stfips, ctfips).

    The file lists some counties several times (with identical ``Uppm``);
    like Gelman & Hill's R code (``match``), the first entry is kept.
    """
    cty = _read_csv("cty.dat", skipinitialspace=True)
    cty = cty.drop_duplicates(["stfips", "ctfips"], keep="first")
    return cty[["stfips", "ctfips", "Uppm"]].reset_index(drop=True)


def load_radon(state: str = "MN") -> pd.DataFrame:
    """Loads the EPA radon survey for one state (Gelman & Hill, 2007).

    Reproduces the preprocessing of the TensorFlow Probability tutorial
    "Fitting Generalized Linear Mixed-effects Models Using Variational
    Inference": the rows of ``state`` are kept, activities ``<= 0`` are
    replaced by 0.1 before taking ``log_radon = log(activity)``, and county
    names are stripped and title-cased (``"AITKIN  "`` -> ``"Aitkin"``). The
    county uranium concentration from ``cty.dat`` is joined on
    ``(stfips, cntyfips)``; counties without an entry get ``NaN``.

    Args:
        state: Two-letter state code as it appears in ``srrs2.dat`` (one of
            ``AZ``, ``IN``, ``MA``, ``MN``, ``MO``, ``ND``, ``PA``, ``R5``).
            For Minnesota (the default) the result has 919 rows and 85
            counties.

    Returns:
        A DataFrame with one row per house and columns

        * ``idnum`` (int): survey record id.
        * ``state`` (str): the state code.
        * ``county`` (category): county name, levels sorted alphabetically.
        * ``county_code`` (int): the category code of ``county`` (0-based).
        * ``floor`` (int): 0 = basement, 1 = first floor.
        * ``activity`` (float): radon activity (pCi/L), zeros set to 0.1.
        * ``log_radon`` (float): ``log(activity)``.
        * ``uranium`` (float): county soil uranium (ppm), ``NaN`` if unknown.
        * ``log_uranium`` (float): ``log(uranium)``; ``NaN`` where uranium
          is unknown, ``-inf`` where ``cty.dat`` records 0 ppm (a few
          counties in AZ and MA; none in MN).

    Raises:
        ValueError: If ``state`` does not occur in the survey.
    """
    srrs2 = _srrs2()
    valid = sorted(srrs2["state"].unique())
    state_code = str(state).strip()
    if state_code not in valid:
        raise ValueError(
            f"Unknown state {state!r}; valid state codes are: {', '.join(valid)}."
        )
    df = srrs2[srrs2["state"] == state_code].copy()
    df = df.merge(
        _county_uranium(),
        how="left",
        left_on=["stfips", "cntyfips"],
        right_on=["stfips", "ctfips"],
        validate="many_to_one",
    )
    activity = df["activity"].astype(np.float64)
    activity = activity.where(activity > 0, 0.1)
    uranium = df["Uppm"].astype(np.float64)
    county = df["county"].str.title()
    out = pd.DataFrame(
        {
            "idnum": df["idnum"].astype(np.int64),
            "state": df["state"].astype(str),
            "county": pd.Categorical(county),
            "floor": df["floor"].astype(np.int64),
            "activity": activity,
            "log_radon": np.log(activity),
            "uranium": uranium,
        }
    )
    out.insert(3, "county_code", out["county"].cat.codes.astype(np.int64))
    with np.errstate(divide="ignore"):
        out["log_uranium"] = np.log(uranium)
    return out.reset_index(drop=True)


def load_sleepstudy() -> pd.DataFrame:
    """Loads ``sleepstudy`` from the R package lme4.

    Average reaction time per day for 18 subjects over 10 days of sleep
    deprivation (Belenky et al., 2003): 180 rows.

    Returns:
        A DataFrame with columns ``Reaction`` (float, ms), ``Days`` (int,
        0-9) and ``Subject`` (category of strings such as ``"308"``).
    """
    df = _read_csv("sleepstudy.csv")
    return pd.DataFrame(
        {
            "Reaction": df["Reaction"].astype(np.float64),
            "Days": df["Days"].astype(np.int64),
            "Subject": _categorical(df["Subject"]),
        }
    )


def load_cbpp() -> pd.DataFrame:
    """Loads ``cbpp`` (contagious bovine pleuropneumonia) from lme4.

    Serological incidence of CBPP in 15 zebu herds in Ethiopia over four
    periods: 56 rows, binomial ``incidence`` out of ``size``.

    Returns:
        A DataFrame with columns ``herd`` (category, ``"1"``..``"15"``),
        ``incidence`` (int), ``size`` (int) and ``period`` (category with
        levels ``"1"``, ``"2"``, ``"3"``, ``"4"`` in that order).
    """
    df = _read_csv("cbpp.csv")
    return pd.DataFrame(
        {
            "herd": _categorical(df["herd"]),
            "incidence": df["incidence"].astype(np.int64),
            "size": df["size"].astype(np.int64),
            "period": _categorical(df["period"], categories=["1", "2", "3", "4"]),
        }
    )


def load_penicillin() -> pd.DataFrame:
    """Loads ``Penicillin`` from lme4.

    Diameters of the growth-inhibition zone for 6 penicillin samples on 24
    plates, fully crossed: 144 rows.

    Returns:
        A DataFrame with columns ``diameter`` (int, mm), ``plate``
        (category, ``"a"``..``"x"``) and ``sample`` (category,
        ``"A"``..``"F"``).
    """
    df = _read_csv("penicillin.csv")
    return pd.DataFrame(
        {
            "diameter": df["diameter"].astype(np.int64),
            "plate": _categorical(df["plate"]),
            "sample": _categorical(df["sample"]),
        }
    )


def load_grouseticks() -> pd.DataFrame:
    """Loads ``grouseticks`` from lme4.

    Number of ticks on the heads of red grouse chicks, by brood, location
    and year (Elston et al., 2001): 403 rows, 118 broods, 63 locations.

    Returns:
        A DataFrame with columns ``INDEX`` (category, one level per chick,
        for an observation-level random effect), ``TICKS`` (int), ``BROOD``,
        ``LOCATION`` and ``YEAR`` (categories), ``HEIGHT`` (float, altitude in
        m), ``cHEIGHT`` (float, centred height) and ``HEIGHTs`` (float,
        standardized height).
    """
    df = _read_csv("grouseticks.csv")
    return pd.DataFrame(
        {
            "INDEX": _categorical(df["INDEX"]),
            "TICKS": df["TICKS"].astype(np.int64),
            "BROOD": _categorical(df["BROOD"]),
            "HEIGHT": df["HEIGHT"].astype(np.float64),
            "YEAR": _categorical(df["YEAR"]),
            "LOCATION": _categorical(df["LOCATION"]),
            "cHEIGHT": df["cHEIGHT"].astype(np.float64),
            "HEIGHTs": df["HEIGHTs"].astype(np.float64),
        }
    )


def load_insteval() -> pd.DataFrame:
    """Loads ``InstEval`` (ETH Zurich lecture evaluations) from lme4.

    73,421 ratings ``y`` (1-5) of 1,128 lecturers ``d`` by 2,972 students
    ``s`` in 14 departments; students and lecturers are crossed.

    Returns:
        A DataFrame with columns ``s``, ``d``, ``studage``, ``lectage``,
        ``dept`` (categories, levels sorted numerically), ``service``
        (category with levels ``"0"``, ``"1"``: lecture held for another
        department) and ``y`` (int rating).
    """
    df = _read_csv("insteval.csv.gz")
    return pd.DataFrame(
        {
            "s": _categorical(df["s"]),
            "d": _categorical(df["d"]),
            "studage": _categorical(df["studage"]),
            "lectage": _categorical(df["lectage"]),
            "service": _categorical(df["service"], categories=["0", "1"]),
            "dept": _categorical(df["dept"]),
            "y": df["y"].astype(np.int64),
        }
    )
