"""GLMMTensorBoard: event files read back, and served by a real TensorBoard server."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea

import keras_glmm as kg
from keras_glmm.tensorboard import GLMMTensorBoard

GUIDANCE = {ea.TENSORS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.SCALARS: 0}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The radon model (county intercepts), fitted with both TensorBoard callbacks."""
    keras.utils.set_random_seed(0)
    radon = kg.datasets.load_radon()
    x = {
        "x": np.stack([np.ones(len(radon)), radon["floor"].to_numpy("float64")], axis=1),
        "county": radon["county_code"].to_numpy(),
    }
    y = radon["log_radon"].to_numpy("float64")
    log_dir = str(tmp_path_factory.mktemp("tb"))
    model = kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")])
    callback = GLMMTensorBoard(log_dir)
    history = model.fit(
        x, y, epochs=60,
        callbacks=[keras.callbacks.TensorBoard(log_dir), callback],
    )
    callback.write_final(model)
    callback.close()
    return model, history, log_dir, callback


def _accumulator(path):
    acc = ea.EventAccumulator(path, size_guidance=GUIDANCE)
    acc.Reload()
    return acc


def _tensor_values(acc, tag):
    return [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def test_event_files_hold_the_fit(fitted):
    model, history, log_dir, _ = fitted
    epochs = len(history.epoch)

    # Keras's own callback: the History's keys as `epoch_<key>` in the train run.
    train = _accumulator(os.path.join(log_dir, "train"))
    tags = set(train.Tags()["tensors"]) | set(train.Tags()["scalars"])
    for key in ("elbo", "nll", "kl", "loss"):
        assert f"epoch_{key}" in tags, tags
        values = _tensor_values(train, f"epoch_{key}")
        assert [s for s, _ in values] == list(range(epochs))
        np.testing.assert_allclose(float(values[-1][1]), history.history[key][-1], rtol=1e-6)

    glmm = _accumulator(os.path.join(log_dir, "glmm"))
    tensors = set(glmm.Tags()["tensors"])
    # Variance component and dispersion: the fitted values at the last epoch.
    sd = _tensor_values(glmm, "varcorr/county/(Intercept)")
    assert len(sd) == epochs
    np.testing.assert_allclose(float(sd[-1][1]), model.terms[0].prior_stddev()[0], rtol=1e-6)
    np.testing.assert_allclose(
        float(sd[-1][1]), model.varcorr().query("grp == 'county'")["sdcor"].iloc[0], rtol=1e-6
    )
    scale = _tensor_values(glmm, "dispersion/scale")
    np.testing.assert_allclose(float(scale[-1][1]), model.dispersion()["scale"], rtol=1e-6)
    assert "varcorr/Residual/None" not in tensors and not any("Residual" in t for t in tensors)
    # ELBO scalars copied from the epoch logs.
    for key in ("elbo", "nll", "kl"):
        values = _tensor_values(glmm, f"elbo/{key}")
        np.testing.assert_allclose(
            [float(v) for _, v in values], history.history[key], rtol=1e-6
        )
    # Histograms of the posterior means and sds, every epoch (histogram_freq=1).
    for stat in ("mean", "sd"):
        hist = _tensor_values(glmm, f"ranef/county/(Intercept)/{stat}")
        assert len(hist) == epochs
        buckets = hist[-1][1]  # (k, 3): left edge, right edge, count
        assert buckets.ndim == 2 and buckets.shape[1] == 3
        assert buckets[:, 2].sum() == pytest.approx(85)
    mean = model.ranef()["county"]["(Intercept)"].to_numpy()
    last = _tensor_values(glmm, "ranef/county/(Intercept)/mean")[-1][1]
    assert last[0, 0] == pytest.approx(mean.min(), abs=1e-5)
    assert last[-1, 1] == pytest.approx(mean.max(), abs=1e-5)

    # The report: a training summary at the last epoch, then model.report() from write_final.
    reports = _tensor_values(glmm, "report")
    assert [s for s, _ in reports] == [epochs - 1, epochs]
    summary = reports[0][1].item().decode()
    final = reports[1][1].item().decode()
    assert summary.startswith("```") and "GLMM training summary" in summary and "county" in summary
    assert final.startswith("```\n" + model.report().splitlines()[0])
    assert "ELBO" in final and "Fixed effects:" in final

    # The caterpillar plot: a PNG image summary [width, height, png].
    images = _tensor_values(glmm, "ranef/caterpillar")
    assert len(images) == 1 and images[0][0] == epochs - 1
    width, height, png = images[0][1]
    pixels = tf.image.decode_png(png).numpy()
    assert pixels.shape[0] == int(height) > 0 and pixels.shape[1] == int(width) > 0
    assert pixels.std() > 0  # not a blank image


def test_write_final_is_once_per_fit(fitted):
    model, _, log_dir, callback = fitted
    callback.write_final(model)  # already written: no second report
    callback.close()
    glmm = _accumulator(os.path.join(log_dir, "glmm"))
    assert len(glmm.Tensors("report")) == 2


def test_config_round_trip(tmp_path):
    callback = GLMMTensorBoard(str(tmp_path), histogram_freq=3, image=False)
    config = callback.get_config()
    assert config == {"log_dir": str(tmp_path), "histogram_freq": 3, "image": False}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(callback))
    assert isinstance(restored, GLMMTensorBoard) and restored.get_config() == config
    with pytest.raises(ValueError, match="histogram_freq"):
        GLMMTensorBoard(str(tmp_path), histogram_freq=-1)


