"""Covariances of the estimates: the fixed effects' Laplace covariance and the joint Hessian.

The fixed effects' covariance given the variance parameters is the inverse of the
Schur complement of the random effects in the observed information: with `W` the
rows' observed information `-f''(eta_i)` (times their prior weights),

```
A = [[Lambda' Z' W Z Lambda + I, Lambda' Z' W X], [X' W Z Lambda, X' W X]],
vcov(beta) = (X'WX - X'WZ Lambda (Lambda' Z'WZ Lambda + I)^-1 Lambda' Z'WX)^-1
```

the fixed effects' block of `A^-1`, from the blocked factorization
(`Factor.fixed_covariance`); where `Lambda` is invertible this is
`(X'WX - X'WZ (Z'WZ + Sigma^-1)^-1 Z'WX)^-1`, and for a gaussian model lme4's
`(X' V^-1 X)^-1`. The joint covariance of all parameters is the inverse of the
Hessian of the objective the fit ended on (`JointHessian`).
"""

import numpy as np

from keras_glmm.engine import convergence


def observed_information(family, y, eta, params, trials=None, weights=None):
    """`W`: each row's `-d^2 log p(y_i | eta_i) / d eta_i^2` times its prior weight, at least 0.

    A row with negative curvature (a zero-inflated likelihood at `y = 0`) adds no information.
    """
    _, _, second, _ = family.log_prob_derivatives(y, eta, params, trials=trials)
    information = -second if weights is None else -weights * second
    return np.maximum(information, 0.0)


def conditional_covariance(system, lambdas, information):
    """The fixed effects' Laplace covariance given the variance parameters, `(p, p)`.

    Args:
        system: the model's `BlockedSystem`.
        lambdas: the covariance factors `Lambda_t`, in the system's block order
            (absolute, or relative with `information` in units of the residual variance).
        information: `(n,)` the rows' observed information `W`.

    Returns:
        The inverse Schur complement (see the module docstring); NaN where `A` is
        not positive definite.
    """
    try:
        factor = system.factor(lambdas, system.structure.cross_products(information))
    except np.linalg.LinAlgError:
        # No curvature left in some direction: separated binary data, whose
        # coefficient heads to infinity (the data check warned, naming it). Its
        # standard error is infinite, not the 1e7 of a rounding error.
        return np.full((system.num_fixed, system.num_fixed), np.nan)
    return factor.fixed_covariance()


class JointHessian:
    """The Hessian of the objective a fit ended on, once per point, and blocks of its inverse.

    Args:
        conditional: `() -> (p, p)`, the fixed effects' Laplace covariance at the
            current point (for their block where differencing them costs too much).
    """

    def __init__(self, conditional):
        self.conditional = conditional
        self._cache = None  # (point, phase, (free, hessian))

    def forget(self):
        self._cache = None

    def hessian(self, optimizer, stage, x):
        """`(free, H)`: the Hessian of `stage`'s objective at `x` on the coordinates off
        their bounds, computed once per point (the convergence check and the standard
        errors share it); `H` None where it is not finite.

        The columns of the variance, dispersion and zero-inflation parameters are
        forward differences of the exact gradient (`convergence.gradient_differences`).
        Where the stage says so (`fixed_by_information`: the exact-ML phase, when
        differencing the fixed effects costs too many quadrature nodes) the fixed
        effects' own block is their observed information given the variance
        parameters, the inverse of `conditional` (Laplace's curvature: bacteria's
        intercept SE 0.754 with it against 0.701 exact, guimmun's 16 coefficients
        0.9 s against 8.7 s by differences). The stage's state is the current
        point's again afterwards.
        """
        cached = self._cache
        if cached is not None and np.array_equal(cached[0], x) and cached[1] == stage.phase:
            return cached[2]
        x = np.array(x, dtype=np.float64)
        p = stage.fixed_by_information()
        free = np.flatnonzero(x > optimizer.lower)
        function = optimizer.function
        hessian = np.zeros((len(free), len(free)))
        result = (free, None)
        try:
            if p:
                hessian[:p, :p] = np.linalg.inv(self.conditional())
            gradient = function(x)[1]
            differenced = free >= p
            columns = convergence.gradient_differences(function, x, free[differenced], gradient)[free]
            hessian[:, differenced] = columns
            hessian[np.ix_(differenced, np.arange(p))] = columns[:p].T
            function(x)  # the state of the current point again
            if np.isfinite(hessian).all():
                result = (free, 0.5 * (hessian + hessian.T))
        except np.linalg.LinAlgError:
            pass
        self._cache = (x.copy(), stage.phase, result)
        return result

    def covariance(self, optimizer, stage, wanted):
        """Block `wanted` of the inverse Hessian at the optimizer's point; NaN where the
        Hessian is not positive definite or a wanted coordinate is on its bound."""
        free, hessian = self.hessian(optimizer, stage, optimizer.x)
        inverse = None
        if hessian is not None:
            try:
                inverse = np.linalg.inv(hessian)
            except np.linalg.LinAlgError:
                inverse = None
        nan = np.full((len(wanted), len(wanted)), np.nan)
        if inverse is None or not np.all(np.isin(wanted, free)):
            return nan
        position = np.searchsorted(free, wanted)
        block = inverse[np.ix_(position, position)]
        return block if np.all(np.diag(block) > 0) else nan
