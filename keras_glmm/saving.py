"""Loading saved GLMMs, with a clear error for files that hold something else."""

import os
import zipfile

import keras

from keras_glmm.model import GLMM


def load_model(filepath, compile=True, safe_mode=True):
    """Loads a `GLMM` saved with `model.save("m.keras")`.

    Keras's own `keras.models.load_model` loads these files too (no
    `custom_objects`, `safe_mode=True`); this function adds checks, so that a file
    that is not a `.keras` archive, or one that holds another kind of model, fails
    with a message saying so instead of deep inside Keras.

    Args:
        filepath: path of a `.keras` file.
        compile: restore the compiled state (optimizer), to continue fitting.
        safe_mode: Keras's `safe_mode`. True (the default) refuses a file whose
            formula or design holds an expression outside the formula language
            (`keras_glmm.expressions`: a file altered to run code); False loads
            anything, for files from a source you trust.

    Returns:
        The `GLMM`, with its formula design when it was built from a formula.
    """
    filepath = os.fspath(filepath)
    if not os.path.exists(filepath):
        raise FileNotFoundError(f"No such file: '{filepath}'.")
    if not zipfile.is_zipfile(filepath):
        raise ValueError(
            f"'{filepath}' is not a Keras archive (.keras zip file); save a keras_glmm model "
            "with `model.save('name.keras')`."
        )
    model = keras.models.load_model(filepath, compile=compile, safe_mode=safe_mode)
    if not isinstance(model, GLMM):
        raise ValueError(
            f"'{filepath}' holds a {type(model).__name__}, not a keras_glmm GLMM; load it "
            "with keras.models.load_model."
        )
    return model
