"""Data larger than memory: fitting a GLMM from CSV or Parquet files read in chunks.

```python
source = kg.read_parquet("clicks/*.parquet")          # or kg.read_csv("clicks/*.csv")
model = kg.glmm("y ~ x + (1|user) + (1|item)", source, family="binomial")
```

A formula model needs, before its first step, everything `Design.from_data` learns
from a data frame (the level vocabulary of every grouping factor, each level's row
count, the coding of the fixed effects and of the response) and a starting point
(the GLM fit of `keras_glmm.initialization`). With files, `scan` learns all of it in
one pass over the chunks, holding only what must be held: the vocabularies and
their counts, the distinct values of categorical fixed-effect columns, and a
uniform random sample of rows (a bounded reservoir, 100,000 rows by default). The
sample stands in for the data where a frame is needed: it fixes formulaic's
fixed-effects coding (with one extra row for each category of a categorical
column that the files hold but the sample missed, so no category is lost; the
state of stateful transforms such as `center()` or `scale()` is the sample's) and
gives the GLM starting point. The level vocabularies, their order and the counts
are those of `Design.from_data` on all the rows (`_group_levels` orders a set of
values, so it is called on the distinct values only).

`GLMM.fit(source)` then trains from a `tf.data` pipeline: chunks are read and
turned into model arrays (`Design.arrays`), shuffled by `block_shuffle` (a buffer
of at most `shuffle_buffer` rows is permuted and emitted in batches; shuffling
single rows with `Dataset.shuffle` would cost far more than a training step), and
prefetched. When the data fit in the shuffle buffer they are read once and kept.
The final ELBO of a streamed fit is one more pass over the files; results that need
every training row in memory (`vcov`, `coef_table`, `fitted`, `residuals`,
`simulate`) raise an error saying what to do instead.

Bad data fail with the file and the line: a malformed CSV row, a non-numeric
value in a numeric column, a missing value (under `na_action="raise"`), a response
outside the family's support, a file without a needed column. The index of each
chunk is the line number in the CSV file (the header is line 1, the first data row
line 2; one line per row, as pandas' chunks count rows: blank lines and quoted
fields holding line breaks shift the numbers, except in pandas' own parser errors,
which count lines) or the 1-based row number in a Parquet file.

Files must not change while a model is built and fitted from them: the scan
records each file's size, modification time (ns) and row count (`FileStamp`), and
every later pass (each epoch, the final ELBO, a streamed prediction pass) checks
them before it reads a file and the row count after; the fit also checks them at the
start of every epoch. A file that changed, was truncated or vanished stops the fit
with a `FilesChangedError` naming the file and what changed (size, mtime, rows:
expected and found), never a TensorFlow error from inside the `tf.data` pipeline
(errors raised while the pipeline reads are re-raised as themselves, see
`raising_read_errors`). A file rewritten with the same size within the file
system's clock tick is the one change these checks cannot see.

Column types are fixed by the first chunk that holds the column, as a reader
infers them from the first rows: a column read as numbers there must hold numbers
everywhere (the error names the file, line and value; pass `dtype={"col": str}`
to `read_csv` for a categorical column whose first values look like numbers);
the response, offsets and weights must be numeric. A random slope on a factor
(`(gender | school)`) is coded like a categorical fixed effect: the scan learns its
values from every chunk, so the coding is that of all the rows. Grouping levels
get the keys of `keras_glmm.levels`, the design's own. Integer columns
become float64 when some chunk holds floats or missing values, as they would
when read whole.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm.batches import minibatches
from keras_glmm.design import (
    _C_RE,
    Design,
    _categorical_factors,
    _column_strings,
    _eval_expr,
    _group_levels,
    _is_categorical,
    _level_str,
    _unquote,
)
from keras_glmm import response as response_lib
from keras_glmm.families import get_family
from keras_glmm.formula import FormulaSpec, parse_formula
from keras_glmm.levels import combine_keys, frame_codes, level_name

__all__ = [
    "CSVSource",
    "FileStamp",
    "FilesChangedError",
    "FilesCheck",
    "ParquetSource",
    "Scan",
    "Source",
    "batches",
    "block_shuffle",
    "dataset",
    "read_csv",
    "raising_read_errors",
    "read_parquet",
    "recount",
    "scan",
]

CHUNK_ROWS = 65_536
SAMPLE_ROWS = 100_000
BATCH_SIZE = 65_536
SHUFFLE_BUFFER = 1_000_000
# Rows of the first file read to learn which columns the formula uses.
HEAD_ROWS = 1_000
# Distinct values kept per fixed-effect column: a categorical fixed effect with
# more levels than this is a grouping factor in disguise, and a numeric column
# with more is not categorical.
MAX_CATEGORIES = 10_000
# Fewest steps in an epoch: `GLMM.fit`'s epochs in memory. `ELBOConvergence`
# compares epochs; over a few minibatch steps the ELBO's change is mostly noise,
# and the fit stops early (radon in 2 batches a pass: the county sd 3% off).
MIN_EPOCH_STEPS = 100
_Y = "__y__"  # key of the response in the blocks of `block_shuffle`
_MAX_LISTED = 10


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def _resolve_paths(paths) -> list[str]:
    """A path, a glob pattern or a list of them -> existing file paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no files given: pass a path, a glob pattern or a list of paths")
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"{p}: no file matches this pattern")
            out += matches
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such file")
        else:
            out.append(p)
    return out


