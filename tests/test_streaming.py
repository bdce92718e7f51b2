"""Fitting from files read in chunks (keras_glmm.streaming): the same design and
estimates as in memory, errors that name the file and line, a bounded shuffle."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import keras_glmm as kg
import reference_data as refs
from keras_glmm import streaming
from keras_glmm.design import Design

SLEEP = "Reaction ~ Days + (Days | Subject)"
RADON = "log_radon ~ floor + (1 | county)"
# Streamed, not read into memory (keras_glmm.streaming.in_memory): no bytes for the rows.
STREAMED = dict(memory_budget=1)


def split_csv(frame, tmp_path, at, **kwargs):
    """Writes `frame` as two CSV files split at row `at`; returns their paths."""
    paths = [tmp_path / "part1.csv", tmp_path / "part2.csv"]
    frame.iloc[:at].to_csv(paths[0], index=False, **kwargs)
    frame.iloc[at:].to_csv(paths[1], index=False, **kwargs)
    return [str(p) for p in paths]


def read_all_csv(paths):
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


@pytest.fixture(scope="module")
def sleep():
    return kg.datasets.load_sleepstudy()


@pytest.fixture(scope="module")
def sleep_fits(sleep, tmp_path_factory):
    """The sleepstudy fit in memory and streamed from two CSV files in chunks of 40 rows."""
    tmp_path = tmp_path_factory.mktemp("sleep")
    paths = split_csv(sleep, tmp_path, 100)
    full = read_all_csv(paths)
    memory = kg.glmm(SLEEP, full)
    source = kg.read_csv(str(tmp_path / "part*.csv"), chunk_rows=40)
    streamed = kg.glmm(SLEEP, source, **STREAMED)
    return memory, streamed, full, source


@pytest.fixture(scope="module")
def radon_fits(tmp_path_factory):
    """Radon in memory and streamed from two Parquet files in batches of 100 rows."""
    tmp_path = tmp_path_factory.mktemp("radon")
    radon = kg.datasets.load_radon()
    radon.iloc[:500].to_parquet(tmp_path / "a.parquet")
    radon.iloc[500:].to_parquet(tmp_path / "b.parquet")
    full = pd.concat(
        [pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")], ignore_index=True
    )
    memory = kg.glmm(RADON, full)
    source = kg.read_parquet(str(tmp_path / "*.parquet"), chunk_rows=100)
    streamed = kg.glmm(RADON, source, **STREAMED)
    return memory, streamed, full, source


def assert_same_fit(memory, streamed):
    np.testing.assert_allclose(streamed.fixef().values, memory.fixef().values, rtol=1e-3)
    sds = streamed.varcorr()["sdcor"].values
    np.testing.assert_allclose(sds, memory.varcorr()["sdcor"].values, rtol=0.01)
    assert streamed.converged_


# ------------------------------------------------------------ same fits
def test_csv_fit_matches_in_memory(sleep_fits):
    memory, streamed, full, source = sleep_fits
    assert_same_fit(memory, streamed)
    # lme4's ML fixed effects (sleepstudy: 251.405, 10.467).
    np.testing.assert_allclose(streamed.fixef().values, [251.405, 10.467], atol=2e-3)
    assert streamed.design.random[0].levels == memory.design.random[0].levels
    assert streamed.design.fixed_columns == memory.design.fixed_columns == ["(Intercept)", "Days"]
    counts = streamed.terms[0].level_counts.numpy()
    np.testing.assert_array_equal(counts, memory.terms[0].level_counts.numpy())
    # The final ELBO is one streamed pass: the in-memory value on the same estimates.
    assert streamed.fit_summary_["nobs"] == 180
    np.testing.assert_allclose(streamed.fit_summary_["elbo"], memory.fit_summary_["elbo"], atol=0.01)
    x, y = streamed._frame_arrays(full)
    exact = streamed.elbo(x, y)["elbo"]
    np.testing.assert_allclose(streamed.elbo(source)["elbo"], exact, rtol=1e-6)


def test_parquet_fit_matches_in_memory(radon_fits):
    memory, streamed, full, _ = radon_fits
    assert_same_fit(memory, streamed)
    np.testing.assert_allclose(streamed.fixef().values, [1.4612, -0.6926], atol=2e-4)
    # Parquet keeps the categorical column: the levels come in category order.
    levels = streamed.design.random[0].levels
    assert levels == memory.design.random[0].levels == list(full["county"].cat.categories)
    counts = full["county"].value_counts().reindex(levels).to_numpy()
    np.testing.assert_array_equal(streamed.terms[0].level_counts.numpy(), counts)
    assert streamed.fit_summary_["nobs"] == 919


def test_streamed_results_and_in_memory_only_results(radon_fits):
    memory, streamed, full, _ = radon_fits
    newdata = full.iloc[:50]
    np.testing.assert_allclose(
        streamed.predict_response(newdata), memory.predict_response(newdata), rtol=1e-3, atol=1e-4
    )
    ranef = streamed.ranef()["county"]
    np.testing.assert_allclose(ranef.iloc[:, 0].values, memory.ranef()["county"].iloc[:, 0].values, atol=2e-3)
    assert list(streamed.coef()["county"].index) == list(memory.coef()["county"].index)
    for result in (streamed.vcov, streamed.coef_table, streamed.fitted, streamed.residuals):
        with pytest.raises(ValueError, match="fitted from files.*Pass newdata"):
            result()
    assert "standard errors unavailable" in streamed.report()


# ------------------------------------------------------------ files that fit in memory
def test_files_within_the_memory_budget_fit_as_their_concatenated_frame(sleep_fits, radon_fits):
    # 180 rows (9 kB) within the default 2 GiB: the scan's sample holds every row, and the
    # engine fits it as it fits the concatenated frame: the same numbers, standard errors too.
    for formula, (memory, _, full, source) in ((SLEEP, sleep_fits), (RADON, radon_fits)):
        fit = kg.glmm(formula, source)
        assert fit.fit_summary_["nobs"] == len(full)
        np.testing.assert_allclose(fit.fixef().values, memory.fixef().values, rtol=1e-8)
        np.testing.assert_allclose(fit.coef_table().to_numpy(), memory.coef_table().to_numpy(), rtol=1e-8)
        np.testing.assert_allclose(fit.varcorr()["vcov"].values, memory.varcorr()["vcov"].values, rtol=1e-8)
        pd.testing.assert_series_equal(fit.fitted(), memory.fitted(), rtol=1e-8)


def test_the_memory_budget_decides_between_memory_and_streaming(sleep_fits):
    memory, streamed, full, source = sleep_fits
    scan = kg.GLMM.from_formula(SLEEP, source)._stream_scan
    # 8 bytes a value: Reaction, Days, Subject read; x (2), Subject, Subject_z, y coded.
    need = streaming.in_memory_bytes(scan)
    assert need == 180 * 8 * (3 + 5)
    frame = streaming.in_memory_frame(scan, memory.family, memory_budget=need)
    pd.testing.assert_frame_equal(frame, full[["Reaction", "Days", "Subject"]], check_dtype=False)
    assert streaming.in_memory_frame(scan, memory.family, memory_budget=need - 1) is None
    # Beyond the budget the fit streams (streamed: memory_budget=1), as before.
    with pytest.raises(ValueError, match="fitted from files"):
        streamed.vcov()


def test_options_only_a_streamed_fit_honours_stream_files_within_the_budget(sleep_fits, sleep):
    _, _, _, source = sleep_fits
    # steps_per_epoch (or shuffle_buffer, validation_data) has no meaning for the engine:
    # the files are streamed, and the option honoured, instead of refused or ignored.
    model = kg.GLMM.from_formula(SLEEP, source)
    with pytest.warns(RuntimeWarning, match="did not converge in 2 epochs"):
        model.fit(source, steps_per_epoch=20, epochs=2)
    assert model.posterior_kind == "mean-field" and len(model.history.history["loss"]) == 2
    # A model whose weights are an array (rows of another frame) cannot weight the files' rows.
    weighted = kg.GLMM.from_formula(SLEEP, sleep, weights=np.ones(len(sleep)))
    with pytest.raises(ValueError, match="`weights` are an array .* the files' rows have none"):
        weighted.fit(source)


def test_a_worker_whose_files_hold_no_row_is_an_error_not_a_hang(tmp_path, sleep, monkeypatch):
    # Worker 1 of 2 takes the second file, a header alone: it would end its passes at
    # once while worker 0 waits in the all-reduce (no collective timeout).
    sleep.to_csv(tmp_path / "a.csv", index=False)
    sleep.iloc[:0].to_csv(tmp_path / "b.csv", index=False)
    model = kg.GLMM.from_formula(SLEEP, kg.read_csv(str(tmp_path / "*.csv")))
    from keras_glmm.streaming import pipeline

    monkeypatch.setattr(pipeline, "multi_worker_shares", lambda: (1, 2))
    with pytest.raises(ValueError, match=r"worker 1 of 2's files \[.*b.csv'\] hold no row to fit"):
        pipeline.dataset(model._stream_scan, model.family, "float32", batch_size=64, shuffle_buffer=1000)


def test_files_larger_than_the_sample_are_read_once_more_into_memory(sleep_fits):
    memory, _, full, source = sleep_fits
    model = kg.GLMM.from_formula(SLEEP, source, sample_rows=50)
    scan = model._stream_scan
    assert len(scan.sample) == 50
    frame = streaming.in_memory_frame(scan, model.family, memory_budget=2**30)
    pd.testing.assert_frame_equal(frame, full[["Reaction", "Days", "Subject"]], check_dtype=False)
    model.fit(source)
    # Started from the GLM of the sample, the engine ends where the frame's fit does.
    np.testing.assert_allclose(model.coef_table().to_numpy(), memory.coef_table().to_numpy(), rtol=1e-5)


def test_minibatch_steps_through_the_shuffle_buffer_train_the_same_elbo(sleep_fits):
    # 180 rows, a buffer of 90: each pass reads the files again and shuffles them in
    # blocks (the generator path), two minibatches of 90 rows a pass. At the
    # optimum, the training loss of a pass is -ELBO / n: the same objective (rows
    # whole, each level's KL scaled by its count in the files). A minibatch fit to
    # convergence takes minutes here (the ELBO's noise keeps ELBOConvergence
    # waiting), so the steps are checked instead.
    memory, streamed, _, source = sleep_fits
    model = kg.GLMM.from_formula(SLEEP, source, **STREAMED)
    model.set_weights(streamed.get_weights())
    # Plain Adam steps too small to move the optimum (the default minibatch optimizer
    # would take natural-gradient steps of the random effects).
    model.compile(optimizer=kg.SparseAdam(learning_rate=1e-6))
    history = model.fit(source, batch_size=90, shuffle_buffer=90, seed=1, epochs=3, steps_per_epoch=2)
    assert int(model.optimizer.iterations) == 6  # an epoch of 2 steps runs 2, not 100
    assert model.steps_per_execution == 100  # restored after the fit
    n = 180
    np.testing.assert_allclose(history.history["loss"], -memory.fit_summary_["elbo"] / n, rtol=1e-4)
    np.testing.assert_allclose(model.fixef().values, memory.fixef().values, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:GLMM fit did not converge")
def test_a_model_built_from_a_frame_fits_files_of_its_levels(sleep, sleep_fits, tmp_path):
    memory, _, full, source = sleep_fits
    model = kg.GLMM.from_formula(SLEEP, full)
    model.fit(source, epochs=1)  # the files are counted in one pass first
    assert model._stream_scan.num_rows == 180
    np.testing.assert_array_equal(model.terms[0].level_counts.numpy(), memory.terms[0].level_counts.numpy())
    other = sleep.astype({"Subject": str})
    other.loc[7, "Subject"] = "999"  # a subject the model has never seen, line 9
    paths = split_csv(other, tmp_path, 100)
    message = f"{paths[0]}, line 9: level '999' of grouping factor 'Subject' is not among the model's levels"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(kg.read_csv(paths), epochs=1)


# ------------------------------------------------------------ the scan
def test_scan_learns_the_in_memory_design(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    frame = pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.normal(size=n),
        "f": rng.choice(["lo", "mid", "hi"], n),
        "a": rng.choice([3, 10, 200, 21], n),
        "b": rng.choice(["p", "q", "r10", "r9"], n),
        "period": rng.choice([1, 2, 3, 4], n),
    })
    formula = "y ~ x + f + C(period) + (1 + x | a) + (1 | a:b) + (1 | b)"
    paths = split_csv(frame, tmp_path, 250)
    full = read_all_csv(paths)
    expected = Design.from_data(formula, full)
    result = streaming.scan(kg.read_csv(paths, chunk_rows=64), formula, "gaussian", sample_rows=50)
    design = result.design
    assert result.num_rows == n and len(result.sample) == 50
    assert design.fixed_columns == expected.fixed_columns
    for got, want in zip(design.random, expected.random, strict=True):
        assert got.name == want.name and got.columns == want.columns
        assert got.levels == want.levels  # the same levels in the same order ("3" < "10" < "21" < "200")
    assert design.random[0].levels == ["3", "10", "21", "200"]
    for r, counts in zip(expected.random, result.level_counts, strict=True):
        np.testing.assert_array_equal(counts, np.bincount(r.level_index(full), minlength=r.n_levels))
    # The same arrays for any rows.
    got, y_got = design.arrays(full.iloc[:100])
    want, y_want = expected.arrays(full.iloc[:100])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key])
    np.testing.assert_allclose(y_got, y_want)


def test_a_category_missing_from_the_sample_is_still_coded(tmp_path):
    frame = pd.DataFrame({
        "y": np.arange(40.0) % 7,
        "f": ["a", "b"] * 19 + ["rare", "b"],
        "g": np.arange(40) % 5,
    })
    paths = split_csv(frame, tmp_path, 20)
    result = streaming.scan(kg.read_csv(paths), "y ~ f + (1 | g)", "gaussian", sample_rows=3)
    assert "rare" not in set(result.sample["f"])  # seed 0: the sample missed it
    assert result.design.fixed_columns == ["(Intercept)", "fb", "frare"]
    assert result.design.fixed_columns == Design.from_data("y ~ f + (1 | g)", frame).fixed_columns


def test_scan_codes_factor_slopes_and_level_keys_as_in_memory(tmp_path):
    """Random slopes on a factor, float grouping values and interaction parts holding
    ':' get the in-memory design's columns, level keys and counts from files."""
    rng = np.random.default_rng(5)
    n = 300
    frame = pd.DataFrame({
        "y": rng.normal(size=n),
        "f": rng.choice(["lo", "mid", "hi"], n),
        "g": rng.choice([308.0, 309.0, 310.5, 311.0], n),
        "a": rng.choice(["x:1", "x"], n),
        "b": rng.choice(["y", "1:y"], n),
    })
    frame.loc[n - 1, "f"] = "rare"  # in one row only: the sample misses it
    formula = "y ~ f + (f | g) + (0 + f | a:b) + (1 | a/b)"
    paths = split_csv(frame, tmp_path, 120)
    full = read_all_csv(paths)
    expected = Design.from_data(formula, full)
    result = streaming.scan(kg.read_csv(paths, chunk_rows=50), formula, "gaussian", sample_rows=20)
    assert "rare" not in set(result.sample["f"])
    design = result.design
    assert design.random[0].columns == ["(Intercept)", "flo", "fmid", "frare"]
    assert design.random[1].columns == ["fhi", "flo", "fmid", "frare"]
    assert design.random[0].levels == ["308", "309", "310.5", "311"]
    assert design.random[0].group_kinds == ("float64",)
    assert design.random[1].n_levels == 4 and len(set(design.random[1].levels)) == 3  # "x:1:y" twice
    for got, want, counts in zip(design.random, expected.random, result.level_counts, strict=True):
        assert (got.name, got.columns, got.levels, got.keys) == (want.name, want.columns, want.levels, want.keys)
        assert got.group_kinds == want.group_kinds
        np.testing.assert_array_equal(counts, np.bincount(want.level_index(full), minlength=want.n_levels))
    got, _ = design.arrays(full)
    want, _ = expected.arrays(full)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_na_action_omit_skips_incomplete_rows(sleep, tmp_path):
    frame = sleep.copy()
    frame["Reaction"] = frame["Reaction"].astype(float)
    frame.loc[[3, 150], "Reaction"] = np.nan
    paths = split_csv(frame, tmp_path, 100)
    with pytest.warns(RuntimeWarning, match="skipped 2 of 180 rows"):
        result = streaming.scan(kg.read_csv(paths, chunk_rows=50), SLEEP, "gaussian", na_action="omit")
    assert result.num_rows == 178 and result.num_omitted == 2
    complete = read_all_csv(paths).dropna()
    expected = Design.from_data(SLEEP, complete)
    r = expected.random[0]
    np.testing.assert_array_equal(result.level_counts[0], np.bincount(r.level_index(complete)))


