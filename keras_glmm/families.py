"""Response families and link functions for GLMMs.

A GLMM relates the conditional mean of the response to a linear predictor
``eta = X beta + Z b`` through a link function ``g``::

    g(mu) = eta,        y | eta ~ Family(mu, dispersion params)

The variational objective needs, per row, the expected log-likelihood under
the Gaussian variational marginal of ``eta``::

    E_{eta ~ N(m, v)}[log p(y | eta)]

which :meth:`Family.expected_log_prob` computes in closed form where one
exists and by Gauss-Hermite quadrature otherwise.

Everything here is plain TensorFlow / TensorFlow Probability (no Keras), works
in float32 and float64 (the dtype of ``eta`` decides), and follows the TFP
convention of a public method that handles dtypes and validation and a private
``_method`` that only does the maths, so subclasses override the maths only.
"""

import math
import re

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import special

tfd = tfp.distributions

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


# --------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------

_LINKS = {}


def _register_link(cls):
    _LINKS[cls.name] = cls
    return cls


def _std_normal(dtype):
    # The public Normal distribution gives tail-accurate cdf / log_cdf
    # (TFP's ndtr / log_ndtr) without reaching into TFP internals.
    return tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype))


def _cast(value, dtype):
    """`value` as a `dtype` tensor; numbers go straight to `dtype`, not through float32."""
    if isinstance(value, (int, float, list, tuple, np.ndarray, np.generic)):
        return tf.constant(np.asarray(value, dtype.as_numpy_dtype))
    return tf.cast(value, dtype)


def _float_tensor(x, dtype=None):
    """Converts ``x`` to a floating tensor (float32 unless ``dtype`` given)."""
    if dtype is not None:
        return tf.cast(x, dtype)
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


class Link:
    """Link function ``eta = g(mu)`` and its inverse ``mu = g^{-1}(eta)``.

    Subclasses set ``name`` and implement ``inverse`` and ``__call__`` with
    TF ops; both preserve the floating dtype of their argument.
    """

    name = None
    # Whether a change of 1 in eta is a sizeable change of the mean whatever the
    # data's units (log, logit, probit, cloglog). The identity and inverse links
    # carry the response's units (eta = 1/mu is 1e-3 for times in ms), so sds on
    # their scale are judged and started relative to the fitted eta instead.
    unit_scale = False

    def inverse(self, eta):
        """Mean ``mu = g^{-1}(eta)``."""
        raise NotImplementedError

    def __call__(self, mu):
        """Linear predictor ``eta = g(mu)``."""
        raise NotImplementedError

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

    def inverse(self, eta):
        return tf.identity(_float_tensor(eta))

    def __call__(self, mu):
        return tf.identity(_float_tensor(mu))


@_register_link
class LogLink(Link):
    """``g(mu) = log(mu)``, ``g^{-1}(eta) = exp(eta)``."""

    name = "log"
    unit_scale = True

    def inverse(self, eta):
        return tf.exp(_float_tensor(eta))

    def __call__(self, mu):
        return tf.math.log(_float_tensor(mu))


@_register_link
class LogitLink(Link):
    """``g(mu) = log(mu / (1 - mu))``, ``g^{-1}(eta) = sigmoid(eta)``."""

    name = "logit"
    unit_scale = True

    def inverse(self, eta):
        return tf.sigmoid(_float_tensor(eta))

    def __call__(self, mu):
        mu = _float_tensor(mu)
        # log1p keeps precision for mu near 0 (where 1 - mu rounds to 1).
        return tf.math.log(mu) - tf.math.log1p(-mu)


@_register_link
class ProbitLink(Link):
    """``g(mu) = Phi^{-1}(mu)``, ``g^{-1}(eta) = Phi(eta)`` (standard normal cdf)."""

    name = "probit"
    unit_scale = True

    def inverse(self, eta):
        eta = _float_tensor(eta)
        return _std_normal(eta.dtype).cdf(eta)

    def __call__(self, mu):
        return tf.math.ndtri(_float_tensor(mu))


@_register_link
class CloglogLink(Link):
    """``g(mu) = log(-log(1 - mu))``, ``g^{-1}(eta) = 1 - exp(-exp(eta))``."""

    name = "cloglog"
    unit_scale = True

    def inverse(self, eta):
        # -expm1(-x) == 1 - exp(-x) without cancellation for small x.
        return -tf.math.expm1(-tf.exp(_float_tensor(eta)))

    def __call__(self, mu):
        return tf.math.log(-tf.math.log1p(-_float_tensor(mu)))


@_register_link
class InverseLink(Link):
    """``g(mu) = 1 / mu``, ``g^{-1}(eta) = 1 / eta``.

    No clamping here: ``eta = 0`` gives an infinite mean. Families whose mean
    must be positive (gamma) clamp the mean themselves, see
    :meth:`Family._positive`.
    """

    name = "inverse"

    def inverse(self, eta):
        return tf.math.reciprocal(_float_tensor(eta))

    def __call__(self, mu):
        return tf.math.reciprocal(_float_tensor(mu))


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


# --------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------

_FAMILIES = {}
_ALIASES = {}
# Names that choose a family and its link: the cumulative link models of `Ordinal`.
_NAMED_LINKS = {"cumulative_logit": ("ordinal", "logit"), "cumulative_probit": ("ordinal", "probit")}