class Source:
    """Files read in chunks of rows (the base of `CSVSource` and `ParquetSource`).

    Attributes:
        paths: the files, in reading order (a glob pattern's matches sorted).
        chunk_rows: rows per chunk read.
        unit: how an error names a row: ``"line"`` (CSV) or ``"row"`` (Parquet).
    """

    unit = "row"

    def __init__(self, paths, chunk_rows=CHUNK_ROWS):
        if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"`chunk_rows` must be a positive integer. Received: chunk_rows={chunk_rows!r}")
        self.paths = _resolve_paths(paths)
        self.chunk_rows = int(chunk_rows)

    def __repr__(self):
        shown = self.paths if len(self.paths) <= 3 else [*self.paths[:3], f"... ({len(self.paths)} files)"]
        return f"{type(self).__name__}({shown})"

    def _key(self):
        """What identifies the data read (two sources with equal keys read the same rows)."""
        return (type(self).__name__, tuple(self.paths))

    def columns(self, path: str) -> list[str]:
        """The column names of one file."""
        raise NotImplementedError

    def head(self, rows: int = HEAD_ROWS) -> pd.DataFrame:
        """The first rows of the first file, every column."""
        raise NotImplementedError

    def chunks(self, columns: list[str], order=None) -> Iterator[tuple[str, pd.DataFrame]]:
        """Yields ``(path, frame)``: the files' rows in chunks, only ``columns``.

        Args:
            columns: the columns to read (each file must have them).
            order: optional permutation of the files (a new file order per epoch).

        The frame's index is the line number (CSV) or the 1-based row number
        (Parquet) of each row in its file.
        """
        raise NotImplementedError

    def check_columns(self, columns: list[str]) -> None:
        """Raises a ValueError naming the file and column if a file lacks one of ``columns``."""
        for path in self.paths:
            have = self.columns(path)
            missing = [c for c in columns if c not in have]
            if missing:
                shown = have if len(have) <= 30 else f"{len(have)} columns"
                raise ValueError(
                    f"{path}: column '{missing[0]}' (used by the formula) is missing"
                    + (f", and {missing[1:]}" if len(missing) > 1 else "")
                    + f"; the file has {shown}"
                )


class CSVSource(Source):
    """CSV files read in chunks by `pandas.read_csv(chunksize=...)`.

    Args:
        paths: a path, a glob pattern (``"data/*.csv"``; matches sorted) or a list
            of them.
        chunk_rows: rows per chunk.
        check_fields: check that every row has as many fields as the header.
            pandas skips that check when it reads a subset of the columns
            (`usecols`), so a row with an extra field (an unquoted comma) would be
            read shifted without a word; by default every column is parsed and
            the unused ones dropped. False reads only the formula's columns:
            faster on wide files, without the check.
        **read_csv_kwargs: passed to `pandas.read_csv` (``sep``, ``dtype``,
            ``na_values``, ``compression``, an integer ``skiprows`` or
            ``header``...); not ``chunksize``, ``iterator``, ``usecols``,
            ``index_col`` or ``nrows``, which the source sets.

    Example:

    >>> source = CSVSource("visits/*.csv.gz", sep=";")
    >>> model = kg.glmm("y ~ x + (1 | user)", source, family="poisson")
    """

    unit = "line"

    def __init__(self, paths, chunk_rows=CHUNK_ROWS, check_fields=True, **read_csv_kwargs):
        for key in ("chunksize", "iterator", "usecols", "index_col", "nrows"):
            if key in read_csv_kwargs:
                raise ValueError(
                    f"CSVSource sets `{key}` itself (chunks of `chunk_rows` rows of the formula's "
                    "columns, indexed by line number): do not pass it."
                )
        skiprows = read_csv_kwargs.get("skiprows") or 0
        header = read_csv_kwargs.get("header", "infer")
        if header == "infer":
            header = None if read_csv_kwargs.get("names") is not None else 0
        if not isinstance(skiprows, (int, np.integer)) or not (
            header is None or isinstance(header, (int, np.integer))
        ):
            raise ValueError(
                "CSVSource takes an integer `skiprows` and an integer (or None) `header` only: "
                "the line numbers in its error messages are counted from them."
            )
        super().__init__(paths, chunk_rows)
        self.check_fields = bool(check_fields)
        self.read_csv_kwargs = dict(read_csv_kwargs)
        # Line number of the first data row (1-based, the header counted).
        self.first_line = int(skiprows) + (1 if header is None else int(header) + 2)

    def _key(self):
        return (*super()._key(), repr(sorted(self.read_csv_kwargs.items())))

    @contextlib.contextmanager
    def _errors(self, path):
        """pandas' errors -> ValueErrors that start with the file (and line)."""
        try:
            yield
        except pd.errors.ParserError as e:
            text = " ".join(str(e).split())
            m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
            if m:
                raise ValueError(
                    f"{path}, line {m.group(2)}: malformed row: {m.group(3)} fields where the "
                    f"header has {m.group(1)}"
                ) from None
            raise ValueError(f"{path}: could not parse the CSV file: {text}") from None
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path}: the file is empty (no header line)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: {e}; pass `encoding=` to read_csv") from None

    def columns(self, path):
        with self._errors(path):
            frame = pd.read_csv(path, nrows=0, **self.read_csv_kwargs)
        return [str(c) for c in frame.columns]

    def head(self, rows=HEAD_ROWS):
        path = self.paths[0]
        with self._errors(path):
            frame = pd.read_csv(path, nrows=rows, **self.read_csv_kwargs)
        frame.index = frame.index + self.first_line
        return frame

    def chunks(self, columns, order=None):
        paths = self.paths if order is None else [self.paths[i] for i in order]
        usecols = None if self.check_fields else list(columns)
        for path in paths:
            with self._errors(path):
                reader = pd.read_csv(path, chunksize=self.chunk_rows, usecols=usecols, **self.read_csv_kwargs)
                with reader:
                    for frame in reader:
                        # pandas numbers the rows on from chunk to chunk.
                        frame = frame[list(columns)]
                        frame.index = frame.index + self.first_line
                        yield path, frame


