"""Likelihood profiles of a gaussian linear mixed model: lme4's `profile` and `confint`.

The deviance of a gaussian identity-link model, as a function of the variance
parameters in lme4's spherical coordinates (`theta`, the entries of the relative
factors `Lambda_t`) and of the residual sd `sigma`, with the fixed effects at their
GLS estimate `beta(theta)` (which does not depend on `sigma`):

```
D(theta, sigma) = log|A_uu(theta)| + r2(theta) / sigma^2 + n log(2 pi sigma^2) - sum log w
```

The engine's `LinearMixed.objective` is `D` with `sigma` profiled out,
`D(theta, sigma_hat(theta)) / 2` with `sigma_hat^2 = r2 / n`, so with
`s2 = sigma_hat^2(theta)` and `D* = 2 LinearMixed.objective(theta)`:

```
D(theta, sigma) = D* + n (log(sigma^2 / s2) + s2 / sigma^2 - 1)
dD/dtheta = the engine's Fisher-identity gradient with the scores taken at sigma
dD/dsigma = 2 n / sigma - 2 r2 / sigma^3
```

A profile is on lme4's scale (`confint(fit, oldNames = FALSE)`): per term its
standard deviations and correlations (`sd_(Intercept)|Subject`,
`cor_Days.(Intercept)|Subject`, ...), the residual `sigma`, then the fixed effects.
For a parameter `phi_j` held at `c` the others are re-optimized (bounded L-BFGS-B:
sds >= 0, correlations in [-1, 1]); for a fixed effect `beta_j = c` its column moves
to the offset and the engine's profiled objective is minimized over `theta`. Then,
as lme4, `zeta(c) = sign(c - phi_hat_j) sqrt(D_j(c) - D_min)`, and the interval at
`level` is where `|zeta| = sqrt(qchisq(level, 1))`: here found by root finding on
`zeta` itself (lme4 interpolates a spline through its trace), and a bound is 0 (an
sd) or +-1 (a correlation) when `zeta` never reaches the cutoff before it.

As lme4, a REML fit is profiled on the ML deviance (lme4's `profile` refits it with
`REML = FALSE`: its intervals for a REML fit equal the ML fit's). Terms with three
or more correlated effects are profiled over correlations whose matrix stays
positive semidefinite (other points count as an infinite deviance).
"""

import math

import numpy as np
import pandas as pd
import scipy.optimize
from scipy import stats

from keras_glmm import response as response_lib
from keras_glmm import results as results_lib
from keras_glmm.engine.quasi_newton import lbfgsb
from keras_glmm.engine.parameters import semidefinite_cholesky
from keras_glmm.engine.solver import VariationalSolver

# Relative step of the forward differences of the map from lme4's scale to theta.
JACOBIAN_STEP = 1e-7
# The largest |zeta| a trace of `profile()` goes to (lme4's default alphamax = 0.01
# reaches about 2.6 for one parameter; a little beyond for plots).
TRACE_ZETA = 3.0
# Points per side of a `profile()` trace.
TRACE_POINTS = 10


def require_gaussian_engine(model, what):
    """The training arrays of a gaussian identity-link model the engine can refit, or a ValueError."""
    if not model.family.is_gaussian_identity:
        raise ValueError(
            f"{what} is computed for gaussian models with the identity link; this model's family is "
            f"{model.family.name!r} with the {model.family.link.name!r} link: use method='Wald' or "
            "method='boot' for confint.")
    x, y = model._require_fit()
    problem = model.engine_problem(len(y))
    if problem is not None:
        raise ValueError(f"{what} refits the model by the engine, which cannot fit it: {problem}.")
    return x, y


def solver_arguments(model, x, y, reml=None):
    """Keyword arguments of the engine's `VariationalSolver` for `model` on `(x, y)`
    (the same as `keras_glmm.fitting.engine.build_solver` builds; plain arrays, so they pickle)."""
    response, trials = response_lib.split(np.asarray(y, "float64"))
    offset = x.get("offset")
    return dict(
        x=np.asarray(x["x"], "float64"), terms=results_lib.engine_terms(model, x), y=response, trials=trials,
        weights=response_lib.prior_weights(x),
        offset=None if offset is None else np.asarray(offset, "float64"),
        reml=model.reml if reml is None else reml, fixed_params=dict(model.head.fixed_params),
        num_points=model.quadrature_points, memory_budget=model.memory_budget, agq_points=model.agq_points,
        zi_design=None if model.zero_inflation is None else np.asarray(x["x_zi"], "float64"),
    )


