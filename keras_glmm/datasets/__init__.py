"""Small public data sets for trying out and testing GLMMs.

The raw files ship inside the package (``keras_glmm/datasets/data``); each
loader returns a fresh :class:`pandas.DataFrame` with categorical grouping
columns.

============================  ========  ==========================================  ==========================
loader                        rows      what                                        source
============================  ========  ==========================================  ==========================
:func:`load_radon`            919 (MN)  household radon, by county; county uranium  Gelman & Hill (2007)
:func:`load_sleepstudy`       180       reaction time vs. days of sleep loss        R package lme4
:func:`load_cbpp`             56        CBPP incidence out of herd size, by period  R package lme4
:func:`load_penicillin`       144       assay diameters, crossed plate x sample     R package lme4
:func:`load_grouseticks`      403       tick counts by brood, location, year        R package lme4
:func:`load_insteval`         73,421    lecture ratings, crossed student x lecturer R package lme4
============================  ========  ==========================================  ==========================

References:
    Gelman, A. and Hill, J. (2007). *Data Analysis Using Regression and
    Multilevel/Hierarchical Models*. Cambridge University Press.

    Bates, D., Maechler, M., Bolker, B. and Walker, S. (2015). Fitting linear
    mixed-effects models using lme4. *Journal of Statistical Software* 67(1).
"""

from keras_glmm.datasets._loaders import (
    load_cbpp,
    load_grouseticks,
    load_insteval,
    load_penicillin,
    load_radon,
    load_sleepstudy,
)

__all__ = [
    "load_cbpp",
    "load_grouseticks",
    "load_insteval",
    "load_penicillin",
    "load_radon",
    "load_sleepstudy",
]