class ParquetSource(Source):
    """Parquet files read in record batches by `pyarrow.parquet.ParquetFile.iter_batches`.

    Only the formula's columns are read. Errors name a row by its 1-based number
    in its file.

    Args:
        paths: a path, a glob pattern (``"data/*.parquet"``; matches sorted) or a
            list of them.
        chunk_rows: rows per record batch.
    """

    unit = "row"

    def _open(self, path):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None

    def columns(self, path):
        return [str(c) for c in self._open(path).schema_arrow.names]

    def head(self, rows=HEAD_ROWS):
        path = self.paths[0]
        file = self._open(path)
        try:
            batch = next(iter(file.iter_batches(batch_size=rows)), None)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: could not read the Parquet file ({type(e).__name__}: {e})") from None
        frame = file.schema_arrow.empty_table().to_pandas() if batch is None else batch.to_pandas()
        frame.index = pd.RangeIndex(1, len(frame) + 1)
        return frame

    def chunks(self, columns, order=None):
        paths = self.paths if order is None else [self.paths[i] for i in order]
        for path in paths:
            file = self._open(path)
            start = 1
            batches = file.iter_batches(batch_size=self.chunk_rows, columns=list(columns))
            while True:
                try:
                    batch = next(batches, None)
                except Exception as e:  # noqa: BLE001 - a corrupt page, a type pyarrow cannot read
                    raise ValueError(
                        f"{path}: could not read the Parquet file after row {start - 1} "
                        f"({type(e).__name__}: {e})"
                    ) from None
                if batch is None:
                    break
                frame = batch.to_pandas()[list(columns)]
                frame.index = pd.RangeIndex(start, start + len(frame))
                start += len(frame)
                yield path, frame


def read_csv(paths, chunk_rows=CHUNK_ROWS, check_fields=True, **read_csv_kwargs) -> CSVSource:
    """CSV files to fit from without loading them: a `CSVSource` (see there)."""
    return CSVSource(paths, chunk_rows=chunk_rows, check_fields=check_fields, **read_csv_kwargs)


def read_parquet(paths, chunk_rows=CHUNK_ROWS) -> ParquetSource:
    """Parquet files to fit from without loading them: a `ParquetSource` (see there)."""
    return ParquetSource(paths, chunk_rows=chunk_rows)


def is_source(data) -> bool:
    return isinstance(data, Source)


# --------------------------------------------------------------------------
# Files that change under a fit
# --------------------------------------------------------------------------


class FilesChangedError(RuntimeError):
    """A file changed, was truncated or vanished after the scan that a model was built from.

    Attributes:
        path: the file.
        changes: what changed, ``{"size" | "mtime" | "rows": (expected, found)}``;
            ``{"exists": (True, False)}`` for a file that vanished.
    """

    def __init__(self, path, changes, when="since the scan"):
        self.path = path
        self.changes = dict(changes)
        if "exists" in self.changes:
            what = f"vanished {when}"
        else:
            units = {"size": " bytes", "mtime": " ns", "rows": ""}
            what = f"changed {when} (" + "; ".join(
                f"{k}: expected {e}{units[k]}, found {f}{units[k]}" for k, (e, f) in self.changes.items()
            ) + ")"
        super().__init__(
            f"{path}: the file {what}. A model is built from a scan of its files (levels, counts, "
            "coding) and fitted on the same rows: build it again from the files as they are now "
            "(kg.glmm(formula, source) or GLMM.from_formula)."
        )


@dataclass(frozen=True)
class FileStamp:
    """What the scan saw of one file: size (bytes), modification time (ns) and rows read."""

    size: int
    mtime_ns: int
    rows: int


def _stat(path):
    """``(size, mtime_ns)`` of a file, or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _changes(stamp: FileStamp, stat, rows=None) -> dict:
    """What differs between a stamp and a file's `_stat` (and rows read, when given)."""
    if stat is None:
        return {"exists": (True, False)}
    out = {}
    if stat[0] != stamp.size:
        out["size"] = (stamp.size, stat[0])
    if stat[1] != stamp.mtime_ns:
        out["mtime"] = (stamp.mtime_ns, stat[1])
    if rows is not None and rows != stamp.rows:
        out["rows"] = (stamp.rows, rows)
    return out


class FilesCheck(keras.callbacks.Callback):
    """Stops a fit from files when one of them changed since the scan (`FilesChangedError`).

    At the start of every epoch each file's size and modification time are compared
    with the scan's (a `stat` per file), and an error that the `tf.data` pipeline met
    while reading ahead (prefetching the next batches) is raised here as itself.
    """

    def __init__(self, scan_result):
        super().__init__()
        self.scan_result = scan_result

    def on_epoch_begin(self, epoch, logs=None):
        self.scan_result.check_files()

    def on_train_end(self, logs=None):
        self.scan_result.check_files()


@contextlib.contextmanager
def raising_read_errors(scan_result):
    """Re-raises an error of the files' reader that reached Keras as a TensorFlow error.

    A Python exception inside `tf.data.Dataset.from_generator` comes out of the
    iterator as an `InvalidArgumentError` (a ValueError), an `UnknownError` (an
    OSError) ...: the generator records it on the scan (`_failures`), and this
    context raises the recorded exception in place of the TensorFlow one.
    """
    try:
        yield
    except tf.errors.OpError as err:
        failure = scan_result._take_failure()
        if failure is None:
            raise
        raise failure from None


# --------------------------------------------------------------------------
# Error messages that name the file and line
# --------------------------------------------------------------------------


def _lines(index: pd.Index, mask) -> str:
    rows = index[np.flatnonzero(mask)]
    shown = ", ".join(str(r) for r in rows[:_MAX_LISTED])
    more = f", ... ({len(rows)} in all)" if len(rows) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


@contextlib.contextmanager
def _located(path: str, unit: str, index: pd.Index | None = None):
    """Prefixes a ValueError with the file; its row labels (line numbers) become lines.

    `Design` names rows by their index label, which in a chunk is the line (or
    row) number: "rows [12, 40]" becomes "lines [12, 40]". Messages naming rows by
    position (the families' checks) are mapped through ``index``.
    """
    try:
        yield
    except ValueError as e:
        message = str(e)
        if message.startswith(path):
            raise
        if index is not None:
            message = re.sub(
                r"\brow (\d+)", lambda m: f"{unit} {index[int(m.group(1))]}", message
            )
        elif unit != "row":
            message = re.sub(r"\brow(s?) (?=[\[\d])", lambda m: f"{unit}{m.group(1)} ", message)
        raise ValueError(f"{path}: {message}") from e


