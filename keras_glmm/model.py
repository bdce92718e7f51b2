"""`GLMM`: a Keras model whose `fit` maximizes the evidence lower bound of a GLMM."""

import contextlib
import math
import warnings
import weakref

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm import composition  # networks as fixed effects (keras_glmm.composition)
from keras_glmm import families as families_lib
from keras_glmm.batches import minibatches
from keras_glmm import checks as checks_lib
from keras_glmm import degrees_of_freedom, profile as profile_lib
from keras_glmm import estimates
from keras_glmm import frames
from keras_glmm import inference, initialization, prediction
from keras_glmm import keywords
from keras_glmm import large_data
from keras_glmm import plots
from keras_glmm import response as response_lib
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import results as results_lib
from keras_glmm import serving, streaming
from keras_glmm.callbacks import ELBOConvergence, VarianceUpdate
from keras_glmm.design import Design
from keras_glmm.formula import parse_formula
from keras_glmm.engine import TooLarge, VariationalSolver
from keras_glmm.layers.family_head import FamilyHead
from keras_glmm.layers.fixed_effects import VariationalFixedEffects
from keras_glmm.layers.random_effects import RandomEffects
from keras_glmm.optimizers import SparseAdam

# In-memory data up to this many rows is fitted full-batch by default: the ELBO is
# then deterministic (closed-form expectations, no minibatch noise) and converges to
# the optimum instead of jittering around it.
FULL_BATCH_ROWS = 2**18
# Minibatch fits: at most this many rows per batch (large batches amortize the
# per-step overhead), and the Adam learning rate of the global weights (fixed
# effects, variance parameters).
MINIBATCH_ROWS = 2**16
# Rows per step of `predict` (see `GLMM.predict`).
PREDICT_BATCH_ROWS = 2**16
# Rows per evaluation when the ELBO of a whole data set is computed.
ELBO_CHUNK_ROWS = 2**20
MINIBATCH_LEARNING_RATE = 0.05
# Variational families (`GLMM(posterior=...)`): see the class docstring.
POSTERIORS = ("auto", "joint", "mean_field")
# Memory the joint posterior's dense block and selected inverse may take by default.
MEMORY_BUDGET = 2 * 2**30


