"""Intervals for predicted means and simulation of new responses (lme4's `predict` and `simulate`).

**Intervals** (`predict_response(newdata, interval=...)`), on the link scale and
mapped by the inverse link for `type="response"`, with normal quantiles `z`:

```
confidence:  Var = x' vcov(beta) x + sum over the terms re_form keeps, at levels seen
                   in training, of z_t' S_tc z_t              (S_tc: the level's posterior covariance)
prediction:  Var = confidence + sum over the other terms (left out by re_form, or a
                   level never seen) of z_t' Sigma_t z_t + sigma^2 / w     (gaussian only)
interval:    eta +- z sqrt(Var)
```

So a confidence interval is for the mean the prediction states: with `re_form="~0"`
the population mean (fixed effects' uncertainty only), with the random effects the
group's conditional mean (their conditional variance added; the covariance between
`beta` and the random effects' estimates is left out, as merTools does). A new
level is predicted at the population value, and its mean's uncertainty is the
fixed effects'; a prediction interval adds the spread of a new group (its prior
variance) and of a new observation. Prediction intervals are for gaussian models
(elsewhere `posterior_predictive`'s draws give them).

**Simulation** (`simulate(nsim, newdata=, re_form=)`): lme4's `simulate`. The terms
`re_form` keeps are held at their conditional means (`re_form=None`: all), the
others drawn afresh from `N(0, Sigma_t)` per level (lme4's default `re_form = NA`:
all drawn), then responses from the family. Rows of `newdata` at a level never seen
get a fresh draw for that level (whatever `re_form`), one per distinct level of the
grouping column(s).
"""

import numpy as np
import pandas as pd
import tensorflow as tf
from scipy import stats

from keras_glmm import results as results_lib

INTERVALS = ("confidence", "prediction")


def _rows_index(model, newdata, rows):
    """The index of the rows predicted: newdata's (its complete rows under na_action='omit')."""
    if isinstance(newdata, pd.DataFrame):
        if len(newdata) == rows:
            return newdata.index
        design = model.design
        if design is not None and design.na_action == "omit":
            return newdata.index[design.complete_rows(newdata, with_response=False)]
    return pd.RangeIndex(rows)


def _term_args(term, x):
    return [x[term.name], x[term.name + "_z"]] if term.num_covariates else x[term.name]


def _term_variances(model, x):
    """Per term `(level index, conditional variance, prior variance)` of each row's contribution."""
    out = []
    for term in model.terms:
        index = np.asarray(x[term.name]).reshape(-1)
        conditional = np.asarray(term(_term_args(term, x), training=False))[:, 1].astype("float64")
        new = dict(x)
        new[term.name] = np.full(len(index), -1, "int64")
        prior = np.asarray(term(_term_args(term, new), training=False))[:, 1].astype("float64")
        out.append((term, index, conditional, prior))
    return out


def predict_interval(model, newdata, re_form, allow_new_levels, type, interval, level):
    """`predict_response`'s interval: a DataFrame `fit`, `lower`, `upper` (see the module docstring)."""
    if interval not in INTERVALS:
        raise ValueError(f"`interval` must be None, 'confidence' or 'prediction'. Received: interval={interval!r}")
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be a number between 0 and 1. Received: level={level!r}")
    if interval == "prediction" and model.family.name != "gaussian":
        raise ValueError(
            f"interval='prediction' is for gaussian models; for the {model.family.name} family take quantiles "
            "of posterior_predictive(newdata, num_draws=...) draws.")
    if model._training_arrays is None and model._engine_fit is None:
        model._require_fit()  # the fixed effects' covariance needs the fit
    x = model._prediction_inputs(newdata, re_form, allow_new_levels)
    every = model._prediction_inputs(newdata, None, True)
    out = model.predict(x, verbose=0)
    eta = np.asarray(out["eta"], "float64")
    xx = np.asarray(x["x"], "float64")
    variance = np.einsum("ij,jk,ik->i", xx, model.vcov().to_numpy(), xx)
    kept = model._kept_terms(re_form)
    spread = np.zeros_like(variance)
    for term, index, conditional, prior in _term_variances(model, every):
        seen = (index >= 0) & (term in kept)
        variance += np.where(seen, conditional, 0.0)
        spread += np.where(seen, 0.0, prior)
    if interval == "prediction":
        _, weights = model._response_of(newdata, None)
        w = np.ones_like(variance) if weights is None else np.asarray(weights, "float64").reshape(-1)
        variance = variance + spread + model.sigma() ** 2 / np.maximum(w, 1e-300)
    half = stats.norm.ppf(0.5 + float(level) / 2.0) * np.sqrt(variance)
    fit, lower, upper = eta, eta - half, eta + half
    if type == "response":
        def mean(e):
            return np.asarray(model.family.mean(tf.constant(e, tf.float64)), "float64")
        fit, a, b = mean(eta), mean(lower), mean(upper)
        lower, upper = np.minimum(a, b), np.maximum(a, b)  # a decreasing link (inverse)
    elif type != "link":
        raise ValueError(f"`type` must be 'response' or 'link'. Received: type={type!r}")
    return pd.DataFrame({"fit": fit, "lower": lower, "upper": upper}, index=_rows_index(model, newdata, len(fit)))


