"""The scan: one pass over files learns what `Design.from_data` learns from a data frame.

See `keras_glmm.streaming`'s docstring: the level vocabularies and their counts,
the distinct values of categorical fixed-effect columns and a uniform sample of
rows (the reservoir), which fixes the fixed-effects coding and the GLM start.
`recount` counts new files for a fixed design.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from keras_glmm.design import (
    _C_RE,
    Design,
    _categorical_factors,
    _group_levels,
    _level_str,
    _unquote,
)
from keras_glmm.families import get_family
from keras_glmm.formula import FormulaSpec, parse_formula
from keras_glmm.levels import combine_keys, frame_codes
from keras_glmm.streaming.file_stamps import FileStamp
from keras_glmm.streaming.reader import ChunkReader, chunk_arrays, located
from keras_glmm.streaming.sources import HEAD_ROWS, Source, is_source

__all__ = ["Scan", "recount", "scan"]

SAMPLE_ROWS = 100_000
# Distinct values kept per fixed-effect column: a categorical fixed effect with
# more levels than this is a grouping factor in disguise, and a numeric column
# with more is not categorical.
MAX_CATEGORIES = 10_000


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
    _reader: ChunkReader | None = field(default=None, repr=False)
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
    with located(first, source.unit):
        columns = Design._formula_columns(spec, head)
        if weights is not None and weights not in head.columns:
            raise ValueError(f"unknown weights column '{weights}'; the file has {list(head.columns)}")
    reader = ChunkReader(source, spec, family_obj.name, columns, weights, na_action)
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


def recount(source, design, family, weights=None) -> Scan:
    """A scan of new files for a fixed design (a fitted model's): rows and level counts.

    Args:
        source: the files.
        design: the frozen `Design`.
        family: a `keras_glmm.families.Family` (the response is checked).
        weights: the weights column name, if any.
    """
    head = source.head(HEAD_ROWS)
    with located(source.paths[0], source.unit):
        columns = Design._formula_columns(design.spec, head)
    weights = weights if isinstance(weights, str) else None
    reader = ChunkReader(source, design.spec, family.name, columns, weights, design.na_action)
    source.check_columns(reader.columns)
    counts = [np.zeros(r.n_levels) for r in design.random]
    rows = 0
    for path, frame in reader.chunks():
        x, _ = chunk_arrays(design, family, np.float64, reader, path, frame)
        for r, c in zip(design.random, counts, strict=True):
            c += np.bincount(x[r.name], minlength=r.n_levels)
        rows += len(frame)
    reader.freeze()
    if rows == 0:
        raise ValueError(f"{source}: no rows to fit")
    return Scan(source, design, rows, reader.omitted, counts, pd.DataFrame(), weights, reader)
