"""A projected BFGS method for bound-constrained minimization, one iteration per call.

The variance parameters of a mixed model are few (a handful of Cholesky entries per
term) and some are bounded below by 0 (a standard deviation, the diagonal of a
covariance factor), where lme4's boundary ("singular") fits lie. lme4 and
MixedModels.jl minimize their profiled objective with BOBYQA, derivative-free;
here the engine has the exact gradient, so a quasi-Newton method needs far fewer
evaluations. Each `step()` is one iteration, so a Keras `train_step` can be one:

1. variables at their bound whose gradient points outward are held (the active
   set); the others take the BFGS direction `d = -H g` in their subspace;
2. a backtracking line search with Armijo's condition along a path that keeps
   each bounded variable above a fraction (5%) of its distance to the bound, and
   sets it on the bound once that distance is below `snap` of its starting
   distance: the iterates approach a bound geometrically rather than jumping on
   it from afar (where the curvature model is poor), yet land exactly on it when
   the optimum is there (dyestuff2's batch sd is exactly 0);
3. the inverse-Hessian approximation `H` takes the BFGS update when the curvature
   condition holds.

An optional `curvature(x)`, an approximation of the Hessian (for a gaussian
model the average information of AI-REML, Gilmour, Thompson & Cullis 1995),
gives the inverse-Hessian matrix where it is positive definite, as `refresh` says:

- `"always"`: at every iteration (Fisher scoring), for curvatures that are exact
  at the optimum;
- `"approach"`: at every iteration while the full step is accepted, corrected
  by BFGS's update with the last step (the direction the iterates move in, where
  a Fisher-scoring sequence converges only linearly, at the rate of the
  curvature's error), then BFGS from the last one once a step backtracks: for a
  curvature that is good but not exact (a GLMM's working-model information).
  Measured against `"start"` (objective evaluations to convergence): nested
  binary 1e5 rows 22 -> 17, 1e4 rows 16 -> 15; crossed 1e4 rows 17 -> 19, 1e5
  rows 15 -> 15 (one fewer inner fit, one more cached point); guimmun 10 -> 9,
  grouseticks 10 -> 7; without the secant correction guimmun took 40;
- `"start"`: at the start and after a restart, BFGS correcting it in between.

Either way no iterations are spent learning the scales of parameters whose
curvatures differ by orders of magnitude (InstEval's students and departments).

Convergence: the quasi-Newton prediction of the remaining decrease,
`g_F' H_FF g_F / 2` over the free variables, is below `tolerance * (1 + |f|)` and
below `absolute_tolerance`, or no step decreases `f` any more. The absolute bound
is the convergence check's (`convergence`, lme4's scaled gradient below 0.002 on
the deviance: a Newton gain `|R^-T g_dev|^2 / 4` of at most 1e-6 nats along one
parameter), with a margin for the quasi-Newton curvature's error: on 1e5 binary
rows (`-log L` ~ 6e4) the relative bound alone stopped at a predicted 4e-6 nats,
the check failed, and its Hessian, an L-BFGS-B polish and a second Hessian cost
more evaluations than the whole fit before them.

A bound is a stationary point of the profiled objective in a standard deviation:
the likelihood depends on `Lambda` through `Lambda Lambda'`, so its derivative in a
diagonal entry vanishes at 0 whichever way the optimum lies. A variable that
reaches its bound with a zero gradient is therefore *probed* before convergence is
declared: `f` is evaluated a little inside (`probe_steps`), and the first point
that decreases `f` becomes the next iterate (lme4's derivative-free BOBYQA leaves
such points by its trust region; a gradient method has to look). Before
convergence is declared, variables on their bound with an outward gradient are
probed the same way, once per visit: the profiled ELBO of a GLMM is not convex in
`Lambda`, and a correlated term can reach a boundary (an intercept sd at 0 while a
slope takes its variance) that is a local optimum much below an interior one
(a gamma model of sleepstudy with the inverse link: 23 nats below). A probe starts
from `canonical(x)`, a point with the same `f` (see
`Parameters.canonical`: at an sd of 0 the entries below it carry no information of
their own, and moving them into the later columns makes the probed direction an
uncorrelated effect rather than one fully correlated with a slope).
"""

import math

