"""`GLMM`: a Keras model whose `fit` maximizes the evidence lower bound of a GLMM.

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

Three update rules train the same model, chosen by `fit` (`keras_glmm.fitting`):
**the engine** (`posterior="joint"`; the default for in-memory data the engine
can take): one Gaussian posterior over every random-effect coefficient, exact
for a gaussian model, the variance parameters by a bounded quasi-Newton method
(standard deviations can reach exactly 0), one iteration per epoch; and
**coordinate ascent** (`"auto"` only: binomial, Poisson or gaussian data beyond
`FULL_BATCH_ROWS` rows whose terms are not nested): one Gaussian per level and term,
full-batch Newton steps per term; and **stochastic VI** (`posterior="mean_field"`,
`fit(batch_size=...)`, files beyond `memory_budget`, a network as fixed effects, other
data beyond `FULL_BATCH_ROWS` rows): one Gaussian per level and term, moved by
gradient steps on the ELBO and stopped by `ELBOConvergence`. lme4's generics come from `Lme4Generics`
(`keras_glmm.generics`), predictions from `Predictions` (`keras_glmm.prediction`).

```
model.py          the Keras model: layers, call, the ELBO as its loss, compile, fit (a
                  dispatcher to keras_glmm.fitting's drivers), config, export
fitting/          how fit trains it: the engine, stochastic VI, files
generics.py       lme4's generics on the fit (fixef, vcov, logLik, confint, ...): a mixin
prediction.py     predict_response, simulate, posterior_predictive: a mixin
formula_model.py  from_formula and glmm: a model from an lme4 formula and its data
```
"""

import keras
import numpy as np
import tensorflow as tf

from keras_glmm import compat, design_spec, distribute
from keras_glmm import composition  # networks as fixed effects (keras_glmm.composition)
from keras_glmm import families as families_lib
from keras_glmm import formula_model
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import response as response_lib
from keras_glmm import serving, streaming
from keras_glmm.design import Design
from keras_glmm.fitting import driver, engine, files, large_data, stochastic
from keras_glmm.generics import Lme4Generics
from keras_glmm.layers.family_head import FamilyHead
from keras_glmm.layers.fixed_effects import VariationalFixedEffects
from keras_glmm.layers.random_effects import RandomEffects
from keras_glmm.optimizers import SparseAdam
from keras_glmm.prediction import Predictions
from keras_glmm.saving import read_errors

# The fit's sizes, where the code that uses them lives (named here too: benchmarks and
# users read them as keras_glmm.model.FULL_BATCH_ROWS, ...).
from keras_glmm.fitting.driver import FULL_BATCH_ROWS  # noqa: F401
from keras_glmm.fitting.stochastic import MINIBATCH_LEARNING_RATE, MINIBATCH_ROWS, default_batch_size  # noqa: F401
from keras_glmm.prediction import PREDICT_BATCH_ROWS  # noqa: F401

# Variational families (`GLMM(posterior=...)`): see the module docstring.
POSTERIORS = ("auto", "joint", "mean_field")
# Memory the joint posterior's dense block and selected inverse may take by default.
MEMORY_BUDGET = 2 * 2**30
# The ways `fit` trains a model, asked in turn: the first whose `select` takes the
# fit runs it (see `keras_glmm.fitting`). A new driver is a module and a line here.
FIT_DRIVERS = (
    files.FilesDriver,  # files (kg.read_csv, kg.read_parquet): stochastic VI on streamed batches
    stochastic.PipelineDriver,  # a tf.data pipeline: Keras's fit as it is
    engine.EngineDriver,  # in-memory data the engine takes: the joint posterior
    large_data.LargeDataDriver,  # beyond the engine's rows: full-batch mean-field coordinate ascent
    stochastic.StochasticDriver,  # other in-memory data: stochastic VI, full-batch or minibatches
)


