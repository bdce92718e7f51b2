"""Predictions of a GLMM: lme4's `predict` (with intervals), `simulate` and posterior draws.

`Predictions` is a mixin of `keras_glmm.model.GLMM`: `predict_response` (means or
the linear predictor for new data, `re_form`, new levels), `posterior_predictive`,
`simulate`, and Keras's `predict` in batches of `PREDICT_BATCH_ROWS` rows.

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

import weakref

import numpy as np
import pandas as pd
import tensorflow as tf
from scipy import stats

from keras_glmm import composition, frames
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import response as response_lib
from keras_glmm import results as results_lib
from keras_glmm.formula import parse_formula

INTERVALS = ("confidence", "prediction")
# Rows per step of `predict` (see `Predictions.predict`).
PREDICT_BATCH_ROWS = 2**16


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


def simulate_responses(model, nsim=1, seed=None, newdata=None, re_form="~0", trials=None):
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


def _check_positive_integer(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


# Each model's one-step predict function (see `Predictions.predict`), dropped with the model.
_ONE_STEP_PREDICT = weakref.WeakKeyDictionary()


class Predictions:
    """lme4's `predict`, `simulate` and posterior predictive draws of a fitted `GLMM`."""

    def _rows_index(self, newdata):
        """The pandas index of the rows a result is for (`keras_glmm.frames`), or None for arrays."""
        if isinstance(newdata, pd.DataFrame):
            return self._frame_index  # the rows `_prediction_inputs` just kept
        if newdata is None and self._training_arrays is not None and self._training_index is not None:
            if len(self._training_index) == len(self._training_arrays[1]):
                return self._training_index
        return None

    def _kept_terms(self, re_form):
        """The terms a `re_form` keeps: all (None), none (`~0`, `NA`), or those it names."""
        if re_form is None:
            return set(self.terms)
        text = str(re_form).strip()
        if text.replace(" ", "") in ("~0", "NA", "~1-1"):
            return set()
        try:
            groups = {t.group for t in parse_formula(text if text.startswith("~") else "~" + text).random}
        except ValueError as err:
            raise ValueError(f"`re_form` must be None, '~0' or a formula of random terms: {err}") from err
        if not groups:
            raise ValueError(
                "`re_form` must be None (all random effects), '~0' (none) or random-effect terms such "
                f"as '~(1|g)'. Received: re_form={re_form!r}"
            )
        by_group = {results_lib.term_group(self, t): t for t in self.terms}
        unknown = sorted(groups - {results_lib.term_group(self, t) for t in self.terms})
        if unknown:
            raise ValueError(
                f"`re_form` names grouping factor(s) {unknown} that the model does not have; its terms' "
                f"groups are {sorted(by_group)}."
            )
        return {t for t in self.terms if results_lib.term_group(self, t) in groups}

    def _prediction_inputs(self, newdata, re_form, allow_new_levels):
        """Inputs for prediction; terms left out by `re_form` get level -1 (the population)."""
        if newdata is None:
            x, _ = self._require_fit()
        elif isinstance(newdata, pd.DataFrame):
            if self.design is None:
                raise ValueError("`newdata` as a DataFrame needs a model built from a formula.")
            x, _ = self._frame_arrays(newdata, with_response=False)
        else:
            x = newdata
        x = {k: v for k, v in x.items() if k != response_lib.WEIGHTS}
        if composition.is_network(self.fixed_effects):  # level names -> indices, strings -> tensors
            x = composition.prediction_inputs(self, x)
        kept = self._kept_terms(re_form)
        rows = len(x["x"]) if "x" in x else len(next(iter(x.values())))
        for term in self.terms:
            if term not in kept:
                x[term.name] = np.full(rows, -1, "int64")
            elif not allow_new_levels:
                new = np.flatnonzero(np.asarray(x[term.name]) < 0)
                if new.size:
                    group = results_lib.term_group(self, term)
                    raise ValueError(
                        f"Row {int(new[0])} has a level of '{group}' not seen in training "
                        f"({new.size} rows); pass allow_new_levels=True to predict them at "
                        "the population level."
                    )
        return x

    def predict_response(self, newdata=None, re_form=None, allow_new_levels=True, type="response",
                         interval=None, level=0.95):
        """lme4's `predict`: the mean response (or linear predictor) for new data.

        Args:
            newdata: a DataFrame (formula models), a dict of arrays, or None for the
                training rows.
            re_form: None to include every random effect; `"~0"` for the fixed
                effects only (population level); random terms such as `"~(1|g)"` for
                the terms of those grouping factors only.
            allow_new_levels: levels not seen in training get the population value
                (random effect 0); False makes them an error.
            type: `"response"` (the mean) or `"link"` (the linear predictor).
            interval: None, `"confidence"` or `"prediction"` (gaussian): a DataFrame
                `fit`, `lower`, `upper` at `level` (`keras_glmm.prediction`).

        Returns:
            One value per row: a pandas Series indexed like `newdata`'s rows (the
            training frame's for `newdata=None`), a numpy array for arrays; a
            DataFrame `fit`, `lower`, `upper` with `interval`. For an ordinal model a
            DataFrame of each row's category probabilities, one column per category
            (`type="link"`: clmm's `eta = x' beta + z' b`, without the intercept the
            thresholds replace).
        """
        if interval is not None:
            return predict_interval(self, newdata, re_form, allow_new_levels, type, interval, level)
        if type not in ("response", "link"):
            raise ValueError(f"`type` must be 'response' or 'link'. Received: type={type!r}")
        x = self._prediction_inputs(newdata, re_form, allow_new_levels)
        out = self.predict(x, verbose=0)
        if ordinal_lib.is_ordinal(self.family):  # category probabilities; clmm's eta has no intercept
            if type == "link":
                return frames.series(ordinal_lib.link_without_intercept(self, out["eta"]), self._rows_index(newdata))
            return ordinal_lib.probabilities(self, out["eta"], newdata.index if isinstance(newdata, pd.DataFrame)
                                             else None)
        return frames.series(out["mean"] if type == "response" else out["eta"], self._rows_index(newdata))

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Keras's `predict`; a data frame (formula models) gives `predict_response`'s means.

        Arrays go in batches of `batch_size` rows (default 65,536: a row's
        prediction is a few gathers, and Keras's default of 32 rows would make a
        prediction of 100k rows thousands of steps), one step per execution: Keras
        unrolls a predict execution's steps into one graph, so the fit's 100 steps
        per execution would trace 100 copies of the model before the first row.
        """
        if isinstance(x, pd.DataFrame):
            if steps is not None or callbacks is not None:
                raise ValueError("predict(data_frame) takes no options beyond verbose and batch_size.")
            return self.predict_response(x)
        if batch_size is None and not isinstance(x, tf.data.Dataset):
            batch_size = PREDICT_BATCH_ROWS
        if isinstance(x, dict) and x and all(np.shape(v)[:1] == (0,) for v in x.values()):
            # No rows: Keras's predict loop would run no step and fail on its empty output.
            return tf.nest.map_structure(np.asarray, self({k: tf.convert_to_tensor(v) for k, v in x.items()},
                                                          training=False))
        compiled = self.steps_per_execution
        if compiled == 1:
            return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
        # The one-step function is kept between calls (not as an attribute, which a
        # SavedModel would try to save): a new one per call made TensorFlow warn of
        # retracing from the sixth prediction on.
        self.steps_per_execution, self.predict_function = 1, _ONE_STEP_PREDICT.get(self)
        try:
            return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
        finally:
            if self.predict_function is not None:
                _ONE_STEP_PREDICT[self] = self.predict_function
            self.steps_per_execution, self.predict_function = compiled, None

    def _response_of(self, newdata, trials):
        """`(trials, prior weights)` of the rows predicted: the training rows' own, or newdata's.

        A binomial model with trials needs the new rows' trials (its cbind columns or
        weights column in a data frame, else `trials=`), a gaussian model with prior
        weights their weights: never the training rows'.
        """
        if newdata is None:
            x, y = self._require_fit()
            given = response_lib.split(y)[1]
            return (given if trials is None else trials), response_lib.prior_weights(x)
        with_trials = self._training_arrays is not None and response_lib.split(self._training_arrays[1])[1] is not None
        design = self.design
        if design is not None:
            with_trials = design.response_kind in ("cbind", "proportion")
        weights = None
        if isinstance(newdata, pd.DataFrame) and design is not None:
            column = getattr(self, "_weights", None)
            if trials is None and design.response_kind == "cbind":
                try:
                    trials = design.response(newdata)[:, 1]
                except ValueError as err:
                    raise ValueError(
                        f"Draws of {design.spec.response} need the new rows' trials: newdata must hold "
                        f"the columns of the cbind() response (successes and failures), or pass trials=. {err}"
                    ) from err
            elif trials is None and design.response_kind == "proportion":
                trials = design._weights_array(newdata, column)
            if design.weights_kind == "prior" and self.family.name == "gaussian":
                weights = design.prior_weights(newdata, column)
        elif isinstance(newdata, dict):
            weights = response_lib.prior_weights(newdata)
        if with_trials and trials is None:
            raise ValueError(
                "This binomial model was fitted with trials: draws for new rows need theirs (trials=)."
            )
        return trials, weights

    def posterior_predictive(self, newdata=None, num_draws=1000, seed=None, re_form=None, trials=None):
        """Posterior predictive draws of the response, `(num_draws, rows)`.

        Each draw takes the linear predictor from its posterior, `N(eta, eta_var +
        x' vcov x)` (random effects' uncertainty, a new level's prior variance and
        the fixed effects' standard errors included), then the response from the
        family: quantiles of the draws are prediction intervals. Binomial draws use
        the rows' own trials (`trials=`, or newdata's columns); a gaussian model's
        prior weights divide the rows' variance.

        Returns:
            For a data frame (or a formula model's training rows, `newdata=None`) a
            DataFrame indexed like its rows with columns `draw_1` ... (one per draw);
            for arrays a numpy array `(num_draws, rows)`.
        """
        _check_positive_integer(num_draws, "num_draws")
        x = self._prediction_inputs(newdata, re_form, True)
        index = self._rows_index(newdata)
        trials, weights = self._response_of(newdata, trials)
        out = self.predict(x, verbose=0)
        eta_var = out["eta_var"].astype("float64")
        if self._training_arrays is not None or self._engine_fit is not None:
            vcov = self.vcov().values
            xx = np.asarray(x["x"], "float64")
            eta_var = eta_var + np.einsum("ij,jk,ik->i", xx, vcov, xx)
        rng = np.random.default_rng(seed)
        eta = out["eta"][None, :] + np.sqrt(eta_var)[None, :] * rng.standard_normal((num_draws, len(eta_var)))
        return frames.draws(self._sample_response(eta, trials, weights, rng, row_params=self._row_params(out)),
                            index, "draw")

    def _row_params(self, out):
        """The parameters that vary by row (a zero-inflation with covariates), from `predict`'s output."""
        return {"zi_odds": out["zi_odds"]} if self.zero_inflation is not None else {}

    def _sample_response(self, eta, trials, weights, rng, row_params=None):
        """Responses drawn at linear predictors `eta` `(draws, rows)`; `row_params` `(rows,)` each.

        The zero-inflation probabilities are at their estimates (their uncertainty is not drawn).
        The family's draws take a stateless seed from `rng` (a `numpy.random.Generator`):
        an integer seed would be a stateful one, whose draws change from call to call.
        """
        shape = eta.shape
        params = {k: np.full(shape, v) for k, v in self.dispersion().items()}
        params.update({k: np.broadcast_to(np.asarray(v, "float64"), shape) for k, v in (row_params or {}).items()})
        if weights is not None and self.family.name == "gaussian":
            params["scale"] = params["scale"] / np.sqrt(np.maximum(weights, 1e-300))[None, :]
        params = {k: tf.constant(v, tf.float64) for k, v in params.items()}
        trials_t = None if trials is None else tf.constant(np.broadcast_to(trials, shape), tf.float64)
        dist = self.family.distribution(tf.constant(eta, tf.float64), params, trials=trials_t)
        return dist.sample(seed=tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int32)).numpy()

    def simulate(self, nsim=1, seed=None, newdata=None, re_form="~0", trials=None):
        """lme4's `simulate`: new responses, `(nsim, rows)`, for the training rows or `newdata`.

        Random effects of the terms `re_form` keeps are held at their conditional means,
        the others drawn afresh from their fitted prior `N(0, Sigma)` (lme4's default
        `re.form = NA`: all drawn); fixed effects and dispersion at their estimates;
        binomial trials and a gaussian model's prior weights are the rows' own (see
        `simulate_responses`).

        Returns:
            For a data frame (`newdata`, or the training frame), lme4's layout: a
            DataFrame indexed like its rows with columns `sim_1` ... `sim_<nsim>`;
            for arrays a numpy array `(nsim, rows)`.
        """
        _check_positive_integer(nsim, "nsim")
        values = simulate_responses(self, nsim=nsim, seed=seed, newdata=newdata, re_form=re_form, trials=trials)
        return frames.draws(values, self._rows_index(newdata), "sim")

