"""The profiled likelihood of a linear mixed model (gaussian, identity link): lme4's `lmer`.

Given `Lambda`, the posterior of `u` is exact and `beta` its GLS estimate: one
blocked solve of lme4's penalized least squares,

```
A [u; beta] = [Lambda' Z' W y; X' W y],    r^2 = y' W y - [...]' A^-1 [...]
-2 log L = log|A_uu| + n (1 + log(2 pi r^2 / n)) - sum log w        (ML)
-2 log L_R = log|A| + (n - p) (1 + log(2 pi r^2 / (n - p))) - sum log w   (REML)
```

and the ELBO at that posterior is the (restricted) log-likelihood. Its gradient in
`Lambda_t` is Fisher's identity in the spherical coordinates,

```
d log L / d Lambda_t = sum_c r_tc u_tc' - sum_pairs C_ts Lambda_s V_st,
r_tc = sum_{i in c} w_i e_i z_it / s^2,   C_ts = sum_{i in pair} w_i z_it z_is'
```

which needs `V` only on the model's pattern (the selected inverse). The curvature
that starts the quasi-Newton method is AI-REML's average information
(`SphericalAlgebra.average_information`).
"""

import dataclasses
import math

import numpy as np

from keras_glmm.engine.spherical import trace_random
from keras_glmm.engine.stage import Stage


@dataclasses.dataclass
class LinearMixedPoint:
    """The profiled model at one vector of variance parameters.

    Attributes:
        vector: the variance parameters (`Parameters`).
        lambdas: the relative factors `Lambda_t`.
        factor: the blocked factorization of `A` (prior weights).
        means: the posterior means `u`, per term.
        beta: the GLS fixed effects.
        sigma2: the profiled residual variance `s^2` (`r^2 / n`, or `/ (n - p)` for REML).
        covariance: `V = s^-2 Cov(u)` on the pattern (of `A^-1` for REML, `A_uu^-1` for ML).
        value: `-log L` (or `-log L_R`).
        eta: the linear predictor at `(u, beta)`.
        level_scores: `Z' W e / s^2` per level of each term (the residual's scores).
    """

    vector: np.ndarray
    lambdas: list
    factor: object
    means: list
    beta: np.ndarray
    sigma2: float
    covariance: dict
    value: float
    eta: np.ndarray
    level_scores: list


class LinearMixed(Stage):
    """The profiled (restricted) likelihood of a gaussian identity-link model as an objective.

    Args:
        algebra: the model's `SphericalAlgebra`.
        parameters: its `Parameters` (the factors only).
        y, weights, offset: `(n,)` response, prior weights (precisions) and offset.
        reml: the restricted likelihood.
    """

    def __init__(self, algebra, parameters, y, weights, offset, reml):
        self.algebra = algebra
        self.structure = algebra.structure
        self.parameters = parameters
        self.y, self.weights, self.offset = y, weights, offset
        self.reml = reml
        self.num_fixed = self.structure.num_fixed
        # The sufficient statistics: the data are not read again.
        y_offset = y - offset
        self.cross = self.structure.cross_products(weights)
        self.level_response = self.structure.level_sums(weights * y_offset)  # Z_b' W y per level (fixed: X'Wy)
        self.response_square = float(np.sum(weights * y_offset**2))
        # Rows of weight 0 carry no information (lme4 counts only the others).
        self.sum_log_weights = float(np.sum(np.log(weights[weights > 0])))
        self.num_observations = int(np.sum(weights > 0))
        self.last = None  # the point of the last evaluation

    def objective(self, vector):
        """`-log L` (ML) or `-log L_R` (REML) at `vector`, with its gradient."""
        lambdas = self.parameters.lambdas(vector)
        try:
            factor = self.algebra.system.factor(lambdas, self.cross)
        except np.linalg.LinAlgError:
            # Far out (a trial step of the line search), the fixed effects' Schur
            # complement loses its precision: the line search steps back.
            return math.inf, np.full(len(vector), np.nan)
        diagonal, dense = self.algebra.right_hand_side(lambdas, self.level_response)
        solution_diagonal, solution_dense, quadratic = factor.solve(diagonal, dense)
        n, p = self.num_observations, self.num_fixed
        residual_square = max(self.response_square - quadratic, 1e-300)
        dof = n - p if self.reml else n
        sigma2 = residual_square / dof
        logdet = factor.logdet if self.reml else factor.logdet_random
        value = 0.5 * (logdet + dof * (1.0 + math.log(2.0 * math.pi * sigma2)) - self.sum_log_weights)
        means, beta = self.algebra.split(solution_diagonal, solution_dense)
        covariance = factor.selected_inverse("full" if self.reml else "random")
        eta = self.algebra.linear_predictor(lambdas, means, beta)
        level_scores = self.structure.level_sums(self.weights * (self.y - eta) / sigma2)
        gradients = self.algebra.lambda_gradients(lambdas, means, level_scores, self.cross, covariance)
        self.last = LinearMixedPoint(vector=vector, lambdas=lambdas, factor=factor, means=means, beta=beta,
                                     sigma2=sigma2, covariance=covariance, value=value, eta=eta,
                                     level_scores=level_scores)
        return value, -self.parameters.gradient(gradients)

    def curvature(self, vector):
        """The average information at `vector`, the residual variance profiled out."""
        point = self.evaluated(vector)
        marginal = (self.y - self.offset - self.structure.fixed_block.z @ point.beta) / point.sigma2
        return self.algebra.average_information(self.parameters, point.lambdas, point.factor, point.means,
                                                point.level_scores, self.weights, scale=point.sigma2,
                                                extra=marginal)

    def report(self, point):
        """The ELBO (the log-likelihood) and its parts at `point` (computed here: the
        objective's evaluations need only the log-likelihood)."""
        elbo = -point.value
        square = float(sum(np.sum(means**2) for means in point.means)) / point.sigma2
        k = sum(block.size for block in self.structure.random_blocks)
        kl = 0.5 * (trace_random(point.covariance, self.structure.num_random) + square - k
                    + point.factor.logdet_random)
        return {"elbo": elbo, "expected_log_likelihood": elbo + kl, "kl": kl}

    def fixed_covariance(self, point):
        """`s^2` times the fixed effects' block of `A^-1` (lme4's `vcov`, ML or REML)."""
        return point.sigma2 * point.factor.fixed_covariance()
