"""`keras_glmm.compat`: each workaround still works on the installed Keras and TensorFlow.

Every test here pins a private name or a behaviour of Keras that `keras_glmm.compat`
relies on, and fails with a message saying what changed, so that an upgrade of
Keras or TensorFlow shows up here first. A test that fails because Keras fixed
the bug it works around says so: delete the workaround and its test.
"""

import inspect
import json
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.saving import serialization_lib
from tensorflow.python.distribute import collective_all_reduce_strategy

from keras_glmm import compat
from keras_glmm.layers.family_head import FamilyHead
from keras_glmm.layers.random_effects import RandomEffects
from keras_glmm.optimizers import SparseAdam

ROOT = Path(__file__).resolve().parents[1]


_ENV = {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}


def _run_script(code, timeout=240):
    """Runs `code` in a fresh Python (TensorFlow's devices are fixed at its start); its last stdout line, parsed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=_ENV, cwd=ROOT)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- distribution
def test_single_worker_logs_are_left_alone():
    logs = {"loss": tf.constant(1.5), "nested": {"kl": tf.constant(0.5)}, "vector": tf.constant([1.0, 2.0])}
    assert compat.multi_worker_logs(logs) is logs
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert not compat.in_multi_worker_mode(tf.distribute.get_strategy())
    assert not compat.in_multi_worker_mode(mirrored)
    with mirrored.scope():
        assert compat.multi_worker_logs(logs) is logs


def test_keras_still_averages_multi_worker_logs_along_axis_0():
    # `multi_worker_logs` turns scalars into vectors of one element because Keras
    # reduces every value of a step's logs this way under several workers.
    source = inspect.getsource(tf_trainer.reduce_per_replica)
    assert 'strategy.reduce("MEAN", v, axis=0)' in source, (
        "Keras changed how it reduces a step's logs across workers "
        "(backend/tensorflow/trainer.py reduce_per_replica): check compat.multi_worker_logs; "
        "if scalars are reduced with axis=None now, the workaround can go.\n" + source)
    assert 'reduction="auto"' in inspect.getsource(tf_trainer.TensorFlowTrainer._make_function)
    # ...and the multi-worker test of that function is the one `in_multi_worker_mode` replaces.
    assert "_in_multi_worker_mode()" in inspect.getsource(tf_trainer._collective_all_reduce_multi_worker)
    assert "self._num_workers > 1" in inspect.getsource(
        collective_all_reduce_strategy.CollectiveAllReduceExtended._in_multi_worker_mode)



TWO_WORKERS = """
import json
import tensorflow as tf
import keras
import numpy as np
from keras_glmm import compat

options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

class Plain(compat.BuiltModelFitsUnequalShards, keras.Model):  # as GLMM
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1, kernel_initializer="zeros")
    def call(self, x):
        return self.dense(x)
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # No compiled loss to build; each replica's share of the loss, as GLMM and Keras's own.
        return tf.reduce_mean(tf.square(y - y_pred)) / tf.distribute.get_strategy().num_replicas_in_sync

class Fixed(Plain):
    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return compat.multi_worker_logs(super().compute_metrics(x, y, y_pred, sample_weight=sample_weight))

out = {"multi_worker": compat.in_multi_worker_mode(strategy)}
for cls in (Fixed, Plain):  # the fixed one first: the plain one fails on both workers alike
    with strategy.scope():
        model = cls()
        model(np.zeros((1, 1), "float32"))
        model.compile(optimizer="sgd")
    try:
        history = model.fit(np.ones((4, 1), "float32"), np.full((4, 1), 2.0, "float32"), batch_size=4,
                            epochs=1, verbose=0, shuffle=False)
        out[cls.__name__] = history.history["loss"][0]
    except Exception as err:
        out[cls.__name__] = f"{type(err).__name__}: {err}"[:400]
