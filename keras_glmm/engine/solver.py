"""Structure-aware Gaussian variational inference for GLMMs: the in-memory engine.

The model, in lme4's spherical coordinates (Bates et al. 2015):

```
eta = offset + X beta + Z Lambda u,     u ~ N(0, s^2 I),     y_i ~ family(eta_i)
```

with `Lambda` block diagonal, one lower-triangular `k x k` factor `Lambda_t` per
random term repeated over its levels (diagonal for `(x || g)`), so that a level's
random effects `b = Lambda_t u` have covariance `Sigma_t = s^2 Lambda_t Lambda_t'`.
For a gaussian model with the identity link, `s` is the residual sd and `Lambda`
is *relative*; for the other families `s = 1`.

The posterior family is one Gaussian `q(u) = N(m, s^2 V)` over every random-effect
coefficient, whose precision has the model's sparsity
(`keras_glmm.engine.blocked`). The solver composes one estimator per case over
that shared algebra (`keras_glmm.engine.spherical`):

- **gaussian, identity link** (`linear_mixed`): `q` is the exact posterior and the
  ELBO lme4's profiled (restricted) log-likelihood;
- **other families** (`variational`): Gaussian VI, profiled over `q` and `beta`;
- **exact ML where the integrals factorize** (`exact_likelihood`): from the VI
  optimum on, the log-likelihood by adaptive Gauss-Hermite quadrature, planned by
  a cost model and checked in its nodes.

In all cases the outer parameters (`keras_glmm.engine.parameters`: covariance
factors, log-dispersions, zero-inflation coefficients) move by a bounded
quasi-Newton method (`keras_glmm.engine.quasi_newton`): a standard deviation (a
diagonal entry of `Lambda_t`) can reach exactly 0, lme4's boundary fit. A `step()`
is one of its iterations; the model runs one per Keras `train_step`. On many rows
a GLMM starts from a pilot fit to a share of the levels (`keras_glmm.engine.pilot`:
1M nested binary rows 21.6 s -> 10.5 s, 1e5 rows 1.54 s -> 1.17 s, the same
optimum). The end point
is checked, and the fit sent on where the check fails, by
`keras_glmm.engine.verification`; the standard errors come from
`keras_glmm.engine.covariances`.

The solver knows nothing of Keras: it takes arrays (`Structure`) and a family.
"""

import contextlib
import functools
import math
import time
import warnings

import numpy as np
from threadpoolctl import ThreadpoolController

from keras_glmm.engine import covariances
from keras_glmm.engine import pilot as pilot_lib
from keras_glmm.engine.blocked import BlockedSystem
from keras_glmm.engine.exact_likelihood import AGQ_POINTS, ExactLikelihood, initial_status
from keras_glmm.engine.linear_mixed import LinearMixed
from keras_glmm.engine.parameters import Parameters, check_zi_design
from keras_glmm.engine.quadrature import AdaptiveQuadrature, design_of
from keras_glmm.engine.quasi_newton import BoundedBFGS
from keras_glmm.engine.spherical import SphericalAlgebra
from keras_glmm.engine.structure import Structure
from keras_glmm.engine.variational import InnerStart, Variational
from keras_glmm.engine.verification import SINGULAR_TOLERANCE, ConvergenceDrive

# Below this many dense coefficients the engine's linear algebra runs on one BLAS
# thread: splitting a 100 x 100 Cholesky across threads costs more than it saves,
# and far more when other processes hold the cores (measured here with the cores
# shared: a 656 x 656 Cholesky 5.4 ms on one thread, 70 ms on two; kb07's `||`
# model, 656 dense coefficients, 3.2 s against 11.4 s).
SMALL_DENSE = 2000


@functools.cache
def _blas():
    """The BLAS libraries loaded, found once: `threadpool_limits` lists them anew on
    every call, which scans the process's memory map (3 ms each with TensorFlow
    loaded, 60 ms of a 0.8 s fit)."""
    return ThreadpoolController()


