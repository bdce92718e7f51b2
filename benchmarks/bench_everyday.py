"""Everyday models: keras_glmm, lme4 and GPBoost on every open reference case, in one run.

Part 1, the reference cases: every entry of `tests/reference/lme4_reference.json`,
`tests/reference/lme4_reference_more.json` and `tests/reference/lme4_reference_maximal.json`
(kb07's maximal, `||` and final crossed models; copies of the project's lme4 1.1-31
reference fits), each read from its bundled loader (`kg.datasets.load_*`) and fitted with its
`formula`, `family`, `reml` and `na_action`:

- keras_glmm: the wall time of `kg.glmm(formula, frame, family=..., reml=...,
  na_action=...)` from the data frame, in a fresh child process per fit after
  `import keras_glmm` and one warm-up fit of an unrelated 300-row model of the same
  family (so the process is warm: TensorFlow's start-up is not counted; the model's
  own tracing is). The child's peak resident memory (`ru_maxrss`) is recorded, and the
  peak during the fit above the memory just before it. Fixed effects, `varcorr()` sds and correlations, the ELBO
  (`fit.fit_summary_["elbo"]`) and `converged_` are compared with the reference.
- lme4: one Rscript per case (when R and lme4 are installed: Debian `r-base-core
  r-cran-lme4`), `system.time()` around `lmer(REML = reml)` or `glmer()` on the data
  already read, after a warm-up fit of lme4's own sleepstudy or cbpp, so R's start-up
  is not counted. The formula is the case's `formula_lme4`; guimmun uses
  `glmerControl(optimizer = "bobyqa")` as its reference fit did.
- GPBoost (`pip install -e ".[bench]"`): `gpboost.GPModel` with grouped random
  effects and the same fixed-effects design, timed from the data frame (design arrays
  built by formulaic) to the fitted model, in a child process after warm-up fits.
  `matrix_inversion_method="cholesky"` (exact) unless `--gpboost-inversion default`:
  GPBoost's default uses iterative methods with a stochastic log-determinant for
  several grouping factors, which was slower here and stopped off lme4's optimum.
  GPBoost's random slopes are independent of the intercepts (`group_rand_coef_data`
  + `ind_effect_group_rand_coef`): a model with correlated slopes is fitted without
  the correlations and the table says "uncorrelated"; it has no REML ("ML, not REML").
  A case it cannot fit gets "—" and the reason in the notes.

Part 2, a synthetic series (`synthetic.py`, seed 1): gaussian and binomial, 10k / 100k /
1M rows, nested `y ~ x + (x|g) + (1|h)` (2,000 groups g in 50 groups h) and crossed
`y ~ x + z + (x|user) + (1|item)` (5,000 users x 500 items), keras_glmm, lme4 (up to
`--max-lme4-rows`, default 100k: glmer on 1M rows takes very long) and GPBoost side
by side; then gaussian REML fits of `y ~ x + (1|g)` with 5,000 / 20,000 / 50,000
levels on the same rows, to show the memory's growth with the number of levels.

The table gives per case the times, keras_glmm / lme4, whether keras_glmm took at most
max(1 s, lme4's time), and keras_glmm's agreement with lme4 (largest relative sd error,
largest correlation difference, largest fixed-effect difference in lme4 standard
errors, ELBO - logLik); then the geometric mean of the ratios and the count of cases
within max(1 s, lme4's time). The same goes to `benchmarks/RESULTS.md` unless
`--no-results`.

Usage:
    python benchmarks/bench_everyday.py [--cases sleepstudy,dyestuff,cbpp] [--no-keras]
        [--no-lme4] [--no-gpboost] [--no-synthetic] [--no-results] [--sizes 10000,100000]
        [--max-lme4-rows 100000] [--max-gpboost-rows 1000000] [--levels 5000,20000,50000]
        [--levels-rows 200000] [--gpboost-inversion cholesky] [--timeout 1800] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from _results import append_results, markdown_table  # noqa: E402
from _rscript import run_rscript  # noqa: E402

# The tests' copies of the reference fits: one home for these facts.
REFERENCE_FILES = (HERE.parent / "tests" / "reference" / "lme4_reference.json",
                   HERE.parent / "tests" / "reference" / "lme4_reference_more.json",
                   HERE.parent / "tests" / "reference" / "lme4_reference_maximal.json")

# Reference data file -> bundled loader.
LOADERS = {
    "radon.csv": "load_radon",
    "sleepstudy.csv": "load_sleepstudy",
    "penicillin.csv": "load_penicillin",
    "insteval.csv": "load_insteval",
    "cbpp.csv": "load_cbpp",
    "grouseticks.csv": "load_grouseticks",
    "dyestuff.csv": "load_dyestuff",
    "dyestuff2_singular.csv": "load_dyestuff2",
    "pastes_nested.csv": "load_pastes",
    "egsingle.csv": "load_egsingle",
    "oxboys.csv": "load_oxboys",
    "gcsemv_factor_slope.csv": "load_gcsemv",
    "scotssec_crossed.csv": "load_scotssec",
    "star.csv": "load_star",
    "guimmun.csv": "load_guimmun",
    "bacteria.csv": "load_bacteria",
    "cbpp_olre.csv": "load_cbpp_olre",
    "fatalities_slope.csv": "load_fatalities",
    "kb07.csv": "load_kb07",
}
# glmer controls of the reference fits (the case's notes say why).
LME4_CONTROL = {"guimmun": 'glmerControl(optimizer = "bobyqa")'}

NESTED = "y ~ x + (x|g) + (1|h)"
CROSSED = "y ~ x + z + (x|user) + (1|item)"
LEVELS = "y ~ x + (1|g)"
SEED = 1
FIT_MARK = "--- timed fit ---"


# --------------------------------------------------------------------- models
def reference_cases() -> dict:
    cases = {}
    for path in REFERENCE_FILES:
        with open(path, encoding="utf-8") as fh:
            for name, case in json.load(fh).items():
                if not name.startswith("_"):
                    cases[name] = case
    return cases


def job_model(job: dict) -> tuple[pd.DataFrame, dict]:
    """The data frame and model of a job (a reference case or a synthetic fit).

    Returns:
        `(frame, model)`; model has formula, formula_lme4, family, reml, na_action,
        group_columns (for R: integer-coded grouping columns become factors).
    """
    if "case" in job:
        case = reference_cases()[job["case"]]
        import keras_glmm as kg

        frame = getattr(kg.datasets, LOADERS[case["data"]])()
        model = {
            "formula": case["formula"], "formula_lme4": case["formula_lme4"],
            "family": case["family"], "reml": bool(case.get("reml", False)),
            "na_action": case.get("na_action"), "group_columns": [],
            "lme4_control": LME4_CONTROL.get(job["case"]),
        }
        return frame, model
    kind, family, rows = job["synthetic"], job["family"], job["rows"]
    if kind == "nested":
        frame, _ = synthetic.nested(rows, 2000, 50, family=family, seed=job.get("seed", SEED))
        formula, groups = NESTED, ["g", "h"]
    elif kind == "crossed":
        frame, _ = synthetic.crossed(rows, 5000, 500, family=family, seed=job.get("seed", SEED))
        formula, groups = CROSSED, ["user", "item"]
    elif kind == "levels":
        frame, _ = synthetic.one_factor(rows, job["levels"], family=family, seed=job.get("seed", SEED))
        formula, groups = LEVELS, ["g"]
    else:
        raise ValueError(f"unknown synthetic design {kind!r}")
    model = {
        "formula": formula, "formula_lme4": formula, "family": family,
        "reml": bool(job.get("reml", False)), "na_action": None, "group_columns": groups,
        "lme4_control": None,
    }
    return frame, model


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            m = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024.0 if m else None


class PeakMemory:
    """Peak resident memory of this process during a block, above its memory at the start.

    Linux lets a process reset its peak RSS (`echo 5 > /proc/self/clear_refs`), so the
    peak during the fit is seen even below the peak of the import and warm-up; where
    that is not possible, the growth of `ru_maxrss` (0 when the fit stays below the
    earlier peak).
    """

    def __enter__(self):
        self.lifetime = _maxrss_mib()
        self.start = _status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.reset = self.start is not None
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc):
        hwm = _status_mib("VmHWM") if self.reset else None
        if hwm is not None:
            self.fit_mib = hwm - self.start
            self.peak_mib = max(self.lifetime, hwm)
        else:
            self.peak_mib = _maxrss_mib()
            self.fit_mib = max(0.0, self.peak_mib - self.lifetime)
        return False


# --------------------------------------------------------- keras_glmm (child)
def _warm_frame(family: str) -> pd.DataFrame:
    frame, _ = synthetic.one_factor(300, 20, family="gaussian" if family == "gaussian" else "binomial", seed=0)
    return frame  # 0/1 responses are valid counts for the Poisson warm-up too


def worker_keras(job: dict) -> dict:
    import keras_glmm as kg

    frame, model = job_model(job)
    options = {"family": model["family"]}
    if model["family"] == "gaussian":
        options["reml"] = model["reml"]
    if model["na_action"]:
        options["na_action"] = model["na_action"]
    kg.glmm(LEVELS, _warm_frame(model["family"]), family=model["family"])
    with PeakMemory() as memory:
        start = time.perf_counter()
        fit = kg.glmm(model["formula"], frame, **options)
        seconds = time.perf_counter() - start
    vc = fit.varcorr()
    summary = dict(getattr(fit, "fit_summary_", {}) or {})
    return {
        "seconds": seconds,
        "fixef": [float(v) for v in fit.fixef().values],
        "fixef_names": [str(v) for v in fit.fixef().index],
        "varcorr": [
            {"grp": str(r.grp), "var1": None if pd.isna(r.var1) else str(r.var1),
             "var2": None if pd.isna(r.var2) else str(r.var2), "sdcor": float(r.sdcor)}
            for r in vc.itertuples()
        ],
        "logLik": float(summary["elbo"]) if "elbo" in summary else None,
        "converged": bool(getattr(fit, "converged_", False)),
        "posterior": getattr(fit, "posterior_kind", None),
        "epochs": summary.get("epochs"),
        "peak_mib": memory.peak_mib,
        "fit_mib": memory.fit_mib,
    }


# ------------------------------------------------------------ GPBoost (child)
_STRING = re.compile(r"'[^']*'|\"[^\"]*\"")


def _used_columns(formula: str, frame: pd.DataFrame) -> list[str]:
    text = _STRING.sub("", formula)
    return [c for c in frame.columns if re.search(rf"(?<![\w.]){re.escape(str(c))}(?![\w.])", text)]


def _codes(frame: pd.DataFrame, columns) -> np.ndarray:
    """One integer code per row for the combination of `columns` (a nested factor a:b)."""
    out = None
    for col in columns:
        codes, uniques = pd.factorize(frame[col])
        out = codes.astype(np.int64) if out is None else out * len(uniques) + codes
    return pd.factorize(out)[0].astype(np.int64)


def gpboost_design(frame: pd.DataFrame, model: dict) -> dict:
    """GPBoost's arrays for the model: X, y, groups, independent random slopes.

    Raises:
        ValueError: what GPBoost cannot fit.
    """
    from formulaic import model_matrix

    from keras_glmm.design import lme4_name
    from keras_glmm.formula import parse_formula

    spec = parse_formula(model["formula"])
    if spec.offsets:
        raise ValueError("offsets are not mapped to GPBoost here")
    used = _used_columns(model["formula"], frame)
    if model["na_action"] == "omit":
        frame = frame.loc[frame[used].notna().all(axis=1)]
    X = np.asarray(model_matrix(spec.fixed_rhs(), frame, na_action="raise"), dtype=np.float64)
    groups: dict[str, dict] = {}  # group name -> {"codes", "intercept", "slopes": [(name, values)]}
    correlations_dropped = False
    for term in spec.random:
        cols = term.group_columns()
        name = ":".join(cols)
        entry = groups.setdefault(name, {"codes": _codes(frame, cols), "intercept": False, "slopes": []})
        mm = model_matrix(term.expr, frame, na_action="raise")
        names = list(mm.model_spec.column_names)
        values = np.asarray(mm, dtype=np.float64)
        if term.correlated and len(names) > 1:
            correlations_dropped = True
        for j, col in enumerate(names):
            if col == "Intercept":
                entry["intercept"] = True
            else:
                entry["slopes"].append((lme4_name(col), values[:, j]))
    family = model["family"]
    weights = None
    cbind = spec.cbind()
    if family == "binomial" and cbind is not None:
        succ = np.asarray(frame.eval(cbind[0]), dtype=np.float64)
        fail = np.asarray(frame.eval(cbind[1]), dtype=np.float64)
        weights = succ + fail
        y = succ / weights
        likelihood = "binomial_logit"
    else:
        response = frame[spec.response] if spec.response in frame.columns else frame.eval(spec.response)
        if isinstance(getattr(response, "dtype", None), pd.CategoricalDtype):
            y = (response.cat.codes.to_numpy() == 1).astype(np.float64)
        else:
            y = np.asarray(response, dtype=np.float64)
        likelihood = {"gaussian": "gaussian", "binomial": "bernoulli_logit", "poisson": "poisson"}.get(family)
        if likelihood is None:
            raise ValueError(f"family {family!r} not mapped to a GPBoost likelihood")
    names = list(groups)
    group_data = np.column_stack([groups[n]["codes"] for n in names])
    slopes, slope_group, labels = [], [], []
    for i, n in enumerate(names):
        for sname, values in groups[n]["slopes"]:
            slopes.append(values)
            slope_group.append(i + 1)
            labels.append((n, sname))
    # Order of GPBoost's covariance parameters: error variance (gaussian), the groups'
    # intercept variances, then the random slopes' variances.
    cov_labels = ([("Residual", None)] if family == "gaussian" else []) + [
        (n, "(Intercept)") for n in names if groups[n]["intercept"]
    ] + labels
    return {
        "X": X, "y": y, "weights": weights, "likelihood": likelihood, "group_data": group_data,
        "rand_coef": np.column_stack(slopes) if slopes else None, "ind_effect": slope_group or None,
        "drop_intercept": [not groups[n]["intercept"] for n in names],
        "cov_labels": cov_labels, "uncorrelated": correlations_dropped, "rows": len(y),
    }


def _gpboost_fit(design: dict, inversion: str = "cholesky"):
    import gpboost as gpb

    kwargs = {"group_data": design["group_data"], "likelihood": design["likelihood"]}
    if inversion != "default":
        kwargs["matrix_inversion_method"] = inversion
    if design["rand_coef"] is not None:
        kwargs["group_rand_coef_data"] = design["rand_coef"]
        kwargs["ind_effect_group_rand_coef"] = design["ind_effect"]
        if any(design["drop_intercept"]):
            kwargs["drop_intercept_group_rand_effect"] = design["drop_intercept"]
    if design["weights"] is not None:
        kwargs["weights"] = design["weights"]
    gp = gpb.GPModel(**kwargs)
    gp.fit(y=design["y"], X=design["X"])
    return gp


def worker_gpboost(job: dict) -> dict:
    frame, model = job_model(job)
    inversion = job.get("gpboost_inversion", "cholesky")
    # Warm-up: GPBoost's first fit of a model with several grouping factors in a process
    # costs seconds once (14 s here), so both a one-factor and a two-factor model first.
    family = model["family"]
    nested_frame, _ = synthetic.nested(300, 20, 5, family="gaussian" if family == "gaussian" else "binomial", seed=0)
    for warm_formula, warm_frame in ((LEVELS, _warm_frame(family)), (NESTED, nested_frame)):
        warm = dict(model, formula=warm_formula, na_action=None)
        if family == "binomial" and "cbind(" in model["formula"]:
            warm_frame = warm_frame.assign(n=3, s=(warm_frame["y"] + (warm_frame["x"] > 0)).astype(int))
            warm["formula"] = "cbind(s, n - s) ~ " + warm_formula.split("~", 1)[1]
        _gpboost_fit(gpboost_design(warm_frame, warm), inversion)
    print(FIT_MARK, flush=True)  # GPBoost's warnings after this line are the fit's
    with PeakMemory() as memory:
        start = time.perf_counter()
        design = gpboost_design(frame, model)
        built = time.perf_counter()
        gp = _gpboost_fit(design, inversion)
        seconds = time.perf_counter() - start
    cov = np.asarray(gp.get_cov_pars(), dtype=np.float64).reshape(-1)
    coef = np.asarray(gp.get_coef(), dtype=np.float64).reshape(-1)
    varcorr = [
        {"grp": grp, "var1": var, "var2": None, "sdcor": float(math.sqrt(max(v, 0.0)))}
        for (grp, var), v in zip(design["cov_labels"], cov, strict=True)
    ]
    # lme4's order: the Residual row last.
    varcorr = [r for r in varcorr if r["grp"] != "Residual"] + [r for r in varcorr if r["grp"] == "Residual"]
    return {
        "seconds": seconds, "design_seconds": built - start, "fixef": coef.tolist(),
        "varcorr": varcorr, "logLik": -float(gp.get_current_neg_log_likelihood()),
        "uncorrelated": design["uncorrelated"], "rows": design["rows"],
        "peak_mib": memory.peak_mib, "fit_mib": memory.fit_mib,
    }


def run_child(kind: str, job: dict, timeout: float) -> dict:
    """Runs one fit in a fresh Python process; returns its result or {"error": ...}."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(job)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = out.stdout.splitlines()
    for line in reversed(lines):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if FIT_MARK in lines:
                after = lines[lines.index(FIT_MARK) + 1:]
                warnings = sorted({w.split("]", 2)[-1].strip().split(". ")[0][:200] for w in after if "[Warning]" in w})
                if warnings:
                    result["warnings"] = warnings
            return result
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {out.returncode}: " + " | ".join(tail)[-300:]}


