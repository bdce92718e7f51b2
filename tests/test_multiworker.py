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

import numpy as np
import pytest

import keras_glmm as kg
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


def _run_workers(mode, *args, workers=2, timeout=TIMEOUT):
    """Runs `mode` of the worker script in `workers` processes forming one cluster; their reports."""
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    procs = [_start(mode, _tf_config(addresses, i), *args) for i in range(workers)]
    reports = []
    try:
        deadline = time.monotonic() + timeout
        for proc in procs:
            reports.append(_report(proc, max(1, deadline - time.monotonic()), f"worker {len(reports)}"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return reports


def _report(proc, timeout, who):
    stdout, stderr = _communicate(proc, timeout)
    assert proc.returncode == 0, (
        f"{who} exited {proc.returncode}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    )
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_workers_fit_radon_like_one_device():
    reports = _run_workers("fit")
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


# ------------------------------------------------------------ files, a share per worker
@pytest.fixture(scope="module")
def radon_files(tmp_path_factory):
    """Radon in 4 CSV files of unequal size (200, 300, 150 and 269 rows): a glob pattern."""
    folder = tmp_path_factory.mktemp("radon_files")
    radon = kg.datasets.load_radon()[["log_radon", "floor", "county"]]
    cuts = [0, 200, 500, 650, len(radon)]
    for i in range(4):
        radon.iloc[cuts[i]:cuts[i + 1]].to_csv(folder / f"part-{i}.csv", index=False)
    return str(folder / "*.csv")


def _one_process(*args):
    proc = _start("files", None, *args)
    return _report(proc, TIMEOUT, "the single process")


@pytest.mark.slow
def test_two_workers_fit_their_own_files_like_one_process(radon_files):
    """Worker 0 trains on files 0 and 2 (350 rows), worker 1 on files 1 and 3 (569 rows);
    each step's gradient is the sum of the two shares' (each replica's loss weighted by
    its rows), so the full-batch fit is the one-process fit of all the files up to the
    order of float32 additions: equal to 1e-4 (relative) in the estimates and 1e-3 in the
    ELBO (measured: 0 and 4e-7 apart, 1.1e-5 in the ELBO), well within what the
    ELBOConvergence stop leaves (an ELBO per row settled to 1e-6)."""
    reports = _run_workers("files", radon_files)
    single = _one_process(radon_files)
    assert [r["trained_on"] for r in reports] == [["part-0.csv", "part-2.csv"], ["part-1.csv", "part-3.csv"]]
    for report in reports:
        assert report["num_replicas"] == 2 and report["converged"]
        np.testing.assert_allclose(report["fixef"], single["fixef"], rtol=1e-4)
        np.testing.assert_allclose(report["sdcor"], single["sdcor"], rtol=1e-4)
        assert abs(report["elbo_total"] - single["elbo_total"]) < 1e-3
    assert abs(single["elbo_total"] - RADON_ELBO) < 0.05


@pytest.mark.slow
def test_two_workers_take_natural_gradient_minibatch_steps_on_their_files(radon_files):
    """Minibatches of 460 rows (each worker's share of a step in proportion to its rows)
    by the natural-gradient optimizer under the strategy. Stochastic fits of differently
    drawn minibatches agree only within their noise: each is compared with lme4 to a
    quarter of lme4's standard error in the fixed effects and 10% in the sds."""
    reports = _run_workers("files", radon_files, "--batch-size", "460", "--epochs", "15",
                           timeout=2 * TIMEOUT)
    for report in reports:
        assert report["num_replicas"] == 2 and report["natural_step"] == 1.0
        assert np.all(np.abs(np.array(report["fixef"]) - refs.fixef("radon")) < 0.25 * refs.se("radon"))
        np.testing.assert_allclose(report["sdcor"], [RADON_LME4["county_sd"], RADON_LME4["residual_sd"]],
                                   rtol=0.1)
    assert reports[0]["fixef"] == reports[1]["fixef"]  # one model, replicated


def test_each_worker_reads_its_own_files_and_too_few_files_are_refused():
    from keras_glmm import streaming

    paths = [f"part-{i}.csv" for i in range(5)]
    shares = [streaming.worker_files(paths, i, 2) for i in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match=r"2 file\(s\) for 3 workers: .*at least as many files as workers"):
        streaming.worker_files(paths[:2], 0, 3)
    assert streaming.multi_worker_shares() is None  # no strategy in scope


def test_tf_config_from_slurm():
    from keras_glmm import distribute

    assert distribute.expand_hostlist("node[01-03,07],gpu1") == ["node01", "node02", "node03", "node07", "gpu1"]
    environ = {"SLURM_JOB_NODELIST": "cn[8-9]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3"}
    config = json.loads(distribute.tf_config_from_slurm(port=2222, environ=environ))
    assert config == {"cluster": {"worker": ["cn8:2222", "cn8:2223", "cn9:2222", "cn9:2223"]},
                      "task": {"type": "worker", "index": 3}}
    with pytest.raises(ValueError, match="SLURM_PROCID is not set"):
        distribute.tf_config_from_slurm(environ={k: v for k, v in environ.items() if k != "SLURM_PROCID"})
    with pytest.raises(ValueError, match="names 1 nodes, the node list 2"):
        distribute.tf_config_from_slurm(environ={**environ, "SLURM_TASKS_PER_NODE": "4"})


@pytest.mark.slow
def test_unreachable_worker_raises_timeout_error():
    own, missing = (f"127.0.0.1:{port}" for port in _free_ports(2))
    # A 5-second timeout: a hang would be stopped by `_communicate` and fail the test.
    proc = _start("strategy", _tf_config([own, missing], 0), "--timeout", "5")
    stdout, stderr = _communicate(proc, 120)
    assert proc.returncode != 0, stdout
    assert "TimeoutError" in stderr, stderr[-3000:]
    assert missing in stderr and "TF_CONFIG" in stderr, stderr[-3000:]
    assert own not in stderr.split("TimeoutError", 1)[1].split("TF_CONFIG", 1)[0]


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