def _level_codes(model, term, index, newdata):
    """Level codes of the rows for fresh draws: the training index, and for levels never
    seen (-1) codes after them, one per distinct value of the grouping column(s)."""
    codes = np.asarray(index, "int64").copy()
    new = codes < 0
    if not new.any():
        return codes, term.num_levels
    group = results_lib.term_group(model, term)
    parts = group.split(":")
    if not isinstance(newdata, pd.DataFrame) or not all(p in newdata.columns for p in parts):
        raise ValueError(
            f"Rows {np.flatnonzero(new)[:5].tolist()} have levels of '{group}' not seen in training: simulating "
            f"them needs newdata as a DataFrame with the column(s) {parts} to tell the new levels apart.")
    keys = newdata.loc[:, parts].astype(str).agg(":".join, axis=1).to_numpy()
    if len(keys) != len(codes):  # na_action='omit' dropped rows
        keys = keys[model.design.complete_rows(newdata, with_response=False)]
    fresh, _ = pd.factorize(keys[new])
    codes[new] = term.num_levels + fresh
    return codes, term.num_levels + int(fresh.max()) + 1


def simulate(model, nsim=1, seed=None, newdata=None, re_form="~0", trials=None):
    """lme4's `simulate(fit, nsim, seed, newdata, re.form)`: responses `(nsim, rows)`
    (see the module docstring)."""
    if newdata is None:
        model._require_fit()
    rng = np.random.default_rng(seed)
    kept = model._kept_terms(re_form)
    every = model._prediction_inputs(newdata, None, True)
    x = model._prediction_inputs(newdata, re_form, True)
    out = model.predict(x, verbose=0)
    response_trials, weights = model._response_of(newdata, trials)
    eta = np.tile(np.asarray(out["eta"], "float64"), (nsim, 1))
    rows = eta.shape[1]
    for term in model.terms:
        index = np.asarray(every[term.name]).reshape(-1)
        drawn = np.ones(rows, bool) if term not in kept else index < 0
        if not drawn.any():
            continue
        codes, num_levels = _level_codes(model, term, index, newdata)
        # A square root that a boundary fit's singular covariance also has.
        values, vectors = np.linalg.eigh(term.prior_covariance())
        root = vectors * np.sqrt(np.maximum(values, 0.0))
        b = rng.standard_normal((nsim, num_levels, term.num_effects)) @ root.T
        z = np.ones((rows, 1)) if term.intercept else np.zeros((rows, 0))
        if term.num_covariates:
            z = np.concatenate([z, np.asarray(every[term.name + "_z"], "float64").reshape(rows, -1)], axis=1)
        contribution = np.einsum("nk,snk->sn", z, b[:, np.where(drawn, codes, 0)])
        eta += np.where(drawn[None, :], contribution, 0.0)
    return model._sample_response(eta, response_trials, weights if model.family.name == "gaussian" else None,
                                  rng, row_params=model._row_params(out))
