"""Keras layers of a GLMM: random effects, variational fixed effects, the family head."""

from keras_glmm.layers.family_head import FamilyHead
from keras_glmm.layers.fixed_effects import VariationalFixedEffects
from keras_glmm.layers.random_effects import RandomEffects

__all__ = ["FamilyHead", "RandomEffects", "VariationalFixedEffects"]
