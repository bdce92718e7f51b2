"""What a scan saw of each file (`FileStamp`), and the error of a file that changed since.

Files must not change while a model is built and fitted from them: the scan records
each file's size, modification time (ns) and row count, and every later pass
compares them (`keras_glmm.streaming.reader.ChunkReader.chunks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["FileStamp", "FilesChangedError", "file_stat", "stamp_changes"]


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


def file_stat(path):
    """``(size, mtime_ns)`` of a file, or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def stamp_changes(stamp: FileStamp, stat, rows=None) -> dict:
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