# --------------------------------------------------------------------------
# Reading chunks: types, missing values, the response
# --------------------------------------------------------------------------


def _is_numeric(series: pd.Series) -> bool:
    return not _is_categorical(series)


class _Reader:
    """A source's chunks of the formula's columns, typed alike and checked.

    Each column's kind is fixed by the first chunk (see the module docstring):
    ``"numeric"``, ``"category"`` (a pandas categorical: its categories, in
    order, are the union over the chunks), ``"string"`` (values as strings), or
    ``"group"`` (a grouping column: any type, the design makes level strings).
    `freeze` ends the learning: later chunks are cast to the learned types.
    """

    def __init__(self, source, spec, family, columns, weights, na_action):
        self.source = source
        self.spec = spec
        self.family = family
        self.weights = weights
        self.na_action = na_action
        self.columns = list(columns["used"])
        if weights and weights not in self.columns:
            self.columns.append(weights)
        plain_binary = family == "binomial" and spec.cbind() is None and not weights
        self.numeric = set(columns["offset"]) | ({weights} if weights else set())
        if not plain_binary:
            self.numeric |= set(columns["response"])
        self.group = set(columns["group"]) - self.numeric - set(columns["fixed"]) - set(columns["random"])
        self.kinds: dict[str, str] = {}
        self.dtypes: dict[str, set] = {}
        self.categories: dict[str, list] = {}
        self.final_dtypes: dict[str, Any] = {}
        self.frozen = False
        self.omitted = 0
        # What the first pass saw of each file; the later passes must see the same.
        self.stamps: dict[str, FileStamp] = {}

    # ------------------------------------------------------------- types
    def _kind(self, column, series):
        if column in self.numeric:
            return "numeric"
        if isinstance(series.dtype, pd.CategoricalDtype):
            return "category"
        if column in self.group:
            return "group"
        return "string" if _is_categorical(series) else "numeric"

    def _typed(self, frame, path):
        out = {}
        for c in self.columns:
            s = frame[c]
            kind = self.kinds.get(c)
            if kind is None:
                kind = self.kinds[c] = self._kind(c, s)
                self.dtypes[c] = set()
                self.categories[c] = []
            if kind == "numeric":
                if not _is_numeric(s):
                    s = self._to_numeric(c, s, path)
                if self.frozen:
                    if s.dtype != self.final_dtypes[c]:
                        s = s.astype(self.final_dtypes[c])
                else:
                    self.dtypes[c].add(s.dtype)
            elif kind == "category":
                s = self._to_category(c, s, path)
            elif kind == "string":
                if not isinstance(s.dtype, pd.CategoricalDtype) and _is_numeric(s):
                    s = pd.Series(_column_strings(s), index=s.index, dtype=object)
                elif isinstance(s.dtype, pd.CategoricalDtype):
                    s = s.astype(object)
            out[c] = s
        return pd.DataFrame(out, index=frame.index)

    def _to_numeric(self, column, series, path):
        values = pd.to_numeric(series, errors="coerce")
        bad = (values.isna() & series.notna()).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            hint = (
                "it must be numeric"
                if column in self.numeric
                else "its first values read were numbers; if it is categorical, read it as "
                f"strings (read_csv(..., dtype={{'{column}': str}}))"
            )
            raise ValueError(
                f"{path}, {self.source.unit} {series.index[i]}: column '{column}' holds "
                f"{series.iloc[i]!r}, which is not a number ({hint})"
                + (f"; {int(bad.sum())} such values in this chunk" if bad.sum() > 1 else "")
            )
        return values

    def _to_category(self, column, series, path):
        cats = self.categories[column]
        if isinstance(series.dtype, pd.CategoricalDtype):
            new = list(series.cat.categories)
        else:
            new = list(pd.unique(series.dropna()))
        if not self.frozen:
            known = set(cats)
            cats.extend(v for v in new if v not in known)
        out = pd.Series(pd.Categorical(series, categories=cats), index=series.index)
        lost = (out.isna() & series.notna()).to_numpy()
        if lost.any():
            i = int(np.flatnonzero(lost)[0])
            raise ValueError(
                f"{path}, {self.source.unit} {series.index[i]}: column '{column}' has the category "
                f"{series.iloc[i]!r}, which the scan of the files did not see (did the files change?)"
            )
        return out

    def freeze(self):
        """Ends learning: each numeric column gets one dtype (float64 if the chunks differ)."""
        for c, seen in self.dtypes.items():
            if self.kinds[c] == "numeric":
                self.final_dtypes[c] = next(iter(seen)) if len(seen) == 1 else np.dtype("float64")
        self.frozen = True

    def cast(self, frame):
        """Casts a frame assembled from chunks (the sample) to the learned types."""
        frame = frame.copy()
        for c in self.columns:
            kind = self.kinds.get(c)
            if kind == "numeric" and frame[c].dtype != self.final_dtypes[c]:
                frame[c] = frame[c].astype(self.final_dtypes[c])
            elif kind == "category":
                frame[c] = pd.Categorical(frame[c], categories=self.categories[c])
            elif kind == "string":
                frame[c] = frame[c].astype(object)
        return frame

    # ------------------------------------------------------------- checks
    def _complete(self, frame, path):
        missing = frame.isna().to_numpy()
        rows = missing.any(axis=1)
        if not rows.any():
            return frame
        if self.na_action == "raise":
            cols = [c for c, m in zip(frame.columns, missing.any(axis=0), strict=True) if m]
            raise ValueError(
                f"{path}: missing values in column(s) {cols} at {self.source.unit}s "
                f"{_lines(frame.index, rows)}; remove those rows from the file, or use "
                "na_action='omit' to skip them"
            )
        self.omitted += int(rows.sum())
        return frame.loc[~rows]

    def _check_response(self, frame, path, family):
        """The response (and offsets) of every row, against the family's support."""
        spec = self.spec
        unit = self.source.unit
        stub = Design(
            spec=spec, fixed_spec=None, fixed_columns=[], fixed_formulaic_columns=[], random=[],
            response_kind=None, family_name=self.family, na_action=self.na_action,
        )
        if spec.offsets:
            with _located(path, unit):
                stub.offset(frame)
        if spec.response is None or not len(frame):
            return
        if self.family != "binomial":
            stub.response_kind = "continuous"
        elif spec.cbind() is not None:
            stub.response_kind = "cbind"
        elif self.weights:
            stub.response_kind = "proportion"
        else:
            stub.response_kind = "binary"
            with _located(path, unit):
                raw = _eval_expr(spec.response, frame, f"the response {spec.response}")
            if isinstance(raw, pd.Series) and _is_categorical(raw):
                return  # a two-level factor: its levels are checked by the design
        with _located(path, unit):
            y = stub.response(frame, self.weights)
        response, trials = response_lib.split(y)
        with _located(path, unit, index=frame.index):
            family.check_response(response, trials, name=f"response '{spec.response}'")

    def chunks(self, family=None, order=None):
        """Yields ``(path, frame)``: typed, complete (or raising), the response
        checked against ``family`` (when given: the passes after the scan leave it
        to `_chunk_arrays`).

        The first pass stamps each file (`FileStamp`: its size and modification
        time before and after reading must agree, and its rows); every later pass
        checks the stamp before reading a file and its row count after, and an
        error met while reading a file that changed is a `FilesChangedError`
        (the row that broke is a symptom of the change).
        """
        paths = self.source.paths
        for i in range(len(paths)) if order is None else order:
            path = paths[i]
            stamp = self.stamps.get(path)
            before = _stat(path)
            if stamp is not None:
                self._check_file(path, stamp, before)
            rows = 0
            try:
                for _, frame in self.source.chunks(self.columns, order=[i]):
                    rows += len(frame)
                    frame = self._typed(frame, path)
                    frame = self._complete(frame, path)
                    if family is not None:
                        self._check_response(frame, path, family)
                    yield path, frame
            except (ValueError, OSError) as err:
                if stamp is not None and _changes(stamp, _stat(path)):
                    raise FilesChangedError(path, _changes(stamp, _stat(path)), "while it was read") from err
                raise
            after = _stat(path)
            if stamp is None:
                if before is None or after != before:
                    raise FilesChangedError(
                        path, _changes(FileStamp(*before, rows), after) if before else {"exists": (True, False)},
                        "while it was scanned")
                self.stamps[path] = FileStamp(*after, rows)
            else:
                self._check_file(path, stamp, after, rows)

    def _check_file(self, path, stamp, stat, rows=None):
        changes = _changes(stamp, stat, rows)
        if changes:
            raise FilesChangedError(path, changes)

    def check_files(self):
        """Raises a `FilesChangedError` for the first stamped file whose size or
        modification time is not the scan's (or that is gone)."""
        for path, stamp in self.stamps.items():
            self._check_file(path, stamp, _stat(path))


