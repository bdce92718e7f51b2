"""GLMM under `MultiWorkerMirroredStrategy` (`keras_glmm.distribute`).

Two worker processes on localhost form a cluster from TF_CONFIG, as two machines
would; each runs `_multiworker_worker.py`, the same script, differing only in the
task index.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reference_data as refs

WORKER = Path(__file__).with_name("_multiworker_worker.py")
TIMEOUT = 240

RADON_LME4 = refs.radon_estimates()
RADON_ELBO = refs.LME4["radon"]["logLik"]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tf_config(addresses, index):
    return json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    )


def _start(mode, tf_config, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _communicate(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"worker {proc.args[2:]} timed out after {timeout} s\n{stderr[-4000:]}")


def _assert_rel(actual, expected, rtol, what):
    bad = {
        k: (actual[k], expected[k]) for k in expected
        if abs(actual[k] - expected[k]) > rtol * abs(expected[k])
    }
    assert not bad, f"{what}: relative difference above {rtol}: {bad}"


@pytest.mark.slow
def test_two_workers_fit_radon_like_one_device():
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = [_start("fit", _tf_config(addresses, i)) for i in range(2)]
    reports = []
    try:
        deadline = time.monotonic() + TIMEOUT
        for proc in procs:
            stdout, stderr = _communicate(proc, max(1, deadline - time.monotonic()))
            assert proc.returncode == 0, (
                f"worker {len(reports)} exited {proc.returncode}\n"
                f"stdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
            )
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    estimates = tuple(RADON_LME4)
    for i, report in enumerate(reports):
        assert report["num_replicas"] == 2
        assert report["converged"]
        _assert_rel(report, RADON_LME4, 1e-3, f"worker {i} vs lme4")
        assert abs(report["elbo_total"] - RADON_ELBO) < 0.05, report["elbo_total"]
        # Keras's `loss` is the negative ELBO per observation, not 2 times it...
        assert abs(report["loss"] / -report["elbo"] - 1) < 1e-5, (report["loss"], report["elbo"])
        # ...and the KL is counted once per step, not once per worker.
        assert abs(report["kl"] / (report["kl_total"] / report["num_rows"]) - 1) < 1e-4
    _assert_rel(reports[1], {k: reports[0][k] for k in estimates}, 1e-3, "worker 1 vs worker 0")
    assert abs(reports[1]["elbo_total"] - reports[0]["elbo_total"]) < 0.01


@pytest.mark.slow
def test_unreachable_worker_raises_timeout_error():
    own, missing = (f"127.0.0.1:{port}" for port in _free_ports(2))
    start = time.monotonic()
    proc = _start("strategy", _tf_config([own, missing], 0), "--timeout", "5")
    stdout, stderr = _communicate(proc, 60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, stdout
    assert "TimeoutError" in stderr, stderr[-3000:]
    assert missing in stderr and "TF_CONFIG" in stderr, stderr[-3000:]
    assert own not in stderr.split("TimeoutError", 1)[1].split("TF_CONFIG", 1)[0]
    assert elapsed < 30, elapsed


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "TF_CONFIG environment variable is not set"),
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('["worker"]', "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'no "cluster" object'),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', '"worker" list'),
        ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}',
         "not of the form host:port"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'no "task" object'),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
         '"index" must be an integer in [0, 1)'),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
         'task "type" must be "worker"'),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
         "no ParameterServerStrategy"),
    ],
)
def test_bad_tf_config_raises_value_error(monkeypatch, tf_config, message):
    from keras_glmm import distribute

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError) as info:
        distribute.multi_worker_strategy(timeout=1)
    assert message in str(info.value)
