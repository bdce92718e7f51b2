"""What an lme4 user reaches for after `summary()`: `confint`, `bootMer`, `anova`, `drop1`, `update`.

- `confint(model, method=...)`: lme4's `confint(fit, oldNames = FALSE)`, rows
  `sd_(Intercept)|Subject`, `cor_Days.(Intercept)|Subject`, ..., `sigma`, then the
  fixed effects; columns `2.5 %`, `97.5 %` (named by `level`).
  `"profile"`: likelihood-profile intervals (`keras_glmm.profile`; gaussian
  identity-link fits). `"Wald"`: `beta_j +- z se_j` for the fixed effects and NaN for
  the variance parameters, as lme4. `"boot"`: percentiles of a parametric bootstrap
  (numpy's linear quantiles, where lme4's `boot.ci` interpolates on the normal scale:
  the same for a few hundred samples).
- `bootstrap(model, nsim, seed)`: lme4's `bootMer(fit, FUN, nsim, type =
  "parametric")`: responses simulated from the fit (new random effects, lme4's
  `use.u = FALSE`), each refitted by the engine from the fit's estimates; the
  statistic is every parameter on lme4's scale. Refits run in `n_jobs` processes.
- `anova(*models)`: lme4's `anova` of nested models: likelihood-ratio tests between
  consecutive models ordered by their number of parameters,
  `Chisq = 2 max(0, logLik_k - logLik_{k-1})` on `npar_k - npar_{k-1}` df. REML fits
  are refitted by ML first (lme4's warning "refitting model(s) with ML (instead of
  REML)"). Models of different data (number of observations or response values)
  are an error. Two models with the same number of parameters cannot be nested:
  lme4 still prints their Chisq with 0 Df and a p-value of 0 or 1; here their
  `Pr(>Chisq)` is NaN and a warning says why.
- `drop1(model)`: lme4's `drop1(fit, test = "Chisq")`: each fixed term not
  contained in another (R's `drop.scope`) left out in turn, the model refitted by
  `update`, its AIC, likelihood-ratio statistic and p-value. A REML fit is
  refitted by ML first (with anova's warning): REML criteria of different fixed
  effects do not compare.
- `update(model, formula, **changes)`: lme4's `update`: the model refitted with a
  new formula (R's `.` for the old sides, `- term` to leave a term out:
  `". ~ . - Days"`, `". ~ . + (1|g)"`) on the same data and options, or with
  options changed (`reml=False`). A model built from a formula keeps a reference to
  its data frame (no copy) and the options of its call for this.
"""

import concurrent.futures
import multiprocessing
import re
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from keras_glmm import formula_model, prediction
from keras_glmm import profile as profile_lib
from keras_glmm import response as response_lib
from keras_glmm.engine.solver import VariationalSolver
from keras_glmm.fitting import engine as engine_fit

CONFINT_METHODS = ("profile", "Wald", "boot")
REFIT_WARNING = "refitting model(s) with ML (instead of REML)"
# The most quasi-Newton iterations of one bootstrap refit (the engine's fits take 3 to 30).
BOOT_ITERATIONS = 200


def percent_labels(level):
    """R's column names of an interval at `level`: `2.5 %`, `97.5 %`."""
    alpha = (1.0 - level) / 2.0
    return [f"{100 * a:.3g} %" for a in (alpha, 1.0 - alpha)]


def _check_level(level):
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be a number between 0 and 1. Received: level={level!r}")
    return float(level)


def parameter_names(model):
    """lme4's `confint(oldNames = FALSE)` rows: variance parameters, then the fixed effects."""
    return profile_lib.variance_names(model)[0] + list(model.fixef().index)


