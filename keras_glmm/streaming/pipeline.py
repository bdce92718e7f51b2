"""Training batches from files: the `tf.data` pipeline of a fit, and its errors.

`dataset` reads the files (in a new random order each pass), codes the chunks into
model arrays (`chunk_arrays`), shuffles them in a bounded buffer (`block_shuffle`)
and prefetches; `batches` is one pass in file order (the final ELBO, predictions).
Errors met inside the pipeline reach the user as themselves (`raising_read_errors`,
`FilesCheck`), and a file that changed under the fit stops it (`FilesChangedError`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from keras_glmm.batches import minibatches
from keras_glmm.streaming.file_stamps import FilesChangedError
from keras_glmm.streaming.reader import chunk_arrays

__all__ = [
    "FilesCheck", "batches", "block_shuffle", "dataset", "fitted_from_files_error", "multi_worker_shares",
    "raising_read_errors", "signature", "worker_files",
]

BATCH_SIZE = 65_536
SHUFFLE_BUFFER = 1_000_000
# Fewest steps in an epoch: `GLMM.fit`'s epochs in memory. `ELBOConvergence`
# compares epochs; over a few minibatch steps the ELBO's change is mostly noise,
# and the fit stops early (radon in 2 batches a pass: the county sd 3% off).
MIN_EPOCH_STEPS = 100
_Y = "__y__"  # key of the response in the blocks of `block_shuffle`


class FilesCheck(keras.callbacks.Callback):
    """Stops a fit from files when one of them changed since the scan (`FilesChangedError`).

    At the start of every epoch each file's size and modification time are compared
    with the scan's (a `stat` per file), and an error that the `tf.data` pipeline met
    while reading ahead (prefetching the next batches) is raised here as itself.
    """

    def __init__(self, scan_result):
        super().__init__()
        self.scan_result = scan_result

    def on_epoch_begin(self, epoch, logs=None):
        self.scan_result.check_files()

    def on_train_end(self, logs=None):
        self.scan_result.check_files()


@contextlib.contextmanager
def raising_read_errors(scan_result):
    """Re-raises an error of the files' reader that reached Keras as a TensorFlow error.

    A Python exception inside `tf.data.Dataset.from_generator` comes out of the
    iterator as an `InvalidArgumentError` (a ValueError), an `UnknownError` (an
    OSError) ...: the generator records it on the scan (`_failures`), and this
    context raises the recorded exception in place of the TensorFlow one.
    """
    try:
        yield
    except tf.errors.OpError:
        failure = scan_result._take_failure()
        if failure is None:
            raise
        raise failure from None


def _rows(block) -> int:
    return len(next(iter(block.values())))


def _concat(blocks):
    if len(blocks) == 1:
        return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _take(block, index):
    return {k: v[index] for k, v in block.items()}


def block_shuffle(blocks, buffer_rows, batch_size, rng=None) -> Iterator[dict]:
    """Batches of rows from a stream of blocks, shuffled within a bounded buffer.

    Blocks (dicts of arrays with one row per entry of their first dimension) are
    gathered until the buffer holds at least ``buffer_rows`` rows; then its rows
    are permuted, batches are emitted from the permuted rows until about half the
    buffer is left, and the rest stays to be mixed with the next blocks (so a row
    can travel further than one buffer's worth). At the end of the stream the
    remaining rows are permuted and emitted. Every row is emitted exactly once;
    every batch has ``batch_size`` rows except the last one. The buffer never holds
    more than ``buffer_rows`` plus one block's rows (plus the permuted copy of them
    while batches are taken).

    Args:
        blocks: an iterable of dicts of NumPy arrays.
        buffer_rows: rows gathered before permuting (at least ``batch_size``).
        batch_size: rows per batch.
        rng: a `numpy.random.Generator` (a fresh default one if None).

    Yields:
        Dicts of arrays with the blocks' keys.
    """
    if batch_size < 1 or buffer_rows < batch_size:
        raise ValueError(
            f"the shuffle buffer must hold at least one batch: buffer_rows={buffer_rows}, "
            f"batch_size={batch_size}"
        )
    rng = np.random.default_rng() if rng is None else rng
    buffered, rows = [], 0
    for block in blocks:
        n = _rows(block)
        if not n:
            continue
        buffered.append(block)
        rows += n
        if rows < buffer_rows:
            continue
        data = _concat(buffered)
        order = rng.permutation(rows)
        emit = max(1, (rows - buffer_rows // 2) // batch_size) * batch_size
        buffered = []
        for start in range(0, emit, batch_size):
            yield _take(data, order[start:start + batch_size])
        rest = order[emit:]
        buffered, rows = ([_take(data, rest)] if len(rest) else []), len(rest)
        del data
    if rows:
        data = _concat(buffered)
        order = rng.permutation(rows)
        for start in range(0, rows, batch_size):
            yield _take(data, order[start:start + batch_size])


def _signature(design, dtype):
    """`tf.TensorSpec`s of the model's inputs and response, from the design."""
    dtype = tf.as_dtype(dtype)
    x = {"x": tf.TensorSpec((None, design.n_fixed), dtype)}
    if design.spec.offsets:
        x["offset"] = tf.TensorSpec((None,), dtype)
    for r in design.random:
        x[r.name] = tf.TensorSpec((None,), tf.int64)
        if r.n_covariates:
            x[r.name + "_z"] = tf.TensorSpec((None, r.n_covariates), dtype)
    if design.weights_kind == "prior":
        x["weights"] = tf.TensorSpec((None,), dtype)
    two = design.response_kind in ("cbind", "proportion")
    y = tf.TensorSpec((None, 2) if two else (None,), dtype)
    return x, y


