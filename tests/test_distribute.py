"""GLMM under Keras's fault tolerance (BackupAndRestore) and tf.distribute.

Each fit runs in a subprocess (`_distribute_worker.py`): a preempted job must die
for real, and splitting the CPU into logical devices has to happen before
TensorFlow initializes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reference_data as refs

WORKER = Path(__file__).with_name("_distribute_worker.py")
TIMEOUT = 300

# lme4 maximum-likelihood fits.
RADON_LME4 = refs.radon_estimates()
RADON_ELBO = refs.LME4["radon"]["logLik"]  # the ELBO of the exact posterior


def _start(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(proc, expect_rc=0):
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"worker {proc.args[2:]} timed out\n{stderr[-3000:]}")
    assert proc.returncode == expect_rc, (
        f"worker {proc.args[2:]} exited {proc.returncode}, expected {expect_rc}\n"
        f"stdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    )
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _assert_rel(actual, expected, rtol, keys=None, what=""):
    keys = keys or expected.keys()
    bad = {
        k: (actual[k], expected[k]) for k in keys
        if abs(actual[k] - expected[k]) > rtol * abs(expected[k])
    }
    assert not bad, f"{what}: relative difference above {rtol}: {bad}"


# ------------------------------------------------------------------ checkpoints
@pytest.mark.slow
def test_killed_fit_resumes_from_backup_and_restore(tmp_path):
    backup = tmp_path / "backup"
    # The uninterrupted fit runs beside the one that gets killed.
    reference = _start("fit")
    killed = _start("fit", "--backup", str(backup), "--kill-after-epoch", "2")
    assert _finish(killed, expect_rc=1) is None  # died before printing its result
    files = sorted(p.name for p in backup.iterdir())
    assert "latest.weights.h5" in files and "training_metadata.json" in files, files
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata["epoch"] == 3  # epochs 0, 1 and 2 were done and backed up

    resumed = _finish(_start("fit", "--backup", str(backup)))
    uninterrupted = _finish(reference)

    assert uninterrupted["logged_epochs"][0] == 0
    # It really resumed: no epoch before the backed-up one ran again.
    assert resumed["logged_epochs"][0] == 3, resumed["logged_epochs"]
    assert resumed["converged"] and uninterrupted["converged"]
    assert not backup.exists()  # BackupAndRestore removes its backup after a finished fit

    keys = ("intercept", "floor", "county_sd", "residual_sd")
    _assert_rel(resumed, uninterrupted, 1e-3, keys, "resumed vs uninterrupted")
    _assert_rel(resumed, RADON_LME4, 1e-3, keys, "resumed vs lme4")
    assert abs(resumed["elbo_total"] - uninterrupted["elbo_total"]) < 0.01


# ------------------------------------------------------------- MirroredStrategy
@pytest.fixture(scope="module")
def mirrored():
    """Both data sets' `mirrored` worker reports, the two run side by side."""
    procs = {name: _start("mirrored", name) for name in ("radon", "penicillin")}
    return {name: _finish(proc) for name, proc in procs.items()}


ESTIMATES = {
    "radon": ("intercept", "floor", "county_sd", "residual_sd"),
    "penicillin": ("intercept", "plate_sd", "sample_sd", "residual_sd"),
}
LME4 = {"radon": RADON_LME4}


@pytest.mark.slow
@pytest.mark.parametrize("data", ["radon", "penicillin"])
def test_mirrored_fit_matches_single_device(mirrored, data):
    """Two replicas (radon's 919 rows split 460 + 459) give the one-device fit.

    Several replicas rule the engine out, so both fit by stochastic VI (penicillin
    on one device too, with posterior='mean_field'): each replica's per-row KL must
    be counted once per step: counted twice, the KL's weight against the data would
    double, shrinking the variance components and costing nats of ELBO. radon's
    one-device fit is the engine's, lme4's to 4 digits; penicillin's crossed factors
    under mean-field VI are not lme4's, so only the two devices are compared there.
    """
    report = mirrored[data]
    assert report["num_replicas"] == 2
    single, fit = report["single"], report["mirrored"]
    assert fit["converged"]
    _assert_rel(fit, single, 1e-3, ESTIMATES[data], "mirrored vs single device")
    if data == "radon":
        _assert_rel(fit, LME4[data], 1e-3, what="mirrored vs lme4")
    assert abs(fit["elbo_total"] - single["elbo_total"]) < 0.05
    if data == "radon":
        assert abs(fit["elbo_total"] - RADON_ELBO) < 0.05
    # The logs are per-observation values of the whole data (once, not twice)...
    kl_per_row = fit["kl_total"] / fit["num_rows"]
    assert abs(fit["kl"] / kl_per_row - 1) < 1e-4
    # ...and Keras's `loss` is the negative ELBO per observation, not R times it.
    assert abs(fit["loss"] / -fit["elbo"] - 1) < 1e-5, (fit["loss"], fit["elbo"])
