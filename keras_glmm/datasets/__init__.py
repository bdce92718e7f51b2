"""Small public data sets for trying out and testing GLMMs.

The raw files ship inside the package (``keras_glmm/datasets/data``); each
loader returns a fresh :class:`pandas.DataFrame` with categorical grouping
columns.

============================  ========  ===========================================  ==========================
loader                        rows      what                                         source
============================  ========  ===========================================  ==========================
:func:`load_radon`            919 (MN)  household radon, by county; county uranium   Gelman & Hill (2007)
:func:`load_sleepstudy`       180       reaction time vs. days of sleep loss         R package lme4
:func:`load_cbpp`             56        CBPP incidence out of herd size, by period   R package lme4
:func:`load_penicillin`       144       assay diameters, crossed plate x sample      R package lme4
:func:`load_grouseticks`      403       tick counts by brood, location, year         R package lme4
:func:`load_insteval`         73,421    lecture ratings, crossed student x lecturer  R package lme4
:func:`load_dyestuff`         30        dyestuff yield, 6 batches                    R package lme4
:func:`load_dyestuff2`        30        simulated yield, 6 batches (batch sd 0)      R package lme4
:func:`load_pastes`           60        paste strength, casks nested in batches      R package lme4
:func:`load_oxboys`           234       heights of 26 boys on 9 occasions            R package nlme
:func:`load_gcsemv`           1,905     GCSE coursework by school; 180 NA course     R package mlmRev
:func:`load_scotssec`         3,435     attainment, crossed primary x secondary      R package mlmRev
:func:`load_egsingle`         7,230     math by year, 1,721 children in 60 schools   R package mlmRev
:func:`load_star`             24,578    Tennessee STAR math, students in schools     R package mlmRev
:func:`load_bacteria`         220       H. influenzae presence by child and week     R package MASS
:func:`load_cbpp_olre`        56        cbpp with a row factor ``obs`` (OLRE)        R package lme4
:func:`load_guimmun`          2,159     child immunization, mothers in communities   R package mlmRev
:func:`load_guprenat`         2,449     prenatal care, mothers in communities        R package mlmRev
:func:`load_fatalities`       336       US traffic deaths, 48 states x 7 years       R package AER
:func:`load_kb07`             1,790     response times, crossed subject x item       Kronmueller & Barr (2007)
:func:`load_wine`             72        wine bitterness rated 1-5 by 9 judges        R package ordinal
:func:`load_salamanders`      644       salamander counts by site, species, mining   R package glmmTMB
============================  ========  ===========================================  ==========================

References:
    Gelman, A. and Hill, J. (2007). *Data Analysis Using Regression and
    Multilevel/Hierarchical Models*. Cambridge University Press.

    Bates, D., Maechler, M., Bolker, B. and Walker, S. (2015). Fitting linear
    mixed-effects models using lme4. *Journal of Statistical Software* 67(1).
"""

from keras_glmm.datasets import _loaders
from keras_glmm.datasets._loaders import *  # noqa: F403 - the loaders are this package's API

__all__ = list(_loaders.__all__)