print(json.dumps(out))
"""


@pytest.mark.slow  # two TensorFlow processes form a cluster: about a minute on 2 busy cores
def test_two_workers_average_the_logs_of_a_model_using_multi_worker_logs():
    sockets = [socket.socket() for _ in range(2)]
    for listener in sockets:
        listener.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{listener.getsockname()[1]}" for listener in sockets]
    for listener in sockets:
        listener.close()
    workers = []
    for index in range(2):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = dict(_ENV, TF_CONFIG=json.dumps(config))
        workers.append(subprocess.Popen([sys.executable, "-c", TWO_WORKERS], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    reports = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=300)
            assert worker.returncode == 0, f"exit {worker.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for report in reports:
        assert report["multi_worker"] is True, report
        # (2 - 0)^2 on every row: the mean over the workers is the loss of either.
        assert report["Fixed"] == pytest.approx(4.0), report
        assert "Invalid reduction dimension" in str(report["Plain"]), (
            "Keras now averages scalar logs across workers: delete compat.multi_worker_logs and "
            f"GLMM.compute_metrics. {report}")

def test_the_cluster_join_timeout_is_set_and_restored():
    extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
    assert isinstance(extended._check_health_initial_timeout, int), (
        "TensorFlow's CollectiveAllReduceExtended._check_health_initial_timeout is gone or changed type: "
        "fix compat.cluster_join_timeout")
    saved = extended._check_health_initial_timeout
    with compat.cluster_join_timeout(4.6):
        assert extended._check_health_initial_timeout == 5
    assert extended._check_health_initial_timeout == saved
    with pytest.raises(RuntimeError), compat.cluster_join_timeout(0.2):
        assert extended._check_health_initial_timeout == 1
        raise RuntimeError
    assert extended._check_health_initial_timeout == saved
    # The strategy's start-up barrier is what reads it.
    barrier = inspect.getsource(extended._start_check_health_thread)
    assert "timeout_seconds=self._check_health_initial_timeout" in barrier, barrier


def test_keras_still_builds_through_maybe_symbolic_build():
    parameters = list(inspect.signature(keras.Model._maybe_symbolic_build).parameters)
    assert parameters == ["self", "iterator", "data_batch"], (
        f"keras.Model._maybe_symbolic_build changed its signature: {parameters}; "
        "fix compat.BuiltModelFitsUnequalShards")
    calls = []

    class Spy(compat.BuiltModelFitsUnequalShards, keras.Sequential):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            calls.append(iterator is not None or data_batch is not None)
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    model = Spy([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), epochs=1, verbose=0)
    assert calls == [True], "Keras's fit no longer calls Model._maybe_symbolic_build: the override is dead"


UNEQUAL_SHARDS = """
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_glmm import compat

