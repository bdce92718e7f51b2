"""In-memory data too large for the engine's joint posterior: full-batch coordinate ascent.

The engine (`keras_glmm.fitting.engine`) takes in-memory data of a non-gaussian
model up to its row limit (`engine.row_limit`); beyond, each of its Newton steps is
a quadrature over every row, and many steps make an iteration. Such fits go instead
to `keras_glmm.engine.coordinate_ascent.CoordinateAscent`: deterministic
mean-field Gaussian VI over all the rows, a few dozen fused passes, with the
engine's solver interface, so the engine's driver runs it (one pass per epoch) and
writes its estimates into the layers.

The rule (`problem`): the model's posterior is `"auto"`, `fit` asked for no
`batch_size` or `steps_per_epoch`, the number of rows is the only reason the engine
declined (`engine.engine_problem`), there is no zero-inflation layer, the family
is one of `FAMILIES` (those the path is tested with), and no term is nested in
another (the engine keeps those: `engine.nested_terms`). Every other fit the engine
declines goes on by stochastic VI (`keras_glmm.fitting.stochastic`).
"""

import numpy as np

from keras_glmm import response as response_lib
from keras_glmm.engine.coordinate_ascent import CoordinateAscent
from keras_glmm.fitting import engine

# The families fitted by coordinate ascent beyond the engine's rows (any of their links).
FAMILIES = ("binomial", "poisson", "gaussian")


def problem(model, num_rows, batch_size=None, steps_per_epoch=None, x=None):
    """Why coordinate ascent does not take this fit (a sentence), or None when it does.

    With the inputs `x`, a nested design is refused (`engine.nested_terms`: the engine
    keeps it).
    """
    if model.posterior != "auto":
        return f"posterior={model.posterior!r}"
    if batch_size is not None or steps_per_epoch is not None:
        return "fit(batch_size=...) or steps_per_epoch asks for stochastic VI"
    if engine.engine_problem(model, num_rows, batch_size) is None:
        return "the engine fits it"
    other = engine.engine_problem(model, None, batch_size)
    if other is not None:
        return other
    if model.zero_inflation is not None:
        return "it has a zero-inflation layer"
    if model.family.name not in FAMILIES:
        return f"its family {model.family.name!r} is not one of {FAMILIES}"
    nested = [] if x is None else engine.nested_terms(model, x)
    if nested:
        inner, outer = nested[0]
        return f"term '{inner}' is nested in '{outer}' (mean field would collapse '{outer}')"
    return None


def build_solver(model, x, y, num_rows, batch_size=None, steps_per_epoch=None):
    """The coordinate-ascent solver of this fit, or None (see the module docstring)."""
    if problem(model, num_rows, batch_size, steps_per_epoch, x) is not None:
        return None
    response, trials = response_lib.split(np.asarray(y, "float64"))
    terms = [(term.name, x[term.name], x.get(term.name + "_z"), term.intercept, term.num_levels,
              term.covariance == "full") for term in model.terms]
    return CoordinateAscent(
        np.asarray(x["x"]), terms, response, model.family, trials=trials,
        weights=response_lib.prior_weights(x), offset=x.get("offset"),
        fixed_params=model.head.fixed_params, num_points=model.quadrature_points,
    )


class LargeDataDriver(engine.EngineDriver):
    """The engine's driver around a `CoordinateAscent` solver: one pass per epoch."""

    build_solver = staticmethod(build_solver)