# --------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------


@dataclass
class Scan:
    """What one pass over a source learned (see `scan`).

    Attributes:
        source: the files.
        design: the frozen `Design` (levels and their order as `Design.from_data`
            on all the rows).
        num_rows: rows used (complete rows under ``na_action="omit"``).
        num_omitted: rows skipped for missing values.
        level_counts: per random-effect term (``design.random`` order), the
            number of rows of each level.
        sample: the uniform random sample of rows (at most ``sample_rows``), in
            file order.
        weights: the weights column, if any.
    """

    source: Source
    design: Design
    num_rows: int
    num_omitted: int
    level_counts: list[np.ndarray]
    sample: pd.DataFrame
    weights: str | None = None
    _reader: _Reader | None = field(default=None, repr=False)
    # Errors the tf.data generator met (see `raising_read_errors`).
    _failures: list = field(default_factory=list, repr=False)

    @property
    def stamps(self) -> dict[str, FileStamp]:
        """Per file, what the scan saw: size, modification time (ns), rows."""
        return dict(self._reader.stamps) if self._reader is not None else {}

    def check_files(self):
        """Raises a `FilesChangedError` if a file changed since the scan, or the error
        that a pass reading the files in the `tf.data` pipeline met."""
        failure = self._take_failure()
        if failure is not None:
            raise failure
        if self._reader is not None:
            self._reader.check_files()

    def _take_failure(self):
        return self._failures.pop(0) if self._failures else None


def _count_levels(frame, cols, counter):
    """Adds each combination of the grouping columns' level keys (a tuple of part
    keys, `keras_glmm.levels`, as the design makes them) to ``counter``."""
    codes, parts = frame_codes(frame, cols)
    counts = np.bincount(codes[codes >= 0], minlength=len(parts)).tolist()
    for key, count in zip(parts, counts, strict=True):
        if count:
            counter[key] = counter.get(key, 0) + count


def _track(values: dict, series: pd.Series):
    """Adds the distinct values of ``series`` to ``values``; None once past MAX_CATEGORIES."""
    if values is None:
        return None
    distinct = pd.unique(series.dropna())
    if len(distinct) > MAX_CATEGORIES:  # a continuous column: not worth counting
        return None
    for v in distinct:
        values.setdefault(v.item() if isinstance(v, np.generic) else v, None)
    return values if len(values) <= MAX_CATEGORIES else None


def _factor_column(factor: str, columns) -> str | None:
    """The data column behind a formulaic categorical factor (``f``, ``C(f)``), if plain."""
    if factor in columns:
        return factor
    m = _C_RE.match(factor)
    var = _unquote(m.group("var")) if m else None
    return var if var in columns else None


