"""Ordinal responses (cumulative link mixed models, `ordinal::clmm`'s) around a fitted GLMM.

The family is `keras_glmm.families.Ordinal`; this module holds what the rest of the
package needs around it, in clmm's terms:

- the response: an ordered pandas Categorical (its categories, in order), or
  numbers (their sorted distinct values), read as category codes ``1..K``;
- the thresholds ``theta_k = c_k - a`` (clmm's ``fit$alpha``, named ``"1|2"``, ...)
  from the fixed part's intercept ``a`` and the family's gaps, and their covariance
  by the delta method from the engine's inverse Hessian in ``(a, log gap_2, ...)``;
- the fixed effects without the intercept (clmm's ``fit$beta``), ``eta = x' beta +
  z' b`` without it (clmm's linear predictor), and each row's category probabilities
  ``P(y = k) = F(theta_k - eta) - F(theta_{k-1} - eta)``.
"""

import warnings

import numpy as np
import pandas as pd

from keras_glmm.levels import level_key, level_keys

INTERCEPT = "(Intercept)"


def is_ordinal(family):
    return getattr(family, "name", None) == "ordinal"


# ---------------------------------------------------------------- the response
def response_levels(series, name):
    """The categories of an ordinal response, in order, as strings.

    An ordered Categorical gives its categories (unused ones dropped with a warning,
    as R drops unused levels); numbers give their sorted distinct values; an
    unordered Categorical or strings are refused unless every level is a number
    (an alphabetical order would be silently wrong for "low" < "medium" < "high").
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        if not series.dtype.ordered and not _numeric_levels(series.cat.categories):
            raise ValueError(
                f"ordinal response '{name}' is an unordered categorical with levels "
                f"{list(series.cat.categories)[:10]}: make it ordered, e.g. "
                f"data['{name}'] = pd.Categorical(data['{name}'], categories=[...], ordered=True)")
        categories = list(series.cat.categories)
        if not series.dtype.ordered:
            categories = sorted(categories, key=lambda c: float(level_key(c)))
        used = set(series.dropna().unique().tolist())
        unused = [c for c in categories if c not in used]
        if unused:
            warnings.warn(f"ordinal response '{name}': dropped unused categories {unused}, as R drops "
                          "unused levels (they get no threshold).", UserWarning, stacklevel=4)
        levels = [level_key(c) for c in categories if c in used]
    elif pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(np.float64)
        values = values[np.isfinite(values)]
        levels = level_keys(np.unique(values))
    elif _numeric_levels(series.dropna().unique()):
        levels = sorted({level_key(v) for v in series.dropna()}, key=float)
    else:
        raise ValueError(
            f"ordinal response '{name}' holds strings {sorted(map(str, series.dropna().unique()))[:10]} "
            "with no order: pass an ordered pandas Categorical, or integer codes 1..K")
    if len(levels) < 2:
        raise ValueError(f"ordinal response '{name}' has {len(levels)} category(ies) {levels}; it needs at least 2.")
    return levels


def _numeric_levels(values):
    try:
        [float(level_key(v)) for v in values]
    except (TypeError, ValueError):
        return False
    return len(values) > 0


def response_codes(series, levels, name, index):
    """Each row's category code ``1..K`` (float64), by its level's key.

    Raises:
        ValueError: naming the rows whose value is not one of `levels` (or missing).
    """
    keys = np.array(level_keys(series.astype(object).where(series.notna(), None).to_numpy()), dtype=object)
    position = {level: float(k + 1) for k, level in enumerate(levels)}
    codes = np.array([position.get(k, np.nan) if k is not None and k != "None" else np.nan for k in keys])
    bad = ~np.isfinite(codes)
    if bad.any():
        rows = [index[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(
            f"ordinal response '{name}' has value(s) {sorted({str(k) for k in keys[bad]})[:5]} at rows {rows} "
            f"that are not among its categories {levels}")
    return codes


# ---------------------------------------------------------------- results
def intercept_index(model):
    return list(model.design.fixed_columns).index(INTERCEPT)


def thresholds(model):
    """clmm's thresholds ``theta_k = c_k - a`` as a Series named ``"1|2"``, ``"2|3"``, ..."""
    beta = model.coefficients()
    values = model.family.thresholds(model.dispersion(), beta[intercept_index(model)])
    return pd.Series(values, name="Estimate", dtype="float64")


def fixef(model):
    """The fixed effects without the intercept (clmm's ``fit$beta``)."""
    beta = pd.Series(model.coefficients(), index=list(model.design.fixed_columns), name="Estimate")
    return beta.drop(INTERCEPT)


def vcov(model, covariance):
    """The fixed effects' covariance without the intercept's row and column."""
    names = list(model.design.fixed_columns)
    frame = pd.DataFrame(covariance, index=names, columns=names)
    return frame.drop(index=INTERCEPT, columns=INTERCEPT)


def threshold_covariance(solver, intercept):
    """Covariance of the thresholds after the engine's exact-ML phase, else None.

    The engine's inverse Hessian of ``-log L`` in ``(a, log gap_2, ..., log gap_{K-1})``
    (its joint covariance, as clmm's ``vcov``), mapped by the Jacobian of
    ``theta_k = -a + sum_{j <= k} gap_j``: ``d theta_k / d a = -1``,
    ``d theta_k / d log gap_j = gap_j`` for ``j <= k``.
    """
    family = solver.family
    if not is_ordinal(family) or solver.phase != "quadrature":
        return None
    par = solver.parameters
    names = [n for n in family.dispersion_params if n in par.dispersion_names]
    if len(names) != len(family.dispersion_params):
        return None  # a gap held fixed: no joint covariance of the thresholds
    wanted = [intercept] + [solver.num_fixed + par.num_theta + par.dispersion_names.index(n) for n in names]
    block = solver.joint_covariance(np.array(wanted))
    gaps = [solver.state.dispersion[n] for n in names]
    k = family.num_categories - 1
    jacobian = np.zeros((k, 1 + len(gaps)))
    jacobian[:, 0] = -1.0
    for j, gap in enumerate(gaps, start=1):
        jacobian[j:, j] = gap  # theta_{j+1}, ... contain gap_{j+1}
    return jacobian @ block @ jacobian.T


def link_without_intercept(model, eta):
    """clmm's ``eta = x' beta + z' b``: the model's linear predictor less the intercept."""
    return np.asarray(eta, np.float64) - model.coefficients()[intercept_index(model)]


def probabilities(model, eta, index=None):
    """Each row's category probabilities at the model's linear predictor ``eta``, a DataFrame
    with one column per category and the rows' `index` (`predict_response`'s answer for an
    ordinal model)."""
    probs = model.family.category_probabilities(np.asarray(eta, np.float64), model.dispersion())
    return pd.DataFrame(probs, columns=list(model.family.levels), index=index)
