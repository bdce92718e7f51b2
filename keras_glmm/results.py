"""Results of a fitted GLMM in lme4's vocabulary: fixef, vcov, ranef, VarCorr, report.

These functions read a fitted `GLMM` (and, for names, the `Design` it was built from
by `GLMM.from_formula`); the model's methods of the same names call them.
"""

import math
import warnings

import numpy as np
import pandas as pd
from scipy import special

from keras_glmm import estimates
from keras_glmm import response as response_lib
from keras_glmm.engine import covariances
from keras_glmm.engine.blocked import BlockedSystem, TooLarge
from keras_glmm.engine.parameters import semidefinite_cholesky
from keras_glmm.engine.structure import Structure
# A standard deviation below this fraction of its effect's scale, or a correlation
# within this distance of +-1, is a boundary ("singular") fit, as lme4's isSingular
# (tol 1e-4 on the relative Cholesky factor).
from keras_glmm.engine.verification import SINGULAR_TOLERANCE


def fixed_names(model):
    design = getattr(model, "design", None)
    if design is not None:
        return list(design.fixed_columns)
    return [f"x{j}" for j in range(len(model.coefficients()))]


def zi_names(model):
    """Names of the zero-inflation coefficients: the ziformula's columns, lme4-style."""
    design = getattr(model, "design", None)
    if getattr(model, "zero_inflation", None) is None:
        return ["(Intercept)"]  # a constant zero-inflation: its log-odds
    if design is not None and design.zi_columns:
        return list(design.zi_columns)
    return [f"x_zi{j}" for j in range(len(model.zi_coefficients()))]


def term_columns(model, term):
    design = getattr(model, "design", None)
    if design is not None:
        return list(design.term(term.name).columns)
    names = ["(Intercept)"] if term.intercept else []
    return names + [f"z{j}" for j in range(term.num_covariates)]


def term_group(model, term):
    design = getattr(model, "design", None)
    if design is not None:
        return design.term(term.name).term.group
    return term.name


def term_levels(model, term):
    design = getattr(model, "design", None)
    if design is not None:
        return list(design.term(term.name).levels)
    return [str(i) for i in range(term.num_levels)]


def conditional_mean(model, term):
    """Each level's posterior mean `(L, k)`, float64: the engine's values after its fit."""
    recorded = estimates.term_value(model, term, "level_means")
    return term.conditional_mean().astype("float64") if recorded is None else recorded


def conditional_stddev(model, term):
    """Each level's posterior sd `(L, k)`, float64: the engine's values after its fit."""
    recorded = estimates.term_value(model, term, "level_stddev")
    return term.conditional_stddev().astype("float64") if recorded is None else recorded


def prior_stddev(model, term):
    """A term's standard deviations `(k,)`, float64: the engine's values after its fit."""
    recorded = estimates.term_value(model, term, "stddev")
    return np.asarray(term.prior_stddev(), "float64") if recorded is None else recorded


def prior_correlation(model, term):
    """A term's correlation matrix `(k, k)`, float64: the engine's values after its fit."""
    recorded = estimates.term_value(model, term, "correlation")
    return np.asarray(term.prior_correlation(), "float64") if recorded is None else recorded


# ---------------------------------------------------------------- variance
def varcorr(model):
    """lme4's `as.data.frame(VarCorr(fit))`: columns grp, var1, var2, vcov, sdcor.

    Terms split by `||` on one grouping factor are named as lme4 names them
    (`Subject`, `Subject.1`, ...). A gaussian model adds the residual sd as `Residual`;
    a gamma model, as lme4 does, its `sigma()`, the coefficient of variation
    `1 / sqrt(shape)`: here the maximum-likelihood one (glmmTMB's `sigma`), where
    lme4's `glmer` prints a moment estimate, `sqrt(pwrss / n)` (Sitka, log link:
    lme4 0.0545, glmmTMB and keras_glmm 0.0412).
    """
    rows = []
    seen = {}
    for term in model.terms:
        group = term_group(model, term)
        count = seen.get(group, 0)
        seen[group] = count + 1
        grp = group if count == 0 else f"{group}.{count}"
        names = term_columns(model, term)
        sd = prior_stddev(model, term)
        corr = prior_correlation(model, term)
        for j, name in enumerate(names):
            rows.append({"grp": grp, "var1": name, "var2": None, "vcov": sd[j] ** 2, "sdcor": sd[j]})
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                rows.append(
                    {"grp": grp, "var1": names[a], "var2": names[b],
                     "vcov": corr[a, b] * sd[a] * sd[b], "sdcor": corr[a, b]}
                )
    if model.family.name == "gaussian":
        scale = model.dispersion()["scale"]
        rows.append({"grp": "Residual", "var1": None, "var2": None, "vcov": scale**2, "sdcor": scale})
    elif model.family.name == "gamma":
        cv = model.sigma()
        rows.append({"grp": "Residual", "var1": None, "var2": None, "vcov": cv**2, "sdcor": cv})
    return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])


