"""Transforms between constrained parameters and the unconstrained values that are learned."""

import numpy as np
import tensorflow as tf


def softplus_inverse(x):
    """``log(e^x - 1)`` for ``x > 0``, the inverse of ``softplus``, without overflow.

    Written ``x + log(1 - e^-x)``, which neither overflows for large ``x`` nor
    loses precision near 0 (``expm1``). A tensor gives a tensor of its dtype, an
    array a float64 array, a number a float.
    """
    if tf.is_tensor(x):
        return x + tf.math.log(-tf.math.expm1(-x))
    value = np.asarray(x, np.float64)
    value = value + np.log(-np.expm1(-value))
    return float(value) if np.ndim(x) == 0 else value