class VariationalSolver:
    """Fits a GLMM's Gaussian posterior, fixed effects and variance parameters in memory.

    Args:
        x: `(n, p)` fixed-effects design.
        terms: `(name, level_index, z, num_levels, correlated)` per random term, `z`
            `(n, k)` with the intercept column first when the term has one.
        y: `(n,)` response (successes for a binomial).
        family: a `keras_glmm.families.Family`.
        trials: `(n,)` binomial trials, or None.
        weights: `(n,)` prior weights (gaussian: precisions; others: likelihood
            weights), or None.
        offset: `(n,)` or None.
        reml: restricted likelihood (gaussian identity link only).
        fixed_params: dispersion parameters held fixed, by name.
        num_points: quadrature points for families without closed forms.
        memory_budget: bytes the posterior's dense part may take.
        agq_points: nodes per dimension of the exact-ML phase by adaptive quadrature
            (see `keras_glmm.engine.exact_likelihood`); None for `AGQ_POINTS` where the
            design allows it, 0 to stop at the variational fit.
        zi_design: `(n, q)` zero-inflation design of a zero-inflated family (glmmTMB's
            `ziformula` with covariates), full column rank, or None for a constant
            `zi_odds`: `logit(pi_i) = x_zi,i' gamma`, `gamma` among the outer
            parameters (see `Parameters`); the exact-ML phase handles it too.

    Attributes:
        stage: the objective the optimizer runs on now: `LinearMixed` (gaussian,
            identity link), `Variational`, or, after the VI optimum where it is
            planned, `ExactLikelihood`.
        optimizer: the `BoundedBFGS` on `stage`'s objective.
        state: `stage`'s point at the optimizer's current one (a `LinearMixedPoint`,
            `VariationalPoint` or `ExactPoint`).
        quadrature_status: a `QuadratureStatus`, what the fit says of the exact-ML phase.
    """

    posterior = "joint"  # one Gaussian over every random-effect coefficient (GLMM.posterior_kind)

    def __init__(self, x, terms, y, family, trials=None, weights=None, offset=None, reml=False,
                 fixed_params=None, num_points=None, memory_budget=2 * 2**30, agq_points=None,
                 zi_design=None):
        self.structure = Structure(x, terms)
        self.system = BlockedSystem(self.structure, memory_budget=memory_budget)
        self.family = family
        self.conjugate = family.is_gaussian_identity
        if reml and not self.conjugate:
            raise ValueError("REML is defined for gaussian models with the identity link only.")
        self.reml = bool(reml)
        n = self.structure.num_rows
        self.y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.trials = None if trials is None else np.asarray(trials, dtype=np.float64).reshape(-1)
        self.weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        self.offset = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64).reshape(-1)
        self.fixed_params = dict(fixed_params or {})
        names = [] if self.conjugate else [p for p in family.dispersion_params if p not in self.fixed_params]
        if zi_design is not None:
            zi_design = check_zi_design(zi_design, family, self.fixed_params, n)
            names.remove("zi_odds")
        self.parameters = Parameters(self.structure.random_blocks, names, zi_design)
        self.num_rows = n
        self.num_fixed = self.structure.num_fixed
        self.memory_budget = memory_budget
        algebra = SphericalAlgebra(self.structure, self.system, self.offset)
        if self.conjugate:
            self.stage = LinearMixed(algebra, self.parameters, self.y, self.weights, self.offset, self.reml)
        else:
            self.stage = Variational(algebra, self.parameters, family, self.y, self.trials, self.weights,
                                     self.fixed_params, num_points)
        # Whether and how the exact-ML phase runs is decided when VI has converged
        # (`ExactLikelihood.plan`); `agq_points=N` forces it.
        self._created = time.perf_counter()
        factorizes = design_of(self.structure) is not None
        self.quadrature_status = initial_status(self.conjugate, self.reml, agq_points, factorizes)
        self.exact = None
        if not self.conjugate and agq_points != 0 and factorizes:
            quadrature = AdaptiveQuadrature(
                self.structure, family, self.y, self.trials, self.weights, self.offset,
                num_points=agq_points or AGQ_POINTS, memory_budget=memory_budget)
            self.exact = ExactLikelihood(algebra, self.parameters, quadrature, self.fixed_params, memory_budget,
                                         forced=bool(agq_points))
        self.optimizer = None
        self.state = None
        self.joint = covariances.JointHessian(self._conditional_covariance)
        self.drive = ConvergenceDrive(self.parameters, self.joint)

    @property
    def phase(self):
        """`"variational"` (the gaussian or VI fit) or `"quadrature"` (the exact-ML phase)."""
        return self.stage.phase

    @property
    def quadrature(self):
        """The exact-ML phase's `AdaptiveQuadrature`, or None where it does not run."""
        return None if self.exact is None else self.exact.quadrature

    @property
    def check(self):
        """The convergence check of the final phase's end point (`convergence.ConvergenceCheck`), or None."""
        return self.drive.check

    def threads(self):
        """One BLAS thread for small dense blocks (see `SMALL_DENSE`)."""
        if self.system.num_dense < SMALL_DENSE:
            return _blas().limit(limits=1, user_api="blas")
        return contextlib.nullcontext()

    # ================================================================ the fit
    def start(self, lambdas, beta=None, dispersion=None, u=None, zi=None, pilot=True):
        """Sets the starting point and evaluates it.

        Args:
            lambdas: one `(k, k)` lower-triangular factor per term, in the order the
                terms were given (relative to the residual sd for a gaussian model
                with the identity link).
            beta: fixed effects (other families: the start of the inner Newton).
            dispersion: dispersion parameters by name (other families).
            u: optional per-term `(L, k)` spherical posterior means (other families).
            zi: the zero-inflation coefficients `gamma` `(q,)` (with `zi_design`); by
                default the constant log-odds of `dispersion["zi_odds"]` (else 0),
                projected on the columns of `zi_design`.
            pilot: whether a GLMM of many rows starts from a pilot fit to a share of
                its levels (`keras_glmm.engine.pilot`: the point above starts the pilot).
        """
        with self.threads():
            if pilot and not self.conjugate and self.num_rows >= pilot_lib.PILOT_FROM_ROWS:
                start = pilot_lib.pilot_start(self, lambdas, beta, dispersion, zi)
                if start is not None:
                    return self._start(**start)
            return self._start(lambdas, beta, dispersion, u, zi)

    def fit_variational(self, max_iterations=200):
        """Runs the variational stage's optimizer from the start to its convergence, without
        the end check or the exact-ML phase (a pilot's fit). Returns whether it converged."""
        for _ in range(max_iterations):
            if self.optimizer.converged:
                break
            self.optimizer.step()
            self._accept()
        return bool(self.optimizer.converged and np.isfinite(self.optimizer.f))

    def _start(self, lambdas, beta=None, dispersion=None, u=None, zi=None):
        structure = self.structure
        ordered = [np.asarray(lambdas[structure.order.index(b)], dtype=np.float64)
                   for b in range(structure.num_random)]
        ordered = [np.where(np.tril(np.ones_like(factor)) > 0, factor, 0.0) for factor in ordered]
        for b, block in enumerate(structure.random_blocks):
            if not block.correlated:
                ordered[b] = np.diag(np.diag(ordered[b]))
            ordered[b] = ordered[b] * np.where(np.diag(ordered[b]) < 0, -1.0, 1.0)[None, :]
        missing = [k for k in self.parameters.dispersion_names if k not in (dispersion or {})]
        if missing:
            raise ValueError(f"`dispersion` needs starting values for {missing}.")
        if not self.conjugate and not self.family.link.unit_scale:
            # sds in the link's own units (an inverse link's eta ~ 1e-3): the
            # optimizer's steps, probes and boundary snaps assume entries of order 1.
            start_beta = np.zeros(self.num_fixed) if beta is None else np.asarray(beta, np.float64)
            eta = self.offset + structure.fixed_block.z @ start_beta
            unit = float(np.sqrt(np.mean(np.square(eta)))) if len(eta) else 1.0
            self.parameters.unit = unit if np.isfinite(unit) and unit > 0 else 1.0
        if self.parameters.num_zi and zi is None:
            constant = math.log((dispersion or {}).get("zi_odds", 1.0))
            zi = np.linalg.lstsq(self.parameters.zi_design, np.full(self.num_rows, constant), rcond=None)[0]
        vector = self.parameters.pack(ordered, dispersion, zi)
        if not self.conjugate:
            if u is None:
                means = [np.zeros((block.num_levels, block.num_effects)) for block in structure.random_blocks]
            else:
                means = [np.asarray(u[structure.order.index(b)], dtype=np.float64)
                         for b in range(structure.num_random)]
            beta = np.zeros(self.num_fixed) if beta is None else np.asarray(beta, dtype=np.float64)
            start_dispersion = {k: v for k, v in (dispersion or {}).items()
                                if k in self.parameters.dispersion_names}
            if self.parameters.num_zi:
                start_dispersion["zi_odds"] = self.parameters.dispersion(vector)["zi_odds"]
            curvature = self.stage.start_weights(beta, means, ordered, start_dispersion)
            self.stage.inner_start = InnerStart(means=means, beta=beta, curvature=curvature)
        # A GLMM's ELBO is only as precise as its inner Newton loop (1e-11 relative):
        # its outer tolerance is looser, and its working-model curvature steers the
        # approach, BFGS the end (it is not the ELBO's Hessian at the optimum).
        self.optimizer = BoundedBFGS(
            self.stage.objective, vector, self.parameters.lower, curvature=self.stage.curvature,
            refresh="always" if self.conjugate else "approach", tolerance=1e-12 if self.conjugate else 1e-10,
            canonical=self.parameters.canonical,
        )
        if not np.isfinite(self.optimizer.f):
            raise ValueError(
                f"The starting point has no finite ELBO: the linear predictor at `beta`="
                f"{np.array2string(np.asarray(beta if beta is not None else np.zeros(self.num_fixed)), precision=4)} "
                f"is outside the domain of the {self.family.name} family's {self.family.link.name} link "
                f"(or of its `dispersion`={dispersion}) for some rows. Start `beta` inside it, "
                "e.g. at least squares on the linked response.")
        self._accept()
        return self.report()

    def _accept(self):
        """Takes the stage's state at the optimizer's current point (the last accepted); at
        the exact-ML phase's optimum, checks its nodes first (which may restart it)."""
        self.state = self.stage.accept(self.optimizer.x)
        if (self.stage is self.exact and self.optimizer.converged
                and not self.quadrature_status.checked):
            restarted = self.exact.check_nodes(self.optimizer)
            if restarted is not None:
                self.optimizer = restarted
                self._accept()

    def step(self):
        """One quasi-Newton iteration; returns `report()`.

        Variance parameters on the profiled ELBO first; once that converges, where
        the design allows, all parameters on the exact log-likelihood.
        """
        with self.threads():
            return self._step()

    def _step(self):
        self.optimizer = self.drive.first_polish(self.optimizer)
        self.optimizer.step()
        self._accept()
        if self.stage is not self.exact and self.exact is not None and self.optimizer.converged:
            self._start_quadrature()
            if self.stage is self.exact:
                return self.report()
        if self.optimizer.converged and self.check is None:
            self._verify()
        return self.report()

    def _start_quadrature(self):
        """Starts the exact-ML phase from the VI optimum, with its curvature, if the
        cost guard allows (`ExactLikelihood.plan`); otherwise the VI fit is the answer."""
        exact = self.exact
        self.quadrature_status = exact.plan(self.state, time.perf_counter() - self._created)
        if not self.quadrature_status.run:
            if exact.forced:
                warnings.warn(self.quadrature_status.estimator, RuntimeWarning, stacklevel=2)
            self.exact = None
            return
        self.optimizer = exact.begin(self.state, self.fixed_covariance(), self.stage.curvature)
        self.stage = exact
        self._accept()

    def _verify(self):
        """The end point's check, and what goes on from it (`ConvergenceDrive.verify`)."""
        approximate = self.stage is self.exact and not self.quadrature_status.exact
        verdict = self.drive.verify(self.optimizer, self.stage, approximate)
        self.optimizer = verdict.optimizer
        if verdict.moved:
            self._accept()

    def gradient_norm(self):
        """The largest projected gradient of the objective in the current phase's parameters."""
        projected = self.optimizer.projected_gradient()
        return float(np.max(np.abs(projected))) if len(projected) else 0.0

    @property
    def finished(self):
        """Whether the fit has ended: the final phase's optimizer stopped and its end point was checked."""
        return (self.optimizer is not None and self.optimizer.converged and self.check is not None
                and (self.exact is None or self.stage is self.exact))

    @property
    def converged(self):
        """Whether the fit ended at a checked minimum (`check.passed`)."""
        return self.finished and self.check.passed

    @property
    def likelihood(self):
        """What the reported ELBO is: `"exact"` (a gaussian model's log-likelihood),
        `"quadrature"` (the log-likelihood by adaptive quadrature, its rule checked
        converged in the nodes), `"approximate"` (by a rule not verified) or
        `"bound"` (an ELBO)."""
        if self.conjugate:
            return "exact"
        if self.stage is not self.exact:
            return "bound"
        return "quadrature" if self.quadrature_status.exact else "approximate"

    @property
    def estimator(self):
        """A sentence naming the estimator of the fit: exact ML by adaptive quadrature
        (its nodes and their check), a rule not verified, or Gaussian VI and why."""
        if self.quadrature_status.estimator is not None:
            return self.quadrature_status.estimator
        if self.stage is self.exact:
            return self.exact.unfinished_estimator()
        return "Gaussian VI (joint posterior): the fit stopped before the variational optimum"

    # ================================================================ results
    def report(self):
        """The ELBO and its parts (totals) at the current point."""
        return self.stage.report(self.state)

    @property
    def scale(self):
        """`s`: the residual sd of a gaussian identity-link model, else 1."""
        return math.sqrt(self.state.sigma2) if self.conjugate else 1.0

    def results(self):
        """The fit in the terms' given order and the data's units.

        Returns:
            A dict: `beta` `(p,)`; `covariances` (each term's `Sigma_t`) and
            `factors` (`Lambda_t`, relative for a conjugate model); `level_means`
            `(L, k)` and `level_covariances` `(L, k, k)` per term (the posterior of
            `b = Lambda u`); `dispersion` (with `scale` for a gaussian model);
            `zi`, the zero-inflation coefficients `gamma` (with `zi_design`);
            `boundary`, one boolean array per term: which diagonal entries of
            `Lambda_t` are below lme4's tolerance (a standard deviation at 0, or, for
            an entry after the first, a correlation at +-1). The tolerance is
            lme4's 1e-4 in units of the linear predictor, whose unit is natural for
            the log, logit, probit and cloglog links and, for a gaussian model with
            the identity link, the residual sd; under another link (a gamma model's
            inverse link, eta ~ 1e-3) the unit is the fitted `eta`'s root mean square
            (`Link.unit_scale`).
        """
        state = self.state
        scale2 = self.scale**2
        unit = 1.0
        if not self.conjugate and not self.family.link.unit_scale:
            unit = float(np.sqrt(np.mean(np.square(state.eta)))) if len(state.eta) else 1.0
        out = {"beta": np.asarray(state.beta).copy(), "covariances": [], "factors": [],
               "level_means": [], "level_covariances": [], "boundary": []}
        for j in range(self.structure.num_random):
            b = self.structure.order[j]
            factor = state.lambdas[b]
            out["factors"].append(factor)
            out["covariances"].append(scale2 * factor @ factor.T)
            out["level_means"].append(state.means[b] @ factor.T)
            out["level_covariances"].append(
                scale2 * np.einsum("ij,ljk,mk->lim", factor, state.covariance[b, b], factor))
            out["boundary"].append(np.diag(factor) < SINGULAR_TOLERANCE * unit)
        if self.conjugate:
            out["dispersion"] = {"scale": self.scale}
        else:
            out["dispersion"] = dict(self.fixed_params)
            out["dispersion"].update(state.dispersion)
        if self.parameters.num_zi:
            del out["dispersion"]["zi_odds"]  # per row: `zi` holds its coefficients
            out["zi"] = self.parameters.zi_coefficients(state.vector).copy()
        return out

    def fixed_covariance(self):
        """Covariance of the fixed-effect estimates.

        Gaussian identity link: `s^2` times the fixed effects' block of `A^-1` (lme4's
        `vcov`, ML or REML). Other families, after the exact-ML phase: the fixed
        effects' block of the inverse Hessian of the negative log-likelihood in
        all parameters (`joint_covariance`), so the variance parameters'
        uncertainty is included, as in lme4's `vcov` of a `glmer` fit (its
        `use.hessian`) and glmmTMB's. Otherwise (no exact-ML phase, or that Hessian
        is not positive definite): the Laplace covariance at the optimum,
        conditional on the variance parameters (`covariances.conditional_covariance`).
        """
        with self.threads():
            if self.conjugate:
                return self.stage.fixed_covariance(self.state)
            if self.stage is self.exact:
                joint = self.joint_covariance(np.arange(self.num_fixed))
                if np.all(np.isfinite(joint)):
                    return joint
            return self._conditional_covariance()

    def _conditional_covariance(self):
        """The fixed effects' Laplace covariance at the current point, given the variance
        parameters: the observed information at `E_q eta`."""
        state = self.state
        params = dict(self.fixed_params)
        params.update(state.dispersion)
        information = covariances.observed_information(self.family, self.y, state.eta, params, trials=self.trials,
                                                       weights=self.weights)
        return covariances.conditional_covariance(self.system, state.lambdas, information)

    def zi_covariance(self):
        """Covariance of the zero-inflation coefficients on the logit scale, or None.

        The coefficients are `gamma` (with `zi_design`) or the one intercept
        `log(zi_odds)` (a constant zero-inflation); None when the family has none
        to estimate. Their block of `joint_covariance`: after the exact-ML phase
        glmmTMB's `vcov(fit)$zi` without Laplace's error; otherwise that of the
        negative ELBO profiled over `q` and `beta`, whose inverse Hessian has the
        joint one's block for `gamma` (profiling).
        """
        parameters = self.parameters
        size = len(self.optimizer.x)
        if parameters.num_zi:
            wanted = np.arange(size - parameters.num_zi, size)
        elif "zi_odds" in parameters.dispersion_names:
            wanted = np.array([self.stage.num_leading + parameters.num_theta
                               + parameters.dispersion_names.index("zi_odds")])
        else:
            return None
        return self.joint_covariance(wanted)

    def joint_covariance(self, wanted):
        """Block `wanted` of the inverse Hessian of the objective the fit ended on.

        The columns of the variance, dispersion and zero-inflation parameters are
        forward differences of the exact gradient (one evaluation each; those on
        a bound, an sd at 0, are held); after the exact-ML phase the fixed effects'
        too, where that costs few enough quadrature nodes
        (`covariances.JointHessian.hessian`). Computed once per optimum; NaN where
        the matrix is not positive definite. The solver's state is the current
        point's again afterwards.
        """
        with self.threads():
            return self.joint.covariance(self.optimizer, self.stage, wanted)