import numpy as np
import scipy.optimize


class BoundedBFGS:
    """Minimizes `f(x)` subject to `x >= lower`, one iteration per `step()`.

    Args:
        function: `x -> (f, gradient)`.
        x0: starting point (projected onto the bounds).
        lower: lower bounds (`-inf` for none).
        tolerance: relative tolerance on the predicted remaining decrease.
        absolute_tolerance: the largest predicted remaining decrease (in `f`'s units,
            nats for the engine's objectives) at convergence.
        initial_step: length (infinity norm) of the first, steepest-descent step.
        max_line_search: trials per line search.
        curvature: optional `x -> ` an approximation of the Hessian.
        refresh: when `curvature` replaces the quasi-Newton matrix: `"always"`,
            `"approach"` or `"start"` (see the module docstring).
        inverse_hessian: an optional first inverse-Hessian matrix.
        canonical: optional `x -> x'` with `f(x') = f(x)`, where probes start.
    """

    def __init__(self, function, x0, lower, tolerance=1e-12, initial_step=0.1, max_line_search=20,
                 probe_steps=(0.1, 0.01, 0.001), curvature=None, refresh="always", boundary_fraction=0.05,
                 snap=1e-7, inverse_hessian=None, canonical=None, absolute_tolerance=1e-7):
        self.function = function
        self.canonical = canonical
        self.lower = np.asarray(lower, dtype=np.float64)
        self.x = np.maximum(np.asarray(x0, dtype=np.float64), self.lower)
        self.boundary_fraction = float(boundary_fraction)
        bounded = np.isfinite(self.lower)
        self._start_distance = np.where(bounded, np.maximum(self.x - np.where(bounded, self.lower, 0.0), 1e-300), 0.0)
        self._snap = snap * self._start_distance
        self.tolerance = float(tolerance)
        self.absolute_tolerance = float(absolute_tolerance)
        self.initial_step = float(initial_step)
        self.max_line_search = int(max_line_search)
        self.probe_steps = tuple(probe_steps)
        self.curvature = curvature
        if refresh not in ("always", "approach", "start"):
            raise ValueError(f"refresh must be 'always', 'approach' or 'start', got {refresh!r}.")
        self.refresh = refresh
        self._approaching = refresh == "approach"  # until the first step that backtracks
        self._last_pair = None  # the last step and its change of gradient
        self._probed = np.zeros(len(self.x), dtype=bool)
        self._settling = False  # convergence is near: probe bounded variables whatever their gradient
        self.f, self.g = function(self.x)
        self.inverse_hessian = None if inverse_hessian is None else np.array(inverse_hessian, np.float64)
        self.iterations = 0
        self.evaluations = 1
        self.converged = len(self.x) == 0
        self.stalled = False

    def _free(self, x=None, g=None):
        x = self.x if x is None else x
        g = self.g if g is None else g
        return ~((x <= self.lower) & (g > 0))

    def projected_gradient(self):
        return np.where(self._free(), self.g, 0.0)

    def _h(self):
        if self.inverse_hessian is None:
            scale = self.initial_step / max(np.max(np.abs(self.projected_gradient())), 1e-12)
            return np.eye(len(self.x)) * scale
        return self.inverse_hessian

    def predicted_decrease(self):
        """`g_F' H_FF g_F / 2`: what a full quasi-Newton step would gain."""
        free = self._free()
        if not free.any() or self.inverse_hessian is None:
            pg = self.projected_gradient()
            return np.inf if np.any(pg != 0) else 0.0
        g = self.g[free]
        return 0.5 * float(g @ self.inverse_hessian[np.ix_(free, free)] @ g)

    def step(self):
        """One iteration; returns True once converged."""
        if self.converged:
            return True
        self.iterations += 1
        self._probed &= self.x <= self.lower  # a variable that left its bound may be probed again
        if self._probe():
            return False
        self._use_curvature()
        for attempt in range(2):
            free = self._free()
            h = self._h()
            d = np.zeros_like(self.x)
            d[free] = -h[np.ix_(free, free)] @ self.g[free]
            if not self.g[free] @ d[free] < 0:
                self.inverse_hessian = None
                h = self._h()
                d[free] = -h[np.ix_(free, free)] @ self.g[free]
            # A step of at most ten times the current scale of the variables: the
            # curvature far from the optimum may promise too much.
            longest = np.max(np.abs(d)) if len(d) else 0.0
            limit = 10.0 * max(1.0, np.max(np.abs(self.x)))
            if longest > limit:
                d = d * (limit / longest)
            accepted = self._line_search(d)
            if accepted is not None:
                break
            if self.inverse_hessian is None or self.predicted_decrease() <= 1e-9 * (1.0 + abs(self.f)):
                break
            self.inverse_hessian = None  # a poor model of the curvature: restart
            self._use_curvature()
        if accepted is None:
            # No point along the steepest path decreases f: the optimum, to the
            # precision of the evaluations.
            self._settling = True
            self.converged = self.stalled = not np.any(self._stuck())
            return self.converged
        x_new, f_new, g_new, full_step = accepted
        if not full_step:
            self._approaching = False
        self._update(x_new, f_new, g_new)
        return self.converged

    def _update(self, x_new, f_new, g_new):
        s, y = x_new - self.x, g_new - self.g
        if self.inverse_hessian is None:
            sy, yy = s @ y, y @ y
            self.inverse_hessian = np.eye(len(s)) * (sy / yy if sy > 0 and yy > 0 else 1.0)
        self.inverse_hessian = secant_update(self.inverse_hessian, s, y)
        self._last_pair = s, y
        decrease = self.f - f_new
        self.x, self.f, self.g = x_new, f_new, g_new
        pg = self.projected_gradient()
        if not np.any(pg):
            self.converged = True
        elif self.predicted_decrease() <= min(self.tolerance * (1.0 + abs(self.f)), self.absolute_tolerance):
            self.converged = True
        elif decrease <= 1e-15 * (1.0 + abs(self.f)) and np.max(np.abs(pg)) < 1e-3:
            self.converged = self.stalled = True
        if self.converged:
            self._settling = True
        if self.converged and np.any(self._stuck()):
            self.converged = self.stalled = False  # probe first (next step)
        elif self.converged:
            self._settle_on_bounds()

    def _settle_on_bounds(self):
        """Puts variables converging onto their bound (gradient pointing outward) on it.

        The path approaches a bound geometrically, so convergence can be declared a
        hair above it; the bound itself is taken when it does not increase `f`.
        """
        bounded = np.isfinite(self.lower)
        near = bounded & (self.x > self.lower) & (self.g > 0) & (
            self.x - np.where(bounded, self.lower, 0.0) < 1e-2 * self._start_distance)
        if near.any():
            self.take_bounds(near, slack=1e-12)

    def take_bounds(self, near, slack):
        """Puts the variables of the mask `near` on their bounds if `f` rises by at most
        `slack (1 + |f|)` there; returns whether it did (else the point is unchanged)."""
        x_new = np.where(near, self.lower, self.x)
        f_new, g_new = self.function(x_new)
        self.evaluations += 1
        if np.isfinite(f_new) and f_new <= self.f + slack * (1.0 + abs(self.f)):
            self.x, self.f, self.g = x_new, f_new, g_new
            return True
        return False

    def _use_curvature(self):
        """Sets the inverse Hessian from `curvature(x)` on the free variables, if positive definite."""
        refreshing = self.refresh == "always" or self._approaching
        if self.curvature is None or (self.inverse_hessian is not None and not refreshing):
            return
        free = self._free()
        hessian = np.asarray(self.curvature(self.x), dtype=np.float64)
        sub = hessian[np.ix_(free, free)]
        try:
            chol = np.linalg.cholesky(sub)
        except np.linalg.LinAlgError:
            return
        inverse = np.eye(len(self.x)) * (1.0 / max(np.max(np.abs(np.diag(hessian))), 1e-12))
        inv_sub = np.linalg.inv(chol)
        inverse[np.ix_(free, free)] = inv_sub.T @ inv_sub
        if self.refresh == "approach" and self._last_pair is not None:
            # The last step's secant corrects the curvature along the direction the
            # iterates move in, where a Fisher-scoring sequence converges only
            # linearly (its error there is the curvature's).
            inverse = secant_update(inverse, *self._last_pair)
        self.inverse_hessian = inverse

    def _stuck(self):
        """Bounded variables at their bound, not yet probed, with a vanishing gradient
        (or any gradient once convergence is near)."""
        at_bound = np.isfinite(self.lower) & (self.x <= self.lower)
        quiet = np.abs(self.g) <= 1e-8 * (1.0 + abs(self.f))
        return at_bound & (quiet | self._settling) & ~self._probed

    def _probe(self):
        """Moves a stuck variable inside its bound if that decreases `f`; see module doc."""
        stuck = self._stuck()
        self._settling = False
        base = self.x if self.canonical is None or not stuck.any() else self.canonical(self.x)
        for j in np.flatnonzero(stuck):
            self._probed[j] = True
            for delta in self.probe_steps:
                x_new = base.copy()
                x_new[j] = self.lower[j] + delta
                f_new, g_new = self.function(x_new)
                self.evaluations += 1
                if np.isfinite(f_new) and f_new < self.f - 1e-12 * (1.0 + abs(self.f)):
                    self.x, self.f, self.g = x_new, f_new, g_new
                    self.inverse_hessian = None  # the curvature seen so far was the bound's
                    return True
        return False

    def _line_search(self, d):
        """Backtracking along `max(x + a d, lower)`; returns `(x, f, g, whether a = 1)` or None."""
        alpha = 1.0
        bounded = np.isfinite(self.lower)
        lower = np.where(bounded, self.lower, 0.0)
        floor = np.where(bounded, lower + self.boundary_fraction * (self.x - lower), -np.inf)
        for _ in range(self.max_line_search):
            x_new = np.maximum(self.x + alpha * d, floor)
            x_new = np.where(bounded & (x_new - lower < self._snap), lower, x_new)
            step = x_new - self.x
            if not np.any(step):
                return None
            slope = float(self.g @ step)
            if slope >= 0:
                return None
            f_new, g_new = self.function(x_new)
            self.evaluations += 1
            if np.isfinite(f_new) and f_new <= self.f + 1e-4 * slope:
                return x_new, f_new, g_new, alpha == 1.0
            # Minimizer of the quadratic through f, the slope and f_new, within [0.1, 0.5].
            if np.isfinite(f_new):
                curvature = f_new - self.f - slope
                trial = -slope / (2.0 * curvature) if curvature > 0 else 0.5
                alpha *= min(0.5, max(0.1, trial))
            else:
                alpha *= 0.1
        return None