def _blocks(scan_result, family, dtype, order=None):
    reader = scan_result._reader
    reader.check_files()
    for path, frame in reader.chunks(order=order):
        if len(frame):
            try:
                x, y = chunk_arrays(scan_result.design, family, dtype, reader, path, frame)
            except ValueError as err:
                # A level or value the scan never saw: a symptom, if the file changed.
                try:
                    reader.check_files()
                except FilesChangedError as changed:
                    raise changed from err
                raise
            yield {**x, _Y: y}


def batches(scan_result, family, dtype, batch_size=BATCH_SIZE) -> Iterator[tuple[dict, np.ndarray]]:
    """One pass over the files in order: `(inputs, y)` batches of at most `batch_size` rows."""
    for block in _blocks(scan_result, family, dtype):
        for start in range(0, _rows(block), batch_size):
            batch = {k: v[start:start + batch_size] for k, v in block.items()}
            y = batch.pop(_Y)
            yield batch, y


def signature(scan_result, dtype):
    """`(inputs, y)` `tf.TensorSpec`s of the batches of `batches` and `dataset`."""
    return _signature(scan_result.design, dtype)


def dataset(scan_result, family, dtype, batch_size=BATCH_SIZE, shuffle_buffer=SHUFFLE_BUFFER, seed=None):
    """The endless `tf.data` pipeline of shuffled training batches from files.

    Each pass reads the files (in a new random order), turns chunks into model
    arrays and shuffles them through `block_shuffle`, in a Python generator. Data
    that fit in the shuffle buffer are read once and kept: then the batches come
    from memory as in-memory fits' do (the whole data as one batch when it fits in
    one, else `keras_glmm.batches.minibatches`), with no Python in the loop.

    Under a `tf.distribute.MultiWorkerMirroredStrategy` of `n` workers (in scope:
    call `fit` inside `strategy.scope()`), worker `i` reads only the files
    `i, i + n, ...` (`worker_files`), and the pipeline is the strategy's
    `distribute_datasets_from_function` of each worker's own, so no row is read by
    two workers in training. Each worker's batches take its share of `batch_size`
    in proportion to its rows (its share whole in a full-batch fit): a step then
    holds about `batch_size` rows drawn evenly from all the files, and every
    worker passes over its files in the same number of steps.

    Every pass checks the files against the scan's stamps (see the module
    docstring); an error of a pass in the generator is recorded on the scan, for
    `raising_read_errors` and `FilesCheck` to raise as itself.

    Returns:
        ``(dataset, steps_per_pass)``: the repeated dataset of ``(inputs, y)``
        batches and the number of batches in one pass over the data.
    """
    if shuffle_buffer < batch_size:
        raise ValueError(
            f"`shuffle_buffer` ({shuffle_buffer}) must hold at least one batch (batch_size={batch_size})"
        )
    steps = -(-scan_result.num_rows // batch_size)
    scan_result._failures.clear()
    shares = multi_worker_shares()
    if shares is None:
        files = list(range(len(scan_result.source.paths)))
        return _files_dataset(scan_result, family, dtype, files, scan_result.num_rows, batch_size,
                              shuffle_buffer, seed), steps
    files = worker_files(scan_result.source.paths, *shares)
    stamps = scan_result.stamps
    rows = sum(stamps[scan_result.source.paths[i]].rows for i in files)
    if rows == 0:
        # A worker without rows would end its passes at once while the others wait in
        # their all-reduces (no collective timeout): say so instead of hanging.
        raise ValueError(_empty_share(scan_result, files, shares))
    all_rows = sum(stamp.rows for stamp in stamps.values())
    full_batch = batch_size >= scan_result.num_rows
    worker_batch = rows if full_batch else max(1, -(-batch_size * rows // all_rows))
    worker_seed = None if seed is None else seed + shares[0]

    def worker_dataset(context):  # the strategy's InputContext: this worker's share is `files`
        local_replicas = context.num_replicas_in_sync // max(context.num_input_pipelines, 1)
        if local_replicas > 1:
            # Each local replica would take a whole worker batch: k times the rows a step
            # and k times the work of a full batch. Not built yet: say so.
            raise ValueError(
                f"Files under a multi-worker strategy take one device per worker; this worker has "
                f"{local_replicas} replicas. Start one worker per device (CUDA_VISIBLE_DEVICES).")
        return _files_dataset(scan_result, family, dtype, files, rows, worker_batch,
                              max(shuffle_buffer, worker_batch), worker_seed)

    return tf.distribute.get_strategy().distribute_datasets_from_function(worker_dataset), steps


def _empty_share(scan_result, files, shares):
    """The error of a share of the files without a row to fit."""
    names = [scan_result.source.paths[i] for i in files]
    who = "the files" if shares is None else f"worker {shares[0]} of {shares[1]}'s files"
    return (f"{who} {names} hold no row to fit (empty, or every row with a missing value under "
            "na_action='omit'): give every worker files with rows, or fewer workers.")


def _files_dataset(scan_result, family, dtype, files, rows, batch_size, shuffle_buffer, seed):
    """`dataset` of the files numbered ``files`` (``rows`` rows in all)."""
    if rows <= shuffle_buffer:
        blocks = list(_blocks(scan_result, family, dtype, files))
        if not blocks:  # every row had a missing value (na_action="omit")
            raise ValueError(_empty_share(scan_result, files, multi_worker_shares()))
        x = _concat(blocks)
        y = x.pop(_Y)
        if rows <= batch_size:
            return tf.data.Dataset.from_tensors((x, y)).repeat()
        return minibatches((x, y), batch_size, seed=seed)
    rng = np.random.default_rng(seed)

    def one_pass():
        order = rng.permutation(files)
        blocks = _blocks(scan_result, family, dtype, order)
        try:
            for batch in block_shuffle(blocks, shuffle_buffer, batch_size, rng):
                y = batch.pop(_Y)
                yield batch, y
        except Exception as err:
            # tf.data turns it into a TensorFlow error: keep it for `raising_read_errors`
            # and `FilesCheck`, which raise it as itself.
            scan_result._failures.append(err)
            raise

    data = tf.data.Dataset.from_generator(one_pass, output_signature=_signature(scan_result.design, dtype))
    return data.repeat().prefetch(2)


def multi_worker_shares() -> tuple[int, int] | None:
    """``(worker_index, num_workers)`` of the multi-worker strategy in scope, or None.

    Read from the strategy's cluster resolver (`TF_CONFIG`): the chief, when the
    cluster names one, is worker 0 and the workers follow it.
    """
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    chiefs = len(cluster.get("chief", []))
    num_workers = chiefs + len(cluster.get("worker", []))
    if num_workers < 2:
        return None
    index = resolver.task_id if resolver.task_type == "chief" else chiefs + resolver.task_id
    return int(index), num_workers



def worker_files(paths, worker_index, num_workers) -> list[int]:
    """The files worker ``worker_index`` of ``num_workers`` reads: ``i, i + n, ...``.

    Whole files, so that no row is read by two workers and each worker's reads
    stay sequential. Fewer files than workers is an error (no row-level
    fallback: it would have every worker read every file).
    """
    if len(paths) < num_workers:
        raise ValueError(
            f"{len(paths)} file(s) for {num_workers} workers: in a multi-worker fit each worker reads "
            f"files of its own (worker i of n the files i, i + n, ...), so there must be at least as "
            f"many files as workers; split the data into {num_workers} or more files (of about equal "
            f"size). Files: {list(paths)[:5]}"
        )
    return list(range(worker_index, len(paths), num_workers))


def fitted_from_files_error(source) -> ValueError:
    """The error of results that need every training row of a model fitted from files."""
    return ValueError(
        f"This model was fitted from files ({source}) and keeps no training rows in memory: "
        "vcov(), coef_table(), fitted(), residuals(), simulate() and predictions without "
        "`newdata` need them. Pass newdata for predictions (model.predict_response(frame)); "
        "for standard errors, fit the same formula on a data frame (all the rows if they fit "
        "in memory, else a sample). fixef(), ranef(), varcorr(), coef() and "
        "predict_response(newdata) work as usual."
    )