def register_family(cls):
    """Class decorator adding a :class:`Family` subclass to the registry.

    The class is registered under ``cls.name`` and every name in
    ``cls.aliases``, so :func:`get_family` and :meth:`Family.from_config`
    can rebuild it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)) or not cls.name:
        raise TypeError("register_family expects a Family subclass with a `name`.")
    _FAMILIES[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


class Family:
    """Exponential-family-like response distribution with a link.

    Class attributes set by subclasses:
      name: registry name.
      canonical_link: link used when none is given.
      valid_links: links accepted by the constructor.
      dispersion_params: names of extra (positive) parameters learned by the
        model, passed to the methods in the ``params`` dict.
      aliases: extra registry names.
      quadrature_points: default number of Gauss-Hermite nodes.

    Subclasses implement ``_distribution`` (and optionally closed-form
    ``_expected_log_prob``, ``_check_response``, ``default_params``); the
    public methods convert dtypes once and delegate.
    """

    name = None
    canonical_link = None
    valid_links = ()
    dispersion_params = ()
    aliases = ()
    quadrature_points = 32

    def __init__(self, link=None):
        link = get_link(self.canonical_link if link is None else link)
        if link.name not in self.valid_links:
            raise ValueError(
                f"Link {link.name!r} is not valid for family {self.name!r}; "
                f"valid links are: {', '.join(self.valid_links)}."
            )
        self.link = link

    # -- config / identity ------------------------------------------------

    def get_config(self):
        """Serializable config: ``{"name": ..., "link": ...}``."""
        return {"name": self.name, "link": self.link.name}

    @classmethod
    def from_config(cls, config):
        """Inverse of :meth:`get_config` (dispatches through the registry)."""
        return get_family(config["name"], link=config.get("link"))

    def for_design(self, design):
        """The family as it fits `design` (`kg.glmm` calls it once the response is read):
        itself, except for a family that takes something from the data (the ordinal
        family's categories)."""
        del design
        return self

    @property
    def is_gaussian_identity(self):
        """Gaussian with the identity link: a linear mixed model (lme4's `lmer`), whose
        posterior given the variance parameters is Gaussian and exact, and whose
        GLM fit is least squares."""
        return self.name == "gaussian" and self.link.name == "identity"

    def __eq__(self, other):
        return type(self) is type(other) and self.link == other.link

    def __hash__(self):
        return hash((type(self), self.link.name))

    def __repr__(self):
        return f"{type(self).__name__}(link={self.link.name!r})"

    # -- public TF methods ------------------------------------------------

    def distribution(self, eta, params=None, trials=None):
        """Distribution of the response at linear predictor ``eta``.

        Args:
          eta: linear predictor, shape ``(rows,)`` (any shape works); its
            floating dtype (float32 if integer) is used throughout.
          params: dict mapping each name in ``dispersion_params`` to a
            positive tensor broadcastable to ``eta``.
          trials: binomial number of trials (``None`` means 1); ignored by
            other families.

        Returns:
          A ``tfp.distributions.Distribution`` with batch shape of ``eta``.
        """
        eta, params, trials = self._prepare(eta, params, trials)
        return self._distribution(eta, params, trials)

    def log_prob(self, y, eta, params=None, trials=None):
        """Per-row ``log p(y | eta)``; same shape as ``eta`` (broadcast with y)."""
        eta, params, trials = self._prepare(eta, params, trials)
        y = tf.cast(y, eta.dtype)
        return self._log_prob(y, eta, params, trials)

    def expected_log_prob(self, y, eta_mean, eta_var, params=None, trials=None, num_points=None):
        """Per-row ``E_{eta ~ N(m, v)}[log p(y | eta)]``.

        Uses a closed form where the family/link has one, else Gauss-Hermite
        quadrature with ``num_points`` nodes (default ``quadrature_points``):
        with probabilists' Hermite nodes ``x_k`` and weights ``w_k``
        normalised to sum to one,

            E[f(eta)] ~= sum_k w_k f(m + sqrt(v) x_k),

        exact for polynomials of degree < 2 * num_points. Both paths are exact
        at ``v == 0`` (they reduce to ``log_prob(y, m)``) and have finite
        gradients there (the gradient w.r.t. ``v`` at ``v == 0`` is taken as
        0 on the quadrature path).

        Args:
          y: response, broadcastable to ``eta_mean``.
          eta_mean: mean ``m`` of the linear predictor, shape ``(rows,)``.
          eta_var: variance ``v >= 0`` of the linear predictor, same shape.
          params: dispersion params, see :meth:`distribution`.
          trials: binomial trials.
          num_points: number of quadrature nodes.

        Returns:
          Tensor of shape ``eta_mean.shape``.
        """
        eta_mean, params, trials = self._prepare(eta_mean, params, trials)
        dtype = eta_mean.dtype
        y = tf.cast(y, dtype)
        eta_var = tf.cast(eta_var, dtype)
        return self._expected_log_prob(
            y, eta_mean, eta_var, params, trials, num_points or self.quadrature_points
        )

    def expected_log_prob_derivatives(self, y, eta_mean, eta_var, params=None, trials=None,
                                      num_points=None, weights=None):
        """``E_q[log p(y_i | eta_i)]`` and its derivatives, per row, as float64 numpy.

        For ``eta_i ~ N(m_i, v_i)``, with ``f_i = log p(y_i | eta)``: the value, its
        first and second derivatives in the mean (``E[f_i']`` and ``E[f_i'']``), its
        derivative in the variance (``E[f_i''] / 2`` by Price's theorem, but taken
        from the same formula as the value: with quadrature the two differ by the
        rule's error, and an optimizer must follow its own objective), and the
        derivative of ``sum_i w_i E[f_i]`` in each dispersion parameter. The
        inference engine's Newton steps and gradients use them
        (`keras_glmm.engine.solver`). They are the same numbers as
        :meth:`expected_log_prob` (the same closed forms, or the same quadrature
        rule), computed in numpy from the family's log-likelihood kernel
        (`_numpy_log_prob`) where it has one, else by a TensorFlow function traced
        once per family, link and quadrature size.

        A parameter may also vary by row, an ``(rows,)`` array (a zero-inflation
        probability with covariates, ``logit(pi_i) = x_zi,i' gamma``): families with
        a numpy kernel take it, and its gradient is then per row,
        ``w_i d E[f_i] / d param_i``, which the engine maps to ``gamma`` by the chain rule.

        Returns:
          ``(value, d_mean, d2_mean, d_var, params_gradient)``: four ``(rows,)``
          arrays (unweighted) and a dict: for each scalar parameter a float, the
          gradient of the rows' weighted sum (`weighted_expected_log_prob`, whose
          value is ``w * value + weight_value(weights, params)``); for each
          per-row parameter the ``(rows,)`` array of its rows' weighted gradients.
        """
        m = np.asarray(eta_mean, np.float64).reshape(-1)
        n = len(m)
        params = {k: _scalar_or_rows(k, v, n) for k, v in (params or {}).items()}
        per_row = {k for k, v in params.items() if np.ndim(v)}
        num_points = self.quadrature_points if num_points is None else num_points
        y = np.broadcast_to(np.asarray(y, np.float64), (n,))
        v = np.broadcast_to(np.asarray(eta_var, np.float64), (n,))
        trials = None if trials is None else np.broadcast_to(np.asarray(trials, np.float64), (n,))
        weights = np.ones(n) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), (n,))
        if self._has_numpy_kernel():
            # Branches of np.where overflow where the other is taken (a floored mean).
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                out = self._numpy_expected(y, m, v, params, trials) if num_points else None
                if out is None:
                    out = self._numpy_quadrature(y, m, v, params, trials, num_points)
            value, first, second, d_var, row_grads = out
            grads = {k: np.broadcast_to(weights * g, (n,)) if k in per_row else float(np.sum(weights * g))
                     for k, g in row_grads.items()}
            extra = self._weight_terms(weights, params, np)
            if extra is not None:
                for k, g in extra[1].items():
                    grads[k] = grads.get(k, 0.0) + float(np.sum(g))
            return value, first, second, d_var, grads
        if per_row:
            raise ValueError(
                f"Family {self.name!r} takes parameters per row ({sorted(per_row)}) only with a numpy "
                "kernel (`_numpy_log_prob`), which it does not have.")
        names = tuple(sorted(params))
        function = _derivatives_function(self, num_points, names, trials is not None)
        as_vector = lambda a: tf.constant(np.broadcast_to(np.asarray(a, np.float64), (n,)))  # noqa: E731
        ones = np.ones(n)
        value, first, second, d_var, grads = function(
            as_vector(y), as_vector(m), as_vector(v),
            as_vector(ones if trials is None else trials), as_vector(weights),
            *[tf.constant(params[k], tf.float64) for k in names],
        )
        grads = {k: float(g) for k, g in zip(names, grads)}
        return value.numpy(), first.numpy(), second.numpy(), d_var.numpy(), grads

    def weight_value(self, weights, params):
        """The rows' weighted log-likelihood minus ``w * log p``, summed (numpy; 0 for most)."""
        extra = self._weight_terms(np.asarray(weights, np.float64), {k: float(v) for k, v in params.items()}, np)
        return 0.0 if extra is None else float(np.sum(extra[0]))

    def log_prob_derivatives(self, y, eta, params=None, trials=None, weights=None):
        """``log p(y_i | eta_i)`` and its first and second derivatives in ``eta``, per row.

        As :meth:`expected_log_prob_derivatives` at zero variance, without its
        quadrature: for GLM fits, observed information and adaptive quadrature.

        Returns:
          ``(value, d_eta, d2_eta, params_gradient)``.
        """
        value, first, second, _, grads = self.expected_log_prob_derivatives(
            y, eta, np.zeros(np.shape(eta)), params, trials=trials, num_points=0, weights=weights)
        return value, first, second, grads

    # -- prior weights ----------------------------------------------------

    def weighted_expected_log_prob(self, y, eta_mean, eta_var, weights, params=None, trials=None,
                                   num_points=None):
        """``E_q[log p]`` of each row under prior weights ``w`` (TF, as `expected_log_prob`).

        Prior weights multiply each row's log-likelihood (lme4's likelihood
        weights); a family whose dispersion is a variance makes them precisions
        instead (the gaussian: row variance ``sigma^2 / w``) through
        `_weight_terms`. A row of weight 0 contributes nothing.
        """
        value = self.expected_log_prob(y, eta_mean, eta_var, params, trials=trials, num_points=num_points)
        weights = tf.cast(weights, value.dtype)
        value = weights * value
        extra = self._weight_terms(weights, {k: tf.cast(v, value.dtype) for k, v in (params or {}).items()},
                                   tf)
        return value if extra is None else value + extra[0]

    def _weight_terms(self, weights, params, ops):
        """What `w * log p` leaves out of a row's weighted log-likelihood, or None.

        Returns ``(value per row, {param: d value / d param per row})``, computed
        with ``ops`` (``numpy`` or ``tf``). Likelihood weights: nothing.
        """
        return None

    # -- numpy kernels (the engine's) -------------------------------------

    def _has_numpy_kernel(self):
        return type(self)._numpy_log_prob is not Family._numpy_log_prob

    def _numpy_log_prob(self, y, eta, params, trials):
        """``log p`` and its derivatives in numpy: ``(f, df/deta, d2f/deta2, {param: df/dparam})``.

        Subclasses that define it give the engine derivatives without TensorFlow;
        it must be the same function as ``_log_prob`` (tests compare them).
        """
        raise NotImplementedError

    def _numpy_expected(self, y, m, v, params, trials):
        """The closed form of `_expected_log_prob` in numpy, where it has one (else None)."""
        return None

    def _numpy_quadrature(self, y, m, v, params, trials, num_points):
        """`_quadrature` of the numpy kernel, with its exact derivatives in `m` and `v`."""
        if num_points == 0:
            f, d1, d2, dp = self._numpy_log_prob(y, m, params, trials)
            return f, d1, d2, 0.5 * d2, dp
        x, w = _hermite_rule(num_points)
        sd = np.sqrt(np.maximum(v, 0.0))
        nodes = m[:, None] + sd[:, None] * x[None, :]
        node_params = {k: p[:, None] if np.ndim(p) else p for k, p in params.items()}  # per-row ones
        f, d1, d2, dp = self._numpy_log_prob(
            y[:, None], nodes, node_params, None if trials is None else trials[:, None])
        value, first, second = f @ w, d1 @ w, d2 @ w
        # d/dv of sum_k w_k f(m + sqrt(v) x_k) = sum_k w_k f'(.) x_k / (2 sqrt(v)); at
        # v = 0 its limit, E[f''] / 2.
        positive = sd > 0
        d_var = np.where(positive, ((d1 * x) @ w) / (2.0 * np.where(positive, sd, 1.0)), 0.5 * second)
        return value, first, second, d_var, {k: g @ w for k, g in dp.items()}

    def response_mean(self, eta, params):
        """The response's mean at ``eta``: ``mean(eta)``, except for a zero-inflated family.

        Args:
          eta: linear predictor.
          params: the dispersion parameters (scalars, or per row).
        """
        del params
        return self.mean(eta)

    def mean(self, eta, trials=None):
        """Response mean ``g^{-1}(eta)``.

        For the binomial family this is the success *probability*, not
        ``trials * probability``; ``trials`` is accepted for a uniform call
        signature and ignored.
        """
        del trials
        return self.link.inverse(_float_tensor(eta))

    # -- private maths (override in subclasses) ---------------------------

    def _distribution(self, eta, params, trials):
        raise NotImplementedError

    def _log_prob(self, y, eta, params, trials):
        return self._distribution(eta, params, trials).log_prob(y)

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        return self._quadrature(y, m, v, params, trials, num_points)

    def _quadrature(self, y, m, v, params, trials, num_points):
        """Generic Gauss-Hermite path shared by every family (see public doc)."""
        dtype = m.dtype
        x, w = _hermite_rule(num_points)
        x, w = tf.constant(x, dtype), tf.constant(w, dtype)
        # Safe sqrt: sqrt'(0) is infinite, and 0 * inf = NaN would poison the
        # gradients, so evaluate sqrt only on positive v and use sd = 0 at
        # v <= 0 (which also makes v == 0 reproduce log_prob exactly).
        positive = v > 0
        sd = tf.where(positive, tf.sqrt(tf.where(positive, v, tf.ones_like(v))), tf.zeros_like(v))
        nodes = m[..., None] + sd[..., None] * x  # (..., num_points)
        expand = lambda t: None if t is None else t[..., None]  # noqa: E731
        params = {k: expand(p) for k, p in params.items()}
        lp = self._log_prob(y[..., None], nodes, params, expand(trials))
        return tf.reduce_sum(lp * w, axis=-1)

    def _positive(self, mu):
        """Clamps a mean to ``sqrt(tiny)`` so that e.g. ``rate = shape / mu`` stays finite.

        Used only by families whose mean must be positive under a link that
        does not guarantee it (identity, inverse); the clamp zeroes the
        gradient in the invalid region rather than returning NaN.
        """
        floor = math.sqrt(np.finfo(mu.dtype.as_numpy_dtype).tiny)
        return tf.maximum(mu, tf.constant(floor, mu.dtype))

    def _log_mean(self, eta):
        """``log(mu)``; exactly ``eta`` under the log link (no exp/log round trip)."""
        if self.link.name == "log":
            return eta
        return tf.math.log(self._positive(self.link.inverse(eta)))

    def _prepare(self, eta, params, trials):
        eta = _float_tensor(eta)
        params = dict(params or {})
        missing = [p for p in self.dispersion_params if p not in params]
        if missing:
            raise ValueError(f"Family {self.name!r} needs params {missing}; got {sorted(params)}.")
        params = {k: _cast(params[k], eta.dtype) for k in self.dispersion_params}
        if trials is not None:
            trials = _cast(trials, eta.dtype)
        return eta, params, trials

    # -- numpy-side helpers ---------------------------------------------

    def check_response(self, y, trials=None, name="y"):
        """Validates the response before training (numpy).

        Raises:
          ValueError: naming ``name``, the first offending row and its value,
            for NaN / inf anywhere or a value outside the family's support.
        """
        y = _as_1d(y)
        _first_bad(name, y, ~np.isfinite(y), "is not finite")
        self._check_response(y, None if trials is None else _as_1d(trials), name)

    def _check_response(self, y, trials, name):
        pass

    def default_params(self, y, trials=None):
        """Initial values for the dispersion params from the marginal response.

        These ignore covariates (marginal moments), so they are rough
        starting values only. Returns ``{}`` for families without params.
        """
        return {}