# ------------------------------------------------------------ errors
def test_malformed_row_names_file_and_line(sleep, tmp_path):
    paths = split_csv(sleep, tmp_path, 100)
    lines = Path(paths[1]).read_text().splitlines()
    lines[56] += ",7"  # line 57 of the second file: 4 fields, the header has 3
    Path(paths[1]).write_text("\n".join(lines) + "\n")
    message = f"{paths[1]}, line 57: malformed row: 4 fields where the header has 3"
    with pytest.raises(ValueError, match=re.escape(message)):
        kg.glmm(SLEEP, kg.read_csv(paths, chunk_rows=20))


def test_non_numeric_value_names_file_line_column_and_value(sleep, tmp_path):
    frame = sleep.astype({"Days": object})
    frame.loc[130, "Days"] = "three"  # second file, data row 31: line 32
    paths = split_csv(frame, tmp_path, 100)
    message = f"{paths[1]}, line 32: column 'Days' holds 'three', which is not a number"
    with pytest.raises(ValueError, match=re.escape(message)):
        kg.glmm(SLEEP, kg.read_csv(paths, chunk_rows=20))


def test_missing_value_names_file_and_line(sleep, tmp_path):
    frame = sleep.copy()
    frame.loc[42, "Reaction"] = np.nan  # first file, line 44
    paths = split_csv(frame, tmp_path, 100)
    message = f"{paths[0]}: missing values in column(s) ['Reaction'] at lines [44]"
    with pytest.raises(ValueError, match=re.escape(message)):
        kg.glmm(SLEEP, kg.read_csv(paths, chunk_rows=20))


