"""Where keras_glmm needs what Keras and TensorFlow keep private, and the Keras bugs it works around.

Everything here was checked on Keras 3.15.1 and TensorFlow 2.21.0 (pyproject allows
``keras>=3.15,<4`` and ``tensorflow>=2.21,<2.22``). Each item has a test in
``tests/test_compat.py`` that fails when the private attribute disappears or
changes behaviour, so that a Keras or TensorFlow upgrade shows up there and not at
users. After an upgrade, run that file first; an item whose Keras bug is fixed can
be deleted together with its test.

Public routes (no private name; here because each replaces a private one and
rests on a behaviour of Keras that its test pins):

- `multi_worker_logs`: Keras reduces a training step's logs across workers with
  ``strategy.reduce("MEAN", value, axis=0)``, which rejects the scalars every
  metric returns.
- `sublayers`: every layer inside a model (Keras's own walk, ``_flatten_layers``,
  is private; ``Model.layers`` is one level deep).

Private names (no public route exists):

- `BuiltModelFitsUnequalShards` overrides ``keras.Model._maybe_symbolic_build``.
- `cluster_join_timeout` sets TensorFlow's
  ``CollectiveAllReduceExtended._check_health_initial_timeout``.
- `producing_layer` reads ``KerasTensor._keras_history``.
- `optimizer_variable`, `adam_moments` and `built_variables` read a Keras
  optimizer's ``_get_variable_index``, ``_trainable_variables``,
  ``_momentums`` and ``_velocities``.
- `unsafe_deserialization_enabled` reads
  ``keras.src.saving.serialization_lib.in_safe_mode``.
"""

import contextlib

import keras
import tensorflow as tf

try:  # the strategy's extended class, for `cluster_join_timeout`
    from tensorflow.python.distribute import collective_all_reduce_strategy as _collective
except ImportError:  # another TensorFlow layout: the start-up barrier keeps its default
    _collective = None
try:  # the reader of Keras's safe-mode flag, for `unsafe_deserialization_enabled`
    from keras.src.saving import serialization_lib as _serialization
except ImportError:  # another Keras layout: stay safe
    _serialization = None


# ----------------------------------------------------------------- distribution
def in_multi_worker_mode(strategy):
    """Whether `strategy` spans several workers (machines or processes).

    Its replicas are then more than this worker's own devices; public attributes
    only (Keras asks the private ``extended._in_multi_worker_mode()``).
    """
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def multi_worker_logs(logs):
    """A training or test step's logs, shaped so that Keras can average them across workers.

    Under several workers Keras 3 reduces each value a step returns with
    ``strategy.reduce("MEAN", value, axis=0)`` (its
    ``backend.tensorflow.trainer.reduce_per_replica``), which fails for the scalar
    metric results of every model ("Invalid reduction dimension 0 for input with 0
    dimensions"). A scalar `v` becomes the vector `[v]`: the mean over axis 0 of
    the replicas' vectors is then the mean over replicas, a scalar again, as
    ``MirroredStrategy`` on one machine gives. Elsewhere the logs are returned
    unchanged. Call it on what ``Model.compute_metrics`` returns (public route: an
    override of that method).
    """
    if not in_multi_worker_mode(tf.distribute.get_strategy()):
        return logs

    def as_vector(value):
        if isinstance(value, (tf.Tensor, tf.Variable)) and value.shape.rank == 0:
            return tf.reshape(value, [1])
        return value

    return keras.tree.map_structure(as_vector, logs)


