"""File sources: CSV and Parquet files read in chunks of rows (`read_csv`, `read_parquet`).

A source only reads: it names its files, their columns and their first rows, and
yields chunks of the formula's columns indexed by line number (CSV) or 1-based row
number (Parquet), so that every later error can name the file and the line. Typing
and checking the chunks is `keras_glmm.streaming.reader`'s work.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator

import numpy as np
import pandas as pd

__all__ = ["CSVSource", "ParquetSource", "Source", "is_source", "read_csv", "read_parquet"]

CHUNK_ROWS = 65_536
# Rows of the first file read to learn which columns the formula uses.
HEAD_ROWS = 1_000


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