def _missing_categories(design, tracked, columns):
    """Per column, the values the files hold that the design's coding (of the fixed
    effects or of a random-effect term) lacks."""
    out = {}
    specs = [("the fixed effects", design.fixed_spec)]
    specs += [(f"random-effect term {r.term}", r.model_spec) for r in design.random]
    for where, model_spec in specs:
        for factor in _categorical_factors(model_spec):
            var = _factor_column(factor, columns)
            if var is None or var not in tracked:
                continue
            values = tracked[var]
            if values is None:
                raise ValueError(
                    f"'{factor}' is categorical in {where}, but column '{var}' has more "
                    f"than {MAX_CATEGORIES:,} distinct values in the files: use it as a grouping "
                    f"factor, (1 | {var}), instead"
                )
            state = model_spec.encoder_state[factor][1]
            categories = list(state.get("categories", []))
            known = set(categories) | {_level_str(c) for c in categories}
            lacking = [v for v in values if v not in known and _level_str(v) not in known]
            lacking = [v for v in lacking if v not in out.get(var, [])]
            if lacking:
                out[var] = out.get(var, []) + lacking
    response = design.spec.response
    if design.response_levels is not None and response in tracked and tracked[response] is not None:
        lacking = [v for v in tracked[response] if _level_str(v) not in design.response_levels]
        if lacking:
            out[response] = lacking
    return out


def _extra_rows(sample, lacking, reader):
    """Copies of the sample's first row, one per lacking value of a column."""
    rows = []
    for column, values in lacking.items():
        for v in values:
            row = sample.iloc[[0]].copy()
            if reader.kinds.get(column) == "category":
                row[column] = pd.Categorical([v], categories=reader.categories[column])
            else:
                row[column] = v
            rows.append(row)
    return rows


def _reservoir(state, frame, k, rng):
    """Keeps the ``k`` rows with the smallest uniform keys: a uniform sample without replacement."""
    keys = rng.random(len(frame))
    order = state["rows"] + np.arange(len(frame))
    state["rows"] += len(frame)
    if state["sample"] is not None and len(state["keys"]) >= k:
        chosen = keys < state["keys"].max()
        if not chosen.any():
            return
        frame, keys, order = frame.loc[chosen], keys[chosen], order[chosen]
    if state["sample"] is None:
        sample, all_keys, all_order = frame.reset_index(drop=True), keys, order
    else:
        sample = pd.concat([state["sample"], frame.reset_index(drop=True)], ignore_index=True)
        all_keys = np.concatenate([state["keys"], keys])
        all_order = np.concatenate([state["order"], order])
    if len(all_keys) > k:
        keep = np.sort(np.argpartition(all_keys, k - 1)[:k])
        sample = sample.iloc[keep].reset_index(drop=True)
        all_keys, all_order = all_keys[keep], all_order[keep]
    state["sample"], state["keys"], state["order"] = sample, all_keys, all_order


def scan(
    source,
    formula,
    family="gaussian",
    weights=None,
    na_action="raise",
    sample_rows=SAMPLE_ROWS,
    seed=0,
    checks=None,
) -> Scan:
    """One pass over files: the design of a formula, level counts and a sample of rows.

    Every chunk is checked on the way (see the module docstring): the scan fails on
    the first bad row with its file and line, before any training.

    Args:
        source: a `Source` (`read_csv`, `read_parquet`).
        formula: an lme4 formula or a parsed `FormulaSpec`.
        family: a family name or `keras_glmm.families.Family` (it decides how the
            response is read and checked).
        weights: binomial trials for a proportion response: a column name.
        na_action: ``"raise"`` (a missing value is an error naming the file and
            lines) or ``"omit"`` (those rows are skipped, with a warning).
        sample_rows: size of the uniform sample of rows kept (the reservoir) for
            the fixed-effects coding and the GLM starting point.
        seed: seed of the sample.
        checks: lme4's guard rails (`keras_glmm.checks.resolve_checks`) for the
            design's checks, run on the sample (rank, collinearity, one level).

    Returns:
        A `Scan`.
    """
    if not is_source(source):
        raise TypeError(f"`source` must be a CSVSource or ParquetSource, got {type(source).__name__}")
    if not isinstance(sample_rows, (int, np.integer)) or sample_rows < 1:
        raise ValueError(f"`sample_rows` must be a positive integer. Received: sample_rows={sample_rows!r}")
    if na_action not in ("raise", "omit"):
        raise ValueError(f"na_action must be 'raise' or 'omit', got {na_action!r}")
    if weights is not None and not isinstance(weights, str):
        raise TypeError(
            "with files, `weights` must be the name of a column (binomial trials or prior weights)")
    family_obj = get_family(family) if isinstance(family, str) else family
    spec = parse_formula(formula) if isinstance(formula, str) else formula
    if not isinstance(spec, FormulaSpec):
        raise TypeError(f"expected a formula string or FormulaSpec, got {type(spec).__name__}")

    # Which columns the formula uses, from the first rows of the first file.
    first = source.paths[0]
    head = source.head(HEAD_ROWS)
    with _located(first, source.unit):
        columns = Design._formula_columns(spec, head)
        if weights is not None and weights not in head.columns:
            raise ValueError(f"unknown weights column '{weights}'; the file has {list(head.columns)}")
    reader = _Reader(source, spec, family_obj.name, columns, weights, na_action)
    source.check_columns(reader.columns)

    # Grouping factors: terms on the same columns share one counter.
    group_keys = list(dict.fromkeys(t.group_columns() for t in spec.random))
    counters: dict[tuple, dict] = {cols: {} for cols in group_keys}
    tracked: dict[str, dict | None] = {c: {} for c in [*columns["fixed"], *columns["random"]]}
    if family_obj.name == "binomial" and spec.cbind() is None and spec.response in reader.columns:
        tracked.setdefault(spec.response, {})
    rng = np.random.default_rng(seed)
    state = {"sample": None, "keys": None, "order": None, "rows": 0}
    for _path, frame in reader.chunks(family_obj):
        if not len(frame):
            continue
        for cols, counter in counters.items():
            _count_levels(frame, cols, counter)
        for c, values in tracked.items():
            tracked[c] = _track(values, frame[c])
        _reservoir(state, frame, int(sample_rows), rng)
    reader.freeze()
    num_rows = state["rows"]
    if num_rows == 0:
        why = " (every row has a missing value)" if reader.omitted else ""
        raise ValueError(f"{source}: no rows to fit{why}")
    if reader.omitted:
        warnings.warn(
            f"na_action='omit': skipped {reader.omitted} of {num_rows + reader.omitted} rows with "
            "missing values.",
            RuntimeWarning,
            stacklevel=2,
        )
    sample = state["sample"].iloc[np.argsort(state["order"], kind="stable")].reset_index(drop=True)
    sample = reader.cast(sample)

    # Level vocabularies: `_group_levels` on one row per distinct combination.
    vocab, counts_by_key = {}, {}
    for cols, counter in counters.items():
        keys = list(counter)
        data = {}
        for j, c in enumerate(cols):
            values = [k[j] for k in keys]
            if reader.kinds.get(c) == "category":
                cats = list(dict.fromkeys(_level_str(v) for v in reader.categories[c]))
                data[c] = pd.Categorical(values, categories=cats)
            else:
                data[c] = pd.Series(values, dtype=object)
        vocab[cols] = pd.DataFrame(data)
        counts_by_key[cols] = {combine_keys(k): n for k, n in counter.items()}
    levels = [_group_levels(t, vocab[t.group_columns()]) for t in spec.random]
    level_counts = [
        np.array([counts_by_key[t.group_columns()][lvl] for lvl in lv], dtype="float64")
        for t, lv in zip(spec.random, levels, strict=True)
    ]

    # The design from the sample, plus one row per value of a categorical column
    # that the sample missed: string and pandas categorical columns first, numeric
    # ones once the coding shows them categorical (C(period)).
    lacking = {}
    for c, values in tracked.items():
        if values is not None and reader.kinds.get(c) in ("string", "category"):
            seen = {_level_str(v) for v in pd.unique(sample[c].dropna())}
            missing = [v for v in values if _level_str(v) not in seen]
            if missing:
                lacking[c] = missing
    extra = []
    for _ in range(2):
        extra += _extra_rows(sample, lacking, reader)
        frame = pd.concat([sample, *extra], ignore_index=True) if extra else sample
        design = Design.from_data(
            spec, frame, family_obj.name, weights=weights, na_action=na_action, group_levels=levels,
            checks=checks,
        )
        lacking = _missing_categories(design, tracked, list(sample.columns))
        if not lacking:
            break
    return Scan(
        source=source,
        design=design,
        num_rows=num_rows,
        num_omitted=reader.omitted,
        level_counts=level_counts,
        sample=sample,
        weights=weights,
        _reader=reader,
    )


