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
(`keras_glmm.engine.blocked`). Two cases:

**Gaussian, identity link (conjugate).** Given `Lambda`, `q` is the exact posterior
and `beta` its GLS estimate: one blocked solve of lme4's penalized least squares,

```
A [u; beta] = [Lambda' Z' W y; X' W y],    r^2 = y' W y - [...]' A^-1 [...]
-2 log L = log|A_uu| + n (1 + log(2 pi r^2 / n)) - sum log w        (ML)
-2 log L_R = log|A| + (n - p) (1 + log(2 pi r^2 / (n - p))) - sum log w   (REML)
```

and the ELBO at `q` is the (restricted) log-likelihood: lme4's profiled objective.
Its gradient in `Lambda_t` is Fisher's identity in the spherical coordinates,

```
d log L / d Lambda_t = sum_c r_tc u_tc' - sum_pairs C_ts Lambda_s V_st,
r_tc = sum_{i in c} w_i e_i z_it / s^2,   C_ts = sum_{i in pair} w_i z_it z_is'
```

which needs `V` only on the model's pattern (the selected inverse).

**Other families.** Gaussian VI (Opper & Archambeau 2009; Ormerod & Wand 2012): for
fixed `Lambda` (and dispersion), `q` and `beta` maximize

```
ELBO = sum_i w_i E_q[log p(y_i | eta_i)] - KL(N(m, V) || N(0, I))
```

by Newton / natural-gradient fixed-point steps (Khan & Lin 2017): with
`g_i = E_q[f_i']` and `h_i = -E_q[f_i'']` from the family's closed forms or
quadrature, `V <- A_uu(h)^-1` and `(m, beta) <- (m, beta) + A(h)^-1 grad`, damped
(in the natural parameters, i.e. in `h`) whenever the ELBO would decrease. The
variance parameters and dispersion are then a profiled problem, as for lme4: the
ELBO at the optimal `q` is a function of them whose gradient, by the envelope
theorem, is the partial gradient at fixed `q`, the formula above with `g` for
`w e / s^2` and `h` for `w`.

**Exact ML where the integrals factorize.** For a GLMM with one term, or two nested
scalar terms (`keras_glmm.engine.quadrature`), the fit goes on from the VI optimum
to the exact maximum likelihood: the same quasi-Newton method on the log-likelihood
by adaptive Gauss-Hermite quadrature, centred and scaled at each level's mode.
VI's estimates are biased for binary data in small clusters (less than Laplace's,
but biased); this removes the bias. Two guards: a cost model (`_plan_quadrature`:
by default the phase runs only where it costs at most `AGQ_COST_RATIO` times the
VI fit and fits `memory_budget`; otherwise the VI answer stays, and `estimator`
says so and how to ask for it), and a check of the rule at its optimum
(`_check_nodes`: more nodes until the log-likelihood and its gradient stop
moving; the fit is called exact only then).