class Linear(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
    def call(self, x):
        return self.dense(x)
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return tf.reduce_mean(tf.square(y - y_pred))

class Fixed(compat.BuiltModelFitsUnequalShards, Linear):
    pass

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x, y = np.ones((5, 2), "float32"), np.ones((5, 1), "float32")
out = {}
for cls in (Linear, Fixed):
    with strategy.scope():
        model = cls()
        model(np.zeros((1, 2), "float32"))  # built before the fit, as GLMM.prepare builds
        model.compile(optimizer="sgd")
    try:
        model.fit(x, y, batch_size=5, epochs=1, verbose=0)  # shards of 3 and 2 rows
        out[cls.__name__] = "fits"
    except Exception as err:
        out[cls.__name__] = f"{type(err).__name__}: {err}"[:400]
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh TensorFlow with two devices: about 25 s on 2 busy cores
def test_a_built_model_fits_unequal_shards():
    out = _run_script(UNEQUAL_SHARDS)
    assert out["Fixed"] == "fits", out
    assert out["Linear"] != "fits", (
        "Keras now fits a built model on shards of unequal size under MirroredStrategy: "
        "delete compat.BuiltModelFitsUnequalShards")


# ---------------------------------------------------------------------- layers
class _Holder(keras.layers.Layer):
    """A plain layer with sublayers in an attribute, a list and a dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.term = RandomEffects(3, name="held")
        self.parts = [keras.layers.Dense(1, name="in_list")]
        self.named = {"head": FamilyHead("poisson", name="in_dict")}

    def build(self, input_shape):
        pass  # the walk needs the sublayers, not their weights

    def call(self, x):
        return x


def test_sublayers_walks_models_and_layers_like_keras():
    inner = keras.Sequential([keras.Input((2,), name="inner_input"), keras.layers.Dense(3, name="inner_dense")],
                             name="inner")
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, name="outer_dense")(inner(_Holder(name="holder")(inputs)))
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in compat.sublayers(model)]
    assert {"holder", "held", "in_list", "in_dict", "inner", "inner_dense", "outer_dense"} <= set(names)
    assert len(names) == len(set(names)) and model.name not in names
    # The same layers as Keras's private walk, less the input layer that `Sequential.layers` hides.
    keras_names = [layer.name for layer in model._flatten_layers(include_self=False)
                   if layer.name != "inner_input"]
    assert sorted(names) == sorted(keras_names)


def test_producing_layer_finds_the_layer_behind_a_tensor():
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(1)
    hidden = dense(inputs)
    assert compat.producing_layer(hidden) is dense, (
        "KerasTensor._keras_history.operation no longer names the layer that made a tensor: "
        "fix compat.producing_layer")
    assert compat.producing_layer(tf.constant(1.0)) is None


# ------------------------------------------------------------------ optimizers
def test_optimizer_slots_are_found_from_backend_variables():
    first = keras.Variable(np.zeros((3, 1)), name="first")
    second = keras.Variable(np.ones((4, 2)), name="second")
    optimizer = SparseAdam(0.1)
    optimizer.build([first, second])
    assert compat.built_variables(optimizer) == [first, second]
    for variable in (first, second):
        # Keras's backend hands `update_step` the tf.Variable, not the Keras one.
        assert compat.optimizer_variable(optimizer, variable.value) is variable
        momentum, velocity = compat.adam_moments(optimizer, variable.value)
        assert momentum.shape == velocity.shape == variable.shape
        assert momentum is not velocity
    # Under a strategy `update_step` gets each replica's copy.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = keras.Variable(np.zeros((2, 1)), name="mirrored")
        optimizer = SparseAdam(0.1)
        optimizer.build([mirrored])
    copy = strategy.experimental_local_results(mirrored.value)[0]
    assert compat.optimizer_variable(optimizer, copy) is mirrored
    assert compat.adam_moments(optimizer, copy)[0].shape == (2, 1)


# ---------------------------------------------------------------------- saving
@keras.saving.register_keras_serializable(package="keras_glmm_test_compat")
class _SafeModeProbe(keras.layers.Layer):
    """Records, while it is loaded, what `unsafe_deserialization_enabled` says."""

    seen = []

    def call(self, x):
        return x

    @classmethod
    def from_config(cls, config):
        cls.seen.append(compat.unsafe_deserialization_enabled())
        return super().from_config(config)


def test_unsafe_deserialization_follows_keras_safe_mode(tmp_path):
    assert callable(getattr(serialization_lib, "in_safe_mode", None)), (
        "keras.src.saving.serialization_lib.in_safe_mode is gone: fix compat.unsafe_deserialization_enabled")
    assert compat.unsafe_deserialization_enabled() is False  # outside any loading
    path = tmp_path / "probe.keras"
    keras.Sequential([keras.Input((1,)), _SafeModeProbe()]).save(path)
    _SafeModeProbe.seen.clear()
    keras.saving.load_model(path)
    keras.saving.load_model(path, safe_mode=True)
    keras.saving.load_model(path, safe_mode=False)
    assert _SafeModeProbe.seen == [False, False, True]
    with serialization_lib.SafeModeScope(None):  # restores the flag afterwards
        keras.config.enable_unsafe_deserialization()
        assert compat.unsafe_deserialization_enabled() is True
    assert compat.unsafe_deserialization_enabled() is False