# --------------------------------------------------------------------------
# Batches from files: arrays of a fixed design (the model is not needed)
# --------------------------------------------------------------------------


def recount(source, design, family, weights=None) -> Scan:
    """A scan of new files for a fixed design (a fitted model's): rows and level counts.

    Args:
        source: the files.
        design: the frozen `Design`.
        family: a `keras_glmm.families.Family` (the response is checked).
        weights: the weights column name, if any.
    """
    head = source.head(HEAD_ROWS)
    with _located(source.paths[0], source.unit):
        columns = Design._formula_columns(design.spec, head)
    weights = weights if isinstance(weights, str) else None
    reader = _Reader(source, design.spec, family.name, columns, weights, design.na_action)
    source.check_columns(reader.columns)
    counts = [np.zeros(r.n_levels) for r in design.random]
    rows = 0
    for path, frame in reader.chunks():
        x, _ = _chunk_arrays(design, family, np.float64, reader, path, frame)
        for r, c in zip(design.random, counts, strict=True):
            c += np.bincount(x[r.name], minlength=r.n_levels)
        rows += len(frame)
    reader.freeze()
    if rows == 0:
        raise ValueError(f"{source}: no rows to fit")
    return Scan(source, design, rows, reader.omitted, counts, pd.DataFrame(), weights, reader)


def _chunk_arrays(design, family, dtype, reader, path, frame):
    """One checked chunk -> model inputs (`dtype`; level indices int64) and response."""
    unit = reader.source.unit
    if design.spec.response is None:
        raise ValueError("the formula has no response (left-hand side): there is nothing to fit")
    with _located(path, unit):
        x, y = design.arrays(frame, weights=reader.weights)
    for r in design.random:
        new = x[r.name] < 0
        if new.any():
            i = int(np.flatnonzero(new)[0])
            cols = r.group_columns
            value = level_name([_level_str(frame[c].iloc[i]) for c in cols])
            raise ValueError(
                f"{path}, {unit} {frame.index[i]}: level '{value}' of grouping factor "
                f"'{_unquote(r.term.group)}' is not among the model's levels (the data it was "
                "built from): build the model from these files"
            )
    response, trials = response_lib.split(y)
    with _located(path, unit, index=frame.index):
        family.check_response(response, trials, name=f"response '{design.spec.response}'")
    dtype = np.dtype(dtype)
    x = {k: (v if v.dtype == np.int64 else v.astype(dtype)) for k, v in x.items()}
    return x, y.astype(dtype)


def _rows(block) -> int:
    return len(next(iter(block.values())))


def _concat(blocks):
    if len(blocks) == 1:
        return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _take(block, index):
    return {k: v[index] for k, v in block.items()}