**Zero-inflation with covariates** (glmmTMB's `ziformula`): a zero-inflated family's
`logit(pi_i) = x_zi,i' gamma` adds `gamma` to the outer parameters, unbounded, with the
gradient `X_zi' (odds_i d ell_i / d odds_i)` from the family's per-row kernels
(`Parameters`); the exact-ML phase takes it the same way (its integrals still factorize:
`pi_i` does not depend on the random effects).

In all cases the variance parameters move by a bounded quasi-Newton method
(`keras_glmm.engine.quasi_newton`): a standard deviation (a diagonal entry of
`Lambda_t`) can reach exactly 0, lme4's boundary fit. A `step()` is one of its
iterations; the model runs one per Keras `train_step`.

The solver knows nothing of Keras: it takes arrays (`Structure`) and a family.
"""

import contextlib
import functools
import math
import warnings
import time

import numpy as np
from threadpoolctl import ThreadpoolController

from keras_glmm.engine import convergence
from keras_glmm.engine.blocked import BlockedSystem
from keras_glmm.engine.quadrature import AdaptiveQuadrature, design_of, next_points
from keras_glmm.engine.quasi_newton import BoundedBFGS, evaluate_safely, lbfgsb
from keras_glmm.engine.structure import Structure

# lme4's isSingular: a diagonal entry of a (relative) covariance factor below this.
SINGULAR_TOLERANCE = 1e-4
# The most quadrature nodes that differencing the fixed effects' gradients may
# take for their block of the joint Hessian (about 2 s here); see `_joint_covariance`.
HESSIAN_NODES = 10_000_000
# Below this many dense coefficients the engine's linear algebra runs on one BLAS
# thread: splitting a 100 x 100 Cholesky across threads costs more than it saves,
# and far more when other processes hold the cores (measured here with the cores
# shared: a 656 x 656 Cholesky 5.4 ms on one thread, 70 ms on two; kb07's `||`
# model, 656 dense coefficients, 3.2 s against 11.4 s).
SMALL_DENSE = 2000
# Adaptive quadrature's nodes per dimension: with 25 the exact log-likelihoods of
# the reference cases are reproduced to 1e-4 nats or better (40: 1e-9).
AGQ_POINTS = 25
# How many times a failed convergence check sends the fit on by L-BFGS-B and a
# restart of the quasi-Newton method (see `VariationalSolver._verify`).
MAX_POLISHES = 3
# Beyond this many variance parameters the fit starts by L-BFGS-B and leaves out the
# average-information curvature (its matrix costs O(parameters^2) row passes: 0.3 s
# an iteration on kb07's maximal model, whose 72 parameters L-BFGS-B takes to
# lme4's optimum in ~130 evaluations; `benchmarks/bench_optimizers.py`).
MANY_PARAMETERS = 20
# The exact-ML phase's cost guard and node check (see `_plan_quadrature` and
# `_check_nodes`). By default the phase runs where its estimated time is at most
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


@functools.cache
def _blas():
    """The BLAS libraries loaded, found once: `threadpool_limits` lists them anew on
    every call, which scans the process's memory map (3 ms each with TensorFlow
    loaded, 60 ms of a 0.8 s fit)."""
    return ThreadpoolController()


class Parameters:
    """Packs the lower-triangular factors `Lambda_t` (and log-dispersions) into a vector.

    With a zero-inflation design `X_zi` (glmmTMB's `ziformula` with covariates) the
    vector ends with its coefficients `gamma`, unbounded, and the family's `zi_odds`
    is one value per row, `log(zi_odds_i) = logit(pi_i) = x_zi,i' gamma`.
    """

    def __init__(self, blocks, dispersion_names=(), zi_design=None):
        # `Lambda_t = unit * vector entries`: the optimizer sees entries of order 1
        # whatever the link's units (see `VariationalSolver._start`).
        self.unit = 1.0
        self.slices, self.positions, lower = [], [], []
        start = 0
        for block in blocks:
            k = block.num_effects
            rows, cols = np.tril_indices(k) if block.correlated else (np.arange(k), np.arange(k))
            self.positions.append((rows, cols))
            self.slices.append(slice(start, start + len(rows)))
            lower.extend(np.where(rows == cols, 0.0, -np.inf))
            start += len(rows)
        self.num_theta = start
        self.names = [f"Lambda[{block.name}]({r + 1},{c + 1})" for block, (rows, cols) in zip(blocks, self.positions)
                      for r, c in zip(rows, cols)]
        self.dispersion_names = list(dispersion_names)
        self.zi_design = zi_design
        self.num_zi = 0 if zi_design is None else zi_design.shape[1]
        lower.extend([-np.inf] * (len(self.dispersion_names) + self.num_zi))
        self.names += [f"log {name}" for name in self.dispersion_names] + [f"zi[{j}]" for j in range(self.num_zi)]
        self.lower = np.asarray(lower)
        self.blocks = blocks

    def lambdas(self, vector):
        out = []
        for block, sl, (rows, cols) in zip(self.blocks, self.slices, self.positions):
            lam = np.zeros((block.num_effects, block.num_effects))
            lam[rows, cols] = self.unit * vector[sl]
            out.append(lam)
        return out

    def dispersion(self, vector):
        """The dispersion parameters by name; with `X_zi`, `zi_odds` per row."""
        out = {name: math.exp(v) for name, v in zip(self.dispersion_names, vector[self.num_theta:])}
        if self.num_zi:
            with np.errstate(over="ignore"):  # pi = 1 exactly: the line search steps back
                out["zi_odds"] = np.exp(self.zi_design @ self.zi_coefficients(vector))
        return out

    def zi_coefficients(self, vector):
        """`gamma`, the last `num_zi` entries (of this vector, or of one with more before them)."""
        return vector[len(vector) - self.num_zi:]

    def pack(self, lambdas, dispersion=None, zi=None):
        parts = [lam[rows, cols] / self.unit for lam, (rows, cols) in zip(lambdas, self.positions)]
        parts.append([math.log(dispersion[name]) for name in self.dispersion_names])
        if self.num_zi:
            parts.append(np.asarray(zi, dtype=np.float64).reshape(self.num_zi))
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]) if parts else np.zeros(0)

    def gradient(self, lambda_gradients, dispersion_gradient=None):
        """Packs `d/d Lambda_t` matrices (and `d/d log dispersion`) like `pack`.

        With `X_zi`, `dispersion_gradient["zi_odds"]` is per row, in the rows' log-odds;
        the chain rule gives `d/d gamma = X_zi' (odds_i d ell_i / d odds_i)`.
        """
        parts = [self.unit * grad[rows, cols] for grad, (rows, cols) in zip(lambda_gradients, self.positions)]
        parts.append([dispersion_gradient[name] for name in self.dispersion_names])
        if self.num_zi:
            parts.append(self.zi_design.T @ dispersion_gradient["zi_odds"])
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def _semidefinite_cholesky(sigma):
    """Lower-triangular `L` with `L L' = sigma`, a column of zeros at each zero pivot."""
    k = len(sigma)
    out = np.zeros_like(sigma)
    for j in range(k):
        pivot = sigma[j, j] - out[j, :j] @ out[j, :j]
        if pivot <= 1e-14 * max(np.max(np.abs(np.diag(sigma))), 1e-300):
            continue
        out[j, j] = math.sqrt(pivot)
        out[j + 1:, j] = (sigma[j + 1:, j] - out[j + 1:, :j] @ out[j, :j]) / out[j, j]
    return out


def _lambda_rows(z, lam):
    """`z Lambda`: each row's design in spherical coordinates, `(n, k)`."""
    return z * lam[0, 0] if lam.shape[0] == 1 else z @ lam


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
            (see the module docstring); None for `AGQ_POINTS` where the design
            allows it, 0 to stop at the variational fit.
        zi_design: `(n, q)` zero-inflation design of a zero-inflated family (glmmTMB's
            `ziformula` with covariates), full column rank, or None for a constant
            `zi_odds`: `logit(pi_i) = x_zi,i' gamma`, `gamma` among the outer
            parameters (see `Parameters`); the exact-ML phase handles it too.
    """

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
        self.num_points = num_points
        names = [] if self.conjugate else [p for p in family.dispersion_params if p not in self.fixed_params]
        if zi_design is not None:
            zi_design = self._check_zi_design(zi_design, n)
            names.remove("zi_odds")
        self.parameters = Parameters(self.structure.random_blocks, names, zi_design)
        self.num_rows = n
        self.num_fixed = self.structure.num_fixed
        if self.conjugate:
            self._prepare_conjugate()
        self.quadrature = None
        # Whether and how the exact-ML phase runs is decided when VI has converged
        # (`_plan_quadrature`); `agq_points=N` forces it.
        self._created = time.perf_counter()
        self.memory_budget = memory_budget
        self.agq_forced = bool(agq_points)
        self.quadrature_status = self._initial_quadrature_status(agq_points)
        if not self.conjugate and agq_points != 0 and design_of(self.structure) is not None:
            self.quadrature = AdaptiveQuadrature(
                self.structure, family, self.y, self.trials, self.weights, self.offset,
                num_points=agq_points or AGQ_POINTS, memory_budget=memory_budget)
        self.phase = "variational"
        self.optimizer = None
        self.state = None
        self.check = None  # the convergence check of the final phase's end point
        self.polishes = 0

    def _check_zi_design(self, zi_design, num_rows):
        """`zi_design` as float64 `(n, q)`, or a ValueError saying what is wrong with it."""
        if "zi_odds" not in self.family.dispersion_params:
            raise ValueError(f"`zi_design` needs a zero-inflated family; {self.family.name!r} is not one.")
        if "zi_odds" in self.fixed_params:
            raise ValueError("`zi_design` and a fixed `zi_odds` exclude each other.")
        zi = np.asarray(zi_design, dtype=np.float64)
        if zi.ndim != 2 or len(zi) != num_rows or not zi.shape[1]:
            raise ValueError(f"`zi_design` must be ({num_rows}, q) with q >= 1. Received shape {zi.shape}.")
        rank = np.linalg.matrix_rank(zi)
        if rank < zi.shape[1]:
            raise ValueError(f"`zi_design` has rank {rank} with {zi.shape[1]} columns: its coefficients are not "
                             "identified (drop the columns that are linear combinations of the others).")
        return zi

    # ================================================================ conjugate
    def _prepare_conjugate(self):
        """The sufficient statistics of a gaussian model: the data are not read again."""
        s = self.structure
        w = self.weights
        yo = self.y - self.offset
        self.cross = s.cross_products(w)
        self.zwy = s.level_sums(w * yo)  # Z_b' W y per level of each block (fixed: X'Wy)
        self.ywy = float(np.sum(w * yo**2))
        # Rows of weight 0 carry no information (lme4 counts only the others).
        self.sum_log_weights = float(np.sum(np.log(w[w > 0])))
        self.num_observations = int(np.sum(w > 0))

    def _rhs(self, lambdas, per_level):
        """Splits `Lambda' v` (per block, per level) into block 0 and the dense part."""
        s, sys = self.structure, self.system
        blocks = [per_level[b] @ lambdas[b] if b < s.num_random else per_level[b]
                  for b in range(len(s.blocks))]
        diag = blocks[0] if sys.has_diag else np.zeros((0, 1))
        dense = np.concatenate([blocks[b].reshape(-1) for b in sys.dense_blocks])
        return diag, dense

    def _unpack(self, x0, xd):
        """Per-block coefficient arrays from a solve's two parts."""
        s, sys = self.structure, self.system
        out = [x0] if sys.has_diag else []
        for b in sys.dense_blocks:
            block = s.blocks[b]
            start = sys.offsets[b]
            out.append(xd[start:start + block.size].reshape(block.num_levels, block.num_effects))
        out[-1] = out[-1].reshape(-1)
        return out[:-1], out[-1]

    def _conjugate_objective(self, vector):
        """`-log L` (ML) or `-log L_R` (REML) at `vector`, with its gradient."""
        lambdas = self.parameters.lambdas(vector)
        try:
            factor = self.system.factor(lambdas, self.cross)
        except np.linalg.LinAlgError:
            # Far out (a trial step of the line search), the fixed effects' Schur
            # complement loses its precision: the line search steps back.
            return math.inf, np.full(len(vector), np.nan)
        diag, dense = self._rhs(lambdas, self.zwy)
        x0, xd, quad = factor.solve(diag, dense)
        n, p = self.num_observations, self.num_fixed
        r2 = max(self.ywy - quad, 1e-300)
        dof = n - p if self.reml else n
        sigma2 = r2 / dof
        logdet = factor.logdet if self.reml else factor.logdet_random
        value = 0.5 * (logdet + dof * (1.0 + math.log(2.0 * math.pi * sigma2)) - self.sum_log_weights)
        u, beta = self._unpack(x0, xd)
        mode = "full" if self.reml else "random"
        cov = factor.selected_inverse(mode)
        eta = self._linear_predictor(lambdas, u, beta)
        residual = self.y - eta
        level_residual = self.structure.level_sums(self.weights * residual / sigma2)
        grads = self._lambda_gradients(lambdas, u, level_residual, self.cross, cov)
        self._last = dict(vector=vector, lambdas=lambdas, factor=factor, u=u, beta=beta, sigma2=sigma2,
                          cov=cov, value=value, eta=eta, level_score=level_residual)
        return value, -self.parameters.gradient(grads)

    def _average_information(self, vector, extra=None):
        """The average-information matrix of the variance parameters at `vector`.

        AI-REML's approximation of the Hessian of `-log L` (Gilmour, Thompson &
        Cullis 1995): with `t_j = dV/d theta_j V^-1 e` (`e` the marginal residual)
        and `P` the projection `V^-1 - V^-1 X (X'V^-1 X)^-1 X'V^-1`,
        `AI_jk = t_j' P t_k / 2`. In the spherical coordinates, for `theta_j` the
        entry `(a, b)` of `Lambda_t`, `t_j = z_ta u_tb + (z_t' Lambda_t)_b r_ta`
        (`r` the levels' scores `Z'W e / s^2` scaled back by `s^2`), and `P t` is
        one solve with the factorization at hand. For a gaussian model the residual
        variance is one more parameter (`t = e / s^2`), profiled out at the end.

        Args:
            vector: the point (its state must be the last evaluated).
            extra: optional `(n,)` column for one more parameter (the residual variance).

        Returns:
            `(d, d)` for the `theta` entries.
        """
        st = self._last
        s = self.structure
        lambdas, factor = st["lambdas"], st["factor"]
        columns = []
        for b, block in enumerate(s.random_blocks):
            rows, cols = self.parameters.positions[b]
            zl = _lambda_rows(block.z, lambdas[b])
            u_rows = st["u"][b][block.index]
            score_rows = st["level_score"][b][block.index] * (st.get("sigma2", 1.0))
            for a_, b_ in zip(rows, cols):
                columns.append(block.z[:, a_] * u_rows[:, b_] + zl[:, b_] * score_rows[:, a_])
        if extra is not None:
            columns.append(extra)
        t = np.stack(columns, axis=1)
        w = self.weights if self.conjugate else st["h"]
        scale = st.get("sigma2", 1.0)
        wt = w[:, None] * t
        proj = np.empty((len(s.blocks), 0))
        solved = []
        for j in range(t.shape[1]):
            sums = s.level_sums(wt[:, j])
            diag, dense = self._rhs(lambdas, sums)
            x0, xd, _ = factor.solve(diag, dense)
            solved.append((diag, dense, x0, xd))
        ai = np.empty((t.shape[1], t.shape[1]))
        for j in range(t.shape[1]):
            for k in range(j, t.shape[1]):
                dj, ddj, _, _ = solved[j]
                _, _, x0k, xdk = solved[k]
                value = float(t[:, j] @ wt[:, k]) - float(np.sum(dj * x0k) + ddj @ xdk)
                ai[j, k] = ai[k, j] = 0.5 * value / scale
        del proj
        d = self.parameters.num_theta
        if extra is not None:
            ai = ai[:d, :d] - np.outer(ai[:d, d], ai[d, :d]) / ai[d, d]
        return ai

    def _conjugate_curvature(self, vector):
        if not np.array_equal(self._last["vector"], vector):
            self._conjugate_objective(vector)
        st = self._last
        marginal = (self.y - self.offset - self.structure.fixed_block.z @ st["beta"]) / st["sigma2"]
        return self._average_information(vector, extra=marginal)

    # ================================================================ shared pieces
    def _linear_predictor(self, lambdas, u, beta):
        """`offset + X beta + sum_t z_t' Lambda_t u_t[g_t(i)]` per row."""
        s = self.structure
        eta = self.offset + s.fixed_block.z @ beta
        for b, block in enumerate(s.random_blocks):
            coef = u[b] @ lambdas[b].T  # b = Lambda u, one row per level
            eta += np.einsum("ik,ik->i", block.z, coef[block.index]) if block.num_effects > 1 else (
                block.z[:, 0] * coef[block.index, 0])
        return eta

    def _lambda_gradients(self, lambdas, u, level_residual, cross, cov):
        """`sum_c r_tc u_tc' - sum_pairs C_ts Lambda_s V_st` for each random term."""
        s = self.structure
        grads = [np.einsum("la,lb->ab", level_residual[b], u[b]) for b in range(s.num_random)]
        fixed = len(s.blocks) - 1
        for (a, b), v in cov.items():
            c = cross[a, b]
            lam_b = np.eye(s.blocks[b].num_effects) if b == fixed else lambdas[b]
            # sum_p C_p Lambda_b V_p' and sum_p C_p' Lambda_a V_p as BLAS contractions.
            if a < s.num_random:
                grads[a] -= np.tensordot(np.matmul(c, lam_b), v, axes=([0, 2], [0, 2]))
            if b != a and b < s.num_random:
                grads[b] -= np.tensordot(np.matmul(np.swapaxes(c, 1, 2), lambdas[a]), v, axes=([0, 2], [0, 1]))
        return grads

    def _row_variance(self, lambdas, cov):
        """`Var_q(eta_i) = sum_ab (z_ia' Lambda_a) V_ab[pair] (Lambda_b' z_ib)`."""
        s = self.structure
        rows = [_lambda_rows(block.z, lambdas[b]) for b, block in enumerate(s.random_blocks)]
        var = np.zeros(self.num_rows)
        for (a, b), v in cov.items():
            if a >= s.num_random or b >= s.num_random:
                continue
            pair = s.pairs[a, b]
            vi = v[pair.row_pair]
            term = np.einsum("ia,iab,ib->i", rows[a], vi, rows[b]) if vi.shape[1] * vi.shape[2] > 1 else (
                rows[a][:, 0] * vi[:, 0, 0] * rows[b][:, 0])
            var += term if a == b else 2.0 * term
        return np.maximum(var, 0.0)

    @staticmethod
    def _trace_random(cov, num_random):
        return float(sum(np.trace(cov[b, b], axis1=1, axis2=2).sum() for b in range(num_random)))

    # ================================================================ other families
    def _expected(self, eta, var, dispersion):
        """Weighted `E_q[log p]`, `g = E[f']`, the curvature `h` per row, and the dispersion gradient.

        `h = -2 d E_q[log p] / d v` (the variance's weight in the ELBO, what `V`'s
        fixed point needs) for rows with a posterior variance, `-E[f'']` for rows
        without one (no random effect: only the fixed effects' Newton step reads them).
        """
        params = dict(self.fixed_params)
        params.update(dispersion)
        value, first, second, d_var, pgrad = self.family.expected_log_prob_derivatives(
            self.y, eta, var, params, trials=self.trials, num_points=self.num_points,
            weights=self.weights,
        )
        w = self.weights
        h = np.where(var > 0, -2.0 * d_var, -second)
        value = w * value
        extra = self.family._weight_terms(w, params, np)  # e.g. gaussian precisions
        if extra is not None:
            value = value + extra[0]
        return value, w * first, w * h, pgrad

    def _covariance_state(self, lambdas, h):
        """`q`'s covariance `V = A_uu(h)^-1` on the pattern, and what the ELBO needs of it."""
        cross = self.structure.cross_products(h)
        factor = self.system.factor(lambdas, cross)
        cov = factor.selected_inverse("random")
        return dict(h=h, cross=cross, factor=factor, cov=cov, var=self._row_variance(lambdas, cov),
                    trace=self._trace_random(cov, self.structure.num_random))

    def _mean_state(self, lambdas, q, u, beta, dispersion):
        """The ELBO and the rows' derivatives for the mean `(u, beta)` under covariance `q`."""
        eta = self._linear_predictor(lambdas, u, beta)
        ell, g, hh, pgrad = self._expected(eta, q["var"], dispersion)
        sq = float(sum(np.sum(ub**2) for ub in u))
        k = sum(block.size for block in self.structure.random_blocks)
        kl = 0.5 * (q["trace"] + sq - k + q["factor"].logdet_random)
        ell = float(np.sum(ell))
        return dict(q, eta=eta, g=g, hh=hh, pgrad=pgrad, ell=ell, kl=kl, elbo=ell - kl, u=u, beta=beta)

    def _newton_direction(self, lambdas, state):
        """`A(h)^-1` times the ELBO's gradient in `(u, beta)`: a Newton step at `V`'s fixed point."""
        s = self.structure
        sums = s.level_sums(state["g"])
        grad = [sums[b] @ lambdas[b] - state["u"][b] for b in range(s.num_random)] + [sums[-1]]
        diag, dense = self._rhs_from_blocks(grad)
        x0, xd, decrement = state["factor"].solve(diag, dense)
        du, dbeta = self._unpack(x0, xd)
        return du, dbeta, decrement

    def _rhs_from_blocks(self, per_block):
        sys = self.system
        diag = per_block[0] if sys.has_diag else np.zeros((0, 1))
        dense = np.concatenate([np.asarray(per_block[b]).reshape(-1) for b in sys.dense_blocks])
        return diag, dense

    def _fit_q(self, lambdas, dispersion, start, max_iterations=200):
        """Maximizes the ELBO over `q` and `beta` for fixed variance parameters.

        Each iteration is a Newton step on the mean `(u, beta)` with the covariance
        fixed (the ELBO is concave there; `A(h)` is its Hessian at the fixed point),
        backtracking until the ELBO does not decrease, then the fixed-point step of
        the covariance, `h <- -E_q[f'']`, damped in the natural parameters
        (`h <- (1 - rho) h + rho h_new`) until the ELBO does not decrease: the
        undamped fixed point can oscillate when variances are large (binary data
        in small clusters).

        Returns the state, or None when no finite ELBO can be reached from `start`.
        """
        try:
            q = self._covariance_state(lambdas, start["h"])
        except np.linalg.LinAlgError:
            return None
        state = self._mean_state(lambdas, q, start["u"], start["beta"], dispersion)
        if not np.isfinite(state["elbo"]):
            return None
        tolerance = 1e-11 * (1.0 + abs(state["elbo"]))
        for _ in range(max_iterations):
            before = state["elbo"]
            du, dbeta, decrement = self._newton_direction(lambdas, state)
            rho = 1.0
            for _ in range(30):
                trial = self._mean_state(
                    lambdas, state, [ub + rho * d for ub, d in zip(state["u"], du)],
                    state["beta"] + rho * dbeta, dispersion)
                if np.isfinite(trial["elbo"]) and trial["elbo"] >= state["elbo"] - 1e-13 * abs(state["elbo"]):
                    state = trial
                    break
                rho *= 0.5
            # Row curvatures may be negative (a zero-inflated likelihood is not
            # log-concave at y = 0); the fixed point keeps them as long as `A` stays
            # positive definite, otherwise the damping below backs off.
            h_new = state["hh"]
            moved = float(np.max(np.abs(h_new - state["h"]) / (1.0 + np.abs(state["h"])))) if len(h_new) else 0.0
            rho = 1.0
            for _ in range(12):
                h_try = h_new if rho == 1.0 else (1.0 - rho) * state["h"] + rho * h_new
                try:
                    q = self._covariance_state(lambdas, h_try)
                except np.linalg.LinAlgError:
                    rho *= 0.5
                    continue
                trial = self._mean_state(lambdas, q, state["u"], state["beta"], dispersion)
                if np.isfinite(trial["elbo"]) and trial["elbo"] >= state["elbo"] - 1e-13 * abs(state["elbo"]):
                    state = trial
                    break
                rho *= 0.5
            else:
                moved = 0.0  # no damped step improves the ELBO: the covariance is settled
            if (state["elbo"] - before <= tolerance and decrement <= 1e-9 * (1.0 + abs(state["elbo"]))
                    and moved < 1e-6):
                break
        return state

    def _canonical_vector(self, vector):
        """The same covariances `Lambda_t Lambda_t'` with a zero column under each zero diagonal.

        The objective depends on `Lambda_t` only through `Lambda_t Lambda_t'` (the
        posterior of `u` turns with it), and at `Lambda_jj = 0` the entries below
        it are not unique: the Cholesky factor of a semidefinite matrix that skips
        zero pivots puts them in the later columns. The bounded optimizer probes
        an sd at 0 from here (see `quasi_newton`).
        """
        lambdas = self.parameters.lambdas(vector)
        out = []
        for lam in lambdas:
            out.append(_semidefinite_cholesky(lam @ lam.T) if np.any(np.diag(lam) == 0) else lam)
        dispersion = self.parameters.dispersion(vector)
        return self.parameters.pack(out, dispersion, self.parameters.zi_coefficients(vector))

    def _warm_start(self, lambdas):
        """The accepted state, its posterior means kept fixed in `b = Lambda u` for new `lambdas`."""
        start = self._inner_start
        old = start.get("lambdas")
        if old is None:
            return start
        u = []
        for ub, new_lam, old_lam in zip(start["u"], lambdas, old):
            b = ub @ old_lam.T
            u.append(np.linalg.lstsq(new_lam, b.T, rcond=None)[0].T if np.any(new_lam) else np.zeros_like(ub))
        return dict(start, u=u)

    def _glmm_curvature(self, vector):
        """The average information of the variance parameters (see `_average_information`).

        For a GLMM it is that of the working gaussian model (PQL's linearization:
        weights `h`, scores `g`); dispersion parameters get the curvature of the
        expected log-likelihood in their logarithm, by a difference of gradients.
        """
        if not np.array_equal(self._last["vector"], vector):
            self._glmm_objective(vector)
        st = self._last
        d = self.parameters.num_theta
        out = np.zeros((len(vector), len(vector)))
        out[:d, :d] = self._average_information(vector) * self.parameters.unit**2
        for j, name in enumerate(self.parameters.dispersion_names):
            shifted = dict(st["dispersion"])
            step = 1e-4
            shifted[name] = st["dispersion"][name] * math.exp(step)
            g1 = self._expected(st["eta"], st["var"], shifted)[3][name] * shifted[name]
            g0 = st["pgrad"][name] * st["dispersion"][name]
            out[d + j, d + j] = -(g1 - g0) / step
        if self.parameters.num_zi:
            # The rows' log-odds are independent: one shift of all of them gives each
            # row's second derivative c_i, and the block of gamma is -X_zi' diag(c) X_zi.
            step = 1e-4
            shifted = dict(st["dispersion"], zi_odds=st["dispersion"]["zi_odds"] * math.exp(step))
            g1 = self._expected(st["eta"], st["var"], shifted)[3]["zi_odds"] * shifted["zi_odds"]
            g0 = st["pgrad"]["zi_odds"] * st["dispersion"]["zi_odds"]
            zi = self.parameters.zi_design
            j = d + len(self.parameters.dispersion_names)
            out[j:, j:] = -zi.T @ (((g1 - g0) / step)[:, None] * zi)
        return out

    def _glmm_objective(self, vector):
        """`-ELBO` at the optimal `q` for `vector`, with the envelope gradient."""
        lambdas = self.parameters.lambdas(vector)
        dispersion = self.parameters.dispersion(vector)
        state = self._fit_q(lambdas, dispersion, self._warm_start(lambdas))
        if state is None:
            return math.inf, np.full(len(vector), np.nan)
        s = self.structure
        level_g = s.level_sums(state["g"])
        cross_hh = state["cross"] if np.array_equal(state["hh"], state["h"]) else s.cross_products(state["hh"])
        grads = self._lambda_gradients(lambdas, state["u"], level_g, cross_hh, state["cov"])
        pgrad = {k: state["pgrad"][k] * dispersion[k] for k in dispersion}  # d / d log
        gradient = self.parameters.gradient(grads, pgrad)
        state.update(vector=vector, lambdas=lambdas, dispersion=dispersion, value=-state["elbo"],
                     level_score=level_g)
        self._last = state
        return -state["elbo"], -gradient

    # ================================================================ the fit
    def start(self, lambdas, beta=None, dispersion=None, u=None, zi=None):
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
        """
        with self._threads():
            return self._start(lambdas, beta, dispersion, u, zi)

    def _start(self, lambdas, beta=None, dispersion=None, u=None, zi=None):
        s = self.structure
        ordered = [np.asarray(lambdas[s.order.index(b)], dtype=np.float64) for b in range(s.num_random)]
        ordered = [np.where(np.tril(np.ones_like(l)) > 0, l, 0.0) for l in ordered]
        for b, block in enumerate(s.random_blocks):
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
            eta = self.offset + self.structure.fixed_block.z @ start_beta
            unit = float(np.sqrt(np.mean(np.square(eta)))) if len(eta) else 1.0
            self.parameters.unit = unit if np.isfinite(unit) and unit > 0 else 1.0
        if self.parameters.num_zi and zi is None:
            constant = math.log((dispersion or {}).get("zi_odds", 1.0))
            zi = np.linalg.lstsq(self.parameters.zi_design, np.full(self.num_rows, constant), rcond=None)[0]
        vector = self.parameters.pack(ordered, dispersion, zi)
        curvature = None
        if self.conjugate:
            objective = self._conjugate_objective
            curvature = self._conjugate_curvature
        else:
            if u is None:
                u = [np.zeros((block.num_levels, block.num_effects)) for block in s.random_blocks]
            else:
                u = [np.asarray(u[s.order.index(b)], dtype=np.float64) for b in range(s.num_random)]
            beta = np.zeros(self.num_fixed) if beta is None else np.asarray(beta, dtype=np.float64)
            start_dispersion = {k: v for k, v in (dispersion or {}).items()
                                if k in self.parameters.dispersion_names}
            if self.parameters.num_zi:
                start_dispersion["zi_odds"] = self.parameters.dispersion(vector)["zi_odds"]
            self._inner_start = dict(u=u, beta=beta, h=self._start_weights(beta, u, ordered, start_dispersion))
            objective = self._glmm_objective
            curvature = self._glmm_curvature
        # A GLMM's ELBO is only as precise as its inner Newton loop (1e-11 relative):
        # its outer tolerance is looser, and its working-model curvature only starts BFGS.
        self.optimizer = BoundedBFGS(
            objective, vector, self.parameters.lower, curvature=curvature, refresh=self.conjugate,
            tolerance=1e-12 if self.conjugate else 1e-10, canonical=self._canonical_vector,
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

    def _start_weights(self, beta, u, lambdas, dispersion):
        """Row weights `-f''` at the starting linear predictor (no posterior variance yet)."""
        eta = self._linear_predictor(lambdas, u, beta)
        return np.maximum(self._expected(eta, np.zeros_like(eta), dispersion)[2], 0.0)

    def _accept(self):
        """Keeps the state of the optimizer's current point (the last accepted)."""
        if self.conjugate:
            if not np.array_equal(self._last["vector"], self.optimizer.x):
                self._conjugate_objective(self.optimizer.x)
        else:
            if not np.array_equal(self._last["vector"], self.optimizer.x):
                self._glmm_objective(self.optimizer.x)
            last = self._last
            self._inner_start = dict(u=last["u"], beta=last["beta"], h=last["h"], lambdas=last["lambdas"])
        self.state = self._last

    def _threads(self):
        """One BLAS thread for small dense blocks (see `SMALL_DENSE`)."""
        if self.system.num_dense < SMALL_DENSE:
            return _blas().limit(limits=1, user_api="blas")
        return contextlib.nullcontext()

    def step(self):
        """One quasi-Newton iteration; returns `report()`.

        Variance parameters on the profiled ELBO first; once that converges, where
        the design allows, all parameters on the exact log-likelihood.
        """
        with self._threads():
            return self._step()

    @property
    def _many_parameters(self):
        return self.parameters.num_theta > MANY_PARAMETERS

    def _step(self):
        if self._many_parameters and self.optimizer.iterations == 0 and self.polishes == 0:
            self.polishes += 1
            self.optimizer = self._restart(self._polish(self.optimizer.x))
        self.optimizer.step()
        if self.phase == "variational":
            self._accept()
            if self.optimizer.converged and self.quadrature is not None:
                self._start_quadrature()
                if self.phase == "quadrature":
                    return self.report()
        else:
            self._accept_quadrature()
        if self.optimizer.converged and self.check is None:
            self._verify()
        return self.report()

    # ================================================================ convergence
    def _verify(self):
        """Checks the optimizer's end point (`convergence.check`); where the check fails,
        goes on by L-BFGS-B and a fresh quasi-Newton start, at most `MAX_POLISHES` times.

        The bounded BFGS method with the average-information curvature reaches
        everyday optima in a handful of iterations, but on maximal models (two 8 x 8
        covariance matrices, flat directions, many entries heading for a bound) it
        can stop hundreds of nats short: its curvature model stops describing the
        objective and the line search finds nothing along its direction. Measured on
        kb07's maximal model (72 parameters): the BFGS end point -14494.6, then
        L-BFGS-B -14293.1588 in 132 evaluations (lme4's bobyqa: -14293.1588 in 222 s);
        see `benchmarks/bench_optimizers.py`.
        """
        x = self.optimizer.x.copy()
        free, hessian = self._hessian(x)
        names = [self._parameter_names()[j] for j in free]
        if hessian is None:
            result = convergence.check(np.full(len(free), np.nan), np.full((len(free),) * 2, np.nan), names)
        else:
            result = convergence.check(self.optimizer.g[free], hessian, names)
        if result.negative_eigenvalues and hessian is not None:
            escaped = self._escape(x, free, hessian)
            if escaped is None:
                result = result.without_unconfirmed_negatives()
        approximate = self.phase == "quadrature" and not self.quadrature_status.get("exact")
        # A quadrature rule not verified exact has a gradient only as good as the rule:
        # going on from its optimum costs evaluations and means nothing more.
        final = self.polishes >= MAX_POLISHES or approximate
        if result.passed:
            start = None if final else self._restart_from_bounds(x)
            if start is None:
                self.check = result
                self._land_on_bounds()
                return
        elif final:
            self.check = result
            return
        else:
            start = self._polish(escaped if result.negative_eigenvalues else x)
        self.polishes += 1
        self.optimizer = self._restart(start)
        self._covariance_cache = None
        if self.phase == "variational":
            self._accept()
        else:
            self._accept_quadrature()

    def _parameter_names(self):
        names = list(self.parameters.names)
        if self.phase == "quadrature":
            names = [f"beta[{j}]" for j in range(self.num_fixed)] + names
        return names

    def _polish(self, x):
        """L-BFGS-B (scipy) from `x` on the current phase's objective: the best point it saw,
        or `x` where nothing beat the optimizer's current value."""
        best, value = lbfgsb(self.optimizer.function, x, self.optimizer.lower)
        return best if value < self.optimizer.f else x

    def _land_on_bounds(self):
        """Puts the entries a hair above their bound (below lme4's singularity tolerance) on it.

        Near a bound the objective is flat to second order in a diagonal entry of
        `Lambda` (it depends on its square), so the optimizer stops where the change
        is below its precision, e.g. a correlation of -0.999999999 where the ML
        covariance has rank one; on the bound the fit is singular exactly, as lme4's.
        Taken only where `f` does not rise by more than 1e-10 (1 + |f|).
        """
        opt = self.optimizer
        bounded = np.isfinite(opt.lower)
        near = bounded & (opt.x > opt.lower) & (opt.x - np.where(bounded, opt.lower, 0.0) < SINGULAR_TOLERANCE)
        if not near.any():
            return
        if not opt.take_bounds(near, slack=1e-10):
            opt.function(opt.x)  # the state of the current point again
        if self.phase == "variational":
            self._accept()
        else:
            self._accept_quadrature()

    def _restart_from_bounds(self, x):
        """Leaves a bound where the second-order conditions fail there; the end point, or None.

        lme4's singular fits land on a bound by design, and gradient methods stop on
        one that is no optimum: at a covariance factor `Lambda` whose column `j` is
        zero (from the canonical point, `_canonical_vector`: the diagonal entry on
        its bound carries the column with it), the objective depends on that column
        `c` only through `Sigma = Lambda Lambda'`, so its gradient in `c` vanishes and
        `f(c) = f_0 + c' G c + O(|c|^4)` with `G = df/dSigma` on the rows from `j` on.
        A negative eigenvalue of `G` is a direction into the interior along which
        `f` decreases: the column is set there (scaled by a line search on `f`) and
        L-BFGS-B goes on from it. `G`'s column `i` is the column-`j` gradient at
        `c = h e_i`, `2 h G e_i`: one evaluation per row.
        """
        par = self.parameters
        offset = len(x) - len(par.lower)  # the fixed effects before them (exact-ML phase)
        function = self.optimizer.function
        base = x.copy()
        base[offset:] = self._canonical_vector(x[offset:])
        f0 = function(base)[0]
        best, best_f = None, min(f0, self.optimizer.f) - 1e-6
        for sl, (rows, cols) in zip(par.slices, par.positions):
            index = {(r, c): offset + sl.start + n for n, (r, c) in enumerate(zip(rows, cols))}
            for j in sorted({int(c) for r, c in zip(rows, cols) if r == c}):
                if base[index[j, j]] > 0:
                    continue
                column = [index[i, j] for i in range(j, max(rows) + 1) if (i, j) in index]
                h = 1e-2
                curvature = np.zeros((len(column), len(column)))
                for a, position in enumerate(column):
                    trial = base.copy()
                    trial[position] = h
                    curvature[:, a] = function(trial)[1][column] / (2.0 * h)
                values, vectors = np.linalg.eigh(0.5 * (curvature + curvature.T))
                if not values[0] < -1e-8 * (1.0 + abs(f0)):
                    continue
                direction = vectors[:, 0] * (1.0 if vectors[0, 0] >= 0 else -1.0)  # diagonal entry >= 0
                scale = max(1.0, float(np.max(np.abs(base[offset:]))))
                for length in (1.0, 0.3, 0.1, 0.03, 0.01):
                    trial = base.copy()
                    trial[column] = length * scale * direction
                    value = evaluate_safely(function, trial)[0]
                    if np.isfinite(value) and value < f0 - 1e-10 * (1.0 + abs(f0)):
                        end = self._polish(trial)
                        end_f = function(end)[0]
                        if end_f < best_f:
                            best, best_f = end, end_f
                        break
        function(x)  # the state of the current point again
        return best

    def _escape(self, x, free, hessian):
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
        function = self.optimizer.function
        f0 = self.optimizer.f
        lower = self.optimizer.lower
        scale = max(1.0, float(np.max(np.abs(x))) if len(x) else 1.0)
        for length in (1.0, 0.3, 0.1, 0.03, 0.01, 0.001):
            for sign in (1.0, -1.0):
                trial = np.maximum(x + sign * length * scale * direction, lower)
                value = evaluate_safely(function, trial)[0]
                if np.isfinite(value) and value < f0 - 1e-10 * (1.0 + abs(f0)):
                    function(x)  # the state of the current point again
                    return trial
        function(x)
        return None

    def _restart(self, x):
        """A fresh bounded BFGS method at `x` on the current phase's objective (its probes
        of the bounds run again before convergence is declared)."""
        old = self.optimizer
        curvature = None if self._many_parameters else old.curvature
        return BoundedBFGS(old.function, x, old.lower, curvature=curvature, refresh=old.refresh,
                           tolerance=old.tolerance, canonical=old.canonical)

    # ================================================================ exact ML
    def _initial_quadrature_status(self, agq_points):
        """What the fit will say of the exact-ML phase before it is planned."""
        if self.conjugate:
            what = "REML" if self.reml else "ML"
            return {"estimator": f"exact {what} (gaussian, identity link: the posterior is exact)", "exact": True}
        if agq_points == 0:
            why = "agq_points=0 stops at the variational fit"
        elif design_of(self.structure) is None:
            why = ("its random effects do not factorize into one term of at most 2 effects or two nested "
                   "scalar terms, so no exact ML by adaptive quadrature")
        else:
            why = "the variational fit has not converged yet"
        return {"estimator": f"Gaussian VI (joint posterior): {why}", "exact": False, "ran": False}

    def _quadrature_objective(self, vector):
        """`-log L` by adaptive quadrature, and its gradient, at `(beta, theta, log dispersion)`."""
        p = self.num_fixed
        beta, rest = vector[:p], vector[p:]
        lambdas = self.parameters.lambdas(rest)
        dispersion = self.parameters.dispersion(rest)
        params = dict(self.fixed_params)
        params.update(dispersion)
        began = time.perf_counter()
        try:
            value, grads = self.quadrature.log_likelihood(beta, lambdas, params)
        except np.linalg.LinAlgError:
            return math.inf, np.full(len(vector), np.nan)
        finally:
            # The measured cost per node, for the node check's time estimates.
            self._quadrature_clock[0] += time.perf_counter() - began
            self._quadrature_clock[1] += self.quadrature.nodes_per_evaluation()
            self._quadrature_clock[2] += 1
        if not np.isfinite(value):
            return math.inf, np.full(len(vector), np.nan)
        log_grad = {k: grads["params"].get(k, 0.0) * dispersion[k] for k in dispersion}
        gradient = np.concatenate([grads["beta"], self.parameters.gradient(grads["lambdas"], log_grad)])
        self._quadrature_last = dict(vector=vector, beta=beta, lambdas=lambdas, dispersion=dispersion,
                                     value=-value, grads=grads)
        return -value, -gradient

    def _describe_points(self, points=None):
        q = self.quadrature
        points = q.points if points is None else points
        if q.kind == "single":
            k = q.inner.num_effects
            each = f"{points[0]} nodes" + (f" per dimension ({points[0]}^{k} per level)" if k > 1 else "")
            return f"{each} on '{q.dimensions[0]}'"
        return f"{points[0]} nodes on '{q.dimensions[0]}' x {points[1]} on '{q.dimensions[1]}'"

    def _seconds_per_evaluation(self):
        """One evaluation's time at the current rule, measured on a sample of clusters.

        The modes' Newton steps touch each row once per step (timed over all rows);
        the rule's part, `rows x nodes` entries, is timed on the first clusters up
        to 200,000 entries and scaled to all of them.
        """
        q = self.quadrature
        st = self.state
        params = dict(self.fixed_params)
        params.update(st["dispersion"])
        chunks = q._chunks
        try:
            q._chunks = []
            q.log_likelihood(st["beta"], st["lambdas"], params)  # the modes, from cold
            began = time.perf_counter()
            q.log_likelihood(st["beta"], st["lambdas"], params)  # from warm, as in the fit
            modes = time.perf_counter() - began
            per_row = q.nodes_per_row()
            last = int(np.searchsorted(np.cumsum(q.cluster_rows), max(1, 200_000 // per_row))) + 1
            last = min(last, q.num_clusters)
            sample = q._chunk(0, last)
            q._chunks = [sample]
            began = time.perf_counter()
            q.log_likelihood(st["beta"], st["lambdas"], params)
            nodes = max(time.perf_counter() - began - modes, 0.0)
        except (np.linalg.LinAlgError, ValueError):
            return math.inf
        finally:
            q._chunks = chunks
            q.modes = None
        return modes + nodes * q.nodes_per_evaluation() / max(len(sample.rows) * per_row, 1)

    def _plan_quadrature(self):
        """Whether the exact-ML phase runs: its cost model, and a status saying why.

        Time: `AGQ_EVALUATIONS` evaluations at the measured cost of one, against
        `AGQ_COST_RATIO` times the variational fit's own time (at least the time of
        `AGQ_FREE_NODES` row-nodes). Memory: one evaluation's `rows x nodes` arrays
        (`AdaptiveQuadrature.bytes_per_evaluation`) against `memory_budget`. By
        default both must hold; with `agq_points=N` it runs in chunks of clusters
        within `memory_budget` whatever the time, unless one cluster alone exceeds it.
        """
        q = self.quadrature
        vi_seconds = time.perf_counter() - self._created
        need = q.bytes_per_evaluation()
        least = q.largest_cluster_bytes()
        per_evaluation = self._seconds_per_evaluation()
        estimate = AGQ_EVALUATIONS * per_evaluation
        allowance = max(AGQ_COST_RATIO * vi_seconds, AGQ_FREE_NODES * per_evaluation / q.nodes_per_evaluation())
        per_node = per_evaluation / max(q.nodes_per_evaluation(), 1)
        plan = {"vi_seconds": vi_seconds, "estimate_seconds": estimate, "estimate_bytes": need,
                "allowance_seconds": math.inf if self.agq_forced else allowance,
                # The same allowance in row-nodes, for the node check: robust to the load changing.
                "allowance_nodes": math.inf if self.agq_forced else allowance / max(per_node, 1e-15),
                "points": list(q.points), "exact": False}
        problems = []
        if self.memory_budget is not None and least > self.memory_budget:
            problems.append(f"its largest cluster alone needs {least / 2**20:.1f} MiB at {self._describe_points()}, "
                            f"beyond memory_budget={self.memory_budget / 2**20:.1f} MiB")
        elif not self.agq_forced:
            if estimate > allowance:
                problems.append(f"it would take ~{estimate:.1f} s ({AGQ_EVALUATIONS} evaluations of "
                                f"{q.structure.num_rows:,} rows x {q.nodes_per_row():,} nodes, {per_evaluation:.2f} s "
                                f"each) against {vi_seconds:.1f} s for the variational fit (limit "
                                f"{AGQ_COST_RATIO:g}x)")
            if self.memory_budget is not None and need > self.memory_budget:
                problems.append(f"one evaluation's (rows x nodes) arrays need {need / 2**30:.2f} GiB, beyond "
                                f"memory_budget={self.memory_budget / 2**30:.2f} GiB")
        plan["run"] = not problems
        if problems:
            how = ("raise memory_budget" if least > (self.memory_budget or math.inf) else
                   f"agq_points={q.points[-1]} asks for it (in chunks within memory_budget)")
            plan["estimator"] = ("Gaussian VI (joint posterior): exact ML by adaptive quadrature not run: "
                                 + "; ".join(problems) + f"; {how}")
            plan["reason"] = "; ".join(problems)
        return plan

    def _start_quadrature(self):
        """Starts the exact-ML phase from the VI optimum, with its curvature, if the
        cost guard allows (`_plan_quadrature`); otherwise the VI fit is the answer."""
        self._quadrature_clock = [0.0, 0, 0]
        plan = self._plan_quadrature()
        plan["ran"] = plan["run"]
        self.quadrature_status = plan
        if not plan["run"]:
            if self.agq_forced:
                warnings.warn(plan["estimator"], RuntimeWarning, stacklevel=2)
            self.quadrature = None
            return
        self._quadrature_began = time.perf_counter()
        self._quadrature_clock = [0.0, 0, 0]
        self._settled = [False] * len(self.quadrature.points)
        st = self.state
        vector = np.concatenate([st["beta"], st["vector"]])
        lower = np.concatenate([np.full(self.num_fixed, -np.inf), self.parameters.lower])
        p = self.num_fixed
        inverse = np.zeros((len(vector), len(vector)))
        covariance = self.fixed_covariance()
        inverse[:p, :p] = covariance if np.all(np.isfinite(covariance)) else np.eye(p)
        try:
            curvature = self._glmm_curvature(st["vector"])
            inverse[p:, p:] = np.linalg.inv(curvature + 1e-8 * np.eye(len(curvature)))
        except np.linalg.LinAlgError:
            inverse[p:, p:] = np.eye(len(vector) - p) * 0.01
        self.phase = "quadrature"
        self._vi_state = st
        self.optimizer = BoundedBFGS(self._quadrature_objective, vector, lower, tolerance=1e-10,
                                     inverse_hessian=inverse)
        self._accept_quadrature()

    def _accept_quadrature(self):
        if not np.array_equal(self._quadrature_last["vector"], self.optimizer.x):
            self._quadrature_objective(self.optimizer.x)
        last = self._quadrature_last
        moments = last["grads"]["moments"]
        u = [m for m, _ in moments]
        eta = self._linear_predictor(last["lambdas"], u, last["beta"])
        self.state = dict(last, u=u, cov={(b, b): c for b, (_, c) in enumerate(moments)}, eta=eta,
                          elbo=-last["value"], ell=last["grads"]["expected_log_likelihood"],
                          kl=last["grads"]["expected_log_likelihood"] + last["value"])
        if self.optimizer.converged and not self.quadrature_status.get("checked"):
            self._check_nodes()

    def _check_nodes(self):
        """Whether the rule is exact at its optimum: one more rung per dimension.

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
        """
        q = self.quadrature
        status = self.quadrature_status
        x = self.optimizer.x.copy()
        f0 = self.optimizer.f
        kept = self._quadrature_last
        order = list(range(len(q.points)))[::-1]  # nested: inner first
        for d in order:
            if self._settled[d]:
                continue
            old_points = list(q.points)
            trial = list(q.points)
            trial[d] = next_points(trial[d])
            # Row-nodes this rung would take (its check, and re-optimizing if it moves).
            rung = q.nodes_per_evaluation(trial) * (1 + AGQ_EVALUATIONS / 2)
            remaining = status["allowance_nodes"] - self._quadrature_clock[1]
            seconds_per_node = self._quadrature_clock[0] / max(self._quadrature_clock[1], 1)
            limit = None
            if q.nodes_per_row(trial) > AGQ_MAX_NODES:
                limit = f"{q.nodes_per_row(trial):,} nodes per row are more than AGQ_MAX_NODES={AGQ_MAX_NODES:,}"
            elif self.memory_budget is not None and q.largest_cluster_bytes(trial) > self.memory_budget:
                limit = "its largest cluster alone would need more than memory_budget"
            elif rung > remaining:
                limit = (f"checking and re-optimizing would take ~{rung * seconds_per_node:.1f} s more, beyond the "
                         f"time allowance ({status['allowance_seconds']:.1f} s, {AGQ_COST_RATIO:g}x the "
                         "variational fit)")
            if limit is not None:
                self._finish_check(False, f"not checked at {self._describe_points(trial)}: {limit}; "
                                          f"agq_points={trial[d]} starts there")
                return
            q.set_points(trial)
            f1, g1 = self._quadrature_objective(x)
            free = self.optimizer._free(x, g1)
            h = self.optimizer.inverse_hessian
            if not np.isfinite(f1):
                gain = math.inf
            elif h is None:
                gain = float(np.max(np.abs(np.where(free, g1, 0.0))))
            else:
                gain = 0.5 * float(g1[free] @ h[np.ix_(free, free)] @ g1[free])
            change = abs(f1 - f0) if np.isfinite(f1) else math.inf
            status.setdefault("ladder", []).append(
                {"points": list(trial), "logLik_change": change, "reoptimize_gain": gain})
            if change <= AGQ_TOLERANCE and gain <= AGQ_TOLERANCE:
                self._settled[d] = True
                status.setdefault("checks", []).append(
                    f"checked at {self._describe_points(trial)}: logLik moved {change:.1e}, re-optimizing "
                    f"would gain {gain:.1e} nats")
                q.set_points(old_points)  # the coarser rule is as good: cheaper from here on
                self._quadrature_last = kept
                continue
            if not np.isfinite(f1):
                q.set_points(old_points)
                self._quadrature_last = kept
                self._finish_check(False, f"the log-likelihood is not finite at {self._describe_points(trial)}")
                return
            # Moved: optimize again with the finer rule, from here, with the curvature so far.
            self.optimizer = BoundedBFGS(self._quadrature_objective, x, self.optimizer.lower, tolerance=1e-10,
                                         inverse_hessian=h)
            status["points"] = list(q.points)
            self._settled = [False if j == d else s for j, s in enumerate(self._settled)]
            self._accept_quadrature()
            return
        self._finish_check(True, "; ".join(status.get("checks", [])))

    def _finish_check(self, exact, note):
        status = self.quadrature_status
        seconds = time.perf_counter() - self._quadrature_began
        status.update(checked=True, exact=exact, points=list(self.quadrature.points), seconds=seconds,
                      evaluations=self._quadrature_clock[2])
        rule = self._describe_points()
        ladder = status.get("ladder", [])
        if exact:
            status["estimator"] = f"exact ML by adaptive Gauss-Hermite quadrature, {rule} ({note}; {seconds:.1f} s, {self._quadrature_clock[2]} evaluations)"
        else:
            moved = [r for r in ladder if r["logLik_change"] > AGQ_TOLERANCE or r["reoptimize_gain"] > AGQ_TOLERANCE]
            last = (f"; the last rung moved logLik by {moved[-1]['logLik_change']:.3g} nats" if moved else "")
            status["estimator"] = (f"ML of adaptive Gauss-Hermite quadrature with {rule}, NOT verified exact: "
                                   f"{note}{last} ({seconds:.1f} s)")

    def gradient_norm(self):
        """The largest projected gradient of the objective in the current phase's parameters."""
        pg = self.optimizer.projected_gradient()
        return float(np.max(np.abs(pg))) if len(pg) else 0.0

    @property
    def finished(self):
        """Whether the fit has ended: the final phase's optimizer stopped and its end point was checked."""
        return (self.optimizer is not None and self.optimizer.converged and self.check is not None
                and (self.phase == "quadrature" or self.quadrature is None))

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
        if self.phase != "quadrature":
            return "bound"
        return "quadrature" if self.quadrature_status.get("exact") else "approximate"

    @property
    def estimator(self):
        """A sentence naming the estimator of the fit: exact ML by adaptive quadrature
        (its nodes and their check), a rule not verified, or Gaussian VI and why."""
        status = self.quadrature_status
        if "estimator" in status:
            return status["estimator"]
        if self.phase == "quadrature":
            return (f"ML of adaptive Gauss-Hermite quadrature with {self._describe_points()}, NOT verified exact: "
                    "the fit stopped before its optimum (fit again, or with more epochs)")
        return "Gaussian VI (joint posterior): the fit stopped before the variational optimum"

    # ================================================================ results
    def report(self):
        """The ELBO and its parts (totals) at the current point."""
        st = self.state
        if self.conjugate:
            elbo = -st["value"]
            u2 = float(sum(np.sum(ub**2) for ub in st["u"])) / st["sigma2"]
            k = sum(block.size for block in self.structure.random_blocks)
            kl = 0.5 * (self._trace_random(st["cov"], self.structure.num_random) + u2 - k
                        + st["factor"].logdet_random)
            return {"elbo": elbo, "expected_log_likelihood": elbo + kl, "kl": kl}
        return {"elbo": st["elbo"], "expected_log_likelihood": st["ell"], "kl": st["kl"]}

    @property
    def scale(self):
        """`s`: the residual sd of a gaussian identity-link model, else 1."""
        return math.sqrt(self.state["sigma2"]) if self.conjugate else 1.0

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
        st = self.state
        s = self.structure
        scale2 = self.scale**2
        unit = 1.0
        if not self.conjugate and not self.family.link.unit_scale:
            unit = float(np.sqrt(np.mean(np.square(st["eta"])))) if len(st["eta"]) else 1.0
        out = {"beta": np.asarray(st["beta"]).copy(), "covariances": [], "factors": [],
               "level_means": [], "level_covariances": [], "boundary": []}
        for j in range(s.num_random):
            b = s.order[j]
            lam = st["lambdas"][b]
            out["factors"].append(lam)
            out["covariances"].append(scale2 * lam @ lam.T)
            out["level_means"].append(st["u"][b] @ lam.T)
            out["level_covariances"].append(scale2 * np.einsum("ij,ljk,mk->lim", lam, st["cov"][b, b], lam))
            out["boundary"].append(np.diag(lam) < SINGULAR_TOLERANCE * unit)
        if self.conjugate:
            out["dispersion"] = {"scale": self.scale}
        else:
            out["dispersion"] = dict(self.fixed_params)
            out["dispersion"].update(st["dispersion"])
        if self.parameters.num_zi:
            del out["dispersion"]["zi_odds"]  # per row: `zi` holds its coefficients
            out["zi"] = self.parameters.zi_coefficients(st["vector"]).copy()
        return out

    def fixed_covariance(self):
        """Covariance of the fixed-effect estimates.

        Gaussian identity link: `s^2` times the fixed effects' block of `A^-1` (lme4's
        `vcov`, ML or REML). Other families, after the exact-ML phase: the fixed
        effects' block of the inverse Hessian of the negative log-likelihood in
        all parameters (`_joint_covariance`), so the variance parameters'
        uncertainty is included, as in lme4's `vcov` of a `glmer` fit (its
        `use.hessian`) and glmmTMB's. Otherwise (no exact-ML phase, or that Hessian
        is not positive definite): the Laplace covariance at the optimum,
        `_conditional_covariance`, conditional on the variance parameters.
        """
        with self._threads():
            if self.conjugate:
                return self.state["sigma2"] * self.state["factor"].fixed_covariance()
            if self.phase == "quadrature":
                joint = self._joint_covariance(np.arange(self.num_fixed))
                if np.all(np.isfinite(joint)):
                    return joint
            return self._conditional_covariance()

    def _conditional_covariance(self):
        """The Schur complement of the random effects in the observed information
        `A(-f''(E_q eta))`, inverted: the fixed effects' Laplace covariance given the
        variance parameters."""
        st = self.state
        params = dict(self.fixed_params)
        params.update(st["dispersion"])
        _, _, second, _ = self.family.log_prob_derivatives(self.y, st["eta"], params, trials=self.trials)
        h = np.maximum(-self.weights * second, 0.0)
        try:
            factor = self.system.factor(st["lambdas"], self.structure.cross_products(h))
        except np.linalg.LinAlgError:
            # No curvature left in some direction: separated binary data, whose
            # coefficient heads to infinity (the data check warned, naming it). Its
            # standard error is infinite, not the 1e7 of a rounding error.
            return np.full((self.num_fixed, self.num_fixed), np.nan)
        return factor.fixed_covariance()

    def zi_covariance(self):
        """Covariance of the zero-inflation coefficients on the logit scale, or None.

        The coefficients are `gamma` (with `zi_design`) or the one intercept
        `log(zi_odds)` (a constant zero-inflation); None when the family has none
        to estimate. Their block of `_joint_covariance`: after the exact-ML phase
        glmmTMB's `vcov(fit)$zi` without Laplace's error; otherwise that of the
        negative ELBO profiled over `q` and `beta`, whose inverse Hessian has the
        joint one's block for `gamma` (profiling).
        """
        par = self.parameters
        before = self.num_fixed if self.phase == "quadrature" else 0
        if par.num_zi:
            wanted = np.arange(len(self.optimizer.x) - par.num_zi, len(self.optimizer.x))
        elif "zi_odds" in par.dispersion_names:
            wanted = np.array([before + par.num_theta + par.dispersion_names.index("zi_odds")])
        else:
            return None
        with self._threads():
            return self._joint_covariance(wanted)

    def _joint_covariance(self, wanted):
        """Block `wanted` of the inverse Hessian of the objective the fit ended on.

        The columns of the variance, dispersion and zero-inflation parameters are
        forward differences of the exact gradient (one evaluation each; those on
        a bound, an sd at 0, are held). After the exact-ML phase the objective
        also has the fixed effects, differenced the same way where that costs at
        most `HESSIAN_NODES` quadrature nodes; beyond, their own block is their
        observed information at the optimum given the variance parameters (the
        inverse of `_conditional_covariance`, Laplace's curvature: bacteria's
        intercept SE 0.754 with it against 0.701 exact, guimmun's 16 coefficients
        0.9 s against 8.7 s by differences). Computed once per optimum; NaN where
        the matrix is not positive definite. The solver's state is the current
        point's again afterwards.
        """
        free, hessian = self._hessian(self.optimizer.x)
        covariance = None
        if hessian is not None:
            try:
                covariance = np.linalg.inv(hessian)
            except np.linalg.LinAlgError:
                covariance = None
        nan = np.full((len(wanted), len(wanted)), np.nan)
        if covariance is None or not np.all(np.isin(wanted, free)):
            return nan
        position = np.searchsorted(free, wanted)
        block = covariance[np.ix_(position, position)]
        return block if np.all(np.diag(block) > 0) else nan

    def _hessian(self, x):
        """`(free, H)`: the Hessian of the current phase's objective on the coordinates off
        their bounds, computed once per point (the convergence check and the standard
        errors share it); `H` None where it is not finite.

        The columns of the variance, dispersion and zero-inflation parameters are
        forward differences of the exact gradient (`convergence.hessian_by_differences`).
        After the exact-ML phase the fixed effects' columns are differenced the same way
        where that costs at most `HESSIAN_NODES` quadrature nodes; beyond, their own
        block is their observed information given the variance parameters (see
        `_joint_covariance`). The solver's state is the current point's again afterwards.
        """
        cached = getattr(self, "_covariance_cache", None)
        if cached is not None and np.array_equal(cached[0], x) and cached[1] == self.phase:
            return cached[2]
        x = np.array(x, dtype=np.float64)
        p = self.num_fixed if self.phase == "quadrature" else 0
        if p and 2 * p * self.quadrature.nodes_per_evaluation() <= HESSIAN_NODES:
            p = 0  # the fixed effects' block by differences too
        free = np.flatnonzero(x > self.optimizer.lower)
        function = self.optimizer.function
        hessian = np.zeros((len(free), len(free)))
        result = (free, None)
        try:
            if p:
                hessian[:p, :p] = np.linalg.inv(self._conditional_covariance())
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
        self._covariance_cache = (x.copy(), self.phase, result)
        return result
