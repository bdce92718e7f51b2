"""Denominator degrees of freedom of a gaussian linear mixed model's t tests (lmerTest).

Satterthwaite's approximation as lmerTest computes it (Kuznetsova, Brockhoff &
Christensen 2017): with the variance parameters `v = (theta, sigma)` (lme4's
`theta` and the residual sd), `C(v) = vcov(beta)` at `v` and `A = 2 H^-1`, `H` the
Hessian of the deviance (the REML criterion of a REML fit, `-2 log L` of an ML
fit) in `v` at the optimum, a contrast `L` (here each coefficient, `L = e_j`) has

```
df = 2 (L' C L)^2 / (g' A g),     g = d(L' C L) / dv
```

and `t = L' beta / sqrt(L' C L)` is referred to Student's t with `df`. `H` is the
central difference of the analytic gradient of `D(theta, sigma)`
(`keras_glmm.profile.GaussianDeviance`), `g` that of `C(v) = sigma^2 (A^-1)_beta`
from the engine's factorization. The df does not depend on how `v` is parameterized
(a delta method), so the engine's `theta` gives lmerTest's numbers.

Kenward-Roger as pbkrtest computes it (Kenward & Roger 1997; Halekoh & Hojsgaard
2014), for REML fits: the marginal covariance `V = sum_i s_i G_i` is linear in the
covariance parameters `s` (each term's variances and covariances, and the residual
variance; `G_i` the `Z`-patterns they multiply), `Phi = (X'V^-1 X)^-1`,
`P_i = -X'V^-1 G_i V^-1 X`, `Q_ij = X'V^-1 G_i V^-1 G_j V^-1 X`, `W` the inverse of
the expected REML information `tr(P G_i P G_j) / 2` (`P` the REML projection); the
adjusted covariance `Phi_A = Phi + 2 Phi (sum_ij W_ij (Q_ij - P_i Phi P_j)) Phi` and,
for each coefficient (`L = e_j`, `q = 1`), `A1`, `A2`, `B`, `g`, `c1..c3`, `E*`, `V*`
give the df `m = 4 + 3 / (rho - 1)`, `rho = V* / (2 E*^2)`; the Std. Error is
`sqrt(Phi_A,jj)` and `t = beta_j / sqrt(Phi_A,jj)`, as lmerTest reports them. `V` is dense (`n x n`): up to `KR_MAX_ROWS` rows.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats

from keras_glmm.profile import GaussianDeviance

DDF_METHODS = ("Satterthwaite", "Kenward-Roger")
# Kenward-Roger holds the marginal covariance of the rows as a dense matrix.
KR_MAX_ROWS = 4000
# Relative step of the central differences (of an analytic gradient and of C).
STEP = 1e-4


def _fixed_covariance(deviance, v):
    """`sigma^2 (A^-1)_beta` at `v = (theta, sigma)`."""
    theta, sigma = v[:-1], v[-1]
    deviance.value(theta, sigma)
    return sigma * sigma * deviance.solver.stage.last.factor.fixed_covariance()


def satterthwaite(model):
    """lmerTest's `coef(summary(fit, ddf = "Satterthwaite"))` of a gaussian identity-link fit:
    Estimate, Std. Error, df, t value, Pr(>|t|)."""
    deviance = GaussianDeviance(model, reml=model.reml)
    # The fit's own optimum (the engine stops at a relative gradient of 1e-12); a REML
    # fit's sigma is REML's `r2 / (n - p)` at its theta.
    theta, sigma = deviance.engine_point(deviance.estimates)
    if model.reml:
        sigma = _reml_sigma(deviance, theta)
    v = np.append(theta, sigma)
    steps = STEP * np.maximum(np.abs(v), 1e-2 * sigma)
    d = len(v)
    hessian = np.empty((d, d))
    jac = []
    for i in range(d):
        up, down = v.copy(), v.copy()
        up[i] += steps[i]
        down[i] -= steps[i]
        g_up = deviance.value(up[:-1], up[-1], gradient=True)[1]
        g_down = deviance.value(down[:-1], down[-1], gradient=True)[1]
        hessian[:, i] = (g_up - g_down) / (2 * steps[i])
        jac.append((_fixed_covariance(deviance, up) - _fixed_covariance(deviance, down)) / (2 * steps[i]))
    hessian = 0.5 * (hessian + hessian.T)
    a = 2.0 * np.linalg.pinv(hessian)
    cov = _fixed_covariance(deviance, v)
    table = model.coef_table()  # Estimate, Std. Error and t value of the fit itself
    df = np.empty(len(table))
    for j in range(len(table)):
        g = np.array([jj[j, j] for jj in jac])
        df[j] = 2.0 * cov[j, j] ** 2 / float(g @ a @ g)
    t = table["t value"].to_numpy()
    return pd.DataFrame({"Estimate": table["Estimate"], "Std. Error": table["Std. Error"], "df": df,
                         "t value": t, "Pr(>|t|)": 2.0 * stats.t.sf(np.abs(t), df)}, index=table.index)


def _reml_sigma(deviance, theta):
    """A REML fit's `sigma^2 = r2 / (n - p)` at `theta` (the profiled REML optimum)."""
    deviance.value(theta, 1.0)
    return float(np.sqrt(deviance.solver.stage.last.sigma2))


