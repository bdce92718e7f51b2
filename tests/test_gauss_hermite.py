"""Gauss-Hermite rules: moments of N(0, 1) exactly, any number of nodes, product grids, nodes for an sd."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_glmm import gauss_hermite
from keras_glmm.transforms import softplus_inverse


@pytest.mark.parametrize("num_points", [1, 5, 12, 32])
def test_rule_integrates_normal_moments(num_points):
    x, w = gauss_hermite.rule(num_points)
    assert w.sum() == pytest.approx(1.0, abs=1e-14)
    for degree in range(0, 2 * num_points, 2):  # E[z^2k] = (2k - 1)!!
        want = float(np.prod(np.arange(degree - 1.0, 0.0, -2.0))) if degree else 1.0
        assert np.sum(w * x**degree) == pytest.approx(want, rel=1e-9)


def test_log_rule_beyond_hermegauss():
    x, log_w = gauss_hermite.log_rule(40)
    np.testing.assert_allclose(np.exp(log_w), gauss_hermite.rule(40)[1], rtol=1e-12)
    x, log_w = gauss_hermite.log_rule(201)  # numpy's weights overflow here
    w = np.exp(log_w)
    assert np.all(np.isfinite(log_w)) and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.sum(w * x**4) == pytest.approx(3.0, rel=1e-10)


def test_product_grid():
    nodes, weights = gauss_hermite.product_grid(5, 2)
    assert nodes.shape == (25, 2) and weights.sum() == pytest.approx(1.0)
    # E[z1^2 z2^4] = 1 * 3
    assert np.sum(weights * nodes[:, 0] ** 2 * nodes[:, 1] ** 4) == pytest.approx(3.0, rel=1e-12)
    log_nodes, log_weights = gauss_hermite.product_grid(5, 2, log_weights=True)
    np.testing.assert_array_equal(log_nodes, nodes)
    np.testing.assert_allclose(np.exp(log_weights), weights, rtol=1e-13)


@pytest.mark.parametrize("error", [1e-9, 1e-11])
def test_nodes_for_sd_meet_the_error_for_the_logit(error):
    # E[log(1 + e^(m + sd z))] by the chosen rule against 80 nodes, over the means.
    means = np.linspace(-4.0, 4.0, 81)

    def expectation(sd, num_points):
        x, w = gauss_hermite.rule(num_points)
        return np.logaddexp(0.0, means[:, None] + sd * x[None, :]) @ w

    for sd in [0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6]:
        nodes = gauss_hermite.nodes_for_sd(sd, 12, error)
        assert np.max(np.abs(expectation(sd, nodes) - expectation(sd, 80))) <= error, (sd, nodes)
    assert gauss_hermite.nodes_for_sd(0.1, 12, 1e-11) == 4  # 3! (0.1 / pi)^8 = 6.3e-12
    assert gauss_hermite.nodes_for_sd(0.2, 12, 1e-11) == 6  # 5! (0.2 / pi)^12 = 5.3e-13
    assert gauss_hermite.nodes_for_sd(3.0, 12, 1e-11) == 12  # capped at the family's own
    assert gauss_hermite.nodes_for_sd(0.0, 12, 1e-11) == 3


def test_softplus_inverse_round_trips_numbers_arrays_and_tensors():
    assert isinstance(softplus_inverse(0.5), float)
    assert softplus_inverse(0.5) == pytest.approx(math.log(math.expm1(0.5)), rel=1e-15)
    x = np.array([1e-12, 0.1, 3.0, 40.0, 800.0])
    np.testing.assert_allclose(np.logaddexp(0.0, softplus_inverse(x)), x, rtol=1e-14)
    got = softplus_inverse(tf.constant(x, tf.float32))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(tf.nn.softplus(got).numpy(), x, rtol=1e-6)
