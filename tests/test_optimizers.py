"""Tests for keras_glmm.optimizers.SparseAdam against keras.optimizers.Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glmm import SparseAdam

KW = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-7)


def _var(value, dtype="float64", name="w"):
    return keras.Variable(np.array(value, dtype=dtype), dtype=dtype, name=name)


def _moments(opt, var):
    i = opt._get_variable_index(var)
    return opt._momentums[i].numpy(), opt._velocities[i].numpy()


def test_dense_gradients_identical_to_adam():
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(5, 3)), rng.normal(size=(4,))]
    ours = [_var(v, "float32") for v in init]
    ref = [_var(v, "float32") for v in init]
    sparse_adam, adam = SparseAdam(**KW), keras.optimizers.Adam(**KW)
    for _ in range(5):
        grads = [rng.normal(size=v.shape).astype("float32") for v in init]
        sparse_adam.apply_gradients(zip([tf.constant(g) for g in grads], ours))
        adam.apply_gradients(zip([tf.constant(g) for g in grads], ref))
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(_moments(sparse_adam, a)[0], _moments(adam, b)[0])
        np.testing.assert_array_equal(_moments(sparse_adam, a)[1], _moments(adam, b)[1])
    assert int(sparse_adam.iterations) == int(adam.iterations) == 5




@pytest.mark.parametrize(
    "dtype, rtol, atol",
    [
        ("float32", 1e-5, 1e-6),
        ("float64", 1e-12, 1e-15),
    ],
)
def test_full_batch_sparse_gradient_matches_dense_adam(dtype, rtol, atol):
    """A full-batch step names every row (some several times, as a batch names a level
    once per observation): lazy Adam must equal Adam on the summed dense gradient."""
    rng = np.random.default_rng(1)
    rows, cols = 6, 2
    init = rng.normal(size=(rows, cols))
    ours, ref = _var(init, dtype), _var(init, dtype)
    sparse_adam, adam = SparseAdam(**KW), keras.optimizers.Adam(**KW)
    for _ in range(6):
        indices = rng.permutation(np.concatenate([np.arange(rows), rng.integers(0, rows, 5)]))
        values = rng.normal(size=(len(indices), cols)).astype(dtype)
        sparse = tf.IndexedSlices(
            tf.constant(values), tf.constant(indices, "int64"), tf.constant([rows, cols], "int64")
        )
        sparse_adam.apply_gradients([(sparse, ours)])
        adam.apply_gradients([(tf.convert_to_tensor(sparse), ref)])
    assert not np.allclose(ours.numpy(), init)
    # Compare the steps taken (not the weights, which hide small step differences).
    np.testing.assert_allclose(ours.numpy() - init, ref.numpy() - init, rtol=rtol, atol=atol)
    for a, b in zip(_moments(sparse_adam, ours), _moments(adam, ref)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_sparse_gradient_in_a_traced_step():
    """The same under `tf.function` (as in `fit`), with float32 and int32 indices."""
    rng = np.random.default_rng(2)
    init = rng.normal(size=(4, 3)).astype("float32")
    ours, ref = _var(init, "float32"), _var(init, "float32")
    sparse_adam, adam = SparseAdam(**KW), keras.optimizers.Adam(**KW)
    sparse_adam.build([ours])
    adam.build([ref])

    @tf.function
    def step(values, indices):
        sparse = tf.IndexedSlices(values, indices, tf.constant([4, 3]))
        sparse_adam.apply_gradients([(sparse, ours)])
        adam.apply_gradients([(tf.convert_to_tensor(sparse), ref)])

    for _ in range(3):
        indices = np.array([3, 0, 1, 2, 0], "int32")
        step(tf.constant(rng.normal(size=(5, 3)).astype("float32")), tf.constant(indices))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_absent_rows_untouched():
    rng = np.random.default_rng(3)
    rows = 1_000_000
    init = rng.normal(size=(rows, 1)).astype("float32")
    var = _var(init, "float32")
    opt = SparseAdam(learning_rate=0.1)
    # Give every row nonzero moments first (a dense step), so "untouched" is visible:
    # Adam would decay the moments of, and move, rows with a zero gradient.
    opt.apply_gradients([(tf.ones((rows, 1)), var)])
    w0 = var.numpy().copy()
    m0, v0 = (x.copy() for x in _moments(opt, var))
    batch = np.array([5, 999_999, 123_456, 5])
    values = tf.constant([[1.0], [-2.0], [0.5], [3.0]])
    opt.apply_gradients([(tf.IndexedSlices(values, tf.constant(batch), tf.constant([rows, 1])), var)])
    w1 = var.numpy()
    m1, v1 = _moments(opt, var)
    for before, after in ((w0, w1), (m0, m1), (v0, v1)):
        changed = np.flatnonzero(np.any(before != after, axis=1))
        np.testing.assert_array_equal(changed, np.unique(batch))
    # The batch rows got the lazy Adam update (duplicates summed: row 5 has g = 4).
    t = 2.0
    alpha = 0.1 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    g = {5: 4.0, 999_999: -2.0, 123_456: 0.5}
    for row, grad in g.items():
        m = 0.9 * m0[row, 0] + 0.1 * grad
        v = 0.999 * v0[row, 0] + 0.001 * grad**2
        np.testing.assert_allclose(m1[row, 0], m, rtol=1e-4)
        np.testing.assert_allclose(v1[row, 0], v, rtol=1e-4)
        np.testing.assert_allclose(
            w1[row, 0], w0[row, 0] - alpha * m / (np.sqrt(v) + 1e-7), rtol=1e-4, atol=1e-6
        )


def test_fit_with_random_effects_uses_sparse_updates():
    """End to end: a functional model on a RandomEffects layer, fitted with SparseAdam,
    leaves the rows of levels absent from the data exactly as they were."""
    from keras_glmm import RandomEffects

    num_levels = 50
    idx = keras.Input(shape=(), dtype="int32")
    layer = RandomEffects(num_levels, output_mode="mean")
    model = keras.Model(idx, layer(idx))
    model.compile(optimizer=SparseAdam(0.1), loss="mse", jit_compile=False)
    seen = np.array([1, 4, 4, 7], "int32")
    layer.adapt(seen)
    before = layer.posterior_mean.numpy().copy(), layer.posterior_scale_tril.numpy().copy()
    model.fit(seen, np.ones(4, "float32"), batch_size=4, epochs=2, verbose=0)
    after = layer.posterior_mean.numpy(), layer.posterior_scale_tril.numpy()
    for b, a in zip(before, after):
        changed = np.flatnonzero(np.any(b != a, axis=1))
        np.testing.assert_array_equal(changed, [1, 4, 7])


def test_get_config_round_trip():
    opt = SparseAdam(learning_rate=0.01, beta_1=0.7, beta_2=0.9, epsilon=1e-5, clipnorm=1.0)
    config = opt.get_config()
    clone = SparseAdam.from_config(config)
    assert isinstance(clone, SparseAdam)
    assert clone.get_config() == config
    serialized = keras.optimizers.serialize(opt)
    assert serialized["registered_name"] == "keras_glmm>SparseAdam"
    revived = keras.optimizers.deserialize(serialized)
    assert type(revived) is SparseAdam
    assert revived.get_config() == config


def test_amsgrad_raises():
    with pytest.raises(ValueError, match="amsgrad"):
        SparseAdam(amsgrad=True)


def _fisher_inverse_times(raw, scale, grad):
    """Exact `F^-1 g` for N(mu, S(raw)) in the stored parameters `(m, raw)` (numerically)."""
    import tensorflow_probability as tfp

    k = len(scale)
    theta = tf.Variable(np.concatenate([np.zeros(k), raw]))

    def covariance(t):
        c = tfp.math.fill_triangular(t[k:])
        c = tf.linalg.set_diag(c, tf.nn.softplus(tf.linalg.diag_part(c)) + 1e-6)
        c = c * scale[:, None]
        return tf.matmul(c, c, transpose_b=True)

    with tf.GradientTape() as tape:
        sigma = covariance(theta)
    d_sigma = tape.jacobian(sigma, theta).numpy()  # (k, k, p)
    sigma = sigma.numpy()
    inv = np.linalg.inv(sigma)
    p = len(theta.numpy())
    fisher = np.zeros((p, p))
    # Mean block: d mu / d m = diag(scale); covariance block: 1/2 tr(S^-1 dS S^-1 dS).
    fisher[:k, :k] = np.diag(scale) @ inv @ np.diag(scale)
    for a in range(k, p):
        for b in range(k, p):
            fisher[a, b] = 0.5 * np.trace(inv @ d_sigma[:, :, a] @ inv @ d_sigma[:, :, b])
    return np.linalg.solve(fisher, grad)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_natural_gradient_is_the_inverse_fisher_times_the_gradient(k):
    """`RandomEffects.natural_gradient` of a `posterior` row, against the exact Fisher."""
    import keras_glmm as kg

    rng = np.random.default_rng(3)
    scale = np.array([2.0, 0.5, 1.5][:k])
    layer = kg.RandomEffects(5, num_effects=k, intercept=True, effect_scale=scale, dtype="float64")
    layer.build()
    layer.posterior.assign(rng.normal(size=layer.posterior.shape) * 0.7)
    rows = tf.constant([4, 1], "int64")
    grad = rng.normal(size=(2, layer.posterior.shape[1]))
    got = layer.natural_gradient(rows, tf.constant(grad)).numpy()
    raw = layer.posterior_scale_tril.numpy()
    for r, row in enumerate([4, 1]):
        want = _fisher_inverse_times(raw[row], scale, grad[r])
        np.testing.assert_allclose(got[r], want, rtol=1e-7, atol=1e-10)
    assert layer.posterior.natural_gradient is not None


def test_natural_step_moves_means_by_batch_times_covariance_times_gradient():
    """One step: `m[r] -= natural_step * B * S_raw[r] g[r]`; other variables get Adam."""
    import keras_glmm as kg

    layer = kg.RandomEffects(4, dtype="float64")
    layer.build()
    layer.posterior_scale_tril.assign(np.full((4, 1), np.log(np.expm1(0.5))))
    other = _var([1.0, 2.0])
    opt = SparseAdam(learning_rate=0.1, natural_step=0.5)
    before = layer.posterior_mean.numpy().copy()
    # A batch of 3 rows, two in level 2: the gradient sums their values (here
    # in the means only).
    grad = tf.IndexedSlices(
        tf.constant([[0.3, 0.0], [-0.1, 0.0], [0.2, 0.0]], "float64"), tf.constant([2, 0, 2], "int64"), (4, 2)
    )
    dense = tf.constant([0.5, -0.5], "float64")
    opt.apply_gradients([(grad, layer.posterior), (dense, other)])
    sd2 = (0.5 + 1e-6) ** 2
    want = before.copy()
    want[2, 0] -= 0.5 * 3 * sd2 * 0.5
    want[0, 0] -= 0.5 * 3 * sd2 * -0.1
    # (float32 learning rates: the annealing ratio is exact to 1e-8)
    np.testing.assert_allclose(layer.posterior_mean.numpy(), want, rtol=1e-7)
    np.testing.assert_allclose(other.numpy(), [0.9, 2.1], atol=1e-5)  # Adam's first step: lr * sign
    # The step anneals with the learning rate.
    opt.learning_rate = 0.05
    before = layer.posterior_mean.numpy().copy()
    opt.apply_gradients([(grad, layer.posterior), (dense, other)])
    np.testing.assert_allclose(before[2, 0] - layer.posterior_mean.numpy()[2, 0], 0.25 * 3 * sd2 * 0.5, rtol=1e-7)
    config = opt.get_config()
    assert config["natural_step"] == 0.5
    assert SparseAdam.from_config(config).natural_step == 0.5


def test_natural_step_must_be_positive():
    with pytest.raises(ValueError, match="natural_step"):
        SparseAdam(natural_step=0.0)


def test_minibatch_fit_reaches_the_full_batch_estimates():
    """`fit(batch_size=...)` swaps in natural-gradient steps and ends where full batch does."""
    import pandas as pd

    import keras_glmm as kg

    rng = np.random.default_rng(7)
    n, groups = 30_000, 300
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    eta = -0.4 + 0.7 * x + rng.normal(size=groups)[g] * 0.8
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    data = pd.DataFrame({"y": y, "x": x, "g": g})
    full = kg.glmm("y ~ x + (1 | g)", data, family="binomial")
    mini = kg.GLMM.from_formula("y ~ x + (1 | g)", data, family="binomial")
    mini.fit(data, batch_size=2048)
    assert mini.optimizer.natural_step == 1.0 and full.optimizer.natural_step is None
    assert mini.converged_
    # The intercept's SE is about 0.05 here (300 groups of sd 0.8): the minibatch fit's
    # Adam steps leave it within half an SE of the exact optimum.
    np.testing.assert_allclose(mini.fixef().values, full.fixef().values, atol=0.025)
    np.testing.assert_allclose(mini.varcorr()["sdcor"].values, full.varcorr()["sdcor"].values, rtol=0.02)


@pytest.mark.parametrize("formula", ["y ~ Days + (Days | Subject)", "y ~ 1 + (Days | Subject)"])
def test_recenter_moves_the_levels_mean_into_the_fixed_effects(formula):
    """Predictions unchanged, KL at its minimum along the shift (full and partial match)."""
    import keras_glmm as kg
    from keras_glmm.callbacks import recenter

    data = kg.datasets.load_sleepstudy().rename(columns={"Reaction": "y"})
    model = kg.GLMM.from_formula(formula, data)
    term = model.terms[0]
    rng = np.random.default_rng(3)
    term.posterior_mean.assign(rng.normal(0.4, 0.5, term.posterior_mean.shape))
    term.log_scale.assign(np.log([20.0, 6.0]))
    term.correlation.assign([0.4])
    x, _ = model._frame_arrays(data)

    def eta():
        return model.predict_step({k: tf.constant(v) for k, v in x.items()})["eta"].numpy()

    def kl():
        return float(term.total_kl())

    before_eta, before_kl = eta(), kl()
    fixef_before = model.fixed_effects.kernel.numpy()[:, 0].copy()
    shifts = recenter(model)
    np.testing.assert_allclose(eta(), before_eta, rtol=1e-5, atol=1e-3)
    assert kl() < before_kl
    kernel = model.fixed_effects.kernel.numpy()[:, 0]
    assert len(shifts) == len(model.design.fixed_columns)
    for j, column in enumerate(model.design.fixed_columns):
        np.testing.assert_allclose(kernel[j] - fixef_before[j], shifts[("Subject", column)], rtol=1e-5)
    # At the optimum: a second call moves nothing, and a nudge along a matched
    # direction raises the KL.
    assert all(abs(s) < 1e-5 for s in recenter(model).values())
    best = kl()
    mean = term.posterior_mean.numpy().copy()
    scale = np.asarray(term.effect_scale)
    for e in range(len(shifts)):
        for delta in (-0.05, 0.05):
            moved = mean.copy()
            moved[:, e] += delta / scale[e]
            term.posterior_mean.assign(moved)
            assert kl() > best
    term.posterior_mean.assign(mean)
