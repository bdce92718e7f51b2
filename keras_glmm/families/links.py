"""Link functions ``eta = g(mu)`` between a response's mean and the linear predictor.

Each link writes its inverse once over an array namespace
(:mod:`keras_glmm.families.array_ops`): ``inverse`` and ``__call__`` are the
TensorFlow ones (they keep the floating dtype of their argument), and the
families' numpy kernels call ``_inverse(NUMPY, eta)``. Links whose derivatives
the numpy kernels need give them in closed form (``inverse_derivatives``).
"""

import numpy as np
import tensorflow as tf

from keras_glmm.families.array_ops import TENSORFLOW, float_tensor

_LINKS = {}


def _register_link(cls):
    _LINKS[cls.name] = cls
    return cls


class Link:
    """Link function ``eta = g(mu)`` and its inverse ``mu = g^{-1}(eta)``.

    Subclasses set ``name`` and implement ``_inverse(ops, eta)`` over an array
    namespace and ``__call__`` with TF ops; both preserve the floating dtype of
    their argument.
    """

    name = None
    # Whether a change of 1 in eta is a sizeable change of the mean whatever the
    # data's units (log, logit, probit, cloglog). The identity and inverse links
    # carry the response's units (eta = 1/mu is 1e-3 for times in ms), so sds on
    # their scale are judged and started relative to the fitted eta instead.
    unit_scale = False

    def inverse(self, eta):
        """Mean ``mu = g^{-1}(eta)`` (TensorFlow)."""
        return self._inverse(TENSORFLOW, float_tensor(eta))

    def _inverse(self, ops, eta):
        raise NotImplementedError

    def __call__(self, mu):
        """Linear predictor ``eta = g(mu)``."""
        raise NotImplementedError

    def inverse_derivatives(self, eta):
        """``mu = g^{-1}(eta)`` and its first two derivatives in ``eta``, numpy float64.

        Raises:
          ValueError: for a link whose families take its derivatives on another
            scale (the binomial's and beta's logit, probit and cloglog work with
            ``log mu`` and ``log(1 - mu)``).
        """
        raise ValueError(f"No numpy derivatives for the {self.name} link.")

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


@_register_link
class IdentityLink(Link):
    """``g(mu) = mu``."""

    name = "identity"

    def _inverse(self, ops, eta):
        return eta

    def __call__(self, mu):
        return tf.identity(float_tensor(mu))

    def inverse_derivatives(self, eta):
        return eta, np.ones_like(eta), np.zeros_like(eta)


@_register_link
class LogLink(Link):
    """``g(mu) = log(mu)``, ``g^{-1}(eta) = exp(eta)``."""

    name = "log"
    unit_scale = True

    def _inverse(self, ops, eta):
        return ops.exp(eta)

    def __call__(self, mu):
        return tf.math.log(float_tensor(mu))

    def inverse_derivatives(self, eta):
        mu = np.exp(eta)
        return mu, mu, mu


@_register_link
class LogitLink(Link):
    """``g(mu) = log(mu / (1 - mu))``, ``g^{-1}(eta) = sigmoid(eta)``."""

    name = "logit"
    unit_scale = True

    def _inverse(self, ops, eta):
        return ops.sigmoid(eta)

    def __call__(self, mu):
        mu = float_tensor(mu)
        # log1p keeps precision for mu near 0 (where 1 - mu rounds to 1).
        return tf.math.log(mu) - tf.math.log1p(-mu)


@_register_link
class ProbitLink(Link):
    """``g(mu) = Phi^{-1}(mu)``, ``g^{-1}(eta) = Phi(eta)`` (standard normal cdf)."""

    name = "probit"
    unit_scale = True

    def _inverse(self, ops, eta):
        return ops.ndtr(eta)

    def __call__(self, mu):
        return tf.math.ndtri(float_tensor(mu))


@_register_link
class CloglogLink(Link):
    """``g(mu) = log(-log(1 - mu))``, ``g^{-1}(eta) = 1 - exp(-exp(eta))``."""

    name = "cloglog"
    unit_scale = True

    def _inverse(self, ops, eta):
        # -expm1(-x) == 1 - exp(-x) without cancellation for small x.
        return -ops.expm1(-ops.exp(eta))

    def __call__(self, mu):
        return tf.math.log(-tf.math.log1p(-float_tensor(mu)))


@_register_link
class InverseLink(Link):
    """``g(mu) = 1 / mu``, ``g^{-1}(eta) = 1 / eta``.

    No clamping here: ``eta = 0`` gives an infinite mean. Families whose mean
    must be positive (gamma) clamp the mean themselves (``ArrayOps.positive``).
    """

    name = "inverse"

    def _inverse(self, ops, eta):
        return 1.0 / eta

    def __call__(self, mu):
        return tf.math.reciprocal(float_tensor(mu))

    def inverse_derivatives(self, eta):
        return 1.0 / eta, -1.0 / eta**2, 2.0 / eta**3


def get_link(name_or_link):
    """Returns a :class:`Link` from its name; ``Link`` instances pass through.

    Args:
      name_or_link: one of ``"identity", "log", "logit", "probit", "cloglog",
        "inverse"`` (case-insensitive), or a ``Link`` instance.

    Raises:
      ValueError: for an unknown name.
    """
    if isinstance(name_or_link, Link):
        return name_or_link
    key = str(name_or_link).strip().lower()
    if key not in _LINKS:
        raise ValueError(
            f"Unknown link {name_or_link!r}; valid links are: {', '.join(sorted(_LINKS))}."
        )
    return _LINKS[key]()