_DERIVATIVE_FUNCTIONS = {}


def _derivatives_function(family, num_points, names, with_trials):
    """A traced `(y, m, v, trials, weights, *params) -> (value, d/dm, d2/dm2, d/dv, d/dparams)`.

    `num_points=0` differentiates `log_prob` at `m` (`v` unused), for
    `Family.log_prob_derivatives`.

    Families hold no state beyond their link, so one graph serves every instance of
    a family and link (`Family.expected_log_prob_derivatives`).
    """
    key = (type(family), family.link.name, int(num_points), names, with_trials)
    if key not in _DERIVATIVE_FUNCTIONS:
        vector = tf.TensorSpec([None], tf.float64)
        signature = [vector] * 5 + [tf.TensorSpec([], tf.float64)] * len(names)

        @tf.function(input_signature=signature)
        def derivatives(y, m, v, trials, weights, *params):
            named = dict(zip(names, params))
            with tf.GradientTape() as outer:
                outer.watch(m)
                with tf.GradientTape(persistent=True) as inner:
                    inner.watch(m)
                    inner.watch(v)
                    inner.watch(list(params))
                    if num_points:
                        value = family.expected_log_prob(
                            y, m, v, named, trials=trials if with_trials else None, num_points=num_points)
                    else:  # no variance: the log-likelihood itself
                        value = family.log_prob(y, m, named, trials=trials if with_trials else None)
                    total = tf.reduce_sum(value)
                    weighted = tf.reduce_sum(value * weights)
                    extra = family._weight_terms(weights, named, tf)
                    if extra is not None:
                        weighted += tf.reduce_sum(extra[0])
                first = inner.gradient(total, m)
                # Rows are independent: the gradient of the summed first derivatives
                # is each row's second derivative.
                first_sum = tf.reduce_sum(first)
            second = outer.gradient(first_sum, m)
            d_var = inner.gradient(total, v)
            d_var = tf.zeros_like(v) if d_var is None else d_var
            grads = inner.gradient(weighted, list(params)) if params else []
            grads = [tf.zeros([], tf.float64) if g is None else g for g in grads]
            return value, first, second, d_var, grads

        _DERIVATIVE_FUNCTIONS[key] = derivatives
    return _DERIVATIVE_FUNCTIONS[key]


def _scalar_or_rows(name, value, num_rows):
    """A parameter as a float, or as a float64 ``(num_rows,)`` array when it varies by row."""
    if np.ndim(value) == 0:
        return float(value)
    array = np.asarray(value, np.float64).reshape(-1)
    if array.shape != (num_rows,):
        raise ValueError(
            f"Parameter '{name}' must be a number or one value per row ({num_rows}). "
            f"Received shape {np.shape(value)}.")
    return array


def _hermite_rule(num_points, _cache={}):  # noqa: B006 - deliberate memo
    """Probabilists' Gauss-Hermite nodes and weights normalised to sum to 1."""
    if num_points not in _cache:
        x, w = np.polynomial.hermite_e.hermegauss(int(num_points))
        _cache[num_points] = (x, w / w.sum())
    return _cache[num_points]


def _positive_numpy(mu):
    """`Family._positive` in numpy: the mean, floored; and where the floor holds it."""
    floor = math.sqrt(np.finfo(np.float64).tiny)
    return np.maximum(mu, floor), mu > floor


def _link_derivatives(link, eta):
    """`mu = g^-1(eta)` and its first two derivatives, in numpy."""
    if link == "identity":
        return eta, np.ones_like(eta), np.zeros_like(eta)
    if link == "log":
        mu = np.exp(eta)
        return mu, mu, mu
    if link == "inverse":
        return 1.0 / eta, -1.0 / eta**2, 2.0 / eta**3
    raise ValueError(f"No numpy derivatives for the {link} link.")


def _as_1d(a):
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _first_bad(name, values, bad, what):
    """Raises ValueError on the first row where ``bad`` holds."""
    bad = np.asarray(bad)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: row {i} has value {values[i].item()!r}, which {what}.")


def _check_counts(y, name):
    _first_bad(name, y, y < 0, "is negative (counts must be >= 0)")
    _first_bad(name, y, y != np.round(y), "is not an integer (counts must be integers)")


@register_family
class Gaussian(Family):
    """Normal response: ``y ~ N(mu, scale^2)``; ``scale`` is the residual sd."""

    name = "gaussian"
    aliases = ("normal",)
    canonical_link = "identity"
    valid_links = ("identity", "log", "inverse")
    dispersion_params = ("scale",)

    def _distribution(self, eta, params, trials):
        return tfd.Normal(loc=self.link.inverse(eta), scale=params["scale"])

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        s2 = tf.square(params["scale"])
        const = -0.5 * tf.math.log(2.0 * math.pi * s2)
        if self.link.name == "identity":
            # E[(y - eta)^2] = (y - m)^2 + v.
            return const - (tf.square(y - m) + v) / (2.0 * s2)
        if self.link.name == "log":
            # E[(y - e^eta)^2] = y^2 - 2 y e^{m + v/2} + e^{2m + 2v} (lognormal moments).
            sq = tf.square(y) - 2.0 * y * tf.exp(m + 0.5 * v) + tf.exp(2.0 * m + 2.0 * v)
            return const - sq / (2.0 * s2)
        return super()._expected_log_prob(y, m, v, params, trials, num_points)

    def _weight_terms(self, weights, params, ops):
        # log N(y | mu, sigma^2 / w) = w log N(y | mu, sigma^2) + [log w - (1 - w) log(2 pi sigma^2)] / 2
        sigma = params["scale"]
        log = np.log if ops is np else tf.math.log
        positive = weights > 0
        safe = ops.where(positive, weights, ops.ones_like(weights))
        value = ops.where(positive, 0.5 * log(safe) - 0.5 * (1.0 - weights) * log(
            2.0 * math.pi * sigma**2), ops.zeros_like(weights))
        return value, {"scale": ops.where(positive, -(1.0 - weights) / sigma, ops.zeros_like(weights))}

    def _numpy_log_prob(self, y, eta, params, trials):
        s2 = params["scale"] ** 2
        mu, d_mu, d2_mu = _link_derivatives(self.link.name, eta)
        r = y - mu
        f = -0.5 * np.log(2.0 * math.pi * s2) - r**2 / (2.0 * s2)
        d_scale = -1.0 / params["scale"] + r**2 / params["scale"] ** 3
        return f, r * d_mu / s2, (r * d2_mu - d_mu**2) / s2, {"scale": d_scale}

    def _numpy_expected(self, y, m, v, params, trials):
        sigma = params["scale"]
        s2 = sigma**2
        const = -0.5 * np.log(2.0 * math.pi * s2)
        if self.link.name == "identity":
            sq = (y - m) ** 2 + v
            return (const - sq / (2 * s2), (y - m) / s2, np.full_like(m, -1.0 / s2),
                    np.full_like(m, -0.5 / s2), {"scale": -1.0 / sigma + sq / sigma**3})
        if self.link.name == "log":
            e1, e2 = np.exp(m + 0.5 * v), np.exp(2.0 * m + 2.0 * v)
            sq = y**2 - 2.0 * y * e1 + e2
            return (const - sq / (2 * s2), (2 * y * e1 - 2 * e2) / (2 * s2), (2 * y * e1 - 4 * e2) / (2 * s2),
                    (y * e1 - 2 * e2) / (2 * s2), {"scale": -1.0 / sigma + sq / sigma**3})
        return None

    def default_params(self, y, trials=None):
        sd = float(np.std(_as_1d(y)))
        return {"scale": sd if sd > 0 else 1.0}


