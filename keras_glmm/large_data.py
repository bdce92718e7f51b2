"""In-memory data too large for the engine's joint posterior: which fits go to coordinate ascent.

`GLMM.fit` gives in-memory data to the engine (`keras_glmm.engine.VariationalSolver`,
the joint posterior) up to the model's `FULL_BATCH_ROWS` rows of a non-gaussian
model; beyond, each of its Newton steps is a quadrature over every row, and many
steps make an iteration. Such fits go instead to
`keras_glmm.engine.coordinate_ascent.CoordinateAscent`: full-batch, deterministic
mean-field Gaussian VI, a few dozen fused passes over the rows, with the engine's
solver interface (the model drives it as the engine, one pass per epoch).

The rule (`solver`): the model's posterior is `"auto"`, `fit` asked for no
`batch_size` or `steps_per_epoch`, the number of rows is the only reason the engine
declined (`GLMM.engine_problem`), there is no zero-inflation layer, and the family is
one of `FAMILIES` (those the path is tested with). Every other fit the engine
declines goes on by stochastic VI, as before.
"""

import numpy as np

from keras_glmm import response as response_lib
from keras_glmm.engine.coordinate_ascent import CoordinateAscent

# The families fitted by coordinate ascent beyond the engine's rows (any of their links).
FAMILIES = ("binomial", "poisson", "gaussian")


def problem(model, num_rows, batch_size=None, steps_per_epoch=None):
    """Why coordinate ascent does not take this fit (a sentence), or None when it does."""
    if model.posterior != "auto":
        return f"posterior={model.posterior!r}"
    if batch_size is not None or steps_per_epoch is not None:
        return "fit(batch_size=...) or steps_per_epoch asks for stochastic VI"
    if model.engine_problem(num_rows, batch_size) is None:
        return "the engine fits it"
    other = model.engine_problem(None, batch_size)
    if other is not None:
        return other
    if model.zero_inflation is not None:
        return "it has a zero-inflation layer"
    if model.family.name not in FAMILIES:
        return f"its family {model.family.name!r} is not one of {FAMILIES}"
    return None


def solver(model, x, y, num_rows, batch_size=None, steps_per_epoch=None):
    """The coordinate-ascent solver of this fit, or None (see the module docstring).

    Args:
        model: a prepared `GLMM`.
        x: its input dict (`GLMM.prepare`'s).
        y: the response.
        num_rows: rows of `x`.
        batch_size, steps_per_epoch: `fit`'s.
    """
    if problem(model, num_rows, batch_size, steps_per_epoch) is not None:
        return None
    response, trials = response_lib.split(np.asarray(y, "float64"))
    terms = [(term.name, x[term.name], x.get(term.name + "_z"), term.intercept, term.num_levels,
              term.covariance == "full") for term in model.terms]
    return CoordinateAscent(
        np.asarray(x["x"]), terms, response, model.family, trials=trials,
        weights=response_lib.prior_weights(x), offset=x.get("offset"),
        fixed_params=model.head.fixed_params, num_points=model.quadrature_points,
    )
