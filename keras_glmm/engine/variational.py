"""Gaussian variational inference for a GLMM, profiled over the posterior.

For fixed `Lambda` (and dispersion), `q(u) = N(m, V)` and `beta` maximize (Opper &
Archambeau 2009; Ormerod & Wand 2012)

```
ELBO = sum_i w_i E_q[log p(y_i | eta_i)] - KL(N(m, V) || N(0, I))
```

by Newton / natural-gradient fixed-point steps (Khan & Lin 2017): with the scores
`g_i = E_q[f_i']` and curvatures `h_i = -E_q[f_i'']` from the family's closed forms
or quadrature, `V <- A_uu(h)^-1` and `(m, beta) <- (m, beta) + A(h)^-1 grad`, damped
(in the natural parameters, i.e. in `h`) whenever the ELBO would decrease. The
variance parameters and dispersion are then a profiled problem, as for lme4: the
ELBO at the optimal `q` is a function of them whose gradient, by the envelope
theorem, is the partial gradient at fixed `q`, Fisher's identity of
`keras_glmm.engine.linear_mixed` with `g` for `w e / s^2` and `h` for `w`.
"""

import dataclasses
import math

import numpy as np

from keras_glmm.engine.spherical import trace_random
from keras_glmm.engine.stage import Stage


@dataclasses.dataclass
class PosteriorCovariance:
    """`q`'s covariance `V = A_uu(h)^-1` on the pattern, and what the ELBO needs of it.

    Attributes:
        curvature: `h`, the rows' weights in `A`.
        cross: `Structure.cross_products(h)`.
        factor: the blocked factorization of `A(h)`.
        covariance: `V` on the model's pattern.
        row_variance: `Var_q(eta_i)`.
        trace: `tr V`.
    """

    curvature: np.ndarray
    cross: dict
    factor: object
    covariance: dict
    row_variance: np.ndarray
    trace: float


def relative_change(new, old):
    """`max_i |new_i - old_i| / (1 + |old_i|)` (0 for no rows): how far row curvatures moved."""
    return float(np.max(np.abs(new - old) / (1.0 + np.abs(old)))) if len(new) else 0.0


@dataclasses.dataclass
class VariationalPoint:
    """`q` and `beta` at one point, with the ELBO and the rows' derivatives there.

    Attributes:
        posterior: the covariance part of `q`.
        means: the posterior means `m` of `u`, per term.
        beta: the fixed effects.
        eta: the linear predictor at the means.
        scores: `g_i = w_i E_q[f_i']`.
        next_curvature: `w_i h_i` at this `q` (the fixed point of `V` moves `h` there).
        dispersion_gradient: `d E_q[log p] / d` each dispersion parameter (per row for `zi_odds`).
        expected_log_likelihood, kl, elbo: the ELBO and its parts.
        vector, lambdas, dispersion, level_scores, gradient: the outer point and the
            objective's gradient there, set by the objective.
    """

    posterior: PosteriorCovariance
    means: list
    beta: np.ndarray
    eta: np.ndarray
    scores: np.ndarray
    next_curvature: np.ndarray
    dispersion_gradient: dict
    expected_log_likelihood: float
    kl: float
    elbo: float
    vector: np.ndarray = None
    lambdas: list = None
    dispersion: dict = None
    level_scores: list = None
    gradient: np.ndarray = None

    @property
    def covariance(self):
        return self.posterior.covariance

    @property
    def value(self):
        return -self.elbo


@dataclasses.dataclass
class InnerStart:
    """Where the inner Newton iterations start: the last accepted `q` and `beta`.

    `lambdas` are those of the accepted point (None before the first): the means
    are carried to new `lambdas` in `b = Lambda u` (`Variational.warm_start`).
    """

    means: list
    beta: np.ndarray
    curvature: np.ndarray
    lambdas: list = None