@register_family
class Binomial(Family):
    """Binomial response: ``y ~ Binomial(trials, mu)``, y = number of successes.

    ``trials=None`` means one trial (Bernoulli, y in {0, 1}). ``mean`` returns
    the probability ``mu``. Log-probabilities are computed from the logits
    ``log(mu) - log(1 - mu)`` evaluated stably for every link (rather than
    from clipped probabilities), so tails keep informative gradients:

      * logit: ``eta``;
      * probit: ``log Phi(eta) - log Phi(-eta)``;
      * cloglog: ``log(1 - exp(-e^eta)) + e^eta``.
    """

    name = "binomial"
    aliases = ("bernoulli",)
    canonical_link = "logit"
    valid_links = ("logit", "probit", "cloglog")

    def __init__(self, link=None):
        super().__init__(link)
        if self.link.name == "logit":
            # E[softplus(eta)] is smooth: 12 nodes are exact to 2e-8 at sd(eta) = 1
            # and to 4e-5 at sd 2, at 3/8 of the cost of 32 per row (the quadrature
            # is the largest cost of a minibatch step). Probit and cloglog keep 32.
            self.quadrature_points = 12

    def _logits(self, eta):
        if self.link.name == "logit":
            return eta
        if self.link.name == "probit":
            normal = _std_normal(eta.dtype)
            return normal.log_cdf(eta) - normal.log_cdf(-eta)
        # cloglog: log(1 - mu) = -e^eta, log(mu) = log(1 - exp(-e^eta)).
        # Clip eta so e^eta neither overflows nor underflows to log(0). The
        # cap (e^eta = sqrt(max float)) leaves headroom for the arithmetic in
        # Binomial.log_prob and its gradient; mu == 1 to machine precision
        # long before it. Below -20 use the series
        # log(mu) = eta - e^eta / 2 + O(e^{2 eta}).
        cap = 0.5 * math.log(np.finfo(eta.dtype.as_numpy_dtype).max)
        # (Both tf.where branches are clipped: the unused one must stay
        # finite or its zero gradient becomes 0 * inf = NaN.)
        e = tf.exp(tf.clip_by_value(eta, -20.0, cap))
        series = eta - 0.5 * tf.exp(tf.minimum(eta, -20.0))
        log_mu = tf.where(eta < -20.0, series, tf.math.log(-tf.math.expm1(-e)))
        return log_mu + tf.exp(tf.minimum(eta, cap))

    def _distribution(self, eta, params, trials):
        total = tf.ones_like(eta) if trials is None else trials
        return tfd.Binomial(total_count=total, logits=self._logits(eta))

    def _log_prob(self, y, eta, params, trials):
        # y log(mu) + (n - y) log(1 - mu) = y logit - n softplus(logit), for every
        # link; the binomial coefficient only with trials (tfd.Binomial's log_prob
        # costs several times more per row, which adaptive quadrature repeats at
        # every node).
        logits = self._logits(eta)
        if trials is None:
            return y * logits - tf.nn.softplus(logits)
        return (y * logits - trials * tf.nn.softplus(logits) + tf.math.lgamma(trials + 1.0)
                - tf.math.lgamma(y + 1.0) - tf.math.lgamma(trials - y + 1.0))

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        if self.link.name != "logit":
            return super()._expected_log_prob(y, m, v, params, trials, num_points)
        # log p = y eta - n softplus(eta) + log C(n, y): only E[softplus(eta)] needs
        # quadrature, and the binomial coefficient is computed once per row instead
        # of at every node (tfd.Binomial's log_prob costs 6x more per row).
        expected = y * m - self._quadrature_softplus(m, v, num_points) * (
            1.0 if trials is None else trials
        )
        if trials is not None:
            expected += tf.math.lgamma(trials + 1.0) - tf.math.lgamma(y + 1.0) - tf.math.lgamma(
                trials - y + 1.0
            )
        return expected

    @staticmethod
    def _quadrature_softplus(m, v, num_points):
        """`E[softplus(eta)]` for `eta ~ N(m, v)` by Gauss-Hermite (see `_quadrature`)."""
        x, w = _hermite_rule(num_points)
        x, w = tf.constant(x, m.dtype), tf.constant(w, m.dtype)
        positive = v > 0
        sd = tf.where(positive, tf.sqrt(tf.where(positive, v, tf.ones_like(v))), tf.zeros_like(v))
        return tf.reduce_sum(tf.nn.softplus(m[..., None] + sd[..., None] * x) * w, axis=-1)

    def _numpy_log_prob(self, y, eta, params, trials):
        # f = y log(mu) + (n - y) log(1 - mu) [+ log C(n, y)], with log(mu), log(1 - mu)
        # and their derivatives in eta per link.
        n = 1.0 if trials is None else trials
        link = self.link.name
        if link == "logit":
            # y eta - n softplus(eta), with log(1 - mu) = log(mu) - eta.
            p = special.expit(eta)
            # log(mu) as log(expit): scipy's log_expit costs four times expit. Below
            # -30 it is eta to 1e-13 (and log(p) would meet p = 0 below -745).
            log_mu = np.where(eta > -30.0, np.log(p), eta)
            f = n * log_mu - (n - y) * eta
            if trials is not None:
                f = f + special.gammaln(n + 1.0) - special.gammaln(y + 1.0) - special.gammaln(n - y + 1.0)
            return f, y - n * p, -n * p * (1.0 - p), {}
        elif link == "probit":
            log_mu, log_not = special.log_ndtr(eta), special.log_ndtr(-eta)
            log_phi = -0.5 * eta**2 - 0.5 * math.log(2.0 * math.pi)
            r_pos, r_neg = np.exp(log_phi - log_mu), np.exp(log_phi - log_not)  # phi/Phi(+-eta)
            d_mu, d_not = r_pos, -r_neg
            d2_mu, d2_not = -r_pos * (eta + r_pos), -r_neg * (r_neg - eta)
        else:  # cloglog: log(1 - mu) = -e^eta, log(mu) = log(1 - exp(-e^eta))
            e = np.exp(np.minimum(eta, 0.5 * math.log(np.finfo(np.float64).max)))
            log_not, d_not, d2_not = -e, -e, -e
            small = eta < -20.0  # log(mu) = eta - e^eta / 2 + O(e^{2 eta})
            es = np.where(small, 1.0, np.minimum(e, 700.0))
            em1 = np.expm1(es)
            ratio = es / em1  # d log(mu) / d eta = e / (e^e - 1)
            log_mu = np.where(small, eta - 0.5 * e, np.log(-np.expm1(-np.where(small, 1.0, e))))
            d_mu = np.where(small, 1.0 - 0.5 * e, ratio)
            d2_mu = np.where(small, -0.5 * e, ratio * (1.0 - es * np.exp(es) / em1))
        f = y * log_mu + (n - y) * log_not
        if trials is not None:
            f = f + special.gammaln(n + 1.0) - special.gammaln(y + 1.0) - special.gammaln(n - y + 1.0)
        return f, y * d_mu + (n - y) * d_not, y * d2_mu + (n - y) * d2_not, {}

    def _check_response(self, y, trials, name):
        if trials is None:
            _first_bad(name, y, (y != 0) & (y != 1), "is not 0 or 1 (no trials given: Bernoulli)")
            return
        tname = f"trials for {name}"
        if trials.size not in (1, y.size):
            raise ValueError(f"{tname}: length {trials.size} does not match {name} length {y.size}.")
        _first_bad(tname, trials, ~np.isfinite(trials), "is not finite")
        _first_bad(tname, trials, (trials < 1) | (trials != np.round(trials)), "is not a positive integer")
        _check_counts(y, name)
        trials = np.broadcast_to(trials, y.shape)
        _first_bad(name, y, y > trials, "exceeds the number of trials")


