"""A GLMM from an lme4 formula: `GLMM.from_formula`, `kg.glmm` and a data frame's arrays.

```
formula + data frame  --Design.from_data-->  design  --RandomEffects per term-->  GLMM
formula + files       --streaming.scan---->  design, counts, sample (GLM start)
data frame            --design.arrays----->  the model's input dict and response
```

The functions take the model's class (`keras_glmm.model.GLMM`, or a subclass) or
the model; `GLMM.from_formula`, `kg.glmm` and `GLMM._frame_arrays` call them.
"""

import warnings

import keras
import numpy as np
import pandas as pd

from keras_glmm import checks as checks_lib
from keras_glmm import families as families_lib
from keras_glmm import keywords
from keras_glmm import ordinal as ordinal_lib
from keras_glmm import streaming
from keras_glmm.data_columns import as_frame, frame_fingerprint
from keras_glmm.design import Design
from keras_glmm.fitting import files
from keras_glmm.layers.random_effects import RandomEffects

# `fit`'s options that `glmm` takes beside `from_formula`'s.
FIT_OPTIONS = ("epochs", "callbacks", "verbose", "batch_size", "steps_per_epoch", "shuffle_buffer", "seed")


def from_formula(model_class, formula, data, family="gaussian", link=None, weights=None, reml=False,
                 posterior="auto", na_action="raise", sample_rows=None, ziformula=None, checks=None, **kwargs):
    """Builds a compiled, unfitted GLMM (`model_class`) from an lme4 formula and its data
    (`GLMM.from_formula`).

    Args:
        formula: an lme4 formula, e.g. `"y ~ x + (x | g)"`; see `keras_glmm.formula`.
        data: a pandas DataFrame (the training data: it fixes the level
            vocabularies, the fixed-effects coding and the response coding),
            or files too large for memory (`kg.read_csv`, `kg.read_parquet`):
            one pass over them learns the same (`keras_glmm.streaming.scan`).
        family: a family name or `keras_glmm.families.Family`.
        link: optional link name.
        weights: binomial trials for a proportion response (a column name or array).
        reml: restricted maximum likelihood (gaussian, identity link; the engine).
        posterior: `"auto"`, `"joint"` or `"mean_field"`: which update rule fits
            the model (see `GLMM`). `"auto"` takes the engine for in-memory data
            (of any size for a gaussian identity-link model or a nested design,
            else of up to `FULL_BATCH_ROWS` rows; beyond, full-batch coordinate
            ascent for binomial, Poisson and gaussian data) whose joint posterior
            fits `memory_budget`, and stochastic VI otherwise (files beyond
            `memory_budget`, minibatches).
        na_action: `"raise"` (missing values are an error listing the rows) or
            `"omit"` (rows with missing values are dropped, with a warning).
        sample_rows: files only: the size of the uniform sample of rows that
            fixes the fixed-effects coding and the GLM starting point (100,000).
        ziformula: a zero-inflated family's zero-inflation formula, glmmTMB's
            `ziformula`: one-sided, fixed effects only, coded like the fixed
            part (`"~ mined"`, `"~ C(spp) + I(cover**2)"`, `"~ 0 + f"`):
            `logit(pi_i) = x_zi,i' gamma`. `"~1"` (the default for a
            zero-inflated family) is a constant `pi`. With covariates the model
            is fitted in memory by the engine only (see `GLMM`).
        checks: lme4's guard rails (`keras_glmm.checks`, lme4's `lmerControl`
            / `glmerControl` `check.*`): a dict of a check to `"stop"`,
            `"warning"` or `"ignore"`, e.g. `{"nobs_vs_nlev": "ignore"}`;
            keys `nlev_gtr_1`, `nobs_vs_nlev`, `nobs_vs_nre`, `rank_x`,
            `response_not_const`, `collinear_x`, `separation`. `None`: lme4's
            defaults for the family (lmer's for gaussian identity, glmer's else).
        **kwargs: passed to `GLMM(...)` (e.g. `quadrature_points`,
            `memory_budget`, `name`).

    Returns:
        A compiled `GLMM`; `model.fit(data)` fits it.
    """
    keywords.check_keywords(kwargs, keywords.parameters(  # R's `REML=`, a typo: a did-you-mean
        model_class.__init__, exclude=("random_effects", "zero_inflation")) | {"name", "dtype", "trainable"},
        f"{model_class.__name__}.from_formula()")
    family_obj = families_lib.get_family(family, link=link)
    asked = dict(checks) if isinstance(checks, dict) else {}
    checks = checks_lib.resolve_checks(checks, family_obj)
    if ziformula is not None and "zi_odds" not in family_obj.dispersion_params:
        raise ValueError(
            f"`ziformula` is for a zero-inflated family ('zero_inflated_poisson' or 'zip', "
            f"'zero_inflated_negative_binomial' or 'zinb'). Received: family={family_obj.name!r}, "
            f"ziformula={ziformula!r}")
    scan = None
    if streaming.is_source(data):
        if ziformula is not None and str(ziformula).replace(" ", "") not in ("~1", "1"):
            raise ValueError(
                "A zero-inflation probability with covariates (ziformula) is fitted in memory by the "
                "engine only, not from files: read them into a data frame.")
        files.check_stochastic(posterior, reml)
        if ordinal_lib.is_ordinal(family_obj):
            raise ValueError(
                "An ordinal model is fitted in memory (its categories and thresholds are learned "
                "from every row), not from files: read them into a data frame.")
        all_rows = sorted(set(asked) & set(checks_lib.ALL_ROW_CHECKS))
        if all_rows:
            raise ValueError(
                f"checks {all_rows} need every row in memory and are not run on files (a sample of "
                "the rows can be constant or separated where the files are not): read the files into "
                "a data frame to have them, or leave these keys out.")
        scan = streaming.scan(
            data, formula, family_obj, weights=weights, na_action=na_action,
            sample_rows=sample_rows or streaming.SAMPLE_ROWS, checks=checks,
        )
        design = scan.design
        checks_lib.check_levels(design.random, scan.num_rows, checks)  # the sample had too few rows
    else:
        design = Design.from_data(formula, data, family_obj.name, weights=weights, na_action=na_action,
                                  ziformula=ziformula, checks=checks)
    family_obj = family_obj.for_design(design)  # e.g. an ordinal response's categories
    terms = [
        RandomEffects(
            num_levels=r.n_levels,
            num_effects=len(r.columns),
            intercept=r.intercept,
            covariance="full" if r.term.correlated else "diagonal",
            name=r.name,
        )
        for r in design.random
    ]
    zero_inflation = None
    if design.zi_spec is not None:
        zero_inflation = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros",
                                            name="zero_inflation")
    model = model_class(random_effects=terms, family=family_obj, posterior=posterior, reml=reml,
                zero_inflation=zero_inflation, **kwargs)
    model.design = design
    model._weights = weights
    # What `update` (keras_glmm.inference) repeats: the data and the options of this call.
    model._formula_call = dict(data=data, family=family, link=link, weights=weights, reml=reml,
                               posterior=posterior, na_action=na_action, sample_rows=sample_rows,
                               ziformula=ziformula, checks=checks, **kwargs)
    model.compile()
    if scan is not None:
        files.prepare_from_scan(model, scan)  # counts from the files, GLM start on the sample
        return model
    # The training data are at hand: check them, count each level's rows (the
    # KL's scaling) and start from the GLM fit now, so that `fit` on a tf.data
    # pipeline of the same data works as well as `fit(data)`.
    x, y = frame_arrays(model, data, weights=weights)
    model._formula_index = model._frame_index  # the rows `glmm` fits next
    checks_lib.check_fit_data(design, x, y, checks)  # separation of a binomial response
    model._formula_arrays = model.prepare(x, y)[:2]  # for `glmm`, which fits them next
    model._formula_fingerprint = _fingerprint(model, data)  # for `fit(data)` on the same frame
    return model