def singular_components(model):
    """Descriptions of variance components at the boundary (sd 0 or |corr| 1).

    After a fit by the engine this is lme4's `isSingular` rule: a diagonal entry of
    a term's (relative) covariance factor below 1e-4. Otherwise a standard
    deviation below 1e-4 of its effect's scale, or a correlation within 1e-4 of +-1.
    """
    engine = getattr(model, "_engine_fit", None)
    if engine is not None:
        return _boundary_components(model, engine["boundary"])
    out = []
    for term in model.terms:
        sd = term.prior_stddev()
        scale = np.asarray(term.effect_scale)
        names = term_columns(model, term)
        group = term_group(model, term)
        for j, name in enumerate(names):
            if sd[j] < SINGULAR_TOLERANCE * max(scale[j], 1e-12):
                out.append(f"the sd of {name} in {group} is {sd[j]:.3g}, at zero")
        corr = term.prior_correlation()
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                if abs(corr[a, b]) > 1 - SINGULAR_TOLERANCE:
                    out.append(f"the correlation of {names[a]} and {names[b]} in {group} is {corr[a, b]:.4f}")
    return out


def _boundary_components(model, boundary):
    """What each flagged diagonal entry of a covariance factor means, named.

    `Lambda_jj` is the sd of effect `j` given the effects before it: near 0, either
    the effect's own sd is near 0, or it is (almost) a linear combination of the
    earlier effects, a correlation of +-1 with one of them or, in larger matrices,
    with several at once (the covariance matrix then has a lower rank).
    """
    out = []
    for term, flags in zip(model.terms, boundary):
        sd = term.prior_stddev()
        corr = term.prior_correlation()
        names = term_columns(model, term)
        group = term_group(model, term)
        largest = max(float(np.max(sd)), 1e-300)
        flagged = np.flatnonzero(flags)
        singular_rank = None
        for j in flagged:
            if j == 0 or sd[j] < SINGULAR_TOLERANCE * largest:
                out.append(f"the sd of {names[j]} in {group} is {sd[j]:.3g}, at zero")
            elif np.max(np.abs(corr[j, :j])) > 1 - 1e-3:
                partner = int(np.argmax(np.abs(corr[j, :j])))
                out.append(f"the correlation of {names[partner]} and {names[j]} in {group} is "
                           f"{corr[partner, j]:.4f}, at +-1")
            else:
                singular_rank = len(names) - len(flagged)
                out.append(f"{names[j]} in {group} is a linear combination of the effects before it "
                           f"({', '.join(names[:j])})")
        if singular_rank is not None:
            out.append(f"the covariance matrix of {group} has rank {singular_rank} of {len(names)}")
    return out


# ---------------------------------------------------------------- vcov
def engine_terms(model, x):
    """The engine's `(name, level_index, z, num_levels, correlated)` of each of the model's
    terms on the rows `x` (`keras_glmm.engine.Structure`), `z` with the intercept first."""
    num_rows = len(x["x"])
    terms = []
    for term in model.terms:
        z = np.ones((num_rows, 1)) if term.intercept else np.zeros((num_rows, 0))
        if term.num_covariates:
            z = np.concatenate([z, np.asarray(x[term.name + "_z"], "float64")], axis=1)
        terms.append((term.name, np.asarray(x[term.name]), z, term.num_levels, term.covariance == "full"))
    return terms


