"""From a data frame to the numeric design of a mixed model.

The work is split in three steps, as in MixedModels.jl (formula -> schema ->
arrays) and formulaic (formula -> ``ModelSpec`` -> model matrix):

1. :func:`keras_glmm.formula.parse_formula` turns the text into a
   :class:`~keras_glmm.formula.FormulaSpec` (no data involved).
2. :meth:`Design.from_data` learns everything that depends on the *training*
   data, once: the coding of the fixed part and of each random term's
   left-hand side (:mod:`keras_glmm.coding`: categorical levels, contrasts,
   stateful transforms), the levels of every grouping factor
   (:mod:`keras_glmm.random_terms`), how the response is read
   (:mod:`keras_glmm.response_coding`). The result is frozen.
3. :meth:`Design.arrays` (and the smaller methods it calls) turns any data
   frame, training data or new data, into NumPy arrays using that frozen
   schema, so predictions on new data are coded exactly as the fit was.

Decisions worth knowing:

* Random-effect terms, their levels and their keys: see
  :mod:`keras_glmm.random_terms` (a level unseen in training gets index ``-1``).
* An unseen level of a categorical variable in the *fixed* part is an error
  (formulaic would silently code it as all zeros). Unused categories of a
  categorical column are no levels (R's model frame drops them), in the fixed
  part as in the random one.
* lme4's guard rails of the design (:mod:`keras_glmm.checks`): a fixed-effect
  column that is a linear combination of earlier ones is dropped with lme4's
  warning (:attr:`Design.fixed_dropped`; :meth:`Design.fixed_matrix` leaves it
  out everywhere, saved designs included), and a right-hand-side term equal to
  the response is dropped with R's.
* ``(f || g)`` follows lme4's ``expandDoubleVerts`` (done by
  :mod:`keras_glmm.formula`): one term per term label of the left-hand side
  (R's ``terms()``: ``x * f`` gives ``x``, ``f`` and ``x:f``), so
  ``(f || g)`` is ``(1 | g) + (0 + f | g)``, the second
  term holding a column for *every* level of ``f`` with a full correlation
  matrix among them. lme4 documents that ``||`` does not split a factor's
  columns ("works only for design matrices containing numeric (continuous)
  predictors"), and this is the same model: over-parameterized for a factor
  (the intercept and the full dummy coding overlap), as in lme4. For
  independent per-level effects, use numeric indicator columns.
* Fixed-effect names follow lme4/R: ``"(Intercept)"``, and treatment-coded
  levels ``"C(period)[T.2]" -> "period2"`` (variable name + level). R cannot
  always be reproduced from names alone (a 0/1 numeric column fitted as a
  numeric variable is named ``"service"`` in R, while ``C(service)`` gives
  ``"service1"`` here), so compare coefficients by position when in doubt.
  formulaic's names are kept in :attr:`Design.fixed_formulaic_columns`.
* A zero-inflated family's ``ziformula`` (glmmTMB's) is a one-sided formula of
  fixed effects, coded like the fixed part (formulaic: treatment contrasts,
  ``C()``, ``I()``, ``0 +``) and frozen with it: :meth:`Design.arrays` returns
  its columns as ``inputs["x_zi"]``. ``"~1"`` (the default) is a constant
  zero-inflation probability, the family's ``zi_odds``, and adds no columns.
  Random effects and offsets are refused there, and so is a zi design whose
  columns are linearly dependent (the error names the columns), since its
  coefficients would not be identified.
* :meth:`Design.get_config` / :meth:`Design.from_config` round-trip a fitted
  design through plain JSON, the documented and versioned format of
  :mod:`keras_glmm.design_spec` (for Keras ``safe_mode`` saving): the training
  data is not needed to load, and loading runs no code the file names.
* No TensorFlow here: everything is NumPy/pandas/formulaic.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from formulaic import Formula

from keras_glmm import checks as checks_lib
from keras_glmm import design_spec
from keras_glmm import response as response_lib
from keras_glmm.coding import (
    ZI_WHERE,
    build_matrix,
    dependent_columns,
    drop_unused_categories,
    formula_columns,
    lme4_name,
    refuse_datetimes,
    spec_matrix,
)
from keras_glmm.data_columns import as_frame, eval_expr, float_array, row_labels, unknown_column
from keras_glmm.expressions import ExpressionError
from keras_glmm.formula import FormulaSpec, parse_formula
from keras_glmm.random_terms import RandomTermDesign, build_random, unique_names
from keras_glmm.response_coding import learn_response, response_array, weights_array

# Names other modules and tests import from here (their homes: coding, data_columns,
# levels, random_terms, formula).
from keras_glmm.coding import C_CALL as _C_RE  # noqa: F401
from keras_glmm.coding import categorical_factors as _categorical_factors  # noqa: F401
from keras_glmm.data_columns import EVAL_NAMESPACE as _EVAL_NAMESPACE  # noqa: F401
from keras_glmm.data_columns import eval_expr as _eval_expr  # noqa: F401
from keras_glmm.data_columns import is_categorical as _is_categorical  # noqa: F401
from keras_glmm.formula import _unquote  # noqa: F401
from keras_glmm.levels import column_strings as _column_strings  # noqa: F401
from keras_glmm.levels import level_key as _level_str  # noqa: F401
from keras_glmm.random_terms import group_levels as _group_levels  # noqa: F401

__all__ = ["Design", "RandomTermDesign", "lme4_name"]




def _zi_rhs(ziformula: str) -> str:
    """The right-hand side of a one-sided ``ziformula``, or an error saying what is wrong with it."""
    if not isinstance(ziformula, str):
        raise TypeError(f"ziformula must be a one-sided formula string such as '~ x'. Received: {ziformula!r}")
    text = ziformula.strip()
    try:
        spec = parse_formula(text if "~" in text else "~ " + text)
    except ExpressionError as e:  # said of the ziformula, not of a formula's fixed effects
        raise e.for_part(ZI_WHERE, ziformula) from None
    if spec.response is not None:
        raise ValueError(f"ziformula must be one-sided ('~ x'); '{ziformula}' has a response, '{spec.response}'")
    if spec.random:
        terms = ", ".join(str(t) for t in spec.random)
        raise ValueError(
            f"ziformula '{ziformula}' has the random-effect term(s) {terms}: only fixed effects are "
            "supported in the zero-inflation formula"
        )
    if spec.offsets:
        raise ValueError(f"ziformula '{ziformula}' has offset(...), which the zero-inflation formula does not take")
    return spec.fixed_rhs()


def _without_response_term(spec: FormulaSpec) -> FormulaSpec:
    """``spec`` without a fixed term that is the response itself, with R's warning.

    R's ``model.matrix`` drops a right-hand-side term equal to the response
    (``Reaction ~ Reaction + Days``: "the response appeared on the right-hand
    side and was dropped"); an interaction with it (``Reaction:Days``) stays, as
    in R. The term is removed with formulaic's ``- term``, which the saved
    formula keeps.
    """
    if spec.response is None or spec.cbind() is not None:
        return spec
    def bare(text):
        return re.sub(r"\s+", "", _unquote(str(text)))

    try:
        terms = list(Formula(spec.fixed_rhs()))
    except Exception:  # the fixed part's own errors are reported when it is built
        return spec
    if not any(bare(t) == bare(spec.response) for t in terms):
        return spec
    warnings.warn(
        f"the response appeared on the right-hand side and was dropped: '{spec.response}' is the response "
        f"of '{spec.formula}', so its term is not a fixed effect",
        UserWarning,
        stacklevel=3,
    )
    return dataclasses.replace(spec, fixed=f"{spec.fixed} - {spec.response}")


# --------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------


@dataclass
class Design:
    """The frozen numeric design of a mixed model (see the module docstring).

    Attributes:
        spec: The parsed formula.
        fixed_spec: formulaic ``ModelSpec`` of the fixed-effects right-hand side.
        fixed_columns: lme4-style fixed-effect names (``"(Intercept)"``, ``"period2"``).
        fixed_formulaic_columns: formulaic's names of the same columns.
        random: One :class:`RandomTermDesign` per random-effect term.
        response_kind: ``"continuous"`` (any non-binomial family, counts
            included), ``"binary"``, ``"cbind"``, ``"proportion"``, ``"ordinal"``
            (category codes ``1..K``); ``None`` for a one-sided formula.
        family_name: The family the design was built for.
        response_levels: For a binary response given as a two-level factor,
            ``[failure, success]``; for an ordinal one its categories in order;
            else ``None``.
        weights_kind: What ``weights`` mean: ``"trials"`` (the binomial trials of
            a proportion response), ``"prior"`` (prior weights, lme4's: the
            precisions of a gaussian response, likelihood weights of the other
            families; :meth:`arrays` returns them as ``inputs["weights"]``) or
            ``None`` (no weights).
        na_action: ``"raise"`` or ``"omit"`` (what :meth:`from_data` did).
        ziformula: The zero-inflation formula as given (``None`` when none was).
        zi_spec: formulaic ``ModelSpec`` of its right-hand side; ``None`` for a
            constant zero-inflation probability (``"~1"``).
        zi_columns: lme4-style names of its columns (``"(Intercept)"``, ``"minedyes"``).
        zi_formulaic_columns: formulaic's names of the same columns.
        fixed_dropped: lme4-style names of the fixed-effect columns dropped as
            linear combinations of earlier ones (lme4's ``check.rankX``:
            :func:`keras_glmm.checks.drop_aliased`); :meth:`fixed_matrix` leaves
            them out, so they are in no fit, prediction or saved model.
    """

    spec: FormulaSpec
    fixed_spec: Any
    fixed_columns: list[str]
    fixed_formulaic_columns: list[str]
    random: list[RandomTermDesign]
    response_kind: str | None
    family_name: str = "gaussian"
    response_levels: list[str] | None = None
    na_action: str = "raise"
    weights_kind: str | None = None
    ziformula: str | None = None
    zi_spec: Any = None
    zi_columns: list[str] = field(default_factory=list)
    zi_formulaic_columns: list[str] = field(default_factory=list)
    fixed_dropped: list[str] = field(default_factory=list)
    _response_columns: list[str] = field(default_factory=list, repr=False)
    _offset_columns: list[str] = field(default_factory=list, repr=False)

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        """Everything the frozen design knows, as plain JSON (str, numbers, bools,
        ``None``, lists, dicts): the document of :mod:`keras_glmm.design_spec`.
        ``json.dumps(design.get_config())`` works, and :meth:`from_config`
        rebuilds a design whose :meth:`arrays` are identical on any data,
        without the training data.

        Raises ``TypeError`` if a coding holds a value the format cannot carry
        (e.g. tz-aware timestamp categories).
        """
        return design_spec.write(self, None if self.ziformula is None else _zi_rhs(self.ziformula))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Design":
        """Rebuild a design from :meth:`get_config` (e.g. after ``json.loads``); the
        document is checked first (:func:`keras_glmm.design_spec.read`)."""
        saved = design_spec.read(config)
        return cls(**saved["fields"], random=[RandomTermDesign(**r) for r in saved["random"]])

    # ---------------------------------------------------------------- build


    @classmethod
    def from_data(
        cls,
        spec_or_formula: FormulaSpec | str,
        data: pd.DataFrame,
        family_name: str = "gaussian",
        weights: Any = None,
        na_action: str = "raise",
        group_levels: list[list[str]] | None = None,
        ziformula: str | None = None,
        checks: Any = None,
    ) -> "Design":
        """Learn the design from training data.

        The guard rails of lme4's model frame and design (:mod:`keras_glmm.checks`)
        are applied here: a response term on the right-hand side is dropped
        with R's warning, unused categories are dropped (R's
        ``drop.unused.levels``), aliased fixed-effect columns are dropped
        (``check.rankX``), and the fixed design's conditioning and the number of
        each grouping factor's levels are checked as ``checks`` says. The checks
        against the number of rows and of the response are
        :func:`keras_glmm.checks.check_fit_data`'s, on the arrays of the fit.

        Args:
            spec_or_formula: A formula string or a parsed :class:`FormulaSpec`.
            data: Training data frame.
            family_name: Family name (``"binomial"`` changes how the response is read);
                a family object with a ``name`` attribute is accepted too.
            weights: A column name or an array of length ``n``: the binomial
                trials of a proportion response, else prior weights (lme4's
                ``weights``: each row's log-likelihood is multiplied by its
                weight; for a gaussian model the row's variance is ``sigma^2 / w``).
            na_action: ``"raise"`` (missing values in a used column are an
                error) or ``"omit"`` (the schema is learned from the complete
                rows; the caller drops the others, see :meth:`complete_rows`).
            group_levels: Optional level vocabulary of each random-effect term
                (one list of level *keys*, :mod:`keras_glmm.levels`, per term of
                the formula, in index order), used instead of the levels found
                in ``data``. :mod:`keras_glmm.streaming` learns them from files
                in one pass and passes a sample of rows as ``data``; the levels
                must be in :func:`_group_levels` order.
            ziformula: A zero-inflated family's one-sided zero-inflation formula
                (glmmTMB's ``ziformula``, e.g. ``"~ mined"``), fixed effects only;
                ``None`` or ``"~1"`` for a constant zero-inflation probability. The
                caller checks that the family is zero-inflated.
            checks: lme4's checks (:func:`keras_glmm.checks.resolve_checks`: a
                dict such as ``{"rank_x": "stop"}``, or ``None`` for lme4's
                defaults for the family).
        """
        spec = parse_formula(spec_or_formula) if isinstance(spec_or_formula, str) else spec_or_formula
        if not isinstance(spec, FormulaSpec):
            raise TypeError(f"expected a formula string or FormulaSpec, got {type(spec).__name__}")
        checks = checks_lib.resolve_checks(checks, family_name)
        spec = _without_response_term(spec)
        data = as_frame(data)
        if na_action not in ("raise", "omit"):
            raise ValueError(f"na_action must be 'raise' or 'omit', got {na_action!r}")
        family = getattr(family_name, "name", family_name)
        family = str(family).lower()
        if spec.cbind() is not None and family != "binomial":
            raise ValueError(
                f"a cbind(successes, failures) response needs family='binomial', got {family!r}"
            )

        if group_levels is not None and len(group_levels) != len(spec.random):
            raise ValueError(
                f"group_levels has {len(group_levels)} entries for {len(spec.random)} random-effect terms"
            )
        zi_rhs = None if ziformula is None else _zi_rhs(ziformula)
        columns = cls._formula_columns(spec, data, zi_rhs)
        refuse_datetimes(data, columns, {"fixed": spec.fixed_rhs(), "zi": zi_rhs or "",
                                          "random": " + ".join(t.expr for t in spec.random)})
        response_cols, offset_cols, used = columns["response"], columns["offset"], columns["used"]

        design = cls(
            spec=spec,
            fixed_spec=None,
            fixed_columns=[],
            fixed_formulaic_columns=[],
            random=[],
            response_kind=None,
            family_name=family,
            na_action=na_action,
            _response_columns=response_cols,
            _offset_columns=offset_cols,
        )

        weight_array = design._weights_array(data, weights) if weights is not None else None
        missing = data[used].isna().to_numpy().any(axis=1) if used else np.zeros(len(data), bool)
        if weight_array is not None:
            missing |= np.isnan(weight_array)
        if missing.any():
            if na_action == "raise":
                design._raise_missing(data, used, missing, weight_array)
            data = data.loc[~missing]
            if weight_array is not None:
                weight_array = weight_array[~missing]

        # Fixed effects: unused categories dropped (R's model frame drops unused
        # levels), then the aliased columns (lme4's check.rankX).
        fixed_data = drop_unused_categories(data, columns["fixed"])
        mm = build_matrix(spec.fixed_rhs(), fixed_data, "the fixed effects")
        design.fixed_spec = mm.model_spec
        formulaic_names = list(mm.model_spec.column_names)
        names = [lme4_name(c) for c in formulaic_names]
        kept, design.fixed_dropped = checks_lib.drop_aliased(mm, names, checks)
        design.fixed_formulaic_columns = [formulaic_names[j] for j in kept]
        design.fixed_columns = [names[j] for j in kept]

        # Random effects.
        names = unique_names(spec.random)
        levels = group_levels or [None] * len(spec.random)
        design.random = [
            build_random(t, n, data, lv) for t, n, lv in zip(spec.random, names, levels, strict=True)
        ]
        checks_lib.check_levels(design.random, len(data), checks, counts=False)  # counts: check_fit_data

        # Offsets are checked now so formula mistakes surface at fit time.
        design.offset(data)

        if ziformula is not None:
            design._learn_zero_inflation(ziformula, zi_rhs, data)

        # Response.
        if spec.response is not None:
            design.response_kind, design.response_levels = learn_response(
                spec, family, data, weight_array)
        if weights is not None:
            if spec.response is None:
                raise ValueError("weights were given for a formula without a response")
            design.weights_kind = "trials" if design.response_kind == "proportion" else "prior"
            if design.weights_kind == "prior":  # validate now, naming the column
                design.prior_weights(data, weights if isinstance(weights, str) else weight_array)
        return design

    # The columns of each part of a formula (streaming's scan asks for them too).
    _formula_columns = staticmethod(formula_columns)

    # ------------------------------------------------------- zero inflation

    def _learn_zero_inflation(self, ziformula: str, zi_rhs: str, data: pd.DataFrame) -> None:
        """Freezes the zero-inflation columns (none for a constant probability)."""
        self.ziformula = ziformula
        mm = build_matrix(zi_rhs, data, ZI_WHERE)
        columns = list(mm.model_spec.column_names)
        if not columns:
            raise ValueError(
                f"ziformula '{ziformula}' has no columns (a zero-inflation probability of 0): "
                "without zero inflation, use family='poisson' or 'negative_binomial'"
            )
        if columns == ["Intercept"]:
            return  # a constant probability: the family's own `zi_odds`
        self.zi_spec = mm.model_spec
        self.zi_formulaic_columns = columns
        self.zi_columns = [lme4_name(c) for c in columns]
        matrix = self._finite_zi(np.asarray(mm, dtype=np.float64), data.index)
        dependent = dependent_columns(matrix, self.zi_columns)
        if dependent:
            raise ValueError(
                f"the zero-inflation design of ziformula '{ziformula}' is rank deficient, so its "
                f"coefficients are not identified: column {'; column '.join(dependent)}. "
                f"Its columns: {self.zi_columns}; drop the dependent ones"
            )

    def _finite_zi(self, matrix: np.ndarray, index: pd.Index) -> np.ndarray:
        bad = ~np.isfinite(matrix)
        if bad.any():
            col = int(np.flatnonzero(bad.any(axis=0))[0])
            raise ValueError(
                f"{ZI_WHERE}: column '{self.zi_columns[col]}' is not finite at rows "
                f"{row_labels(index, bad[:, col])}"
            )
        return matrix

    def zi_matrix(self, data: pd.DataFrame) -> np.ndarray:
        """Zero-inflation design ``(n, q)`` float64, through the frozen ModelSpec."""
        if self.zi_spec is None:
            raise ValueError("this design has no zero-inflation columns (a constant zero-inflation, or none)")
        data = as_frame(data)
        return self._finite_zi(spec_matrix(self.zi_spec, data, ZI_WHERE), data.index)

    # ------------------------------------------------------------ response

    def _weights_array(self, data: pd.DataFrame, weights: Any) -> np.ndarray:
        return weights_array(data, weights)

    def response(self, data: pd.DataFrame, weights: Any = None) -> np.ndarray:
        """The response as float64: ``(n,)``, or ``(n, 2)`` ``[successes, trials]``
        for ``cbind`` and proportion responses (:mod:`keras_glmm.response_coding`)."""
        return response_array(self.spec, self.family_name, self.response_kind, self.response_levels,
                              as_frame(data), weights)

    # -------------------------------------------------------------- arrays

    def fixed_matrix(self, data: pd.DataFrame) -> np.ndarray:
        """Fixed-effects design ``(n, p)`` float64, through the frozen ModelSpec; the
        columns of :attr:`fixed_columns` only (aliased ones, :attr:`fixed_dropped`, left out)."""
        matrix = spec_matrix(self.fixed_spec, as_frame(data), "the fixed effects")
        if not self.fixed_dropped:
            return matrix
        position = {str(c): j for j, c in enumerate(self.fixed_spec.column_names)}
        return np.ascontiguousarray(matrix[:, [position[c] for c in self.fixed_formulaic_columns]])

    def offset(self, data: pd.DataFrame) -> np.ndarray:
        """Sum of the ``offset()`` expressions, float64 ``(n,)``; zeros if none."""
        data = as_frame(data)
        n = len(data)
        total = np.zeros(n, dtype=np.float64)
        for expr in self.spec.offsets:
            value = float_array(eval_expr(expr, data, f"offset({expr})"), n, f"offset({expr})")
            bad = ~np.isfinite(value)
            if bad.any():
                raise ValueError(f"offset({expr}) is not finite at rows {row_labels(data.index, bad)}")
            total += value
        return total

    def used_columns(self, data: pd.DataFrame | None = None, with_response: bool = True) -> list[str]:
        """Data columns the formula uses (response ones only if ``with_response``)."""
        cols = list(self.fixed_spec.variables_by_source.get("data", set()))
        if self.zi_spec is not None:
            cols += list(self.zi_spec.variables_by_source.get("data", set()))
        for r in self.random:
            cols += list(r.model_spec.variables_by_source.get("data", set()))
            cols += list(r.group_columns)
        cols += self._offset_columns
        if with_response:
            cols += self._response_columns
        cols = list(dict.fromkeys(cols))
        if data is not None:
            order = {str(c): i for i, c in enumerate(data.columns)}
            cols.sort(key=lambda c: order.get(c, len(order)))
        return cols

    def complete_rows(self, data: pd.DataFrame, with_response: bool = True) -> np.ndarray:
        """Boolean mask of rows without missing values in any column the formula uses."""
        data = as_frame(data)
        cols = self.used_columns(data, with_response)
        for c in cols:
            if c not in data.columns:
                raise unknown_column(c, "the formula", data)
        if not cols:
            return np.ones(len(data), dtype=bool)
        return ~data[cols].isna().to_numpy().any(axis=1)

    def check_rows(self, data: pd.DataFrame, with_response: bool = True) -> None:
        """Raise a ValueError listing rows and columns with missing values, if any."""
        data = as_frame(data)
        complete = self.complete_rows(data, with_response)
        if not complete.all():
            self._raise_missing(data, self.used_columns(data, with_response), ~complete, None)

    @staticmethod
    def _raise_missing(data, cols, missing, weights) -> None:
        bad_cols = [str(c) for c in cols if data[c].isna().any()]
        if weights is not None and np.isnan(weights).any():
            bad_cols.append("weights")
        raise ValueError(
            f"missing values in column(s) {bad_cols} at rows {row_labels(data.index, missing)}; "
            "drop those rows first, or use na_action='omit' and keep the rows of complete_rows()"
        )

    def prior_weights(self, data: pd.DataFrame, weights: Any) -> np.ndarray:
        """Prior weights, float64 ``(n,)``: finite and non-negative, or an error naming the row."""
        if weights is None:
            raise ValueError(
                "this model was fitted with prior weights: pass `weights` (a column name or array)"
            )
        what = f"weights '{weights}'" if isinstance(weights, str) else "weights"
        return response_lib.check_weights(self._weights_array(data, weights), what, data.index)

    def arrays(
        self, data: pd.DataFrame, weights: Any = None, with_response: bool = True
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Model inputs and response for ``data``.

        Returns:
            ``(inputs, y)``: ``inputs`` has ``"x"`` (fixed design), ``"x_zi"``
            (the zero-inflation design, only if the design has one), ``"offset"``
            (only if the formula has offsets), ``term.name`` (int64 level
            indices, ``-1`` for new levels), ``term.name + "_z"`` (the term's
            non-intercept covariates, only if it has any) and, with the response,
            ``"weights"`` (prior weights, when the design has them). ``y`` is
            :meth:`response` or ``None`` (``with_response=False`` or a
            one-sided formula).
        """
        data = as_frame(data)
        with_response = with_response and self.spec.response is not None
        self.check_rows(data, with_response)
        inputs: dict[str, np.ndarray] = {"x": self.fixed_matrix(data)}
        if self.zi_spec is not None:
            inputs["x_zi"] = self.zi_matrix(data)
        if self.spec.offsets:
            inputs["offset"] = self.offset(data)
        for r in self.random:
            inputs[r.name] = r.level_index(data)
            if r.n_covariates:
                inputs[r.name + "_z"] = r.covariates(data)
        y = self.response(data, weights) if with_response else None
        if with_response and self.weights_kind == "prior":
            inputs["weights"] = self.prior_weights(data, weights)
        return inputs, y

    # ------------------------------------------------------------- helpers

    @property
    def n_fixed(self) -> int:
        return len(self.fixed_columns)

    @property
    def lme4_names(self) -> list[str]:
        """Alias of :attr:`fixed_columns` (lme4-style names)."""
        return list(self.fixed_columns)

    def term(self, name: str) -> RandomTermDesign:
        for r in self.random:
            if r.name == name:
                return r
        raise KeyError(f"no random-effect term named {name!r}; have {[r.name for r in self.random]}")