@register_family
class Poisson(Family):
    """Poisson response: ``y ~ Poisson(mu)``."""

    name = "poisson"
    canonical_link = "log"
    valid_links = ("log", "identity")

    def _distribution(self, eta, params, trials):
        if self.link.name == "log":
            return tfd.Poisson(log_rate=eta)
        return tfd.Poisson(rate=self._positive(self.link.inverse(eta)))

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        if self.link.name == "log":
            # E[y eta - e^eta] - log y! with E[e^eta] = e^{m + v/2}.
            return y * m - tf.exp(m + 0.5 * v) - tf.math.lgamma(y + 1.0)
        return super()._expected_log_prob(y, m, v, params, trials, num_points)

    def _numpy_log_prob(self, y, eta, params, trials):
        if self.link.name == "log":
            mu = np.exp(eta)
            return y * eta - mu - special.gammaln(y + 1.0), y - mu, -mu, {}
        mu, inside = _positive_numpy(eta)  # identity link, mean floored as `_positive`
        f = y * np.log(mu) - mu - special.gammaln(y + 1.0)
        return f, np.where(inside, y / mu - 1.0, 0.0), np.where(inside, -y / mu**2, 0.0), {}

    def _numpy_expected(self, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        e = np.exp(m + 0.5 * v)
        return y * m - e - special.gammaln(y + 1.0), y - e, -e, -0.5 * e, {}

    def _check_response(self, y, trials, name):
        _check_counts(y, name)


@register_family
class NegativeBinomial(Family):
    """NB2 response: mean ``mu``, variance ``mu + mu^2 / dispersion``.

    ``dispersion`` is theta, the NB "size"; theta -> inf recovers Poisson.
    TFP's ``NegativeBinomial(total_count=theta, logits=log(mu / theta))`` has
    mean ``theta * exp(logits) = mu`` and variance ``mu / (1 - p)`` with
    ``1 - p = theta / (theta + mu)``, i.e. exactly NB2.
    """

    name = "negative_binomial"
    aliases = ("negbin", "nb")
    canonical_link = "log"
    valid_links = ("log",)
    dispersion_params = ("dispersion",)

    def _distribution(self, eta, params, trials):
        theta = params["dispersion"]
        return tfd.NegativeBinomial(
            total_count=theta,
            logits=self._log_mean(eta) - tf.math.log(theta),
            require_integer_total_count=False,  # theta is continuous
        )

    def _numpy_log_prob(self, y, eta, params, trials):
        theta = params["dispersion"]
        mu = np.exp(eta)
        log_sum = np.logaddexp(math.log(theta), eta)  # log(theta + mu)
        f = (special.gammaln(y + theta) - special.gammaln(theta) - special.gammaln(y + 1.0)
             + theta * math.log(theta) + y * eta - (y + theta) * log_sum)
        share = np.exp(eta - log_sum)  # mu / (theta + mu)
        d1 = y - (y + theta) * share
        d2 = -(y + theta) * share * (1.0 - share)
        d_theta = (special.digamma(y + theta) - special.digamma(theta) + math.log(theta) + 1.0 - log_sum
                   - (y + theta) / (theta + mu))
        return f, d1, d2, {"dispersion": d_theta}

    def _check_response(self, y, trials, name):
        _check_counts(y, name)

    def default_params(self, y, trials=None):
        # Method of moments: var = mu + mu^2 / theta; underdispersed or
        # degenerate data -> upper clip (near-Poisson).
        y = _as_1d(y)
        mu, var = y.mean(), y.var()
        theta = mu**2 / (var - mu) if var > mu else np.inf
        return {"dispersion": float(np.clip(theta, 0.1, 1e3))}


@register_family
class NegativeBinomial1(Family):
    """NB1 response (glmmTMB's ``nbinom1``): mean ``mu``, variance ``mu (1 + phi)``.

    A negative binomial whose size grows with the mean, ``size = mu / phi``, and
    whose success probability is constant, ``p = 1 / (1 + phi)``::

        log p(y) = lgamma(y + s) - lgamma(s) - lgamma(y + 1) - s log(1 + phi)
                   + y log(phi / (1 + phi)),      s = mu / phi

    ``dispersion`` is ``phi``, glmmTMB's ``sigma(fit)`` for ``nbinom1`` (unlike
    :class:`NegativeBinomial`, whose ``dispersion`` is the size theta, the variance
    here grows linearly in the mean; ``phi -> 0`` recovers the Poisson). TFP's
    ``NegativeBinomial(total_count=s, logits=log(phi))`` has mean
    ``s * phi = mu`` and variance ``mu (1 + phi)``. The expected log-likelihood
    has no closed form (``lgamma(y + e^eta / phi)``): Gauss-Hermite quadrature.
    """

    name = "nbinom1"
    aliases = ("negative_binomial1",)
    canonical_link = "log"
    valid_links = ("log",)
    dispersion_params = ("dispersion",)

    def _distribution(self, eta, params, trials):
        phi = params["dispersion"]
        return tfd.NegativeBinomial(total_count=tf.exp(eta) / phi, logits=tf.math.log(phi) * tf.ones_like(eta),
                                    require_integer_total_count=False)

    def _log_prob(self, y, eta, params, trials):
        phi = params["dispersion"]
        log_phi = tf.math.log(phi)
        s = tf.exp(eta - log_phi)
        # log(1 + phi) = softplus(log phi); log(phi / (1 + phi)) = -softplus(-log phi).
        return (tf.math.lgamma(y + s) - tf.math.lgamma(s) - tf.math.lgamma(y + 1.0)
                - s * tf.nn.softplus(log_phi) - y * tf.nn.softplus(-log_phi))

    def _numpy_log_prob(self, y, eta, params, trials):
        phi = params["dispersion"]
        log_phi = np.log(phi)
        s = np.exp(eta - log_phi)
        log1p_phi = np.logaddexp(0.0, log_phi)
        f = (special.gammaln(y + s) - special.gammaln(s) - special.gammaln(y + 1.0)
             - s * log1p_phi - y * np.logaddexp(0.0, -log_phi))
        # d f / d s, and s' = s in eta, s' = -s / phi in phi.
        d_s = special.digamma(y + s) - special.digamma(s) - log1p_phi
        d1 = s * d_s
        d2 = d1 + s**2 * (special.polygamma(1, y + s) - special.polygamma(1, s))
        d_phi = -s * d_s / phi - s / (1.0 + phi) + y / (phi * (1.0 + phi))
        return f, d1, d2, {"dispersion": d_phi}

    def _check_response(self, y, trials, name):
        _check_counts(y, name)

    def default_params(self, y, trials=None):
        # Method of moments: var = mu (1 + phi); underdispersed data -> the lower clip (near-Poisson).
        y = _as_1d(y)
        mu, var = y.mean(), y.var()
        phi = var / mu - 1.0 if mu > 0 else 0.0
        return {"dispersion": float(np.clip(phi, 0.01, 1e3))}


@register_family
class Gamma(Family):
    """Gamma response with mean ``mu`` and variance ``mu^2 / shape``.

    ``Gamma(concentration=shape, rate=shape / mu)``; the coefficient of
    variation is ``1 / sqrt(shape)`` (glmmTMB's ``sigma``). Under the identity
    link the mean, under the inverse link (lme4's default) ``eta = 1 / mu``
    itself, is clamped to a tiny positive floor (see ``Family._positive``), so
    ``eta`` outside the valid region gives a finite log-density with zero
    gradient rather than NaN: start a fit inside it (e.g. at the GLM fit; at
    ``eta = 0`` every row is on the floor and nothing moves).
    """

    name = "gamma"
    canonical_link = "inverse"
    valid_links = ("inverse", "log", "identity")
    dispersion_params = ("shape",)

    def _distribution(self, eta, params, trials):
        shape = params["shape"]
        if self.link.name == "log":
            return tfd.Gamma(concentration=shape, log_rate=tf.math.log(shape) - eta)
        if self.link.name == "inverse":
            # rate = shape / mu = shape * eta, without the reciprocal: 1 / eta is
            # infinite at eta = 0 (a NaN gradient) and jumps from +inf to -inf
            # there. eta <= 0 has no valid mean; it is clamped to the floor of
            # `_positive` (mu <= 1 / sqrt(tiny)), so the log-density stays finite
            # and continuous (about shape * log(shape * 1.5e-154) in float64) with
            # zero gradient below it: quadrature nodes that fall there cost a
            # large but finite penalty instead of a NaN.
            return tfd.Gamma(concentration=shape, log_rate=tf.math.log(shape) + tf.math.log(self._positive(eta)))
        return tfd.Gamma(concentration=shape, rate=shape / self._positive(self.link.inverse(eta)))

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        if self.link.name == "log":
            # log p = a log a - a eta + (a - 1) log y - a y e^{-eta} - lgamma(a),
            # with E[e^{-eta}] = e^{-m + v/2}.
            a = params["shape"]
            return (
                a * tf.math.log(a)
                - a * m
                + (a - 1.0) * tf.math.log(y)
                - a * y * tf.exp(-m + 0.5 * v)
                - tf.math.lgamma(a)
            )
        return super()._expected_log_prob(y, m, v, params, trials, num_points)

    def _numpy_log_prob(self, y, eta, params, trials):
        a = params["shape"]
        if self.link.name == "log":
            inv_mu = np.exp(-eta)
            log_mu, d_log, d2_log = eta, np.ones_like(eta), np.zeros_like(eta)
            d_inv, d2_inv = -inv_mu, inv_mu
        elif self.link.name == "inverse":
            # eta = 1 / mu itself floored, as `_distribution` does.
            rate, inside = _positive_numpy(eta)
            inv_mu, log_mu = rate, -np.log(rate)
            d_log, d2_log = np.where(inside, -1.0 / rate, 0.0), np.where(inside, 1.0 / rate**2, 0.0)
            d_inv, d2_inv = np.where(inside, 1.0, 0.0), np.zeros_like(eta)
        else:
            mu, d_mu, d2_mu = _link_derivatives(self.link.name, eta)
            mu, inside = _positive_numpy(mu)  # the mean floored as `_positive`
            inv_mu, log_mu = 1.0 / mu, np.log(mu)
            d_log = np.where(inside, d_mu / mu, 0.0)
            d2_log = np.where(inside, d2_mu / mu - (d_mu / mu) ** 2, 0.0)
            d_inv = np.where(inside, -d_mu / mu**2, 0.0)
            d2_inv = np.where(inside, 2.0 * d_mu**2 / mu**3 - d2_mu / mu**2, 0.0)
        # f = a log a - a log mu + (a - 1) log y - a y / mu - lgamma(a)
        f = a * math.log(a) - a * log_mu + (a - 1.0) * np.log(y) - a * y * inv_mu - special.gammaln(a)
        d_a = math.log(a) + 1.0 - log_mu + np.log(y) - y * inv_mu - special.digamma(a)
        return f, -a * d_log - a * y * d_inv, -a * d2_log - a * y * d2_inv, {"shape": d_a}

    def _numpy_expected(self, y, m, v, params, trials):
        if self.link.name != "log":
            return None
        a = params["shape"]
        e = y * np.exp(-m + 0.5 * v)
        f = a * math.log(a) - a * m + (a - 1.0) * np.log(y) - a * e - special.gammaln(a)
        d_a = math.log(a) + 1.0 - m + np.log(y) - e - special.digamma(a)
        return f, -a + a * e, -a * e, -0.5 * a * e, {"shape": d_a}

    def _check_response(self, y, trials, name):
        _first_bad(name, y, y <= 0, "is not strictly positive (gamma response)")

    def default_params(self, y, trials=None):
        y = _as_1d(y)
        var = y.var()
        shape = y.mean() ** 2 / var if var > 0 else np.inf
        return {"shape": float(np.clip(shape, 0.1, 1e3))}


@register_family
class Beta(Family):
    """Beta response for proportions in (0, 1), mean ``mu`` and precision ``phi``::

        y ~ Beta(mu * phi, (1 - mu) * phi),   E[y] = mu,   Var[y] = mu (1 - mu) / (1 + phi)

    glmmTMB's ``beta_family()`` (its ``sigma(fit)`` is ``phi``); ``precision`` is
    ``phi``. ``mu`` and ``1 - mu`` are each computed without cancellation for every
    link (``sigmoid(eta)`` and ``sigmoid(-eta)`` for the logit) and floored at
    ``sqrt(tiny)`` (see ``Family._positive``), so the density stays finite in the
    far tails of the quadrature.
    """

    name = "beta"
    canonical_link = "logit"
    valid_links = ("logit", "probit", "cloglog")
    dispersion_params = ("precision",)

    def _mean_and_complement(self, eta):
        if self.link.name == "logit":
            mu, rest = tf.sigmoid(eta), tf.sigmoid(-eta)
        elif self.link.name == "probit":
            normal = _std_normal(eta.dtype)
            mu, rest = normal.cdf(eta), normal.cdf(-eta)
        else:  # cloglog: 1 - mu = exp(-e^eta); capped so that e^eta stays finite
            t = tf.exp(tf.minimum(eta, 0.5 * math.log(np.finfo(eta.dtype.as_numpy_dtype).max)))
            mu, rest = -tf.math.expm1(-t), tf.exp(-t)
        return self._positive(mu), self._positive(rest)

    def _distribution(self, eta, params, trials):
        mu, rest = self._mean_and_complement(eta)
        phi = params["precision"]
        return tfd.Beta(concentration1=mu * phi, concentration0=rest * phi)

    def _log_prob(self, y, eta, params, trials):
        mu, rest = self._mean_and_complement(eta)
        phi = params["precision"]
        a, b = mu * phi, rest * phi
        return (
            tf.math.lgamma(phi) - tf.math.lgamma(a) - tf.math.lgamma(b)
            + (a - 1.0) * tf.math.log(y) + (b - 1.0) * tf.math.log1p(-y)
        )

    def _numpy_log_prob(self, y, eta, params, trials):
        phi = params["precision"]
        if self.link.name == "logit":
            mu, rest = special.expit(eta), special.expit(-eta)
            d, d2 = mu * rest, mu * rest * (rest - mu)
        elif self.link.name == "probit":
            mu, rest = special.ndtr(eta), special.ndtr(-eta)
            d = np.exp(-0.5 * eta**2) / math.sqrt(2.0 * math.pi)
            d2 = -eta * d
        else:
            capped = eta < 0.5 * math.log(np.finfo(np.float64).max)
            t = np.exp(np.where(capped, eta, 0.5 * math.log(np.finfo(np.float64).max)))
            mu, rest = -np.expm1(-t), np.exp(-t)
            d = np.where(capped, t * rest, 0.0)
            d2 = d * (1.0 - t)
        # mu and 1 - mu are floored separately, as `_mean_and_complement` does.
        mu, in_mu = _positive_numpy(mu)
        rest, in_rest = _positive_numpy(rest)
        a, b = phi * mu, phi * rest
        ga = np.log(y) - special.digamma(a)
        gb = np.log1p(-y) - special.digamma(b)
        f = special.gammaln(phi) - special.gammaln(a) - special.gammaln(b) + (a - 1.0) * np.log(y) + (
            b - 1.0) * np.log1p(-y)
        da, d2a = np.where(in_mu, d, 0.0), np.where(in_mu, d2, 0.0)
        db, d2b = np.where(in_rest, -d, 0.0), np.where(in_rest, -d2, 0.0)
        curvature = (np.where(in_mu, special.polygamma(1, a) * da**2, 0.0)
                     + np.where(in_rest, special.polygamma(1, b) * db**2, 0.0))
        d1 = phi * (ga * da + gb * db)
        d2 = phi * (ga * d2a + gb * d2b) - phi**2 * curvature
        d_phi = special.digamma(phi) + mu * ga + rest * gb
        return f, d1, d2, {"precision": d_phi}

    def _check_response(self, y, trials, name):
        _first_bad(name, y, (y <= 0) | (y >= 1), "is not strictly between 0 and 1 (beta response)")

    def default_params(self, y, trials=None):
        # Method of moments: var = mu (1 - mu) / (1 + phi).
        y = _as_1d(y)
        mu, var = y.mean(), y.var()
        phi = mu * (1.0 - mu) / var - 1.0 if var > 0 else np.inf
        return {"precision": float(np.clip(phi, 0.1, 1e4))}


def _logaddexp(a, b):
    """``log(e^a + e^b)`` elementwise, stable, with finite gradients for finite inputs."""
    big = tf.maximum(a, b)
    return big + tf.math.log1p(tf.exp(-tf.abs(a - b)))


class _ZeroInflated(Family):
    """A count family with a zero-inflation probability ``pi``::

        p(0) = pi + (1 - pi) f(0 | mu),    p(y) = (1 - pi) f(y | mu)  (y > 0)

    with ``f`` the count component (``_count_log_prob``, ``_count_log_zero``) and
    ``log(mu) = eta``. Dispersion parameters must be positive, so ``pi`` is
    parameterized by its odds ``zi_odds = pi / (1 - pi)``: ``log(zi_odds)`` is
    glmmTMB's zero-inflation intercept (``ziformula = ~1``, logit scale) and
    ``pi = zi_odds / (1 + zi_odds)``. Log-probabilities use ``log pi =
    -softplus(-log zi_odds)``, ``log(1 - pi) = -softplus(log zi_odds)`` and a
    log-sum-exp for zeros, so neither ``pi`` near 0 or 1 nor ``f(0)`` near 0
    loses precision.

    With covariates (glmmTMB's ``ziformula = ~ x``), ``zi_odds`` is one value per
    row, ``log(zi_odds_i) = x_zi,i' gamma``: every method here takes it broadcast
    against ``eta``, and the engine's numpy kernels return its gradient per row.

    ``mean(eta)`` is the count component's mean ``mu`` (what the link models):
    it cannot see ``zi_odds``. The response mean ``(1 - pi) mu`` is
    :meth:`response_mean`.
    """

    canonical_link = "log"
    valid_links = ("log",)

    @staticmethod
    def _log_pi(params):
        """``(log pi, log(1 - pi))`` from ``zi_odds``."""
        log_odds = tf.math.log(params["zi_odds"])
        return -tf.nn.softplus(-log_odds), -tf.nn.softplus(log_odds)

    def _count_distribution(self, eta, params):
        raise NotImplementedError

    def _count_log_prob(self, y, eta, params):
        raise NotImplementedError

    def _count_log_zero(self, eta, params):
        raise NotImplementedError

    def _distribution(self, eta, params, trials):
        odds = params["zi_odds"]
        pi = odds / (1.0 + odds) * tf.ones_like(eta)
        return tfd.Inflated(self._count_distribution(eta, params), inflated_loc_probs=pi)

    def _log_prob(self, y, eta, params, trials):
        log_pi, log_rest = self._log_pi(params)
        zero = _logaddexp(log_pi + tf.zeros_like(eta), log_rest + self._count_log_zero(eta, params))
        positive = log_rest + self._count_log_prob(y, eta, params)
        # Both branches are finite everywhere, so tf.where passes clean gradients.
        return tf.where(y > 0, positive, zero)

    def _numpy_count(self, y, eta, params):
        """The count component's ``(log f(y), d/deta, d2/deta2, {param: d/dparam})`` in numpy.

        At ``y = 0`` it is ``log f(0)`` and its derivatives: one evaluation serves both branches.
        """
        raise NotImplementedError

    def _numpy_log_prob(self, y, eta, params, trials):
        odds = params["zi_odds"]  # a number, or one per row (broadcast against `eta`)
        log_odds = np.log(odds)
        log_pi, log_rest = -np.logaddexp(0.0, -log_odds), -np.logaddexp(0.0, log_odds)
        pi = np.exp(log_pi)
        f, d1, d2, dp = self._numpy_count(y, eta, params)  # at y = 0: log f(0) and its derivatives
        zero = np.logaddexp(log_pi, log_rest + f)
        s = np.exp(log_rest + f - zero)         # P(count component | y = 0)
        not_s = np.exp(log_pi - zero)           # P(structural zero | y = 0) = 1 - s
        is_zero = y == 0
        out_f = np.where(is_zero, zero, log_rest + f)
        out_d1 = np.where(is_zero, s * d1, d1)
        out_d2 = np.where(is_zero, s * d2 + s * not_s * d1**2, d2)
        grads = {k: np.where(is_zero, s * g, g) for k, g in dp.items()}
        # d/d log(odds): log pi' = 1 - pi, log(1 - pi)' = -pi.
        grads["zi_odds"] = np.where(is_zero, not_s * (1.0 - pi) - s * pi, -pi) / odds
        return out_f, out_d1, out_d2, grads

    def response_mean(self, eta, params):
        """Response mean ``(1 - pi) * mu`` (``mean(eta)`` is ``mu``).

        Args:
          eta: linear predictor.
          params: dict with ``zi_odds`` (and the count component's params).
        """
        eta = _float_tensor(eta)
        odds = tf.cast(tf.convert_to_tensor(params["zi_odds"], dtype_hint=eta.dtype), eta.dtype)
        return self.link.inverse(eta) / (1.0 + odds)

    def _check_response(self, y, trials, name):
        _check_counts(y, name)

    @staticmethod
    def _zero_inflated_poisson_moments(y):
        """``(pi, mu)`` of the ZIP with the data's mean and fraction of zeros.

        ``1 - p0 = (1 - pi)(1 - e^-mu)`` and ``mean = (1 - pi) mu`` give
        ``(1 - e^-mu) / mu = (1 - p0) / mean``, decreasing in ``mu``: bisection.
        ``pi`` is 0 when there are no more zeros than a Poisson's.
        """
        m, p0 = y.mean(), np.mean(y == 0)
        if m <= 0 or p0 <= math.exp(-m):
            return 0.0, max(m, 1e-3)
        target = (1.0 - p0) / m
        lo, hi = m, m / max(1.0 - p0, 1e-12) + 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if -math.expm1(-mid) / mid > target:
                lo = mid
            else:
                hi = mid
        mu = 0.5 * (lo + hi)
        return 1.0 - m / mu, mu


@register_family
class ZeroInflatedPoisson(_ZeroInflated):
    """Zero-inflated Poisson: ``f = Poisson(mu)``, constant zero-inflation ``pi``.

    glmmTMB's ``family = poisson, ziformula = ~1``. See :class:`_ZeroInflated`
    for ``zi_odds``. For ``y > 0`` the expected log-likelihood is closed form
    (``log(1 - pi) + y m - e^{m + v/2} - log y!``); zeros use quadrature.
    """

    name = "zero_inflated_poisson"
    aliases = ("zip",)
    dispersion_params = ("zi_odds",)

    def _count_distribution(self, eta, params):
        return tfd.Poisson(log_rate=eta)

    def _count_log_prob(self, y, eta, params):
        return y * eta - tf.exp(eta) - tf.math.lgamma(y + 1.0)

    def _count_log_zero(self, eta, params):
        return -tf.exp(eta)

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        quadrature = self._quadrature(y, m, v, params, trials, num_points)
        _, log_rest = self._log_pi(params)
        closed = log_rest + y * m - tf.exp(m + 0.5 * v) - tf.math.lgamma(y + 1.0)
        return tf.where(y > 0, closed, quadrature)

    def _numpy_count(self, y, eta, params):
        mu = np.exp(eta)
        return y * eta - mu - special.gammaln(y + 1.0), y - mu, -mu, {}

    def _numpy_quadrature(self, y, m, v, params, trials, num_points):
        value, first, second, d_var, grads = super()._numpy_quadrature(y, m, v, params, trials, num_points)
        if num_points:  # the closed form of `_expected_log_prob` for y > 0
            odds = params["zi_odds"]
            e = np.exp(m + 0.5 * v)
            positive = y > 0
            value = np.where(positive, -np.logaddexp(0.0, np.log(odds)) + y * m - e - special.gammaln(y + 1.0),
                             value)
            first = np.where(positive, y - e, first)
            second = np.where(positive, -e, second)
            d_var = np.where(positive, -0.5 * e, d_var)
            grads = {"zi_odds": np.where(positive, -1.0 / (1.0 + odds), grads["zi_odds"])}
        return value, first, second, d_var, grads

    def default_params(self, y, trials=None):
        # Marginal moments (mean and fraction of zeros): covariates that explain
        # zeros make this pi too large, which the fit then lowers.
        pi, _ = self._zero_inflated_poisson_moments(_as_1d(y))
        pi = float(np.clip(pi, 0.01, 0.9))
        return {"zi_odds": pi / (1.0 - pi)}


@register_family
class ZeroInflatedNegativeBinomial(_ZeroInflated):
    """Zero-inflated NB2: ``f`` as :class:`NegativeBinomial` (``dispersion`` = theta).

    glmmTMB's ``family = nbinom2, ziformula = ~1`` (its ``sigma(fit)`` is theta).
    See :class:`_ZeroInflated` for ``zi_odds``. With ``log(theta / (theta + mu)) =
    -softplus(eta - log theta)`` and ``log(mu / (theta + mu)) = -softplus(log theta - eta)``
    the count log-probabilities are stable for any ``mu / theta``.
    """

    name = "zero_inflated_negative_binomial"
    aliases = ("zinb",)
    dispersion_params = ("dispersion", "zi_odds")

    def _count_distribution(self, eta, params):
        theta = params["dispersion"]
        return tfd.NegativeBinomial(
            total_count=theta, logits=eta - tf.math.log(theta), require_integer_total_count=False)

    def _count_log_prob(self, y, eta, params):
        theta = params["dispersion"]
        log_theta = tf.math.log(theta)
        return (
            tf.math.lgamma(y + theta) - tf.math.lgamma(theta) - tf.math.lgamma(y + 1.0)
            - theta * tf.nn.softplus(eta - log_theta) - y * tf.nn.softplus(log_theta - eta)
        )

    def _count_log_zero(self, eta, params):
        theta = params["dispersion"]
        return -theta * tf.nn.softplus(eta - tf.math.log(theta))

    def _numpy_count(self, y, eta, params):
        theta = params["dispersion"]
        log_theta = math.log(theta)
        x = eta - log_theta
        q = special.expit(x)  # mu / (theta + mu)
        soft = np.logaddexp(0.0, x)
        # softplus(-x) = softplus(x) - x
        f = (special.gammaln(y + theta) - special.gammaln(theta) - special.gammaln(y + 1.0)
             - theta * soft - y * (soft - x))
        d_theta = special.digamma(y + theta) - special.digamma(theta) - soft + q - y * (1.0 - q) / theta
        return f, y - (y + theta) * q, -(y + theta) * q * (1.0 - q), {"dispersion": d_theta}

    def default_params(self, y, trials=None):
        # Marginal mean m, variance s2 and zero fraction p0 against the ZINB's
        # m = (1 - pi) mu, s2 = m (1 + mu (pi + 1/theta)),
        # p0 = pi + (1 - pi) (1 + mu / theta)^-theta: on a grid of mu, pi and
        # 1/theta follow from the first two; keep the mu that matches p0.
        y = _as_1d(y)
        m, s2, p0 = y.mean(), y.var(), np.mean(y == 0)
        pi, theta = 0.01, 1e3
        if m > 0:
            mu = m * np.geomspace(1.0 + 1e-6, 1e3, 2000)
            pis = 1.0 - m / mu
            inv_theta = (s2 / m - 1.0) / mu - pis
            valid = inv_theta > 0
            if valid.any():
                mu, pis, inv_theta = mu[valid], pis[valid], inv_theta[valid]
                zeros = pis + (1.0 - pis) * np.exp(-np.log1p(mu * inv_theta) / inv_theta)
                best = int(np.argmin(np.abs(zeros - p0)))
                pi, theta = pis[best], 1.0 / inv_theta[best]
        pi = float(np.clip(pi, 0.01, 0.9))
        return {"dispersion": float(np.clip(theta, 0.1, 1e3)), "zi_odds": pi / (1.0 - pi)}


# Cumulative-link models stand the intercept in for the first threshold: beyond
# these distances a cumulative probability is 0 or 1 in float32 and float64 alike.
_ORDINAL_BEYOND = 1e6


@register_family
class Ordinal(Family):
    """Ordered categorical response, a cumulative link model (`ordinal::clmm`'s)::

        P(y <= k | eta) = F(theta_k - eta),   k = 1, ..., K - 1,   theta_1 < ... < theta_{K-1}

    with ``F`` the logistic (``link="logit"``, the proportional-odds model) or the
    standard normal cdf (``link="probit"``), and ``eta = x' beta + z' b`` without an
    intercept: the thresholds ``theta_k`` replace it. The response is coded
    ``1, ..., K`` (``levels`` are the categories' labels, in order).

    Parameterization. The fixed part keeps the formula's intercept ``a`` (so the
    engine, the GLM start and the Keras layers see an ordinary linear predictor
    ``eta* = a + x' beta + z' b``) and the cut points are measured from it::

        c_1 = 0,   c_k = gap_2 + ... + gap_k,   P(y <= k) = F(c_k - eta*)

    The gaps ``gap_k = theta_k - theta_{k-1} > 0`` (``k = 2, ..., K-1``) are the
    family's dispersion parameters (learned on the log scale, so the thresholds stay
    ordered), and clmm's thresholds are ``theta_k = c_k - a`` (`thresholds`). This is
    the same model and likelihood, reparameterized one to one.

    ``log p(y = k) = log(F(u) - F(l))`` with ``u = c_k - eta*``, ``l = c_{k-1} - eta*``
    (``u = +inf`` for ``k = K``, ``l = -inf`` for ``k = 1``), computed as
    ``log F(u) + log(1 - F(l) / F(u))`` below the middle of the interval and from
    the survival function above it (``F(-x) = 1 - F(x)`` for both links), so that
    neither tail loses precision. The expected log-likelihood under a Gaussian
    ``eta*`` has no closed form: Gauss-Hermite quadrature. Both ``F`` are
    log-concave, so ``log p`` is concave in ``eta*`` (the engine's Newton steps).

    Build one with the categories: ``Ordinal("logit", levels=["1", ..., "5"])``;
    `kg.glmm` does it from the response (`for_design`). ``get_family("ordinal")``
    without levels knows no thresholds yet.
    """

    name = "ordinal"
    aliases = ("cumulative", "clmm")
    canonical_link = "logit"
    valid_links = ("logit", "probit")
    quadrature_points = 20

    def __init__(self, link=None, levels=None):
        super().__init__(link)
        self.levels = None if levels is None else [str(v) for v in levels]
        if self.levels is not None and len(self.levels) < 2:
            raise ValueError(f"An ordinal response needs at least 2 categories. Received: levels={self.levels}")
        self.dispersion_params = tuple(f"gap_{k}" for k in range(2, self.num_categories))

    @property
    def num_categories(self):
        """``K``, the number of categories (0 while the levels are unknown)."""
        return 0 if self.levels is None else len(self.levels)

    def threshold_names(self):
        """clmm's names of the thresholds: ``"1|2"``, ``"2|3"``, ..."""
        self._require_levels()
        return [f"{a}|{b}" for a, b in zip(self.levels[:-1], self.levels[1:])]

    def cut_points(self, params):
        """``(c_1, ..., c_{K-1})`` from the gaps (numpy): ``c_1 = 0``, ``c_k = c_{k-1} + gap_k``."""
        self._require_levels()
        gaps = [float(params[name]) for name in self.dispersion_params]
        return np.concatenate([[0.0], np.cumsum(gaps)])

    def thresholds(self, params, intercept):
        """clmm's thresholds ``theta_k = c_k - a`` as a pandas-ready ``{name: value}`` dict."""
        return dict(zip(self.threshold_names(), self.cut_points(params) - float(intercept)))

    def for_design(self, design):
        """This family with the categories of `design`'s response (`kg.glmm` calls it).

        Raises:
            ValueError: if the fixed part has no intercept, which the first threshold
                replaces (see the class docstring).
        """
        if "(Intercept)" not in list(design.fixed_columns):
            raise ValueError(
                f"The ordinal family needs the formula's intercept: the thresholds take its place "
                f"(clmm's model has none; '{design.spec.formula}' removes it). Keep the intercept; "
                "`fixef(component='thresholds')` reports the thresholds.")
        return type(self)(self.link, levels=design.response_levels)

    def get_config(self):
        return {"name": self.name, "link": self.link.name, "levels": self.levels}

    @classmethod
    def from_config(cls, config):
        return cls(config.get("link"), levels=config.get("levels"))

    def __eq__(self, other):
        return super().__eq__(other) and self.levels == other.levels

    def __hash__(self):
        return hash((type(self), self.link.name, None if self.levels is None else tuple(self.levels)))

    def __repr__(self):
        return f"Ordinal(link={self.link.name!r}, levels={self.levels!r})"

    def _require_levels(self):
        if self.levels is None:
            raise ValueError("The ordinal family does not know its categories yet: build it as "
                             "Ordinal(link, levels=[...]) or fit it with kg.glmm, which reads them from the response.")

    # -- TensorFlow ---------------------------------------------------------

    def _tf_log_cdf(self, x):
        if self.link.name == "logit":
            return tf.math.log_sigmoid(x)
        return _std_normal(x.dtype).log_cdf(x)

    def _bounds(self, y, eta, params, ops):
        """``(u, l)``: the category's upper and lower cut point minus ``eta``."""
        # c_y = sum_{j <= y} gap_j and c_{y-1} = sum_{j <= y-1} gap_j (c_1 = 0).
        indicator = (lambda c: tf.cast(c, eta.dtype)) if ops is tf else (lambda c: c)
        where = tf.where if ops is tf else np.where
        upper = lower = 0.0
        for j, name in enumerate(self.dispersion_params, start=2):
            upper = upper + params[name] * indicator(y >= j)
            lower = lower + params[name] * indicator(y - 1 >= j)
        beyond = _ORDINAL_BEYOND * ops.ones_like(eta)
        return where(y >= self.num_categories, beyond, upper - eta), where(y <= 1, -beyond, lower - eta)

    def _log_prob(self, y, eta, params, trials):
        self._require_levels()
        y = y + tf.zeros_like(eta)
        params = {k: v + tf.zeros_like(eta) for k, v in params.items()}
        u, l = self._bounds(y, eta, params, tf)
        log_f_u, log_f_l = self._tf_log_cdf(u), self._tf_log_cdf(l)
        log_s_u, log_s_l = self._tf_log_cdf(-u), self._tf_log_cdf(-l)
        below = log_f_u + _tf_log1mexp(log_f_l - log_f_u)
        above = log_s_l + _tf_log1mexp(log_s_u - log_s_l)
        return tf.where(u + l > 0.0, above, below)

    def _distribution(self, eta, params, trials):
        self._require_levels()
        cuts = [tf.zeros_like(eta)]
        for name in self.dispersion_params:
            cuts.append(cuts[-1] + params[name])
        cdf = [self._tf_cdf(c - eta) for c in cuts] + [tf.ones_like(eta)]
        probs = tf.stack([cdf[0]] + [b - a for a, b in zip(cdf[:-1], cdf[1:])], axis=-1)
        outcomes = tf.range(1, self.num_categories + 1, dtype=eta.dtype)
        return tfd.FiniteDiscrete(outcomes, probs=tf.maximum(probs, 0.0))

    def _tf_cdf(self, x):
        return tf.sigmoid(x) if self.link.name == "logit" else _std_normal(x.dtype).cdf(x)

    def response_mean(self, eta, params):
        """The expected category number ``E[y] = 1 + sum_k P(y > k) = 1 + sum_k F(eta* - c_k)``.

        `category_probabilities` gives the whole distribution.
        """
        self._require_levels()
        eta = _float_tensor(eta)
        total, cut = tf.ones_like(eta), tf.zeros_like(eta)
        for k in range(self.num_categories - 1):
            if k:
                cut = cut + tf.cast(tf.convert_to_tensor(params[f"gap_{k + 1}"], dtype_hint=eta.dtype), eta.dtype)
            total = total + self._tf_cdf(eta - cut)
        return total

    def mean(self, eta, trials=None):
        raise ValueError("The ordinal family's mean needs its thresholds: use response_mean(eta, params) or "
                         "category_probabilities(eta, params).")

    # -- numpy ----------------------------------------------------------------

    def category_probabilities(self, eta, params):
        """``P(y = k | eta*)`` for every row and category, ``(n, K)`` (numpy)."""
        eta = np.asarray(eta, np.float64).reshape(-1)
        cuts = self.cut_points(params)
        if self.link.name == "logit":
            cdf = special.expit(cuts[None, :] - eta[:, None])
        else:
            cdf = special.ndtr(cuts[None, :] - eta[:, None])
        cdf = np.concatenate([np.zeros((len(eta), 1)), cdf, np.ones((len(eta), 1))], axis=1)
        return np.diff(cdf, axis=1)

    def _numpy_log_cdf(self, x):
        return -np.logaddexp(0.0, -x) if self.link.name == "logit" else special.log_ndtr(x)

    def _numpy_log_density_and_slope(self, x):
        """``log F'(x)`` and ``F''(x) / F'(x)``."""
        if self.link.name == "logit":
            return self._numpy_log_cdf(x) + self._numpy_log_cdf(-x), np.tanh(-0.5 * x)
        return -0.5 * x**2 - 0.5 * math.log(2.0 * math.pi), -x

    def _numpy_log_prob(self, y, eta, params, trials):
        self._require_levels()
        u, l = self._bounds(y, eta, params, np)
        log_f_u, log_f_l = self._numpy_log_cdf(u), self._numpy_log_cdf(l)
        log_s_u, log_s_l = self._numpy_log_cdf(-u), self._numpy_log_cdf(-l)
        f = np.where(u + l > 0.0, log_s_l + _np_log1mexp(log_s_u - log_s_l),
                     log_f_u + _np_log1mexp(log_f_l - log_f_u))
        # r = F'(.) / P(y = k): the scores in the upper and the lower cut point.
        log_d_u, slope_u = self._numpy_log_density_and_slope(u)
        log_d_l, slope_l = self._numpy_log_density_and_slope(l)
        r_u, r_l = np.exp(log_d_u - f), np.exp(log_d_l - f)
        d1 = r_l - r_u
        d2 = r_u * slope_u - r_l * slope_l - d1**2
        grads = {name: (y >= j) * r_u - (y - 1 >= j) * r_l
                 for j, name in enumerate(self.dispersion_params, start=2)}
        return f, d1, d2, grads

    def _check_response(self, y, trials, name):
        self._require_levels()
        _first_bad(name, y, (y < 1) | (y > self.num_categories) | (y != np.round(y)),
                   f"is not a category code 1..{self.num_categories} (ordinal response)")

    def default_params(self, y, trials=None):
        # The marginal cumulative proportions: c_k - c_1 = F^-1(P(y <= k)) - F^-1(P(y <= 1)).
        self._require_levels()
        y = _as_1d(y)
        share = np.array([np.mean(y <= k) for k in range(1, self.num_categories)])
        share = np.clip(share, 1e-3, 1.0 - 1e-3)
        cuts = special.logit(share) if self.link.name == "logit" else special.ndtri(share)
        gaps = np.maximum(np.diff(cuts), 0.1)
        return {name: float(g) for name, g in zip(self.dispersion_params, gaps)}


def _tf_log1mexp(a):
    """``log(1 - e^a)`` for ``a < 0`` (Maechler's two branches); ``a`` is held below
    ``-sqrt(tiny)`` so that neither branch, nor its gradient, is infinite."""
    a = tf.minimum(a, -math.sqrt(np.finfo(a.dtype.as_numpy_dtype).tiny))
    near = a > -math.log(2.0)
    return tf.where(near, tf.math.log(-tf.math.expm1(tf.where(near, a, -tf.ones_like(a)))),
                    tf.math.log1p(-tf.exp(tf.where(near, -tf.ones_like(a), a))))


def _np_log1mexp(a):
    """`_tf_log1mexp` in numpy."""
    a = np.minimum(a, -math.sqrt(np.finfo(np.float64).tiny))
    return np.where(a > -math.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


# R's spelling of a family with its link, as a string: `binomial(link = "probit")`,
# `poisson(link='log')`, `Gamma("inverse")`, `gaussian()`.
_R_FAMILY_CALL = re.compile(
    r"""^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\(\s*(?:(?:link\s*=\s*)?(["']?)([A-Za-z0-9_.]+)\2\s*)?\)\s*$""")


def _r_family_call(name, link):
    """`("binomial", "probit")` from R's `'binomial(link="probit")'`; other names pass unchanged.

    A link given both in the string and as `link=` must be the same link.
    """
    if not isinstance(name, str):
        return name, link
    match = _R_FAMILY_CALL.match(name)
    if match is None:
        return name, link
    family, written = match.group(1), match.group(3)
    if written is not None and link is not None and str(getattr(link, "name", link)).lower() != written.lower():
        raise ValueError(
            f"Family {name!r} names the link {written!r} but `link` is {getattr(link, 'name', link)!r}: "
            "give the link once.")
    return family, link if written is None else written


def get_family(name_or_family, link=None):
    """Returns a :class:`Family` instance.

    Args:
      name_or_family: registered name or alias (case-insensitive; ``"normal"``
        -> gaussian, ``"negbin"`` / ``"nb"`` -> negative_binomial, ``"negative_binomial1"``
        -> nbinom1,
        ``"bernoulli"`` -> binomial, ``"zip"`` -> zero_inflated_poisson,
        ``"zinb"`` -> zero_inflated_negative_binomial, ``"cumulative_logit"`` and
        ``"cumulative_probit"`` -> ordinal with that link), R's call of a family
        as a string (``'binomial(link = "probit")'``, ``"poisson(link='log')"``,
        ``'Gamma("inverse")'``, ``"gaussian()"``: the family and its link), a
        ``Family`` subclass, or an instance (returned as is when ``link`` is
        None, else rebuilt with ``link``).
      link: link name or ``Link``; None -> the family's canonical link.

    Raises:
      ValueError: unknown family name, or a link invalid for the family.
    """
    if isinstance(name_or_family, Family):
        if link is None:
            return name_or_family
        if isinstance(name_or_family, Ordinal):  # its categories stay
            return Ordinal(link, levels=name_or_family.levels)
        return type(name_or_family)(link)
    if isinstance(name_or_family, type) and issubclass(name_or_family, Family):
        return name_or_family(link)
    name_or_family, link = _r_family_call(name_or_family, link)
    key = str(name_or_family).strip().lower()
    if key in _NAMED_LINKS:  # a family and its link in one name
        key, named = _NAMED_LINKS[key]
        if link is not None and get_link(link).name != named:
            raise ValueError(f"Family {name_or_family!r} has the {named} link. Received: link={get_link(link).name!r}")
        link = named
    key = _ALIASES.get(key, key)
    if key not in _FAMILIES:
        valid = sorted(_FAMILIES) + sorted(f"{a} (= {n})" for a, n in _ALIASES.items()) + sorted(
            f"{a} (= {n}, link {k})" for a, (n, k) in _NAMED_LINKS.items())
        raise ValueError(f"Unknown family {name_or_family!r}; valid families are: {', '.join(valid)}.")
    return _FAMILIES[key](link)