def _covariance_patterns(model, x):
    """`(s, G)`: the covariance parameters at the fit and their `n x n` patterns."""
    n = len(x["x"])
    values, patterns = [], []
    for term in model.terms:
        index = np.asarray(x[term.name]).reshape(-1)
        indicator = (index[:, None] == np.arange(term.num_levels)[None, :]).astype("float64")
        z = np.ones((n, 1)) if term.intercept else np.zeros((n, 0))
        if term.num_covariates:
            z = np.concatenate([z, np.asarray(x[term.name + "_z"], "float64").reshape(n, -1)], axis=1)
        cov = term.prior_covariance()
        same = indicator @ indicator.T  # rows of the same level
        for a in range(term.num_effects):
            for b in range(a + 1):
                if a != b and term.covariance != "full":
                    continue
                outer = np.outer(z[:, a], z[:, b])
                patterns.append(same * (outer + outer.T if a != b else outer))
                values.append(cov[a, b])
    weights = x.get("weights")
    w = np.ones(n) if weights is None else np.asarray(weights, "float64").reshape(-1)
    patterns.append(np.diag(1.0 / w))
    values.append(model.sigma() ** 2)
    return np.asarray(values), patterns


def kenward_roger(model):
    """pbkrtest's Kenward-Roger df, adjusted Std. Error and t of each coefficient (see the
    module docstring): Estimate, Std. Error, df, t value, Pr(>|t|)."""
    if not model.family.is_gaussian_identity or not model.reml:
        raise ValueError("ddf='Kenward-Roger' is defined for REML fits of gaussian identity-link models (as "
                         "pbkrtest's): refit with reml=True, or use ddf='Satterthwaite'.")
    x, y = model._require_fit()
    n = len(y)
    if n > KR_MAX_ROWS:
        raise ValueError(f"ddf='Kenward-Roger' holds the rows' covariance as a dense {n} x {n} matrix; it is "
                         f"computed up to KR_MAX_ROWS={KR_MAX_ROWS} rows: use ddf='Satterthwaite'.")
    X = np.asarray(x["x"], "float64")
    s, G = _covariance_patterns(model, x)
    V = sum(si * gi for si, gi in zip(s, G))
    Vinv = np.linalg.inv(V)
    VX = Vinv @ X
    phi = np.linalg.inv(X.T @ VX)
    proj = Vinv - VX @ phi @ VX.T
    VG = [Vinv @ g for g in G]
    P = [-(VX.T @ g @ VX) for g in G]
    PG = [proj @ g for g in G]
    k = len(G)
    info = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            info[i, j] = info[j, i] = 0.5 * np.sum(PG[i] * PG[j].T)
    W = np.linalg.inv(info)
    U = np.zeros_like(phi)
    for i in range(k):
        for j in range(k):
            Q = VX.T @ G[i] @ VG[j] @ VX
            U += W[i, j] * (Q - P[i] @ phi @ P[j])
    phi_a = phi + 2.0 * phi @ U @ phi
    table = model.coef_table()
    beta = table["Estimate"].to_numpy()
    p = len(beta)
    out = {"se": np.empty(p), "df": np.empty(p), "t": np.empty(p)}
    q = 1.0
    for j in range(p):
        L = np.zeros((1, p))
        L[0, j] = 1.0
        theta = L.T @ np.linalg.inv(L @ phi @ L.T) @ L
        M = [theta @ phi @ Pi @ phi for Pi in P]
        traces = np.array([np.trace(m) for m in M])
        A1 = float(traces @ W @ traces)
        A2 = float(sum(W[i, jj] * np.sum(M[i] * M[jj].T) for i in range(k) for jj in range(k)))
        B = (A1 + 6.0 * A2) / (2.0 * q)
        g = ((q + 1.0) * A1 - (q + 4.0) * A2) / ((q + 2.0) * A2)
        d = 3.0 * q + 2.0 * (1.0 - g)
        c1, c2, c3 = g / d, (q - g) / d, (q + 2.0 - g) / d
        e_star = 1.0 / (1.0 - A2 / q)
        v_star = 2.0 / q * (1.0 + c1 * B) / ((1.0 - c2 * B) ** 2 * (1.0 - c3 * B))
        rho = v_star / (2.0 * e_star**2)
        m = 4.0 + (q + 2.0) / (q * rho - 1.0)
        se = math.sqrt(phi_a[j, j])
        out["se"][j], out["df"][j], out["t"][j] = se, m, beta[j] / se
    return pd.DataFrame({"Estimate": beta, "Std. Error": out["se"], "df": out["df"], "t value": out["t"],
                         "Pr(>|t|)": 2.0 * stats.t.sf(np.abs(out["t"]), out["df"])}, index=table.index)


def coef_table(model, ddf):
    """The coefficient table with `df` and `Pr(>|t|)` by the method `ddf`."""
    if ddf not in DDF_METHODS:
        raise ValueError(f"`ddf` must be None, 'Satterthwaite' or 'Kenward-Roger'. Received: ddf={ddf!r}")
    if ddf == "Kenward-Roger":
        return kenward_roger(model)
    return satterthwaite(model)