def variance_names(model):
    """lme4's `confint(oldNames = FALSE)` names of the variance parameters, in its order:
    per term, column by column, an sd and the correlations below it; then `sigma`
    (gaussian). Returns `(names, layout)`, `layout` one `(term, [(kind, row, col)])` per term."""
    names, layout = [], []
    for term in model.terms:
        # lme4 names a `||` term's parts by their grouping factor alone (not Subject.1).
        grp = results_lib.term_group(model, term)
        columns = results_lib.term_columns(model, term)
        entries = []
        k = len(columns)
        for c in range(k):
            entries.append(("sd", c, c))
            names.append(f"sd_{columns[c]}|{grp}")
            if term.covariance == "full":
                for r in range(c + 1, k):
                    entries.append(("cor", r, c))
                    names.append(f"cor_{columns[r]}.{columns[c]}|{grp}")
        layout.append((term, entries))
    if model.family.name == "gaussian":
        names.append("sigma")
    return names, layout


def variance_estimates(model):
    """The fit's variance parameters on lme4's scale, in `variance_names`' order."""
    values = []
    for term, entries in variance_names(model)[1]:
        sd, corr = term.prior_stddev(), term.prior_correlation()
        values += [sd[r] if kind == "sd" else corr[r, c] for kind, r, c in entries]
    if model.family.name == "gaussian":
        values.append(model.sigma())
    return np.asarray(values, "float64")


def covariance_parameters(covariances, layout, sigma=None):
    """Term covariances `Sigma_t` (terms' order) to lme4's scale (`variance_names`' order)."""
    values = []
    for cov, (_, entries) in zip(covariances, layout):
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        for kind, r, c in entries:
            if kind == "sd":
                values.append(sd[r])
            else:
                values.append(cov[r, c] / (sd[r] * sd[c]) if sd[r] > 0 and sd[c] > 0 else np.nan)
    if sigma is not None:
        values.append(sigma)
    return np.asarray(values, "float64")