class Variational(Stage):
    """The negative ELBO of a GLMM at the optimal `q`, as an objective of the outer parameters.

    Args:
        algebra: the model's `SphericalAlgebra`.
        parameters: its `Parameters`.
        family: a `keras_glmm.families.Family`.
        y, trials, weights: `(n,)` response, binomial trials (or None) and prior weights.
        fixed_params: dispersion parameters held fixed, by name.
        num_points: quadrature points for families without closed forms.
    """

    def __init__(self, algebra, parameters, family, y, trials, weights, fixed_params, num_points):
        self.algebra = algebra
        self.structure = algebra.structure
        self.parameters = parameters
        self.family = family
        self.y, self.trials, self.weights = y, trials, weights
        self.fixed_params = fixed_params
        self.num_points = num_points
        self.last = None  # the point of the last evaluation
        self.accepted = None  # the optimizer's current point (`accept`)
        self.inner_start = None  # set by `start`, then by `accept`

    # ------------------------------------------------------------ the rows
    def expected(self, eta, variance, dispersion):
        """Weighted `E_q[log p]`, `g = E[f']`, the curvature `h` per row, and the dispersion gradient.

        `h = -2 d E_q[log p] / d v` (the variance's weight in the ELBO, what `V`'s
        fixed point needs) for rows with a posterior variance, `-E[f'']` for rows
        without one (no random effect: only the fixed effects' Newton step reads them).
        """
        params = dict(self.fixed_params)
        params.update(dispersion)
        value, first, second, d_variance, dispersion_gradient = self.family.expected_log_prob_derivatives(
            self.y, eta, variance, params, trials=self.trials, num_points=self.num_points,
            weights=self.weights,
        )
        weights = self.weights
        curvature = np.where(variance > 0, -2.0 * d_variance, -second)
        value = weights * value
        extra = self.family._weight_terms(weights, params, np)  # e.g. gaussian precisions
        if extra is not None:
            value = value + extra[0]
        return value, weights * first, weights * curvature, dispersion_gradient

    def start_weights(self, beta, means, lambdas, dispersion):
        """Row weights `-f''` at the starting linear predictor (no posterior variance yet)."""
        eta = self.algebra.linear_predictor(lambdas, means, beta)
        return np.maximum(self.expected(eta, np.zeros_like(eta), dispersion)[2], 0.0)

    # ------------------------------------------------------------ q for fixed variance parameters
    def posterior_covariance(self, lambdas, curvature):
        """`q`'s covariance `V = A_uu(h)^-1` on the pattern, and what the ELBO needs of it."""
        cross = self.structure.cross_products(curvature)
        factor = self.algebra.system.factor(lambdas, cross)
        covariance = factor.selected_inverse("random")
        return PosteriorCovariance(curvature=curvature, cross=cross, factor=factor, covariance=covariance,
                                   row_variance=self.algebra.row_variance(lambdas, covariance),
                                   trace=trace_random(covariance, self.structure.num_random))

    def at_means(self, lambdas, posterior, means, beta, dispersion):
        """The ELBO and the rows' derivatives for the mean `(u, beta)` under covariance `posterior`."""
        eta = self.algebra.linear_predictor(lambdas, means, beta)
        rows, scores, next_curvature, dispersion_gradient = self.expected(eta, posterior.row_variance, dispersion)
        square = float(sum(np.sum(level_means**2) for level_means in means))
        k = sum(block.size for block in self.structure.random_blocks)
        kl = 0.5 * (posterior.trace + square - k + posterior.factor.logdet_random)
        expected = float(np.sum(rows))
        return VariationalPoint(posterior=posterior, means=means, beta=beta, eta=eta, scores=scores,
                                next_curvature=next_curvature, dispersion_gradient=dispersion_gradient,
                                expected_log_likelihood=expected, kl=kl, elbo=expected - kl)

    def newton_direction(self, lambdas, point):
        """`A(h)^-1` times the ELBO's gradient in `(u, beta)`: a Newton step at `V`'s fixed point."""
        structure = self.structure
        sums = structure.level_sums(point.scores)
        gradient = [sums[b] @ lambdas[b] - point.means[b] for b in range(structure.num_random)] + [sums[-1]]
        diagonal, dense = self.algebra.right_hand_side_of_blocks(gradient)
        step_diagonal, step_dense, decrement = point.posterior.factor.solve(diagonal, dense)
        step_means, step_beta = self.algebra.split(step_diagonal, step_dense)
        return step_means, step_beta, decrement

    def fit_posterior(self, lambdas, dispersion, start, max_iterations=200):
        """Maximizes the ELBO over `q` and `beta` for fixed variance parameters.

        Each iteration is a Newton step on the mean `(u, beta)` with the covariance
        fixed (the ELBO is concave there; `A(h)` is its Hessian at the fixed point),
        backtracking until the ELBO does not decrease, then the fixed-point step of
        the covariance, `h <- -E_q[f'']`, damped in the natural parameters
        (`h <- (1 - rho) h + rho h_new`) until the ELBO does not decrease: the
        undamped fixed point can oscillate when variances are large (binary data
        in small clusters).

        Returns the `VariationalPoint`, or None when no finite ELBO can be reached from `start`.
        """
        try:
            posterior = self.posterior_covariance(lambdas, start.curvature)
        except np.linalg.LinAlgError:
            return None
        point = self.at_means(lambdas, posterior, start.means, start.beta, dispersion)
        if not np.isfinite(point.elbo):
            return None
        tolerance = 1e-11 * (1.0 + abs(point.elbo))
        for _ in range(max_iterations):
            before = point.elbo
            step_means, step_beta, decrement = self.newton_direction(lambdas, point)
            if decrement <= 1e-4 * tolerance and relative_change(point.next_curvature, point.posterior.curvature) < 1e-6:
                # Converged already: the Newton step would gain `decrement / 2`, far
                # below the tolerance, and the covariance is at its fixed point. Stopping
                # here saves the two expectations over every row of a last, null
                # iteration. (The gradient's error is first order in the mean's,
                # `sqrt(decrement)` in `A`'s norm: hence 1e-4, not 2, times the
                # tolerance; with 2 the quasi-Newton method could not reach its
                # absolute tolerance on 1e6 rows.)
                break
            rho = 1.0
            accepted = False
            for _ in range(30):
                trial = self.at_means(
                    lambdas, point.posterior, [m + rho * d for m, d in zip(point.means, step_means)],
                    point.beta + rho * step_beta, dispersion)
                if np.isfinite(trial.elbo) and trial.elbo >= point.elbo - 1e-13 * abs(point.elbo):
                    point, accepted = trial, True
                    break
                rho *= 0.5
            # Row curvatures may be negative (a zero-inflated likelihood is not
            # log-concave at y = 0); the fixed point keeps them as long as `A` stays
            # positive definite, otherwise the damping below backs off.
            target = point.next_curvature
            current = point.posterior.curvature
            moved = relative_change(target, current)
            rho = 1.0
            for _ in range(12):
                curvature = target if rho == 1.0 else (1.0 - rho) * current + rho * target
                try:
                    posterior = self.posterior_covariance(lambdas, curvature)
                except np.linalg.LinAlgError:
                    rho *= 0.5
                    continue
                trial = self.at_means(lambdas, posterior, point.means, point.beta, dispersion)
                if np.isfinite(trial.elbo) and trial.elbo >= point.elbo - 1e-13 * abs(point.elbo):
                    point, accepted = trial, True
                    break
                rho *= 0.5
            else:
                moved = 0.0  # no damped step improves the ELBO: the covariance is settled
            if not accepted:
                break  # neither step improves the ELBO: the next iteration would repeat this one
            if (point.elbo - before <= tolerance and decrement <= 1e-9 * (1.0 + abs(point.elbo))
                    and moved < 1e-6):
                break
        return point

    def warm_start(self, lambdas):
        """The accepted state, its posterior means kept fixed in `b = Lambda u` for new `lambdas`."""
        start = self.inner_start
        if start.lambdas is None:
            return start
        means = []
        for level_means, new_factor, old_factor in zip(start.means, lambdas, start.lambdas):
            coefficients = level_means @ old_factor.T
            means.append(np.linalg.lstsq(new_factor, coefficients.T, rcond=None)[0].T if np.any(new_factor)
                         else np.zeros_like(level_means))
        return dataclasses.replace(start, means=means)

    # ------------------------------------------------------------ the outer problem
    def objective(self, vector):
        """`-ELBO` at the optimal `q` for `vector`, with the envelope gradient."""
        # The convergence check and the bound probes come back to points already
        # evaluated (the end point, to restore its state): each would cost an inner fit.
        for known in (self.last, self.accepted):
            if known is not None and known.gradient is not None and np.array_equal(known.vector, vector):
                self.last = known
                return -known.elbo, -known.gradient.copy()
        lambdas = self.parameters.lambdas(vector)
        dispersion = self.parameters.dispersion(vector)
        point = self.fit_posterior(lambdas, dispersion, self.warm_start(lambdas))
        if point is None:
            return math.inf, np.full(len(vector), np.nan)
        structure = self.structure
        level_scores = structure.level_sums(point.scores)
        posterior = point.posterior
        cross = (posterior.cross if np.array_equal(point.next_curvature, posterior.curvature)
                 else structure.cross_products(point.next_curvature))
        gradients = self.algebra.lambda_gradients(lambdas, point.means, level_scores, cross, posterior.covariance)
        log_gradient = {k: point.dispersion_gradient[k] * dispersion[k] for k in dispersion}  # d / d log
        gradient = self.parameters.gradient(gradients, log_gradient)
        point.vector, point.lambdas, point.dispersion = np.array(vector, dtype=np.float64), lambdas, dispersion
        point.level_scores, point.gradient = level_scores, gradient
        self.last = point
        return -point.elbo, -gradient

    def curvature(self, vector):
        """The average information of the variance parameters (`SphericalAlgebra.average_information`).

        For a GLMM it is that of the working gaussian model (PQL's linearization:
        weights `h`, scores `g`); dispersion parameters get the curvature of the
        expected log-likelihood in their logarithm, by a difference of gradients.
        """
        point = self.evaluated(vector)
        parameters = self.parameters
        d = parameters.num_theta
        out = np.zeros((len(vector), len(vector)))
        out[:d, :d] = self.algebra.average_information(
            parameters, point.lambdas, point.posterior.factor, point.means, point.level_scores,
            point.posterior.curvature) * parameters.unit**2
        step = 1e-4
        for j, name in enumerate(parameters.dispersion_names):
            shifted = dict(point.dispersion)
            shifted[name] = point.dispersion[name] * math.exp(step)
            shifted_gradient = self._dispersion_gradient(point, shifted)[name] * shifted[name]
            gradient = point.dispersion_gradient[name] * point.dispersion[name]
            out[d + j, d + j] = -(shifted_gradient - gradient) / step
        if parameters.num_zi:
            # The rows' log-odds are independent: one shift of all of them gives each
            # row's second derivative c_i, and the block of gamma is -X_zi' diag(c) X_zi.
            shifted = dict(point.dispersion, zi_odds=point.dispersion["zi_odds"] * math.exp(step))
            shifted_gradient = self._dispersion_gradient(point, shifted)["zi_odds"] * shifted["zi_odds"]
            gradient = point.dispersion_gradient["zi_odds"] * point.dispersion["zi_odds"]
            zi = parameters.zi_design
            j = d + len(parameters.dispersion_names)
            out[j:, j:] = -zi.T @ (((shifted_gradient - gradient) / step)[:, None] * zi)
        return out

    def _dispersion_gradient(self, point, dispersion):
        """The rows' dispersion gradient at `point`'s `q` for other dispersion parameters."""
        return self.expected(point.eta, point.posterior.row_variance, dispersion)[3]

    def accept(self, vector):
        """The point at `vector` (the optimizer's current one); the next inner fits start from it."""
        last = self.accepted = self.evaluated(vector)
        self.inner_start = InnerStart(means=last.means, beta=last.beta, curvature=last.posterior.curvature,
                                      lambdas=last.lambdas)
        return last