class BuiltModelFitsUnequalShards:
    """A mixin (before `keras.Model`): a built model fits under several replicas whatever its shards' sizes.

    Before a fit under a strategy Keras 3 averages the first data batch across the
    replicas, elementwise (``Model._maybe_symbolic_build``, private), to build the
    model symbolically from it; that fails when the replicas' shards differ in size
    (919 rows on 2 replicas). A model that is built already needs no batch: only
    its optimizer may be unbuilt, and it is built here. Keras has no public hook
    before that step, so the private method is overridden.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.built and self.distribute_strategy.num_replicas_in_sync > 1:
            with self.distribute_strategy.scope():
                if self.optimizer is not None and not self.optimizer.built:
                    self.optimizer.build(self.trainable_variables)
            return None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


@contextlib.contextmanager
def cluster_join_timeout(seconds):
    """While open, a new `MultiWorkerMirroredStrategy` waits at most `seconds` for its workers.

    The strategy starts with an all-reduce across the workers that waits forever
    by default; its timeout is the class attribute
    ``CollectiveAllReduceExtended._check_health_initial_timeout`` (0: none), which
    no public option sets (``CommunicationOptions.timeout_seconds`` covers the
    later collectives only). The attribute is restored on exit. With another
    TensorFlow layout the strategy keeps its default.
    """
    extended = getattr(_collective, "CollectiveAllReduceExtended", None)
    saved = getattr(extended, "_check_health_initial_timeout", None)
    if saved is None:
        yield
        return
    extended._check_health_initial_timeout = max(1, round(seconds))
    try:
        yield
    finally:
        extended._check_health_initial_timeout = saved


# ---------------------------------------------------------------------- layers
def sublayers(model):
    """Every layer inside `model` (not `model` itself), each once, depth first.

    A model's layers are ``Model.layers`` (one level: a functional or sequential
    model's graph, a subclassed model's layer attributes); a layer that is not a
    model holds its sublayers in its public attributes (directly, or in lists,
    tuples and dicts). Keras's own recursive walk, ``_flatten_layers``, is private.
    """
    found, seen = [], {id(model)}
    pending = list(_children(model))
    while pending:
        layer = pending.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        pending[:0] = _children(layer)
    return found


def _children(layer):
    """The layers one level inside `layer`."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    values = [v for name, v in vars(layer).items() if not name.startswith("_")]
    children = []
    while values:
        value = values.pop(0)
        if isinstance(value, keras.layers.Layer):
            children.append(value)
        elif isinstance(value, (list, tuple)):
            values[:0] = value
        elif isinstance(value, dict):
            values[:0] = value.values()
    return children


def producing_layer(tensor):
    """The layer (or other Keras operation) whose call returned the symbolic `tensor`, or None.

    A `keras.KerasTensor` records it in its private ``_keras_history``; Keras has
    no public reader (a functional model's config names it, but building the
    config serializes every layer).
    """
    history = getattr(tensor, "_keras_history", None)
    return getattr(history, "operation", None)


# ------------------------------------------------------------------ optimizers
def optimizer_variable(optimizer, variable):
    """The Keras variable among those `optimizer` was built for whose backend value is `variable`.

    Keras passes ``update_step`` the backend variable (a `tf.Variable`, or one
    replica's copy of a mirrored one) where a layer's extra attributes live on the
    Keras variable; the map between them is the optimizer's private
    ``_get_variable_index`` into its private ``_trainable_variables``.
    """
    return optimizer._trainable_variables[optimizer._get_variable_index(variable)]


def adam_moments(optimizer, variable):
    """``(first moment, second moment)``: a Keras `Adam`'s slot variables of `variable`.

    Adam keeps them in the private lists ``_momentums`` and ``_velocities``, in
    the order of ``_get_variable_index``; a row-wise update reads and writes them.
    """
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]


def built_variables(optimizer):
    """The variables `optimizer` was built for, in its order (what ``apply(grads)`` updates).

    The list is Keras's private ``_trainable_variables``.
    """
    return list(optimizer._trainable_variables)


# ------------------------------------------------------------------- saving
def unsafe_deserialization_enabled():
    """Whether the user turned Keras's safe mode off (``load_model(..., safe_mode=False)``,
    ``keras.config.enable_unsafe_deserialization()``).

    Keras has no public reader of the flag; ``serialization_lib.in_safe_mode()``
    is what its own ``Lambda.from_config`` reads. ``None`` (outside any loading
    scope) counts as safe, as Keras's layers count it: only an explicit ``False``
    turns the check off, and a Keras without the reader stays safe.
    """
    reader = getattr(_serialization, "in_safe_mode", None)
    return reader is not None and reader() is False
