"""Exact maximum likelihood by adaptive Gauss-Hermite quadrature, from the variational optimum.

For a GLMM with one term, or two nested scalar terms (`keras_glmm.engine.quadrature`),
the fit goes on from the VI optimum to the exact maximum likelihood: the same
quasi-Newton method on the log-likelihood by adaptive Gauss-Hermite quadrature,
centred and scaled at each level's mode, in all parameters `(beta, theta, log
dispersion, gamma)`. VI's estimates are biased for binary data in small clusters
(less than Laplace's, but biased); this removes the bias. Two guards: a cost model
(`ExactLikelihood.plan`: by default the phase runs only where it costs at most
`AGQ_COST_RATIO` times the VI fit and fits `memory_budget`; otherwise the VI answer
stays, and the status says so and how to ask for it), and a check of the rule at
its optimum (`ExactLikelihood.check_nodes`: more nodes until the log-likelihood and
its gradient stop moving; the fit is called exact only then).

With zero-inflation covariates the integrals still factorize: `pi_i` does not
depend on the random effects.
"""

import dataclasses
import math
import time

import numpy as np

from keras_glmm.engine.quadrature import next_points
from keras_glmm.engine.quasi_newton import BoundedBFGS
from keras_glmm.engine.stage import Stage

# Adaptive quadrature's nodes per dimension: with 25 the exact log-likelihoods of
# the reference cases are reproduced to 1e-4 nats or better (40: 1e-9).
AGQ_POINTS = 25
# The exact-ML phase's cost guard and node check (see `ExactLikelihood.plan` and
# `check_nodes`). By default the phase runs where its estimated time is at most
# AGQ_COST_RATIO times the variational fit's, or than the time of AGQ_FREE_NODES
# row-nodes (a few seconds here: a sub-second VI fit makes a ratio meaningless;
# counted in nodes so the rule does not depend on the machine's load), and one
# evaluation's arrays fit `memory_budget` at once; `agq_points=N` runs it whatever
# it costs, in chunks within `memory_budget`.
AGQ_COST_RATIO = 3.0
AGQ_FREE_NODES = 50_000_000
# Evaluations of the log-likelihood the phase takes from the VI optimum (BFGS with
# the VI curvature; the reference cases take 5 to 9 and the check 1 or 2 more), for
# the time estimate.
AGQ_EVALUATIONS = 12
# The node check: the rule is exact when one more rung (`next_points`) moves the
# log-likelihood, and the gain of re-optimizing with the new gradient, by less than
# this (nats); it stops raising nodes beyond AGQ_MAX_NODES per row.
AGQ_TOLERANCE = 1e-3
AGQ_MAX_NODES = 50_000
# The most quadrature nodes that differencing the fixed effects' gradients may
# take for their block of the joint Hessian (about 2 s here); see
# `keras_glmm.engine.covariances`.
HESSIAN_NODES = 10_000_000


@dataclasses.dataclass
class Rung:
    """One step of the node check: a finer rule, and how far it moved the fit."""

    points: list
    loglik_change: float
    reoptimize_gain: float


@dataclasses.dataclass
class QuadratureStatus:
    """What the fit says of the exact-ML phase: whether it ran, its plan, and its check.

    Attributes:
        estimator: the sentence naming the fit's estimator, once it is known.
        exact: whether the answer is an exact (restricted) likelihood's optimum.
        ran: whether the phase ran (None for a gaussian model, which needs none).
        run: the plan's decision; `reason` why not.
        checked: whether the node check has ended; `ladder` its rungs, `checks` its notes.
        points, seconds, evaluations: the rule, time and evaluations of the phase.
        vi_seconds, estimate_seconds, estimate_bytes, allowance_seconds, allowance_nodes:
            the plan's cost model.
    """

    estimator: str = None
    exact: bool = False
    ran: bool = None
    run: bool = False
    reason: str = None
    checked: bool = False
    ladder: list = dataclasses.field(default_factory=list)
    checks: list = dataclasses.field(default_factory=list)
    points: list = None
    seconds: float = None
    evaluations: int = None
    vi_seconds: float = None
    estimate_seconds: float = None
    estimate_bytes: float = None
    allowance_seconds: float = None
    allowance_nodes: float = None


