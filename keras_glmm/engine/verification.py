"""The convergence drive: the end point's check, and what goes on from a point that fails it.

The bounded BFGS method with the average-information curvature reaches everyday
optima in a handful of iterations, but on maximal models (two 8 x 8 covariance
matrices, flat directions, many entries heading for a bound) it can stop hundreds
of nats short: its curvature model stops describing the objective and the line
search finds nothing along its direction. Measured on kb07's maximal model (72
parameters): the BFGS end point -14494.6, then L-BFGS-B -14293.1588 in 132
evaluations (lme4's bobyqa: -14293.1588 in 222 s); see
`benchmarks/bench_optimizers.py`. So an end point is checked by its derivatives
(`convergence.check`, lme4's `checkConv`) and, where the check fails, the fit goes
on by L-BFGS-B and a fresh quasi-Newton start, at most `MAX_POLISHES` times; a
passed check still leaves bounds where the second-order conditions fail there
(`ConvergenceDrive.restart_from_bounds`) and saddles (`escape`).
"""

import dataclasses

import numpy as np

from keras_glmm.engine import convergence
from keras_glmm.engine.quasi_newton import BoundedBFGS, evaluate_safely, lbfgsb

# lme4's isSingular: a diagonal entry of a (relative) covariance factor below this.
SINGULAR_TOLERANCE = 1e-4
# How many times a failed convergence check sends the fit on by L-BFGS-B and a
# restart of the quasi-Newton method (see `ConvergenceDrive.verify`).
MAX_POLISHES = 3
# Beyond this many variance parameters the fit starts by L-BFGS-B and leaves out the
# average-information curvature (its matrix costs O(parameters^2) row passes: 0.3 s
# an iteration on kb07's maximal model, whose 72 parameters L-BFGS-B takes to
# lme4's optimum in ~130 evaluations; `benchmarks/bench_optimizers.py`).
MANY_PARAMETERS = 20


@dataclasses.dataclass
class Verdict:
    """What `ConvergenceDrive.verify` did: the optimizer to go on with, and whether
    its point (or the stage's state there) moved, so that the solver takes it."""

    optimizer: BoundedBFGS
    moved: bool


