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
    "load_bacteria",
    "load_cbpp",
    "load_cbpp_olre",
    "load_dyestuff",
    "load_dyestuff2",
    "load_egsingle",
    "load_fatalities",
    "load_gcsemv",
    "load_grouseticks",
    "load_guimmun",
    "load_guprenat",
    "load_insteval",
    "load_kb07",
    "load_oxboys",
    "load_pastes",
    "load_penicillin",
    "load_radon",
    "load_salamanders",
    "load_scotssec",
    "load_sleepstudy",
    "load_star",
    "load_wine",
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
        A :class:`pandas.Categorical` whose categories are strings; missing
        values stay missing (they do not become a ``"nan"`` level).
    """
    raw = pd.Series(values)
    strings = raw.astype(str).str.strip().where(raw.notna())
    if categories is None:
        categories = sorted(strings.dropna().unique(), key=_natural_key)
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


# ----------------------------------------------------------------------------
# The data of the further lme4 reference cases (lme4, nlme, mlmRev, MASS, AER).
# Each CSV was written from its R package by ``write.csv`` (factor labels as
# strings, helper columns precomputed); the loaders restore R's factor level
# order where it is not the natural one, so that formulas without ``C()``
# give R's reference levels.


def load_dyestuff() -> pd.DataFrame:
    """Loads ``Dyestuff`` from lme4.

    Yield of dyestuff (grams of standard colour) in 6 batches of an
    intermediate product, 5 preparations each (Davies, 1947): 30 rows.

    Returns:
        A DataFrame with columns ``Batch`` (category, ``"A"``..``"F"``) and
        ``Yield`` (float).
    """
    df = _read_csv("dyestuff.csv")
    return pd.DataFrame(
        {"Batch": _categorical(df["Batch"]), "Yield": df["Yield"].astype(np.float64)}
    )


def load_dyestuff2() -> pd.DataFrame:
    """Loads ``Dyestuff2`` from lme4: simulated data whose ML batch sd is 0.

    The same layout as :func:`load_dyestuff` (30 rows, 6 batches); lme4's
    ML fit of ``Yield ~ 1 + (1|Batch)`` is singular (the batch standard
    deviation is exactly 0).

    Returns:
        A DataFrame with columns ``Batch`` (category, ``"A"``..``"F"``) and
        ``Yield`` (float).
    """
    df = _read_csv("dyestuff2_singular.csv")
    return pd.DataFrame(
        {"Batch": _categorical(df["Batch"]), "Yield": df["Yield"].astype(np.float64)}
    )


def load_pastes() -> pd.DataFrame:
    """Loads ``Pastes`` from lme4: casks nested in batches.

    Strength of a chemical paste from 3 casks in each of 10 delivery
    batches, 2 assays per cask: 60 rows.

    Returns:
        A DataFrame with columns ``strength`` (float), ``batch`` (category,
        ``"A"``..``"J"``), ``cask`` (category, ``"a"``, ``"b"``, ``"c"``:
        labels reused across batches) and ``sample`` (category, the 30
        ``batch:cask`` combinations such as ``"A:a"``).
    """
    df = _read_csv("pastes_nested.csv")
    return pd.DataFrame(
        {
            "strength": df["strength"].astype(np.float64),
            "batch": _categorical(df["batch"]),
            "cask": _categorical(df["cask"]),
            "sample": _categorical(df["sample"]),
        }
    )


def load_oxboys() -> pd.DataFrame:
    """Loads ``Oxboys`` from nlme: heights of 26 boys on 9 occasions.

    234 rows (Goldstein, 1987).

    Returns:
        A DataFrame with columns ``Subject`` (category, ``"1"``..``"26"``),
        ``age`` (float, centred age in years), ``height`` (float, cm) and
        ``Occasion`` (category, ``"1"``..``"9"``).
    """
    df = _read_csv("oxboys.csv")
    return pd.DataFrame(
        {
            "Subject": _categorical(df["Subject"]),
            "age": df["age"].astype(np.float64),
            "height": df["height"].astype(np.float64),
            "Occasion": _categorical(df["Occasion"]),
        }
    )


def load_gcsemv() -> pd.DataFrame:
    """Loads ``Gcsemv`` from mlmRev: GCSE science coursework by school.

    1,905 students (649 student ids, numbered within school) in 73 schools;
    every row is kept, including the 180 with a missing ``course`` score and
    the 202 with a missing ``written`` score (fit with ``na_action="omit"``,
    as lme4's ``na.omit`` does: 1,725 rows for a model of ``course``).

    Returns:
        A DataFrame with columns ``school``, ``student`` (categories, levels
        sorted numerically), ``gender`` (category, ``"F"``, ``"M"``: R's
        order), ``written`` and ``course`` (float scores, ``NaN`` where
        missing).
    """
    df = _read_csv("gcsemv_factor_slope.csv")
    return pd.DataFrame(
        {
            "school": _categorical(df["school"]),
            "student": _categorical(df["student"]),
            "gender": _categorical(df["gender"], categories=["F", "M"]),
            "written": df["written"].astype(np.float64),
            "course": df["course"].astype(np.float64),
        }
    )


def load_scotssec() -> pd.DataFrame:
    """Loads ``ScotsSec`` from mlmRev: Scottish secondary school attainment.

    3,435 pupils from 148 primary schools crossed with 19 secondary schools
    (Paterson, 1991).

    Returns:
        A DataFrame with columns ``verbal`` (int, verbal reasoning score
        before secondary school), ``attain`` (int, attainment 1-10),
        ``primary`` (category), ``sex`` (category with levels ``"M"``,
        ``"F"``: R's order, reference M), ``social`` (int, social class
        code) and ``second`` (category).
    """
    df = _read_csv("scotssec_crossed.csv")
    return pd.DataFrame(
        {
            "verbal": df["verbal"].astype(np.int64),
            "attain": df["attain"].astype(np.int64),
            "primary": _categorical(df["primary"]),
            "sex": _categorical(df["sex"], categories=["M", "F"]),
            "social": df["social"].astype(np.int64),
            "second": _categorical(df["second"]),
        }
    )


def load_egsingle() -> pd.DataFrame:
    """Loads ``egsingle`` from mlmRev: US elementary school math scores.

    7,230 yearly math scores of 1,721 children nested in 60 schools (Chicago
    public schools, grades 1-6).

    Returns:
        A DataFrame with columns ``schoolid`` and ``childid`` (categories,
        levels sorted numerically), ``year`` (float, centred school year),
        ``grade`` (int), ``math`` (float, IRT score), ``retained`` (category
        ``"0"``, ``"1"``), ``female`` (category ``"Female"``, ``"Male"``),
        ``black`` and ``hispanic`` (categories ``"0"``, ``"1"``), ``size``
        (int, school size), ``lowinc`` and ``mobility`` (float, school
        percentages).
    """
    df = _read_csv("egsingle.csv.gz")
    return pd.DataFrame(
        {
            "schoolid": _categorical(df["schoolid"]),
            "childid": _categorical(df["childid"]),
            "year": df["year"].astype(np.float64),
            "grade": df["grade"].astype(np.int64),
            "math": df["math"].astype(np.float64),
            "retained": _categorical(df["retained"], categories=["0", "1"]),
            "female": _categorical(df["female"], categories=["Female", "Male"]),
            "black": _categorical(df["black"], categories=["0", "1"]),
            "hispanic": _categorical(df["hispanic"], categories=["0", "1"]),
            "size": df["size"].astype(np.int64),
            "lowinc": df["lowinc"].astype(np.float64),
            "mobility": df["mobility"].astype(np.float64),
        }
    )


def load_star() -> pd.DataFrame:
    """Loads ``star`` from mlmRev: the Tennessee STAR class-size experiment.

    24,578 yearly math scores of 10,732 students in 80 schools: the rows of
    mlmRev's 26,796 with ``math``, ``gr``, ``sx``, ``eth``, ``cltype``,
    ``id`` and ``sch`` all present. ``ses`` (596) and ``read`` (432) still
    have missing values.

    Returns:
        A DataFrame with columns ``id``, ``sch``, ``tch`` (categories:
        student, school, teacher), ``gr`` (category, grade ``"K"``, ``"1"``,
        ``"2"``, ``"3"``; unordered here, ordered in mlmRev), ``cltype``
        (category ``"small"``, ``"reg"``, ``"reg+A"``), ``sx`` (category
        ``"M"``, ``"F"``), ``eth`` (category ``"W"``, ``"B"``, ``"A"``,
        ``"H"``, ``"I"``, ``"O"``), ``ses`` (category ``"F"``, ``"N"``:
        free lunch or not; missing in places), ``schtype`` (category
        ``"inner"``, ``"suburb"``, ``"rural"``, ``"urban"``), ``yrs`` (int,
        years in small classes), ``read`` (float, ``NaN`` where missing) and
        ``math`` (int). Factor levels are in R's order.
    """
    df = _read_csv("star.csv.gz")
    return pd.DataFrame(
        {
            "id": _categorical(df["id"]),
            "sch": _categorical(df["sch"]),
            "tch": _categorical(df["tch"]),
            "gr": _categorical(df["gr"], categories=["K", "1", "2", "3"]),
            "cltype": _categorical(df["cltype"], categories=["small", "reg", "reg+A"]),
            "sx": _categorical(df["sx"], categories=["M", "F"]),
            "eth": _categorical(df["eth"], categories=["W", "B", "A", "H", "I", "O"]),
            "ses": _categorical(df["ses"], categories=["F", "N"]),
            "schtype": _categorical(df["schtype"], categories=["inner", "suburb", "rural", "urban"]),
            "yrs": df["yrs"].astype(np.int64),
            "read": df["read"].astype(np.float64),
            "math": df["math"].astype(np.int64),
        }
    )


def load_bacteria() -> pd.DataFrame:
    """Loads ``bacteria`` from MASS: H. influenzae in children with otitis media.

    Presence of the bacteria at weeks 0, 2, 4, 6 and 11 for 50 children in
    three treatment groups: 220 rows.

    Returns:
        A DataFrame with columns ``y`` (category ``"n"``, ``"y"``), ``ap``
        (category ``"a"``, ``"p"``: active or placebo), ``hilo`` (category
        ``"hi"``, ``"lo"``: compliance), ``week`` (int), ``ID`` (category,
        ``"X01"``..``"Z26"``), ``trt`` (category ``"placebo"``, ``"drug"``,
        ``"drug+"``: R's order), ``yn`` (int, 1 where ``y`` is ``"y"``) and
        ``week2`` (int, 1 where ``week > 2``).
    """
    df = _read_csv("bacteria.csv")
    return pd.DataFrame(
        {
            "y": _categorical(df["y"], categories=["n", "y"]),
            "ap": _categorical(df["ap"], categories=["a", "p"]),
            "hilo": _categorical(df["hilo"], categories=["hi", "lo"]),
            "week": df["week"].astype(np.int64),
            "ID": _categorical(df["ID"]),
            "trt": _categorical(df["trt"], categories=["placebo", "drug", "drug+"]),
            "yn": df["yn"].astype(np.int64),
            "week2": df["week2"].astype(np.int64),
        }
    )


def load_cbpp_olre() -> pd.DataFrame:
    """Loads ``cbpp`` from lme4 with an observation-level factor.

    :func:`load_cbpp` plus ``obs``, the row number ``"1"``..``"56"`` as a
    category, for an observation-level random effect ``(1|obs)``.

    Returns:
        A DataFrame with columns ``herd`` (category), ``incidence`` and
        ``size`` (int), ``period`` (category ``"1"``..``"4"``) and ``obs``
        (category).
    """
    df = _read_csv("cbpp_olre.csv")
    return pd.DataFrame(
        {
            "herd": _categorical(df["herd"]),
            "incidence": df["incidence"].astype(np.int64),
            "size": df["size"].astype(np.int64),
            "period": _categorical(df["period"], categories=["1", "2", "3", "4"]),
            "obs": _categorical(df["obs"]),
        }
    )


def load_guimmun() -> pd.DataFrame:
    """Loads ``guImmun`` from mlmRev: child immunization in Guatemala.

    2,159 children of 1,595 mothers in 161 communities (Rodriguez and
    Goldman, 1995).

    Returns:
        A DataFrame with columns ``kid``, ``mom``, ``comm`` (categories,
        levels sorted numerically), ``immun`` (category ``"N"``, ``"Y"``),
        the factors ``kid2p``, ``mom25p``, ``momWork``, ``rural`` (``"N"``,
        ``"Y"``), ``ord`` (``"01"``, ``"23"``, ``"46"``, ``"7p"``), ``ethn``
        (``"L"``, ``"N"``, ``"S"``), ``momEd`` (``"N"``, ``"P"``, ``"S"``),
        ``husEd`` (``"N"``, ``"P"``, ``"S"``, ``"U"``), ``pcInd81`` (float,
        share of indigenous population in 1981) and ``immun01`` (int, 1
        where ``immun`` is ``"Y"``).
    """
    df = _read_csv("guimmun.csv.gz")
    yes_no = ["N", "Y"]
    return pd.DataFrame(
        {
            "kid": _categorical(df["kid"]),
            "mom": _categorical(df["mom"]),
            "comm": _categorical(df["comm"]),
            "immun": _categorical(df["immun"], categories=yes_no),
            "kid2p": _categorical(df["kid2p"], categories=yes_no),
            "mom25p": _categorical(df["mom25p"], categories=yes_no),
            "ord": _categorical(df["ord"], categories=["01", "23", "46", "7p"]),
            "ethn": _categorical(df["ethn"], categories=["L", "N", "S"]),
            "momEd": _categorical(df["momEd"], categories=["N", "P", "S"]),
            "husEd": _categorical(df["husEd"], categories=["N", "P", "S", "U"]),
            "momWork": _categorical(df["momWork"], categories=yes_no),
            "rural": _categorical(df["rural"], categories=yes_no),
            "pcInd81": df["pcInd81"].astype(np.float64),
            "immun01": df["immun01"].astype(np.int64),
        }
    )


def load_guprenat() -> pd.DataFrame:
    """Loads ``guPrenat`` from mlmRev: prenatal care in Guatemala.

    2,449 births of 1,558 mothers (1 to 4 births each) in 161 communities
    (Rodriguez and Goldman, 1995, 2001): whether the mother had modern prenatal
    care. Binary data in very small clusters with a large mothers' sd, where
    Laplace's approximation and a low-order quadrature both miss the exact
    maximum likelihood (see ``tests/test_quadrature_accuracy.py``).

    Returns:
        A DataFrame with columns ``kid``, ``mom``, ``cluster`` (categories,
        levels sorted numerically), ``prenat`` (category ``"Traditional"``,
        ``"Modern"``), ``childAge`` (``"0-2"``, ``"3+"``), ``motherAge``
        (``"24-"``, ``"25+"``), ``birthOrd`` (``"1"``, ``"2-3"``, ``"4-6"``,
        ``"7+"``; ordered in R, unordered here), ``indig`` (``"Ladino"``,
        ``"NoSpa"``, ``"Spanish"``), ``momEd`` (``"None"``, ``"Primary"``,
        ``"Secondary+"``), ``husEd`` (``"None"``, ``"Primary"``,
        ``"Secondary+"``, ``"Unknown"``), ``husEmpl`` (``"Unskilled"``,
        ``"Professional"``, ``"Agri (self)"``, ``"Agri (empl)"``,
        ``"Skilled"``), ``toilet`` (``"None"``, ``"Modern"``), ``TV``
        (``"None"``, ``"not daily"``, ``"daily"``), ``pcInd81`` (float, share
        of indigenous population in 1981), ``ssDist`` (float, distance to the
        nearest clinic) and ``prenat01`` (int, 1 where ``prenat`` is
        ``"Modern"``). The factors keep R's level order (the first is the
        reference level).
    """
    # "None" is a level here, not a missing value (pandas reads it as NaN by default).
    df = _read_csv("guprenat.csv.gz", dtype={"birthOrd": str}, keep_default_na=False, na_values=["NA"])
    levels = {
        "prenat": ["Traditional", "Modern"],
        "childAge": ["0-2", "3+"],
        "motherAge": ["24-", "25+"],
        "birthOrd": ["1", "2-3", "4-6", "7+"],
        "indig": ["Ladino", "NoSpa", "Spanish"],
        "momEd": ["None", "Primary", "Secondary+"],
        "husEd": ["None", "Primary", "Secondary+", "Unknown"],
        "husEmpl": ["Unskilled", "Professional", "Agri (self)", "Agri (empl)", "Skilled"],
        "toilet": ["None", "Modern"],
        "TV": ["None", "not daily", "daily"],
    }
    out = {name: _categorical(df[name]) for name in ("kid", "mom", "cluster")}
    out.update({name: _categorical(df[name], categories=cats) for name, cats in levels.items()})
    out["pcInd81"] = df["pcInd81"].astype(np.float64)
    out["ssDist"] = df["ssDist"].astype(np.float64)
    out["prenat01"] = (df["prenat"] == "Modern").astype(np.int64)
    return pd.DataFrame(out)


def load_fatalities() -> pd.DataFrame:
    """Loads ``Fatalities`` from AER: US traffic deaths, 48 states x 1982-1988.

    336 rows, the columns of the reference case.

    Returns:
        A DataFrame with columns ``state`` (category, ``"al"``..``"wy"``),
        ``year`` (int), ``fatal`` (int, traffic deaths), ``pop`` (float),
        ``beertax`` (float, tax on a case of beer), ``unemp`` (float,
        unemployment rate) and ``yr`` (int, ``year - 1985``).
    """
    df = _read_csv("fatalities_slope.csv")
    return pd.DataFrame(
        {
            "state": _categorical(df["state"]),
            "year": df["year"].astype(np.int64),
            "fatal": df["fatal"].astype(np.int64),
            "pop": df["pop"].astype(np.float64),
            "beertax": df["beertax"].astype(np.float64),
            "unemp": df["unemp"].astype(np.float64),
            "yr": df["yr"].astype(np.int64),
        }
    )


def load_kb07() -> pd.DataFrame:
    """Loads ``kb07`` (Kronmueller & Barr, 2007), as used by MixedModels.jl and lme4's maximal-model studies.

    Response times of 56 subjects to 32 items: 1,790 rows; three two-level
    experimental factors coded -1/+1 (``S`` speaker, ``P`` precedence, ``C``
    cognitive load) and their products, the design of the maximal crossed models
    ``(1 + S + P + C + SP + SC + PC + SPC | subj) + (... | item)``.

    Returns:
        A DataFrame with columns ``subj`` and ``item`` (categories of strings),
        ``RTtrunc`` (float, ms, truncated response time) and ``S``, ``P``, ``C``,
        ``SP``, ``SC``, ``PC``, ``SPC`` (int, -1 or +1).
    """
    df = _read_csv("kb07.csv.gz")
    out = {"subj": _categorical(df["subj"].astype(str)), "item": _categorical(df["item"].astype(str)),
           "RTtrunc": df["RTtrunc"].astype(np.float64)}
    for name in ("S", "P", "C", "SP", "SC", "PC", "SPC"):
        out[name] = df[name].astype(np.int64)
    return pd.DataFrame(out)


def load_wine() -> pd.DataFrame:
    """Loads ``wine`` from the R package ordinal: bitterness of wine, rated by 9 judges.

    72 rows (Randall, 1989): each judge rated 8 bottles, the 2 x 2 factorial of
    temperature and skin contact twice. ``ordinal::clmm``'s example is
    ``rating ~ temp + contact + (1|judge)``, a cumulative link mixed model
    (``kg.glmm(..., family="ordinal")``).

    Returns:
        A DataFrame with columns ``response`` (float, bitterness on a 0-100 scale),
        ``rating`` (ordered category, ``"1"`` < ... < ``"5"``, ``response`` grouped),
        ``temp`` (category, ``"cold"``, ``"warm"``), ``contact`` (category, ``"no"``,
        ``"yes"``), ``bottle`` (category, ``"1"``..``"8"``) and ``judge`` (category,
        ``"1"``..``"9"``).
    """
    df = _read_csv("wine.csv")
    ratings = [str(k) for k in range(1, 6)]
    return pd.DataFrame(
        {
            "response": df["response"].astype(np.float64),
            "rating": pd.Categorical(df["rating"].astype(str), categories=ratings, ordered=True),
            "temp": _categorical(df["temp"]),
            "contact": _categorical(df["contact"]),
            "bottle": _categorical(df["bottle"]),
            "judge": _categorical(df["judge"]),
        }
    )


# glmmTMB's factor levels, in R's order (so that coefficients are named as glmmTMB names
# them: sppPR, ..., minedno).
_SALAMANDER_SITES = [f"R-{i}" for i in range(1, 13)] + [f"VF-{i}" for i in range(1, 12)]
_SALAMANDER_SPECIES = ["GP", "PR", "DM", "EC-A", "EC-L", "DES-L", "DF"]


def load_salamanders() -> pd.DataFrame:
    """Loads ``Salamanders`` from glmmTMB (Price et al., 2016; Brooks et al., 2017).

    Repeated counts of salamanders of seven species or life stages at 23 sites
    in Appalachian streams, some affected by mountaintop-removal coal mining:
    644 rows, many of them zeros (glmmTMB's zero-inflation example,
    ``glmmTMB(count ~ spp + mined + (1|site), ziformula = ~mined, family = poisson)``).
    The file is glmmTMB 1.1.5's data as R writes it
    (``write.csv(glmmTMB::Salamanders, row.names = FALSE)``, gzipped).

    Returns:
        A DataFrame with columns ``site`` (category, R's levels ``"R-1"``..
        ``"R-12"``, ``"VF-1"``..``"VF-11"``), ``mined`` (category, ``"yes"``,
        ``"no"`` in R's order: the coefficient is ``minedno``), ``cover``,
        ``DOP``, ``Wtemp``, ``DOY`` (float, standardized: cover objects, days
        since precipitation, water temperature, day of year), ``sample`` (int,
        1-4, the repeated visit), ``spp`` (category ``"GP"``, ``"PR"``, ``"DM"``,
        ``"EC-A"``, ``"EC-L"``, ``"DES-L"``, ``"DF"``, R's order) and ``count``
        (int).

    References:
        Price, S. J., Muncy, B. L., Bonner, S. J., Drayer, A. N. and Barton, C. D.
        (2016). Effects of mountaintop removal mining and valley filling on the
        occupancy and abundance of stream salamanders. *Journal of Applied
        Ecology* 53, 459-468.

        Brooks, M. E. et al. (2017). glmmTMB balances speed and flexibility among
        packages for zero-inflated generalized linear mixed modeling. *The R
        Journal* 9(2), 378-400.
    """
    df = _read_csv("salamanders.csv.gz")
    return pd.DataFrame(
        {
            "site": _categorical(df["site"], categories=_SALAMANDER_SITES),
            "mined": _categorical(df["mined"], categories=["yes", "no"]),
            "cover": df["cover"].astype(np.float64),
            "sample": df["sample"].astype(np.int64),
            "DOP": df["DOP"].astype(np.float64),
            "Wtemp": df["Wtemp"].astype(np.float64),
            "DOY": df["DOY"].astype(np.float64),
            "spp": _categorical(df["spp"], categories=_SALAMANDER_SPECIES),
            "count": df["count"].astype(np.int64),
        }
    )
