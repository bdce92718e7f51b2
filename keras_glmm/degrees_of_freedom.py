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

Kenward-Roger (pbkrtest) is not implemented: `ddf="Kenward-Roger"` is a ValueError
naming Satterthwaite.
"""

import numpy as np
import pandas as pd
from scipy import stats

from keras_glmm.profile import GaussianDeviance

DDF_METHODS = ("Satterthwaite",)
# Relative step of the central differences (of an analytic gradient and of C).
STEP = 1e-4


def _fixed_covariance(deviance, v):
    """`sigma^2 (A^-1)_beta` at `v = (theta, sigma)`."""
    theta, sigma = v[:-1], v[-1]
    deviance.value(theta, sigma)
    return sigma * sigma * deviance.solver._last["factor"].fixed_covariance()


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
    return float(np.sqrt(deviance.solver._last["sigma2"]))


def coef_table(model, ddf):
    """The coefficient table with `df` and `Pr(>|t|)` by the method `ddf`."""
    if ddf == "Kenward-Roger":
        raise ValueError("ddf='Kenward-Roger' (pbkrtest) is not implemented: use ddf='Satterthwaite' "
                         "(lmerTest's default; on sleepstudy both give 17.0 df).")
    if ddf not in DDF_METHODS:
        raise ValueError(f"`ddf` must be None, 'Satterthwaite' or 'Kenward-Roger'. Received: ddf={ddf!r}")
    return satterthwaite(model)