def secant_update(inverse_hessian, s, y):
    """BFGS's update of an inverse Hessian by the step `s` and its change of gradient `y`
    (unchanged where the curvature condition `s'y > 0` fails)."""
    sy = s @ y
    if not sy > 1e-12 * np.linalg.norm(s) * np.linalg.norm(y):
        return inverse_hessian
    rho = 1.0 / sy
    v = np.eye(len(s)) - rho * np.outer(s, y)
    return v @ inverse_hessian @ v.T + rho * np.outer(s, s)


def evaluate_safely(function, x):
    """`function(x)`, or `(inf, nan)` where a trial point far out overflows (a dispersion's
    `exp`, a singular Schur complement): line searches step back from it."""
    try:
        return function(x)
    except (OverflowError, FloatingPointError, np.linalg.LinAlgError):
        return math.inf, np.full(len(x), np.nan)


def lbfgsb(function, x0, lower, max_iterations=20_000, max_evaluations=50_000):
    """scipy's L-BFGS-B on `function` (`x -> (f, gradient)`) subject to `x >= lower`.

    Returns:
        `(x, f)`: the best point it evaluated (trial points that overflow, or give a
        non-finite value or gradient, count as a wall the line search steps back from).
    """
    best = [math.inf, np.array(x0, dtype=np.float64)]

    def objective(v):
        value, gradient = evaluate_safely(function, v)
        if not np.isfinite(value) or not np.all(np.isfinite(gradient)):
            return 1e300, np.zeros_like(v)
        if value < best[0]:
            best[0], best[1] = value, v.copy()
        return value, gradient

    bounds = [(lo, None) if np.isfinite(lo) else (None, None) for lo in lower]
    scipy.optimize.minimize(objective, best[1], jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": max_iterations, "maxfun": max_evaluations,
                                     "ftol": 1e-15, "gtol": 1e-9})
    return best[1], best[0]
