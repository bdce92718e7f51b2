"""The families' array namespace: numpy and TensorFlow give the same numbers (float64)."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from keras_glmm.families.array_ops import NUMPY, TENSORFLOW, namespace

X = np.array([-800.0, -40.0, -20.5, -1.0, -1e-9, 0.0, 1e-9, 0.7, 30.0, 700.0])


# TFP's log_ndtr switches to its asymptotic series below -20 (scipy later): 2e-11 apart there.
TOLERANCE = {"log_ndtr": 1e-10}


@pytest.mark.parametrize("name", ["softplus", "log_sigmoid", "sigmoid", "ndtr", "log_ndtr", "exp", "lgamma"])
def test_elementwise_ops_agree(name):
    x = X if name != "lgamma" else np.abs(X) + 0.5
    with np.errstate(over="ignore"):
        want = getattr(NUMPY, name)(x)
    got = getattr(TENSORFLOW, name)(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=TOLERANCE.get(name, 1e-13), atol=1e-300)


def test_composites_against_scipy():
    # softplus and logaddexp as numpy's; log1mexp as whichever of log(-expm1(a)), log1p(-e^a) is exact
    np.testing.assert_allclose(NUMPY.softplus(X), np.logaddexp(0.0, X), rtol=4e-16)
    b = X[::-1]
    for ops, cast in ((NUMPY, np.asarray), (TENSORFLOW, tf.constant)):
        np.testing.assert_allclose(np.asarray(ops.logaddexp(cast(X), cast(b))), np.logaddexp(X, b), rtol=4e-16)
        a = np.array([-50.0, -3.0, -0.7, -1e-3, -1e-12])
        exact = np.where(a < -1.0, np.log1p(-np.exp(a)), np.log(-np.expm1(a)))
        np.testing.assert_allclose(np.asarray(ops.log1mexp(cast(a))), exact, rtol=1e-14)
        floor = np.asarray(ops.positive(cast(np.array([-1.0, 0.0, 2.0]))))
        np.testing.assert_array_equal(floor, [np.sqrt(np.finfo(np.float64).tiny)] * 2 + [2.0])
    np.testing.assert_allclose(NUMPY.log_ndtr(X[:4]), special.log_ndtr(X[:4]))


def test_namespace_takes_the_modules():
    assert namespace(np) is NUMPY and namespace(tf) is TENSORFLOW and namespace(NUMPY) is NUMPY
    with pytest.raises(ValueError, match="ops"):
        namespace("torch")


def test_float32_floor_is_float32s():
    floored = TENSORFLOW.positive(tf.constant([0.0], tf.float32)).numpy()
    assert floored[0] == np.float32(np.sqrt(np.finfo(np.float32).tiny))
