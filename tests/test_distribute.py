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

WORKER = Path(__file__).with_name("_distribute_worker.py")
TIMEOUT = 300

# lme4 maximum-likelihood fits.
RADON_LME4 = {"intercept": 1.4612, "floor": -0.6926, "county_sd": 0.3245, "residual_sd": 0.7552}
RADON_ELBO = -1081.825  # lme4's logLik: the ELBO of the exact posterior
PENICILLIN_LME4 = {"plate_sd": 0.8456, "sample_sd": 1.7706, "residual_sd": 0.5499}


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


def _attempt(report, name):
    attempt = report["attempts"][name]
    assert attempt["ok"], f"MirroredStrategy fit ({name}) failed: {attempt['error']}"
    assert report["num_replicas"] == 2
    return attempt


ESTIMATES = {
    "radon": ("intercept", "floor", "county_sd", "residual_sd"),
    "penicillin": ("intercept", "plate_sd", "sample_sd", "residual_sd"),
}


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason=(
        "GLMM.fit fails under MirroredStrategy: (1) initialization.fit_glm's scratch "
        "tf.Variable becomes a MirroredVariable in strategy.scope() and GradientTape "
        "fails on it; (2) with 919 rows on 2 replicas (460 + 459) Keras's "
        "_maybe_symbolic_build reduces the first batch across replicas (AddN shape "
        "mismatch); (3) steps_per_execution=100 (GLMM.compile's default) fails in "
        "Keras's tf.while_loop under MirroredStrategy ('You must feed a value for "
        "placeholder tensor', keras-team/keras#19246)"
    ),
)
@pytest.mark.parametrize("data", ["radon", "penicillin"])
def test_mirrored_fit_with_library_defaults(mirrored, data):
    report = mirrored[data]
    attempt = _attempt(report, "defaults")
    _assert_rel(attempt, report["single"], 1e-3, ESTIMATES[data], "mirrored vs single device")


@pytest.mark.slow
def test_mirrored_radon_with_proposed_fixes(mirrored):
    """With the fit_glm, _maybe_symbolic_build and steps_per_execution fixes."""
    report = mirrored["radon"]
    single = report["single"]
    attempt = _attempt(report, "fixed")
    assert attempt["converged"]
    _assert_rel(attempt, single, 1e-3, ESTIMATES["radon"], "mirrored vs single device")
    _assert_rel(attempt, RADON_LME4, 1e-3, ESTIMATES["radon"], "mirrored vs lme4")
    # The KL is counted once per step: a second count would double the KL's weight
    # against the data, shrink the county sd and cost nats of ELBO.
    assert abs(attempt["elbo_total"] - RADON_ELBO) < 0.05
    assert abs(single["elbo_total"] - RADON_ELBO) < 0.05
    # The logged KL is the equal-weight mean of the replicas' per-row means over
    # 460 and 459 rows: within 3e-4 of KL / n (counted twice it would be 2 KL / n).
    kl_per_row = attempt["kl_total"] / attempt["num_rows"]
    assert abs(attempt["kl"] / kl_per_row - 1) < 3e-4
    assert abs(attempt["kl"] / single["kl"] - 1) < 3e-4


@pytest.mark.slow
def test_mirrored_joint_random_effects_with_proposed_fixes(mirrored):
    """A JointRandomEffects layer's global KL (added in full on each replica).

    GLMM.compute_loss skips Keras's per-replica scaling, so each replica's loss is
    its mean negative log-likelihood plus KL / n, and the summed gradient that of
    twice the negative ELBO: the KL keeps its weight against the data (Adam does
    not see the factor 2) and the variance components match lme4.
    """
    report = mirrored["penicillin"]
    single = report["single"]
    attempt = _attempt(report, "fixed")
    assert attempt["converged"]
    _assert_rel(attempt, single, 1e-3, ESTIMATES["penicillin"], "mirrored vs single device")
    _assert_rel(attempt, PENICILLIN_LME4, 1e-3, what="mirrored vs lme4")
    _assert_rel(single, PENICILLIN_LME4, 1e-3, what="single device vs lme4")
    assert abs(attempt["elbo_total"] - single["elbo_total"]) < 0.05
    kl_per_row = attempt["kl_total"] / attempt["num_rows"]
    assert abs(attempt["kl"] / kl_per_row - 1) < 1e-4  # once, not twice
    assert abs(attempt["kl"] / single["kl"] - 1) < 1e-4


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason=(
        "GLMM.compute_loss returns each replica's whole loss instead of 1/num_replicas "
        "of it (Keras's Trainer.compute_loss convention), so Keras's logged `loss` "
        "(unscale_loss_for_distribution) is num_replicas times the negative ELBO per "
        "row, and ELBOConvergence monitors that"
    ),
)
@pytest.mark.parametrize("data", ["radon", "penicillin"])
def test_mirrored_logged_loss_is_negative_elbo(mirrored, data):
    attempt = _attempt(mirrored[data], "fixed")
    assert abs(attempt["loss"] / -attempt["elbo"] - 1) < 1e-5, (attempt["loss"], attempt["elbo"])


@pytest.mark.slow
def test_mirrored_with_proposed_compute_loss(mirrored):
    """The proposed compute_loss (1/num_replicas, trackers weighted by rows).

    On radon, whose 919 rows split unevenly (460 + 459): the logs are then the
    full-batch values. (`_distribute_worker.py mirrored penicillin --attempts
    loss_fix` runs it on the joint layer: too slow for the suite.)
    """
    data = "radon"
    report = mirrored[data]
    single = report["single"]
    attempt = _attempt(report, "loss_fix")
    assert attempt["converged"]
    _assert_rel(attempt, single, 1e-3, ESTIMATES[data], "mirrored vs single device")
    assert abs(attempt["loss"] / -attempt["elbo"] - 1) < 1e-5
    # The logs are full-batch values: the KL per row is KL / n exactly.
    kl_per_row = attempt["kl_total"] / attempt["num_rows"]
    assert abs(attempt["kl"] / kl_per_row - 1) < 1e-5
    assert abs(attempt["kl"] / single["kl"] - 1) < 2e-4
    assert abs(attempt["elbo"] * attempt["num_rows"] - attempt["elbo_total"]) < 0.01
    assert abs(attempt["elbo_total"] - single["elbo_total"]) < 0.05
