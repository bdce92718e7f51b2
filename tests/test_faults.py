"""Faults: files that change under a streamed fit, seeds that reproduce, and errors
that name their culprit (issue 17, items 3 to 5)."""

import os
import re

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import keras_glmm as kg
from keras_glmm import streaming

RADON = "log_radon ~ floor + (1 | county)"


# ------------------------------------------------------------ files that change
@pytest.fixture
def radon_csv(tmp_path):
    """Radon (919 rows) in two CSV files, and the source reading them in chunks of 100 rows."""
    radon = kg.datasets.load_radon()[["log_radon", "floor", "county"]]
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    radon.iloc[:460].to_csv(paths[0], index=False)
    radon.iloc[460:].to_csv(paths[1], index=False)
    return kg.read_csv(str(tmp_path / "*.csv"), chunk_rows=100), [str(p) for p in paths]


class AtEpochEnd(keras.callbacks.Callback):
    """Runs `action` once, at the end of the first epoch (between epochs of a fit)."""

    def __init__(self, action, batch=None):
        super().__init__()
        self.action, self.batch, self.done = action, batch, False

    def _run(self):
        if not self.done:
            self.done = True
            self.action()

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None:
            self._run()

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is not None and batch >= self.batch:
            self._run()


def truncate_mid_line(path):
    """Cuts a CSV file in the middle of its 101st line."""
    data = open(path, "rb").read()
    cut = [m.start() for m in re.finditer(b"\n", data)][100] + 5
    with open(path, "wb") as f:
        f.write(data[:cut])
    return cut


# The generator path (the data do not fit the 300-row shuffle buffer): each epoch reads the files.
STREAM = dict(batch_size=100, shuffle_buffer=300, epochs=6, steps_per_epoch=10)
# Streamed, not read into memory (keras_glmm.streaming.in_memory): no bytes for the rows.
STREAMED = dict(memory_budget=1)


def test_a_file_changed_under_a_streamed_fit_stops_it_with_the_file_named(radon_csv):
    source, (a, b) = radon_csv
    size = os.path.getsize(b)
    model = kg.GLMM.from_formula(RADON, source, **STREAMED)
    # The scan recorded each file: its size, mtime and rows (460 and 459 data rows).
    stamps = model._stream_scan.stamps
    assert [stamps[p].rows for p in (a, b)] == [460, 459]
    assert stamps[b].size == size and stamps[b].mtime_ns == os.stat(b).st_mtime_ns

    # Truncated mid-line between epochs: stopped at the next epoch, the file and its sizes named.
    cut = {}
    callback = AtEpochEnd(lambda: cut.setdefault("at", truncate_mid_line(b)))
    with pytest.raises(kg.FilesChangedError) as info:
        model.fit(source, callbacks=[callback], **STREAM)
    message = str(info.value)
    assert message.startswith(f"{b}: the file changed since the scan")
    assert f"size: expected {size} bytes, found {cut['at']} bytes" in message
    assert info.value.path == b and info.value.changes["size"] == (size, cut["at"])
    assert not isinstance(info.value, tf.errors.OpError)


def test_a_file_truncated_while_the_pipeline_reads_it_is_our_error_not_tensorflows(radon_csv):
    # Truncated during an epoch, while tf.data's generator reads ahead: whichever sees it first
    # (the generator mid-file, the row count at a file's end, the next epoch's check), the
    # error that reaches the user is ours, naming the file.
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source, **STREAMED)
    callback = AtEpochEnd(lambda: truncate_mid_line(a), batch=2)
    with pytest.raises(kg.FilesChangedError, match=re.escape(a) + r": the file changed .*size: expected"):
        model.fit(source, callbacks=[callback], **STREAM)


def test_a_file_deleted_mid_fit_is_named(radon_csv):
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source, **STREAMED)
    with pytest.raises(kg.FilesChangedError, match=re.escape(b) + ": the file vanished since the scan") as info:
        model.fit(source, callbacks=[AtEpochEnd(lambda: os.remove(b))], **STREAM)
    assert info.value.changes == {"exists": (True, False)}


