"""keras_glmm: generalized linear mixed models as Keras 3 layers, fitted by variational inference."""

from keras_glmm import startup as _startup

# TensorFlow's C++ start-up chatter is noise for a statistics user: imported here
# first, quietly, unless the user set TF_CPP_MIN_LOG_LEVEL (keras_glmm.startup).
_startup.import_tensorflow()

from keras_glmm import datasets, distribute, families, layers, serving, streaming  # noqa: E402
from keras_glmm import composition, losses  # noqa: E402
from keras_glmm.callbacks import ELBOConvergence, VarianceUpdate  # noqa: E402
from keras_glmm.families import get_family  # noqa: E402
from keras_glmm.inference import anova  # noqa: E402
from keras_glmm.layers import (  # noqa: E402
    FamilyHead,
    RandomEffects,
    VariationalFixedEffects,
)
from keras_glmm.model import GLMM, glmm  # noqa: E402
from keras_glmm.optimizers import NaturalGradient, SparseAdam  # noqa: E402
from keras_glmm.saving import load_model  # noqa: E402
from keras_glmm.streaming import FilesChangedError, read_csv, read_parquet  # noqa: E402
from keras_glmm.tensorboard import GLMMTensorBoard  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ELBOConvergence",
    "VarianceUpdate",
    "FamilyHead",
    "FilesChangedError",
    "GLMM",
    "GLMMTensorBoard",
    "NaturalGradient",
    "RandomEffects",
    "SparseAdam",
    "VariationalFixedEffects",
    "anova",
    "composition",
    "datasets",
    "distribute",
    "families",
    "get_family",
    "glmm",
    "layers",
    "load_model",
    "losses",
    "read_csv",
    "read_parquet",
    "serving",
    "streaming",
]