def block_shuffle(blocks, buffer_rows, batch_size, rng=None) -> Iterator[dict]:
    """Batches of rows from a stream of blocks, shuffled within a bounded buffer.

    Blocks (dicts of arrays with one row per entry of their first dimension) are
    gathered until the buffer holds at least ``buffer_rows`` rows; then its rows
    are permuted, batches are emitted from the permuted rows until about half the
    buffer is left, and the rest stays to be mixed with the next blocks (so a row
    can travel further than one buffer's worth). At the end of the stream the
    remaining rows are permuted and emitted. Every row is emitted exactly once;
    every batch has ``batch_size`` rows except the last one. The buffer never holds
    more than ``buffer_rows`` plus one block's rows (plus the permuted copy of them
    while batches are taken).

    Args:
        blocks: an iterable of dicts of NumPy arrays.
        buffer_rows: rows gathered before permuting (at least ``batch_size``).
        batch_size: rows per batch.
        rng: a `numpy.random.Generator` (a fresh default one if None).

    Yields:
        Dicts of arrays with the blocks' keys.
    """
    if batch_size < 1 or buffer_rows < batch_size:
        raise ValueError(
            f"the shuffle buffer must hold at least one batch: buffer_rows={buffer_rows}, "
            f"batch_size={batch_size}"
        )
    rng = np.random.default_rng() if rng is None else rng
    buffered, rows = [], 0
    for block in blocks:
        n = _rows(block)
        if not n:
            continue
        buffered.append(block)
        rows += n
        if rows < buffer_rows:
            continue
        data = _concat(buffered)
        order = rng.permutation(rows)
        emit = max(1, (rows - buffer_rows // 2) // batch_size) * batch_size
        buffered = []
        for start in range(0, emit, batch_size):
            yield _take(data, order[start:start + batch_size])
        rest = order[emit:]
        buffered, rows = ([_take(data, rest)] if len(rest) else []), len(rest)
        del data
    if rows:
        data = _concat(buffered)
        order = rng.permutation(rows)
        for start in range(0, rows, batch_size):
            yield _take(data, order[start:start + batch_size])


def _signature(design, dtype):
    """`tf.TensorSpec`s of the model's inputs and response, from the design."""
    dtype = tf.as_dtype(dtype)
    x = {"x": tf.TensorSpec((None, design.n_fixed), dtype)}
    if design.spec.offsets:
        x["offset"] = tf.TensorSpec((None,), dtype)
    for r in design.random:
        x[r.name] = tf.TensorSpec((None,), tf.int64)
        if r.n_covariates:
            x[r.name + "_z"] = tf.TensorSpec((None, r.n_covariates), dtype)
    if design.weights_kind == "prior":
        x["weights"] = tf.TensorSpec((None,), dtype)
    two = design.response_kind in ("cbind", "proportion")
    y = tf.TensorSpec((None, 2) if two else (None,), dtype)
    return x, y


def _blocks(scan_result, family, dtype, order=None):
    reader = scan_result._reader
    reader.check_files()
    for path, frame in reader.chunks(order=order):
        if len(frame):
            try:
                x, y = _chunk_arrays(scan_result.design, family, dtype, reader, path, frame)
            except ValueError as err:
                # A level or value the scan never saw: a symptom, if the file changed.
                try:
                    reader.check_files()
                except FilesChangedError as changed:
                    raise changed from err
                raise
            yield {**x, _Y: y}


def batches(scan_result, family, dtype, batch_size=BATCH_SIZE) -> Iterator[tuple[dict, np.ndarray]]:
    """One pass over the files in order: `(inputs, y)` batches of at most `batch_size` rows."""
    for block in _blocks(scan_result, family, dtype):
        for start in range(0, _rows(block), batch_size):
            batch = {k: v[start:start + batch_size] for k, v in block.items()}
            y = batch.pop(_Y)
            yield batch, y


def signature(scan_result, dtype):
    """`(inputs, y)` `tf.TensorSpec`s of the batches of `batches` and `dataset`."""
    return _signature(scan_result.design, dtype)


def dataset(scan_result, family, dtype, batch_size=BATCH_SIZE, shuffle_buffer=SHUFFLE_BUFFER, seed=None):
    """The endless `tf.data` pipeline of shuffled training batches from files.

    Each pass reads the files (in a new random order), turns chunks into model
    arrays and shuffles them through `block_shuffle`, in a Python generator. Data
    that fit in the shuffle buffer are read once and kept: then the batches come
    from memory as in-memory fits' do (the whole data as one batch when it fits in
    one, else `keras_glmm.batches.minibatches`), with no Python in the loop.

    Every pass checks the files against the scan's stamps (see the module
    docstring); an error of a pass in the generator is recorded on the scan, for
    `raising_read_errors` and `FilesCheck` to raise as itself.

    Returns:
        ``(dataset, steps_per_pass)``: the repeated dataset of ``(inputs, y)``
        batches and the number of batches in one pass over the data.
    """
    if shuffle_buffer < batch_size:
        raise ValueError(
            f"`shuffle_buffer` ({shuffle_buffer}) must hold at least one batch (batch_size={batch_size})"
        )
    steps = -(-scan_result.num_rows // batch_size)
    scan_result._failures.clear()
    if scan_result.num_rows <= shuffle_buffer:
        x = _concat(list(_blocks(scan_result, family, dtype)))
        y = x.pop(_Y)
        if scan_result.num_rows <= batch_size:
            return tf.data.Dataset.from_tensors((x, y)).repeat(), steps
        return minibatches((x, y), batch_size, seed=seed), steps
    rng = np.random.default_rng(seed)

    def one_pass():
        order = rng.permutation(len(scan_result.source.paths))
        blocks = _blocks(scan_result, family, dtype, order)
        try:
            for batch in block_shuffle(blocks, shuffle_buffer, batch_size, rng):
                y = batch.pop(_Y)
                yield batch, y
        except Exception as err:
            # tf.data turns it into a TensorFlow error: keep it for `raising_read_errors`
            # and `FilesCheck`, which raise it as itself.
            scan_result._failures.append(err)
            raise

    data = tf.data.Dataset.from_generator(one_pass, output_signature=_signature(scan_result.design, dtype))
    return data.repeat().prefetch(2), steps


def fitted_from_files_error(source) -> ValueError:
    """The error of results that need every training row of a model fitted from files."""
    return ValueError(
        f"This model was fitted from files ({source}) and keeps no training rows in memory: "
        "vcov(), coef_table(), fitted(), residuals(), simulate() and predictions without "
        "`newdata` need them. Pass newdata for predictions (model.predict_response(frame)); "
        "for standard errors, fit the same formula on a data frame (all the rows if they fit "
        "in memory, else a sample). fixef(), ranef(), varcorr(), coef() and "
        "predict_response(newdata) work as usual."
    )