def _fingerprint(model, data):
    """`data_columns.frame_fingerprint` of the columns a fit of `data` reads, or None
    (no reuse) when its weights are an array."""
    weights = getattr(model, "_weights", None)
    if not isinstance(data, pd.DataFrame) or (weights is not None and not isinstance(weights, str)):
        return None  # a dict of columns is coded again (`as_frame` makes a new frame each time)
    columns = model.design.used_columns(data) + ([weights] if isinstance(weights, str) else [])
    return frame_fingerprint(data, columns)


def _coded_arrays(model, data):
    """The checked, coded arrays of the frame the model was built from, when `data` is
    that very frame, unchanged (the same object, index and columns, the same bytes in
    every column the fit reads: `data_columns.frame_fingerprint`); else None.

    `from_formula` codes its frame, checks it and takes the GLM start on its arrays;
    `fit(data)` that follows would code the same frame again (a third of the
    preparation of 32M rows). The arrays kept are those `prepare` returned, cast to
    the model's dtype, which `prepare` takes again unchanged.
    """
    arrays = getattr(model, "_formula_arrays", None)
    fingerprint = getattr(model, "_formula_fingerprint", None)
    if arrays is None or fingerprint is None or data is not getattr(model, "_formula_call", {}).get("data"):
        return None
    return arrays if _fingerprint(model, data) == fingerprint else None