def test_binomial_response_outside_support_names_file_and_line(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"y": rng.integers(0, 2, 200), "x": rng.normal(size=200), "g": np.arange(200) % 10})
    frame.loc[170, "y"] = 2  # second file, data row 71: line 72
    paths = split_csv(frame, tmp_path, 100)
    message = re.escape(f"{paths[1]}: binomial response 'y' must be 0/1") + ".*line 72 has 2.0"
    with pytest.raises(ValueError, match=message):
        kg.glmm("y ~ x + (1 | g)", kg.read_csv(paths, chunk_rows=30), family="binomial")


def test_poisson_response_outside_support_names_file_and_line(tmp_path):
    frame = pd.DataFrame({"y": [1, 0, 3, 2] * 10, "g": np.arange(40) % 4})
    frame.loc[25, "y"] = -1  # Parquet row 26 of the file
    frame.to_parquet(tmp_path / "counts.parquet")
    path = str(tmp_path / "counts.parquet")
    message = f"{path}: response 'y': row 26 has value -1.0, which is negative"
    with pytest.raises(ValueError, match=re.escape(message)):
        streaming.scan(kg.read_parquet(path, chunk_rows=8), "y ~ 1 + (1 | g)", "poisson")


def test_missing_value_in_parquet_names_file_and_row(tmp_path):
    frame = pd.DataFrame({"y": np.arange(30.0), "g": np.arange(30) % 3})
    frame.loc[[11, 12], "y"] = np.nan
    frame.to_parquet(tmp_path / "gaps.parquet")
    path = str(tmp_path / "gaps.parquet")
    message = f"{path}: missing values in column(s) ['y'] at rows [12, 13]"
    with pytest.raises(ValueError, match=re.escape(message)):
        streaming.scan(kg.read_parquet(path, chunk_rows=10), "y ~ 1 + (1 | g)")