def test_a_file_modified_after_the_scan_is_named(radon_csv):
    # The same size, another value: the modification time tells.
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source, **STREAMED)
    mtime = os.stat(a).st_mtime_ns
    text = open(a).read()
    lines = text.split("\n")
    lines[5] = lines[5].replace("0,", "1,", 1)  # a floor value flipped, the length kept
    assert len("\n".join(lines)) == len(text)

    def modify():
        with open(a, "w") as f:
            f.write("\n".join(lines))
        os.utime(a, ns=(mtime + 10**9, mtime + 10**9))  # a clock that did tick

    with pytest.raises(kg.FilesChangedError) as info:
        model.fit(source, callbacks=[AtEpochEnd(modify)], **STREAM)
    # tf.data may already be reading the next pass when the callback runs: the check
    # before that read or the one at the epoch's start reports it, with the same mtime.
    assert info.value.changes["mtime"] == (mtime, mtime + 10**9)
    assert f"{a}: the file changed since the scan (" in str(info.value) and f"mtime: expected {mtime} ns" in str(info.value)


def test_rows_that_change_with_size_and_mtime_kept_are_counted_at_the_end_of_a_pass(radon_csv):
    # The last data row blanked out (blank lines are skipped), size and mtime restored:
    # only the row count at the end of the pass can tell, and it does.
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source, **STREAMED)
    st = os.stat(b)
    data = open(b, "rb").read()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(b, "wb") as f:
        f.write(data[:last] + b"\n" * (len(data) - last))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Three passes an epoch: the generator meets the short file mid-epoch, inside tf.data
    # (an UnknownError there), and the error reaches the user as itself.
    with pytest.raises(kg.FilesChangedError, match=re.escape(b) + r".*\(rows: expected 459, found 458\)") as info:
        model.fit(source, **{**STREAM, "steps_per_epoch": 30})
    assert isinstance(info.value.__context__, tf.errors.OpError)


def test_files_cut_after_the_scan_are_refused_before_the_fit(tmp_path):
    # The case: radon cut to 229 rows after the scan used to give converged_=True,
    # nobs() = 919. The rows fit in memory: the files are checked against the scan's
    # stamps before the scan's rows are fitted.
    radon = kg.datasets.load_radon()
    path = tmp_path / "radon.parquet"
    radon.to_parquet(path)
    source = kg.read_parquet(str(path), chunk_rows=100)
    model = kg.GLMM.from_formula(RADON, source)
    radon.iloc[:229].to_parquet(path)
    with pytest.raises(kg.FilesChangedError, match=re.escape(str(path)) + r": the file changed .*size"):
        model.fit(source)
    # The same after a fit: the final ELBO's pass, elbo(source).
    radon.to_parquet(path)
    model = kg.glmm(RADON, source)
    assert model.nobs() == 919
    radon.iloc[:229].to_parquet(path)
    with pytest.raises(kg.FilesChangedError, match="size: expected"):
        model.elbo(source)


# ------------------------------------------------------------ seeds
@pytest.fixture(scope="module")
def sleep_fit():
    sleep = kg.datasets.load_sleepstudy()
    return kg.glmm("Reaction ~ Days + (Days | Subject)", sleep), sleep


@pytest.mark.parametrize("family", ["gaussian", "poisson", "binomial", "zip"])
def test_seeded_draws_repeat_and_other_seeds_differ(family, sleep_fit):
    if family == "gaussian":
        fit, data = sleep_fit
    else:
        rng = np.random.default_rng(3)
        g = np.repeat(np.arange(12), 10)
        eta = 0.3 + 0.5 * rng.standard_normal(12)[g]
        data = pd.DataFrame({"g": g, "x": rng.standard_normal(120)})
        data["y"] = rng.poisson(np.exp(eta)) if family != "binomial" else rng.binomial(1, 1 / (1 + np.exp(-eta)))
        if family == "zip":
            data.loc[rng.random(120) < 0.3, "y"] = 0
        fit = kg.glmm("y ~ x + (1 | g)", data, family=family)
    new = data.iloc[:7]
    first = fit.posterior_predictive(new, num_draws=50, seed=11)
    np.testing.assert_array_equal(fit.posterior_predictive(new, num_draws=50, seed=11), first)
    assert not np.array_equal(fit.posterior_predictive(new, num_draws=50, seed=12), first)
    assert not np.array_equal(fit.posterior_predictive(new, num_draws=50), fit.posterior_predictive(new, num_draws=50))
    sims = fit.simulate(3, seed=5)
    assert sims.shape == (len(data), 3) and list(sims.columns) == ["sim_1", "sim_2", "sim_3"]  # lme4's layout
    np.testing.assert_array_equal(fit.simulate(3, seed=5), sims)
    assert not np.array_equal(fit.simulate(3, seed=6), sims)