def fixed_vcov(model, x, y):
    """Covariance of the fixed-effect estimates, `(p, p)`, after stochastic VI.

    The Laplace (Hessian) covariance at the optimum, conditional on the variance
    components: with `W` the observed information of each row's linear predictor
    and `Sigma = Lambda Lambda'` each term's covariance,

    ```
    vcov(beta) = (X'WX - X'WZ (Z'WZ + Sigma^-1)^-1 Z'WX)^-1
    ```

    which for a Gaussian model is lme4's `(X' V^-1 X)^-1`. Mean-field VI's own
    posterior would understate these (Goplerud, Papaspiliopoulos & Zanella 2023).
    The engine's blocked factorization computes it, in `Lambda`'s coordinates (a
    variance at 0 is no matter): `keras_glmm.engine.covariances.conditional_covariance`,
    the same as a fit by the engine reports for its VI optimum.
    """
    pred = model(x, training=False)
    response, trials = response_lib.split(np.asarray(y, "float64"))
    eta = np.asarray(pred["eta"].numpy(), "float64")
    information = covariances.observed_information(model.family, response, eta, model.dispersion(), trials=trials,
                                                   weights=response_lib.prior_weights(x))
    structure = Structure(np.asarray(x["x"], "float64"), engine_terms(model, x))
    try:
        system = BlockedSystem(structure, memory_budget=model.memory_budget)
    except TooLarge as err:
        raise TooLarge(f"The fixed effects' covariance needs the engine's blocked factorization: {err} "
                       "Raise `memory_budget`.") from err
    lambdas = [None] * structure.num_random
    for j, term in enumerate(model.terms):
        lambdas[structure.order[j]] = semidefinite_cholesky(np.asarray(term.prior_covariance(), "float64"))
    return covariances.conditional_covariance(system, lambdas, information)


def coef_table(fixef, vcov, t_values=False):
    """Estimate, Std. Error and z value with Pr(>|z|); or, as lme4 prints a linear mixed
    model's (`t_values`), t value without p-values (their degrees of freedom are not
    defined)."""
    se = np.sqrt(np.diag(vcov))
    z = fixef.values / se
    if t_values:
        return pd.DataFrame({"Estimate": fixef.values, "Std. Error": se, "t value": z}, index=fixef.index)
    return pd.DataFrame(
        {"Estimate": fixef.values, "Std. Error": se, "z value": z,
         "Pr(>|z|)": 2 * special.ndtr(-np.abs(z))},  # 2 P(Z > |z|)
        index=fixef.index,
    )


# ---------------------------------------------------------------- ranef
def ranef(model, condvar=True):
    """Per grouping factor a DataFrame of conditional means (and posterior sds).

    Terms on the same grouping factor (e.g. `(1|g) + (0+x|g)`) share one frame, as
    in lme4. Posterior sds come as columns `"<effect> sd"` when `condvar`.
    """
    frames = {}
    for term in model.terms:
        group = term_group(model, term)
        names = term_columns(model, term)
        levels = term_levels(model, term)
        frame = pd.DataFrame(conditional_mean(model, term), index=levels, columns=names)
        if condvar:
            sd = pd.DataFrame(
                conditional_stddev(model, term), index=levels, columns=[f"{n} sd" for n in names]
            )
            frame = pd.concat([frame, sd], axis=1)
        frame.index.name = group
        frames[group] = frame if group not in frames else pd.concat([frames[group], frame], axis=1)
    return frames


def coef(model):
    """lme4's `coef()`: per grouping factor, fixed effects plus each level's random effects."""
    fixef = model.fixef()
    out = {}
    for group, frame in ranef(model, condvar=False).items():
        table = pd.DataFrame(np.tile(fixef.values, (len(frame), 1)), index=frame.index, columns=fixef.index)
        for column in frame.columns:
            if column in table.columns:
                table[column] = table[column] + frame[column]
            else:
                table[column] = frame[column]
        out[group] = table
    return out


# ---------------------------------------------------------------- report
def _format_table(frame, digits=4):
    return frame.to_string(float_format=lambda v: f"{v:.{digits}g}" if abs(v) < 1e-3 else f"{v:.{digits}f}")


