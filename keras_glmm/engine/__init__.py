"""The in-memory inference engine: structure-aware Gaussian VI, below the Keras model.

- `structure`: the blocks of a model's coefficients and the pairs of levels its rows touch;
- `blocked`: the blocked Cholesky factorization of the posterior precision and its
  selected inverse;
- `quasi_newton`: a bounded BFGS method, one iteration per call;
- `parameters`, `spherical`: the outer parameters' vector and the algebra in lme4's
  spherical coordinates that the estimators share;
- `linear_mixed`, `variational`, `exact_likelihood`: the estimators (lmer's profiled
  likelihood, Gaussian VI, exact ML by adaptive quadrature);
- `verification`, `covariances`: the end point's check and the standard errors;
- `solver`: `VariationalSolver`, which composes them to fit the posterior, fixed
  effects and variance parameters of a GLMM from arrays.

Nothing here imports Keras or the model.
"""

from keras_glmm.engine.blocked import TooLarge
from keras_glmm.engine.solver import VariationalSolver
from keras_glmm.engine.structure import Structure

__all__ = ["Structure", "TooLarge", "VariationalSolver"]