# ------------------------------------------------------------------ confint
def confint(model, parm=None, level=0.95, method="profile", nsim=500, seed=None, n_jobs=1):
    """lme4's `confint(fit, parm, level, method, nsim, oldNames = FALSE)` (see the module docstring).

    Args:
        model: a fitted `GLMM`.
        parm: None (every parameter), a name, names or positions, or lme4's
            `"theta_"` (the variance parameters) and `"beta_"` (the fixed effects).
        level: the confidence level.
        method: `"profile"` (gaussian identity-link fits), `"Wald"` or `"boot"`.
        nsim: bootstrap samples (`"boot"`).
        seed: the bootstrap's seed.
        n_jobs: processes for the bootstrap's refits.

    Returns:
        A DataFrame indexed by parameter, columns `2.5 %` and `97.5 %` (by `level`).
    """
    level = _check_level(level)
    if method not in CONFINT_METHODS:
        raise ValueError(f"`method` must be one of {CONFINT_METHODS}. Received: method={method!r}")
    names = parameter_names(model)
    rows = profile_lib.parameter_indices(names, parm)
    out = np.full((len(names), 2), np.nan)
    if method == "Wald":
        fixef = model.fixef()
        se = np.sqrt(np.diag(model.vcov().to_numpy()))
        z = stats.norm.ppf(0.5 + level / 2.0)
        start = len(names) - len(fixef)
        out[start:, 0] = fixef.to_numpy() - z * se
        out[start:, 1] = fixef.to_numpy() + z * se
    elif method == "profile":
        profile = profile_lib.Profile(model)
        for i in rows:
            out[i] = profile.interval(i, level)
    else:
        draws = bootstrap(model, nsim=nsim, seed=seed, n_jobs=n_jobs)
        alpha = (1.0 - level) / 2.0
        for i in rows:
            values = draws.iloc[:, i].to_numpy()
            values = values[np.isfinite(values)]
            out[i] = np.quantile(values, [alpha, 1.0 - alpha]) if len(values) else np.nan
    frame = pd.DataFrame(out, index=names, columns=percent_labels(level))
    return frame.iloc[rows]


