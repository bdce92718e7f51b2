"""Stochastic VI: gradient steps on the ELBO by Keras's `fit` loop, full-batch or minibatches.

One Gaussian per level and term (the mean-field posterior), for models or data the
engine does not take (`posterior="mean_field"`, `fit(batch_size=...)`, a network as
fixed effects, files beyond `memory_budget`, non-gaussian data beyond `FULL_BATCH_ROWS`
rows that coordinate ascent does not take, ...):

```
full batch   (rows <= FULL_BATCH_ROWS, no batch_size): the whole data each step,
             epochs of `steps_per_epoch` (100) steps, SparseAdam on every weight
minibatches  epochs of one pass (`default_batch_size` rows a batch); natural-gradient
             steps of the levels' posteriors and the M-step of the priors each epoch
             (`use_minibatch_optimizer`, `VarianceUpdate`)
```

Either stops on `ELBOConvergence` (at most `epochs`, 200). `run` is the loop, shared
with the files' driver (`keras_glmm.fitting.files`). A tf.data pipeline, or anything
else Keras's `fit` takes, goes to Keras's `fit` as it is (`PipelineDriver`).
"""

import contextlib

import tensorflow as tf

from keras_glmm import composition
from keras_glmm import initialization
from keras_glmm.batches import minibatches
from keras_glmm.callbacks import ELBOConvergence, VarianceUpdate
from keras_glmm.fitting import driver
from keras_glmm.fitting.driver import FitDriver, fit_inputs, require_in_memory
from keras_glmm.optimizers import SparseAdam

# Minibatch fits: at most this many rows per batch (large batches amortize the
# per-step overhead), and the Adam learning rate of the global weights (fixed
# effects, variance parameters).
MINIBATCH_ROWS = 2**16
MINIBATCH_LEARNING_RATE = 0.05
# Full-batch steps per epoch, and the epochs of a stochastic-VI fit, by default.
FULL_BATCH_STEPS = 100
EPOCHS = 200


