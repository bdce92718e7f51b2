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

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

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
    "Gamma",
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

    def inverse(self, eta):
        return tf.exp(_float_tensor(eta))

    def __call__(self, mu):
        return tf.math.log(_float_tensor(mu))


@_register_link
class LogitLink(Link):
    """``g(mu) = log(mu / (1 - mu))``, ``g^{-1}(eta) = sigmoid(eta)``."""

    name = "logit"

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

    def inverse(self, eta):
        eta = _float_tensor(eta)
        return _std_normal(eta.dtype).cdf(eta)

    def __call__(self, mu):
        return tf.math.ndtri(_float_tensor(mu))


@_register_link
class CloglogLink(Link):
    """``g(mu) = log(-log(1 - mu))``, ``g^{-1}(eta) = 1 - exp(-exp(eta))``."""

    name = "cloglog"

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
        (`keras_glmm.engine.solver`); they are exact derivatives of
        :meth:`expected_log_prob`, closed form or quadrature alike, traced once
        per family, link and quadrature size.

        Returns:
          ``(value, d_mean, d2_mean, d_var, params_gradient)``: four ``(rows,)``
          arrays (unweighted) and a dict of floats (of the weighted sum).
        """
        params = dict(params or {})
        names = tuple(sorted(params))
        n = np.shape(eta_mean)[0]
        function = _derivatives_function(self, num_points or self.quadrature_points, names,
                                          trials is not None)
        as_vector = lambda a: tf.constant(np.broadcast_to(np.asarray(a, np.float64), (n,)))  # noqa: E731
        ones = np.ones(n)
        value, first, second, d_var, grads = function(
            as_vector(y), as_vector(eta_mean), as_vector(eta_var),
            as_vector(ones if trials is None else trials), as_vector(ones if weights is None else weights),
            *[tf.constant(float(params[k]), tf.float64) for k in names],
        )
        grads = {k: float(g) for k, g in zip(names, grads)}
        return value.numpy(), first.numpy(), second.numpy(), d_var.numpy(), grads

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
        params = {k: tf.cast(params[k], eta.dtype) for k in self.dispersion_params}
        if trials is not None:
            trials = tf.cast(trials, eta.dtype)
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
                    value = family.expected_log_prob(
                        y, m, v, named, trials=trials if with_trials else None, num_points=num_points)
                    total = tf.reduce_sum(value)
                    weighted = tf.reduce_sum(value * weights)
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


def _hermite_rule(num_points, _cache={}):  # noqa: B006 - deliberate memo
    """Probabilists' Gauss-Hermite nodes and weights normalised to sum to 1."""
    if num_points not in _cache:
        x, w = np.polynomial.hermite_e.hermegauss(int(num_points))
        _cache[num_points] = (x, w / w.sum())
    return _cache[num_points]


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
class Gamma(Family):
    """Gamma response with mean ``mu`` and variance ``mu^2 / shape``.

    ``Gamma(concentration=shape, rate=shape / mu)``. Under the identity and
    inverse links the mean is clamped to a tiny positive floor (see
    ``Family._positive``); keep ``eta`` in the valid region.
    """

    name = "gamma"
    canonical_link = "inverse"
    valid_links = ("inverse", "log", "identity")
    dispersion_params = ("shape",)

    def _distribution(self, eta, params, trials):
        shape = params["shape"]
        if self.link.name == "log":
            return tfd.Gamma(concentration=shape, log_rate=tf.math.log(shape) - eta)
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

    def _check_response(self, y, trials, name):
        _first_bad(name, y, y <= 0, "is not strictly positive (gamma response)")

    def default_params(self, y, trials=None):
        y = _as_1d(y)
        var = y.var()
        shape = y.mean() ** 2 / var if var > 0 else np.inf
        return {"shape": float(np.clip(shape, 0.1, 1e3))}


def get_family(name_or_family, link=None):
    """Returns a :class:`Family` instance.

    Args:
      name_or_family: registered name or alias (case-insensitive; ``"normal"``
        -> gaussian, ``"negbin"`` / ``"nb"`` -> negative_binomial,
        ``"bernoulli"`` -> binomial), a ``Family`` subclass, or an instance
        (returned as is when ``link`` is None, else rebuilt with ``link``).
      link: link name or ``Link``; None -> the family's canonical link.

    Raises:
      ValueError: unknown family name, or a link invalid for the family.
    """
    if isinstance(name_or_family, Family):
        return name_or_family if link is None else type(name_or_family)(link)
    if isinstance(name_or_family, type) and issubclass(name_or_family, Family):
        return name_or_family(link)
    key = str(name_or_family).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FAMILIES:
        valid = sorted(_FAMILIES) + sorted(f"{a} (= {n})" for a, n in _ALIASES.items())
        raise ValueError(f"Unknown family {name_or_family!r}; valid families are: {', '.join(valid)}.")
    return _FAMILIES[key](link)
