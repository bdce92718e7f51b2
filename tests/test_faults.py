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


def test_a_file_changed_under_a_streamed_fit_stops_it_with_the_file_named(radon_csv):
    source, (a, b) = radon_csv
    size = os.path.getsize(b)
    model = kg.GLMM.from_formula(RADON, source)
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
    model = kg.GLMM.from_formula(RADON, source)
    callback = AtEpochEnd(lambda: truncate_mid_line(a), batch=2)
    with pytest.raises(kg.FilesChangedError, match=re.escape(a) + r": the file changed .*size: expected"):
        model.fit(source, callbacks=[callback], **STREAM)


def test_a_file_deleted_mid_fit_is_named(radon_csv):
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source)
    with pytest.raises(kg.FilesChangedError, match=re.escape(b) + ": the file vanished since the scan") as info:
        model.fit(source, callbacks=[AtEpochEnd(lambda: os.remove(b))], **STREAM)
    assert info.value.changes == {"exists": (True, False)}


def test_a_file_modified_after_the_scan_is_named(radon_csv):
    # The same size, another value: the modification time tells.
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source)
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
    assert info.value.changes == {"mtime": (mtime, mtime + 10**9)}
    assert f"{a}: the file changed since the scan (mtime: expected {mtime} ns" in str(info.value)


def test_rows_that_change_with_size_and_mtime_kept_are_counted_at_the_end_of_a_pass(radon_csv):
    # The last data row blanked out (blank lines are skipped), size and mtime restored:
    # only the row count at the end of the pass can tell, and it does.
    source, (a, b) = radon_csv
    model = kg.GLMM.from_formula(RADON, source)
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
    # nobs() = 919. The data fit in the shuffle buffer (read once, kept): checked as read.
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
    assert sims.shape == (3, len(data))
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