@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
def test_a_seeded_minibatch_fit_of_a_data_frame_repeats_its_estimates(sleep_fit):
    # kg.glmm(..., seed=) used to be a TypeError on a data frame. Minibatches of 60 rows:
    # the seed deals the batches, the same seed the same estimates to the last bit.
    _, sleep = sleep_fit
    options = dict(batch_size=60, epochs=8, seed=0)
    one = kg.glmm("Reaction ~ Days + (Days | Subject)", sleep, **options)
    two = kg.glmm("Reaction ~ Days + (Days | Subject)", sleep, **options)
    other = kg.glmm("Reaction ~ Days + (Days | Subject)", sleep, **{**options, "seed": 1})
    np.testing.assert_array_equal(one.fixef().values, two.fixef().values)
    np.testing.assert_array_equal(one.varcorr()["sdcor"].values, two.varcorr()["sdcor"].values)
    np.testing.assert_array_equal(one.ranef()["Subject"].values, two.ranef()["Subject"].values)
    assert not np.array_equal(one.fixef().values, other.fixef().values)
    # The batches themselves: the same seed deals the same rows, epoch after epoch.
    from keras_glmm.batches import minibatches

    def rows(seed):
        data = minibatches(np.arange(1000.0), 100, seed=seed, block_rows=10)
        return np.concatenate([b.numpy() for b in data.take(20)])

    np.testing.assert_array_equal(rows(4), rows(4))
    assert not np.array_equal(rows(4), rows(5))
    assert sorted(rows(4)[:1000]) == list(range(1000))  # an epoch holds every row once
    assert not np.array_equal(rows(4)[:1000], rows(4)[1000:])  # and the next deals them anew


# ------------------------------------------------------------ errors that name their culprit
@pytest.fixture(scope="module")
def served(sleep_fit, tmp_path_factory):
    fit, sleep = sleep_fit
    path = tmp_path_factory.mktemp("served") / "1"
    fit.export(path)
    return fit, sleep, path


def test_bad_serving_requests_name_the_input(served):
    fit, sleep, path = served
    features = kg.serving.serving_features(fit, sleep.iloc[:6])
    function = kg.serving.load(path)
    np.testing.assert_allclose(function(features)["mean"], fit.predict_response(sleep.iloc[:6]), rtol=1e-6)
    # The Python-side check: the key, what was expected and what came.
    bad = {
        "serving input 'Days' must be float32 (the signature's dtype); received int64": dict(
            features, Days=np.arange(6)),
        "serving input 'Days' must have shape (rows,): one value per row; received shape (6, 1)": dict(
            features, Days=features["Days"][:, None]),
        "serving inputs of different lengths, {'Days': 5, 'Subject': 6}": dict(features, Days=features["Days"][:5]),
        "serving input(s) ['Subject'] missing": {"Days": features["Days"]},
        "unknown serving input(s) ['days']": dict(features, days=features["Days"]),
    }
    for message, request in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            function(request)
    # The graph's own asserts, for a client calling the SavedModel directly.
    raw = tf.saved_model.load(str(path)).signatures["serving_default"]
    tensors = {k: tf.constant(v) for k, v in features.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"serving input `Days` must have shape \(rows,\): one value per row; received shape \(\] \[6, 2\]"):
        raw(**dict(tensors, Days=tf.reshape(tf.concat([tensors["Days"]] * 2, 0), (6, 2))))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"serving input `Days` has\] \[5\] \[rows where `Subject` has\] \[6\]"):
        raw(**dict(tensors, Days=tensors["Days"][:5]))


def test_export_to_a_full_disk_is_an_oserror_naming_the_path(sleep_fit, tmp_path, monkeypatch):
    from tensorflow.python.lib.io import file_io

    def full(*args, **kwargs):
        raise tf.errors.OutOfRangeError(None, None, "Write failed: No space left on device")

    monkeypatch.setattr(file_io, "atomic_write_string_to_file", full)
    fit, _ = sleep_fit
    target = tmp_path / "full" / "1"
    with pytest.raises(OSError, match=re.escape(f"Could not write the SavedModel to '{target}' (is the disk full?)")) as info:
        fit.export(target)
    assert info.value.filename == str(target)


