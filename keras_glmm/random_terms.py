"""Random-effect terms: a grouping factor's levels and the columns of its left-hand side.

A term ``(expr | group)`` becomes, as in MixedModels.jl, a level index per row,
the level names, the term's columns and (in the model) its covariance factor.

* Grouping factors are always categorical. A level is matched by its key,
  defined once in :mod:`keras_glmm.levels` (also used by the streamed scan and
  the SavedModel graph): ``308 -> "308"``, ``308.0 -> "308"``, ``1.5 -> "1.5"``,
  a categorical's category ``c -> key(c)``; so a column that was categorical at
  fit time and integer at prediction time still matches. Level order
  (:func:`keras_glmm.levels.column_levels`): a categorical column's category
  order (unused categories dropped, like lme4's ``factor()``), otherwise sorted
  unique values (numerically when every value is numeric-like). An interaction
  ``a:b`` has the observed combinations, ``a`` varying slowest (R's ``a:b``);
  their keys encode the parts without ambiguity (:attr:`RandomTermDesign.keys`),
  their names are lme4's ``"la:lb"`` (:attr:`RandomTermDesign.levels`).
* Levels never seen in training get index ``-1`` (``allow_new_levels``: the
  random effect of a new level is its prior mean, zero).
* The left-hand side is coded like the fixed part (:mod:`keras_glmm.coding`:
  formulaic, treatment contrasts, R's rank reduction), named as lme4 names it:
  ``(gender | school)`` has ``"(Intercept)"`` and ``"genderM"``;
  ``(0 + Machine | Worker)`` has a column per level. Unused categories are
  dropped first, so no column is all zeros; a level of the factor not seen in
  training is an error at prediction, naming the column and the level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from keras_glmm.coding import build_matrix, categorical_factors, drop_unused_categories, lme4_name, spec_matrix
from keras_glmm.data_columns import as_frame, available, row_labels, unknown_column
from keras_glmm.formula import RandomTerm, _unquote
from keras_glmm.levels import (
    column_codes, column_kind, column_levels, combine_keys, frame_codes, level_name, split_key)

__all__ = ["RESERVED_KEYS", "RandomTermDesign", "build_random", "group_levels", "unique_names"]

# Keys of a design's ``arrays()`` dict that are not random-effect terms.
RESERVED_KEYS = {"x", "x_zi", "offset", "y", "weights"}


@dataclass
class RandomTermDesign:
    """One random-effect term ``(expr | group)``, frozen at fit time.

    Attributes:
        term: The parsed term.
        name: Unique, Keras-safe name (``"g"``, ``"a_x_b"``, ``"g_2"``); also the
            key of its level index in :meth:`Design.arrays` (``name + "_z"``
            holds its covariates).
        levels: Level names (strings) of the grouping factor, in index order, as
            lme4 shows them (an interaction's parts joined by ``":"``).
        columns: lme4-style effect names (``"(Intercept)"``, ``"Days"``,
            ``"genderM"``).
        intercept: Whether ``columns[0]`` is the intercept.
        model_spec: formulaic ``ModelSpec`` of ``term.expr``.
        group_columns: Data columns making up the grouping factor.
        keys: Level keys (:mod:`keras_glmm.levels`), in index order: what
            :meth:`level_index` matches. A single column's key is its name; an
            interaction's key encodes its parts without ambiguity.
        group_kinds: Per grouping column, its serving kind
            (:func:`keras_glmm.levels.column_kind` of the training column): the
            dtype a SavedModel takes it in.
    """

    term: RandomTerm
    name: str
    levels: list[str]
    columns: list[str]
    intercept: bool
    model_spec: Any
    group_columns: tuple[str, ...]
    keys: list[str]
    group_kinds: tuple[str, ...]
    _index: pd.Index | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if len(self.keys) != len(self.levels):
            raise ValueError(f"{len(self.keys)} level keys for {len(self.levels)} levels of {self.term}")
        self.group_columns, self.group_kinds = tuple(self.group_columns), tuple(self.group_kinds)
        self._index = pd.Index(self.keys, dtype=object)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_covariates(self) -> int:
        """Number of non-intercept columns (width of :meth:`covariates`)."""
        return len(self.columns) - int(self.intercept)

    def level_index(self, data: pd.DataFrame) -> np.ndarray:
        """Index of each row's level (int64); ``-1`` for a level unseen in training.

        Keys (:mod:`keras_glmm.levels`) are made once per distinct value
        (combination), not per row: the codes of ``pd.factorize`` carry the
        rows, so a chunk of 65,536 rows costs a few milliseconds (files are
        read chunk by chunk).
        """
        data = as_frame(data)
        for col in self.group_columns:
            if col not in data.columns:
                raise ValueError(
                    f"grouping column '{col}' of random-effect term {self.term} is missing "
                    f"from the data{available(data)}"
                )
            missing = data[col].isna().to_numpy()
            if missing.any():
                raise ValueError(
                    f"grouping column '{col}' has missing values at rows {row_labels(data.index, missing)}"
                )
        if not len(data):
            return np.zeros(0, np.int64)
        if len(self.group_columns) == 1:
            codes, keys = column_codes(data[self.group_columns[0]])
        else:
            codes, parts = frame_codes(data, self.group_columns)
            keys = [combine_keys(p) for p in parts]
        return self._positions(keys)[codes]

    def _positions(self, keys: list[str]) -> np.ndarray:
        """Each key's level index (int64), ``-1`` for a key not among :attr:`keys`: a hash
        lookup of them all at once (a Python loop over 280,000 levels took a second)."""
        if self._index.is_unique:
            return self._index.get_indexer(pd.Index(keys, dtype=object)).astype(np.int64)
        index = {key: i for i, key in enumerate(self.keys)}  # a repeated key: its last position
        return np.array([index.get(key, -1) for key in keys], dtype=np.int64)

    def covariates(self, data: pd.DataFrame) -> np.ndarray:
        """The term's non-intercept columns, float64 ``(n, len(columns) - intercept)``."""
        data = as_frame(data)
        mat = spec_matrix(self.model_spec, data, f"random-effect term {self.term}")
        return np.ascontiguousarray(mat[:, 1:] if self.intercept else mat)


def group_levels(term: RandomTerm, data: pd.DataFrame) -> list[str]:
    """The keys of a grouping factor's levels, in level order (see the module docstring)."""
    cols = term.group_columns()
    for col in cols:
        if col not in data.columns:
            raise unknown_column(col, f"the grouping factor of random-effect term {term}", data)
    if len(cols) == 1:
        keys = column_levels(data[cols[0]])
    else:
        orders = [{lvl: i for i, lvl in enumerate(column_levels(data[c]))} for c in cols]
        _, combos = frame_codes(data, cols)
        ordered = sorted(combos, key=lambda row: tuple(o[v] for o, v in zip(orders, row, strict=True)))
        keys = [combine_keys(row) for row in ordered]
    if not keys:
        raise ValueError(f"grouping factor '{_unquote(term.group)}' has no levels (no non-missing values)")
    return keys  # one level is lme4's check.nlev.gtr.1 (keras_glmm.checks.check_levels)


def build_random(
    term: RandomTerm, name: str, data: pd.DataFrame, keys: list[str] | None = None
) -> RandomTermDesign:
    """One term's design: its levels (``keys``: the scan's, else found in ``data``)
    and the columns of its expression, coded like the fixed part (formulaic,
    treatment contrasts, reduced rank where R reduces it; see the module docstring)."""
    where = f"random-effect term {term}"
    keys = group_levels(term, data) if keys is None else list(keys)
    cols = term.group_columns()
    mm = build_matrix(term.expr, data, where)
    if categorical_factors(mm.model_spec):
        used = mm.model_spec.variables_by_source.get("data", set())
        trimmed = drop_unused_categories(data, [c for c in data.columns if str(c) in used])
        if trimmed is not data:
            mm = build_matrix(term.expr, trimmed, where)
    spec = mm.model_spec
    raw = list(spec.column_names)
    intercept = bool(raw) and raw[0] == "Intercept"
    return RandomTermDesign(
        term=term,
        name=name,
        levels=list(keys) if len(cols) == 1 else [level_name(split_key(k, len(cols))) for k in keys],
        columns=[lme4_name(c) for c in raw],
        intercept=intercept,
        model_spec=spec,
        group_columns=cols,
        keys=keys,
        group_kinds=tuple(column_kind(data[c]) for c in cols),
    )


def unique_names(terms: tuple[RandomTerm, ...]) -> list[str]:
    used = set(RESERVED_KEYS)
    names = []
    for term in terms:
        base = _safe_name(term.group)
        if base in RESERVED_KEYS:
            base = base + "_group"
        name, k = base, 1
        while name in used or name + "_z" in used:
            k += 1
            name = f"{base}_{k}"
        used.update({name, name + "_z"})
        names.append(name)
    return names


def _safe_name(text: str) -> str:
    name = _unquote(text).replace(":", "_x_")
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name or "group"