class GaussianDeviance:
    """`D(theta, sigma)` of a gaussian identity-link fit (ML), on the engine's parameters
    and on lme4's scale (see the module docstring).

    Args:
        model: a fitted gaussian identity-link `GLMM` the engine can refit.
        reml: the REML criterion instead of the ML deviance (None: ML, as lme4's profile).
    """

    def __init__(self, model, reml=False):
        x, y = require_gaussian_engine(model, "A likelihood profile")
        self.model = model
        self.arguments = solver_arguments(model, x, y, reml=reml)
        self.solver = VariationalSolver(family=model.family, **self.arguments)
        self.names, self.layout = variance_names(model)
        self.estimates = variance_estimates(model)
        self.kinds = [kind for _, entries in self.layout for kind, _, _ in entries] + ["sigma"]
        structure = self.solver.structure
        # Term j of the model is block `order[j]` of the engine's structure.
        self.blocks = [structure.order[j] for j in range(len(model.terms))]
        self.minimum = None

    # --------------------------------------------------------- engine scale
    @property
    def dof(self):
        linear_mixed = self.solver.stage
        return linear_mixed.num_observations - (linear_mixed.num_fixed if linear_mixed.reml else 0)

    def value(self, theta, sigma, gradient=False):
        """`D(theta, sigma)`, and `(dD/dtheta, dD/dsigma)` with `gradient=True`."""
        with self.solver.threads():  # one BLAS thread for small dense blocks, as the engine's own fit
            return self._value(theta, sigma, gradient)

    def _value(self, theta, sigma, gradient):
        linear_mixed = self.solver.stage
        half, _ = linear_mixed.objective(theta)
        if not math.isfinite(half):
            return (math.inf, None) if gradient else math.inf
        last = linear_mixed.last
        s2, n = last.sigma2, self.dof
        sigma2 = sigma * sigma
        value = 2.0 * half + n * (math.log(sigma2 / s2) + s2 / sigma2 - 1.0)
        if not gradient:
            return value
        # Fisher's identity at sigma: the scores divided by sigma^2, not by s2.
        residual = linear_mixed.y - last.eta
        level_residual = linear_mixed.structure.level_sums(linear_mixed.weights * residual / sigma2)
        grads = linear_mixed.algebra.lambda_gradients(last.lambdas, last.means, level_residual, linear_mixed.cross,
                                                      last.covariance)
        d_theta = -2.0 * linear_mixed.parameters.gradient(grads)
        d_sigma = 2.0 * n / sigma - 2.0 * n * s2 / sigma**3
        return value, np.append(d_theta, d_sigma)

    # --------------------------------------------------------- lme4's scale
    def engine_point(self, phi):
        """`(theta, sigma)` of a point on lme4's scale, or None where a correlation matrix
        is not positive semidefinite."""
        sigma = phi[-1]
        lambdas = [None] * len(self.layout)
        i = 0
        for j, (term, entries) in enumerate(self.layout):
            k = term.num_effects
            sd = np.zeros(k)
            corr = np.eye(k)
            for kind, r, c in entries:
                if kind == "sd":
                    sd[r] = phi[i]
                else:
                    corr[r, c] = corr[c, r] = phi[i]
                i += 1
            if k > 2 and np.linalg.eigvalsh(corr)[0] < -1e-12:
                return None
            cov = sd[:, None] * corr * sd[None, :]
            lam = semidefinite_cholesky(cov) if term.covariance == "full" else np.diag(sd)
            lambdas[self.blocks[j]] = lam / sigma
        return self.solver.parameters.pack(lambdas), sigma

    def phi_value(self, phi, gradient=False):
        """`D` at a point on lme4's scale, with its gradient there (chain rule through a
        forward-difference Jacobian of the exact map to `(theta, sigma)`)."""
        point = self.engine_point(phi)
        if point is None:
            return (math.inf, np.zeros_like(phi)) if gradient else math.inf
        theta, sigma = point
        if not gradient:
            return self.value(theta, sigma)
        value, grad = self.value(theta, sigma, gradient=True)
        if not math.isfinite(value):
            return value, np.zeros_like(phi)
        base = np.append(theta, sigma)
        out = np.zeros_like(phi)
        for i in range(len(phi)):
            h = JACOBIAN_STEP * max(abs(phi[i]), 1e-3 if self.kinds[i] == "cor" else 1e-3 * abs(phi[-1]))
            # Step inward from a bound: a correlation of +1 or an sd at 0.
            if self.kinds[i] == "cor" and phi[i] + h > 1.0:
                h = -h
            moved = phi.copy()
            moved[i] += h
            other = self.engine_point(moved)
            if other is None:
                moved[i] -= 2 * h
                other, h = self.engine_point(moved), -h
            out[i] = grad @ ((np.append(*other) - base) / h)
        return value, out

    def _bounds(self, i):
        kind = self.kinds[i]
        if kind == "cor":
            return (-1.0, 1.0)
        if kind == "sigma":
            return (1e-8 * self.estimates[-1], None)
        return (0.0, None)

    def _scales(self):
        return np.array([1.0 if k == "cor" else max(abs(v), 1e-3 * self.estimates[-1])
                         for k, v in zip(self.kinds, self.estimates)])

    def minimize(self, fixed=None, start=None):
        """`min D` over lme4's scale with the parameters in `fixed` ({index: value}) held."""
        fixed = fixed or {}
        start = self.estimates if start is None else start
        free = [i for i in range(len(start)) if i not in fixed]
        scales = self._scales()[free]
        phi = start.copy()
        for i, v in fixed.items():
            phi[i] = v

        def objective(z):
            point = phi.copy()
            point[free] = z * scales
            value, grad = self.phi_value(point, gradient=True)
            if not math.isfinite(value):
                return 1e300, np.zeros_like(z)
            return value, grad[free] * scales

        bounds = []
        for i, scale in zip(free, scales):
            low, high = self._bounds(i)
            bounds.append((None if low is None else low / scale, None if high is None else high / scale))
        z0 = np.clip(phi[free] / scales, [b[0] if b[0] is not None else -np.inf for b in bounds],
                     [b[1] if b[1] is not None else np.inf for b in bounds])
        result = scipy.optimize.minimize(objective, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                                         options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 1000})
        phi[free] = result.x * scales
        return float(result.fun), phi

    def fit_minimum(self):
        """`D` at the fit (re-optimized from it on lme4's scale: the smaller of the two)."""
        if self.minimum is None:
            at_fit = self.phi_value(self.estimates)
            value, phi = self.minimize()
            if value < at_fit:
                self.estimates = phi
            self.minimum = min(value, at_fit)
        return self.minimum

    # --------------------------------------------------------- fixed effects
    def fixed_value(self, j, value, start=None):
        """`min D` with the fixed effect `j` held at `value` (its column in the offset)."""
        args = dict(self.arguments)
        x = args["x"]
        args["x"] = np.delete(x, j, axis=1)
        offset = np.zeros(len(x)) if args["offset"] is None else args["offset"]
        args["offset"] = offset + x[:, j] * value
        solver = VariationalSolver(family=self.model.family, **args)
        theta0 = self._theta_hat() if start is None else start

        with solver.threads():  # the engine minimizes half the deviance D
            theta, half = lbfgsb(solver.stage.objective, theta0, solver.parameters.lower,
                                 max_iterations=1000, max_evaluations=15_000)
        return float(2.0 * half), theta

    def _theta_hat(self):
        return self.engine_point(self.estimates)[0]