def initial_status(conjugate, reml, agq_points, factorizes):
    """What the fit will say of the exact-ML phase before it is planned."""
    if conjugate:
        what = "REML" if reml else "ML"
        return QuadratureStatus(estimator=f"exact {what} (gaussian, identity link: the posterior is exact)",
                                exact=True)
    if agq_points == 0:
        why = "agq_points=0 stops at the variational fit"
    elif not factorizes:
        why = ("its random effects do not factorize into one term of at most 2 effects or two nested "
               "scalar terms, so no exact ML by adaptive quadrature")
    else:
        why = "the variational fit has not converged yet"
    return QuadratureStatus(estimator=f"Gaussian VI (joint posterior): {why}", exact=False, ran=False)


@dataclasses.dataclass
class ExactPoint:
    """The log-likelihood at one point of `(beta, theta, log dispersion, gamma)`.

    `means` and `covariance` (each level's posterior moments, from the quadrature)
    and the rest are filled in for the accepted point (`ExactLikelihood.accept`).
    """

    vector: np.ndarray
    beta: np.ndarray
    lambdas: list
    dispersion: dict
    value: float
    gradients: dict
    means: list = None
    covariance: dict = None
    eta: np.ndarray = None
    elbo: float = None
    expected_log_likelihood: float = None
    kl: float = None


@dataclasses.dataclass
class QuadratureClock:
    """The phase's measured cost: seconds, row-nodes and evaluations so far."""

    seconds: float = 0.0
    nodes: int = 0
    evaluations: int = 0