def default_batch_size(num_rows):
    """Rows per minibatch: about 100 steps per epoch, within [8,192, 65,536].

    The global weights move by Adam steps, so an epoch needs enough of them for the
    variance parameters to keep up with the random effects (a few steps per epoch
    leave them lagging when the learning rate is lowered); beyond 65,536 rows a
    batch gains little throughput.
    """
    return int(min(MINIBATCH_ROWS, max(8192, num_rows // 100)))


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


# ------------------------------------------------------------- the loop
def fit_callbacks(model, callbacks, minibatch):
    """The callbacks of a stochastic-VI fit: the user's, the convergence check, the M-step
    (`GLMM.fit_callbacks`).

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
    if minibatch and model._default_optimizer:
        callbacks.insert(0, VarianceUpdate())
    return callbacks, convergence


def run(model, dataset, steps_per_epoch, minibatch, request, callbacks=None):
    """The stochastic-VI loop of every fit not by the engine: in memory, minibatches, files.

    Returns:
        `(history, convergence, callbacks)`: Keras's History, the `ELBOConvergence`
        that watched the fit, and the callbacks it ran with (for `FitDriver.finish`).
    """
    callbacks, convergence = fit_callbacks(model, request.callbacks if callbacks is None else callbacks,
                                           minibatch=minibatch)
    model._engine_fit = None
    with aligned_steps_per_execution(model, steps_per_epoch):
        history = FitDriver.keras_fit(
            model, dataset, epochs=request.epochs or EPOCHS, steps_per_epoch=steps_per_epoch,
            verbose=request.verbose, callbacks=callbacks, shuffle=False, **request.options,
        )
    return history, convergence, callbacks


# ------------------------------------------------------------- the optimizers
def use_minibatch_optimizer(model, x, y):
    """Switches a default-compiled model to the optimizer for minibatch fits
    (`GLMM.use_minibatch_optimizer`).

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
    if composition.is_network(model.fixed_effects):  # NaturalGradient around the network's optimizer
        return composition.use_network_optimizer(model, x, y)
    if not getattr(model, "_default_optimizer", False):
        return
    if getattr(model.optimizer, "natural_step", None) is not None:
        return
    if int(model.optimizer.iterations.numpy()) == 0 and model._engine_fit is None:
        initialization.start_posterior_scales(model, x, y)
    # The priors' sds and correlations then move by the M-step of
    # `VarianceUpdate` only: Adam's steps between epochs would undo its
    # over-relaxation.
    _compile_default_optimizer(model, minibatch=True)


def use_full_batch_optimizer(model):
    """Undoes `use_minibatch_optimizer` for a full-batch stochastic-VI fit
    (`GLMM.use_full_batch_optimizer`).

    After minibatches the priors were moved by the M-step only (their weights
    not trainable) and the random effects by natural-gradient steps; a
    full-batch fit with the default optimizer gives every weight back to
    `SparseAdam`, so that nothing stays frozen.
    """
    if not getattr(model, "_default_optimizer", False):
        return
    if getattr(model.optimizer, "natural_step", None) is None:
        return
    _compile_default_optimizer(model, minibatch=False)


def _compile_default_optimizer(model, minibatch):
    """`SparseAdam` for every weight (full batch), or with natural-gradient steps for the
    posteriors and the priors left to `VarianceUpdate`'s M-step (minibatches)."""
    for term in model.terms:
        if term.scale_prior is None:
            term.log_scale.trainable = not minibatch
            if term.num_correlations:
                term.correlation.trainable = not minibatch
    optimizer = (SparseAdam(learning_rate=MINIBATCH_LEARNING_RATE, natural_step=1.0) if minibatch
                 else SparseAdam(learning_rate=0.05))
    with model.distribute_strategy.scope():
        model.compile(optimizer=optimizer, steps_per_execution=model.steps_per_execution, jit_compile=False)
    model._default_optimizer = True


# ------------------------------------------------------------- the drivers
class StochasticDriver(FitDriver):
    """Fits in-memory data by stochastic VI: full-batch, or minibatches beyond
    `FULL_BATCH_ROWS` rows, for a network, or with `batch_size`."""

    @classmethod
    def select(cls, model, request):
        return cls() if request.in_memory else None

    def fit(self, model, request):
        x, y, num_rows = request.data(model)
        data = (x, y)
        batch_size = composition.fit_batch_size(model, num_rows, request.batch_size)  # a network: minibatches
        minibatch = batch_size is not None or num_rows > driver.FULL_BATCH_ROWS
        if not minibatch:
            dataset = tf.data.Dataset.from_tensors(data).repeat()
            steps_per_epoch = request.steps_per_epoch or FULL_BATCH_STEPS
            use_full_batch_optimizer(model)
        else:
            batch_size = batch_size or default_batch_size(num_rows)
            dataset = minibatches(data, batch_size, seed=request.seed)
            steps_per_epoch = request.steps_per_epoch or -(-num_rows // batch_size)
            use_minibatch_optimizer(model, x, y)
        history, convergence, callbacks = run(model, dataset, steps_per_epoch, minibatch, request)
        self.finish(model, history, convergence.converged, callbacks, training=data,
                    last_delta=convergence.last_delta)
        return history


class PipelineDriver(FitDriver):
    """A tf.data pipeline, or anything else Keras's `fit` takes that is neither arrays in
    memory nor files: Keras's `fit` as it is (stochastic VI on the batches it yields;
    call `prepare(x, y)` on in-memory data first)."""

    @classmethod
    def select(cls, model, request):
        return None if request.in_memory else cls()

    def fit(self, model, request):
        x, y = fit_inputs(model, request.x, request.y)
        model._training_index = None
        require_in_memory(model, "a tf.data pipeline is fitted by stochastic VI")
        if request.seed is not None:
            raise ValueError("`seed` seeds the shuffle of in-memory data and files; a tf.data "
                             f"pipeline is shuffled by its own ops. Received: seed={request.seed!r}")
        return self.keras_fit(
            model, x, y=y, batch_size=request.batch_size, epochs=request.epochs or 1, verbose=request.verbose,
            callbacks=request.callbacks, steps_per_epoch=request.steps_per_epoch, **request.options,
        )
