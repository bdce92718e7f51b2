"""Full-batch mean-field Gaussian VI by coordinate ascent: the engine for large in-memory data.

The joint posterior of `keras_glmm.engine.solver` costs a quadrature over every row
per Newton step, many steps per iteration: beyond a few hundred thousand rows of a
binomial or Poisson model that is slower than minibatches. This module fits the
same model with one Gaussian per level and term (mean field across levels and
terms, a full `k x k` covariance within a level), deterministically, by passes of
vector work over the rows:

```
eta_i = x_i' beta + sum_t z_ti' b_t,c(i) + offset_i,     b_tc ~ N(0, Sigma_t)
q(b_tc) = N(m_tc, S_tc)
ELBO = sum_i w_i E_q[log p(y_i | eta_i)] - sum_t sum_c KL(N(m_tc, S_tc) || N(0, Sigma_t))
```

Under `q` each row's linear predictor is Gaussian with mean
`mu_i = x_i' beta + sum_t z_ti' m_t,c(i)` and variance `v_i = sum_t z_ti' S_t,c(i) z_ti`,
so `E_q[log p]` is the family's closed form or Gauss-Hermite quadrature
(`Family.expected_log_prob`). A pass updates each term `t` in turn, given the others:

1. At the current `q`, per row: `g_i = d E_i / d mu_i` and the curvature
   `h_i = -2 d E_i / d v_i` (`-E[f'']` by Price's theorem), both by automatic
   differentiation of the family's own expectation (weighted by the prior weights).
2. Per level, by a segment sum over the rows: `G_c = sum g_i z_i`,
   `H_c = sum h_i z_i z_i'`, `C_c = sum h_i z_i x_i'`; and `X' g`, `X' H X`.
3. Each level's covariance goes to its fixed point given `h`,
   `S_c = A_c^-1` with `A_c = H_c + Sigma_t^-1` (Khan & Lin 2017), and
   `(beta, m_t)` take one joint Newton step: the levels are independent given
   `beta`, so the step is exact in `O(levels)` through the Schur complement
   ```
   (X'HX - sum_c C_c' A_c^-1 C_c) d_beta = X'g - sum_c C_c' A_c^-1 r_c,
   d_m_c = A_c^-1 (r_c - C_c d_beta),      r_c = G_c - Sigma_t^-1 m_c
   ```
   (jointly, so that an intercept and the levels' mean, which the likelihood
   cannot tell apart, do not crawl towards each other pass after pass).
4. The prior's closed-form M-step, `Sigma_t = mean_c (m_c m_c' + S~_c)` over the
   levels with rows (its diagonal for independent effects, `(x || g)`), with the
   level's covariance under the other terms' uncertainty,
   ```
   S~_c = (A_c - sum_{i in c} h_i^2 v_other,i z_i z_i')^-1,    v_other,i = sum_{s != t} z_si' S_s,c(i) z_si
   ```
   Mean field's `S_c` ignores that a row's levels of crossed terms are estimated
   together (its variances are too small, and EM's sds with them: 2.3% low for the
   items of the 10M-row benchmark); `S~_c` is the joint posterior's marginal
   covariance to first order: the Schur complement of the other terms' levels,
   exact when each pair of levels shares one row and the other levels' precision
   is their mean-field one. It is also what `ranef`'s conditional variances report.

Free dispersion parameters (a negative binomial's `theta`, a gaussian's `sigma`)
take a Newton step in their logarithm with the first term's evaluation (the KL does
not depend on them).

EM crawls where levels have few rows (their posteriors follow the prior: the
error of a variance shrinks by a rate `r` near 1 per pass), so the M-step's change
of the log sds is over-relaxed by `omega = 1 / (1 - r)`, with `r` measured from
successive changes (`CoordinateAscent._relax`); the ELBO then need not rise at
every pass. The fit stops when a pass changes the ELBO by less than `tolerance`
per row (or than float32's rounding of it) and no sd by more than `SD_TOLERANCE`
(relative), and is called converged once its end check (`PassCheck`: the last
pass's Newton steps below `STEP_TOLERANCE` posterior sds, every level's posterior
proper) passes; where it fails the passes go on, and a fit that ends without it
says why.

Each term's update is one XLA-compiled pass over the rows in float32 (the sums in
float64): gathers of the levels' moments, the family's expectation and its
gradient, and the segment sums, fused into one loop: about 30 ns a row on this
project's 2-core machine, against 150 ns and more for the same in numpy.

Without a closed form, under the logit link, the quadrature takes as few nodes as the rows' largest
posterior sd allows (`keras_glmm.gauss_hermite.nodes_for_sd`: the rule's error
for a log-likelihood analytic in a strip of half-width `pi` about the real axis,
the logit's, is at most `(K - 1)! (sd / pi)^(2K)`), for `QUADRATURE_ERROR`, at
most the family's own number (a model's `quadrature_points` is taken as given).

The posterior covariance of the fixed effects (`fixed_covariance`) adds each
term's share: `H^-1 + sum_t [(X'HX - sum_c C_c' A_c^-1 C_c)^-1 - H^-1]`, exact for
one term and for terms whose levels are nearly orthogonal (crossed factors of many
levels).

Nothing here imports Keras or the model; the solver has the interface the model's
fit by the engine drives (`start`, `step`, `results`, `report`).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from keras_glmm.gauss_hermite import NODES_MARGIN, nodes_for_sd

# A pass that changes the ELBO by less than this per row ends the fit.
TOLERANCE = 1e-9
# The quadrature error (per row, of E[log p]) that chooses the number of nodes.
QUADRATURE_ERROR = 1e-9
# The least variance of a row's linear predictor in the derivatives (its gradient
# in the variance is that of the quadrature rule, 0 at a variance of exactly 0).
VARIANCE_FLOOR = 1e-8
# Passes before a fit that has not converged stops (the model's `epochs` may set fewer).
MAX_PASSES = 200
# The largest over-relaxation of the variances' M-step (`CoordinateAscent._relax`).
MAX_RELAXATION = 30.0
# The relative rounding of a sum of the rows' float32 values (float32's epsilon is 6e-8).
FLOAT32_NOISE = 1e-7
# The largest change of a log sd in the last pass's M-step at convergence.
SD_TOLERANCE = 1e-5
# lme4's isSingular: an sd below this (relative to the largest of its term).
SINGULAR_TOLERANCE = 1e-4
# The end check: the last pass's Newton steps of the levels' means and the fixed
# effects, in their posterior sds, at most this (`PassCheck`).
STEP_TOLERANCE = 1e-3


@dataclasses.dataclass
class PassCheck:
    """The end check of coordinate ascent, where the ELBO's change says it has stopped.

    The fixed point of the passes is where each term's Newton step of `(beta, m_t)`
    vanishes (the ELBO's gradient in them is 0), each level's covariance is its
    curvature's inverse and the M-step leaves the sds where they are (the ELBO's
    gradient in `Sigma_t` is 0: the M-step is its exact maximizer given `q`). The
    check reads the last pass: its Newton steps in posterior sds (Newton's steps
    shrink quadratically, so the distance left is far smaller than the last step),
    the sds' last relative change, and whether every level's posterior covariance
    is positive definite (the ELBO concave in that level's mean: a maximum, not a
    saddle). It costs no pass over the rows.

    Attributes:
        passed: every part below its tolerance.
        largest_step: the largest step, in posterior sds.
        component: where (`beta[j]` or a term's name and effect).
        largest_sd_change: the largest relative change of an sd in the last M-step.
        nonpositive_levels: levels whose posterior covariance is not positive definite.
        tolerance: `STEP_TOLERANCE`.
    """

    passed: bool
    largest_step: float
    component: str
    largest_sd_change: float
    nonpositive_levels: int
    tolerance: float = STEP_TOLERANCE

    def message(self):
        """A sentence for a warning: why the check failed, or that it passed."""
        if self.passed:
            return (f"the last pass's steps were below {self.tolerance:g} posterior sds (largest "
                    f"{self.largest_step:.2g}, {self.component}) and every level's posterior is proper")
        parts = []
        if not self.largest_step <= self.tolerance:
            parts.append(f"the last pass moved {self.component} by {self.largest_step:.3g} posterior sds "
                         f"(tol = {self.tolerance:g})")
        if not self.largest_sd_change <= 10 * SD_TOLERANCE:
            parts.append(f"an sd changed by {self.largest_sd_change:.3g} (relative) in the last pass")
        if self.nonpositive_levels:
            parts.append(f"{self.nonpositive_levels} level(s) have a posterior covariance that is not positive "
                         "definite")
        return "Model failed to converge: " + "; ".join(parts)

    def as_dict(self):
        return dataclasses.asdict(self)


class _Term:
    """A random-effect term: each row's level, its columns `z` (None for the intercept's 1)."""

    def __init__(self, name, index, covariates, intercept, num_levels, full):
        self.name = name
        self.index = tf.constant(np.asarray(index, np.int32))
        covariates = [] if covariates is None else np.asarray(covariates, np.float32).reshape(len(index), -1).T
        self.columns = ([None] if intercept else []) + [tf.constant(c) for c in covariates]
        self.size = len(self.columns)
        self.num_levels = int(num_levels)
        self.full = bool(full)
        self.observed = np.bincount(np.asarray(index), minlength=self.num_levels) > 0
        # The largest `|z_i|^2`: with the largest eigenvalue of the levels' S, a bound on rows' variance.
        self.largest_square = float(intercept) + (float(np.max(np.sum(covariates**2, axis=0)))
                                                  if len(covariates) else 0.0)
        if self.size == 0:
            raise ValueError(f"Term '{name}' has no columns: neither an intercept nor covariates.")


def _times(column, values):
    """`z * values`, where a column of None is the intercept's 1."""
    return values if column is None else column * values