class ExactLikelihood(Stage):
    """`-log L` by adaptive quadrature as an objective, its plan and its node check.

    Args:
        algebra: the model's `SphericalAlgebra`.
        parameters: its `Parameters`.
        quadrature: an `AdaptiveQuadrature` of the model.
        fixed_params: dispersion parameters held fixed, by name.
        memory_budget: bytes one evaluation's arrays may take.
        forced: whether `agq_points=N` asked for the phase whatever it costs.
    """

    phase = "quadrature"

    def __init__(self, algebra, parameters, quadrature, fixed_params, memory_budget, forced):
        self.algebra = algebra
        self.parameters = parameters
        self.quadrature = quadrature
        self.fixed_params = fixed_params
        self.memory_budget = memory_budget
        self.forced = forced
        self.num_fixed = algebra.structure.num_fixed
        self.num_leading = self.num_fixed  # the vector starts with `beta`
        self.clock = QuadratureClock()
        self.status = None  # set by `plan`
        self.last = None
        self._began = None
        self._settled = []

    def parameter_names(self):
        return [f"beta[{j}]" for j in range(self.num_fixed)] + list(self.parameters.names)

    def fixed_by_information(self):
        """How many leading coordinates (the fixed effects) the Hessian takes from the
        observed information rather than by differences: 0 where differencing them
        costs at most `HESSIAN_NODES` quadrature nodes."""
        p = self.num_fixed
        return 0 if 2 * p * self.quadrature.nodes_per_evaluation() <= HESSIAN_NODES else p

    def objective(self, vector):
        """`-log L` by adaptive quadrature, and its gradient, at `(beta, theta, log dispersion)`."""
        p = self.num_fixed
        beta, rest = vector[:p], vector[p:]
        lambdas = self.parameters.lambdas(rest)
        dispersion = self.parameters.dispersion(rest)
        params = dict(self.fixed_params)
        params.update(dispersion)
        began = time.perf_counter()
        try:
            value, gradients = self.quadrature.log_likelihood(beta, lambdas, params)
        except np.linalg.LinAlgError:
            return math.inf, np.full(len(vector), np.nan)
        finally:
            # The measured cost per node, for the node check's time estimates.
            self.clock.seconds += time.perf_counter() - began
            self.clock.nodes += self.quadrature.nodes_per_evaluation()
            self.clock.evaluations += 1
        if not np.isfinite(value):
            return math.inf, np.full(len(vector), np.nan)
        log_gradient = {k: gradients["params"].get(k, 0.0) * dispersion[k] for k in dispersion}
        gradient = np.concatenate([gradients["beta"], self.parameters.gradient(gradients["lambdas"], log_gradient)])
        self.last = ExactPoint(vector=vector, beta=beta, lambdas=lambdas, dispersion=dispersion, value=-value,
                               gradients=gradients)
        return -value, -gradient

    def accept(self, vector):
        """The point at `vector` with each level's posterior moments from the quadrature."""
        last = self.evaluated(vector)
        moments = last.gradients["moments"]
        means = [mean for mean, _ in moments]
        expected = last.gradients["expected_log_likelihood"]
        return dataclasses.replace(
            last, means=means, covariance={(b, b): c for b, (_, c) in enumerate(moments)},
            eta=self.algebra.linear_predictor(last.lambdas, means, last.beta), elbo=-last.value,
            expected_log_likelihood=expected, kl=expected + last.value)

    # ------------------------------------------------------------ the plan
    def describe_points(self, points=None):
        quadrature = self.quadrature
        points = quadrature.points if points is None else points
        if quadrature.kind == "single":
            k = quadrature.inner.num_effects
            each = f"{points[0]} nodes" + (f" per dimension ({points[0]}^{k} per level)" if k > 1 else "")
            return f"{each} on '{quadrature.dimensions[0]}'"
        return f"{points[0]} nodes on '{quadrature.dimensions[0]}' x {points[1]} on '{quadrature.dimensions[1]}'"

    def _seconds_per_evaluation(self, point):
        """One evaluation's time at the current rule at `point`, measured on a sample of clusters.

        The modes' Newton steps touch each row once per step (timed over all rows);
        the rule's part, `rows x nodes` entries, is timed on the first clusters up
        to 200,000 entries and scaled to all of them.
        """
        quadrature = self.quadrature
        params = dict(self.fixed_params)
        params.update(point.dispersion)
        chunks = quadrature._chunks
        try:
            quadrature._chunks = []
            quadrature.log_likelihood(point.beta, point.lambdas, params)  # the modes, from cold
            began = time.perf_counter()
            quadrature.log_likelihood(point.beta, point.lambdas, params)  # from warm, as in the fit
            modes = time.perf_counter() - began
            per_row = quadrature.nodes_per_row()
            last = int(np.searchsorted(np.cumsum(quadrature.cluster_rows), max(1, 200_000 // per_row))) + 1
            last = min(last, quadrature.num_clusters)
            sample = quadrature._chunk(0, last)
            quadrature._chunks = [sample]
            began = time.perf_counter()
            quadrature.log_likelihood(point.beta, point.lambdas, params)
            nodes = max(time.perf_counter() - began - modes, 0.0)
        except (np.linalg.LinAlgError, ValueError):
            return math.inf
        finally:
            quadrature._chunks = chunks
            quadrature.modes = None
        return modes + nodes * quadrature.nodes_per_evaluation() / max(len(sample.rows) * per_row, 1)

    def plan(self, point, vi_seconds):
        """Whether the phase runs from the VI optimum `point`: its cost model, and a status saying why.

        Time: `AGQ_EVALUATIONS` evaluations at the measured cost of one, against
        `AGQ_COST_RATIO` times the variational fit's own time (at least the time of
        `AGQ_FREE_NODES` row-nodes). Memory: one evaluation's `rows x nodes` arrays
        (`AdaptiveQuadrature.bytes_per_evaluation`) against `memory_budget`. By
        default both must hold; with `agq_points=N` it runs in chunks of clusters
        within `memory_budget` whatever the time, unless one cluster alone exceeds it.
        """
        self.clock = QuadratureClock()
        quadrature = self.quadrature
        need = quadrature.bytes_per_evaluation()
        least = quadrature.largest_cluster_bytes()
        per_evaluation = self._seconds_per_evaluation(point)
        estimate = AGQ_EVALUATIONS * per_evaluation
        allowance = max(AGQ_COST_RATIO * vi_seconds,
                        AGQ_FREE_NODES * per_evaluation / quadrature.nodes_per_evaluation())
        per_node = per_evaluation / max(quadrature.nodes_per_evaluation(), 1)
        status = QuadratureStatus(
            vi_seconds=vi_seconds, estimate_seconds=estimate, estimate_bytes=need,
            allowance_seconds=math.inf if self.forced else allowance,
            # The same allowance in row-nodes, for the node check: robust to the load changing.
            allowance_nodes=math.inf if self.forced else allowance / max(per_node, 1e-15),
            points=list(quadrature.points), exact=False)
        problems = []
        budget = self.memory_budget
        if budget is not None and least > budget:
            problems.append(f"its largest cluster alone needs {least / 2**20:.1f} MiB at {self.describe_points()}, "
                            f"beyond memory_budget={budget / 2**20:.1f} MiB")
        elif not self.forced:
            if estimate > allowance:
                problems.append(f"it would take ~{estimate:.1f} s ({AGQ_EVALUATIONS} evaluations of "
                                f"{quadrature.structure.num_rows:,} rows x {quadrature.nodes_per_row():,} nodes, "
                                f"{per_evaluation:.2f} s each) against {vi_seconds:.1f} s for the variational fit "
                                f"(limit {AGQ_COST_RATIO:g}x)")
            if budget is not None and need > budget:
                problems.append(f"one evaluation's (rows x nodes) arrays need {need / 2**30:.2f} GiB, beyond "
                                f"memory_budget={budget / 2**30:.2f} GiB")
        status.run = status.ran = not problems
        if problems:
            how = ("raise memory_budget" if least > (budget or math.inf) else
                   f"agq_points={quadrature.points[-1]} asks for it (in chunks within memory_budget)")
            status.estimator = ("Gaussian VI (joint posterior): exact ML by adaptive quadrature not run: "
                                + "; ".join(problems) + f"; {how}")
            status.reason = "; ".join(problems)
        self.status = status
        return status

    def begin(self, point, fixed_covariance, curvature):
        """The phase's optimizer from the VI optimum `point`, its curvature the VI one:
        the fixed effects' `fixed_covariance` and the inverse of the variance
        parameters' `curvature`."""
        self._began = time.perf_counter()
        self.clock = QuadratureClock()
        self._settled = [False] * len(self.quadrature.points)
        vector = np.concatenate([point.beta, point.vector])
        lower = np.concatenate([np.full(self.num_fixed, -np.inf), self.parameters.lower])
        p = self.num_fixed
        inverse = np.zeros((len(vector), len(vector)))
        inverse[:p, :p] = fixed_covariance if np.all(np.isfinite(fixed_covariance)) else np.eye(p)
        try:
            information = curvature(point.vector)
            inverse[p:, p:] = np.linalg.inv(information + 1e-8 * np.eye(len(information)))
        except np.linalg.LinAlgError:
            inverse[p:, p:] = np.eye(len(vector) - p) * 0.01
        return BoundedBFGS(self.objective, vector, lower, tolerance=1e-10, inverse_hessian=inverse)

    # ------------------------------------------------------------ the node check
    def _limit(self, trial, rung):
        """Why the rung `trial` may not be checked, or None."""
        quadrature, status = self.quadrature, self.status
        remaining = status.allowance_nodes - self.clock.nodes
        seconds_per_node = self.clock.seconds / max(self.clock.nodes, 1)
        if quadrature.nodes_per_row(trial) > AGQ_MAX_NODES:
            return f"{quadrature.nodes_per_row(trial):,} nodes per row are more than AGQ_MAX_NODES={AGQ_MAX_NODES:,}"
        if self.memory_budget is not None and quadrature.largest_cluster_bytes(trial) > self.memory_budget:
            return "its largest cluster alone would need more than memory_budget"
        if rung > remaining:
            return (f"checking and re-optimizing would take ~{rung * seconds_per_node:.1f} s more, beyond the "
                    f"time allowance ({status.allowance_seconds:.1f} s, {AGQ_COST_RATIO:g}x the "
                    "variational fit)")
        return None

    def check_nodes(self, optimizer):
        """Whether the rule is exact at `optimizer`'s optimum: one more rung per dimension.

        For each dimension not yet settled (nested: the inner term first, where
        small clusters make the integrand least Gaussian), the log-likelihood and
        its gradient are evaluated with `next_points` nodes there. The dimension is
        settled when the log-likelihood moved by at most `AGQ_TOLERANCE` and so
        would re-optimizing with the new gradient (`g' H g / 2`, `H` the BFGS
        inverse Hessian); otherwise the finer rule is kept and the optimizer
        restarts from the current point (its curvature kept), to be checked again
        at its optimum. The rule is exact when every dimension is settled; a check
        the time allowance or `AGQ_MAX_NODES` forbids leaves it not exact, and the
        status says how far it got.

        Returns:
            The restarted optimizer where a finer rule moved the fit, else None
            (the check has ended: `status.checked`).
        """
        quadrature = self.quadrature
        status = self.status
        x = optimizer.x.copy()
        value = optimizer.f
        kept = self.last
        for dimension in list(range(len(quadrature.points)))[::-1]:  # nested: inner first
            if self._settled[dimension]:
                continue
            old_points = list(quadrature.points)
            trial = list(quadrature.points)
            trial[dimension] = next_points(trial[dimension])
            # Row-nodes this rung would take (its check, and re-optimizing if it moves).
            rung = quadrature.nodes_per_evaluation(trial) * (1 + AGQ_EVALUATIONS / 2)
            limit = self._limit(trial, rung)
            if limit is not None:
                self._finish_check(False, f"not checked at {self.describe_points(trial)}: {limit}; "
                                          f"agq_points={trial[dimension]} starts there")
                return None
            quadrature.set_points(trial)
            finer_value, finer_gradient = self.objective(x)
            free = optimizer._free(x, finer_gradient)
            inverse_hessian = optimizer.inverse_hessian
            if not np.isfinite(finer_value):
                gain = math.inf
            elif inverse_hessian is None:
                gain = float(np.max(np.abs(np.where(free, finer_gradient, 0.0))))
            else:
                gain = 0.5 * float(finer_gradient[free] @ inverse_hessian[np.ix_(free, free)] @ finer_gradient[free])
            change = abs(finer_value - value) if np.isfinite(finer_value) else math.inf
            status.ladder.append(Rung(points=list(trial), loglik_change=change, reoptimize_gain=gain))
            if change <= AGQ_TOLERANCE and gain <= AGQ_TOLERANCE:
                self._settled[dimension] = True
                status.checks.append(f"checked at {self.describe_points(trial)}: logLik moved {change:.1e}, "
                                     f"re-optimizing would gain {gain:.1e} nats")
                quadrature.set_points(old_points)  # the coarser rule is as good: cheaper from here on
                self.last = kept
                continue
            if not np.isfinite(finer_value):
                quadrature.set_points(old_points)
                self.last = kept
                self._finish_check(False, f"the log-likelihood is not finite at {self.describe_points(trial)}")
                return None
            # Moved: optimize again with the finer rule, from here, with the curvature so far.
            status.points = list(quadrature.points)
            self._settled = [False if j == dimension else settled for j, settled in enumerate(self._settled)]
            return BoundedBFGS(self.objective, x, optimizer.lower, tolerance=1e-10, inverse_hessian=inverse_hessian)
        self._finish_check(True, "; ".join(status.checks))
        return None

    def _finish_check(self, exact, note):
        status = self.status
        seconds = time.perf_counter() - self._began
        status.checked, status.exact = True, exact
        status.points, status.seconds = list(self.quadrature.points), seconds
        status.evaluations = self.clock.evaluations
        rule = self.describe_points()
        if exact:
            status.estimator = (f"exact ML by adaptive Gauss-Hermite quadrature, {rule} ({note}; {seconds:.1f} s, "
                                f"{self.clock.evaluations} evaluations)")
        else:
            moved = [r for r in status.ladder
                     if r.loglik_change > AGQ_TOLERANCE or r.reoptimize_gain > AGQ_TOLERANCE]
            last = f"; the last rung moved logLik by {moved[-1].loglik_change:.3g} nats" if moved else ""
            status.estimator = (f"ML of adaptive Gauss-Hermite quadrature with {rule}, NOT verified exact: "
                                f"{note}{last} ({seconds:.1f} s)")

    def unfinished_estimator(self):
        """The estimator's sentence while the phase has not reached its optimum."""
        return (f"ML of adaptive Gauss-Hermite quadrature with {self.describe_points()}, NOT verified exact: "
                "the fit stopped before its optimum (fit again, or with more epochs)")
