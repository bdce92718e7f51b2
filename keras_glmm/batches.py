"""In-memory training batches: a `tf.data` pipeline over arrays already coded for a model."""

import numpy as np
import tensorflow as tf


def minibatches(data, batch_size, shuffle=True, seed=None, block_rows=256):
    """An endless `tf.data` stream of shuffled minibatches of in-memory arrays.

    `from_tensor_slices(...).shuffle(...).batch(...)` handles one row at a time:
    at 65,536 rows a batch that costs about 0.4 s on 2 cores, far more than a
    training step. Here the rows are permuted once, and each epoch draws a random
    order of blocks of `block_rows` consecutive rows of that permutation: a batch
    is a `tf.gather` of whole blocks, which reads memory in runs instead of one
    cache miss per row (a row-wise gather of 65,536 random rows from 10M costs
    several times more). Every row is in exactly one batch per epoch; batches
    differ between epochs, as blocks are dealt anew.

    Args:
        data: a nested structure of arrays with equal first dimensions.
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        shuffle: a new random order each epoch; False keeps the rows' order.
        seed: optional seed of the permutations: the same seed deals the same
            batches, epoch by epoch (the epoch's block order is a stateless
            shuffle of `(seed, epoch)`, whatever TensorFlow's global seed).
        block_rows: rows per block of the epoch's shuffle.

    Returns:
        A repeated `tf.data.Dataset` of batches.
    """
    num_rows = int(tf.nest.flatten(data)[0].shape[0])
    if shuffle:
        order = np.random.default_rng(seed).permutation(num_rows)
        # One array at a time: a permuted copy of everything at once beside the
        # tensors would hold the data three times.
        tensors = tf.nest.map_structure(lambda a: tf.convert_to_tensor(np.asarray(a)[order]), data)
    else:
        tensors = tf.nest.map_structure(tf.convert_to_tensor, data)
    starts = tf.range(0, num_rows, batch_size, dtype="int64")
    block_rows = max(1, min(int(block_rows), batch_size))
    num_blocks = -(-num_rows // block_rows)

    def epoch(number):
        if shuffle:
            blocks = tf.range(num_blocks, dtype="int64")
            if seed is None:
                blocks = tf.random.shuffle(blocks)
            else:
                pair = tf.stack([tf.constant(int(seed) % 2**63, tf.int64), number])
                blocks = tf.random.experimental.stateless_shuffle(blocks, seed=pair)
            order = tf.reshape(blocks[:, None] * block_rows + tf.range(block_rows, dtype="int64"), [-1])
            # The last block may be short: drop the row numbers past the end.
            order = tf.boolean_mask(order, order < num_rows)
        else:
            order = tf.range(num_rows, dtype="int64")
        return tf.data.Dataset.from_tensor_slices(starts).map(
            lambda start: order[start:tf.minimum(start + batch_size, num_rows)]
        )

    def take_rows(rows):
        return tf.nest.map_structure(lambda t: tf.gather(t, rows), tensors)

    return (
        tf.data.Dataset.counter(dtype=tf.int64)  # the epoch's number
        .flat_map(epoch)
        .map(take_rows, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(2)
    )