def frame_arrays(model, data, weights=None, with_response=True):
    """A data frame as the model's `(x, y)` arrays (`design.arrays`), its rows with missing
    values dropped under `na_action="omit"`; `model._frame_index` keeps the rows' index."""
    data = as_frame(data)  # a dict of columns too, as `Design.arrays` takes
    design = model.design
    if weights is None:
        coded = _coded_arrays(model, data) if with_response else None
        if coded is not None:
            model._frame_index = model._formula_index
            return coded
        weights = getattr(model, "_weights", None)
    if design.na_action == "omit":
        complete = design.complete_rows(data, with_response=with_response)
        if with_response and isinstance(weights, str) and weights in data.columns:
            complete &= data[weights].notna().to_numpy()
        if not complete.all():
            warnings.warn(
                f"na_action='omit': dropped {int((~complete).sum())} of {len(data)} rows "
                "with missing values.",
                RuntimeWarning,
                stacklevel=3,
            )
            if weights is not None and not isinstance(weights, str):
                weights = np.asarray(weights)[complete]
            data = data.loc[complete]
    model._frame_index = data.index  # results for these rows are indexed so (keras_glmm.frames)
    return design.arrays(data, weights=weights, with_response=with_response)


def glmm(model_class, formula, data, family="gaussian", weights=None, **options):
    """`model_class.from_formula(formula, data, ...)` fitted to `data` (`kg.glmm`)."""
    # Unknown names (R's `REML=`, a typo) fail here with a did-you-mean, not inside Keras.
    keywords.check_keywords(options, keywords.parameters(
        model_class.from_formula, model_class.__init__,
        exclude=("formula", "data", "random_effects", "zero_inflation"),
    ) | set(FIT_OPTIONS) | {"name", "dtype", "trainable"}, "glmm()")
    fit_options = {k: options.pop(k) for k in FIT_OPTIONS if k in options}
    model = model_class.from_formula(formula, data, family=family, weights=weights, **options)
    arrays = model.__dict__.pop("_formula_arrays", None)
    if arrays is None:  # files
        model.fit(data, **fit_options)
    else:  # the data frame's arrays, checked and coded once
        model.fit(*arrays, **fit_options)
        model._training_index = model.__dict__.pop("_formula_index", None)  # results indexed like `data`
    return model