# ------------------------------------------------------------------ bootstrap
def _refit(arguments, family, layout, start, y, gaussian):
    """One parametric-bootstrap refit by the engine: `(parameters on lme4's scale, converged)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = VariationalSolver(family=family, **{**arguments, "y": y})
        solver.start(**start)
        for _ in range(BOOT_ITERATIONS):
            if solver.finished:
                break
            solver.step()
    results = solver.results()
    sigma = results["dispersion"]["scale"] if gaussian else None
    values = profile_lib.covariance_parameters(results["covariances"], layout, sigma)
    return np.concatenate([values, results["beta"]]), bool(solver.converged)


_WORKER = {}


def _start_worker(arguments, family, link, layout, start, gaussian):
    from keras_glmm.families import get_family  # a fresh process (spawn) imports it here

    _WORKER.update(arguments=arguments, family=get_family(family, link=link), layout=layout, start=start,
                   gaussian=gaussian)


def _refit_in_worker(y):
    w = _WORKER
    return _refit(w["arguments"], w["family"], w["layout"], w["start"], y, w["gaussian"])


def bootstrap(model, nsim=500, seed=None, n_jobs=1):
    """lme4's `bootMer(fit, FUN, nsim, seed, type = "parametric")` with every parameter as `FUN`.

    Each sample is a response simulated by `model.simulate` (new random effects and
    residuals from the fit), refitted by the engine from the fit's estimates (with the
    fit's REML or ML). Refits that do not converge are kept, and a warning counts them.

    Args:
        nsim: the number of samples.
        seed: seeds the simulation (the same seed, the same draws).
        n_jobs: processes for the refits (1: in this process; -1: one per core).
            Each process imports TensorFlow once (seconds), so a few dozen refits of
            a small model run fastest in this process.

    Returns:
        A DataFrame of `nsim` rows, one column per parameter (`confint`'s names).
    """
    if isinstance(nsim, bool) or not isinstance(nsim, (int, np.integer)) or nsim < 1:
        raise ValueError(f"`nsim` must be a positive integer. Received: nsim={nsim!r}")
    x, y = model._require_fit()
    problem = model.engine_problem(len(y))
    if problem is not None or model._engine_fit is None:
        raise ValueError("The parametric bootstrap refits the model by the engine, which "
                         f"{'cannot fit it: ' + problem if problem else 'did not fit it (a fit by stochastic VI)'}; "
                         "use confint(method='Wald').")
    names = parameter_names(model)
    arguments = profile_lib.solver_arguments(model, x, y)
    layout = [(None, entries) for _, entries in profile_lib.variance_names(model)[1]]
    gaussian = model.family.name == "gaussian"
    start = engine_fit.start_point(model)
    if not gaussian:
        # Dispersions other than a gaussian's sigma are refitted but not reported.
        names = [n for n in names if n != "sigma"]
    simulated = np.asarray(prediction.simulate_responses(model, nsim=nsim, seed=seed), "float64")  # (nsim, rows)
    responses = [simulated[s] for s in range(nsim)]
    if n_jobs == -1:
        n_jobs = multiprocessing.cpu_count()
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"`n_jobs` must be a positive integer or -1. Received: n_jobs={n_jobs!r}")
    if n_jobs == 1:
        results = [_refit(arguments, model.family, layout, start, r, gaussian) for r in responses]
    else:
        # spawn, not fork: the parent holds TensorFlow's threads, which a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        initargs = (arguments, model.family.name, model.family.link.name, layout, start, gaussian)
        with concurrent.futures.ProcessPoolExecutor(min(n_jobs, nsim), mp_context=context,
                                                    initializer=_start_worker, initargs=initargs) as pool:
            results = list(pool.map(_refit_in_worker, responses))
    failed = sum(not ok for _, ok in results)
    if failed:
        warnings.warn(f"{failed} of {nsim} bootstrap refits did not converge (they are kept).", RuntimeWarning,
                      stacklevel=2)
    return pd.DataFrame(np.stack([v for v, _ in results]), columns=names)


# ------------------------------------------------------------------ update
def _split_terms(rhs):
    """The top-level terms of a right-hand side with their signs: `[("+", "Days"), ("-", "1")]`."""
    terms, depth, sign, current = [], 0, "+", ""
    for ch in rhs:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if depth == 0 and ch in "+-":
            if current.strip():
                terms.append((sign, current.strip()))
            sign, current = ch, ""
            continue
        current += ch
    if current.strip():
        terms.append((sign, current.strip()))
    return terms


def _normal(term):
    return "".join(term.split())


def update_formula(old, new):
    """R's `update.formula` for the usual cases: `.` stands for the old side, `- term`
    leaves out a term of the old right-hand side (left as `- term` for formulaic where
    it is not one of them, e.g. `- 1` or an interaction inside `a*b`)."""
    if "~" not in new:
        raise ValueError(f"`formula` must be a formula with '~' (e.g. '. ~ . - Days'). Received: {new!r}")
    old_lhs, old_rhs = (part.strip() for part in old.split("~", 1))
    new_lhs, new_rhs = (part.strip() for part in new.split("~", 1))
    lhs = re.sub(r"(?<![\w.])\.(?![\w.])", lambda _: old_lhs, new_lhs) if new_lhs else old_lhs
    terms = []
    for sign, term in _split_terms(new_rhs):
        if term == ".":
            terms += _split_terms(old_rhs) if sign == "+" else []
        elif sign == "+":
            terms.append((sign, term))
        else:
            kept = [(s, t) for s, t in terms if not (s == "+" and _normal(t) == _normal(term))]
            terms = kept if len(kept) < len(terms) else terms + [(sign, term)]
    if not terms:
        terms = [("+", "1")]
    text = ""
    for i, (sign, term) in enumerate(terms):
        text += (term if sign == "+" else f"- {term}") if i == 0 else f" {sign} {term}"
    return f"{lhs} ~ {text}"


def update(model, formula=None, **changes):
    """lme4's `update(fit, formula, ...)`: the model refitted by `kg.glmm` with a new formula
    (see `update_formula`) and/or changed options (`data=`, `reml=`, `family=`, ...)."""
    call = getattr(model, "_formula_call", None)
    if call is None or model.design is None:
        raise ValueError("update() refits a model built from a formula by kg.glmm or GLMM.from_formula; "
                         "this model has no formula call to repeat.")
    options = dict(call)
    data = changes.pop("data", options.pop("data"))
    options.update(changes)
    old = model.design.spec.formula
    new = old if formula is None else update_formula(old, formula)
    return formula_model.glmm(type(model), new, data, **options)


# ------------------------------------------------------------------ anova
def _as_ml(models):
    """The models, REML fits refitted by ML with lme4's warning."""
    if any(m.reml for m in models):
        warnings.warn(REFIT_WARNING, UserWarning, stacklevel=3)
        return [update(m, reml=False) if m.reml else m for m in models]
    return list(models)


def _model_name(model, i):
    design = getattr(model, "design", None)
    return design.spec.formula if design is not None else f"model {i + 1}"


def _check_same_data(models, names):
    nobs = [m.nobs() for m in models]
    if len(set(nobs)) > 1:
        raise ValueError("anova compares models fitted to the same data; their numbers of observations differ: "
                         + ", ".join(f"{n!r}: {k}" for n, k in zip(names, nobs)) + ".")
    responses = [m._training_arrays[1] if m._training_arrays is not None else None for m in models]
    first = responses[0]
    for name, other in zip(names[1:], responses[1:]):
        if first is None or other is None:
            continue
        a, b = response_lib.split(np.asarray(first, "float64")), response_lib.split(np.asarray(other, "float64"))
        same = a[0].shape == b[0].shape and np.allclose(a[0], b[0]) and (
            (a[1] is None) == (b[1] is None)) and (a[1] is None or np.allclose(a[1], b[1]))
        if not same:
            raise ValueError(f"anova compares models fitted to the same response; {names[0]!r} and {name!r} were "
                             "fitted to different response values.")


def anova(*models, names=None):
    """lme4's `anova(fit0, fit1, ...)`: likelihood-ratio tests of nested models (see the module docstring).

    Args:
        *models: two or more fitted `GLMM`s of the same data.
        names: row names (default: each model's formula).

    Returns:
        A DataFrame with lme4's columns `npar, AIC, BIC, logLik, deviance, Chisq, Df,
        Pr(>Chisq)`, one row per model in increasing `npar`.
    """
    if len(models) < 2:
        raise ValueError(f"anova compares two or more models (lme4's anova of one model, a table of its fixed "
                         f"terms, is not implemented: use drop1()). Received {len(models)} model(s).")
    for i, m in enumerate(models):
        if getattr(m, "fit_summary_", None) is None:
            raise ValueError(f"Model {i + 1} of anova has not been fitted.")
    if names is None:
        names = [_model_name(m, i) for i, m in enumerate(models)]
        if len(set(names)) < len(names):
            names = [f"model {i + 1}" for i in range(len(models))]
    names = list(names)
    if len(names) != len(models):
        raise ValueError(f"`names` needs one name per model: {len(models)} models, {len(names)} names.")
    _check_same_data(models, names)
    models = _as_ml(models)
    inexact = [n for n, m in zip(names, models) if not m.fit_summary_["exact"]]
    if inexact:
        warnings.warn(f"The log-likelihoods of {inexact} are variational bounds (ELBOs), not exact: the "
                      "likelihood-ratio tests compare bounds.", RuntimeWarning, stacklevel=2)
    npar = np.array([m.fit_summary_["num_parameters"] for m in models])
    order = np.argsort(npar, kind="stable")
    rows = []
    for k, i in enumerate(order):
        m = models[i]
        row = {"npar": int(npar[i]), "AIC": m.AIC(), "BIC": m.BIC(), "logLik": m.logLik(),
               "deviance": m.deviance(), "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if k:
            previous = models[order[k - 1]]
            df = int(npar[i] - npar[order[k - 1]])
            chisq = 2.0 * max(0.0, m.logLik() - previous.logLik())
            row.update(Chisq=chisq, Df=df)
            if df > 0:
                row["Pr(>Chisq)"] = float(stats.chi2.sf(chisq, df))
            else:
                warnings.warn(f"Models {names[order[k - 1]]!r} and {names[i]!r} have the same number of "
                              "parameters: they are not nested, and their likelihood-ratio test is undefined "
                              "(Pr(>Chisq) is NaN; compare their AIC and BIC).", UserWarning, stacklevel=2)
        rows.append(row)
    frame = pd.DataFrame(rows, index=[names[i] for i in order])
    frame["Df"] = frame["Df"].astype("Int64")
    return frame


# ------------------------------------------------------------------ drop1
def droppable_terms(model):
    """R's `drop.scope`: the fixed terms contained in no other term (their labels)."""
    from formulaic import Formula

    terms = [t for t in Formula(model.design.spec.fixed).rhs if str(t) != "1"]
    factors = [frozenset(str(f) for f in t.factors) for t in terms]
    return [str(t) for t, fs in zip(terms, factors) if not any(fs < other for other in factors)]


def drop1(model, test="Chisq"):
    """lme4's `drop1(fit, test = "Chisq")`: columns `npar` (parameters dropped), `AIC`,
    `LRT`, `Pr(Chi)`; the first row, `<none>`, is the model itself."""
    if test not in ("Chisq", "none", None):
        raise ValueError(f"`test` must be 'Chisq' or 'none'. Received: test={test!r}")
    if getattr(model, "_formula_call", None) is None or model.design is None:
        raise ValueError("drop1() refits a model built from a formula by kg.glmm or GLMM.from_formula.")
    base = _as_ml([model])[0]
    rows = [{"npar": np.nan, "AIC": base.AIC(), "LRT": np.nan, "Pr(Chi)": np.nan}]
    labels = droppable_terms(base)
    for label in labels:
        smaller = update(base, f". ~ . - {label}")
        df = base.fit_summary_["num_parameters"] - smaller.fit_summary_["num_parameters"]
        lrt = 2.0 * (base.logLik() - smaller.logLik())
        rows.append({"npar": df, "AIC": smaller.AIC(), "LRT": lrt,
                     "Pr(Chi)": float(stats.chi2.sf(max(lrt, 0.0), df)) if df > 0 else np.nan})
    frame = pd.DataFrame(rows, index=["<none>"] + labels)
    frame["npar"] = frame["npar"].astype("Int64")
    if test in ("none", None):
        frame = frame[["npar", "AIC"]]
    return frame

