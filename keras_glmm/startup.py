"""TensorFlow's start-up messages: silenced unless the user asked for them.

TensorFlow 2.21 writes through absl's C++ logging, and what it logs while its
shared libraries load comes before `absl::InitializeLog()` and before
`TF_CPP_MIN_LOG_LEVEL` is read: every `import keras_glmm` printed

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

(twice: two libraries load), and the first operation on a machine without a GPU
`E0000 ... failed call to cuInit: ... CUDA error`. For a statistics user these
are noise; a TensorFlow user who wants them sets `TF_CPP_MIN_LOG_LEVEL`
themselves, and then nothing here applies.

Without that variable, `import_tensorflow` sets it to `"2"` (errors only, from
then on) and imports TensorFlow and lists its devices (which initializes CUDA)
with the process's standard error (file descriptor 2, where C++ writes) sent to
a temporary file. Then it writes back every captured line except the known
start-up noise (`STARTUP_NOISE`): INFO and WARNING lines (`I0000 ...`,
`W0000 ...`, which level 2 hides after start-up too), absl's line about
`InitializeLog`, the cuDNN/cuFFT/cuBLAS "Unable to register factory" lines, and
a failed `cuInit` when TensorFlow also said the machine has no CUDA drivers
(on a machine with drivers that failure is news, and it is written back).
Anything else, a Python warning included, reaches standard error as before.
"""

import contextlib
import os
import re
import sys
import tempfile

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# The level set when the user has not set one: errors and fatal messages only.
DEFAULT_LOG_LEVEL = "2"

STARTUP_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^[IW]\d{4} "),  # absl INFO / WARNING lines: I0000 00:00:... file.cc:12] ...
    re.compile(r"^E\d{4} .*Unable to register cu(DNN|FFT|BLAS) factory"),
)
_NO_DRIVER = re.compile(r"Could not find cuda drivers on your machine")
_CUINIT = re.compile(r"^E\d{4} .*failed call to cuInit")


def startup_messages_to_keep(text):
    """The lines of captured start-up output that are not known noise (a list of lines)."""
    lines = text.splitlines(keepends=True)
    no_driver = any(_NO_DRIVER.search(line) for line in lines)
    kept = []
    for line in lines:
        stripped = line.rstrip("\r\n")
        if any(pattern.search(stripped) for pattern in STARTUP_NOISE):
            continue
        if no_driver and _CUINIT.search(stripped):
            continue  # the machine has no CUDA driver: a CPU-only machine, as TensorFlow said
        kept.append(line)
    return kept


@contextlib.contextmanager
def _stderr_captured():
    """Sends file descriptor 2 to a temporary file; yields a list that receives its text."""
    captured = []
    try:
        saved = os.dup(2)
    except OSError:  # no standard error at all (a detached process): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


def import_tensorflow():
    """Imports TensorFlow, quietly unless the user set `TF_CPP_MIN_LOG_LEVEL` (see the module)."""
    if LOG_LEVEL_VARIABLE in os.environ or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401 - the user's own settings, or too late to change them

        return
    os.environ[LOG_LEVEL_VARIABLE] = DEFAULT_LOG_LEVEL
    captured = []
    try:
        with _stderr_captured() as captured:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA's initialization (cuInit) logs here, not at import
    finally:  # an import that fails still shows what it wrote
        kept = startup_messages_to_keep("".join(captured))
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
