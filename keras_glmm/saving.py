"""Loading saved GLMMs, with a clear error for files that hold something else or are damaged."""

import contextlib
import os
import zipfile

import keras

from keras_glmm.expressions import ExpressionError


@contextlib.contextmanager
def read_errors(filepath, what="the model"):
    """Errors met while reading a saved model or weights file, as a ValueError naming the file.

    A damaged file fails deep inside Keras, zipfile or h5py (`BadZipFile: Bad CRC-32 for file
    'model.weights.h5'`, h5py's `KeyError: 'Unable to synchronously open object'`, ...), naming
    no file or the archive's member; the message says which file and keeps the cause.
    A file that is missing or unreadable (permissions) keeps its OSError.
    """
    try:
        yield
    except (FileNotFoundError, PermissionError, ExpressionError):
        raise  # a missing file, or one refused by safe mode: said as it is
    except Exception as err:  # noqa: BLE001 - zipfile, h5py and Keras raise many types
        detail = err.args[0] if isinstance(err, KeyError) and err.args else err
        # The cause without its traceback: the reader's frames hold the open file (h5py's),
        # which HDF5 would hand back, damaged, to the next open of the same path.
        raise ValueError(
            f"'{os.fspath(filepath)}': could not read {what}; the file is damaged or was not "
            f"written for this model ({type(err).__name__}: {detail})"
        ) from err.with_traceback(None)


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
    with read_errors(filepath):
        model = keras.models.load_model(filepath, compile=compile, safe_mode=safe_mode)
    # The class by its registered name: keras_glmm.model imports this module (read_errors).
    if not isinstance(model, keras.saving.get_registered_object("keras_glmm>GLMM")):
        raise ValueError(
            f"'{filepath}' holds a {type(model).__name__}, not a keras_glmm GLMM; load it "
            "with keras.models.load_model."
        )
    return model