def report(model):
    """An lme4-like printed summary of a fitted model (a string)."""
    design = getattr(model, "design", None)
    fit = model.fit_summary_ or {}
    lines = []
    method = "restricted maximum likelihood (REML)" if getattr(model, "reml", False) else "maximum likelihood"
    lines.append(f"Generalized linear mixed model fit by variational inference ({method}, "
                 f"{model.posterior_kind} posterior)")
    lines.append(f" Family: {model.family.name}  ( {model.family.link.name} )")
    if design is not None:
        lines.append(f"Formula: {design.spec.formula}")
    if fit.get("estimator"):
        lines.append(f"Estimator: {fit['estimator']}")
    if "elbo" in fit:
        npar = fit["num_parameters"]
        elbo = fit["elbo"]
        lines.append("")
        how = {
            "exact": "   (= logLik: the posterior is exact)",
            "quadrature": "   (= logLik, by adaptive Gauss-Hermite quadrature: the exact ML fit)",
            "approximate": "   (= logLik by adaptive Gauss-Hermite quadrature, its nodes NOT verified: see Estimator)",
            "bound": "   (a lower bound of logLik)",
        }[fit.get("likelihood", "exact" if fit["exact"] else "bound")]
        lines.append(f"     ELBO {elbo:.4f}" + how)
        if not getattr(model, "reml", False):
            lines.append(
                f"      AIC {model.AIC():.2f}   BIC {model.BIC():.2f}"
                f"   (from the ELBO, {npar} parameters)"
            )
    lines.append("")
    lines.append("Random effects:")
    vc = varcorr(model)
    table = []
    for _, row in vc.iterrows():
        if row["var2"] is None or (isinstance(row["var2"], float) and math.isnan(row["var2"])):
            name = row["var1"] if isinstance(row["var1"], str) else ""
            table.append([row["grp"], name, row["vcov"], row["sdcor"]])
    frame = pd.DataFrame(table, columns=["Groups", "Name", "Variance", "Std.Dev."])
    corr_rows = vc[vc["var2"].notna()]
    if len(corr_rows):
        frame["Corr"] = ""
        for _, row in corr_rows.iterrows():
            hit = frame.index[(frame["Groups"] == row["grp"]) & (frame["Name"] == row["var2"])]
            frame.loc[hit, "Corr"] = (frame.loc[hit, "Corr"] + f" {row['sdcor']:.3f}").str.strip()
    lines.append(frame.to_string(index=False))
    if design is not None:
        counts = ", ".join(f"{r.term.group}, {r.n_levels}" for r in design.random)
        lines.append(f"Number of obs: {fit.get('nobs', '?')}, groups:  {counts}")
    lines.append("")
    lines.append("Fixed effects:")
    try:
        lines.append(_format_table(model.coef_table()))
    except Exception as err:  # noqa: BLE001 - the report must print even without SEs
        lines.append(model.fixef().to_string() + f"\n(standard errors unavailable: {err})")
    if model.family.name == "ordinal":  # clmm's "Threshold coefficients"
        lines.append("")
        lines.append("Threshold coefficients:")
        try:
            lines.append(_format_table(model.coef_table(component="thresholds").iloc[:, :3]))
        except ValueError as err:
            lines.append(model.fixef(component="thresholds").to_string() + f"\n(standard errors unavailable: {err})")
    if "zi_odds" in model.family.dispersion_params:
        ziformula = getattr(design, "ziformula", None) or "~1"
        lines.append("")
        lines.append(f"Zero-inflation (logit of the zero-inflation probability, ziformula {ziformula}):")
        try:
            lines.append(_format_table(model.coef_table(component="zi")))
        except Exception as err:  # noqa: BLE001
            lines.append(model.fixef(component="zi").to_string() + f"\n(standard errors unavailable: {err})")
    lines.append("")
    check = fit.get("convergence")
    if check is not None:
        # The engine's end point, checked by its derivatives (lme4's checkConv).
        verdict = "Converged" if model.converged_ else "NOT CONVERGED"
        lines.append(f"{verdict} ({fit.get('epochs', '?')} epochs): max|grad| {check['max_gradient']:.2g} "
                     f"(tol {check['tolerance']:g}, deviance scale), Hessian on {check['num_free']} free "
                     f"parameters with {check['negative_eigenvalues']} negative eigenvalue(s), smallest "
                     f"{check['smallest_eigenvalue']:.3g}.")
        if not model.converged_:
            lines.append(f"Model failed to converge: a Newton step would still gain "
                         f"{check['predicted_decrease']:.3g} in the log-likelihood (component {check['component']}).")
    elif model.converged_:
        lines.append(f"Converged: the ELBO changed by less than its tolerance ({fit.get('epochs', '?')} epochs).")
    else:
        lines.append("NOT CONVERGED: the ELBO was still changing when fitting stopped; fit again.")
    singular = singular_components(model)
    if singular:
        lines.append("boundary (singular) fit: " + "; ".join(singular))
    return "\n".join(lines)


def warn_if_singular(model):
    singular = singular_components(model)
    if singular:
        warnings.warn("boundary (singular) fit: " + "; ".join(singular), RuntimeWarning, stacklevel=3)
