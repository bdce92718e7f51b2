"""Checked chunks of files: typed alike, complete, the response in the family's support.

`ChunkReader` turns a source's chunks of the formula's columns into frames that
`Design` can code the same way from the first chunk to the last (see
`keras_glmm.streaming`'s docstring for the typing rules), checks every row on the
way and stamps each file (`FileStamp`) for the later passes. `chunk_arrays` codes
one checked chunk into model arrays. Every error names the file and the line
(`located`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import numpy as np
import pandas as pd

from keras_glmm import response as response_lib
from keras_glmm.design import (
    Design,
    _column_strings,
    _eval_expr,
    _is_categorical,
    _level_str,
    _unquote,
)
from keras_glmm.levels import level_name
from keras_glmm.streaming.file_stamps import FileStamp, FilesChangedError, file_stat, stamp_changes

__all__ = ["ChunkReader", "chunk_arrays", "located"]

_MAX_LISTED = 10


def _lines(index: pd.Index, mask) -> str:
    rows = index[np.flatnonzero(mask)]
    shown = ", ".join(str(r) for r in rows[:_MAX_LISTED])
    more = f", ... ({len(rows)} in all)" if len(rows) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


@contextlib.contextmanager
def located(path: str, unit: str, index: pd.Index | None = None):
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


class ChunkReader:
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
            with located(path, unit):
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
            with located(path, unit):
                raw = _eval_expr(spec.response, frame, f"the response {spec.response}")
            if isinstance(raw, pd.Series) and _is_categorical(raw):
                return  # a two-level factor: its levels are checked by the design
        with located(path, unit):
            y = stub.response(frame, self.weights)
        response, trials = response_lib.split(y)
        with located(path, unit, index=frame.index):
            family.check_response(response, trials, name=f"response '{spec.response}'")

    def chunks(self, family=None, order=None):
        """Yields ``(path, frame)``: typed, complete (or raising), the response
        checked against ``family`` (when given: the passes after the scan leave it
        to `chunk_arrays`).

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
            before = file_stat(path)
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
                if stamp is not None and stamp_changes(stamp, file_stat(path)):
                    raise FilesChangedError(path, stamp_changes(stamp, file_stat(path)), "while it was read") from err
                raise
            after = file_stat(path)
            if stamp is None:
                if before is None or after != before:
                    raise FilesChangedError(
                        path, stamp_changes(FileStamp(*before, rows), after) if before else {"exists": (True, False)},
                        "while it was scanned")
                self.stamps[path] = FileStamp(*after, rows)
            else:
                self._check_file(path, stamp, after, rows)

    def _check_file(self, path, stamp, stat, rows=None):
        changes = stamp_changes(stamp, stat, rows)
        if changes:
            raise FilesChangedError(path, changes)

    def check_files(self):
        """Raises a `FilesChangedError` for the first stamped file whose size or
        modification time is not the scan's (or that is gone)."""
        for path, stamp in self.stamps.items():
            self._check_file(path, stamp, file_stat(path))


def chunk_arrays(design, family, dtype, reader, path, frame):
    """One checked chunk -> model inputs (`dtype`; level indices int64) and response."""
    unit = reader.source.unit
    if design.spec.response is None:
        raise ValueError("the formula has no response (left-hand side): there is nothing to fit")
    with located(path, unit):
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
    with located(path, unit, index=frame.index):
        family.check_response(response, trials, name=f"response '{design.spec.response}'")
    dtype = np.dtype(dtype)
    x = {k: (v if v.dtype == np.int64 else v.astype(dtype)) for k, v in x.items()}
    return x, y.astype(dtype)
