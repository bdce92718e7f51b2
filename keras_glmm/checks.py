"""lme4's guard rails: the checks a model's data pass before a fit, and what each does.

lme4 checks a model's data before fitting it (``lmerControl()`` / ``glmerControl()``,
their ``check.*`` options) and so does keras_glmm, with lme4's defaults and lme4's
words. ``checks=`` on ``kg.glmm`` / ``GLMM.from_formula`` sets what each does: a dict
of a key below to ``"stop"`` (an error), ``"warning"`` or ``"ignore"``.

| key | lme4's | what is checked | default |
|---|---|---|---|
| ``"nlev_gtr_1"`` | ``check.nlev.gtr.1`` | every grouping factor has more than one level | ``"stop"`` |
| ``"nobs_vs_nlev"`` | ``check.nobs.vs.nlev`` | a grouping factor has fewer levels than there are observations (gaussian identity, lmer's rule); no more levels than observations (other families, glmer's: an observation-level random effect is allowed) | ``"stop"`` |
| ``"nobs_vs_nre"`` | ``check.nobs.vs.nRE`` | per term, more observations than random effects (levels x effects; lmer), at least as many (glmer) | ``"stop"`` |
| ``"rank_x"`` | ``check.rankX`` | the fixed design has full column rank, else the aliased columns are dropped (R's pivoting: a column that is a linear combination of earlier ones goes) | ``"warning"`` (drop and say so: lme4's ``"message+drop.cols"``); ``"ignore"`` drops them silently, ``"stop"`` raises |
| ``"response_not_const"`` | ``check.response.not.const`` (glmer's) | the response is not the same in every row (a gaussian identity-link model stops whatever the setting) | ``"stop"`` |
| ``"collinear_x"`` | (none) | the condition number of the column-scaled fixed design is below ``COLLINEAR_CONDITION`` | ``"warning"`` |
| ``"separation"`` | (R's ``detectseparation``) | binomial: no complete or quasi-complete separation by the fixed design | ``"warning"`` |

The two checks lme4 lacks say what lme4 leaves to the reader: a near-copy of a
column gives coefficients of +-165,716 whose standard errors say nothing useful,
and a separated binomial response gives a slope of 61.5 with a standard error of
1.7e6, where the maximum-likelihood estimate is infinite.

For a gaussian model lme4's ``lmer`` has no response check: its fit of a constant
response ends at a residual sd of 1.8e-17 with convergence warnings, whose
likelihood is unbounded; keras_glmm stops as ``glmer`` does.

Where: the design's checks (rank, collinearity, one level) in
``Design.from_data``; those that need every row of the fit (the counts, the
response, separation) in :func:`check_fit_data`, on the arrays of a data frame.
For files (`keras_glmm.streaming`) the counts use the scan's row count, the
response and separation are not checked (a sample of a rare outcome may be
constant or separated when the files are not; asking for them with `checks=` is an
error, `ALL_ROW_CHECKS`), and the design's checks run on the scan's sample as
`checks` says.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np

__all__ = [
    "Checks",
    "COLLINEAR_CONDITION",
    "RANK_TOLERANCE",
    "SEPARATION_MAX_ROWS",
    "SEPARATION_SCREEN_ROWS",
    "largest_magnitude",
    "aliased_columns",
    "check_fit_data",
    "check_intercept",
    "check_levels",
    "check_response",
    "collinearity",
    "drop_aliased",
    "r_factor",
    "resolve_checks",
    "separated_columns",
]

ACTIONS = ("ignore", "warning", "stop")
# R's `qr(X, tol = 1e-7)` in lme4's `chkRank.drop.cols`: a column whose residual on
# the columns before it is below this fraction of its norm is aliased.
RANK_TOLERANCE = 1e-7
# A scaled condition number above this: the data hardly tell some combination of the
# columns apart (its standard error inflated about this much over an orthogonal
# design's). The reference data sets' designs have 1 to 14, an uncentred year
# (2000-2020) beside the intercept 690, x, x^2, x^3 of x in 0..100 84; a copy of
# sleepstudy's Days with noise of sd 0.001 (2 * Days + e) has 2.6e4, an uncentred
# year and its square 5.7e5.
COLLINEAR_CONDITION = 1e4
# The separation check solves a linear program with a constraint per distinct row.
SEPARATION_MAX_ROWS = 200_000
# Above this many rows, `separated_columns` first looks for Gordan's certificate on a
# seeded uniform sample of this many rows (the screen; see its docstring).
SEPARATION_SCREEN_ROWS = 200_000
_QR_CHUNK = 1 << 16


@dataclass(frozen=True)
class Checks:
    """What each of lme4's checks does (see the module docstring).

    Attributes:
        lmer: ``True`` for a gaussian identity-link model (lme4's ``lmer`` rules:
            ``nobs_vs_nlev`` and ``nobs_vs_nre`` also refuse equality), ``False``
            for the other families (``glmer``).
    """

    nlev_gtr_1: str = "stop"
    nobs_vs_nlev: str = "stop"
    nobs_vs_nre: str = "stop"
    rank_x: str = "warning"
    response_not_const: str = "stop"
    collinear_x: str = "warning"
    separation: str = "warning"
    lmer: bool = True


_KEYS = tuple(f.name for f in fields(Checks) if f.name != "lmer")
# The checks that need every row of the fit (`check_fit_data`): not run on files.
ALL_ROW_CHECKS = ("response_not_const", "separation")


def resolve_checks(checks=None, family="gaussian") -> Checks:
    """lme4's defaults for ``family``, updated by the user's ``checks``.

    Args:
        checks: ``None``, a :class:`Checks`, or a dict of a key of the module
            docstring's table to ``"stop"``, ``"warning"`` or ``"ignore"``.
        family: a ``keras_glmm.families.Family`` or a family name (a name alone:
            ``"gaussian"`` is taken as the identity link).

    Raises:
        ValueError: an unknown key or action, named with what is accepted.
    """
    if isinstance(checks, Checks):
        return checks
    if hasattr(family, "is_gaussian_identity"):
        lmer = bool(family.is_gaussian_identity)
    else:
        lmer = str(getattr(family, "name", family)).lower() == "gaussian"
    if checks is None:
        return Checks(lmer=lmer)
    if not isinstance(checks, dict):
        raise TypeError(f"`checks` must be a dict such as {{'nobs_vs_nlev': 'ignore'}}. Received: {checks!r}")
    unknown = sorted(str(k) for k in checks if k not in _KEYS)
    if unknown:
        raise ValueError(f"`checks` has unknown key(s) {unknown}; the checks are {list(_KEYS)}")
    for key, action in checks.items():
        if action not in ACTIONS:
            raise ValueError(f"`checks['{key}']` must be one of {list(ACTIONS)}. Received: {action!r}")
    return Checks(lmer=lmer, **checks)


def _act(action: str, message: str, key: str | None) -> None:
    """Raises or warns with ``message`` as ``action`` says; the key (if any) is named for overrides."""
    if action == "stop":
        raise ValueError(f"{message} (checks={{'{key}': 'warning'}} to go on anyway)" if key else message)
    if action == "warning":
        warnings.warn(message, UserWarning, stacklevel=4)


# --------------------------------------------------------------------------
# Grouping factors: lme4's checkNlevels and checkZdims
# --------------------------------------------------------------------------


def check_levels(random_terms, num_rows: int, checks: Checks, counts: bool = True) -> None:
    """lme4's ``check.nlev.gtr.1``, ``check.nobs.vs.nlev`` and ``check.nobs.vs.nRE``.

    Args:
        random_terms: the design's ``RandomTermDesign`` list.
        num_rows: the number of observations (rows; a binomial row with trials
            counts once, as in lme4).
        checks: a :class:`Checks`.
        counts: make the two checks against ``num_rows`` (``False``: only the
            levels', for a design built before the rows of the fit are known).
    """
    factors = {}
    for term in random_terms:
        factors.setdefault(term.term.group, term)
    single = [(g, t) for g, t in factors.items() if t.n_levels < 2]
    if single and checks.nlev_gtr_1 != "ignore":
        shown = "; ".join(f"grouping factor '{g.strip('`')}' has a single level ('{t.levels[0]}')" for g, t in single)
        _act(
            checks.nlev_gtr_1,
            f"grouping factors must have > 1 sampled level: {shown}: a random effect needs at least 2",
            "nlev_gtr_1",
        )
    if not counts:
        return
    if checks.nobs_vs_nlev != "ignore":
        bad = [g for g, t in factors.items() if (t.n_levels >= num_rows if checks.lmer else t.n_levels > num_rows)]
        if bad:
            sizes = ", ".join(f"{g} has {factors[g].n_levels}" for g in bad)
            _act(
                checks.nobs_vs_nlev,
                f"number of levels of each grouping factor must be {'<' if checks.lmer else '<='} number of "
                f"observations (problems: {', '.join(bad)}): {sizes} levels for {num_rows} observations",
                "nobs_vs_nlev",
            )
    if checks.nobs_vs_nre != "ignore":
        for term in random_terms:
            effects = term.n_levels * len(term.columns)
            if num_rows <= effects if checks.lmer else num_rows < effects:
                _act(
                    checks.nobs_vs_nre,
                    f"number of observations (={num_rows}) {'<=' if checks.lmer else '<'} number of random "
                    f"effects (={effects}: {term.n_levels} levels x {len(term.columns)} effects) for term "
                    f"{term.term}; the random-effects parameters"
                    f"{' and the residual variance (or scale parameter)' if checks.lmer else ''} are "
                    "probably unidentifiable",
                    "nobs_vs_nre",
                )


def check_response(y: np.ndarray, name: str, checks: Checks) -> None:
    """lme4's ``check.response.not.const``: the response differs between rows.

    ``y`` is the design's response: ``(n,)``, or ``(n, 2)`` successes and trials
    (a row is then its pair, as lme4's ``cbind`` matrix). A gaussian identity-link
    model always stops: its maximum likelihood is at a residual sd of 0 (lmer ends
    at 1.8e-17 with convergence warnings), where the likelihood is unbounded.
    """
    if len(y) == 0 or (checks.response_not_const == "ignore" and not checks.lmer):
        return
    y = np.asarray(y, np.float64)
    if (y == y[0]).all():
        value = y[0].tolist() if y.ndim == 2 else float(y[0])
        shown = f"[successes, trials] = {value}" if y.ndim == 2 else repr(value)
        message = f"Response is constant: '{name}' is {shown} in all {len(y)} rows"
        if checks.lmer:
            _act("stop", f"{message}: a linear mixed model of it has a residual sd of 0 and an unbounded "
                 "likelihood (lmer ends at sd 1.8e-17 with convergence warnings)", None)
        _act(checks.response_not_const, f"{message} (glmer's check.response.not.const)", "response_not_const")


# --------------------------------------------------------------------------
# The fixed design: rank (lme4's chkRank.drop.cols) and near-collinearity
# --------------------------------------------------------------------------


def r_factor(matrix) -> np.ndarray:
    """The ``p x p`` triangular factor ``R`` of ``matrix = Q R`` (Householder, in
    chunks of rows, so that a tall design, an array or a data frame, is never
    copied whole)."""
    rows = getattr(matrix, "iloc", matrix)
    p = matrix.shape[1]
    r = np.zeros((0, p))
    for start in range(0, max(len(matrix), 1), _QR_CHUNK):
        chunk = np.asarray(rows[start : start + _QR_CHUNK], dtype=np.float64)
        r = np.linalg.qr(np.vstack([r, chunk]), mode="r")
    if r.shape[0] < p:  # fewer rows than columns
        r = np.vstack([r, np.zeros((p - r.shape[0], p))])
    return r


def aliased_columns(r: np.ndarray, names, tol: float = RANK_TOLERANCE):
    """Columns that are linear combinations of earlier ones, as R's pivoted QR finds them.

    R's ``qr(X, tol)`` (LINPACK ``dqrdc2``, what lme4's ``chkRank.drop.cols`` uses)
    takes the columns left to right and moves to the end each one whose residual,
    after projection on the columns kept before it, is at most ``tol`` times its
    norm; the kept columns are ``qr$pivot[1:rank]``. Here the residuals come from
    ``R`` (``X = Q R``): the projections of ``X``'s columns are those of ``R``'s.

    Args:
        r: the triangular factor of the design (:func:`r_factor`).
        names: the design's column names.

    Returns:
        ``(kept, aliased)``: indices of the kept columns, and per aliased column
        ``(index, description)``: ``"'Days2' = 2 * 'Days'"``, or ``"'f' is all zeros"``.
    """
    norms = np.linalg.norm(r, axis=0)
    basis = np.zeros((r.shape[0], 0))
    kept, aliased = [], []
    for j in range(r.shape[1]):
        column = r[:, j]
        if norms[j] == 0.0:
            aliased.append((j, f"'{names[j]}' is all zeros"))
            continue
        residual = column - basis @ (basis.T @ column)
        residual = residual - basis @ (basis.T @ residual)  # twice is enough (Kahan)
        size = float(np.linalg.norm(residual))
        if size <= tol * norms[j]:
            coef = np.linalg.lstsq(r[:, kept], column, rcond=None)[0]
            aliased.append((j, f"'{names[j]}' = {_combination(coef, [names[k] for k in kept])}"))
            continue
        kept.append(j)
        basis = np.column_stack([basis, residual / size])
    return kept, aliased


def _combination(coef, names) -> str:
    """``"2 * 'Days' - 'x'"``: the non-negligible terms of a linear combination."""
    big = max(float(np.max(np.abs(coef))), 1e-300) if len(coef) else 1.0
    out = ""
    for c, name in zip(coef, names, strict=True):
        if abs(c) <= 1e-9 * big:
            continue
        size = "" if abs(abs(c) - 1.0) < 1e-9 else f"{abs(c):.6g} * "
        sign = ("- " if c < 0 else "+ ") if out else ("-" if c < 0 else "")
        out += f"{' ' if out else ''}{sign}{size}'{name}'"
    return out or "0"


def collinearity(r: np.ndarray, names, threshold: float = COLLINEAR_CONDITION):
    """The condition number of the column-scaled design and the columns it involves.

    Each column scaled to unit length (Belsley, Kuh & Welsch's collinearity
    diagnostics), ``kappa = s_max / s_min`` of its singular values: the data tell
    the combination ``v_min' beta`` (the last right singular vector) about
    ``kappa`` times less well than an orthogonal design of the same columns would.

    Returns:
        ``(kappa, involved)``: the condition number and, when it exceeds
        ``threshold``, the names of the columns with weight above 0.1 in ``v_min``,
        largest first (else ``[]``).
    """
    if r.shape[1] < 2:
        return 1.0, []
    norms = np.linalg.norm(r, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    _, s, vt = np.linalg.svd(r / norms, full_matrices=False)
    kappa = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
    if not kappa > threshold:
        return kappa, []
    weights = np.abs(vt[-1])
    order = np.argsort(-weights)
    return kappa, [names[j] for j in order if weights[j] > 0.1]


def largest_magnitude(matrix) -> float:
    """``max |matrix|`` (NaN if any value is NaN) of an array or a data frame, column by
    column from each one's largest and smallest value: no copy of a tall design, where
    ``np.abs`` of it would allocate one."""
    columns = matrix.shape[1] if np.ndim(matrix) == 2 else 1
    if not len(matrix) or not columns:
        return 0.0
    if np.ndim(matrix) < 2:
        matrix = np.asarray(matrix).reshape(-1, 1)
    bounds = []
    for j in range(columns):
        column = np.asarray(matrix.iloc[:, j] if hasattr(matrix, "iloc") else matrix[:, j], np.float64)
        bounds += [np.max(column), np.min(column)]
    return float(np.max(np.abs(bounds)))


def drop_aliased(matrix, names, checks: Checks):
    """lme4's ``check.rankX`` and the collinearity check on the fixed design.

    Returns:
        ``(kept, dropped)``: indices of the columns kept, names of those dropped.

    Raises:
        ValueError: a rank-deficient design under ``rank_x="stop"``.
    """
    names = list(names)
    # No rows, a non-finite value or one whose square overflows (the data checks name
    # its column and row later): a rank found by QR there would be rounding's.
    if len(matrix) == 0 or not largest_magnitude(matrix) <= np.sqrt(np.finfo(np.float64).max):  # NaN fails
        return list(range(len(names))), []
    r = r_factor(matrix)
    if not np.isfinite(r).all():
        return list(range(len(names))), []
    kept, aliased = aliased_columns(r, names)
    if aliased:
        count = len(aliased)
        what = f"{count} column / coefficient" if count == 1 else f"{count} columns / coefficients"
        detail = "; ".join(text for _, text in aliased)
        if checks.rank_x == "stop":
            raise ValueError(
                f"the fixed-effects model matrix is column rank deficient (rank(X) = {len(kept)} < "
                f"{len(names)} = p): {detail}; the fixed effects would be jointly unidentifiable "
                "(checks={'rank_x': 'warning'} drops the aliased columns, as lme4 does)"
            )
        if checks.rank_x == "warning":
            warnings.warn(
                f"fixed-effect model matrix is rank deficient so dropping {what}: "
                f"{', '.join(repr(names[j]) for j, _ in aliased)} ({detail})",
                UserWarning,
                stacklevel=4,
            )
    if checks.collinear_x != "ignore" and len(kept) > 1:
        kappa, involved = collinearity(r_factor(r[:, kept]), [names[j] for j in kept])
        if involved:
            _act(
                checks.collinear_x,
                f"the fixed-effect model matrix is nearly rank deficient: the condition number of its "
                f"columns scaled to unit length is {kappa:.3g} (above {COLLINEAR_CONDITION:.0e}), involving "
                f"{involved}; their estimates and standard errors will be huge and unstable: drop or "
                "combine these columns, or centre and scale them",
                "collinear_x",
            )
    return kept, [names[j] for j, _ in aliased]


# --------------------------------------------------------------------------
# Separation of a binomial response (Albert & Anderson 1984; Konis 2007)
# --------------------------------------------------------------------------


def separated_columns(matrix: np.ndarray, successes: np.ndarray, trials: np.ndarray | None = None,
                      weights: np.ndarray | None = None):
    """The columns whose maximum-likelihood estimates are infinite, by linear programs.

    With ``s_i = +1`` for a row of successes only and ``-1`` for a row of failures
    only, the data are separated (completely or quasi-completely; Albert & Anderson
    1984) when a direction ``d != 0`` has ``s_i x_i' d >= 0`` on those rows and
    ``x_i' d = 0`` on the rows that have both: along ``d`` every row's likelihood
    rises or stays, so the likelihood (and a GLMM's, whose integrand rises with it
    for every value of the random effects) has no maximum. Konis (2007)'s linear
    program finds such a ``d`` (R's ``detectseparation``)::

        max sum_{i not in S} s_i x_i' d   subject to   s_i x_i' d >= 0,  x_j' d = 0 (mixed rows),  -1 <= d <= 1

    and is repeated, each time over the rows not yet made positive, until it
    finds none: ``S`` is then every row some direction makes positive. The
    directions span the null space of the rows outside ``S`` (the cone of
    directions is open in it), and a column's estimate is infinite when that
    space moves it.

    The screen: with more than ``SEPARATION_SCREEN_ROWS`` rows, the certificate of
    non-separation (:func:`_score_certificate`) is first sought on a seeded uniform
    sample of that many rows. Found there, and the sample of full column rank, it
    proves the whole data not separated: a ``d`` meeting the constraints on every
    row meets them on the sample, where ``sum_i w_i s_i x_i' d + sum_j v_j x_j' d = 0``
    with ``w_i > 0`` makes each ``s_i x_i' d`` zero, so ``d`` is orthogonal to the
    sample's rows, hence ``0``. Without it (a rare level's rows all of one outcome
    may leave the sample separated) the check runs on every row, as below. At
    4M rows the screen took 0.15 s where the certificate on every row took 1.4 s
    (and grows with the rows: about 11 s at 32M).

    Args:
        matrix: the fixed design ``(n, p)``, of full column rank.
        successes: ``(n,)`` successes (0/1 for a binary response).
        trials: ``(n,)`` trials, or ``None`` for a binary response.
        weights: prior weights; rows of weight 0 carry no information.

    Returns:
        Indices of the separated columns (``[]`` when the data are not separated),
        or ``None`` when there are more than ``SEPARATION_MAX_ROWS`` distinct rows
        (not checked).
    """
    from scipy import optimize

    num_rows = len(np.asarray(successes).reshape(-1))
    if num_rows > SEPARATION_SCREEN_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(num_rows, SEPARATION_SCREEN_ROWS, replace=False))
        sample = _separation_rows(matrix, successes, trials, weights, rows)
        if sample is not None and np.linalg.matrix_rank(sample[0]) == sample[0].shape[1] and (
                _score_certificate(*sample)):
            return []
    prepared = _separation_rows(matrix, successes, trials, weights)
    if prepared is None:
        return []
    x, s, n, sign = prepared
    if _score_certificate(x, s, n, sign):
        return []
    signed = np.unique(sign[sign != 0, None] * x[sign != 0], axis=0)
    mixed = np.unique(x[sign == 0], axis=0)
    if len(signed) + len(mixed) > SEPARATION_MAX_ROWS:
        return None
    p = x.shape[1]
    strict = np.zeros(len(signed), bool)
    direction = np.zeros(p)
    while len(signed) and not strict.all():
        result = optimize.linprog(
            -signed[~strict].sum(axis=0), A_ub=-signed, b_ub=np.zeros(len(signed)),
            A_eq=mixed if len(mixed) else None, b_eq=np.zeros(len(mixed)) if len(mixed) else None,
            bounds=[(-1.0, 1.0)] * p, method="highs",
        )
        if result.status != 0 or -result.fun <= 1e-9 * len(signed):
            break
        positive = (signed @ result.x > 1e-9) & ~strict
        if not positive.any():
            break
        strict |= positive
        direction += result.x
    if not strict.any():
        return []
    rest = np.vstack([signed[~strict], mixed])
    if len(rest):
        _, sv, vt = np.linalg.svd(rest, full_matrices=True)
        rank = int(np.sum(sv > 1e-9 * sv[0])) if len(sv) and sv[0] > 0 else 0
        null = vt[rank:]
    else:
        null = np.eye(p)
    moved = np.max(np.abs(null), axis=0) > 1e-8 if len(null) else np.zeros(p, bool)
    moved |= np.abs(direction) > 1e-8
    return [int(j) for j in np.flatnonzero(moved)]


def _separation_rows(matrix, successes, trials, weights, rows=None):
    """``(x, s, n, sign)`` of the rows that carry information (of ``rows`` only, if
    given), each column of ``x`` scaled to a largest absolute value of 1, ``sign``
    ``+1``/``-1``/``0`` for rows of successes only, failures only, both; ``None``
    when no row or no column is left."""
    def take(values):
        values = np.asarray(values)
        return values if rows is None else values[rows]

    x = np.asarray(take(matrix), np.float64)
    s = np.asarray(take(successes), np.float64).reshape(-1)
    n = np.ones_like(s) if trials is None else np.asarray(take(trials), np.float64).reshape(-1)
    use = n > 0
    if weights is not None:
        use &= np.asarray(take(weights), np.float64).reshape(-1) > 0
    if not use.all():
        x, s, n = x[use], s[use], n[use]
    if not len(x) or x.shape[1] == 0:
        return None
    scale = np.max(np.abs(x), axis=0)
    x = x / np.where(scale > 0, scale, 1.0)
    sign = np.where(s <= 0, -1.0, np.where(s >= n, 1.0, 0.0))
    return x, s, n, sign


def _score_certificate(x, s, n, sign, iterations=30) -> bool:
    """Whether the logistic regression's score proves the data are not separated.

    Gordan's alternative: no direction separates the data exactly when positive
    weights ``w_i`` (on the rows of one outcome) and any ``v_j`` (on the mixed
    rows) have ``sum_i w_i s_i x_i + sum_j v_j x_j = 0``. At the finite maximum of
    the logistic likelihood the score is such a sum, ``w_i = |y_i - n_i mu_i|``; a
    few Newton steps get near it, and the least-norm correction that zeroes the
    remaining score keeps every ``w_i`` positive unless the data are (nearly)
    separated. ``True`` is a proof; ``False`` leaves the question to the linear
    programs. Costs a few passes over the rows, where a linear program on 200,000
    rows takes seconds.
    """
    beta = np.zeros(x.shape[1])
    for _ in range(iterations):
        eta = np.clip(x @ beta, -30.0, 30.0)
        mu = 1.0 / (1.0 + np.exp(-eta))
        curvature = n * mu * (1.0 - mu)
        try:
            step = np.linalg.solve(x.T @ (curvature[:, None] * x), x.T @ (s - n * mu))
        except np.linalg.LinAlgError:
            return False
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10 * max(1.0, np.max(np.abs(beta))):
            break
    if np.max(np.abs(beta)) > 25.0:
        return False
    residual = s - n / (1.0 + np.exp(-(x @ beta)))
    score = x.T @ residual
    try:  # least-norm rows' change that zeroes the score
        change = -x @ np.linalg.solve(x.T @ x, score)
    except np.linalg.LinAlgError:
        return False
    weight = sign * residual  # positive on the rows of one outcome, at a finite optimum
    corrected = weight + sign * change
    return bool(np.all(corrected[sign != 0] > 0))


def check_fit_data(design, inputs: dict, y: np.ndarray | None, checks: Checks) -> None:
    """The checks of a formula model's arrays before its fit: the number of rows
    against the levels and random effects, a constant response, separation (binomial).

    Args:
        design: the model's ``Design`` (terms, names, family).
        inputs: the design's arrays of every row of the fit (``"x"``, the kept
            fixed columns; ``"weights"``).
        y: the response: ``(n,)``, or ``(n, 2)`` successes and trials; ``None``
            for a one-sided formula.
    """
    check_levels(design.random, len(inputs["x"]), checks)
    if y is None:
        return
    check_response(y, design.spec.response, checks)
    if checks.separation == "ignore" or design.family_name != "binomial":
        return
    y = np.asarray(y, np.float64)
    successes, trials = (y[:, 0], y[:, 1]) if y.ndim == 2 else (y, None)
    columns = separated_columns(inputs["x"], successes, trials, inputs.get("weights"))
    if columns is None:
        # Said, not skipped silently: the linear programs' size grows with the distinct rows.
        warnings.warn(
            f"keras_glmm could not check the binomial response '{design.spec.response}' for separation: "
            f"its fixed design has more than {SEPARATION_MAX_ROWS:,} distinct rows of a single outcome or "
            "both, beyond the check's linear programs; if some fixed effects come out very large with huge "
            "standard errors, look for columns (or levels) that predict the response perfectly "
            "(checks={'separation': 'ignore'} silences this)",
            UserWarning, stacklevel=3)
    elif columns:
        names = [design.fixed_columns[j] for j in columns]
        _act(
            checks.separation,
            f"the fixed effects separate the binomial response '{design.spec.response}' (complete or "
            f"quasi-complete separation): the likelihood rises without bound along a direction that moves "
            f"{names}, so their maximum-likelihood estimates are infinite: a fit ends at large, arbitrary "
            "values with huge standard errors, or fails; drop or merge the columns (or levels) that predict "
            "the response perfectly",
            "separation",
        )


# The intercept check of the array API looks at this many rows (a uniform sample).
INTERCEPT_SAMPLE_ROWS = 10_000


def check_intercept(x, intercept=True, seed=0):
    """Refuses a fixed design `x` without an intercept unless the model says it has none.

    lme4's fixed part has an intercept unless the formula says `0 +` or `- 1`. The
    array API (`GLMM(...)` fitted on `{"x": ...}`) takes `x` as it comes, and an `x`
    without a column of ones left the mean of the response to the random effects:
    with groups of sd 1 around a mean of 1.5 the groups' sd came out 1.59. So with
    `intercept=True` (GLMM's default) the constant must lie in the span of `x`'s
    columns (a column of ones, or a full dummy coding, `0 + f`): the least-squares
    residual of a column of ones on `x`, over a uniform sample of at most
    `INTERCEPT_SAMPLE_ROWS` rows, must vanish (below 1e-6 of its norm).
    `intercept=False` is the user's word that the model has none (lme4's `0 +`).

    Raises:
        ValueError: naming the input and the two ways out.
    """
    if not intercept:
        return
    x = np.asarray(x, "float64")
    if x.ndim == 1:
        x = x[:, None]
    if len(x) > INTERCEPT_SAMPLE_ROWS:
        rows = np.random.default_rng(seed).choice(len(x), INTERCEPT_SAMPLE_ROWS, replace=False)
        x = x[np.sort(rows)]
    ones = np.ones(len(x))
    if len(x) == 0:
        return
    if x.shape[1]:
        scale = np.maximum(np.abs(x).max(axis=0), 1e-300)  # column scaling: lstsq's rank decision
        coef = np.linalg.lstsq(x / scale, ones, rcond=None)[0]
        residual = ones - (x / scale) @ coef
    else:
        residual = ones
    if np.linalg.norm(residual) <= 1e-6 * np.sqrt(len(x)):
        return
    raise ValueError(
        f"Input 'x' ({x.shape[1]} column(s)) has no intercept: no column of ones, and no columns "
        "that add up to a constant (a full dummy coding), so the random effects would take up the "
        "mean of the response and their sds would be overstated. Add a column of ones to x (lme4's "
        "models have an intercept unless the formula says `0 +`), or pass GLMM(..., intercept=False) "
        "for a model without one."
    )
