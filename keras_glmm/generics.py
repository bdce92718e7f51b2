"""lme4's generics on a fitted GLMM: estimates, their covariance, the likelihood and inference.

`Lme4Generics` is a mixin of `keras_glmm.model.GLMM`; each method reads what a fit
left on the model (`fit_summary_`, the engine's record `_engine_fit`, the training
rows) and hands the work to the module of its concept:

```
fixef, vcov, coef_table, ranef, varcorr, coef, report   keras_glmm.results (+ .ordinal, .degrees_of_freedom)
logLik, nobs, deviance, AIC, BIC, sigma                  here, from fit_summary_ and the dispersion
confint, bootMer, update, drop1                          keras_glmm.inference
profile, plot_profile                                    keras_glmm.profile
plot_ranef, plot_residuals                               keras_glmm.plots
fitted, residuals                                        the model's predictions (keras_glmm.prediction)
```
"""

import math

import numpy as np
import pandas as pd

from keras_glmm import degrees_of_freedom, estimates, frames, inference, plots
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import profile as profile_lib
from keras_glmm import response as response_lib
from keras_glmm import results as results_lib
from keras_glmm import streaming
from keras_glmm.layers.fixed_effects import VariationalFixedEffects


def _component(component):
    """glmmTMB's model component: `"cond"` (conditional) or `"zi"` (zero-inflation); or an
    ordinal model's `"thresholds"` (clmm's `fit$alpha`)."""
    if component not in ("cond", "zi", "thresholds"):
        raise ValueError(f"`component` must be 'cond' or 'zi' (or an ordinal model's 'thresholds'). "
                         f"Received: component={component!r}")
    return component


