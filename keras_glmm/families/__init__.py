"""Response families and link functions for GLMMs.

A GLMM relates the conditional mean of the response to a linear predictor
``eta = X beta + Z b`` through a link function ``g``::

    g(mu) = eta,        y | eta ~ Family(mu, dispersion params)

The variational objective needs, per row, the expected log-likelihood under
the Gaussian variational marginal of ``eta``::

    E_{eta ~ N(m, v)}[log p(y | eta)]

which :meth:`Family.expected_log_prob` computes in closed form where one
exists and by Gauss-Hermite quadrature otherwise.

Each family's maths is written once, in its own module, over an array namespace
(:mod:`~keras_glmm.families.array_ops`): TensorFlow for the Keras head and
losses (float32 or float64, the dtype of ``eta`` decides; derivatives by
autodiff), numpy float64 for the inference engine, which adds each family's
analytic derivatives (:mod:`~keras_glmm.families.base` says how).

Modules: ``links`` (link functions), ``base`` (the ``Family`` interface and
registry), ``gaussian``, ``binomial``, ``counts`` (Poisson, NB2, NB1), ``gamma``,
``beta``, ``zero_inflated`` (ZIP, ZINB), ``ordinal``; ``autodiff`` gives the
engine TensorFlow's derivatives for a family without analytic ones.
"""

from keras_glmm.families.base import Family, get_family, register_family
from keras_glmm.families.beta import Beta
from keras_glmm.families.binomial import Binomial
from keras_glmm.families.counts import NegativeBinomial, NegativeBinomial1, Poisson
from keras_glmm.families.gamma import Gamma
from keras_glmm.families.gaussian import Gaussian
from keras_glmm.families.links import (
    CloglogLink,
    IdentityLink,
    InverseLink,
    Link,
    LogitLink,
    LogLink,
    ProbitLink,
    get_link,
)
from keras_glmm.families.ordinal import Ordinal
from keras_glmm.families.zero_inflated import ZeroInflatedNegativeBinomial, ZeroInflatedPoisson

__all__ = [
    "Link",
    "IdentityLink",
    "LogLink",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "InverseLink",
    "get_link",
    "Family",
    "Gaussian",
    "Binomial",
    "Poisson",
    "NegativeBinomial",
    "NegativeBinomial1",
    "Gamma",
    "Beta",
    "ZeroInflatedPoisson",
    "ZeroInflatedNegativeBinomial",
    "Ordinal",
    "get_family",
    "register_family",
]
