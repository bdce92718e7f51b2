"""The array operations the families' maths is written in, for numpy and for TensorFlow.

Each family writes its log-likelihood once, as a function of an ``ops``
namespace: :data:`NUMPY` (float64 arrays, for the inference engine, which adds
analytic derivatives) or :data:`TENSORFLOW` (tensors of the linear predictor's
dtype, for the Keras head and losses, which differentiate by autodiff). Where
the two libraries spell an operation differently, or where TensorFlow needs a
form whose unused branches keep finite gradients, the difference lives here and
nowhere else.
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import special


class ArrayOps:
    """Elementwise maths over one array library; composite operations written once."""

    name = None

    def float_info(self, x):
        """``np.finfo`` of ``x``'s floating dtype."""
        raise NotImplementedError

    def positive(self, x):
        """``x`` floored at ``sqrt(tiny)`` of its dtype, so that ``1 / x`` and ``log x`` stay finite.

        Used for means that must be positive under a link that does not
        guarantee it (identity, inverse): below the floor the value is held and
        its gradient is zero, rather than NaN.
        """
        return self.maximum(x, self.positive_floor(x))

    def positive_floor(self, x):
        """The floor of :meth:`positive`: ``sqrt(tiny)``, whose reciprocal and square stay finite."""
        return math.sqrt(self.float_info(x).tiny)

    def logaddexp(self, a, b):
        """``log(e^a + e^b)``, stable, with finite gradients for finite inputs (also where ``a == b``)."""
        return self.maximum(a, b) + self.log1p(self.exp(-self.abs(a - b)))

    def log1mexp(self, a):
        """``log(1 - e^a)`` for ``a < 0`` (Maechler's two branches).

        ``a`` is held below ``-sqrt(tiny)`` so that neither branch, nor its
        gradient, is infinite; each branch sees a harmless value where the other
        is taken.
        """
        a = self.minimum(a, -math.sqrt(self.float_info(a).tiny))
        near = a > -math.log(2.0)
        return self.where(near, self.log(-self.expm1(self.where(near, a, -self.ones_like(a)))),
                          self.log1p(-self.exp(self.where(near, -self.ones_like(a), a))))


class _Numpy(ArrayOps):
    name = "numpy"
    exp, expm1, log, log1p, sqrt = map(staticmethod, (np.exp, np.expm1, np.log, np.log1p, np.sqrt))
    maximum, minimum, where, clip = map(staticmethod, (np.maximum, np.minimum, np.where, np.clip))
    zeros_like, ones_like, lgamma = map(staticmethod, (np.zeros_like, np.ones_like, special.gammaln))
    sigmoid, ndtr, log_ndtr = map(staticmethod, (special.expit, special.ndtr, special.log_ndtr))
    abs = staticmethod(np.abs)

    def float_info(self, x):
        return np.finfo(np.float64)  # the engine works in float64 throughout

    @staticmethod
    def softplus(x):
        # As accurate as np.logaddexp(0, x) (to 3e-16) at a third of its cost.
        return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))

    def log_sigmoid(self, x):
        return -self.softplus(-x)

    @staticmethod
    def cast(x, like):
        return np.asarray(x, dtype=np.result_type(like))


class _TensorFlow(ArrayOps):
    name = "tensorflow"
    # staticmethod: TensorFlow's ops are Python functions, which a class attribute would bind.
    exp, expm1, log, log1p, sqrt = map(staticmethod, (tf.exp, tf.math.expm1, tf.math.log, tf.math.log1p, tf.sqrt))
    maximum, minimum, where, clip = map(staticmethod, (tf.maximum, tf.minimum, tf.where, tf.clip_by_value))
    zeros_like, ones_like, lgamma = map(staticmethod, (tf.zeros_like, tf.ones_like, tf.math.lgamma))
    sigmoid, softplus, log_sigmoid = map(staticmethod, (tf.sigmoid, tf.nn.softplus, tf.math.log_sigmoid))
    abs = staticmethod(tf.abs)

    def float_info(self, x):
        return np.finfo(x.dtype.as_numpy_dtype)

    @staticmethod
    def _standard_normal(dtype):
        # The public Normal distribution gives tail-accurate cdf / log_cdf
        # (TFP's ndtr / log_ndtr) without reaching into TFP internals.
        return tfp.distributions.Normal(tf.zeros([], dtype), tf.ones([], dtype))

    def ndtr(self, x):
        return self._standard_normal(x.dtype).cdf(x)

    def log_ndtr(self, x):
        return self._standard_normal(x.dtype).log_cdf(x)

    @staticmethod
    def cast(x, like):
        return tf.cast(x, like.dtype)


NUMPY = _Numpy()
TENSORFLOW = _TensorFlow()


def namespace(ops):
    """The :class:`ArrayOps` for ``ops``: one of them, or the ``numpy`` / ``tensorflow`` module."""
    if isinstance(ops, ArrayOps):
        return ops
    if ops is np:
        return NUMPY
    if ops is tf:
        return TENSORFLOW
    raise ValueError(f"`ops` must be numpy, tensorflow or an ArrayOps. Received: ops={ops!r}")


def float_tensor(x, dtype=None):
    """``x`` as a floating tensor: of ``dtype`` when given, else its own (float32 for integers)."""
    if dtype is not None:
        return tf.cast(x, dtype)
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


def constant(value, dtype):
    """``value`` as a ``dtype`` tensor; numbers go straight to ``dtype``, not through float32."""
    if isinstance(value, (int, float, list, tuple, np.ndarray, np.generic)):
        return tf.constant(np.asarray(value, dtype.as_numpy_dtype))
    return tf.cast(value, dtype)
