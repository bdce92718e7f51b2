"""The engine's fit: `keras_glmm.engine.VariationalSolver` run by Keras's `fit` loop.

One Gaussian posterior over every random-effect coefficient, in the sparsity of
lme4's and MixedModels.jl's blocked Cholesky factor: the exact posterior of a
gaussian model (its ELBO is lme4's profiled log-likelihood, or REML criterion),
Newton fixed-point steps for other families; the variance parameters move by a
bounded quasi-Newton method, so standard deviations can reach exactly 0. Keras's loop keeps its callbacks, History and progress bar:
each epoch is one step, and that step (`GLMM.train_step`, which hands it to
`EngineRun.step`) is one quasi-Newton iteration of the solver, whose estimates are
then written into the layers, so that `predict`, `ranef` and serving read them.

The engine fits in-memory data of a model with the default fixed effects,
point-estimated variances, the default optimizer and a single replica, within
`memory_budget` (`engine_problem` says why not); a non-gaussian model beyond
`FULL_BATCH_ROWS` rows goes to full-batch coordinate ascent (`large_data`) unless its
design is nested (`nested_terms`) or `posterior="joint"`.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_glmm import estimates
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import response as response_lib
from keras_glmm import results as results_lib
from keras_glmm.engine import TooLarge, VariationalSolver
from keras_glmm.fitting import driver
from keras_glmm.fitting.driver import FitDriver, require_in_memory


def is_linear(layer):
    """Whether `layer` is a `Dense(1, use_bias=False)` without activation (what the engine fits)."""
    return (isinstance(layer, keras.layers.Dense) and not layer.use_bias and layer.units == 1
            and layer.activation is keras.activations.linear)


def engine_problem(model, num_rows=None, batch_size=None):
    """Why the engine cannot fit `model` (a sentence), or None when it can (`GLMM.engine_problem`).

    `build_solver` lifts the row limit (`row_limit`) for a nested design (`nested_terms`).
    """
    if model.posterior == "mean_field":
        return "posterior='mean_field' asks for stochastic VI"
    if batch_size is not None:
        return "fit(batch_size=...) asks for minibatches"
    if num_rows is not None and model.posterior == "auto":
        limit, name = row_limit(model.family)
        if limit is not None and num_rows > limit:
            return f"{num_rows:,} rows of a {model.family.name} model are more than {name}={limit:,}"
    if not is_linear(model.fixed_effects):
        return "its fixed effects are not the default Dense(1, use_bias=False)"
    if model.zero_inflation is not None and not is_linear(model.zero_inflation):
        return "its zero_inflation layer is not a Dense(1, use_bias=False)"
    for term in model.terms:
        if term.scale_prior is not None:
            return f"term '{term.name}' has a `scale_prior` (the engine point-estimates variances)"
    if not getattr(model, "_default_optimizer", True):
        return "it was compiled with an optimizer of its own"
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return "it runs under a distribution strategy with several replicas"
    return None


def nested_terms(model, x):
    """`(inner, outer)` names of the terms each level of whose `inner` lies within one level
    of `outer` (lme4's `(1 | outer/inner)`, an observation-level effect in any factor).

    A mean-field posterior (one Gaussian per level and term) cannot hold the strong
    dependence between an outer level's effect and its inner levels': the outer
    factor's variance collapses towards 0 (measured, 1M binary rows of `(x|g) + (1|h)`,
    g in h: h's sd 0.0004 for a true 0.4), so such designs keep the joint posterior.
    One pass over the rows per pair: the last outer level written for each inner level
    must be every row's.
    """
    pairs = []
    for inner in model.terms:
        inner_index = np.asarray(x[inner.name])
        for outer in model.terms:
            if outer.num_levels >= inner.num_levels:  # also the terms of one factor, `(x || g)`
                continue
            outer_index = np.asarray(x[outer.name])
            owner = np.empty(inner.num_levels, dtype=outer_index.dtype)
            owner[inner_index] = outer_index
            if np.array_equal(owner[inner_index], outer_index):
                pairs.append((inner.name, outer.name))
    return pairs


def row_limit(family):
    """`(rows, name)`: the most rows the engine takes under `posterior="auto"` (None: any).

    A gaussian model's engine takes a few vector passes over the rows per iteration
    (closed-form posterior, no quadrature) and few iterations: any number of rows
    (1M rows: 4 s against 87 s of minibatch SVI). Any other's takes a quadrature
    over every row per Newton step, many per iteration: beyond `FULL_BATCH_ROWS`
    rows full-batch coordinate ascent (`keras_glmm.fitting.large_data`: 1M crossed
    binary rows in 5 s) costs far less. A nested design keeps the engine at any
    number of rows (`nested_terms`: the alternatives' mean-field posterior collapses
    it; 1M nested binary rows take the engine about 10 s, from a pilot fit).
    """
    if family.is_gaussian_identity:
        return None, None
    return driver.FULL_BATCH_ROWS, "FULL_BATCH_ROWS"


def build_solver(model, x, y, num_rows, batch_size, steps_per_epoch):
    """The engine's solver for this fit, or None for stochastic VI (see `engine_problem`).

    Raises where the model asked for the engine (`posterior="joint"`, REML) and it
    does not apply; falls back to stochastic VI with a warning where the joint
    posterior exceeds `memory_budget` under `posterior="auto"`.
    """
    problem = engine_problem(model, num_rows, batch_size)
    if problem is not None and engine_problem(model, None, batch_size) is None and nested_terms(model, x):
        problem = None  # only the rows are too many, and the design is nested: the joint posterior
    if problem is not None:
        require_in_memory(model, f"the engine cannot fit this model: {problem}")
        if model.posterior == "joint" or model.reml:
            what = "REML" if model.reml else "posterior='joint'"
            raise ValueError(f"{what} needs the engine, which cannot fit this model: {problem}.")
        return None
    if steps_per_epoch is not None:
        raise ValueError(
            "`steps_per_epoch` does not apply to the engine (one quasi-Newton iteration per "
            "epoch): pass `epochs`, or posterior='mean_field' for stochastic VI."
        )
    response, trials = response_lib.split(np.asarray(y, "float64"))
    terms = results_lib.engine_terms(model, x)
    try:
        return VariationalSolver(
            np.asarray(x["x"], "float64"), terms, response, model.family, trials=trials,
            weights=response_lib.prior_weights(x), offset=x.get("offset"), reml=model.reml,
            fixed_params=model.head.fixed_params, num_points=model.quadrature_points,
            memory_budget=model.memory_budget, agq_points=model.agq_points,
            zi_design=None if model.zero_inflation is None else np.asarray(x["x_zi"], "float64"),
        )
    except TooLarge as err:
        require_in_memory(model, f"{err} (the memory_budget)")
        if model.posterior == "joint" or model.reml:
            raise TooLarge(
                f"{err} Raise `memory_budget`, or fit with posterior='mean_field' (stochastic VI, "
                "one Gaussian per level and term)."
            ) from err
        warnings.warn(
            f"{err} Falling back to stochastic VI with one Gaussian per level and term "
            "(posterior='mean_field'), which understates the variance of small factors "
            "nested in or crossed with large ones; raise `memory_budget` for the joint posterior.",
            RuntimeWarning,
            stacklevel=4,  # build_solver <- EngineDriver.select <- GLMM.fit <- the caller
        )
        return None


def start_point(model):
    """The solver's starting point: the model's current weights (a first fit's GLM start,
    a previous fit, or weights restored by `BackupAndRestore`)."""
    dispersion = model.dispersion()
    scale = dispersion.get("scale", 1.0) if model.family.is_gaussian_identity else 1.0
    lambdas, u = [], []
    for term in model.terms:
        tau = np.asarray(term.prior_stddev(), "float64")
        corr = np.asarray(term.prior_correlation(), "float64")
        lam = tau[:, None] * np.linalg.cholesky(corr + 1e-12 * np.eye(len(tau))) / scale
        lambdas.append(lam)
        mean = term.conditional_mean().astype("float64")
        u.append(np.linalg.lstsq(lam, mean.T, rcond=None)[0].T if np.any(lam) else np.zeros_like(mean))
    learned = {k: v for k, v in dispersion.items() if k not in model.head.fixed_params}
    start = {"lambdas": lambdas, "beta": model.coefficients(), "dispersion": learned, "u": u}
    if model.zero_inflation is not None:
        start["zi"] = model.zi_coefficients()
    return start


def write_results(model, results):
    """Writes the solver's estimates into the layers (predict, ranef and serving read them)."""
    kernel = model.fixed_effects.kernel
    kernel.assign(results["beta"].reshape(kernel.shape).astype(kernel.dtype))
    for term, cov, mean, level_cov in zip(
            model.terms, results["covariances"], results["level_means"], results["level_covariances"]):
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        safe = np.where(sd > 0, sd, 1.0)
        corr = cov / np.outer(safe, safe)
        np.fill_diagonal(corr, 1.0)
        term.set_prior(sd, corr)
        term.set_posterior(mean, level_cov)
    model.head.set_params({k: v for k, v in results["dispersion"].items() if k in model.head.log_params})
    if "zi" in results:
        zi = model.zero_inflation.kernel
        zi.assign(results["zi"].reshape(zi.shape).astype(zi.dtype))


class EngineRun:
    """The solver during a fit: `step` is one `train_step` (the first starts it)."""

    def __init__(self, model, solver):
        self.model = model
        self.solver = solver
        self.started = False

    def step(self):
        """One quasi-Newton iteration; its estimates go to the layers. Returns the epoch's logs."""
        solver = self.solver
        if not self.started:
            report = solver.start(**start_point(self.model))
            self.started = True
        else:
            report = solver.step()
        write_results(self.model, solver.results())
        if solver.finished:
            self.model.stop_training = True
        n = float(solver.num_rows)
        # The logs are the solver's values at this step, not running means of
        # metrics; `gradient` (the largest projected gradient of the variance
        # parameters, per observation) shows how far from the optimum the fit is,
        # and its key also tells Keras to report these logs as they are.
        return {"loss": -report["elbo"] / n, "elbo": report["elbo"] / n,
                "nll": -report["expected_log_likelihood"] / n, "kl": report["kl"] / n,
                "gradient": solver.gradient_norm() / n}


class EngineDriver(FitDriver):
    """Fits in-memory data by the engine: Keras's loop, one solver iteration per epoch.

    `build_solver` (a static method, so that a driver around another solver with the
    same interface, `large_data.LargeDataDriver`, changes only it) gives the solver or None.
    """

    build_solver = staticmethod(build_solver)

    def __init__(self, solver):
        self.solver = solver

    @classmethod
    def select(cls, model, request):
        if not request.in_memory:
            return None
        x, y, num_rows = request.data(model)
        solver = cls.build_solver(model, x, y, num_rows, request.batch_size, request.steps_per_epoch)
        return None if solver is None else cls(solver)

    def fit(self, model, request):
        x, y, _ = request.data(model)
        options = request.options
        for key in ("validation_data", "validation_split", "class_weight"):
            if options.get(key) is not None:
                raise ValueError(f"`{key}` is not supported by the engine's fit.")
        callbacks = list(request.callbacks or [])
        if not model.optimizer.built:
            # Unused by the engine, but built as a later fit (minibatches) and a saved
            # model expect it.
            model.optimizer.build(model.trainable_variables)
        solver = self.solver
        model._engine_run = EngineRun(model, solver)
        # The data live in the solver: Keras iterates over a placeholder.
        dataset = tf.data.Dataset.from_tensors(tf.zeros([1])).repeat()
        compiled = (model.run_eagerly, model.steps_per_execution)
        # The solver is numpy: its steps run eagerly, one per execution.
        model.run_eagerly, model.steps_per_execution = True, 1
        model.train_function = None
        try:
            history = self.keras_fit(
                model, dataset, epochs=request.epochs or 100, steps_per_epoch=1, verbose=request.verbose,
                callbacks=callbacks, shuffle=False, **options,
            )
        finally:
            model.run_eagerly, model.steps_per_execution = compiled
            model.train_function = None
            model._engine_run = None
        results = solver.results()
        report = solver.report()
        model._engine_fit = {
            "vcov": solver.fixed_covariance(),
            "zi_vcov": solver.zi_covariance(),
            "threshold_vcov": None if not ordinal_lib.is_ordinal(model.family) else ordinal_lib.threshold_covariance(
                solver, ordinal_lib.intercept_index(model)),
            "report": report,
            "boundary": results["boundary"],
            "likelihood": solver.likelihood,
            "convergence": None if solver.check is None else solver.check.as_dict(),
            "estimator": solver.estimator,
            "posterior": solver.posterior,
        }
        # The float64 estimates for reporting (the layers hold float32: keras_glmm.estimates).
        model._engine_fit["estimates"] = estimates.record(model, results)
        failure = solver.check.message() if solver.check is not None and not solver.check.passed else None
        self.finish(model, history, solver.converged, callbacks, training=(x, y), elbo=report["elbo"],
                    failure=failure)
        return history