@keras.saving.register_keras_serializable(package="keras_glmm")
class GLMM(Lme4Generics, Predictions, compat.BuiltModelFitsUnequalShards, keras.Model):
    """A generalized linear mixed model trained by `model.fit` on the negative ELBO.

    Its equations, layers and the two ways `fit` trains it (the engine, stochastic VI):
    see `keras_glmm.model`.

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
            covariates; `from_formula(..., ziformula=...)` builds it), fitted in
            memory by the engine only: stochastic VI, files and `export` refuse it.
        intercept: whether the model has one (lme4's do unless the formula says `0 +`;
            a formula decides). With arrays, `x` must carry it (ones, or columns
            adding up to one) or the fit raises a ValueError (`checks.check_intercept`):
            the random effects would take up the mean.

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

    def __init__(self, random_effects=(), fixed_effects=None, family="gaussian", link=None, fixed_params=None,
                 quadrature_points=None, posterior="auto", reml=False, memory_budget=MEMORY_BUDGET,
                 agq_points=None, zero_inflation=None, intercept=True, **kwargs):
        super().__init__(**kwargs)
        self.intercept = bool(intercept)
        self.family = families_lib.get_family(family, link=link)
        check_arguments(self.family, posterior, reml, agq_points, random_effects, zero_inflation)
        self.quadrature_points = quadrature_points
        self.posterior = posterior
        self.reml = bool(reml)
        self.memory_budget = int(memory_budget)
        self.agq_points = agq_points
        self.random_effects = list(random_effects)
        for layer in self.random_effects:
            layer.output_mode = "moments"  # the model's ELBO needs each term's mean and variance, not a draw
        if fixed_effects is None:
            fixed_effects = keras.layers.Dense(
                1, use_bias=False, kernel_initializer="zeros", name="fixed_effects", dtype=self.dtype_policy
            )
        if isinstance(fixed_effects, VariationalFixedEffects):
            fixed_effects.output_mode = "moments"
        self.fixed_effects = fixed_effects
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
        self._engine_run = None  # the engine during a fit by it (keras_glmm.fitting.engine.EngineRun)
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
        # A replica's batch may be empty (a short last batch split across replicas): its
        # share is then 0, not NaN (its loss is weighted by its rows below).
        nll = -tf.math.divide_no_nan(tf.reduce_sum(ell), tf.cast(tf.shape(ell)[0], ell.dtype))
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
        return distribute.replica_share(loss, rows)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Under several workers Keras averages each log in a way that rejects scalars.
        return compat.multi_worker_logs(super().compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    # ----------------------------------------------------------- the ELBO
    def elbo(self, x, y=None):
        """The ELBO of a data set and its parts (totals, not per row).

        `x` may be files (`kg.read_csv`, `kg.read_parquet`): one pass over them.

        After a fit by the engine, on its training arrays, this is the engine's ELBO
        (for a gaussian model lme4's log-likelihood or REML criterion); otherwise
        the exact ELBO of the layers' posterior, each term independent of the others
        (the joint posterior's marginals: lower for crossed or nested terms).

        Returns:
            A dict with `elbo`, `expected_log_likelihood` and `kl`.
        """
        if streaming.is_source(x):
            return files.files_elbo(self, x)
        return driver.arrays_elbo(self, x, y)

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

    def fit(self, x=None, y=None, batch_size=None, epochs=None, verbose=0, callbacks=None, steps_per_epoch=None,
            initialize=True, **kwargs):
        """Fits the model: Keras's `fit`, with a GLMM's defaults (see `keras_glmm.fitting`).

        In-memory data (a dict of arrays, or a formula model's data frame) are
        checked (clear errors for non-finite values, responses outside the family's
        support, unknown level indices, mismatched shapes), each layer's level
        counts set and, on the first fit only (`initialize=True`), the weights
        started from a GLM fit. The engine then fits them where it can (one
        quasi-Newton iteration per epoch, at most `epochs`, 100), else stochastic VI:
        full-batch up to `FULL_BATCH_ROWS` rows without `batch_size` (epochs of
        `steps_per_epoch` steps, 100), minibatches beyond (natural-gradient steps
        and an M-step of the variance components each epoch), at most `epochs`
        (200), stopped by an `ELBOConvergence` unless `callbacks` hold one. Files
        (`kg.read_csv`, `kg.read_parquet`) of a formula model are streamed in
        batches by stochastic VI (`shuffle_buffer` and `seed` set their shuffle);
        other inputs (a `tf.data.Dataset`, ...) go to Keras's `fit` unchanged (call
        `prepare(x, y)` on in-memory data first). `seed` also seeds the shuffle of
        in-memory minibatches: the same seed, the same estimates.

        Prior weights (lme4's `weights`) come as `x["weights"]` (a formula model's
        `weights=` column puts them there) or `sample_weight`: the precisions of a
        gaussian response (row variance `sigma^2 / w`), likelihood weights of the
        other families, in every fit, the ELBO and the standard errors.

        Returns:
            The Keras `History`.
        """
        request = driver.FitRequest(
            x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
            steps_per_epoch=steps_per_epoch, initialize=initialize, seed=kwargs.pop("seed", None), options=kwargs,
        )
        for fit_driver in FIT_DRIVERS:  # the last two take any data: one of them always fits
            chosen = fit_driver.select(self, request)
            if chosen is not None:
                return chosen.fit(self, request)

    def train_step(self, data):
        """One engine iteration during a fit by the engine; Keras's gradient step otherwise."""
        if self._engine_run is not None:
            return self._engine_run.step()  # keras_glmm.fitting.engine.EngineRun
        return super().train_step(data)

    # The drivers' steps a user may take by hand (keras_glmm.fitting).
    def prepare(self, x, y, initialize=True):
        """Checks in-memory data, counts levels, starts from a GLM: `(x, y, num_rows)` (`driver.prepare`)."""
        return driver.prepare(self, x, y, initialize=initialize)

    def engine_problem(self, num_rows=None, batch_size=None):
        """Why the engine cannot fit this model (a sentence), or None when it can (`engine.engine_problem`)."""
        return engine.engine_problem(self, num_rows, batch_size)

    # ------------------------------------------------------------ formulas
    @classmethod
    def from_formula(cls, formula, data, family="gaussian", link=None, weights=None, reml=False, posterior="auto",
                     na_action="raise", sample_rows=None, ziformula=None, checks=None, **kwargs):
        """Builds a compiled, unfitted GLMM from an lme4 formula and its data (a data frame, or
        files); the arguments are `keras_glmm.formula_model.from_formula`'s."""
        return formula_model.from_formula(
            cls, formula, data, family=family, link=link, weights=weights, reml=reml, posterior=posterior,
            na_action=na_action, sample_rows=sample_rows, ziformula=ziformula, checks=checks, **kwargs)

    def _frame_arrays(self, data, weights=None, with_response=True):
        """A formula model's data frame as `(x, y)` arrays (`keras_glmm.formula_model.frame_arrays`)."""
        return formula_model.frame_arrays(self, data, weights=weights, with_response=with_response)

    # ------------------------------------------------------- export, weights, config
    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Exports for serving; a formula model's signature takes raw grouping levels.

        For a model built from a formula (and `format="tf_saved_model"`), the
        SavedModel's `serving_default` takes the fixed-effects design `x`, each
        grouping column's raw levels as strings (looked up in the graph; unseen
        levels predict at the population level) and slope covariates, and returns
        `mean` and `eta`; see `keras_glmm.serving`. Other models use Keras's export.
        A zero-inflation with covariates (ziformula) is not exported: a ValueError.
        """
        serving.check_exportable(self.zero_inflation is not None, ordinal_lib.is_ordinal(self.family))
        with serving.written_to(filepath):  # a full disk: an OSError naming the path
            if self.design is not None and format == "tf_saved_model" and input_signature is None:
                return serving.export_saved_model(self, filepath)
            if composition.is_network(self.fixed_effects) and format == "tf_saved_model" and input_signature is None:
                return composition.export(self, filepath)  # raw features, level names as strings
            return super().export(filepath, format=format, verbose=verbose,
                                   input_signature=input_signature, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras's `load_weights`; a damaged file is a ValueError naming it (`saving.read_errors`)."""
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
        if design is not None:
            design = Design.from_config(design)
            if design.response_kind == "ordinal":  # the family's categories
                config["family"] = families_lib.Ordinal(config.pop("link", None), levels=design.response_levels)
        model = cls(**config)
        if design is not None:
            design_spec.check_model_matches(design, model)  # a file whose parts disagree is refused
            model.design = design
        model._weights = weights
        return model


def check_arguments(family, posterior, reml, agq_points, random_effects, zero_inflation):
    """The `GLMM` constructor's checks of its arguments: a ValueError or TypeError naming the one at fault."""
    if posterior not in POSTERIORS:
        raise ValueError(f"`posterior` must be one of {POSTERIORS}. Received: posterior={posterior!r}")
    if reml and not family.is_gaussian_identity:
        raise ValueError(
            "`reml=True` is defined for gaussian models with the identity link only. "
            f"Received: family={family.name!r}, link={family.link.name!r}."
        )
    if reml and posterior == "mean_field":
        raise ValueError("`reml=True` needs the engine's joint posterior: use posterior='auto' or 'joint'.")
    if agq_points is not None and (not isinstance(agq_points, (int, np.integer)) or agq_points < 0):
        raise ValueError(f"`agq_points` must be None or a non-negative integer. Received: {agq_points!r}")
    random_effects = list(random_effects)
    for layer in random_effects:
        if not isinstance(layer, RandomEffects):
            raise TypeError(f"`random_effects` must hold RandomEffects layers. Received: {layer!r}")
    names = [layer.name for layer in random_effects]
    for name in names:
        if name in ("x", "x_zi", "offset") or name.endswith("_z"):
            raise ValueError(f"A random-effects term may not be named '{name}'.")
    if len(set(names)) != len(names):
        raise ValueError(f"Random-effects terms need distinct names. Received: {names}")
    if zero_inflation is not None:
        if not isinstance(zero_inflation, keras.layers.Layer):
            raise TypeError(f"`zero_inflation` must be a Keras layer or None. Received: {zero_inflation!r}")
        if "zi_odds" not in family.dispersion_params:
            raise ValueError(f"`zero_inflation` needs a zero-inflated family. Received: family={family.name!r}")


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
    return formula_model.glmm(GLMM, formula, data, family=family, weights=weights, **options)