def test_missing_file_and_missing_column_are_named(sleep, tmp_path):
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        kg.read_csv(missing)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        kg.read_parquet(str(tmp_path / "*.parquet"))
    paths = split_csv(sleep, tmp_path, 100)
    sleep.iloc[100:].drop(columns="Days").to_csv(paths[1], index=False)
    message = f"{paths[1]}: column 'Days' (used by the formula) is missing"
    with pytest.raises(ValueError, match=re.escape(message)):
        kg.glmm(SLEEP, kg.read_csv(paths))
    with pytest.raises(ValueError, match=re.escape(f"{paths[0]}: unknown column 'Dayz'")):
        kg.glmm("Reaction ~ Dayz + (1 | Subject)", kg.read_csv(paths))


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable Parquet file")):
        kg.glmm("y ~ 1 + (1 | g)", kg.read_parquet(str(path)))


# ------------------------------------------------------------ the shuffle
def test_block_shuffle_bounds_memory_and_emits_each_row_once():
    chunk, buffer_rows, batch_size, n = 37, 100, 32, 1000
    emitted = []
    held = []

    def blocks():
        for start in range(0, n, chunk):
            # Rows read so far minus rows emitted: what the shuffle holds once it
            # has this block.
            rows = np.arange(start, min(start + chunk, n))
            held.append(rows[-1] + 1 - sum(len(b) for b in emitted))
            yield {"id": rows, "twice": 2 * rows}

    for batch in streaming.block_shuffle(blocks(), buffer_rows, batch_size, np.random.default_rng(0)):
        np.testing.assert_array_equal(batch["twice"], 2 * batch["id"])  # rows stay whole
        emitted.append(batch["id"])
    assert max(held) <= buffer_rows + chunk
    ids = np.concatenate(emitted)
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # every row exactly once
    assert [len(b) for b in emitted[:-1]] == [batch_size] * (len(emitted) - 1)
    assert 0 < len(emitted[-1]) <= batch_size
    assert not np.array_equal(ids, np.arange(n))  # shuffled
    with pytest.raises(ValueError, match="at least one batch"):
        next(streaming.block_shuffle(blocks(), 10, 32))


