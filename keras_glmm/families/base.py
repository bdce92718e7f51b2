"""The :class:`Family` interface, its registry, and what every family shares.

A family writes its maths once:

* ``_log_likelihood(ops, y, eta, params, trials)``: ``log p(y | eta)`` over an
  array namespace (:mod:`keras_glmm.families.array_ops`): TensorFlow for the
  Keras head and losses (which differentiate it by autodiff), numpy for the
  inference engine;
* ``_expected_closed_form(ops, ...)``: ``E_q[log p]`` where it has a closed form;
* ``_derivatives`` and ``_expected_derivatives``: the engine's analytic first
  and second derivatives in ``eta`` (and in the variance, and in the
  dispersion parameters), numpy only; a test checks them against autodiff.

Public methods convert dtypes and validate once and delegate to these (TFP's
convention of a public method and a private one that only does the maths).
"""

import re

import numpy as np
import tensorflow as tf

from keras_glmm import gauss_hermite
from keras_glmm.families.array_ops import NUMPY, TENSORFLOW, constant, float_tensor
from keras_glmm.families.autodiff import derivatives_function
from keras_glmm.families.links import get_link

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

    Subclasses implement ``_log_likelihood`` (or, TensorFlow only, a
    ``_distribution``), and optionally ``_expected_closed_form``, the engine's
    analytic ``_derivatives`` / ``_expected_derivatives``, ``_check_response`` and
    ``default_params``; the public methods convert dtypes once and delegate.
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

    def with_link(self, link):
        """This family under another link (what it took from the data stays)."""
        return type(self)(link)

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
        return self._log_likelihood(TENSORFLOW, y, eta, params, trials)

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
        rule, of the same ``_log_likelihood``), with the family's analytic
        derivatives (``_derivatives``) where it has them, else by a TensorFlow
        function traced once per family, link and quadrature size
        (:mod:`keras_glmm.families.autodiff`).

        A parameter may also vary by row, an ``(rows,)`` array (a zero-inflation
        probability with covariates, ``logit(pi_i) = x_zi,i' gamma``): families with
        analytic derivatives take it, and its gradient is then per row,
        ``w_i d E[f_i] / d param_i``, which the engine maps to ``gamma`` by the chain rule.

        Returns:
          ``(value, d_mean, d2_mean, d_var, params_gradient)``: four ``(rows,)``
          arrays (unweighted) and a dict: for each scalar parameter a float, the
          gradient of the rows' weighted sum (`weighted_expected_log_prob`, whose
          value is ``w * value`` plus the family's ``_weight_terms``); for each
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
                f"Family {self.name!r} takes parameters per row ({sorted(per_row)}) only with analytic "
                "derivatives (`_derivatives`), which it does not have.")
        names = tuple(sorted(params))
        function = derivatives_function(self, num_points, names, trials is not None)
        as_vector = lambda a: tf.constant(np.broadcast_to(np.asarray(a, np.float64), (n,)))  # noqa: E731
        ones = np.ones(n)
        value, first, second, d_var, grads = function(
            as_vector(y), as_vector(m), as_vector(v),
            as_vector(ones if trials is None else trials), as_vector(weights),
            *[tf.constant(params[k], tf.float64) for k in names],
        )
        grads = {k: float(g) for k, g in zip(names, grads)}
        return value.numpy(), first.numpy(), second.numpy(), d_var.numpy(), grads

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
        with ``ops`` (``numpy`` or ``tf``, the modules or their
        :class:`~keras_glmm.families.array_ops.ArrayOps`). Likelihood weights: nothing.
        """
        return None

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
        return self.link.inverse(float_tensor(eta))

    # -- the maths, written once over an array namespace --------------------

    def _log_likelihood(self, ops, y, eta, params, trials):
        """``log p(y | eta)`` elementwise, over ``ops``.

        By default (a family defined only by its distribution) TensorFlow's
        ``_distribution(...).log_prob(y)``, which has no numpy form.
        """
        if ops is TENSORFLOW:
            return self._distribution(eta, params, trials).log_prob(y)
        raise NotImplementedError(f"Family {self.name!r} has no log-likelihood over {ops.name}.")

    def _expected_closed_form(self, ops, y, m, v, params, trials):
        """``E_{eta ~ N(m, v)}[log p(y | eta)]`` in closed form over ``ops``, or None (quadrature)."""
        return None

    def _distribution(self, eta, params, trials):
        raise NotImplementedError

    # -- TensorFlow paths ---------------------------------------------------

    def _expected_log_prob(self, y, m, v, params, trials, num_points):
        closed = self._expected_closed_form(TENSORFLOW, y, m, v, params, trials)
        return self._quadrature(y, m, v, params, trials, num_points) if closed is None else closed

    def _quadrature(self, y, m, v, params, trials, num_points):
        """Generic Gauss-Hermite path shared by every family (see public doc)."""
        nodes, weights, _, _ = quadrature_nodes(TENSORFLOW, m, v, num_points)
        expand = lambda t: None if t is None else t[..., None]  # noqa: E731
        params = {k: expand(p) for k, p in params.items()}
        log_p = self._log_likelihood(TENSORFLOW, y[..., None], nodes, params, expand(trials))
        return tf.reduce_sum(log_p * weights, axis=-1)

    def _prepare(self, eta, params, trials):
        eta = float_tensor(eta)
        params = dict(params or {})
        missing = [p for p in self.dispersion_params if p not in params]
        if missing:
            raise ValueError(f"Family {self.name!r} needs params {missing}; got {sorted(params)}.")
        params = {k: constant(params[k], eta.dtype) for k in self.dispersion_params}
        if trials is not None:
            trials = constant(trials, eta.dtype)
        return eta, params, trials

    # -- the engine's numpy kernels -----------------------------------------

    def _derivatives(self, y, eta, params, trials, value):
        """``(df/deta, d2f/deta2, {param: df/dparam})`` of ``f = _log_likelihood`` (numpy).

        ``value`` is ``f`` itself, for derivatives that are ratios to the
        likelihood (a mixture's, an interval probability's). Families that define
        it give the engine derivatives without TensorFlow (tests compare them with
        autodiff of the TensorFlow log-likelihood).
        """
        raise NotImplementedError

    def _expected_derivatives(self, y, m, v, params, trials):
        """``(d/dm, d2/dm2, d/dv, {param: d/dparam})`` of `_expected_closed_form` (numpy), or None."""
        return None

    def _has_numpy_kernel(self):
        return type(self)._derivatives is not Family._derivatives

    def _numpy_log_prob(self, y, eta, params, trials):
        """``log p`` and its derivatives in numpy: ``(f, df/deta, d2f/deta2, {param: df/dparam})``."""
        value = self._log_likelihood(NUMPY, y, eta, params, trials)
        return (value, *self._derivatives(y, eta, params, trials, value))

    def _numpy_expected(self, y, m, v, params, trials):
        """The closed form of `_expected_log_prob` and its derivatives in numpy, where it has one (else None)."""
        derivatives = self._expected_derivatives(y, m, v, params, trials)
        if derivatives is None:
            return None
        return (self._expected_closed_form(NUMPY, y, m, v, params, trials), *derivatives)

    def _numpy_quadrature(self, y, m, v, params, trials, num_points):
        """`_quadrature` of the numpy kernel, with its exact derivatives in `m` and `v`."""
        if num_points == 0:
            f, d1, d2, dp = self._numpy_log_prob(y, m, params, trials)
            return f, d1, d2, 0.5 * d2, dp
        nodes, w, sd, x = quadrature_nodes(NUMPY, m, v, num_points)
        node_params = {k: p[:, None] if np.ndim(p) else p for k, p in params.items()}  # per-row ones
        f, d1, d2, dp = self._numpy_log_prob(
            y[:, None], nodes, node_params, None if trials is None else trials[:, None])
        value, first, second = f @ w, d1 @ w, d2 @ w
        # d/dv of sum_k w_k f(m + sqrt(v) x_k) = sum_k w_k f'(.) x_k / (2 sqrt(v)); at
        # v = 0 its limit, E[f''] / 2.
        positive = sd > 0
        d_var = np.where(positive, ((d1 * x) @ w) / (2.0 * np.where(positive, sd, 1.0)), 0.5 * second)
        return value, first, second, d_var, {k: g @ w for k, g in dp.items()}

    # -- numpy-side helpers ---------------------------------------------

    def check_response(self, y, trials=None, name="y"):
        """Validates the response before training (numpy).

        Raises:
          ValueError: naming ``name``, the first offending row and its value,
            for NaN / inf anywhere or a value outside the family's support.
        """
        y = as_1d(y)
        first_bad(name, y, ~np.isfinite(y), "is not finite")
        self._check_response(y, None if trials is None else as_1d(trials), name)

    def _check_response(self, y, trials, name):
        pass

    def default_params(self, y, trials=None):
        """Initial values for the dispersion params from the marginal response.

        These ignore covariates (marginal moments), so they are rough
        starting values only. Returns ``{}`` for families without params.
        """
        return {}


def quadrature_nodes(ops, m, v, num_points):
    """Gauss-Hermite nodes ``m + sd x_k`` for ``eta ~ N(m, v)``: ``(nodes, weights, sd, x)``.

    ``nodes`` has a last axis of ``num_points``; ``weights`` sum to one. The sd is
    taken as ``sqrt`` of positive ``v`` only and 0 elsewhere: ``sqrt'(0)`` is
    infinite and ``0 * inf = NaN`` would poison TensorFlow's gradients, and
    ``v == 0`` then reproduces ``log_prob`` exactly.
    """
    x, weights = gauss_hermite.rule(num_points)
    x, weights = ops.cast(x, m), ops.cast(weights, m)
    positive = v > 0
    sd = ops.where(positive, ops.sqrt(ops.where(positive, v, ops.ones_like(v))), ops.zeros_like(v))
    return m[..., None] + sd[..., None] * x, weights, sd, x


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


def floored_mean(mu):
    """A numpy mean floored as ``ArrayOps.positive``, and where it is above the floor.

    The log-likelihood's derivatives in ``eta`` vanish below the floor (the
    value is held there).
    """
    return NUMPY.positive(mu), mu > NUMPY.positive_floor(mu)


def as_1d(a):
    """``a`` as a flat float64 array."""
    return np.asarray(a, dtype=np.float64).reshape(-1)


def first_bad(name, values, bad, what):
    """Raises ValueError on the first row where ``bad`` holds."""
    bad = np.asarray(bad)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: row {i} has value {values[i].item()!r}, which {what}.")


def check_counts(y, name):
    """Raises ValueError on the first negative or fractional count."""
    first_bad(name, y, y < 0, "is negative (counts must be >= 0)")
    first_bad(name, y, y != np.round(y), "is not an integer (counts must be integers)")


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
        None, else rebuilt with ``link``: ``Family.with_link``).
      link: link name or ``Link``; None -> the family's canonical link.

    Raises:
      ValueError: unknown family name, or a link invalid for the family.
    """
    if isinstance(name_or_family, Family):
        return name_or_family if link is None else name_or_family.with_link(link)
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