@pytest.mark.filterwarnings("ignore:GLMM fit did not converge:RuntimeWarning")
def test_histogram_freq_and_correlated_formula_model(tmp_path):
    """A formula model, correlated slope, joint posterior: lme4 names, correlations, histograms."""
    rng = np.random.default_rng(1)

    groups, per = 12, 10
    g = np.repeat(np.arange(groups), per)
    days = np.tile(np.arange(per, dtype=float), groups)
    b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.25]], groups)
    y = 2 + 0.5 * days + b[g, 0] + b[g, 1] * days + rng.normal(0, 0.5, len(g))
    data = pd.DataFrame({"y": y, "Days": days, "Subject": [f"s{i}" for i in g]})
    model = kg.GLMM.from_formula("y ~ Days + (Days | Subject)", data, posterior="joint")
    callback = GLMMTensorBoard(str(tmp_path), histogram_freq=4, image=False)
    history = model.fit(data, epochs=6, callbacks=[callback])
    callback.close()
    epochs = len(history.epoch)
    acc = _accumulator(str(tmp_path / "glmm"))
    tags = set(acc.Tags()["tensors"])
    assert {"varcorr/Subject/(Intercept)", "varcorr/Subject/Days",
            "varcorr/Subject/corr_(Intercept)_Days", "dispersion/scale"} <= tags
    vc = model.varcorr()
    corr = vc[vc["var2"].notna()]["sdcor"].iloc[0]
    value = _tensor_values(acc, "varcorr/Subject/corr_(Intercept)_Days")[-1][1]
    np.testing.assert_allclose(float(value), corr, rtol=1e-6)
    # Histograms at epochs 4, 8, ... plus the final state.
    steps = [s for s, _ in _tensor_values(acc, "ranef/Subject/Days/mean")]
    expected = sorted({e for e in range(epochs) if (e + 1) % 4 == 0} | {epochs - 1})
    assert steps == expected
    assert "ranef/caterpillar" not in tags
    assert "report" in tags


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


@pytest.mark.slow  # ~20 s: the server process imports TensorFlow
def test_tensorboard_server_serves_the_elbo(fitted, tmp_path):
    model, history, log_dir, _ = fitted
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    stderr_path = tmp_path / "tensorboard.stderr"
    with open(stderr_path, "wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--port", str(port),
             "--host", "127.0.0.1", "--load_fast=false", "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            tags = None
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    break
                try:
                    tags = _get_json(base + "/data/plugin/scalars/tags")
                    if "epoch_elbo" in tags.get("train", {}) and "elbo/elbo" in tags.get("glmm", {}):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                    pass
                time.sleep(0.5)
            else:
                tags = None
            if not tags or "elbo/elbo" not in tags.get("glmm", {}) or "epoch_elbo" not in tags.get("train", {}):
                stderr.flush()
                pytest.fail(
                    f"TensorBoard did not serve the runs within 60 s (exit code {server.poll()}; "
                    f"tags {tags}):\n{stderr_path.read_text(errors='replace')[-4000:]}"
                )
            assert "varcorr/county/(Intercept)" in tags["glmm"]

            def scalars(run, tag):
                query = urllib.parse.urlencode({"run": run, "tag": tag})
                return _get_json(f"{base}/data/plugin/scalars/scalars?{query}")

            expected = history.history["elbo"]
            for run, tag in (("train", "epoch_elbo"), ("glmm", "elbo/elbo")):
                rows = scalars(run, tag)  # [[wall_time, step, value], ...]
                assert [int(step) for _, step, _ in rows] == list(range(len(expected)))
                np.testing.assert_allclose([v for _, _, v in rows], expected, rtol=1e-6)
            sd = scalars("glmm", "varcorr/county/(Intercept)")
            np.testing.assert_allclose(sd[-1][2], model.terms[0].prior_stddev()[0], rtol=1e-6)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
