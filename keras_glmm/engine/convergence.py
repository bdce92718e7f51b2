"""Checks that an optimizer's end point is a minimum, as lme4's `checkConv` does.

An optimizer stops when its own rule says so (a predicted decrease below a
tolerance, a line search that finds nothing better); that is a claim, not a
fact. On flat, curved or bounded objectives (maximal models, whose covariance
matrices have directions the data barely see) quasi-Newton methods can stop far
from the optimum. After the optimizer stops, the engine therefore looks at the
objective's first and second derivatives at the end point, on the *free*
parameters (those off their bound, or on it with a gradient pointing inward):

- **the scaled gradient** (lme4's `check.conv.grad`): with `H = R'R` the Hessian
  of the deviance `-2 log L` and `g` its gradient, lme4 takes
  `max_j min(|(R^-1 g)_j|, |g_j|)` and calls the fit failed above 0.002. The
  scaled gradient is the Newton step measured in standard errors; the `min`
  spares directions so flat that no step along them matters;
- **the Hessian's eigenvalues** (lme4's `check.conv.hess`): at a minimum the
  Hessian on the free parameters is positive semidefinite; an eigenvalue below
  `-negative_tolerance * max(1, largest)` is a saddle or a maximum, a direction
  along which the objective still decreases;
- **the predicted decrease** `g' H^-1 g / 2` in log-likelihood units on the
  positive part of the spectrum (not one of lme4's, reported beside them): how
  many nats a Newton step would still gain.

lme4 skips the checks for a singular fit; here they apply to the free parameters
of a singular fit too, and the parameters on a bound are checked by the
optimizer's probes (see `quasi_newton`).

The Hessian comes from forward differences of the exact gradient
(`gradient_differences`), one gradient evaluation per free parameter.
"""

import dataclasses

import numpy as np

# lme4's `check.conv.grad` tolerance, on the deviance scale.
GRADIENT_TOLERANCE = 0.002
# An eigenvalue of the Hessian below -NEGATIVE_TOLERANCE * max(1, largest) counts as negative.
NEGATIVE_TOLERANCE = 1e-6


@dataclasses.dataclass
class ConvergenceCheck:
    """What the derivatives at an end point say.

    Attributes:
        passed: whether the end point is a minimum by both checks.
        max_gradient: lme4's `max|grad|`, `max_j min(|scaled g_j|, |g_j|)` of the deviance.
        component: the parameter where `max_gradient` is taken (a name).
        negative_eigenvalues: how many eigenvalues of the Hessian are negative.
        smallest_eigenvalue, largest_eigenvalue: the Hessian's extreme eigenvalues
            (deviance scale; NaN with no free parameter).
        predicted_decrease: `g' H^+ g / 2` in nats, over the positive eigenvalues.
        num_free: how many parameters were checked.
    """

    passed: bool
    max_gradient: float
    component: str
    negative_eigenvalues: int
    smallest_eigenvalue: float
    largest_eigenvalue: float
    predicted_decrease: float
    num_free: int
    tolerance: float = GRADIENT_TOLERANCE
    unconfirmed_negative: int = 0

    def without_unconfirmed_negatives(self):
        """The check once no step along the negative eigenvalues' directions decreased the
        objective: differencing noise in flat directions, counted apart and not failing."""
        passed = bool(self.max_gradient <= self.tolerance)
        return dataclasses.replace(self, passed=passed, negative_eigenvalues=0,
                                   unconfirmed_negative=self.negative_eigenvalues)

    def message(self):
        """A sentence for a warning or `report()`: why the fit failed, or that it passed."""
        if self.passed:
            return (f"the gradient and curvature checks passed (max|grad| {self.max_gradient:.2g} < "
                    f"{self.tolerance:g}, Hessian positive semidefinite on {self.num_free} free parameters)")
        parts = []
        if not self.max_gradient <= self.tolerance:
            parts.append(f"max|grad| = {self.max_gradient:.3g} (tol = {self.tolerance:g}, component "
                         f"{self.component}); a Newton step would gain {self.predicted_decrease:.3g} "
                         "in the log-likelihood")
        if self.negative_eigenvalues:
            parts.append(f"the Hessian has {self.negative_eigenvalues} negative eigenvalue(s) (smallest "
                         f"{self.smallest_eigenvalue:.3g}): not a minimum")
        return "Model failed to converge: " + "; ".join(parts)

    def as_dict(self):
        return dataclasses.asdict(self)


def gradient_differences(function, x, columns, gradient):
    """`(g(x + h_j e_j) - g(x)) / h_j` for each `j` in `columns`: `(len(x), len(columns))`.

    Args:
        function: `x -> (f, gradient)`.
        x: the point.
        columns: the coordinates to step.
        gradient: the gradient at `x`.

    Steps go up (`h_j = 1e-4 max(1, |x_j|)`): the only bounds are lower bounds, so a
    coordinate on its bound stays feasible. One gradient evaluation per column.
    """
    out = np.zeros((len(x), len(columns)))
    for a, j in enumerate(columns):
        h = 1e-4 * max(1.0, abs(x[j]))
        moved = np.array(x, dtype=np.float64)
        moved[j] += h
        out[:, a] = (function(moved)[1] - gradient) / h
    return out


def check(gradient, hessian, names=None, tolerance=GRADIENT_TOLERANCE):
    """lme4's convergence checks on the free parameters (see the module docstring).

    Args:
        gradient: the gradient of the negative log-likelihood (or of the objective
            the fit minimizes, in the same units) on the free parameters.
        hessian: its Hessian on them.
        names: the parameters' names, for the message.
        tolerance: the largest `max|grad|` (deviance scale) that passes.

    Returns:
        A `ConvergenceCheck`.
    """
    # lme4 works on the deviance, -2 log L.
    g = 2.0 * np.asarray(gradient, dtype=np.float64)
    h = 2.0 * np.asarray(hessian, dtype=np.float64)
    names = list(names) if names is not None else [str(j) for j in range(len(g))]
    if not len(g):
        return ConvergenceCheck(True, 0.0, "", 0, np.nan, np.nan, 0.0, 0, tolerance)
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
        return ConvergenceCheck(False, np.inf, "a non-finite derivative", 0, np.nan, np.nan, np.inf, len(g),
                                tolerance)
    values, vectors = np.linalg.eigh(h)
    largest = float(values[-1])
    negative = int(np.sum(values < -NEGATIVE_TOLERANCE * max(1.0, abs(largest))))
    try:
        # lme4: solve(chol(H), g), R's chol the upper factor R of H = R'R: R^-1 g.
        scaled = np.linalg.solve(np.linalg.cholesky(h).T, g)
    except np.linalg.LinAlgError:
        scaled = np.full_like(g, np.inf)  # not positive definite: the raw gradient decides
    mingrad = np.minimum(np.abs(scaled), np.abs(g))
    worst = int(np.argmax(mingrad))
    positive = values > NEGATIVE_TOLERANCE * max(1.0, abs(largest))
    along = vectors.T @ g
    # Newton's predicted gain in the deviance is g' H^-1 g / 2; in log L, half that.
    predicted = 0.25 * float(np.sum(along[positive] ** 2 / values[positive]))
    passed = bool(mingrad[worst] <= tolerance and negative == 0)
    return ConvergenceCheck(passed, float(mingrad[worst]), names[worst], negative, float(values[0]), largest,
                            predicted, len(g), tolerance)