class Profile:
    """Profiles of every parameter of a gaussian fit on lme4's scale (see the module docstring).

    Args:
        model: the fitted model.
    """

    def __init__(self, model):
        self.model = model
        self.deviance = GaussianDeviance(model, reml=False)
        self.fixef = model.fixef()
        # A REML fit's variance parameters differ from the ML ones; the profile is the
        # ML deviance's, so its centre is the ML optimum (lme4 refits by ML).
        self.minimum = self.deviance.fit_minimum()
        self.names = self.deviance.names + list(self.fixef.index)
        num_fixed = len(self.fixef)
        self._beta_hat = self._ml_beta() if model.reml else self.fixef.to_numpy()
        self._se = np.sqrt(np.diag(model.vcov().to_numpy()))[:num_fixed]

    def _ml_beta(self):
        d = self.deviance
        d.value(*d.engine_point(d.estimates))
        return np.asarray(d.solver.stage.last.beta).copy()

    def estimate(self, i):
        nv = len(self.deviance.names)
        return self.deviance.estimates[i] if i < nv else self._beta_hat[i - nv]

    def _bounds(self, i):
        nv = len(self.deviance.names)
        return self.deviance._bounds(i) if i < nv else (None, None)

    def _step(self, i):
        """A first step away from the estimate: about one standard error."""
        nv = len(self.deviance.names)
        if i >= nv:
            return self._se[i - nv]
        kind, value = self.deviance.kinds[i], self.deviance.estimates[i]
        if kind == "cor":
            return 0.2
        return 0.15 * max(value, 1e-2 * self.deviance.estimates[-1])

    def zeta(self, i, value, start=None):
        """`(zeta, optimum)` of parameter `i` held at `value` (`start`: a warm start)."""
        nv = len(self.deviance.names)
        if i < nv:
            dev, phi = self.deviance.minimize({i: value}, start=start)
        else:
            dev, phi = self.deviance.fixed_value(i - nv, value, start=start)
        centre = self.estimate(i)
        return math.copysign(math.sqrt(max(dev - self.minimum, 0.0)), value - centre), phi

    def side(self, i, direction, cutoff, xtol=1e-10):
        """The value where `zeta` reaches `direction * cutoff`, or the bound first reached.

        Marches out from the estimate, each step aimed by the secant of `zeta` (which is
        close to linear), then brackets the crossing and solves for it (Brent).
        """
        centre = self.estimate(i)
        low, high = self._bounds(i)
        bound = low if direction < 0 else high
        last_value, last_zeta, start = centre, 0.0, None
        step = direction * self._step(i)
        for _ in range(60):
            value = last_value + step
            if bound is not None and (value - bound) * direction >= 0:
                value = bound
            z, start = self.zeta(i, value, start=start)
            if abs(z) >= cutoff:
                warm = start

                def gap(v):
                    return self.zeta(i, v, start=warm)[0] - direction * cutoff
                return scipy.optimize.brentq(gap, min(last_value, value), max(last_value, value), xtol=xtol,
                                             rtol=1e-10)
            if bound is not None and value == bound:
                return bound
            slope = (z - last_zeta) / (value - last_value) if value != last_value else 0.0
            if slope * direction > 1e-12:
                wanted = (direction * cutoff * 1.05 - z) / slope
                step = float(np.clip(wanted, 0.2 * step, 3.0 * step)) if step * wanted > 0 else step
            last_value, last_zeta = value, z
        raise RuntimeError(f"The profile of {self.names[i]} did not reach zeta = {direction * cutoff:.3g} "
                           "in 60 steps.")

    def interval(self, i, level):
        cutoff = math.sqrt(stats.chi2.ppf(level, 1))
        return self.side(i, -1, cutoff), self.side(i, +1, cutoff)

    def trace(self, i, points=TRACE_POINTS, max_zeta=TRACE_ZETA):
        """`(values, zetas)` of parameter `i` from `-max_zeta` to `max_zeta` (or its bounds)."""
        centre = self.estimate(i)
        values, zetas = [centre], [0.0]
        for direction in (-1, 1):
            end = self.side(i, direction, max_zeta, xtol=1e-6 * max(abs(centre), 1e-3))
            start = None
            for v in np.linspace(centre, end, points + 1)[1:]:
                z, start = self.zeta(i, v, start=start)  # warm: each point starts from the last
                values.append(v)
                zetas.append(z)
        order = np.argsort(values)
        return np.asarray(values)[order], np.asarray(zetas)[order]


