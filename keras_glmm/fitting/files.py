"""Fits from files (`kg.read_csv`, `kg.read_parquet`): stochastic VI on streamed batches.

A formula model built on files knows them by a scan (`keras_glmm.streaming.scan`):
their rows, each level's count of rows (the KL's scaling) and a uniform sample,
on which the GLM start is taken (`prepare_from_scan`). A fit streams shuffled
batches of them through the stochastic-VI loop (`keras_glmm.fitting.stochastic.run`);
its final ELBO is one more pass (`files_elbo`), and no rows stay in memory.
"""

import tensorflow as tf

from keras_glmm import initialization
from keras_glmm import response as response_lib
from keras_glmm import streaming
from keras_glmm.fitting import driver, stochastic
from keras_glmm.fitting.driver import FitDriver, require_in_memory
from keras_glmm.layers.fixed_effects import VariationalFixedEffects


def check_stochastic(posterior, reml):
    """Files are fitted by stochastic VI: a ValueError for `posterior="joint"` or REML."""
    if posterior == "joint" or reml:
        raise ValueError(
            "Files are fitted in minibatches by stochastic VI: posterior='joint' and REML need "
            "the data in memory (read them into a data frame)."
        )


def set_level_counts(model, design, level_counts, num_rows):
    """Each level's training rows (the KL's scaling), from a scan of files."""
    by_name = {r.name: c for r, c in zip(design.random, level_counts, strict=True)}
    for term in model.terms:
        if not term.built:
            term.build()
        term.level_counts.assign(by_name[term.name].astype(term.level_counts.dtype))
    if isinstance(model.fixed_effects, VariationalFixedEffects):
        model.fixed_effects.num_observations = int(num_rows)


def prepare_from_scan(model, scan):
    """Sets a formula model up from a scan: level counts, row count, GLM start on the sample.

    The counts (which scale each level's KL) and the number of rows are the files'
    own; only the starting point comes from the sample.
    """
    x, y = scan.design.arrays(scan.sample, weights=scan.weights)
    x, y, _ = initialization.check_data(model, x, y)
    if not model.built:
        model.build({key: (None,) + value.shape[1:] for key, value in x.items()})
    set_level_counts(model, scan.design, scan.level_counts, scan.num_rows)
    initialization.initialize(model, x, y)
    model._data_initialized = True
    model._stream_scan = scan


def scan_for(model, source):
    """The model's scan of `source` (from `from_formula`), or a new count of its rows."""
    if model.design is None:
        raise ValueError(
            "Fitting from files needs a model built from a formula: "
            "GLMM.from_formula(formula, source) or kg.glmm(formula, source)."
        )
    current = model._stream_scan
    if current is None or current.source._key() != source._key():
        current = streaming.recount(source, model.design, model.family, getattr(model, "_weights", None))
        model._stream_scan = current
    set_level_counts(model, current.design, current.level_counts, current.num_rows)
    return current


def files_elbo(model, source, batch_size=streaming.BATCH_SIZE):
    """The exact ELBO of the layers' posterior on files, in one pass (totals)."""
    scan = scan_for(model, source)
    x_spec, y_spec = streaming.signature(scan, model.compute_dtype)

    @tf.function(input_signature=[x_spec, y_spec])
    def batch_ell(x, y):
        ell = model.expected_log_likelihood(y, model(x, training=False), x.get(response_lib.WEIGHTS))
        return tf.reduce_sum(tf.cast(ell, tf.float64))

    ell = sum(float(batch_ell(x, y)) for x, y in streaming.batches(scan, model.family, model.compute_dtype,
                                                                     batch_size))
    kl = driver.total_kl(model)
    return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}


# `fit` options that only a streamed fit of files honours (`shuffle_buffer`) or that the
# engine refuses: with any of them the files are streamed even within `memory_budget`.
STREAMED_ONLY = ("shuffle_buffer", "validation_data", "validation_split", "class_weight")


