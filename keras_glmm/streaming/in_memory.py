"""Files that fit in memory, fitted as a data frame: one read, the engine's fit, standard errors.

Streaming exists for data larger than memory; files that are not (a 40,000-row CSV)
fit faster and better as the data frame they hold: the engine's quasi-Newton fit
instead of epochs of stochastic VI, and the results that need every row
(`vcov`, `coef_table`, `fitted`, ...). `in_memory_frame` decides and, within the
budget, returns that frame; `GLMM.fit(source)` then fits it as it would
`pd.concat` of the files.

The rule: the rows in memory take about

    bytes = num_rows * 8 * (columns read + model-array columns)

(8 bytes a value, `in_memory_bytes`: the frame of the formula's columns and the
arrays `Design.arrays` codes from it, both held while the model fits), and the
files are fitted in memory when that is at most the model's `memory_budget` (the
bytes the engine's posterior may take, 2 GiB by default: the same bound, counted
separately for the rows and for the posterior). A smaller `memory_budget` streams.
Under a multi-worker strategy the files are always streamed, each worker reading
its own share (`keras_glmm.streaming.pipeline.multi_worker_shares`).

The rows are read at most once more than the scan: when the scan's uniform sample
holds every row (files of at most `sample_rows` rows, 100,000 by default), the
sample, in file order and typed as the scan learned, is the frame (no second read);
larger files are read once more, chunk by chunk, with the streamed pass's checks.
Either way every row was checked with its file and line named (the scan's checks,
and for files new to the model `chunk_arrays`'s: a level the model does not know),
and the files are checked against the scan's stamps first (`FilesChangedError`).
The frame's index is the rows' position in reading order (file by file), so that
`fitted()` and `residuals()` are those of `pd.concat(files, ignore_index=True)`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from keras_glmm.streaming.pipeline import multi_worker_shares
from keras_glmm.streaming.reader import chunk_arrays

__all__ = ["in_memory_bytes", "in_memory_frame"]

_VALUE_BYTES = 8


def in_memory_bytes(scan_result) -> int:
    """Estimated bytes of the files' rows in memory: the frame and its model arrays."""
    design = scan_result.design
    array_columns = design.n_fixed + sum(1 + r.n_covariates for r in design.random)
    array_columns += 2 if design.response_kind in ("cbind", "proportion") else 1
    array_columns += bool(design.spec.offsets) + (design.weights_kind == "prior")
    frame_columns = len(scan_result._reader.columns)
    return int(scan_result.num_rows) * _VALUE_BYTES * (frame_columns + array_columns)


def in_memory_frame(scan_result, family, memory_budget) -> pd.DataFrame | None:
    """The files' rows as the data frame the formula model takes, or None to stream.

    Args:
        scan_result: the model's `Scan` of the files.
        family: the model's family (the checks of rows new to the model).
        memory_budget: bytes the rows may take (`in_memory_bytes`); the model's
            `memory_budget`.

    Returns:
        The frame of every row (see the module docstring), or None when the rows
        exceed the budget or a multi-worker strategy is in scope.

    Raises:
        FilesChangedError: a file changed since the scan.
        ValueError: a row the model cannot take, naming its file and line.
    """
    if multi_worker_shares() is not None or in_memory_bytes(scan_result) > memory_budget:
        return None
    scan_result.check_files()
    if len(scan_result.sample) == scan_result.num_rows:
        return scan_result.sample
    reader = scan_result._reader
    frames = []
    for path, frame in reader.chunks():
        if len(frame):
            # The checks of a streamed pass (a level the model lacks, the response's support).
            chunk_arrays(scan_result.design, family, np.float64, reader, path, frame)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)