# ----------------------------------------------------------------------- lme4
_R_TEMPLATE = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1], colClasses = %(colclasses)s, na.strings = c("", "NA"))
%(factors)s
# Warm-up: the first fit of a fresh R process loads and compiles code.
invisible(suppressWarnings(suppressMessages(%(warmup)s)))
msgs <- character()
t <- withCallingHandlers(system.time(f <- %(fit)s),
  warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
  message = function(m) { msgs <<- c(msgs, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
js <- function(x) {
  if (is.null(x) || length(x) == 0 || is.na(x)) return("null")
  if (is.character(x) || is.factor(x)) return(paste0('"', gsub('"', "'", gsub("[\\\\\n]", " ", as.character(x))), '"'))
  if (is.logical(x)) return(if (x) "true" else "false")
  format(x, digits = 15)
}
arr <- function(v) paste(vapply(as.list(v), js, ""), collapse = ", ")
vc <- as.data.frame(VarCorr(f))
rows <- vapply(seq_len(nrow(vc)), function(i) sprintf('{"grp": %%s, "var1": %%s, "var2": %%s, "sdcor": %%s}',
  js(vc$grp[i]), js(vc$var1[i]), js(vc$var2[i]), js(vc$sdcor[i])), "")
conv <- c(msgs, f@optinfo$conv$lme4$messages)
bad <- grepl("converge|Hessian|degenerate|unable", conv)
cat(sprintf('{"seconds": %%s, "cpu": %%s, "fixef": [%%s], "fixef_names": [%%s], "se": [%%s], "varcorr": [%%s], "logLik": %%s, "nobs": %%d, "converged": %%s, "messages": [%%s], "version": "%%s", "R": "%%s"}\n',
  js(t[["elapsed"]]), js(t[["user.self"]] + t[["sys.self"]]), arr(fixef(f)), arr(names(fixef(f))),
  arr(sqrt(diag(as.matrix(vcov(f))))), paste(rows, collapse = ", "), js(as.numeric(logLik(f))), nobs(f),
  js(!any(bad)), arr(unique(conv)), as.character(packageVersion("lme4")),
  paste(R.version$major, R.version$minor, sep = ".")))
"""


def _r_string(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def lme4_script(frame: pd.DataFrame, model: dict) -> str:
    colclasses, factors = [], []
    for col in frame.columns:
        series = frame[col]
        if isinstance(series.dtype, pd.CategoricalDtype):
            colclasses.append(f"{_r_string(col)} = \"character\"")
            cats = list(series.cat.categories)
            levels = f", levels = c({', '.join(_r_string(c) for c in cats)})" if len(cats) <= 200 else ""
            factors.append(f"d[[{_r_string(col)}]] <- factor(d[[{_r_string(col)}]]{levels})")
        elif col in model["group_columns"]:
            factors.append(f"d[[{_r_string(col)}]] <- factor(d[[{_r_string(col)}]])")
    family = model["family"]
    na = ", na.action = na.omit" if model["na_action"] == "omit" else ""
    if family == "gaussian":
        fit = f"lmer({model['formula_lme4']}, d, REML = {'TRUE' if model['reml'] else 'FALSE'}{na})"
        warmup = "lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)"
    else:
        control = f", control = {model['lme4_control']}" if model.get("lme4_control") else ""
        fit = f"glmer({model['formula_lme4']}, d, family = {family}{na}{control})"
        warmup = "glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, family = binomial)"
    return _R_TEMPLATE % {
        "colclasses": f"c({', '.join(colclasses)})" if colclasses else "NA", "factors": "\n".join(factors), "warmup": warmup, "fit": fit,
    }


def run_lme4(frame: pd.DataFrame, model: dict, timeout: float) -> dict:
    try:
        out = run_rscript(lme4_script(frame, model), frame, "lme4", timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    return out if out is not None else {"error": "Rscript failed (message above)"}


# ------------------------------------------------------------------ agreement
def _norm(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v).replace(" ", "").replace("**", "^")


def _key(row):
    grp = str(row["grp"])
    if grp != "Residual":
        grp = ":".join(sorted(re.sub(r"\.\d+$", "", grp).split(":")))
    return grp, _norm(row.get("var1")), _norm(row.get("var2"))


def agreement(got: dict, ref: dict) -> dict:
    """keras_glmm's (or GPBoost's) fit against a reference fit (lme4).

    Returns:
        sd (largest relative sd error; a reference sd of 0 is compared relative to the
        largest reference sd), cor (largest correlation difference), fixef (largest
        fixed-effect difference in reference standard errors), logLik (got - ref).
    """
    out = {"sd": None, "cor": None, "fixef": None, "logLik": None}
    if not got or "error" in got or not ref or "error" in ref:
        return out
    ref_rows = ref["varcorr"]
    got_by_key = {_key(r): r for r in got["varcorr"]}
    pairs = [(r, got_by_key.get(_key(r))) for r in ref_rows]
    if any(g is None for _, g in pairs) and len(got["varcorr"]) == len(ref_rows) and not got.get("uncorrelated"):
        pairs = list(zip(ref_rows, got["varcorr"]))  # names differ: lme4's order
    largest = max([r["sdcor"] for r in ref_rows if r.get("var2") is None] or [1.0])
    sd_err, cor_err = [], []
    for r, g in pairs:
        if g is None:
            continue
        if r.get("var2") is None:
            sd_err.append(abs(g["sdcor"] - r["sdcor"]) / (r["sdcor"] if r["sdcor"] > 0 else largest))
        else:
            cor_err.append(abs(g["sdcor"] - r["sdcor"]))
    out["sd"] = max(sd_err) if sd_err else None
    out["cor"] = max(cor_err) if cor_err else None
    fixef, ref_fixef, se = got.get("fixef"), ref.get("fixef"), ref.get("se")
    if isinstance(ref_fixef, dict):
        ref_fixef = list(ref_fixef.values())
    if isinstance(se, dict):
        se = list(se.values())
    if fixef is not None and ref_fixef is not None and se is not None and len(fixef) == len(ref_fixef):
        out["fixef"] = max(abs(a - b) / s for a, b, s in zip(fixef, ref_fixef, se))
    if got.get("logLik") is not None and ref.get("logLik") is not None:
        out["logLik"] = got["logLik"] - ref["logLik"]
    return out


# ---------------------------------------------------------------------- table
def _secs(result):
    if result is None:
        return None
    if "error" in result:
        return "failed" if not result["error"].startswith("timeout") else "timeout"
    return round(result["seconds"], 3 if result["seconds"] < 10 else 1)


def _num(value, digits=4):
    if value is None:
        return None
    return float(f"{value:.{digits}g}")


def gpboost_label(gp, model) -> str:
    if gp is None:
        return ""
    if "error" in gp:
        return "—"
    parts = []
    if gp.get("uncorrelated"):
        parts.append("uncorrelated")
    if model["family"] == "gaussian" and model["reml"]:
        parts.append("ML, not REML")
    return ", ".join(parts) or "same model"


def gmean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ----------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", help="comma-separated reference cases (default: all)")
    p.add_argument("--no-keras", action="store_true", help="lme4 and GPBoost only")
    p.add_argument("--no-lme4", action="store_true")
    p.add_argument("--no-gpboost", action="store_true")
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--sizes", default="10000,100000,1000000", help="synthetic row counts")
    p.add_argument("--designs", default="nested,crossed", help="synthetic designs")
    p.add_argument("--families", default="gaussian,binomial", help="synthetic families")
    p.add_argument("--max-lme4-rows", type=int, default=100_000)
    p.add_argument("--max-gpboost-rows", type=int, default=1_000_000)
    p.add_argument("--levels", default="5000,20000,50000", help="levels of the REML memory series ('' skips it)")
    p.add_argument("--levels-rows", type=int, default=200_000)
    p.add_argument("--gpboost-inversion", default="cholesky", choices=["cholesky", "default", "iterative"],
                   help="GPBoost's matrix_inversion_method (its 'default' is iterative for several factors)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per fit")
    p.add_argument("--json", help="also write every raw result to this file")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text):
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _gpboost_available():
    try:
        import gpboost  # noqa: F401
    except ImportError:
        return False
    return True


def _progress(label, keras, lme4, gp):
    parts = [f"{label}:"]
    for name, r in (("keras_glmm", keras), ("lme4", lme4), ("GPBoost", gp)):
        if r is not None:
            parts.append(f"{name} {_secs(r)}" + (f" ({r['error']})" if "error" in r else ""))
    print("  " + " ".join(parts), file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        kind, job = args.worker[0], json.loads(args.worker[1])
        try:
            result = worker_keras(job) if kind == "keras" else worker_gpboost(job)
        except Exception as e:  # noqa: BLE001 - reported in the table
            result = {"error": f"{type(e).__name__}: {e}"[:400]}
        print("RESULT " + json.dumps(result), flush=True)
        return

    load_before = os.getloadavg()
    cases = reference_cases()
    if args.cases:
        chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in cases]
        if unknown:
            sys.exit(f"unknown case(s) {unknown}; the cases are: {', '.join(cases)}")
        cases = {c: cases[c] for c in chosen}
    use_keras = not args.no_keras
    use_lme4 = not args.no_lme4 and shutil.which("Rscript") is not None
    use_gp = not args.no_gpboost and _gpboost_available()
    raw = {"cases": {}, "synthetic": [], "levels": []}

    # ----------------------------------------------------- reference cases
    print(f"reference cases ({len(cases)}):", file=sys.stderr, flush=True)
    rows, ratios, within, lme4_check, gp_notes, gp_warnings, failures = [], [], [], [], [], [], []
    for name, case in cases.items():
        job = {"case": name}
        frame, model = job_model(job)
        keras = run_child("keras", job, args.timeout) if use_keras else None
        lme4 = run_lme4(frame, model, args.timeout) if use_lme4 else None
        gp = run_child("gpboost", dict(job, gpboost_inversion=args.gpboost_inversion), args.timeout) if use_gp else None
        _progress(name, keras, lme4, gp)
        raw["cases"][name] = {"keras_glmm": keras, "lme4": lme4, "gpboost": gp}
        ref = {"fixef": case["fixef"], "se": case["se"], "varcorr": case["varcorr"], "logLik": case["logLik"]}
        agree = agreement(keras, ref)
        gp_agree = agreement(gp, ref)
        k_s = keras["seconds"] if keras and "error" not in keras else None
        l_s = lme4["seconds"] if lme4 and "error" not in lme4 else None
        ratio = k_s / l_s if k_s is not None and l_s else None
        if ratio is not None:
            ratios.append(ratio)
        ok = None
        if keras is not None and lme4 is not None and l_s is not None:
            ok = k_s is not None and k_s <= max(1.0, l_s)
            within.append(ok)
        if lme4 is not None and l_s is not None:
            lme4_check.append((name, lme4["logLik"] - case["logLik"], lme4.get("converged"), lme4.get("messages")))
        if gp is not None and "error" in gp:
            gp_notes.append(f"{name}: {gp['error']}")
        if gp is not None and gp.get("warnings"):
            gp_warnings.append(f"{name}: {'; '.join(gp['warnings'])}")
        for who, r in (("keras_glmm", keras), ("lme4", lme4)):
            if r is not None and "error" in r:
                failures.append(f"{name} ({who}): {r['error']}")
        rows.append({
            "case": name, "rows": f"{case['nobs']:,}", "family": model["family"] + (" REML" if model["reml"] else ""),
            "keras_glmm s": _secs(keras), "lme4 s": _secs(lme4),
            "keras/lme4": _num(ratio, 3), "≤ max(1 s, lme4)": "" if ok is None else ("yes" if ok else "no"),
            "GPBoost s": _secs(gp) if gp is None or "error" not in gp else "—",
            "GPBoost model": gpboost_label(gp, model),
            "sd max rel. err": _num(agree["sd"], 3), "cor max diff": _num(agree["cor"], 3),
            "fixef max diff (SE)": _num(agree["fixef"], 3), "logLik diff": _num(agree["logLik"], 4),
            "converged": keras.get("converged") if keras and "error" not in keras else None,
            "peak MiB": round(keras["peak_mib"]) if keras and "error" not in keras else None,
            "fit MiB": round(keras["fit_mib"]) if keras and "error" not in keras else None,
            "GPBoost sd max rel. err": _num(gp_agree["sd"], 3), "GPBoost logLik diff": _num(gp_agree["logLik"], 4),
        })

    # ----------------------------------------------------- synthetic series
    syn_rows, level_rows = [], []
    if not args.no_synthetic:
        print("synthetic series:", file=sys.stderr, flush=True)
        for design in [d for d in args.designs.split(",") if d]:
            for family in [f for f in args.families.split(",") if f]:
                for n in _ints(args.sizes):
                    job = {"synthetic": design, "family": family, "rows": n, "seed": SEED}
                    frame, model = job_model(job)
                    keras = run_child("keras", job, args.timeout) if use_keras else None
                    lme4 = None
                    if use_lme4:
                        lme4 = run_lme4(frame, model, args.timeout) if n <= args.max_lme4_rows else {"skipped": True}
                    gp = None
                    if use_gp:
                        gp = (run_child("gpboost", dict(job, gpboost_inversion=args.gpboost_inversion), args.timeout)
                              if n <= args.max_gpboost_rows else {"skipped": True})
                    del frame
                    label = f"{design} {family} {n:,}"
                    _progress(label, keras, None if lme4 and "skipped" in lme4 else lme4,
                              None if gp and "skipped" in gp else gp)
                    raw["synthetic"].append({"job": job, "keras_glmm": keras, "lme4": lme4, "gpboost": gp})
                    lme4_ok = lme4 if lme4 and "skipped" not in lme4 else None
                    gp_ok = gp if gp and "skipped" not in gp else None
                    agree = agreement(keras, lme4_ok)
                    k_s = keras["seconds"] if keras and "error" not in keras else None
                    l_s = lme4_ok["seconds"] if lme4_ok and "error" not in lme4_ok else None
                    for who, r in (("keras_glmm", keras), ("lme4", lme4_ok), ("GPBoost", gp_ok)):
                        if r is not None and "error" in r:
                            failures.append(f"{label} ({who}): {r['error']}")
                    levels = "2,000 in 50" if design == "nested" else "5,000 x 500"
                    syn_rows.append({
                        "model": f"{design} {family}", "rows": f"{n:,}", "levels": levels,
                        "keras_glmm s": _secs(keras),
                        "lme4 s": "skipped" if lme4 and "skipped" in lme4 else _secs(lme4),
                        "lme4 converged": lme4_ok.get("converged") if lme4_ok and "error" not in lme4_ok else None,
                        "keras/lme4": _num(k_s / l_s, 3) if k_s is not None and l_s else None,
                        "GPBoost s": "skipped" if gp and "skipped" in gp else (
                            "—" if gp_ok and "error" in gp_ok else _secs(gp_ok)),
                        "GPBoost model": gpboost_label(gp_ok, model),
                        "sd max rel. err": _num(agree["sd"], 3), "cor max diff": _num(agree["cor"], 3),
                        "fixef max diff (SE)": _num(agree["fixef"], 3), "logLik diff": _num(agree["logLik"], 4),
                        "converged": keras.get("converged") if keras and "error" not in keras else None,
                        "peak MiB": round(keras["peak_mib"]) if keras and "error" not in keras else None,
                        "fit MiB": round(keras["fit_mib"]) if keras and "error" not in keras else None,
                    })
        if use_keras:
            for levels in _ints(args.levels):
                job = {"synthetic": "levels", "family": "gaussian", "rows": args.levels_rows,
                       "levels": levels, "reml": True, "seed": SEED}
                keras = run_child("keras", job, args.timeout)
                _progress(f"REML, {levels:,} levels", keras, None, None)
                raw["levels"].append({"job": job, "keras_glmm": keras})
                if "error" in keras:
                    failures.append(f"REML {levels:,} levels (keras_glmm): {keras['error']}")
                previous = raw["levels"][-2] if len(raw["levels"]) > 1 else None
                added = None
                if previous and "error" not in keras and "error" not in previous["keras_glmm"]:
                    added = ((keras["fit_mib"] - previous["keras_glmm"]["fit_mib"]) * 1024
                             / (levels - previous["job"]["levels"]))
                level_rows.append({
                    "levels": f"{levels:,}", "rows": f"{args.levels_rows:,}", "keras_glmm s": _secs(keras),
                    "converged": keras.get("converged"),
                    "peak MiB": round(keras["peak_mib"]) if "error" not in keras else None,
                    "fit MiB": round(keras["fit_mib"], 1) if "error" not in keras else None,
                    "KiB per added level": None if added is None else round(added, 2),
                })

    # ----------------------------------------------------- report
    notes = []
    if ratios:
        g = gmean(ratios)
        notes.append(f"- Geometric mean of keras_glmm / lme4 over {len(ratios)} reference cases: **{g:.2f}**.")
    if within:
        notes.append(f"- Cases within max(1 s, lme4's time): **{sum(within)} of {len(within)}**.")
    notes.append(
        "- keras_glmm s: wall time of `kg.glmm(formula, frame, family=..., reml=..., na_action=...)` "
        "from the data frame, each fit in a fresh child process that is warm: after `import keras_glmm` "
        "and one warm-up fit of an unrelated 300-row `y ~ x + (1|g)` of the same family. peak MiB: the "
        "child's peak resident memory (`ru_maxrss`: TensorFlow, data and fit); fit MiB: the peak during "
        "the fit above the memory just before it (peak reset through /proc/self/clear_refs)."
        if use_keras else "- keras_glmm not run (`--no-keras`)."
    )
    if use_keras:
        notes.append(
            "- The agreement columns compare keras_glmm with lme4's reference fit (reference/*.json): "
            "largest relative sd error (a reference sd of 0, dyestuff2_singular's, relative to the "
            "model's largest sd), largest correlation difference, largest fixed-effect difference in "
            "lme4 standard errors, and ELBO - logLik (REML criterion for radon_reml; for binomial and "
            "Poisson, lme4's is the Laplace approximation)."
        )
    if use_lme4:
        notes.append(
            "- lme4 s: `system.time()` around `lmer()` (REML per case, else ML) or `glmer()` (Laplace) "
            "on the data already read, after a warm-up fit; R's start-up and the CSV are not counted."
        )
        if lme4_check:
            worst = max(lme4_check, key=lambda t: abs(t[1]))
            notes.append(
                f"- lme4 in this run against the reference logLik: largest |difference| {abs(worst[1]):.2g} "
                f"({worst[0]})."
                + "".join(f" {n}: {'; '.join(m)}." for n, _, c, m in lme4_check if not c and m)
            )
    else:
        notes.append("- lme4 not run (`--no-lme4`, or Rscript not installed).")
    if use_gp:
        notes.append(
            "- GPBoost s: from the data frame (design arrays by formulaic) through `GPModel(group_data=..., "
            f"likelihood=..., matrix_inversion_method=\"{args.gpboost_inversion}\")` and `fit(y, X)`, in a warm "
            "child process (GPBoost's own default, iterative methods for several grouping factors, estimates "
            "the log-determinant stochastically: on pastes, penicillin, grouseticks and InstEval it stopped "
            "0.3 to 1.2 off lme4's logLik and took 2-15 times longer than with Cholesky; "
            "`--gpboost-inversion default` measures it). Its grouped random effects have "
            "no correlations: models with correlated slopes are fitted with independent ones "
            "(\"uncorrelated\"), and gaussian fits are ML (\"ML, not REML\"). cbind() responses use its "
            "`binomial_logit` likelihood (proportions with the trials as weights). Its agreement columns "
            "compare with lme4's reference fit of the correlated model."
            + ("" if not gp_notes else " Not fitted: " + "; ".join(gp_notes) + ".")
            + ("" if not gp_warnings else " GPBoost warned: " + " | ".join(gp_warnings) + ".")
        )
    else:
        notes.append("- GPBoost not run (`--no-gpboost`, or gpboost not installed: `pip install -e \".[bench]\"`).")
    if failures:
        notes.append("- Failures: " + "; ".join(failures) + ".")
    load_after = os.getloadavg()
    notes.append(
        f"- Load average (1, 5, 15 min) {tuple(round(v, 2) for v in load_before)} before and "
        f"{tuple(round(v, 2) for v in load_after)} after the runs, on {os.cpu_count()} logical CPUs: "
        "other processes on the machine make the times noisy."
    )
    if syn_rows:
        notes.append(
            "\nSynthetic series (`synthetic.nested(rows, 2000, 50)`: `" + NESTED + "`; "
            "`synthetic.crossed(rows, 5000, 500)`: `" + CROSSED + "`; seed 1; ML). Agreement with "
            f"lme4's fit in this run; lme4 skipped above {args.max_lme4_rows:,} rows"
            + (f", GPBoost above {args.max_gpboost_rows:,}" if use_gp else "") + ".\n\n"
            + markdown_table(syn_rows)
        )
    if level_rows:
        notes.append(
            f"\nMemory against levels: gaussian REML fits of `{LEVELS}` on {args.levels_rows:,} rows "
            "(`synthetic.one_factor`, seed 1), each in its own process. Memory linear in the levels adds the "
            "same KiB per added level from one row to the next (the rows' share is the same in all).\n\n"
            + markdown_table(level_rows)
        )
    notes = "\n".join(notes)
    table = markdown_table(rows)
    print()
    print(table)
    print(notes)
    versions = {}
    for r in [*(v["lme4"] for v in raw["cases"].values()), *(s["lme4"] for s in raw["synthetic"])]:
        if r and "version" in r:
            versions = {"R": r.get("R"), "lme4": r["version"]}
            break
    if use_gp:
        import gpboost

        versions["gpboost"] = gpboost.__version__
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(raw, fh, indent=1)
    if not args.no_results:
        command = "python benchmarks/bench_everyday.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        path = append_results("Everyday models: keras_glmm vs lme4 vs GPBoost", command, rows,
                              notes=notes, versions=versions or None)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