class Lme4Generics:
    """lme4's generics (`fixef`, `vcov`, `logLik`, `confint`, ...) of a fitted `GLMM`."""

    # ----------------------------------------------------------- the estimates
    @property
    def posterior_kind(self):
        """`"joint"` after a fit by the engine's joint posterior, `"mean-field"` after
        stochastic VI or full-batch coordinate ascent."""
        return "mean-field" if self._engine_fit is None else self._engine_fit.get("posterior", "joint")

    def _require_fit(self):
        if self._training_arrays is None and self._training_source is not None:
            raise streaming.fitted_from_files_error(self._training_source)
        if self._training_arrays is None:
            raise ValueError("The model has not been fitted: call `fit` first.")
        return self._training_arrays

    def coefficients(self):
        """Fixed-effect estimates (posterior means), `(p,)` float64, in the columns of `x`."""
        recorded = estimates.current(self)  # the engine's own float64 values
        if recorded is not None:
            return recorded["beta"].copy()
        return self._weight_coefficients().astype("float64")

    def _weight_coefficients(self):
        if isinstance(self.fixed_effects, VariationalFixedEffects):
            return self.fixed_effects.coefficients()[0]
        weights = self.fixed_effects.get_weights()
        kernel = weights[0].reshape(-1)
        return np.concatenate([weights[1].reshape(-1), kernel]) if len(weights) > 1 else kernel

    def dispersion(self):
        """The family's dispersion parameters as floats (e.g. `{"scale": 0.755}`)."""
        params = {k: float(v) for k, v in self.head.params().items()}
        recorded = estimates.current(self)  # the engine's own float64 values
        if recorded is not None:
            params.update({k: v for k, v in recorded["dispersion"].items() if k in params})
        return params

    # -------------------------------------------------------------- results
    def fixef(self, component="cond"):
        """Fixed-effect estimates as a pandas Series in design-column order (lme4's fixef).

        Args:
            component: `"cond"` (the conditional model's, lme4's `fixef`) or `"zi"`
                (a zero-inflated family's zero-inflation coefficients, on the logit
                scale of `pi`: glmmTMB's `fixef(fit)$zi`; a constant zero-inflation
                has one, `(Intercept)` = `log(zi_odds)`).
        """
        if _component(component) == "zi":
            return pd.Series(self.zi_coefficients(), index=results_lib.zi_names(self), name="Estimate")
        if ordinal_lib.is_ordinal(self.family):  # clmm's fit$beta (no intercept) and fit$alpha
            return ordinal_lib.thresholds(self) if component == "thresholds" else ordinal_lib.fixef(self)
        if component == "thresholds":
            raise ValueError(f"component='thresholds' is an ordinal model's; family {self.family.name!r} has none.")
        return pd.Series(self.coefficients(), index=results_lib.fixed_names(self), name="Estimate")

    def zi_coefficients(self):
        """The zero-inflation coefficients `gamma` (logit of `pi`), `(q,)`; see `fixef(component="zi")`."""
        if "zi_odds" not in self.family.dispersion_params:
            raise ValueError(f"Family {self.family.name!r} has no zero-inflation: it is not zero-inflated.")
        if self.zero_inflation is not None:
            recorded = estimates.current(self)
            if recorded is not None and recorded["zi"] is not None:
                return recorded["zi"].copy()
            return self.zero_inflation.get_weights()[0].reshape(-1).astype("float64")
        return np.array([math.log(self.dispersion()["zi_odds"])])

    def vcov(self, component="cond"):
        """Covariance of the fixed-effect estimates (DataFrame).

        After a fit by the engine: for a gaussian model lme4's `vcov` (ML or REML),
        `sigma^2` times the fixed effects' block of the posterior precision's
        inverse; for other families the Laplace covariance at the optimum (see
        `VariationalSolver.fixed_covariance`), computed once per fit. After
        stochastic VI: `results.fixed_vcov`, from the training rows.

        `component="zi"`: that of the zero-inflation coefficients (glmmTMB's
        `vcov(fit)$zi`), from a fit by the engine: the inverse of a
        finite-difference Hessian of the objective it ended on, the exact
        log-likelihood where adaptive quadrature applies (see
        `VariationalSolver.zi_covariance`); NaN where that Hessian is not positive
        definite.
        """
        if _component(component) == "thresholds":
            cov = None if self._engine_fit is None else self._engine_fit.get("threshold_vcov")
            if cov is None:
                raise ValueError("Standard errors of the thresholds come from a fit by the engine that ends on "
                                 "the exact likelihood (adaptive quadrature: one grouping factor, agq_points > 0).")
            names = list(self.fixef(component).index)
            return pd.DataFrame(cov, index=names, columns=names)
        if _component(component) == "zi":
            names = results_lib.zi_names(self)
            cov = None if self._engine_fit is None else self._engine_fit.get("zi_vcov")
            if cov is None:
                if "zi_odds" in self.head.fixed_params:
                    raise ValueError("`zi_odds` is held fixed: it has no standard error.")
                raise ValueError("Standard errors of the zero-inflation coefficients come from a fit by the "
                                 "engine (posterior='auto' or 'joint', in memory).")
            return pd.DataFrame(cov, index=names, columns=names)
        names = results_lib.fixed_names(self)
        if self._engine_fit is not None:
            cov = self._engine_fit["vcov"]
        else:
            x, y = self._require_fit()
            cov = results_lib.fixed_vcov(self, x, y)
        if ordinal_lib.is_ordinal(self.family):
            return ordinal_lib.vcov(self, cov)
        return pd.DataFrame(cov, index=names, columns=names)

    def is_singular(self):
        """lme4's `isSingular`: whether a standard deviation is 0 or a correlation +-1."""
        return bool(results_lib.singular_components(self))

    def coef_table(self, component="cond", ddf=None):
        """Estimate, Std. Error, z value and Pr(>|z|) of each fixed effect; for a gaussian
        identity-link model Estimate, Std. Error and t value, as lme4's summary.
        `component="zi"`: the zero-inflation coefficients' (glmmTMB's zero-inflation model).
        `ddf="Satterthwaite"` (a gaussian identity-link fit by the engine, ML or REML) or
        `"Kenward-Roger"` (REML) adds lmerTest's `df` and `Pr(>|t|)` (`keras_glmm.degrees_of_freedom`)."""
        if ddf is not None:
            if _component(component) == "zi":
                raise ValueError("`ddf` applies to the conditional model's fixed effects (component='cond').")
            return degrees_of_freedom.coef_table(self, ddf)
        gaussian = self.family.is_gaussian_identity
        if _component(component) != "cond":
            gaussian = False
        return results_lib.coef_table(self.fixef(component), self.vcov(component).values, t_values=gaussian)

    # lme4's generics -----------------------------------------------------
    def _summary(self):
        if self.fit_summary_ is None:
            raise ValueError("The model has not been fitted: call `fit` first.")
        return self.fit_summary_

    def logLik(self):  # noqa: N802 - lme4's name
        """lme4's `logLik`: the log-likelihood at the fit (the REML criterion for REML fits).

        Exact for a gaussian model fitted by the engine, and for a GLMM the engine
        finished by adaptive quadrature; otherwise the ELBO, a lower bound of it
        (`fit_summary_["likelihood"]` says which).
        """
        return float(self._summary()["elbo"])

    def nobs(self):
        """lme4's `nobs`: the number of observations fitted."""
        return int(self._summary()["nobs"])

    def deviance(self):
        """`-2 logLik`, lme4's `deviance` of a maximum-likelihood fit."""
        return -2.0 * self.logLik()

    def AIC(self):  # noqa: N802 - lme4's name
        """`-2 logLik + 2 k`, `k` the fixed effects, variance parameters and dispersion."""
        return self.deviance() + 2.0 * self._summary()["num_parameters"]

    def BIC(self):  # noqa: N802 - lme4's name
        """`-2 logLik + log(n) k`."""
        return self.deviance() + math.log(self.nobs()) * self._summary()["num_parameters"]

    # lme4's inference (keras_glmm.inference, .profile, .prediction) -------
    def confint(self, parm=None, level=0.95, method="profile", nsim=500, seed=None, n_jobs=1):
        """lme4's `confint(fit, oldNames = FALSE)`: a DataFrame of intervals, rows `sd_...|g`,
        `cor_...|g`, `sigma`, fixed effects; `method` `"profile"`, `"Wald"` or `"boot"`
        (see `keras_glmm.inference.confint`)."""
        return inference.confint(self, parm=parm, level=level, method=method, nsim=nsim, seed=seed,
                                 n_jobs=n_jobs)

    def profile(self, parm=None):
        """lme4's `as.data.frame(profile(fit))`: zeta traces, columns `.par`, `.zeta`, `value`
        (gaussian identity-link fits; see `keras_glmm.profile`)."""
        return profile_lib.profile_frame(self, parm=parm)

    def plot_profile(self, parm=None, level=0.95):
        """lme4's `xyplot(profile(fit))`: a matplotlib Figure of zeta against each parameter."""
        return profile_lib.plot_profile(self.profile(parm=parm), level=level)

    def bootMer(self, nsim=500, seed=None, n_jobs=1):  # noqa: N802 - lme4's name
        """lme4's parametric `bootMer`: every parameter refitted on `nsim` simulated responses
        (a DataFrame, one row per sample; `keras_glmm.inference.bootstrap`)."""
        return inference.bootstrap(self, nsim=nsim, seed=seed, n_jobs=n_jobs)

    def update(self, formula=None, **changes):
        """lme4's `update`: refitted with a new formula (`". ~ . - Days"`) and/or options."""
        return inference.update(self, formula, **changes)

    def drop1(self, test="Chisq"):
        """lme4's `drop1(fit, test = "Chisq")`: a likelihood-ratio test per droppable fixed term."""
        return inference.drop1(self, test=test)

    def sigma(self):
        """lme4's `sigma`: the residual sd of a gaussian model, `1 / sqrt(shape)` of a gamma
        model (its coefficient of variation), 1 for the others."""
        params = self.dispersion()
        if self.family.name == "gaussian":
            return float(params["scale"])
        if "shape" in params:
            return float(1.0 / math.sqrt(params["shape"]))
        return 1.0

    def ranef(self, condvar=True):
        """Per grouping factor a DataFrame of conditional means (and posterior sds)."""
        return results_lib.ranef(self, condvar=condvar)

    def varcorr(self):
        """lme4's `as.data.frame(VarCorr(fit))`: grp, var1, var2, vcov, sdcor."""
        return results_lib.varcorr(self)

    def coef(self):
        """Per grouping factor, each level's coefficients (fixed + random), as lme4's coef."""
        return results_lib.coef(self)

    def report(self):
        """An lme4-like summary (a string; `model.summary()` keeps its Keras meaning)."""
        return results_lib.report(self)

    def plot_ranef(self, max_levels=None, prob=0.95):
        """lme4's `dotplot(ranef(fit, condVar = TRUE))`: a matplotlib Figure (`keras_glmm.plots`)."""
        return plots.ranef_figure(self, max_levels=max_levels, prob=prob)

    def plot_residuals(self):
        """Residuals vs fitted and normal Q-Q plots: a matplotlib Figure (`keras_glmm.plots`)."""
        return plots.residuals_figure(self)

    def fitted(self):
        """Fitted response means of the training rows, random effects included: a Series
        indexed like the training data frame's rows, an array after a fit on arrays."""
        fitted = self.predict_response(None)
        if isinstance(fitted, pd.DataFrame):  # an ordinal model's category probabilities
            return fitted
        return frames.series(np.asarray(fitted), self._rows_index(None), "fitted")

    def residuals(self):
        """Response residuals `y - fitted()` of the training rows (proportions for binomial):
        a Series indexed like the training data frame's rows, an array after a fit on arrays."""
        x, y = self._require_fit()
        return frames.series(response_lib.proportion(y) - np.asarray(self.fitted()), self._rows_index(None),
                             "residuals")