class FilesDriver(FitDriver):
    """Stochastic VI on batches streamed from files.

    Batches of `batch_size` rows (the whole data when it has at most
    `FULL_BATCH_ROWS` rows and fits in the shuffle buffer, else 65,536), shuffled
    in a buffer of `shuffle_buffer` rows (1,000,000; `seed` seeds it); an epoch is
    one pass over the files but at least `streaming.MIN_EPOCH_STEPS` steps. Files whose
    rows fit `memory_budget` are fitted as the data frame of their rows
    (`streaming.in_memory_frame`): by the engine, with its standard errors; unless
    `fit` was given an option only a streamed fit honours (`STREAMED_ONLY`,
    `steps_per_epoch`).
    """

    @classmethod
    def select(cls, model, request):
        return cls() if streaming.is_source(request.x) else None

    def fit(self, model, request):
        source, options = request.x, request.options
        # Options only a streamed fit honours: given, the files are streamed whatever their size.
        streamed_only = [key for key in STREAMED_ONLY if options.get(key) is not None]
        if request.steps_per_epoch is not None:
            streamed_only.append("steps_per_epoch")
        shuffle_buffer = options.pop("shuffle_buffer", streaming.SHUFFLE_BUFFER)
        require_in_memory(model, "files are fitted by stochastic VI")
        if request.y is not None:
            raise ValueError("With files the response comes from the formula: do not pass `y`.")
        if options.pop("sample_weight", None) is not None:
            raise ValueError("`sample_weight` is not supported with files: use a weights column.")
        if not model.compiled:
            model.compile()
        check_stochastic(model.posterior, model.reml)
        weights = getattr(model, "_weights", None)
        if weights is not None and not isinstance(weights, str):
            raise ValueError(
                "This model's `weights` are an array (one per row of the frame it was built "
                "from): the files' rows have none. Build the model with `weights=` the name of "
                "a column of the files.")
        scan = scan_for(model, source)
        frame = None if streamed_only else streaming.in_memory_frame(scan, model.family, model.memory_budget)
        if frame is not None:  # within memory_budget: fitted as the data frame of the files' rows
            return model.fit(frame, scan.weights, batch_size=request.batch_size, epochs=request.epochs,
                             verbose=request.verbose, callbacks=request.callbacks,
                             steps_per_epoch=request.steps_per_epoch, seed=request.seed,
                             initialize=request.initialize, **options)
        batch_size = request.batch_size
        if batch_size is None:
            fits = scan.num_rows <= min(driver.FULL_BATCH_ROWS, shuffle_buffer)
            batch_size = scan.num_rows if fits else streaming.BATCH_SIZE
        minibatch = int(batch_size) < scan.num_rows
        if minibatch and len(scan.sample):
            # Natural-gradient steps for the random effects, their sds started from the sample.
            x, y = scan.design.arrays(scan.sample, weights=scan.weights)
            x, y, _ = initialization.check_data(model, x, y)
            stochastic.use_minibatch_optimizer(model, x, y)
        data, steps = streaming.dataset(scan, model.family, model.compute_dtype, int(batch_size),
                                        int(shuffle_buffer), request.seed)
        steps_per_epoch = request.steps_per_epoch or max(steps, streaming.MIN_EPOCH_STEPS)
        # Files that change under the fit stop it with the file named (FilesChangedError).
        callbacks = [*(request.callbacks or []), streaming.FilesCheck(scan)]
        with streaming.raising_read_errors(scan):
            history, convergence, callbacks = stochastic.run(model, data, steps_per_epoch, minibatch, request,
                                                             callbacks=callbacks)
            # The final ELBO is one more pass over the files.
            elbo = files_elbo(model, source)["elbo"]
            self.finish(model, history, convergence.converged, callbacks, source=source,
                        nobs=model._stream_scan.num_rows, elbo=elbo, last_delta=convergence.last_delta)
        return history