def test_streamed_pass_emits_every_row_once_per_epoch(sleep_fits):
    memory, _, full, source = sleep_fits
    model = kg.GLMM.from_formula(SLEEP, source)
    data, steps = streaming.dataset(model._stream_scan, model.family, model.compute_dtype, batch_size=32,
                                    shuffle_buffer=64, seed=0)
    assert steps == 6  # ceil(180 / 32)
    batches = list(data.take(2 * steps).as_numpy_iterator())
    for epoch in (batches[:steps], batches[steps:]):
        x = np.concatenate([b[0]["x"] for b in epoch])
        y = np.concatenate([b[1] for b in epoch])
        subject = np.concatenate([b[0]["Subject"] for b in epoch])
        assert [len(b[1]) for b in epoch] == [32] * 5 + [20]
        want_x, want_y = memory._frame_arrays(full)
        # (Subject, Days) names a row: sorted by it, the pass holds every row once.
        order = np.lexsort((x[:, 1], subject))
        want = np.lexsort((want_x["x"][:, 1], want_x["Subject"]))
        np.testing.assert_array_equal(subject[order], want_x["Subject"][want])
        np.testing.assert_array_equal(x[order], want_x["x"][want])
        np.testing.assert_allclose(y[order], want_y[want], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:GLMM fit did not converge")
def test_files_sorted_by_group_stream_to_the_same_fit(tmp_path):
    """Exports are often sorted by group: with a shuffle buffer smaller than the data,
    each window of the files holds few counties. The block shuffle still gives the fit
    of randomly ordered files (measured at scale: benchmarks/bench_sorted_files.py)."""
    radon = kg.datasets.load_radon()[["log_radon", "floor", "county"]]
    fits = {}
    for name, frame in (("shuffled", radon.sample(frac=1.0, random_state=0)),
                        ("sorted", radon.sort_values("county", kind="stable"))):
        folder = tmp_path / name
        folder.mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(frame)), 2)):
            frame.iloc[part].to_csv(folder / f"part-{i}.csv", index=False)
        fits[name] = kg.glmm("log_radon ~ floor + (1|county)", kg.read_csv(str(folder / "*.csv")),
                             **STREAMED, batch_size=128, shuffle_buffer=256, seed=0, epochs=25)
    lme4 = refs.named("radon")
    se = refs.se("radon")
    for name, fit in fits.items():
        assert np.all(np.abs(fit.fixef().values - refs.fixef("radon")) < 0.25 * se), name
        assert fit.random_effects[0].prior_stddev()[0] == pytest.approx(lme4["county.(Intercept)"], rel=0.1), name
