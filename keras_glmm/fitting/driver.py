"""The fit drivers' interface: a fit's request, `FitDriver`, and the finish every fit ends on.

See `keras_glmm.fitting` for how `GLMM.fit` picks a driver. A fit by any of them
ends on `FitDriver.finish`, which leaves on the model what the results read:

```
converged_      whether the fit converged (the driver's criterion)
fit_summary_    ELBO (logLik), nobs, number of parameters, estimator, epochs
training rows   the arrays fitted (residuals, vcov after stochastic VI), or the files
```
"""

import abc
import dataclasses
import warnings

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm import composition
from keras_glmm import initialization
from keras_glmm import response as response_lib
from keras_glmm import results as results_lib
from keras_glmm.layers.fixed_effects import VariationalFixedEffects

# In-memory data up to this many rows is fitted full-batch by default: the ELBO is
# then deterministic (closed-form expectations, no minibatch noise) and converges to
# the optimum instead of jittering around it. Beyond it a non-gaussian model leaves
# the engine for full-batch coordinate ascent, unless its design is nested
# (`engine.row_limit`), and files are read in batches.
FULL_BATCH_ROWS = 2**18
# Rows per evaluation when the ELBO of a whole data set is computed.
ELBO_CHUNK_ROWS = 2**20


@dataclasses.dataclass
class FitRequest:
    """The arguments of one `GLMM.fit` call; `data(model)` prepares in-memory data once.

    `options` holds the keywords `fit` passes on to Keras's `fit` (`sample_weight`,
    `validation_data`, ...; a files fit's `shuffle_buffer`); `seed` seeds the
    shuffle of in-memory minibatches and of files.
    """

    x: object
    y: object = None
    batch_size: int | None = None
    epochs: int | None = None
    verbose: object = 0
    callbacks: list | None = None
    steps_per_epoch: int | None = None
    initialize: bool = True
    seed: int | None = None
    options: dict = dataclasses.field(default_factory=dict)
    _prepared: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def in_memory(self):
        """Whether the data are arrays in memory: a dict of them, or a formula model's data frame."""
        return isinstance(self.x, (dict, pd.DataFrame))

    def data(self, model):
        """`(x, y, num_rows)`: the data checked and coded, the levels counted, the GLM start
        taken on a first fit (`prepare`); computed once, by whichever driver asks first."""
        if self._prepared is None:
            frame = isinstance(self.x, pd.DataFrame)
            x, y = fit_inputs(model, self.x, self.y)
            model._training_index = model._frame_index if frame else None
            sample_weight = self.options.pop("sample_weight", None)
            if sample_weight is not None:
                if response_lib.WEIGHTS in x:
                    raise ValueError("Prior weights came twice: as `sample_weight` and as inputs['weights'].")
                rows = np.shape(x["x"])[0] if "x" in x else len(sample_weight)
                x = {**x, response_lib.WEIGHTS: initialization.check_weights(sample_weight, rows)}
            initialize = self.initialize and not model._data_initialized
            self._prepared = prepare(model, x, y, initialize=initialize)
        return self._prepared


class FitDriver(abc.ABC):
    """One way of fitting a GLMM: `select` says whether it takes a request, `fit` runs it."""

    @classmethod
    @abc.abstractmethod
    def select(cls, model, request):
        """This driver, ready to fit `request`, or None to leave it to the next one."""

    @abc.abstractmethod
    def fit(self, model, request):
        """Trains `model` on `request`'s data; returns Keras's `History`."""

    @staticmethod
    def keras_fit(model, x, **kwargs):
        """Keras's own `fit` loop on the model (`GLMM.fit` is the dispatcher that called us)."""
        return keras.Model.fit(model, x, **kwargs)

    @staticmethod
    def finish(model, history, converged, callbacks, training=None, source=None, nobs=None, elbo=None,
               last_delta=None, failure=None):
        """Records a finished fit: convergence, summary, final reports, a warning.

        Args:
            training: the `(x, y)` arrays fitted, kept for the results; None for files.
            source: the files of a fit streamed from them (no rows are kept).
            nobs: the number of rows (default: those of `training`).
            elbo: the final ELBO (default: that of the model on `training`).
            last_delta: the last change in the ELBO per observation, for the warning.
            failure: why the end point is no minimum (the engine's check), for the warning.
        """
        model.converged_ = bool(converged)
        model._training_arrays = training
        model._training_source = source
        if elbo is None:
            elbo = model.elbo(*training)["elbo"]
        if nobs is None:
            nobs = len(training[1])
        record_fit_summary(model, elbo, nobs, history)
        for callback in callbacks:
            # Callbacks that report the finished fit (GLMMTensorBoard) need the summary.
            if hasattr(callback, "write_final"):
                callback.write_final(model)
        if failure is not None:
            # The optimizer stopped, but the derivatives at its end point say it is no minimum.
            warnings.warn(f"{failure}.", RuntimeWarning, stacklevel=4)
        elif not model.converged_:
            change = "" if last_delta is None else (
                f" (last change in the ELBO per observation: {last_delta:.3g})")
            warnings.warn(
                f"{type(model).__name__} fit did not converge in {len(history.epoch)} epochs"
                f"{change}; fit again to continue, or raise `epochs`.",
                RuntimeWarning,
                stacklevel=4,
            )


