"""A small shared harness for testing keras_glmm layers (keras.src.testing is private).

`run_layer_test` exercises every layer the same way: construction, eager and symbolic
calls, config and serialization round trips, `.keras` save/load of a functional model
containing the layer (without `custom_objects`: the classes are registered), and one
`fit` step.
"""

import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf


def _as_list(data):
    return list(data) if isinstance(data, (list, tuple)) else [data]


def _unlist(items, like):
    return items if isinstance(like, (list, tuple)) else items[0]


def _shape_of(x):
    return tuple(x.shape)


def _map_structure(fn, out):
    if isinstance(out, dict):
        return {k: fn(v) for k, v in out.items()}
    return fn(out)


def _check_shapes(actual, expected, what):
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{what}: expected a dict output, got {type(actual)}"
        assert set(actual) == set(expected), f"{what}: output keys {set(actual)} != {set(expected)}"
        for key in expected:
            _check_shapes(actual[key], expected[key], f"{what}[{key!r}]")
        return
    assert tuple(_shape_of(actual)) == tuple(expected), (
        f"{what}: output shape {tuple(_shape_of(actual))} != expected {tuple(expected)}"
    )


def _symbolic_shape(expected):
    """The expected shape with an unknown batch dimension."""
    if isinstance(expected, dict):
        return {k: _symbolic_shape(v) for k, v in expected.items()}
    return (None, *tuple(expected)[1:])


def _to_numpy(out):
    return _map_structure(lambda t: keras.ops.convert_to_numpy(t), out)


def assert_outputs_close(a, b, rtol=1e-6, atol=1e-6, what="outputs"):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_outputs_close(a[key], b[key], rtol, atol, f"{what}[{key!r}]")
        return
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)


def _inputs_for(input_data):
    arrays = [np.asarray(a) for a in _as_list(input_data)]
    inputs = [
        keras.Input(shape=a.shape[1:], dtype=str(a.dtype), name=f"input_{i}")
        for i, a in enumerate(arrays)
    ]
    return arrays, inputs


def _perturb_trainable(layer, seed=1234, sd=0.1):
    """Moves trainable weights off their initial values, so that a save/load check
    that outputs match is not satisfied trivially by freshly initialized weights."""
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        value = keras.ops.convert_to_numpy(w)
        w.assign(value + rng.normal(0.0, sd, size=value.shape).astype(value.dtype))


def _functional_model(layer_cls, init_kwargs, input_data):
    arrays, inputs = _inputs_for(input_data)
    layer = layer_cls(**init_kwargs)
    outputs = layer(_unlist(inputs, input_data))
    model = keras.Model(_unlist(inputs, input_data), outputs)
    return model, layer, arrays


def run_layer_test(
    layer_cls, init_kwargs, input_data, expected_output_shape, fit_step=True, run_eagerly=True
):
    """Exercises `layer_cls(**init_kwargs)` on `input_data` (an array or list of arrays).

    `expected_output_shape` is the eager output shape (a tuple, or a dict of tuples for
    dict outputs). The fit step runs eagerly by default (tracing a train step costs
    seconds); pass `run_eagerly=False` for a compiled `tf.function` train step.
    Returns the eager inference output of a freshly built layer.
    """
    # --- construct + eager call.
    layer = layer_cls(**init_kwargs)
    eager_in = _unlist([keras.ops.convert_to_tensor(a) for a in _as_list(input_data)], input_data)
    out = layer(eager_in)
    _check_shapes(out, expected_output_shape, "eager call")
    assert layer.built
    eager_out = _to_numpy(out)
    # Deterministic at inference.
    assert_outputs_close(eager_out, _to_numpy(layer(eager_in)), what="repeated eager inference")
    if fit_step:
        out_train = layer(eager_in, training=True)
        _check_shapes(out_train, expected_output_shape, "eager training call")
        for loss in layer.losses:
            assert np.all(np.isfinite(keras.ops.convert_to_numpy(loss))), "non-finite layer loss"

    # --- symbolic call.
    arrays, inputs = _inputs_for(input_data)
    sym_layer = layer_cls(**init_kwargs)
    sym_out = sym_layer(_unlist(inputs, input_data))
    _check_shapes(sym_out, _symbolic_shape(expected_output_shape), "symbolic call")

    # --- get_config / from_config round trip.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"
    clone_out = clone(eager_in)
    _check_shapes(clone_out, expected_output_shape, "from_config clone")

    # --- serialize / deserialize round trip (via the registered name).
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"keras_glmm>{layer_cls.__name__}", serialized
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is layer_cls
    assert revived.get_config() == config, "deserialize(serialize()) changed the config"

    # --- .keras save / load of a functional model, without custom_objects.
    model, model_layer, arrays = _functional_model(layer_cls, init_kwargs, input_data)
    _perturb_trainable(model_layer)
    feed = _unlist(arrays, input_data)
    before = _to_numpy(model(feed, training=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    after = _to_numpy(loaded(feed, training=False))
    assert_outputs_close(before, after, what=".keras save/load")
    loaded_layer = next(l for l in loaded.layers if isinstance(l, layer_cls))
    assert loaded_layer.get_config() == model_layer.get_config()
    for w_before, w_after in zip(model_layer.weights, loaded_layer.weights, strict=True):
        assert w_before.path.split("/")[-1] == w_after.path.split("/")[-1]
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(w_before), keras.ops.convert_to_numpy(w_after)
        )

    # --- one fit step of a functional model reduced to an mse loss.
    if fit_step:
        model, model_layer, arrays = _functional_model(layer_cls, init_kwargs, input_data)
        feed = _unlist(arrays, input_data)
        pred = _to_numpy(model(feed, training=False))
        target = _map_structure(lambda a: np.zeros_like(a), pred)
        loss = {k: "mse" for k in pred} if isinstance(pred, dict) else "mse"
        before = [keras.ops.convert_to_numpy(w).copy() for w in model_layer.trainable_weights]
        # Keras sums `add_loss` terms with the compiled loss without casting floats,
        # so a float64 layer (like a float64 Dense with a regularizer) needs floatx64.
        floatx = keras.config.floatx()
        if model_layer.dtype_policy.variable_dtype == "float64":
            keras.config.set_floatx("float64")
        try:
            model.compile(
                optimizer=keras.optimizers.SGD(0.01), loss=loss, run_eagerly=run_eagerly,
                jit_compile=False,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The model does not have any trainable weights")
                history = model.fit(feed, target, batch_size=len(arrays[0]), epochs=1, verbose=0)
        finally:
            keras.config.set_floatx(floatx)
        assert np.isfinite(history.history["loss"][-1])
        after = [keras.ops.convert_to_numpy(w) for w in model_layer.trainable_weights]
        assert not before or any(not np.array_equal(b, a) for b, a in zip(before, after)), (
            "a fit step changed none of the layer's trainable weights"
        )
    return eager_out


def set_seeds(seed=0):
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.random.set_seed(seed)
