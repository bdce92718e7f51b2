"""`import keras_glmm` is quiet: TensorFlow's start-up noise dropped, a user's TF_CPP_MIN_LOG_LEVEL respected."""

import os
import subprocess
import sys

from keras_glmm import startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    clean = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    clean["PYTHONPATH"] = ROOT + os.pathsep + clean.get("PYTHONPATH", "")
    clean.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, check=False)


def test_import_prints_nothing():
    done = _python("import os, keras_glmm, tensorflow as tf; tf.constant(1.0) + 1; "
                   "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no oneDNN / cuda-driver / cuInit lines
    assert done.stdout.strip() == "2"


def test_a_users_log_level_is_respected():
    done = _python("import os, keras_glmm; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])", TF_CPP_MIN_LOG_LEVEL="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_only_known_noise_is_dropped():
    captured = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796578294.552257    2862 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796578294.553353    2862 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
        "GPU will not be used.\n"
        "E0000 00:00:1796578342.729674    3341 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
        "E0000 00:00:1 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register factory\n"
        "/x/y.py:3: UserWarning: something the user should see\n"
        "E0000 00:00:1 some.cc:1] a real error\n"
    )
    assert startup.startup_messages_to_keep(captured) == [
        "/x/y.py:3: UserWarning: something the user should see\n",
        "E0000 00:00:1 some.cc:1] a real error\n",
    ]
    # With a CUDA driver present, a failed cuInit is news: kept.
    with_driver = "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE\n"
    assert startup.startup_messages_to_keep(with_driver) == [with_driver]
