"""Run by `test_sparse_exchange.py` (not a test module).

    python _sparse_exchange_worker.py

Splits the CPU into 2 logical devices, then for each table size builds a GLMM
under a 2-replica `MirroredStrategy`, fits a few minibatch steps with an optimizer
that records, at trace time, every gradient that enters and leaves Keras's
cross-replica aggregation (`_all_reduce_sum_gradients`): its type and the number
of elements it carries (for `tf.IndexedSlices`, values plus indices). Prints one
JSON object on its last line of stdout.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH = 4096
LEVELS = (10_000, 1_000_000)


def _describe(grad, runtime, key):
    """Type and static shapes of `grad`, traced; element counts recorded at run time.

    The number of elements is recorded by a `tf.py_function` (static shapes of the
    all-gathered slices are unknown), as `runtime[key]`: a list, one per execution.
    """
    import tensorflow as tf

    if isinstance(grad, tf.IndexedSlices):
        size = tf.size(grad.values) + tf.size(grad.indices)
        info = {
            "type": "IndexedSlices",
            "values_shape": grad.values.shape.as_list(),
            "indices_shape": grad.indices.shape.as_list(),
        }
    else:
        size = tf.size(grad)
        info = {"type": "dense", "shape": grad.shape.as_list()}

    def record(n):
        runtime.setdefault(key, []).append(int(n.numpy()))
        return n

    tf.py_function(record, [size], size.dtype)
    return info


def main():
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np

    import keras_glmm as kg

    records = []
    runtime = {}

    class RecordingSparseAdam(kg.SparseAdam):
        def _all_reduce_sum_gradients(self, grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            reduced = super()._all_reduce_sum_gradients(grads_and_vars)
            for (g, v), (r, _) in zip(grads_and_vars, reduced):
                if g is None:
                    continue
                i = len(records)
                records.append({
                    "variable": v.name,
                    "variable_shape": v.shape.as_list(),
                    "sent": _describe(g, runtime, f"{i}/sent"),
                    "reduced": _describe(r, runtime, f"{i}/reduced"),
                })
            return reduced

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    out = {"devices": devices, "batch": BATCH, "levels": {}}
    rng = np.random.default_rng(0)
    for num_levels in LEVELS:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        n = 3 * BATCH
        level = rng.integers(0, num_levels, size=n)
        x = {"x": np.stack([np.ones(n), rng.normal(size=n)], 1), "g": level}
        y = 1.0 + 0.5 * x["x"][:, 1] + rng.normal(size=n)
        strategy = tf.distribute.MirroredStrategy(devices)
        records.clear()
        runtime.clear()
        with strategy.scope():
            model = kg.GLMM(random_effects=[kg.RandomEffects(num_levels, name="g")])
            model.compile(optimizer=RecordingSparseAdam(learning_rate=0.05))
            x, y, _ = model.prepare(x, y, initialize=False)
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).repeat()
            keras.Model.fit(model, dataset, epochs=1, steps_per_epoch=3, verbose=0)
        out["levels"][str(num_levels)] = {
            "num_replicas": int(strategy.num_replicas_in_sync),
            "iterations": int(model.optimizer.iterations.numpy()),
            "records": [
                r | {"sent_elements": runtime.get(f"{i}/sent", []),
                     "reduced_elements": runtime.get(f"{i}/reduced", [])}
                for i, r in enumerate(records)
            ],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