# ------------------------------------------------------------- in-memory data
def fit_inputs(model, x, y):
    """Compiles the model if needed and turns a formula model's data frame into arrays."""
    if not model.compiled:
        model.compile()
    if isinstance(x, pd.DataFrame):
        if model.design is None:
            raise ValueError(
                "This model was not built from a formula: pass a dict of arrays, or build "
                "it with GLMM.from_formula to fit a data frame."
            )
        x, y = model._frame_arrays(x, weights=y)
    return x, y


def prepare(model, x, y, initialize=True):
    """Checks in-memory data, counts levels and (optionally) initializes weights (`GLMM.prepare`).

    Returns:
        `(x, y, num_rows)` with arrays cast to the model's dtype.
    """
    if composition.is_network(model.fixed_effects):  # features for a network
        x, y, num_rows = composition.check_data(model, x, y)
    else:
        x, y, num_rows = initialization.check_data(model, x, y)
    if not model.built:
        model.build({key: (None,) + value.shape[1:] for key, value in x.items()})
    for term in model.terms:
        term.adapt(x[term.name])
    if isinstance(model.fixed_effects, VariationalFixedEffects):
        model.fixed_effects.num_observations = num_rows
    if initialize:
        if composition.is_network(model.fixed_effects):
            composition.initialize(model, x, y)
        else:
            initialization.initialize(model, x, y)
        model._data_initialized = True
    return x, y, num_rows


def require_in_memory(model, problem):
    """A ValueError for a zero-inflation with covariates outside the engine's fit."""
    if model.zero_inflation is not None:
        raise ValueError(
            "A zero-inflation probability with covariates (ziformula) is fitted in memory by the "
            f"engine, `fit(data)`'s default, only: {problem}. Fit a data frame or a dict of arrays "
            "without batch_size, posterior='mean_field' or files; a constant zero-inflation "
            "(ziformula='~1') works everywhere.")


# ------------------------------------------------------------- the ELBO
def arrays_elbo(model, x, y):
    """`GLMM.elbo` of in-memory arrays (totals): the engine's own after a fit by it on these
    arrays, else the exact ELBO of the posterior the layers hold."""
    if model._engine_fit is not None and model._training_arrays is not None and (
            x is model._training_arrays[0] and y is model._training_arrays[1]):
        return dict(model._engine_fit["report"])
    x, y, num_rows = prepare(model, x, y, initialize=False)
    weights = response_lib.prior_weights(x)
    # In chunks: the quadrature's (rows, nodes) intermediates of 10M rows at
    # once would take gigabytes.
    ell = 0.0
    for start in range(0, num_rows, ELBO_CHUNK_ROWS):
        rows = slice(start, start + ELBO_CHUNK_ROWS)
        y_pred = model({key: value[rows] for key, value in x.items()}, training=False)
        w = None if weights is None else tf.constant(weights[rows], model.compute_dtype)
        ell += float(np.sum(model.expected_log_likelihood(y[rows], y_pred, w).numpy().astype("float64")))
    kl = total_kl(model)
    return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}


def total_kl(model):
    """KL(q || p) of the whole model (a float)."""
    kl = sum(float(layer.total_kl()) for layer in model.random_effects)
    if isinstance(model.fixed_effects, VariationalFixedEffects):
        kl += float(model.fixed_effects.total_kl())
    return kl


# ------------------------------------------------------------- the summary
def record_fit_summary(model, elbo, nobs, history):
    """`model.fit_summary_`: what logLik, AIC, BIC and the report read."""
    num_parameters = len(model.coefficients()) + len(model.head.log_params)
    if model.zero_inflation is not None:
        num_parameters += len(model.zi_coefficients())
    for term in model.terms:
        num_parameters += term.num_effects + term.num_correlations
    if model._engine_fit is not None:
        likelihood = model._engine_fit["likelihood"]
    else:
        # Mean-field VI holds the exact posterior of a single gaussian term only.
        exact = (model.family.is_gaussian_identity
                 and len(model.terms) <= 1 and all(t.scale_prior is None for t in model.terms))
        likelihood = "exact" if exact else "bound"
    model.fit_summary_ = {
        "elbo": elbo,
        "nobs": nobs,
        "num_parameters": num_parameters,
        # Whether `elbo` is the log-likelihood: exactly ("exact"), by adaptive
        # quadrature checked converged in its nodes ("quadrature"), by a rule
        # not verified ("approximate") or only bounds it ("bound").
        "likelihood": likelihood,
        "exact": likelihood in ("exact", "quadrature"),
        # The estimator in words: exact ML by adaptive quadrature (its nodes and
        # their check), Gaussian VI and why (the exact-ML phase's cost guard), ...
        "estimator": _estimator(model, likelihood),
        "epochs": len(history.epoch),
        # The engine's check of the end point (lme4's checkConv), or None.
        "convergence": None if model._engine_fit is None else model._engine_fit.get("convergence"),
    }
    results_lib.warn_if_singular(model)


def _estimator(model, likelihood):
    if model._engine_fit is not None and model._engine_fit.get("estimator"):
        return model._engine_fit["estimator"]
    if likelihood == "exact":
        return "exact ML (gaussian, identity link: the posterior is exact)"
    return "Gaussian VI (mean-field, stochastic: one Gaussian per level and term)"