def default_batch_size(num_rows):
    """Rows per minibatch: about 100 steps per epoch, within [8,192, 65,536].

    The global weights move by Adam steps, so an epoch needs enough of them for the
    variance parameters to keep up with the random effects (a few steps per epoch
    leave them lagging when the learning rate is lowered); beyond 65,536 rows a
    batch gains little throughput.
    """
    return int(min(MINIBATCH_ROWS, max(8192, num_rows // 100)))


def _is_linear(layer):
    """Whether `layer` is a `Dense(1, use_bias=False)` without activation (what the engine fits)."""
    return (isinstance(layer, keras.layers.Dense) and not layer.use_bias and layer.units == 1
            and layer.activation is keras.activations.linear)


def _component(component):
    """glmmTMB's model component: `"cond"` (conditional) or `"zi"` (zero-inflation); or an
    ordinal model's `"thresholds"` (clmm's `fit$alpha`)."""
    if component not in ("cond", "zi", "thresholds"):
        raise ValueError(f"`component` must be 'cond' or 'zi' (or an ordinal model's 'thresholds'). "
                         f"Received: component={component!r}")
    return component


@contextlib.contextmanager
def aligned_steps_per_execution(model, steps_per_epoch):
    """Runs a fit with `steps_per_execution` dividing `steps_per_epoch`.

    Keras runs whole executions, so with 100 steps per execution (GLMM's default)
    an epoch of 16 minibatches would run 100 (six passes over the data), and the
    convergence check would compare six-pass "epochs". The largest divisor of
    `steps_per_epoch` not above the compiled value is used for this fit; the
    compiled value is restored after it.
    """
    compiled = model.steps_per_execution
    if steps_per_epoch % compiled == 0:
        yield
        return
    divisor = max(d for d in range(1, min(compiled, steps_per_epoch) + 1) if steps_per_epoch % d == 0)
    model.steps_per_execution = divisor
    model.train_function = None  # traced for the compiled value
    try:
        yield
    finally:
        model.steps_per_execution = compiled
        model.train_function = None


@keras.saving.register_keras_serializable(package="keras_glmm")
class GLMM(keras.Model):
    """A generalized linear mixed model trained by `model.fit` on the negative ELBO.

    ```
    eta_i = x_i' beta + sum_t z_ti' b_t,g_t(i) + offset_i
    y_i | eta_i ~ family(link^-1(eta_i), dispersion)
    b_t,c ~ N(0, Sigma_t)  for each grouping factor t and level c
    ```

    Each grouping factor is a `RandomEffects` layer, which keeps its prior `Sigma_t`
    and each level's posterior moments; the fixed effects are a
    `keras.layers.Dense(1, use_bias=False)` (point estimates, the default) or any
    layer mapping `x` to the linear predictor; a `FamilyHead` holds the dispersion.
    Under a Gaussian posterior `q` each `eta_i` is Gaussian and the expected
    log-likelihood `E_q[log p(y_i | eta_i)]` is closed form or Gauss-Hermite
    quadrature, so the ELBO has no sampling noise. The History holds `loss`
    (`-ELBO / n`), `elbo`, `nll` (expected negative log-likelihood) and `kl`, each
    per observation; `converged_` says whether the fit converged.

    Two update rules train the same model, chosen by `fit`:

    - **The engine** (`posterior="joint"`; the default for in-memory data, up to
      `FULL_BATCH_ROWS` rows unless gaussian with the identity link):
      `keras_glmm.engine.VariationalSolver`. One Gaussian posterior over every
      random-effect coefficient, in the sparsity of lme4's and MixedModels.jl's
      blocked Cholesky factor; the exact posterior of a gaussian model (its ELBO is
      lme4's profiled log-likelihood, or REML criterion), Newton fixed-point steps for
      other families; the variance parameters by a bounded quasi-Newton method, so
      standard deviations can reach exactly 0. Each `train_step` is one quasi-Newton
      iteration (one epoch of one step); the fit stops when the solver has converged.
      It needs the default fixed effects, point-estimated variances
      (`scale_prior=None`), the default optimizer and a single replica, and a
      posterior within `memory_budget`.
    - **Stochastic VI** (`posterior="mean_field"`, non-gaussian data beyond
      `FULL_BATCH_ROWS` rows, `fit(batch_size=...)`, files, or models the engine
      cannot fit, e.g. a network as fixed effects): one Gaussian per level and term,
      moved by gradient steps on minibatches of the ELBO (natural-gradient steps of
      the levels' posteriors and an M-step of the priors each epoch for minibatches,
      `SparseAdam` full-batch), stopped by `ELBOConvergence`.

    Args:
        random_effects: a list of `RandomEffects` layers; each layer's `name` is the
            key of its level index in the input dict (and `name + "_z"` that of its
            covariates, when it has slopes).
        fixed_effects: a layer mapping `inputs["x"]` to `(batch, 1)` (point
            estimates) or `(batch, 2)` moments; default `Dense(1, use_bias=False)`,
            so `x` carries an intercept column when the model has one. Or any
            Keras network mapping features to `(batch, 1)`: the input dict's
            entries other than the terms', their `_z` covariates and `offset` are
            then its inputs (numbers, codes, strings for preprocessing layers), and
            `fit` trains it by stochastic VI with `NaturalGradient` (see
            `keras_glmm.composition`).
        family: a family name or `keras_glmm.families.Family`.
        link: optional link name (the family's canonical link by default).
        fixed_params: dispersion parameters held fixed, e.g. `{"scale": 1.0}`.
        quadrature_points: Gauss-Hermite points for families without a closed form.
        posterior: `"auto"` (the engine where it applies, else stochastic VI),
            `"joint"` (the engine, or an error saying why it cannot) or
            `"mean_field"` (stochastic VI).
        reml: restricted maximum likelihood (gaussian models with the identity
            link, fitted by the engine).
        memory_budget: bytes the engine's posterior may take (dense block and
            selected inverse); beyond it `"joint"` raises an error naming the term
            and `"auto"` falls back to stochastic VI with a warning.
        agq_points: for a binomial, Poisson, ... model with one random-effect term,
            or two nested scalar terms, the engine goes on from the VI optimum to
            the exact maximum likelihood by adaptive Gauss-Hermite quadrature with
            this many nodes per dimension (None: 25); 0 keeps the VI estimates.
        zero_inflation: for a zero-inflated family, None (a constant zero-inflation
            probability, the head's `zi_odds`: glmmTMB's `ziformula = ~1`) or a
            `keras.layers.Dense(1, use_bias=False)` mapping `inputs["x_zi"]` to each
            row's `logit(pi_i) = x_zi,i' gamma` (glmmTMB's `ziformula` with
            covariates; `from_formula(..., ziformula=...)` builds it). Such a model
            is fitted in memory by the engine only (`fit`'s default): stochastic
            VI, minibatches, files and `export` raise a ValueError saying so.
        intercept: whether the model has an intercept (lme4's models do, unless the
            formula says `0 +`). A formula model's formula decides; for arrays, `x`
            must then carry it (a column of ones, or columns adding up to one, as a
            full dummy coding), or the fit raises a ValueError
            (`keras_glmm.checks.check_intercept`): without it the random effects
            would take up the mean. `intercept=False` fits a model without one.

    Inputs: a dict with `"x"` `(batch, p)`, one entry per random-effects layer (its
    level indices), `name + "_z"` covariates for layers with slopes, optionally
    `"offset"` `(batch,)`, and `"x_zi"` `(batch, q)` with `zero_inflation`.
    Response `y`: `(batch,)`, or `(batch, 2)` holding successes and trials for a
    binomial family.

    Outputs: a dict of `(batch,)` tensors: `mean` (response mean: `(1 - pi) mu` for
    a zero-inflated family), `eta` (linear predictor), `eta_var` (its posterior
    variance, each term's marginal posterior summed) and the dispersion
    parameters (a zero-inflated family's `zi_odds` per row).

    Example:

    >>> model = GLMM(random_effects=[RandomEffects(85, name="county")], family="gaussian")
    >>> model.fit({"x": x, "county": county_code}, log_radon)
    >>> model.converged_
    True
    """

    def __init__(
        self,
        random_effects=(),
        fixed_effects=None,
        family="gaussian",
        link=None,
        fixed_params=None,
        quadrature_points=None,
        posterior="auto",
        reml=False,
        memory_budget=MEMORY_BUDGET,
        agq_points=None,
        zero_inflation=None,
        intercept=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intercept = bool(intercept)
        self.family = families_lib.get_family(family, link=link)
        self.quadrature_points = quadrature_points
        if posterior not in POSTERIORS:
            raise ValueError(f"`posterior` must be one of {POSTERIORS}. Received: posterior={posterior!r}")
        if reml and not self.family.is_gaussian_identity:
            raise ValueError(
                "`reml=True` is defined for gaussian models with the identity link only. "
                f"Received: family={self.family.name!r}, link={self.family.link.name!r}."
            )
        if reml and posterior == "mean_field":
            raise ValueError("`reml=True` needs the engine's joint posterior: use posterior='auto' or 'joint'.")
        self.posterior = posterior
        self.reml = bool(reml)
        self.memory_budget = int(memory_budget)
        if agq_points is not None and (not isinstance(agq_points, (int, np.integer)) or agq_points < 0):
            raise ValueError(f"`agq_points` must be None or a non-negative integer. Received: {agq_points!r}")
        self.agq_points = agq_points
        random_effects = list(random_effects)
        for layer in random_effects:
            if not isinstance(layer, RandomEffects):
                raise TypeError(f"`random_effects` must hold RandomEffects layers. Received: {layer!r}")
            # The model's ELBO needs each term's mean and variance, not a draw.
            layer.output_mode = "moments"
        self.random_effects = random_effects
        names = [term.name for term in self.terms]
        for name in names:
            if name in ("x", "x_zi", "offset") or name.endswith("_z"):
                raise ValueError(f"A random-effects term may not be named '{name}'.")
        if len(set(names)) != len(names):
            raise ValueError(f"Random-effects terms need distinct names. Received: {names}")
        if fixed_effects is None:
            fixed_effects = keras.layers.Dense(
                1, use_bias=False, kernel_initializer="zeros", name="fixed_effects", dtype=self.dtype_policy
            )
        if isinstance(fixed_effects, VariationalFixedEffects):
            fixed_effects.output_mode = "moments"
        self.fixed_effects = fixed_effects
        if zero_inflation is not None:
            if not isinstance(zero_inflation, keras.layers.Layer):
                raise TypeError(f"`zero_inflation` must be a Keras layer or None. Received: {zero_inflation!r}")
            if "zi_odds" not in self.family.dispersion_params:
                raise ValueError(f"`zero_inflation` needs a zero-inflated family. Received: "
                                 f"family={self.family.name!r}")
        self.zero_inflation = zero_inflation
        self.head = FamilyHead(
            self.family, fixed_params=fixed_params, name="family_head", dtype=self.dtype_policy,
            zi_covariates=zero_inflation is not None,
        )
        self.elbo_tracker = keras.metrics.Mean(name="elbo")
        self.nll_tracker = keras.metrics.Mean(name="nll")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.converged_ = None
        self.fit_summary_ = None
        self.design = None  # set by from_formula: the frozen formula -> arrays schema
        self._data_initialized = False
        self._training_arrays = None
        self._training_index = None  # the training frame's row index (keras_glmm.frames)
        self._training_source = None  # the files of a fit streamed from them
        self._stream_scan = None  # keras_glmm.streaming.Scan of the files the model knows
        self._solver = None  # the engine, during a fit by it
        self._engine_fit = None  # what a fit by the engine leaves: vcov, ELBO, boundary flags

    # ------------------------------------------------------------------ call
    @property
    def terms(self):
        """Every random-effect term's `RandomEffects` layer."""
        return list(self.random_effects)

    def build(self, input_shape):
        # Sublayers restored from a config may arrive built already.
        if not self.fixed_effects.built and "x" in input_shape:  # a network is built by prepare
            self.fixed_effects.build(input_shape["x"])
        for layer in self.random_effects:
            if not layer.built:
                layer.build()
        if self.zero_inflation is not None and not self.zero_inflation.built and "x_zi" in input_shape:
            self.zero_inflation.build(input_shape["x_zi"])
        if not self.head.built:
            self.head.build((None, 2))
        self.built = True

    def call(self, inputs, training=None):
        # `x`, or a network's features (keras_glmm.composition.network_inputs).
        fixed = self.fixed_effects(composition.network_inputs(self, inputs), training=training)
        fixed = tf.cast(fixed, self.compute_dtype)
        rows = tf.shape(fixed)[0]
        eta = tf.zeros([rows], self.compute_dtype)
        eta_var = tf.zeros([rows], self.compute_dtype)
        # unstack, not slices: the gradient of a slice is a zero-filled tensor.
        fixed = tf.unstack(fixed, axis=-1)
        eta += fixed[0]
        if len(fixed) == 2:
            eta_var += fixed[1]
        for layer in self.random_effects:
            if layer.num_covariates:
                args = [inputs[layer.name], inputs[layer.name + "_z"]]
            else:
                args = inputs[layer.name]
            mean, var = tf.unstack(tf.cast(layer(args, training=training), self.compute_dtype), axis=-1)
            eta += mean
            eta_var += var
        if "offset" in inputs:
            eta += tf.reshape(tf.cast(inputs["offset"], self.compute_dtype), [-1])
        zi_logit = None
        if self.zero_inflation is not None:  # glmmTMB's ziformula: logit(pi_i) = x_zi,i' gamma
            zi_logit = tf.reshape(tf.cast(self.zero_inflation(inputs["x_zi"]), self.compute_dtype), [-1])
        return self.head(tf.stack([eta, eta_var], axis=-1), zi_logit=zi_logit)

    def expected_log_likelihood(self, y, y_pred, weights=None):
        """Per-row `E_q[log p(y_i | eta_i)]`, under prior weights when given."""
        y, trials = response_lib.split_tensor(tf.cast(y, self.compute_dtype))
        params = {name: y_pred[name] for name in self.family.dispersion_params}
        if weights is not None:
            return self.family.weighted_expected_log_prob(
                y, y_pred["eta"], y_pred["eta_var"], tf.reshape(weights, [-1]), params, trials=trials,
                num_points=self.quadrature_points,
            )
        return self.family.expected_log_prob(
            y, y_pred["eta"], y_pred["eta_var"], params, trials=trials,
            num_points=self.quadrature_points,
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if sample_weight is None and isinstance(x, dict):
            # Prior weights travel with the inputs (`keras_glmm.response`).
            sample_weight = x.get(response_lib.WEIGHTS)
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, self.compute_dtype)
        ell = self.expected_log_likelihood(y, y_pred, sample_weight)
        nll = -tf.reduce_mean(ell)
        kl = tf.add_n(self.losses) if self.losses else tf.zeros_like(nll)
        kl = tf.cast(kl, nll.dtype)
        loss = nll + kl
        loss = tf.debugging.check_numerics(
            loss,
            "keras_glmm: the negative ELBO is NaN or inf. The data passed the checks, so the "
            "optimization diverged: lower the learning rate, or check for extreme "
            "covariate values",
        )
        # Weighted by rows: with unequal shards or a short last batch the logs are
        # still per-observation values of the whole data.
        rows = tf.cast(tf.shape(ell)[0], loss.dtype)
        self.nll_tracker.update_state(nll, sample_weight=rows)
        self.kl_tracker.update_state(kl, sample_weight=rows)
        self.elbo_tracker.update_state(-loss, sample_weight=rows)
        # Keras sums the replicas' gradients and expects each replica's share of the
        # loss (Trainer.compute_loss's convention, which this override replaces).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss / tf.cast(replicas, loss.dtype)
        return loss

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds a model by averaging a first data batch across replicas,
        # which fails when shards differ in size (919 rows on 2 replicas). A GLMM
        # that `prepare` built needs no batch: only its optimizer may be unbuilt.
        if self.built and self._distribute_strategy is not None:
            with self.distribute_strategy.scope():
                if self.optimizer is not None and not self.optimizer.built:
                    self.optimizer.build(self.trainable_variables)
            return None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # ----------------------------------------------------------- compile/fit
    def compile(self, optimizer=None, jit_compile=False, steps_per_execution=None, **kwargs):
        """Compiles with `SparseAdam(0.05)` by default and no `loss` (the ELBO is built in).

        `jit_compile` defaults to False: the data checks inside the step
        (`tf.debugging` asserts on level indices and a finite loss) are not XLA ops.
        `steps_per_execution` defaults to 100: a full-batch step on a small data set
        takes well under a millisecond, less than Keras's per-call overhead, so
        batch-level callbacks see every 100th step. Under a distribution strategy
        with several replicas it defaults to 1 (keras #19246: several steps per
        execution fail under MirroredStrategy).
        """
        if steps_per_execution is None:
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            steps_per_execution = 1 if replicas > 1 else 100
        if "loss" in kwargs and kwargs["loss"] is not None:
            raise ValueError("GLMM computes its own loss (the negative ELBO): do not pass `loss`.")
        kwargs.pop("loss", None)
        # A default optimizer may be swapped for the minibatch one by `fit`.
        self._default_optimizer = optimizer is None
        if optimizer is None:
            optimizer = SparseAdam(learning_rate=0.05)
        super().compile(
            optimizer=optimizer, jit_compile=jit_compile,
            steps_per_execution=steps_per_execution, **kwargs,
        )

    def get_compile_config(self):
        """Keras's compile config, and whether the optimizer was the default one."""
        config = super().get_compile_config() or {}
        config["default_optimizer"] = bool(getattr(self, "_default_optimizer", True))
        return config

    def compile_from_config(self, config):
        """Restores the compiled state of a loaded model (optimizer and its settings).

        A model compiled with the default optimizer stays so: a later fit may use the
        engine, or switch between the full-batch and minibatch optimizers.
        """
        default = bool(config.get("default_optimizer", False))
        config = keras.saving.deserialize_keras_object(
            {k: v for k, v in config.items() if k != "default_optimizer"})
        self.compile(
            optimizer=config.get("optimizer"),
            jit_compile=config.get("jit_compile", False),
            steps_per_execution=config.get("steps_per_execution"),
        )
        self._default_optimizer = self._default_optimizer or default
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=None,
        verbose=0,
        callbacks=None,
        steps_per_epoch=None,
        initialize=True,
        **kwargs,
    ):
        """Fits the model: Keras's `fit`, with a GLMM's defaults for in-memory data.

        When `x` is a dict of arrays (or a data frame, for a formula model), the data
        are checked (clear errors for non-finite values, responses outside the
        family's support, unknown level indices, mismatched shapes), each layer's
        level counts are set and, on the first fit only (`initialize=True`), the
        weights start from a GLM fit. Then one of two update rules (see the class
        docstring) trains the model:

        - the engine: one quasi-Newton iteration per epoch, for at most `epochs`
          (100) epochs, until the solver converges;
        - stochastic VI: full-batch (up to `FULL_BATCH_ROWS` rows unless
          `batch_size` is given) in epochs of `steps_per_epoch` steps (100), for at
          most `epochs` (200), stopped by an `ELBOConvergence` callback unless the
          callbacks already include one; minibatches get natural-gradient steps and
          an M-step of the variance components each epoch.

        Prior weights (lme4's `weights`) come as `x["weights"]` (a formula model's
        `weights=` column puts them there) or `sample_weight`: the precisions of
        a gaussian response (row variance `sigma^2 / w`), likelihood weights of
        the other families, in every fit, the ELBO and the standard errors.

        Other inputs (a `tf.data.Dataset`, ...) go to Keras's `fit` unchanged (call
        `prepare(x, y)` on in-memory data first). A file source (`kg.read_csv`,
        `kg.read_parquet`) for a formula model is streamed in batches
        (`keras_glmm.streaming.dataset`; `shuffle_buffer` and `seed` set its
        shuffle) and fitted by stochastic VI, with the same loop. `seed` also
        seeds the shuffle of in-memory minibatches: the same seed, the same
        estimates.

        Returns:
            The Keras `History`.
        """
        if streaming.is_source(x):
            return self._fit_files(x, y, batch_size, epochs, verbose, callbacks, steps_per_epoch, **kwargs)
        seed = kwargs.pop("seed", None)  # the minibatches' shuffle
        frame = isinstance(x, pd.DataFrame)
        x, y = self._fit_inputs(x, y)
        self._training_index = self._frame_index if frame else None
        if not isinstance(x, dict):
            self._require_in_memory("a tf.data pipeline is fitted by stochastic VI")
            if seed is not None:
                raise ValueError("`seed` seeds the shuffle of in-memory data and files; a tf.data "
                                 f"pipeline is shuffled by its own ops. Received: seed={seed!r}")
            return super().fit(
                x, y, batch_size=batch_size, epochs=epochs or 1, verbose=verbose,
                callbacks=callbacks, steps_per_epoch=steps_per_epoch, **kwargs
            )
        sample_weight = kwargs.pop("sample_weight", None)
        if sample_weight is not None:
            if response_lib.WEIGHTS in x:
                raise ValueError("Prior weights came twice: as `sample_weight` and as inputs['weights'].")
            rows = np.shape(x["x"])[0] if "x" in x else len(sample_weight)
            x = {**x, response_lib.WEIGHTS: initialization.check_weights(sample_weight, rows)}
        x, y, num_rows = self.prepare(x, y, initialize=initialize and not self._data_initialized)
        solver = self._engine_solver(x, y, num_rows, batch_size, steps_per_epoch)
        if solver is None:  # beyond the engine's rows: full-batch coordinate ascent (keras_glmm.large_data)
            solver = large_data.solver(self, x, y, num_rows, batch_size, steps_per_epoch)
        if solver is not None:
            return self._fit_by_engine(solver, x, y, epochs, verbose, callbacks, **kwargs)
        data = (x, y)
        batch_size = composition.fit_batch_size(self, num_rows, batch_size)  # a network: minibatches
        minibatch = batch_size is not None or num_rows > FULL_BATCH_ROWS
        if not minibatch:
            dataset = tf.data.Dataset.from_tensors(data).repeat()
            steps_per_epoch = steps_per_epoch or 100
            self.use_full_batch_optimizer()
        else:
            batch_size = batch_size or default_batch_size(num_rows)
            dataset = minibatches(data, batch_size, seed=seed)
            steps_per_epoch = steps_per_epoch or -(-num_rows // batch_size)
            self.use_minibatch_optimizer(x, y)
        return self._fit_by_svi(dataset, steps_per_epoch, minibatch, epochs, verbose, callbacks,
                                training=(x, y), **kwargs)

    def _fit_files(self, source, y, batch_size, epochs, verbose, callbacks, steps_per_epoch,
                   shuffle_buffer=streaming.SHUFFLE_BUFFER, seed=None, initialize=True, **kwargs):
        """`fit` on files: stochastic VI on batches streamed from them (see `fit`).

        Batches of `batch_size` rows (the whole data when it has at most
        `FULL_BATCH_ROWS` rows and fits in the shuffle buffer, else 65,536), shuffled
        in a buffer of `shuffle_buffer` rows (1,000,000; `seed` seeds it); an epoch is
        one pass over the files but at least `streaming.MIN_EPOCH_STEPS` steps.
        """
        self._require_in_memory("files are fitted by stochastic VI")
        if y is not None:
            raise ValueError("With files the response comes from the formula: do not pass `y`.")
        if kwargs.pop("sample_weight", None) is not None:
            raise ValueError("`sample_weight` is not supported with files: use a weights column.")
        if not self.compiled:
            self.compile()
        if self.posterior == "joint" or self.reml:
            raise ValueError(
                "Files are fitted in minibatches by stochastic VI: posterior='joint' and REML need "
                "the data in memory (read them into a data frame)."
            )
        scan = self._scan_for(source)
        if batch_size is None:
            fits = scan.num_rows <= min(FULL_BATCH_ROWS, shuffle_buffer)
            batch_size = scan.num_rows if fits else streaming.BATCH_SIZE
        minibatch = int(batch_size) < scan.num_rows
        if minibatch and len(scan.sample):
            # Natural-gradient steps for the random effects, their sds started from the sample.
            x, y = scan.design.arrays(scan.sample, weights=scan.weights)
            x, y, _ = initialization.check_data(self, x, y)
            self.use_minibatch_optimizer(x, y)
        data, steps = streaming.dataset(scan, self.family, self.compute_dtype, int(batch_size),
                                        int(shuffle_buffer), seed)
        steps_per_epoch = steps_per_epoch or max(steps, streaming.MIN_EPOCH_STEPS)
        # Files that change under the fit stop it with the file named (FilesChangedError).
        callbacks = [*(callbacks or []), streaming.FilesCheck(scan)]
        with streaming.raising_read_errors(scan):
            return self._fit_by_svi(data, steps_per_epoch, minibatch, epochs, verbose, callbacks,
                                    source=source, **kwargs)

    def _fit_by_svi(self, dataset, steps_per_epoch, minibatch, epochs, verbose, callbacks,
                    training=None, source=None, **kwargs):
        """The stochastic-VI loop of every fit not by the engine: in memory, minibatches, files."""
        callbacks, convergence = self.fit_callbacks(callbacks, minibatch=minibatch)
        self._engine_fit = None
        with aligned_steps_per_execution(self, steps_per_epoch):
            history = super().fit(
                dataset, epochs=epochs or 200, steps_per_epoch=steps_per_epoch,
                verbose=verbose, callbacks=callbacks, shuffle=False, **kwargs,
            )
        x, y = training if training is not None else (None, None)
        self._finish_fit(x, y, history, convergence.converged, convergence.last_delta, callbacks, source=source)
        return history

    # ------------------------------------------------------------- files
    def _set_level_counts(self, design, level_counts, num_rows):
        """Each level's training rows (the KL's scaling), from a scan of files."""
        by_name = {r.name: c for r, c in zip(design.random, level_counts, strict=True)}
        for term in self.terms:
            if not term.built:
                term.build()
            term.level_counts.assign(by_name[term.name].astype(term.level_counts.dtype))
        if isinstance(self.fixed_effects, VariationalFixedEffects):
            self.fixed_effects.num_observations = int(num_rows)

    def _prepare_from_scan(self, scan):
        """Sets a formula model up from a scan: level counts, row count, GLM start on the sample.

        The counts (which scale each level's KL) and the number of rows are the files'
        own; only the starting point comes from the sample.
        """
        x, y = scan.design.arrays(scan.sample, weights=scan.weights)
        x, y, _ = initialization.check_data(self, x, y)
        if not self.built:
            self.build({key: (None,) + value.shape[1:] for key, value in x.items()})
        self._set_level_counts(scan.design, scan.level_counts, scan.num_rows)
        initialization.initialize(self, x, y)
        self._data_initialized = True
        self._stream_scan = scan

    def _scan_for(self, source):
        """The model's scan of `source` (from `from_formula`), or a new count of its rows."""
        if self.design is None:
            raise ValueError(
                "Fitting from files needs a model built from a formula: "
                "GLMM.from_formula(formula, source) or kg.glmm(formula, source)."
            )
        current = self._stream_scan
        if current is None or current.source._key() != source._key():
            current = streaming.recount(source, self.design, self.family, getattr(self, "_weights", None))
            self._stream_scan = current
        self._set_level_counts(current.design, current.level_counts, current.num_rows)
        return current

    def _files_elbo(self, source, batch_size=streaming.BATCH_SIZE):
        """The exact ELBO of the layers' posterior on files, in one pass (totals)."""
        scan = self._scan_for(source)
        x_spec, y_spec = streaming.signature(scan, self.compute_dtype)

        @tf.function(input_signature=[x_spec, y_spec])
        def batch_ell(x, y):
            ell = self.expected_log_likelihood(y, self(x, training=False), x.get(response_lib.WEIGHTS))
            return tf.reduce_sum(tf.cast(ell, tf.float64))

        ell = sum(float(batch_ell(x, y)) for x, y in streaming.batches(scan, self.family, self.compute_dtype,
                                                                         batch_size))
        kl = self._total_kl()
        return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}

    # ------------------------------------------------------------- the engine
    def _require_in_memory(self, problem):
        """A ValueError for a zero-inflation with covariates outside the engine's fit."""
        if self.zero_inflation is not None:
            raise ValueError(
                "A zero-inflation probability with covariates (ziformula) is fitted in memory by the "
                f"engine, `fit(data)`'s default, only: {problem}. Fit a data frame or a dict of arrays "
                "without batch_size, posterior='mean_field' or files; a constant zero-inflation "
                "(ziformula='~1') works everywhere.")

    def engine_problem(self, num_rows=None, batch_size=None):
        """Why the engine cannot fit this model (a sentence), or None when it can."""
        if self.posterior == "mean_field":
            return "posterior='mean_field' asks for stochastic VI"
        if batch_size is not None:
            return "fit(batch_size=...) asks for minibatches"
        # A gaussian model's engine takes a few vector passes over the rows per
        # iteration (closed-form posterior, no quadrature) and few iterations; any
        # other's takes a quadrature over every row per Newton step, many per
        # iteration: beyond FULL_BATCH_ROWS rows that costs more than minibatch
        # SVI (1M binomial rows: 100 s against 56 s; 1M gaussian rows: 4 s against 87 s).
        if (num_rows is not None and self.posterior == "auto" and num_rows > FULL_BATCH_ROWS
                and not self.family.is_gaussian_identity):
            return f"{num_rows:,} rows of a non-gaussian model are more than FULL_BATCH_ROWS={FULL_BATCH_ROWS:,}"
        if not _is_linear(self.fixed_effects):
            return "its fixed effects are not the default Dense(1, use_bias=False)"
        if self.zero_inflation is not None and not _is_linear(self.zero_inflation):
            return "its zero_inflation layer is not a Dense(1, use_bias=False)"
        for term in self.terms:
            if term.scale_prior is not None:
                return f"term '{term.name}' has a `scale_prior` (the engine point-estimates variances)"
        if not getattr(self, "_default_optimizer", True):
            return "it was compiled with an optimizer of its own"
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            return "it runs under a distribution strategy with several replicas"
        return None

    def _engine_solver(self, x, y, num_rows, batch_size, steps_per_epoch):
        """The engine's solver for this fit, or None for stochastic VI (see `engine_problem`)."""
        problem = self.engine_problem(num_rows, batch_size)
        if problem is not None:
            self._require_in_memory(f"the engine cannot fit this model: {problem}")
            if self.posterior == "joint" or self.reml:
                what = "REML" if self.reml else "posterior='joint'"
                raise ValueError(f"{what} needs the engine, which cannot fit this model: {problem}.")
            return None
        if steps_per_epoch is not None:
            raise ValueError(
                "`steps_per_epoch` does not apply to the engine (one quasi-Newton iteration per "
                "epoch): pass `epochs`, or posterior='mean_field' for stochastic VI."
            )
        response, trials = response_lib.split(np.asarray(y, "float64"))
        terms = []
        for term in self.terms:
            z = np.ones((num_rows, 1)) if term.intercept else np.zeros((num_rows, 0))
            if term.num_covariates:
                z = np.concatenate([z, np.asarray(x[term.name + "_z"], "float64")], axis=1)
            terms.append((term.name, x[term.name], z, term.num_levels, term.covariance == "full"))
        try:
            return VariationalSolver(
                np.asarray(x["x"], "float64"), terms, response, self.family, trials=trials,
                weights=response_lib.prior_weights(x), offset=x.get("offset"), reml=self.reml,
                fixed_params=self.head.fixed_params, num_points=self.quadrature_points,
                memory_budget=self.memory_budget, agq_points=self.agq_points,
                zi_design=None if self.zero_inflation is None else np.asarray(x["x_zi"], "float64"),
            )
        except TooLarge as err:
            self._require_in_memory(f"{err} (the memory_budget)")
            if self.posterior == "joint" or self.reml:
                raise TooLarge(
                    f"{err} Raise `memory_budget`, or fit with posterior='mean_field' (stochastic VI, "
                    "one Gaussian per level and term)."
                ) from err
            warnings.warn(
                f"{err} Falling back to stochastic VI with one Gaussian per level and term "
                "(posterior='mean_field'), which understates the variance of small factors "
                "nested in or crossed with large ones; raise `memory_budget` for the joint posterior.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def _fit_by_engine(self, solver, x, y, epochs, verbose, callbacks, **kwargs):
        """Runs Keras's `fit` with one engine iteration per epoch (see `train_step`)."""
        for key in ("validation_data", "validation_split", "class_weight"):
            if kwargs.get(key) is not None:
                raise ValueError(f"`{key}` is not supported by the engine's fit.")
        callbacks = list(callbacks or [])
        if not self.optimizer.built:
            # Unused by the engine, but built as a later fit (minibatches) and a saved
            # model expect it.
            self.optimizer.build(self.trainable_variables)
        self._solver = solver
        self._solver_started = False
        # The data live in the solver: Keras iterates over a placeholder.
        dataset = tf.data.Dataset.from_tensors(tf.zeros([1])).repeat()
        compiled = (self.run_eagerly, self.steps_per_execution)
        # The solver is numpy: its steps run eagerly, one per execution.
        self.run_eagerly, self.steps_per_execution = True, 1
        self.train_function = None
        try:
            history = super().fit(
                dataset, epochs=epochs or 100, steps_per_epoch=1, verbose=verbose,
                callbacks=callbacks, shuffle=False, **kwargs,
            )
        finally:
            self.run_eagerly, self.steps_per_execution = compiled
            self.train_function = None
            self._solver = None
        results = solver.results()
        report = solver.report()
        self._engine_fit = {
            "vcov": solver.fixed_covariance(),
            "zi_vcov": solver.zi_covariance(),
            "threshold_vcov": None if not ordinal_lib.is_ordinal(self.family) else ordinal_lib.threshold_covariance(
                solver, ordinal_lib.intercept_index(self)),
            "report": report,
            "boundary": results["boundary"],
            "likelihood": solver.likelihood,
            "convergence": None if solver.check is None else solver.check.as_dict(),
            "estimator": solver.estimator,
        }
        # The float64 estimates for reporting (the layers hold float32: keras_glmm.estimates).
        self._engine_fit["estimates"] = estimates.record(self, results)
        failure = solver.check.message() if solver.check is not None and not solver.check.passed else None
        self._finish_fit(x, y, history, solver.converged, None, callbacks, elbo=report["elbo"], failure=failure)
        return history

    def train_step(self, data):
        """One engine iteration during a fit by the engine; Keras's gradient step otherwise."""
        if self._solver is None:
            return super().train_step(data)
        solver = self._solver
        if not self._solver_started:
            report = solver.start(**self._engine_start())
            self._solver_started = True
        else:
            report = solver.step()
        self._write_engine_results(solver.results())
        if solver.finished:
            self.stop_training = True
        n = float(solver.num_rows)
        # The logs are the solver's values at this step, not running means of
        # metrics; `gradient` (the largest projected gradient of the variance
        # parameters, per observation) shows how far from the optimum the fit is,
        # and its key also tells Keras to report these logs as they are.
        return {"loss": -report["elbo"] / n, "elbo": report["elbo"] / n,
                "nll": -report["expected_log_likelihood"] / n, "kl": report["kl"] / n,
                "gradient": solver.gradient_norm() / n}

    def _engine_start(self):
        """The solver's starting point: the model's current weights (a first fit's GLM start,
        a previous fit, or weights restored by `BackupAndRestore`)."""
        dispersion = self.dispersion()
        scale = dispersion.get("scale", 1.0) if self.family.is_gaussian_identity else 1.0
        lambdas, u = [], []
        for term in self.terms:
            tau = np.asarray(term.prior_stddev(), "float64")
            corr = np.asarray(term.prior_correlation(), "float64")
            lam = tau[:, None] * np.linalg.cholesky(corr + 1e-12 * np.eye(len(tau))) / scale
            lambdas.append(lam)
            mean = term.conditional_mean().astype("float64")
            u.append(np.linalg.lstsq(lam, mean.T, rcond=None)[0].T if np.any(lam) else np.zeros_like(mean))
        learned = {k: v for k, v in dispersion.items() if k not in self.head.fixed_params}
        start = {"lambdas": lambdas, "beta": self.coefficients(), "dispersion": learned, "u": u}
        if self.zero_inflation is not None:
            start["zi"] = self.zi_coefficients()
        return start

    def _write_engine_results(self, results):
        """Writes the solver's estimates into the layers (predict, ranef and serving read them)."""
        kernel = self.fixed_effects.kernel
        kernel.assign(results["beta"].reshape(kernel.shape).astype(kernel.dtype))
        for term, cov, mean, level_cov in zip(
                self.terms, results["covariances"], results["level_means"], results["level_covariances"]):
            sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
            safe = np.where(sd > 0, sd, 1.0)
            corr = cov / np.outer(safe, safe)
            np.fill_diagonal(corr, 1.0)
            term.set_prior(sd, corr)
            term.set_posterior(mean, level_cov)
        self.head.set_params({k: v for k, v in results["dispersion"].items() if k in self.head.log_params})
        if "zi" in results:
            zi = self.zero_inflation.kernel
            zi.assign(results["zi"].reshape(zi.shape).astype(zi.dtype))

    # ------------------------------------------------------------ the fit's end
    def _finish_fit(self, x, y, history, converged, last_delta, callbacks, source=None, elbo=None, failure=None):
        """Records a finished fit: convergence, summary, final reports, a warning.

        For a fit streamed from files (`source`; `x` and `y` are None) the final
        ELBO is one more pass over them and no training rows are kept.
        """
        self.converged_ = bool(converged)
        self._training_arrays = None if source is not None else (x, y)
        self._training_source = source
        if elbo is None:
            elbo = self._files_elbo(source)["elbo"] if source is not None else self.elbo(x, y)["elbo"]
        nobs = self._stream_scan.num_rows if source is not None else len(y)
        self._record_fit_summary(elbo, nobs, history)
        for callback in callbacks:
            # Callbacks that report the finished fit (GLMMTensorBoard) need the summary.
            if hasattr(callback, "write_final"):
                callback.write_final(self)
        if failure is not None:
            # The optimizer stopped, but the derivatives at its end point say it is no minimum.
            warnings.warn(f"{failure}.", RuntimeWarning, stacklevel=3)
        elif not self.converged_:
            change = "" if last_delta is None else (
                f" (last change in the ELBO per observation: {last_delta:.3g})")
            warnings.warn(
                f"{type(self).__name__} fit did not converge in {len(history.epoch)} epochs"
                f"{change}; fit again to continue, or raise `epochs`.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------- the data
    def fit_callbacks(self, callbacks, minibatch):
        """The callbacks of a stochastic-VI fit: the user's, the convergence check, the M-step.

        An `ELBOConvergence` is added unless the callbacks hold one (the minibatch
        rule for minibatch fits); minibatch fits with the default optimizer get
        `VarianceUpdate` first, so the convergence check sees the epoch's M-step.

        Returns:
            `(callbacks, convergence)`.
        """
        callbacks = list(callbacks or [])
        convergence = next((c for c in callbacks if isinstance(c, ELBOConvergence)), None)
        if convergence is None:
            convergence = ELBOConvergence.for_minibatches() if minibatch else ELBOConvergence()
            callbacks.append(convergence)
        if minibatch and self._default_optimizer:
            callbacks.insert(0, VarianceUpdate())
        return callbacks, convergence

    def use_minibatch_optimizer(self, x, y):
        """Switches a default-compiled model to the optimizer for minibatch fits.

        Minibatches make each level's gradient a noisy estimate from the few of its
        rows in the batch; Adam's per-coordinate normalization turns that noise into
        steps of the full learning rate, which never settle. The minibatch optimizer,
        `SparseAdam(MINIBATCH_LEARNING_RATE, natural_step=1.0)`, moves each
        level's posterior (mean and Cholesky factor) by natural-gradient steps
        instead (`RandomEffects.natural_gradient`; for the means, preconditioned by
        the posterior covariance: one epoch adds up to one Newton step of every
        level) and gives the few global weights Adam. Before a first fit, each
        level's posterior sds start at their Laplace value
        (`initialization.start_posterior_scales`, on rows of `x`, `y`), which the
        natural-gradient steps need. A model compiled with an explicit optimizer keeps it.
        """
        if composition.is_network(self.fixed_effects):  # NaturalGradient around the network's optimizer
            return composition.use_network_optimizer(self, x, y)
        if not getattr(self, "_default_optimizer", False):
            return
        if getattr(self.optimizer, "natural_step", None) is not None:
            return
        if int(self.optimizer.iterations) == 0 and self._engine_fit is None:
            initialization.start_posterior_scales(self, x, y)
        # The priors' sds and correlations then move by the M-step of
        # `VarianceUpdate` only: Adam's steps between epochs would undo its
        # over-relaxation.
        self._compile_default_optimizer(minibatch=True)

    def use_full_batch_optimizer(self):
        """Undoes `use_minibatch_optimizer` for a full-batch stochastic-VI fit.

        After minibatches the priors were moved by the M-step only (their weights
        not trainable) and the random effects by natural-gradient steps; a
        full-batch fit with the default optimizer gives every weight back to
        `SparseAdam`, so that nothing stays frozen.
        """
        if not getattr(self, "_default_optimizer", False):
            return
        if getattr(self.optimizer, "natural_step", None) is None:
            return
        self._compile_default_optimizer(minibatch=False)

    def _compile_default_optimizer(self, minibatch):
        """`SparseAdam` for every weight (full batch), or with natural-gradient steps for the
        posteriors and the priors left to `VarianceUpdate`'s M-step (minibatches)."""
        for term in self.terms:
            if term.scale_prior is None:
                term.log_scale.trainable = not minibatch
                if term.num_correlations:
                    term.correlation.trainable = not minibatch
        optimizer = (SparseAdam(learning_rate=MINIBATCH_LEARNING_RATE, natural_step=1.0) if minibatch
                     else SparseAdam(learning_rate=0.05))
        with self.distribute_strategy.scope():
            self.compile(optimizer=optimizer, steps_per_execution=self.steps_per_execution, jit_compile=False)
        self._default_optimizer = True

    def prepare(self, x, y, initialize=True):
        """Checks in-memory data, counts levels and (optionally) initializes weights.

        Returns:
            `(x, y, num_rows)` with arrays cast to the model's dtype.
        """
        if composition.is_network(self.fixed_effects):  # features for a network
            x, y, num_rows = composition.check_data(self, x, y)
        else:
            x, y, num_rows = initialization.check_data(self, x, y)
        if not self.built:
            self.build({key: (None,) + value.shape[1:] for key, value in x.items()})
        for term in self.terms:
            term.adapt(x[term.name])
        if isinstance(self.fixed_effects, VariationalFixedEffects):
            self.fixed_effects.num_observations = num_rows
        if initialize:
            if composition.is_network(self.fixed_effects):
                composition.initialize(self, x, y)
            else:
                initialization.initialize(self, x, y)
            self._data_initialized = True
        return x, y, num_rows

    # ------------------------------------------------------------ formulas
    @classmethod
    def from_formula(
        cls,
        formula,
        data,
        family="gaussian",
        link=None,
        weights=None,
        reml=False,
        posterior="auto",
        na_action="raise",
        sample_rows=None,
        ziformula=None,
        checks=None,
        **kwargs,
    ):
        """Builds a compiled, unfitted GLMM from an lme4 formula and its data.

        Args:
            formula: an lme4 formula, e.g. `"y ~ x + (x | g)"`; see `keras_glmm.formula`.
            data: a pandas DataFrame (the training data: it fixes the level
                vocabularies, the fixed-effects coding and the response coding),
                or files too large for memory (`kg.read_csv`, `kg.read_parquet`):
                one pass over them learns the same (`keras_glmm.streaming.scan`).
            family: a family name or `keras_glmm.families.Family`.
            link: optional link name.
            weights: binomial trials for a proportion response (a column name or array).
            reml: restricted maximum likelihood (gaussian, identity link; the engine).
            posterior: `"auto"`, `"joint"` or `"mean_field"`: which update rule fits
                the model (see `GLMM`). `"auto"` takes the engine for in-memory data
                (of any size for a gaussian identity-link model, else of up to
                `FULL_BATCH_ROWS` rows) whose joint posterior fits `memory_budget`,
                and stochastic VI otherwise (files, more rows).
            na_action: `"raise"` (missing values are an error listing the rows) or
                `"omit"` (rows with missing values are dropped, with a warning).
            sample_rows: files only: the size of the uniform sample of rows that
                fixes the fixed-effects coding and the GLM starting point (100,000).
            ziformula: a zero-inflated family's zero-inflation formula, glmmTMB's
                `ziformula`: one-sided, fixed effects only, coded like the fixed
                part (`"~ mined"`, `"~ C(spp) + I(cover**2)"`, `"~ 0 + f"`):
                `logit(pi_i) = x_zi,i' gamma`. `"~1"` (the default for a
                zero-inflated family) is a constant `pi`. With covariates the model
                is fitted in memory by the engine only (see `GLMM`).
            checks: lme4's guard rails (`keras_glmm.checks`, lme4's `lmerControl`
                / `glmerControl` `check.*`): a dict of a check to `"stop"`,
                `"warning"` or `"ignore"`, e.g. `{"nobs_vs_nlev": "ignore"}`;
                keys `nlev_gtr_1`, `nobs_vs_nlev`, `nobs_vs_nre`, `rank_x`,
                `response_not_const`, `collinear_x`, `separation`. `None`: lme4's
                defaults for the family (lmer's for gaussian identity, glmer's else).
            **kwargs: passed to `GLMM(...)` (e.g. `quadrature_points`,
                `memory_budget`, `name`).

        Returns:
            A compiled `GLMM`; `model.fit(data)` fits it.
        """
        keywords.check_keywords(kwargs, keywords.parameters(  # R's `REML=`, a typo: a did-you-mean
            cls.__init__, exclude=("random_effects", "zero_inflation")) | {"name", "dtype", "trainable"},
            f"{cls.__name__}.from_formula()")
        family_obj = families_lib.get_family(family, link=link)
        asked = dict(checks) if isinstance(checks, dict) else {}
        checks = checks_lib.resolve_checks(checks, family_obj)
        if ziformula is not None and "zi_odds" not in family_obj.dispersion_params:
            raise ValueError(
                f"`ziformula` is for a zero-inflated family ('zero_inflated_poisson' or 'zip', "
                f"'zero_inflated_negative_binomial' or 'zinb'). Received: family={family_obj.name!r}, "
                f"ziformula={ziformula!r}")
        scan = None
        if streaming.is_source(data):
            if ziformula is not None and str(ziformula).replace(" ", "") not in ("~1", "1"):
                raise ValueError(
                    "A zero-inflation probability with covariates (ziformula) is fitted in memory by the "
                    "engine only, not from files: read them into a data frame.")
            if posterior == "joint" or reml:
                raise ValueError(
                    "Files are fitted in minibatches by stochastic VI: posterior='joint' and REML need "
                    "the data in memory (read them into a data frame)."
                )
            if ordinal_lib.is_ordinal(family_obj):
                raise ValueError(
                    "An ordinal model is fitted in memory (its categories and thresholds are learned "
                    "from every row), not from files: read them into a data frame.")
            all_rows = sorted(set(asked) & set(checks_lib.ALL_ROW_CHECKS))
            if all_rows:
                raise ValueError(
                    f"checks {all_rows} need every row in memory and are not run on files (a sample of "
                    "the rows can be constant or separated where the files are not): read the files into "
                    "a data frame to have them, or leave these keys out.")
            scan = streaming.scan(
                data, formula, family_obj, weights=weights, na_action=na_action,
                sample_rows=sample_rows or streaming.SAMPLE_ROWS, checks=checks,
            )
            design = scan.design
            checks_lib.check_levels(design.random, scan.num_rows, checks)  # the sample had too few rows
        else:
            design = Design.from_data(formula, data, family_obj.name, weights=weights, na_action=na_action,
                                      ziformula=ziformula, checks=checks)
        family_obj = family_obj.for_design(design)  # e.g. an ordinal response's categories
        terms = [
            RandomEffects(
                num_levels=r.n_levels,
                num_effects=len(r.columns),
                intercept=r.intercept,
                covariance="full" if r.term.correlated else "diagonal",
                name=r.name,
            )
            for r in design.random
        ]
        zero_inflation = None
        if design.zi_spec is not None:
            zero_inflation = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros",
                                                name="zero_inflation")
        model = cls(random_effects=terms, family=family_obj, posterior=posterior, reml=reml,
                    zero_inflation=zero_inflation, **kwargs)
        model.design = design
        model._weights = weights
        # What `update` (keras_glmm.inference) repeats: the data and the options of this call.
        model._formula_call = dict(data=data, family=family, link=link, weights=weights, reml=reml,
                                   posterior=posterior, na_action=na_action, sample_rows=sample_rows,
                                   ziformula=ziformula, checks=checks, **kwargs)
        model.compile()
        if scan is not None:
            model._prepare_from_scan(scan)  # counts from the files, GLM start on the sample
            return model
        # The training data are at hand: check them, count each level's rows (the
        # KL's scaling) and start from the GLM fit now, so that `fit` on a tf.data
        # pipeline of the same data works as well as `fit(data)`.
        x, y = model._frame_arrays(data, weights=weights)
        model._formula_index = model._frame_index  # the rows `glmm` fits next
        checks_lib.check_fit_data(design, x, y, checks)  # separation of a binomial response
        model._formula_arrays = model.prepare(x, y)[:2]  # for `glmm`, which fits them next
        return model

    def _fit_inputs(self, x, y):
        """Compiles if needed and turns a formula model's data frame into arrays."""
        if not self.compiled:
            self.compile()
        if isinstance(x, pd.DataFrame):
            if self.design is None:
                raise ValueError(
                    "This model was not built from a formula: pass a dict of arrays, or build "
                    "it with GLMM.from_formula to fit a data frame."
                )
            x, y = self._frame_arrays(x, weights=y)
        return x, y

    def _frame_arrays(self, data, weights=None, with_response=True):
        design = self.design
        if weights is None:
            weights = getattr(self, "_weights", None)
        if design.na_action == "omit":
            complete = design.complete_rows(data, with_response=with_response)
            if with_response and isinstance(weights, str) and weights in data.columns:
                complete &= data[weights].notna().to_numpy()
            if not complete.all():
                warnings.warn(
                    f"na_action='omit': dropped {int((~complete).sum())} of {len(data)} rows "
                    "with missing values.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                if weights is not None and not isinstance(weights, str):
                    weights = np.asarray(weights)[complete]
                data = data.loc[complete]
        self._frame_index = data.index  # results for these rows are indexed so (keras_glmm.frames)
        return design.arrays(data, weights=weights, with_response=with_response)

    @property
    def posterior_kind(self):
        """`"joint"` after a fit by the engine, `"mean-field"` after stochastic VI."""
        return "joint" if self._engine_fit is not None else "mean-field"

    def _record_fit_summary(self, elbo, nobs, history):
        num_parameters = len(self.coefficients()) + len(self.head.log_params)
        if self.zero_inflation is not None:
            num_parameters += len(self.zi_coefficients())
        for term in self.terms:
            num_parameters += term.num_effects + term.num_correlations
        if self._engine_fit is not None:
            likelihood = self._engine_fit["likelihood"]
        else:
            # Mean-field VI holds the exact posterior of a single gaussian term only.
            exact = (self.family.is_gaussian_identity
                     and len(self.terms) <= 1 and all(t.scale_prior is None for t in self.terms))
            likelihood = "exact" if exact else "bound"
        self.fit_summary_ = {
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
            "estimator": self._estimator(likelihood),
            "epochs": len(history.epoch),
            # The engine's check of the end point (lme4's checkConv), or None.
            "convergence": None if self._engine_fit is None else self._engine_fit.get("convergence"),
        }
        results_lib.warn_if_singular(self)

    def _estimator(self, likelihood):
        if self._engine_fit is not None and self._engine_fit.get("estimator"):
            return self._engine_fit["estimator"]
        if likelihood == "exact":
            return "exact ML (gaussian, identity link: the posterior is exact)"
        return "Gaussian VI (mean-field, stochastic: one Gaussian per level and term)"

    def _require_fit(self):
        if self._training_arrays is None and self._training_source is not None:
            raise streaming.fitted_from_files_error(self._training_source)
        if self._training_arrays is None:
            raise ValueError("The model has not been fitted: call `fit` first.")
        return self._training_arrays

    # -------------------------------------------------------------- results
    def fixef(self, component="cond"):
        """Fixed-effect estimates as a pandas Series in design-column order (lme4's fixef).

        Args:
            component: `"cond"` (the conditional model's, lme4's `fixef`) or `"zi"`
                (a zero-inflated family's zero-inflation coefficients, on the logit
                scale of `pi`: glmmTMB's `fixef(fit)$zi`; a constant zero-inflation
                has one, `(Intercept)` = `log(zi_odds)`).
        """
        if _component(component) == "zi":
            return pd.Series(self.zi_coefficients(), index=results_lib.zi_names(self), name="Estimate")
        if ordinal_lib.is_ordinal(self.family):  # clmm's fit$beta (no intercept) and fit$alpha
            return ordinal_lib.thresholds(self) if component == "thresholds" else ordinal_lib.fixef(self)
        if component == "thresholds":
            raise ValueError(f"component='thresholds' is an ordinal model's; family {self.family.name!r} has none.")
        return pd.Series(self.coefficients(), index=results_lib.fixed_names(self), name="Estimate")

    def zi_coefficients(self):
        """The zero-inflation coefficients `gamma` (logit of `pi`), `(q,)`; see `fixef(component="zi")`."""
        if "zi_odds" not in self.family.dispersion_params:
            raise ValueError(f"Family {self.family.name!r} has no zero-inflation: it is not zero-inflated.")
        if self.zero_inflation is not None:
            recorded = estimates.current(self)
            if recorded is not None and recorded["zi"] is not None:
                return recorded["zi"].copy()
            return self.zero_inflation.get_weights()[0].reshape(-1).astype("float64")
        return np.array([math.log(self.dispersion()["zi_odds"])])

    def vcov(self, component="cond"):
        """Covariance of the fixed-effect estimates (DataFrame).

        After a fit by the engine: for a gaussian model lme4's `vcov` (ML or REML),
        `sigma^2` times the fixed effects' block of the posterior precision's
        inverse; for other families the Laplace covariance at the optimum (see
        `VariationalSolver.fixed_covariance`), computed once per fit. After
        stochastic VI: `results.fixed_vcov`, from the training rows.

        `component="zi"`: that of the zero-inflation coefficients (glmmTMB's
        `vcov(fit)$zi`), from a fit by the engine: the inverse of a
        finite-difference Hessian of the objective it ended on, the exact
        log-likelihood where adaptive quadrature applies (see
        `VariationalSolver.zi_covariance`); NaN where that Hessian is not positive
        definite.
        """
        if _component(component) == "thresholds":
            cov = None if self._engine_fit is None else self._engine_fit.get("threshold_vcov")
            if cov is None:
                raise ValueError("Standard errors of the thresholds come from a fit by the engine that ends on "
                                 "the exact likelihood (adaptive quadrature: one grouping factor, agq_points > 0).")
            names = list(self.fixef(component).index)
            return pd.DataFrame(cov, index=names, columns=names)
        if _component(component) == "zi":
            names = results_lib.zi_names(self)
            cov = None if self._engine_fit is None else self._engine_fit.get("zi_vcov")
            if cov is None:
                if "zi_odds" in self.head.fixed_params:
                    raise ValueError("`zi_odds` is held fixed: it has no standard error.")
                raise ValueError("Standard errors of the zero-inflation coefficients come from a fit by the "
                                 "engine (posterior='auto' or 'joint', in memory).")
            return pd.DataFrame(cov, index=names, columns=names)
        names = results_lib.fixed_names(self)
        if self._engine_fit is not None:
            cov = self._engine_fit["vcov"]
        else:
            x, y = self._require_fit()
            cov = results_lib.fixed_vcov(self, x, y)
        if ordinal_lib.is_ordinal(self.family):
            return ordinal_lib.vcov(self, cov)
        return pd.DataFrame(cov, index=names, columns=names)

    def is_singular(self):
        """lme4's `isSingular`: whether a standard deviation is 0 or a correlation +-1."""
        return bool(results_lib.singular_components(self))

    def coef_table(self, component="cond", ddf=None):
        """Estimate, Std. Error, z value and Pr(>|z|) of each fixed effect; for a gaussian
        identity-link model Estimate, Std. Error and t value, as lme4's summary.
        `component="zi"`: the zero-inflation coefficients' (glmmTMB's zero-inflation model).
        `ddf="Satterthwaite"` (a gaussian identity-link fit by the engine, ML or REML) or
        `"Kenward-Roger"` (REML) adds lmerTest's `df` and `Pr(>|t|)` (`keras_glmm.degrees_of_freedom`)."""
        if ddf is not None:
            if _component(component) == "zi":
                raise ValueError("`ddf` applies to the conditional model's fixed effects (component='cond').")
            return degrees_of_freedom.coef_table(self, ddf)
        gaussian = self.family.is_gaussian_identity
        if _component(component) != "cond":
            gaussian = False
        return results_lib.coef_table(self.fixef(component), self.vcov(component).values, t_values=gaussian)

    # lme4's generics -----------------------------------------------------
    def _summary(self):
        if self.fit_summary_ is None:
            raise ValueError("The model has not been fitted: call `fit` first.")
        return self.fit_summary_

    def logLik(self):  # noqa: N802 - lme4's name
        """lme4's `logLik`: the log-likelihood at the fit (the REML criterion for REML fits).

        Exact for a gaussian model fitted by the engine, and for a GLMM the engine
        finished by adaptive quadrature; otherwise the ELBO, a lower bound of it
        (`fit_summary_["likelihood"]` says which).
        """
        return float(self._summary()["elbo"])

    def nobs(self):
        """lme4's `nobs`: the number of observations fitted."""
        return int(self._summary()["nobs"])

    def deviance(self):
        """`-2 logLik`, lme4's `deviance` of a maximum-likelihood fit."""
        return -2.0 * self.logLik()

    def AIC(self):  # noqa: N802 - lme4's name
        """`-2 logLik + 2 k`, `k` the fixed effects, variance parameters and dispersion."""
        return self.deviance() + 2.0 * self._summary()["num_parameters"]

    def BIC(self):  # noqa: N802 - lme4's name
        """`-2 logLik + log(n) k`."""
        return self.deviance() + math.log(self.nobs()) * self._summary()["num_parameters"]

    # lme4's inference (keras_glmm.inference, .profile, .prediction) -------
    def confint(self, parm=None, level=0.95, method="profile", nsim=500, seed=None, n_jobs=1):
        """lme4's `confint(fit, oldNames = FALSE)`: a DataFrame of intervals, rows `sd_...|g`,
        `cor_...|g`, `sigma`, fixed effects; `method` `"profile"`, `"Wald"` or `"boot"`
        (see `keras_glmm.inference.confint`)."""
        return inference.confint(self, parm=parm, level=level, method=method, nsim=nsim, seed=seed,
                                 n_jobs=n_jobs)

    def profile(self, parm=None):
        """lme4's `as.data.frame(profile(fit))`: zeta traces, columns `.par`, `.zeta`, `value`
        (gaussian identity-link fits; see `keras_glmm.profile`)."""
        return profile_lib.profile_frame(self, parm=parm)

    def plot_profile(self, parm=None, level=0.95):
        """lme4's `xyplot(profile(fit))`: a matplotlib Figure of zeta against each parameter."""
        return profile_lib.plot_profile(self.profile(parm=parm), level=level)

    def bootMer(self, nsim=500, seed=None, n_jobs=1):  # noqa: N802 - lme4's name
        """lme4's parametric `bootMer`: every parameter refitted on `nsim` simulated responses
        (a DataFrame, one row per sample; `keras_glmm.inference.bootstrap`)."""
        return inference.bootstrap(self, nsim=nsim, seed=seed, n_jobs=n_jobs)

    def update(self, formula=None, **changes):
        """lme4's `update`: refitted with a new formula (`". ~ . - Days"`) and/or options."""
        return inference.update(self, formula, **changes)

    def drop1(self, test="Chisq"):
        """lme4's `drop1(fit, test = "Chisq")`: a likelihood-ratio test per droppable fixed term."""
        return inference.drop1(self, test=test)

    def sigma(self):
        """lme4's `sigma`: the residual sd of a gaussian model, `1 / sqrt(shape)` of a gamma
        model (its coefficient of variation), 1 for the others."""
        params = self.dispersion()
        if self.family.name == "gaussian":
            return float(params["scale"])
        if "shape" in params:
            return float(1.0 / math.sqrt(params["shape"]))
        return 1.0

    def ranef(self, condvar=True):
        """Per grouping factor a DataFrame of conditional means (and posterior sds)."""
        return results_lib.ranef(self, condvar=condvar)

    def varcorr(self):
        """lme4's `as.data.frame(VarCorr(fit))`: grp, var1, var2, vcov, sdcor."""
        return results_lib.varcorr(self)

    def coef(self):
        """Per grouping factor, each level's coefficients (fixed + random), as lme4's coef."""
        return results_lib.coef(self)

    def report(self):
        """An lme4-like summary (a string; `model.summary()` keeps its Keras meaning)."""
        return results_lib.report(self)

    def plot_ranef(self, max_levels=None, prob=0.95):
        """lme4's `dotplot(ranef(fit, condVar = TRUE))`: a matplotlib Figure (`keras_glmm.plots`)."""
        return plots.ranef_figure(self, max_levels=max_levels, prob=prob)

    def plot_residuals(self):
        """Residuals vs fitted and normal Q-Q plots: a matplotlib Figure (`keras_glmm.plots`)."""
        return plots.residuals_figure(self)

    def fitted(self):
        """Fitted response means of the training rows, random effects included: a Series
        indexed like the training data frame's rows, an array after a fit on arrays."""
        fitted = self.predict_response(None)
        if isinstance(fitted, pd.DataFrame):  # an ordinal model's category probabilities
            return fitted
        return frames.series(np.asarray(fitted), self._rows_index(None), "fitted")

    def residuals(self):
        """Response residuals `y - fitted()` of the training rows (proportions for binomial):
        a Series indexed like the training data frame's rows, an array after a fit on arrays."""
        x, y = self._require_fit()
        return frames.series(response_lib.proportion(y) - np.asarray(self.fitted()), self._rows_index(None),
                             "residuals")

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
            return prediction.predict_interval(self, newdata, re_form, allow_new_levels, type, interval, level)
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
        `keras_glmm.prediction.simulate`).

        Returns:
            For a data frame (`newdata`, or the training frame), lme4's layout: a
            DataFrame indexed like its rows with columns `sim_1` ... `sim_<nsim>`;
            for arrays a numpy array `(nsim, rows)`.
        """
        _check_positive_integer(nsim, "nsim")
        values = prediction.simulate(self, nsim=nsim, seed=seed, newdata=newdata, re_form=re_form, trials=trials)
        return frames.draws(values, self._rows_index(newdata), "sim")

    def elbo(self, x, y=None):
        """The ELBO of a data set and its parts (totals, not per row).

        `x` may be files (`kg.read_csv`, `kg.read_parquet`): one pass over them.

        After a fit by the engine, on its own training arrays, this is the engine's
        ELBO (the joint posterior's: for a gaussian model lme4's log-likelihood or
        REML criterion). Otherwise it is the exact ELBO of the posterior the layers
        hold, each term's levels independent of the other terms' (the joint
        posterior's marginals): for a single term the same, for crossed or nested
        terms a lower value.

        Returns:
            A dict with `elbo`, `expected_log_likelihood` and `kl`.
        """
        if streaming.is_source(x):
            return self._files_elbo(x)
        if self._engine_fit is not None and self._training_arrays is not None and (
                x is self._training_arrays[0] and y is self._training_arrays[1]):
            return dict(self._engine_fit["report"])
        x, y, num_rows = self.prepare(x, y, initialize=False)
        weights = response_lib.prior_weights(x)
        # In chunks: the quadrature's (rows, nodes) intermediates of 10M rows at
        # once would take gigabytes.
        ell = 0.0
        for start in range(0, num_rows, ELBO_CHUNK_ROWS):
            rows = slice(start, start + ELBO_CHUNK_ROWS)
            y_pred = self({key: value[rows] for key, value in x.items()}, training=False)
            w = None if weights is None else tf.constant(weights[rows], self.compute_dtype)
            ell += float(np.sum(self.expected_log_likelihood(y[rows], y_pred, w).numpy().astype("float64")))
        kl = self._total_kl()
        return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}

    def _total_kl(self):
        """KL(q || p) of the whole model (a float)."""
        kl = sum(float(layer.total_kl()) for layer in self.random_effects)
        if isinstance(self.fixed_effects, VariationalFixedEffects):
            kl += float(self.fixed_effects.total_kl())
        return kl

    def coefficients(self):
        """Fixed-effect estimates (posterior means), `(p,)` float64, in the columns of `x`."""
        recorded = estimates.current(self)  # the engine's own float64 values
        if recorded is not None:
            return recorded["beta"].copy()
        return self._weight_coefficients().astype("float64")

    def _weight_coefficients(self):
        if isinstance(self.fixed_effects, VariationalFixedEffects):
            return self.fixed_effects.coefficients()[0]
        weights = self.fixed_effects.get_weights()
        kernel = weights[0].reshape(-1)
        return np.concatenate([weights[1].reshape(-1), kernel]) if len(weights) > 1 else kernel

    def dispersion(self):
        """The family's dispersion parameters as floats (e.g. `{"scale": 0.755}`)."""
        params = {k: float(v) for k, v in self.head.params().items()}
        recorded = estimates.current(self)  # the engine's own float64 values
        if recorded is not None:
            params.update({k: v for k, v in recorded["dispersion"].items() if k in params})
        return params

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Exports for serving; a formula model's signature takes raw grouping levels.

        For a model built from a formula (and `format="tf_saved_model"`), the
        SavedModel's `serving_default` takes the fixed-effects design `x`, each
        grouping column's raw levels as strings (looked up in the graph; unseen
        levels predict at the population level) and slope covariates, and returns
        `mean` and `eta`; see `keras_glmm.serving`. Other models use Keras's export.
        A zero-inflation with covariates (ziformula) is not exported: a ValueError.
        """
        if self.zero_inflation is not None:
            raise ValueError(
                "A model with a zero-inflation probability with covariates (ziformula) has no SavedModel "
                "export: save it with model.save('model.keras') and predict with predict_response.")
        if ordinal_lib.is_ordinal(self.family):
            # Its answer is a probability per category (predict_response), which the
            # serving graph does not compute: refused rather than serving something else.
            raise ValueError(
                "An ordinal model has no SavedModel export (its predictions are category probabilities): "
                "save it with model.save('model.keras') and predict with predict_response.")
        with serving.written_to(filepath):  # a full disk: an OSError naming the path
            if self.design is not None and format == "tf_saved_model" and input_signature is None:
                return serving.export_saved_model(self, filepath)
            if composition.is_network(self.fixed_effects) and format == "tf_saved_model" and input_signature is None:
                return composition.export(self, filepath)  # raw features, level names as strings
            return super().export(filepath, format=format, verbose=verbose,
                                   input_signature=input_signature, **kwargs)

    # ---------------------------------------------------------------- keras
    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras's `load_weights`; a damaged file is a ValueError naming it (`saving.read_errors`)."""
        from keras_glmm.saving import read_errors

        with read_errors(filepath, "the weights"):
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "random_effects": [keras.saving.serialize_keras_object(l) for l in self.random_effects],
                "fixed_effects": keras.saving.serialize_keras_object(self.fixed_effects),
                "family": self.family.name,
                "link": self.family.link.name,
                "fixed_params": self.head.fixed_params,
                "quadrature_points": self.quadrature_points,
                # A formula model keeps its formula, level vocabularies and codings
                # (plain JSON: loads under safe_mode).
                "design": None if self.design is None else self.design.get_config(),
                "posterior": self.posterior,
                "reml": self.reml,
                "memory_budget": self.memory_budget,
                "agq_points": self.agq_points,
                "intercept": self.intercept,
                "zero_inflation": None if self.zero_inflation is None else keras.saving.serialize_keras_object(
                    self.zero_inflation),
                "weights": getattr(self, "_weights", None) if isinstance(
                    getattr(self, "_weights", None), str) else None,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["random_effects"] = [
            keras.saving.deserialize_keras_object(c) for c in config["random_effects"]
        ]
        config["fixed_effects"] = keras.saving.deserialize_keras_object(config["fixed_effects"])
        if config.get("zero_inflation") is not None:
            config["zero_inflation"] = keras.saving.deserialize_keras_object(config["zero_inflation"])
        design = config.pop("design", None)
        weights = config.pop("weights", None)
        if design is not None and design.get("response_kind") == "ordinal":  # the family's categories
            config["family"] = families_lib.Ordinal(config.pop("link", None), levels=design["response_levels"])
        model = cls(**config)
        if design is not None:
            model.design = Design.from_config(design)
        model._weights = weights
        return model


# Each model's one-step predict function (see `GLMM.predict`), dropped with the model.
_ONE_STEP_PREDICT = weakref.WeakKeyDictionary()


def _check_positive_integer(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def glmm(formula, data, family="gaussian", weights=None, **options):
    """Fits a GLMM from an lme4 formula: the one call an lme4 user makes.

    ```python
    fit = keras_glmm.glmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    print(fit.report())
    fit.fixef(); fit.ranef(); fit.varcorr(); fit.predict_response(newdata)
    ```

    Args:
        formula: an lme4 formula. The fixed part has an intercept unless it says
            `0 +` or `- 1`, as in lme4; a factor is `C(f)` (R's `factor(f)` is
            refused with an error saying so).
        data: a pandas DataFrame, or files (`kg.read_csv`, `kg.read_parquet`)
            streamed in chunks.
        family: a family name, R's call of one as a string
            (`'binomial(link = "probit")'`, `'Gamma("inverse")'`), or a
            `keras_glmm.families.Family`.
        weights: binomial trials for a proportion response.
        **options: `GLMM.from_formula` options (`link`, `reml`, `posterior`,
            `na_action`, `sample_rows`, `ziformula`, `checks`, ...) and `fit` options (`epochs`, `callbacks`,
            `verbose`, `batch_size`, `steps_per_epoch`; for files `shuffle_buffer`
            and `seed`). Any other name is a TypeError with the name meant:
            `REML=True` -> "did you mean reml=True?" (`keras_glmm.keywords`).

    Returns:
        The fitted `GLMM`. Its results are float64 (the engine's estimates);
        for a data frame `predict_response`, `fitted` and `residuals` are Series
        indexed like its rows, `simulate` and `posterior_predictive` DataFrames
        of a row per observation (`keras_glmm.frames`); `plot_ranef()` and
        `plot_residuals()` draw them (`keras_glmm.plots`).
    """
    fit_keys = (
        "epochs", "callbacks", "verbose", "batch_size", "steps_per_epoch", "shuffle_buffer", "seed",
    )
    # Unknown names (R's `REML=`, a typo) fail here with a did-you-mean, not inside Keras.
    keywords.check_keywords(options, keywords.parameters(
        GLMM.from_formula, GLMM.__init__, exclude=("formula", "data", "random_effects", "zero_inflation"),
    ) | set(fit_keys) | {"name", "dtype", "trainable"}, "glmm()")
    fit_options = {k: options.pop(k) for k in fit_keys if k in options}
    model = GLMM.from_formula(formula, data, family=family, weights=weights, **options)
    arrays = model.__dict__.pop("_formula_arrays", None)
    if arrays is None:  # files
        model.fit(data, **fit_options)
    else:  # the data frame's arrays, checked and coded once
        model.fit(*arrays, **fit_options)
        model._training_index = model.__dict__.pop("_formula_index", None)  # results indexed like `data`
    return model