def parameter_indices(names, parm):
    """Indices of `parm` (None: all; a name, names or integer positions) among `names`."""
    if parm is None:
        return list(range(len(names)))
    if isinstance(parm, (str, int, np.integer)):
        parm = [parm]
    out = []
    for p in parm:
        if isinstance(p, (int, np.integer)):
            if not 0 <= p < len(names):
                raise ValueError(f"`parm` position {p} is outside 0..{len(names) - 1}: the parameters are {names}.")
            out.append(int(p))
        elif p in names:
            out.append(names.index(p))
        elif p == "theta_":  # lme4's shorthand for the variance parameters
            out += [j for j, n in enumerate(names) if n.startswith(("sd_", "cor_")) or n == "sigma"]
        elif p == "beta_":
            out += [j for j, n in enumerate(names) if not (n.startswith(("sd_", "cor_")) or n == "sigma")]
        else:
            raise ValueError(f"`parm` names {p!r}, which is not a parameter of this model: expected one of "
                             f"{names}, 'theta_' or 'beta_'.")
    return out


def profile_frame(model, parm=None):
    """lme4's `as.data.frame(profile(fit, signames = FALSE))`: one row per point, columns
    `.par` (the parameter profiled), `.zeta`, `value` (its value there)."""
    profile = Profile(model)
    rows = []
    for i in parameter_indices(profile.names, parm):
        values, zetas = profile.trace(i)
        rows += [{".par": profile.names[i], ".zeta": z, "value": v} for v, z in zip(values, zetas)]
    return pd.DataFrame(rows, columns=[".par", ".zeta", "value"])


def plot_profile(frame, level=0.95):
    """lme4's `xyplot(profile(fit))`: zeta against each parameter, one panel each,
    with the cutoffs of `level` (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(frame[".par"]))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    cutoff = math.sqrt(stats.chi2.ppf(level, 1))
    for ax, name in zip(axes.flat, names):
        part = frame[frame[".par"] == name]
        ax.plot(part["value"], part[".zeta"], "-o", markersize=2.5)
        for z in (-cutoff, 0.0, cutoff):
            ax.axhline(z, color="grey", linewidth=0.6, linestyle=":" if z else "-")
        ax.set_xlabel(name)
        ax.set_ylabel("zeta")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