def test_damaged_saved_files_name_the_file(sleep_fit, tmp_path):
    fit, _ = sleep_fit
    archive = tmp_path / "m.keras"
    fit.save(archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit flipped in the weights
    archive.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"'{archive}': could not read the model; the file is damaged")):
        kg.load_model(archive)
    weights = tmp_path / "m.weights.h5"
    fit.save_weights(weights)
    data = bytearray(weights.read_bytes())
    data[2000:4000] = bytes(2000)  # h5py's KeyError ("Unable to synchronously open object") named no file
    weights.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"'{weights}': could not read the weights")):
        fit.load_weights(weights)


def test_covariates_that_overflow_or_are_dates_are_named(sleep_fit):
    _, sleep = sleep_fit
    huge = sleep.assign(Days=sleep["Days"].astype(float))
    huge.loc[3, "Days"] = 1e300  # was LinAlgError: SVD did not converge
    with pytest.raises(ValueError, match=r"Input 'x' holds 1e\+300 in row 3, column 1 \('Days'\).*Rescale"):
        kg.glmm("Reaction ~ Days + (1 | Subject)", huge)
    square = sleep.assign(Days=sleep["Days"].astype(float))
    square.loc[5, "Days"] = 1e200  # finite in float64, its square is not
    with pytest.raises(ValueError, match=r"holds 1e\+200 in row 5, column 1 \('Days'\)"):
        kg.GLMM.from_formula("Reaction ~ Days + (1 | Subject)", square, dtype="float64")
    dated = sleep.assign(date=pd.Timestamp("2020-01-01") + pd.to_timedelta(sleep["Days"], unit="D"))
    with pytest.raises(ValueError, match=r"column 'date' \(used by the fixed effects\) holds date-times.*\.dt\.days"):
        kg.glmm("Reaction ~ date + (1 | Subject)", dated)
    # As a factor a date-time is categorical: one column per day after the first.
    from keras_glmm.design import Design

    assert len(Design.from_data("Reaction ~ C(date) + (1 | Subject)", dated).fixed_columns) == 10


def test_date_time_grouping_columns_have_timestamps_as_levels(sleep_fit, tmp_path):
    # Was "level index -1 in row 0 is outside [0, 5)". Each subject starts on one of 5 days.
    _, sleep = sleep_fit
    start = pd.Timestamp("2020-01-01") + pd.to_timedelta(sleep["Subject"].cat.codes % 5, unit="D")
    dated = sleep.assign(start=start)
    fit = kg.glmm("Reaction ~ Days + (1 | start)", dated)
    levels = [f"2020-01-0{d} 00:00:00" for d in range(1, 6)]
    assert list(fit.ranef()["start"].index) == levels
    # The same model as with the timestamps' keys as strings.
    keyed = kg.glmm("Reaction ~ Days + (1 | start)", dated.assign(start=[str(t) for t in start]))
    np.testing.assert_allclose(fit.fixef().values, keyed.fixef().values, rtol=1e-6)
    np.testing.assert_allclose(fit.varcorr()["sdcor"].values, keyed.varcorr()["sdcor"].values, rtol=1e-6)
    # New data in another unit (seconds) find the same levels; the export serves them.
    new = dated.iloc[:5].assign(start=dated["start"].iloc[:5].astype("datetime64[s]"))
    np.testing.assert_allclose(fit.predict_response(new), fit.predict_response(dated.iloc[:5]), rtol=1e-6)
    fit.export(tmp_path / "1")
    out = kg.serving.load(tmp_path / "1")(kg.serving.serving_features(fit, new))
    np.testing.assert_allclose(out["mean"], fit.predict_response(new), rtol=1e-6)


def test_empty_inputs_give_empty_results_and_draws_need_a_positive_count(sleep_fit):
    fit, sleep = sleep_fit
    empty = sleep.iloc[:0]
    assert fit.predict_response(empty).shape == (0,)  # was UnboundLocalError
    assert fit.predict_response(empty, type="link").shape == (0,)
    assert fit.predict(empty).shape == (0,)
    assert fit.posterior_predictive(empty, num_draws=4, seed=0).shape == (0, 4)  # rows x draws
    x, _ = fit._frame_arrays(empty, with_response=False)
    assert {k: v.shape for k, v in fit.predict(x).items()}["mean"] == (0,)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"`num_draws` must be a positive integer. Received: num_draws={bad!r}")):
            fit.posterior_predictive(sleep.iloc[:3], num_draws=bad)
    with pytest.raises(ValueError, match=re.escape("`nsim` must be a positive integer. Received: nsim=0")):
        fit.simulate(0)