class ConvergenceDrive:
    """Checks end points and sends the fit on from those that fail.

    Args:
        parameters: the model's `Parameters` (the factors' layout, for the bounds).
        joint: the `JointHessian` of the fit.
    """

    def __init__(self, parameters, joint):
        self.parameters = parameters
        self.joint = joint
        self.polishes = 0
        self.check = None  # the convergence check of the final phase's end point

    @property
    def many_parameters(self):
        return self.parameters.num_theta > MANY_PARAMETERS

    def first_polish(self, optimizer):
        """With many parameters, a fit starts by L-BFGS-B (see `MANY_PARAMETERS`);
        returns the optimizer to step."""
        if self.many_parameters and optimizer.iterations == 0 and self.polishes == 0:
            self.polishes += 1
            return self.restart(optimizer, self.polish(optimizer, optimizer.x))
        return optimizer

    def verify(self, optimizer, stage, approximate):
        """Checks the optimizer's end point; where the check fails, goes on by L-BFGS-B
        and a fresh quasi-Newton start, at most `MAX_POLISHES` times.

        Args:
            optimizer: the converged `BoundedBFGS`.
            stage: the objective's stage (`parameter_names`, `phase`).
            approximate: whether the objective's gradient is only as good as a
                quadrature rule not verified exact (going on means nothing more).

        Returns:
            A `Verdict`; `check` is set when the fit has ended.
        """
        x = optimizer.x.copy()
        free, hessian = self.joint.hessian(optimizer, stage, x)
        names = [stage.parameter_names()[j] for j in free]
        if hessian is None:
            result = convergence.check(np.full(len(free), np.nan), np.full((len(free),) * 2, np.nan), names)
        else:
            result = convergence.check(optimizer.g[free], hessian, names)
        if result.negative_eigenvalues and hessian is not None:
            escaped = self.escape(optimizer, x, free, hessian)
            if escaped is None:
                result = result.without_unconfirmed_negatives()
        final = self.polishes >= MAX_POLISHES or approximate
        if result.passed:
            start = None if final else self.restart_from_bounds(optimizer, x)
            if start is None:
                self.check = result
                return Verdict(optimizer, self.land_on_bounds(optimizer))
        elif final:
            self.check = result
            return Verdict(optimizer, False)
        else:
            start = self.polish(optimizer, escaped if result.negative_eigenvalues else x)
        self.polishes += 1
        self.joint.forget()
        return Verdict(self.restart(optimizer, start), True)

    def polish(self, optimizer, x):
        """L-BFGS-B (scipy) from `x` on the optimizer's objective: the best point it saw,
        or `x` where nothing beat the optimizer's current value."""
        best, value = lbfgsb(optimizer.function, x, optimizer.lower)
        return best if value < optimizer.f else x

    def restart(self, optimizer, x):
        """A fresh bounded BFGS method at `x` on the same objective (its probes of the
        bounds run again before convergence is declared)."""
        curvature = None if self.many_parameters else optimizer.curvature
        return BoundedBFGS(optimizer.function, x, optimizer.lower, curvature=curvature, refresh=optimizer.refresh,
                           tolerance=optimizer.tolerance, canonical=optimizer.canonical)

    def land_on_bounds(self, optimizer):
        """Puts the entries a hair above their bound (below lme4's singularity tolerance) on it.

        Near a bound the objective is flat to second order in a diagonal entry of
        `Lambda` (it depends on its square), so the optimizer stops where the change
        is below its precision, e.g. a correlation of -0.999999999 where the ML
        covariance has rank one; on the bound the fit is singular exactly, as lme4's.
        Taken only where `f` does not rise by more than 1e-10 (1 + |f|). Returns
        whether any entry was near its bound (the stage's state must be taken again).
        """
        bounded = np.isfinite(optimizer.lower)
        distance = optimizer.x - np.where(bounded, optimizer.lower, 0.0)
        near = bounded & (optimizer.x > optimizer.lower) & (distance < SINGULAR_TOLERANCE)
        if not near.any():
            return False
        if not optimizer.take_bounds(near, slack=1e-10):
            optimizer.function(optimizer.x)  # the state of the current point again
        return True

    def restart_from_bounds(self, optimizer, x):
        """Leaves a bound where the second-order conditions fail there; the end point, or None.

        lme4's singular fits land on a bound by design, and gradient methods stop on
        one that is no optimum: at a covariance factor `Lambda` whose column `j` is
        zero (from the canonical point, `Parameters.canonical`: the diagonal entry on
        its bound carries the column with it), the objective depends on that column
        `c` only through `Sigma = Lambda Lambda'`, so its gradient in `c` vanishes and
        `f(c) = f_0 + c' G c + O(|c|^4)` with `G = df/dSigma` on the rows from `j` on.
        A negative eigenvalue of `G` is a direction into the interior along which
        `f` decreases: the column is set there (scaled by a line search on `f`) and
        L-BFGS-B goes on from it. `G`'s column `i` is the column-`j` gradient at
        `c = step e_i`, `2 step G e_i`: one evaluation per row.
        """
        parameters = self.parameters
        offset = len(x) - len(parameters.lower)  # the fixed effects before them (exact-ML phase)
        function = optimizer.function
        base = x.copy()
        base[offset:] = parameters.canonical(x[offset:])
        value = function(base)[0]
        best, best_value = None, min(value, optimizer.f) - 1e-6
        for entries, (rows, cols) in zip(parameters.slices, parameters.positions):
            index = {(r, c): offset + entries.start + n for n, (r, c) in enumerate(zip(rows, cols))}
            for j in sorted({int(c) for r, c in zip(rows, cols) if r == c}):
                if base[index[j, j]] > 0:
                    continue
                column = [index[i, j] for i in range(j, max(rows) + 1) if (i, j) in index]
                step = 1e-2
                curvature = np.zeros((len(column), len(column)))
                for a, position in enumerate(column):
                    trial = base.copy()
                    trial[position] = step
                    curvature[:, a] = function(trial)[1][column] / (2.0 * step)
                values, vectors = np.linalg.eigh(0.5 * (curvature + curvature.T))
                if not values[0] < -1e-8 * (1.0 + abs(value)):
                    continue
                direction = vectors[:, 0] * (1.0 if vectors[0, 0] >= 0 else -1.0)  # diagonal entry >= 0
                scale = max(1.0, float(np.max(np.abs(base[offset:]))))
                for length in (1.0, 0.3, 0.1, 0.03, 0.01):
                    trial = base.copy()
                    trial[column] = length * scale * direction
                    trial_value = evaluate_safely(function, trial)[0]
                    if np.isfinite(trial_value) and trial_value < value - 1e-10 * (1.0 + abs(value)):
                        end = self.polish(optimizer, trial)
                        end_value = function(end)[0]
                        if end_value < best_value:
                            best, best_value = end, end_value
                        break
        function(x)  # the state of the current point again
        return best

    def escape(self, optimizer, x, free, hessian):
        """A point that leaves a saddle along the Hessian's most negative direction, or None.

        A saddle where gradient methods stop: a covariance factor with a column of
        zeros (an effect with no variance of its own) is stationary in every entry of
        that column by symmetry, `f` depending on the column only through its outer
        product, so no gradient step leaves it even where the likelihood wants the
        variance back.
        """
        values, vectors = np.linalg.eigh(hessian)
        direction = np.zeros_like(x)
        direction[free] = vectors[:, 0]
        function = optimizer.function
        value = optimizer.f
        scale = max(1.0, float(np.max(np.abs(x))) if len(x) else 1.0)
        for length in (1.0, 0.3, 0.1, 0.03, 0.01, 0.001):
            for sign in (1.0, -1.0):
                trial = np.maximum(x + sign * length * scale * direction, optimizer.lower)
                trial_value = evaluate_safely(function, trial)[0]
                if np.isfinite(trial_value) and trial_value < value - 1e-10 * (1.0 + abs(value)):
                    function(x)  # the state of the current point again
                    return trial
        function(x)
        return None