class CoordinateAscent:
    """Mean-field Gaussian VI of a GLMM by coordinate ascent over its terms (see module docstring).

    Args:
        x: `(rows, p)` fixed-effect design.
        terms: one `(name, level_index, covariates, intercept, num_levels, full)` per
            term: `covariates` `(rows, k')` or None, `intercept` whether the term has
            one, `full` whether its covariance is full (else diagonal).
        response: `(rows,)` response.
        family: a `keras_glmm.families.Family`.
        trials: binomial trials per row, or None.
        weights: prior weights per row, or None.
        offset: per-row offset of the linear predictor, or None.
        fixed_params: dispersion parameters held fixed.
        num_points: quadrature nodes (None: chosen per pass, see module docstring).
        tolerance: the ELBO change per row that ends the fit.
    """

    likelihood = "bound"
    posterior = "mean-field"
    check = None
    estimator = "Gaussian VI (mean-field, full batch: coordinate ascent over the terms)"

    def __init__(self, x, terms, response, family, trials=None, weights=None, offset=None,
                 fixed_params=None, num_points=None, tolerance=TOLERANCE):
        x = np.asarray(x)
        self.num_rows, self.num_fixed = x.shape
        self.family = family
        self.fixed_params = {k: float(v) for k, v in (fixed_params or {}).items()}
        self.free_params = [p for p in family.dispersion_params if p not in self.fixed_params]
        self.num_points = num_points
        self.tolerance = float(tolerance)
        self.terms = [_Term(*term) for term in terms]
        data = {"x": tf.constant(x, tf.float32), "y": tf.constant(np.asarray(response), tf.float32)}
        for key, value in (("trials", trials), ("weights", weights), ("offset", offset)):
            if value is not None:
                data[key] = tf.constant(np.asarray(value, np.float32).reshape(-1))
        self._data = data
        self._kernels = {}
        self.finished = False
        self.converged = False
        self.passes = 0

    # ------------------------------------------------------------------ the pass over rows
    def _kernel(self, target, nodes):
        """The XLA-compiled evaluation at `q` and the segment sums of term `target` (see module docstring)."""
        key = (target, nodes)
        if key in self._kernels:
            return self._kernels[key]
        family, terms, free = self.family, self.terms, self.free_params
        fixed = dict(self.fixed_params)
        term = terms[target]

        @tf.function(jit_compile=True)
        def evaluate(data, beta, means, covariances, log_params):
            x = data["x"]
            eta = tf.linalg.matvec(x, beta)
            if "offset" in data:
                eta += data["offset"]
            var = tf.zeros_like(eta)
            other_var = tf.zeros_like(eta)  # the other terms' share of the row's variance
            for s, (other, mean, cov) in enumerate(zip(terms, means, covariances)):
                mean_rows = tf.gather(mean, other.index)
                cov_rows = tf.gather(cov, other.index)
                for a, za in enumerate(other.columns):
                    eta += _times(za, mean_rows[:, a])
                    for b, zb in enumerate(other.columns):
                        share = _times(za, _times(zb, cov_rows[:, a, b]))
                        var += share
                        if s != target:
                            other_var += share
            var = tf.maximum(var, VARIANCE_FLOOR)

            def expected_total(eta, var, log_params):
                params = dict(fixed)
                params.update({name: tf.exp(log_params[j]) for j, name in enumerate(free)})
                params = {k: tf.cast(v, tf.float32) for k, v in params.items()}
                if "weights" in data:
                    value = family.weighted_expected_log_prob(
                        data["y"], eta, var, data["weights"], params, trials=data.get("trials"), num_points=nodes)
                else:
                    value = family.expected_log_prob(data["y"], eta, var, params, trials=data.get("trials"),
                                                     num_points=nodes)
                return tf.reduce_sum(tf.cast(value, tf.float64))

            if free:  # the dispersion parameters' first and second derivatives too
                with tf.GradientTape(persistent=True) as outer:
                    outer.watch(log_params)
                    with tf.GradientTape() as tape:
                        tape.watch([eta, var, log_params])
                        total = expected_total(eta, var, log_params)
                    gradient, d_var, d_params = tape.gradient(total, [eta, var, log_params])
                    d_param_list = [d_params[j] for j in range(len(free))]
                second = tf.stack([outer.gradient(d, log_params)[j] for j, d in enumerate(d_param_list)])
            else:
                with tf.GradientTape() as tape:
                    tape.watch([eta, var])
                    total = expected_total(eta, var, log_params)
                gradient, d_var = tape.gradient(total, [eta, var])
                d_params = second = tf.zeros([0], tf.float64)
            curvature = -2.0 * d_var
            features = [_times(za, gradient) for za in term.columns]
            features += [_times(za, _times(zb, curvature)) for a, za in enumerate(term.columns)
                         for zb in term.columns[a:]]
            features += [_times(za, curvature * x[:, j]) for za in term.columns for j in range(x.shape[1])]
            coupling = curvature * curvature * other_var
            features += [_times(za, _times(zb, coupling)) for a, za in enumerate(term.columns)
                         for zb in term.columns[a:]]
            level_sums = tf.math.unsorted_segment_sum(
                tf.cast(tf.stack(features, axis=1), tf.float64), term.index, term.num_levels)
            # X'g and the upper triangle of X'HX as one fused reduction, in float64.
            p = x.shape[1]
            weighted = [gradient * x[:, j] for j in range(p)]
            weighted += [curvature * x[:, a] * x[:, b] for a in range(p) for b in range(a, p)]
            global_sums = tf.reduce_sum(tf.cast(tf.stack(weighted, axis=1), tf.float64), axis=0)
            largest = tf.reduce_max(var)
            return total, level_sums, global_sums, d_params, second, largest

        self._kernels[key] = evaluate
        return evaluate

    def _evaluate(self, target):
        nodes = self.num_points
        if nodes is None and self.family.link.name != "logit":
            # The rule's bound needs the logit's strip of analyticity (|Im eta| < pi):
            # other links keep their family's own number of nodes.
            nodes = self.family.quadrature_points
        if nodes is None:
            # Each number of nodes compiles the kernels anew: chosen for a margin over the rows'
            # largest sd, and raised only when the sd outgrows the margin.
            largest_sd = math.sqrt(self._largest_var)
            family_nodes = self.family.quadrature_points
            if self._nodes is None or nodes_for_sd(largest_sd, family_nodes, QUADRATURE_ERROR) > self._nodes:
                self._nodes = nodes_for_sd(NODES_MARGIN * largest_sd, family_nodes, QUADRATURE_ERROR)
            nodes = self._nodes
        out = self._kernel(target, nodes)(
            self._data, tf.constant(self.beta, tf.float32),
            [tf.constant(m, tf.float32) for m in self.means],
            [tf.constant(s, tf.float32) for s in self.covariances],
            tf.constant(self.log_params, tf.float64),
        )
        total, level_sums, global_sums, d_params, second, largest = (np.asarray(o, np.float64) for o in out)
        self._largest_var = float(largest)
        p = self.num_fixed
        upper = np.triu_indices(p)
        xhx = np.zeros((p, p))
        xhx[upper] = global_sums[p:]
        xhx[upper[1], upper[0]] = global_sums[p:]
        return dict(ell=float(total), level_sums=level_sums, xg=global_sums[:p], xhx=xhx, d_params=d_params,
                    second=second)

    # ------------------------------------------------------------------ the ELBO's KL
    def _kl(self):
        """`sum_t sum_c KL(N(m_c, S_c) || N(0, Sigma_t))`."""
        total = 0.0
        for term, mean, cov, prior in zip(self.terms, self.means, self.covariances, self.priors):
            precision = np.linalg.inv(prior)
            _, logdet_prior = np.linalg.slogdet(prior)
            _, logdet = np.linalg.slogdet(cov)
            trace = np.einsum("ab,lba->l", precision, cov)
            quad = np.einsum("la,ab,lb->l", mean, precision, mean)
            total += 0.5 * float(np.sum(trace + quad - term.size + logdet_prior - logdet))
        return total

    # ------------------------------------------------------------------ the updates
    def _newton_step(self, target, state):
        """`S_c` at its fixed point given `h`, and the joint Newton step of `(beta, m_t)`."""
        term = self.terms[target]
        k, p = term.size, self.num_fixed
        sums = state["level_sums"]
        num_levels = term.num_levels
        upper = np.triu_indices(k)
        gradient = sums[:, :k]
        curvature = np.zeros((num_levels, k, k))
        curvature[:, upper[0], upper[1]] = sums[:, k:k + len(upper[0])]
        curvature[:, upper[1], upper[0]] = sums[:, k:k + len(upper[0])]
        start = k + len(upper[0])
        cross = sums[:, start:start + k * p].reshape(num_levels, k, p)
        coupling = np.zeros((num_levels, k, k))
        coupling[:, upper[0], upper[1]] = sums[:, start + k * p:]
        coupling[:, upper[1], upper[0]] = sums[:, start + k * p:]
        precision = np.linalg.inv(self.priors[target])
        system = curvature + precision
        inverse = np.linalg.inv(system)
        # The levels' marginal covariance under the other terms' uncertainty (for the M-step).
        self._marginal[target] = np.linalg.inv(system - np.minimum(coupling, 0.9 * curvature))
        mean = self.means[target]
        residual = gradient - mean @ precision
        inverse_cross = inverse @ cross
        inverse_residual = np.einsum("lab,lb->la", inverse, residual)
        schur = state["xhx"] - np.einsum("lkp,lkq->pq", cross, inverse_cross)
        beta_step = np.linalg.solve(schur, state["xg"] - np.einsum("lkp,lk->p", cross, inverse_residual))
        mean_step = inverse_residual - np.einsum("lkp,p->lk", inverse_cross, beta_step)
        self._schur[target] = schur
        self._xhx = state["xhx"]
        self._steps[target] = self._largest_steps(target, beta_step, mean_step, inverse, schur)
        return beta_step, mean_step, inverse

    def _largest_steps(self, target, beta_step, mean_step, inverse, schur):
        """`(largest step in posterior sds, where)` of a term's Newton step, for `PassCheck`."""
        term = self.terms[target]
        sds = np.sqrt(np.maximum(np.diagonal(inverse, axis1=1, axis2=2), 1e-300))
        scaled = np.abs(mean_step) / sds
        level, effect = np.unravel_index(int(np.argmax(scaled)), scaled.shape) if scaled.size else (0, 0)
        largest = (float(scaled[level, effect]) if scaled.size else 0.0, f"level {level} of '{term.name}' "
                   f"(effect {effect})")
        try:
            fixed_sds = np.sqrt(np.maximum(np.diag(np.linalg.inv(schur)), 1e-300))
        except np.linalg.LinAlgError:
            return largest
        fixed = np.abs(beta_step) / fixed_sds
        if fixed.size and float(np.max(fixed)) > largest[0]:
            largest = (float(np.max(fixed)), f"beta[{int(np.argmax(fixed))}]")
        return largest

    def _end_check(self):
        """The `PassCheck` of the last pass."""
        step, component = max(self._steps, key=lambda pair: pair[0])
        sd_change = max(float(np.max(np.abs(c))) for c in self._last_change)
        nonpositive = 0
        for cov in self.covariances:
            try:
                np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                nonpositive += int(np.sum(np.linalg.eigvalsh(cov)[:, 0] <= 0))
        passed = step <= STEP_TOLERANCE and sd_change <= 10 * SD_TOLERANCE and not nonpositive
        return PassCheck(bool(passed), step, component, sd_change, nonpositive, STEP_TOLERANCE)

    def _m_step(self, target):
        """`Sigma_t = mean_c (m_c m_c' + S_c)`, its sds over-relaxed (see `_relax`)."""
        term = self.terms[target]
        mean, cov = self.means[target][term.observed], self._marginal[target][term.observed]
        prior = (np.einsum("la,lb->ab", mean, mean) + cov.sum(axis=0)) / max(len(mean), 1)
        if not term.full:
            prior = np.diag(np.diag(prior))
        old_sd = np.maximum(np.sqrt(np.diag(self.priors[target])), 1e-12)
        sd = np.sqrt(np.maximum(np.diag(prior), 1e-300))
        correlation = prior / np.outer(sd, sd)
        self._gradient[target] = float(np.max(np.abs(len(mean) * ((sd / old_sd) ** 2 - 1.0))))
        sd = old_sd * np.exp(self._relax(target, np.log(sd / old_sd)))
        self.priors[target] = correlation * np.outer(sd, sd)

    def _relax(self, target, change):
        """The M-step's change of the log sds, over-relaxed: `omega * change`.

        EM moves a variance linearly to its optimum, `e_{k+1} = r e_k`, at a rate `r`
        near 1 when levels have few rows (their posteriors follow the prior).
        Over-relaxed by `omega`, the error contracts by `1 - omega (1 - r)`, which the
        ratio `rho` of successive EM changes measures; so `1 - r = (1 - rho) / omega`
        and the next `omega = 1 / (1 - r)`, in `[1, MAX_RELAXATION]`.
        """
        last = self._last_change[target]
        omega = self._relaxation[target]
        if last is not None:
            safe = np.where(np.abs(last) > 1e-12, last, 1.0)
            ratio = np.where(np.abs(last) > 1e-12, change / safe, 0.0)
            # At most doubled per pass: the first passes' changes are not yet EM's linear regime.
            omega = np.clip(omega / (1.0 - np.minimum(ratio, 0.99)), 1.0, np.minimum(2.0 * omega, MAX_RELAXATION))
        self._relaxation[target] = omega
        self._last_change[target] = change
        return omega * change

    def _param_step(self, state):
        """A Newton step of the free dispersion parameters' logarithms (their ELBO is concave near the optimum)."""
        if not self.free_params:
            return np.zeros(0)
        second = state["second"]
        step = np.where(second < 0, -state["d_params"] / np.where(second < 0, second, -1.0),
                        np.sign(state["d_params"]) * 0.1)
        return np.clip(step, -1.0, 1.0)

    # ------------------------------------------------------------------ the solver interface
    def start(self, lambdas, beta, u, dispersion=None, **unused):
        """Starts from the model's weights: `Sigma_t = Lambda_t Lambda_t'`, `m = Lambda_t u`, `S_c = Sigma_t`.

        (Non-gaussian models' spherical coordinates have scale 1; a gaussian's scale is
        a free dispersion parameter here, and `Lambda_t` relative to it.)
        """
        scale = float((dispersion or {}).get("scale", self.fixed_params.get("scale", 1.0)))
        if not self.family.is_gaussian_identity:
            scale = 1.0
        self.beta = np.asarray(beta, np.float64).reshape(-1)
        self.priors, self.means, self.covariances = [], [], []
        for term, lam, coords in zip(self.terms, lambdas, u):
            lam = np.asarray(lam, np.float64) * scale
            prior = lam @ lam.T
            prior = prior + 1e-8 * np.eye(term.size) * max(float(np.max(np.diag(prior))), 1e-8)
            self.priors.append(prior)
            self.means.append(np.asarray(coords, np.float64).reshape(term.num_levels, term.size) @ lam.T)
            self.covariances.append(np.broadcast_to(prior, (term.num_levels, term.size, term.size)).copy())
        self.log_params = np.array([math.log(float((dispersion or {})[p])) for p in self.free_params])
        self._largest_var = sum(float(np.max(np.linalg.eigvalsh(prior))) * term.largest_square
                                for term, prior in zip(self.terms, self.priors))
        self._nodes = None
        self._relaxation = [np.ones(term.size) for term in self.terms]
        self._last_change = [None] * len(self.terms)
        self._schur = [None] * len(self.terms)
        self._steps = [(0.0, "")] * len(self.terms)
        self.check = None
        self._marginal = [None] * len(self.terms)
        self._gradient = [0.0] * len(self.terms)
        self._xhx = None
        self._elbos = []
        self.passes = 0
        return self.step()

    def step(self):
        """One pass: each term's update in turn (see module docstring)."""
        elbos = []
        for target in range(len(self.terms)):
            state = self._evaluate(target)
            elbos.append((state["ell"] - self._kl(), state["ell"]))
            beta_step, mean_step, covariance = self._newton_step(target, state)
            self.beta = self.beta + beta_step
            self.means[target] = self.means[target] + mean_step
            self.covariances[target] = covariance
            if target == 0:
                self.log_params = self.log_params + self._param_step(state)
            self._m_step(target)
        elbo, ell = elbos[0]
        self._report = dict(elbo=elbo, expected_log_likelihood=ell, kl=ell - elbo)
        self._elbos.append(elbo)
        self.passes += 1
        if self.passes == 1:
            # The start's levels hold the prior's variance; their posteriors' are far smaller:
            # the nodes are chosen once more (one more compilation, fewer nodes in every pass).
            self._nodes = None
        # Over-relaxed, the ELBO need not rise at every pass: the sds must have settled too.
        settled = max(float(np.max(np.abs(c))) for c in self._last_change) < SD_TOLERANCE
        # The rows' values are float32: their sum is exact to about FLOAT32_NOISE of itself.
        tolerance = max(self.tolerance * self.num_rows, FLOAT32_NOISE * abs(elbo))
        stopped = len(self._elbos) >= 2 and abs(self._elbos[-1] - self._elbos[-2]) < tolerance and settled
        if stopped or self.passes >= MAX_PASSES:
            # Where the ELBO has stopped but the check fails, the passes go on (to MAX_PASSES).
            self.check = self._end_check()
            self.converged = self.check.passed
            self.finished = self.converged or self.passes >= MAX_PASSES
        return self._report

    def report(self):
        """The ELBO (and its parts) at the start of the last pass."""
        return dict(self._report)

    def gradient_norm(self):
        """The largest gradient of the ELBO in a log sd before the last M-step (`L_t (mean(m^2 + S) / sigma^2 - 1)`)."""
        return max(self._gradient)

    def results(self):
        """The estimates in the engine's format (`VariationalSolver.results`)."""
        boundary = []
        for prior in self.priors:
            sd = np.sqrt(np.maximum(np.diag(prior), 0.0))
            boundary.append(sd < SINGULAR_TOLERANCE * max(float(sd.max()), 1e-300))
        dispersion = {name: math.exp(v) for name, v in zip(self.free_params, self.log_params)}
        return {"beta": self.beta.copy(), "covariances": [p.copy() for p in self.priors],
                "level_means": [m.copy() for m in self.means],
                "level_covariances": [c.copy() for c in self._marginal],
                "dispersion": dispersion, "boundary": boundary}

    def fixed_covariance(self):
        """The fixed effects' posterior covariance: each term's share added (see module docstring)."""
        if self._xhx is None or any(s is None for s in self._schur):
            return None
        base = np.linalg.pinv(self._xhx)
        return base + sum(np.linalg.pinv(schur) - base for schur in self._schur)

    def zi_covariance(self):
        return None
