"""The reference fits the tests compare against: one home for these facts.

`tests/reference/` holds verbatim copies of the project's reference files:

- `lme4_reference.json`, `lme4_reference_more.json`: lme4 1.1-31's fits (R 4.2.2),
  made by `make_reference.R` and `make_reference_more.R` of the shared reference
  folder: estimates, standard errors, `as.data.frame(VarCorr(fit))`, logLik (the
  REML criterion for `reml` cases), glmer's Laplace approximation for GLMMs; each
  case's `formula` (Python syntax), `na_action` and `singular`;
- `lme4_reference_maximal.json` (made by `make_reference_maximal.R`): kb07's
  maximal, zero-correlation and final crossed models, lme4's best of bobyqa and
  nloptwrap;
- `exact_ml.json`: the exact maximum-likelihood fits of the binomial and Poisson
  cases by adaptive Gauss-Hermite quadrature converged in the number of nodes, with
  lme4's Laplace answer beside them;
- `glmmtmb_reference.json` (made by `make_reference_glmmtmb.R`): glmmTMB fits of
  families lme4 lacks;
- `weights_reference.json` (made by `make_reference_weights.R`): lme4 fits with
  prior weights (gaussian precisions; Poisson likelihood weights at nAGQ = 25).

Each case's data set is bundled with the package (`keras_glmm.datasets`).
"""

import json
import pathlib

import numpy as np

import keras_glmm as kg

FOLDER = pathlib.Path(__file__).resolve().parent / "reference"

# The bundled loader of each case's data file.
LOADERS = {
    "radon.csv": kg.datasets.load_radon,
    "sleepstudy.csv": kg.datasets.load_sleepstudy,
    "penicillin.csv": kg.datasets.load_penicillin,
    "insteval.csv": kg.datasets.load_insteval,
    "cbpp.csv": kg.datasets.load_cbpp,
    "grouseticks.csv": kg.datasets.load_grouseticks,
    "dyestuff.csv": kg.datasets.load_dyestuff,
    "dyestuff2_singular.csv": kg.datasets.load_dyestuff2,
    "pastes_nested.csv": kg.datasets.load_pastes,
    "oxboys.csv": kg.datasets.load_oxboys,
    "gcsemv_factor_slope.csv": kg.datasets.load_gcsemv,
    "scotssec_crossed.csv": kg.datasets.load_scotssec,
    "egsingle.csv": kg.datasets.load_egsingle,
    "star.csv": kg.datasets.load_star,
    "bacteria.csv": kg.datasets.load_bacteria,
    "cbpp_olre.csv": kg.datasets.load_cbpp_olre,
    "guimmun.csv": kg.datasets.load_guimmun,
    "fatalities_slope.csv": kg.datasets.load_fatalities,
    "kb07.csv": kg.datasets.load_kb07,
}

def _read(name):
    with open(FOLDER / name) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


# kb07's maximal crossed models (`make_reference_maximal.R`): the `||` and final models
# are gaussian cases like the others; the maximal one, whose sds have flat directions,
# is judged by its logLik and fixed effects (`judge: loglik`), apart from them.
_MAXIMAL = _read("lme4_reference_maximal.json")
LME4 = {**_read("lme4_reference.json"), **_read("lme4_reference_more.json"),
        **{k: v for k, v in _MAXIMAL.items() if k != "kb07_max"}}
MAXIMAL = {"kb07_max": _MAXIMAL["kb07_max"]}
EXACT_ML = _read("exact_ml.json")
WEIGHTS = _read("weights_reference.json")


# TFP's GLMM tutorial, its published VI estimates (3000 noisy Adam steps, sigma fixed at 1).
TUTORIAL = {"intercept": 1.4353, "floor": -0.6702, "county_scale": 0.2873}


def named(name):
    """A gaussian or GLMM case's estimates by the package's names: `{"(Intercept)": ...,
    "Days": ..., "Subject.(Intercept)": ..., "Subject.corr": ..., "Residual": ..., "logLik": ...}`."""
    case = LME4[name]
    out = dict(case["fixef"])
    for (grp, var1, var2), value in sdcor(case).items():
        key = "Residual" if grp == "Residual" else (f"{grp}.corr" if var2 else f"{grp}.{var1}")
        out[key] = value
    out["logLik"] = case["logLik"]
    return out


def radon_estimates():
    """lme4's radon ML fit under the names of the distribution tests' workers."""
    radon = named("radon")
    return {"intercept": radon["(Intercept)"], "floor": radon["floor"],
            "county_sd": radon["county.(Intercept)"], "residual_sd": radon["Residual"]}


def cases(families=None):
    """Names of the lme4 cases, optionally of the given families only."""
    return [name for name, case in LME4.items() if families is None or case["family"] in families]


def data(name):
    """The case's data frame (every row: `na_action` says what lme4 dropped)."""
    return LOADERS[LME4[name]["data"]]()


def fixef(name, reference=None):
    """A case's fixed effects in lme4's column order (the package's too), as an array.

    R and formulaic name some columns differently (R's `service` for a 0/1 column,
    `I(week > 2)TRUE`), so they are compared by position; `reference` may be another
    fit of the same case (`EXACT_ML[name]`, its `laplace`), read by lme4's names.
    """
    names = list(LME4[name]["fixef"])
    values = (reference or LME4[name])["fixef"]
    return np.array([values[n] for n in names])


def se(name, reference=None):
    names = list(LME4[name]["se"])
    values = (reference or LME4[name])
    values = values.get("se") or values.get("se_fixef")
    return np.array([values[n] for n in names])


def sdcor(reference):
    """`{(grp, var1, var2): sdcor}` of a reference's varcorr rows."""
    return {(row["grp"], row["var1"], row.get("var2")): row["sdcor"] for row in reference["varcorr"]}


def fitted_sdcor(fit):
    """The same keys for a fitted model's `varcorr()`."""
    out = {}
    for _, row in fit.varcorr().iterrows():
        var1 = row["var1"] if isinstance(row["var1"], str) else None
        var2 = row["var2"] if isinstance(row["var2"], str) else None
        out[(row["grp"], var1, var2)] = float(row["sdcor"])
    return out


def is_correlation(key):
    return key[2] is not None
