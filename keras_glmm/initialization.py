"""Checks of in-memory data, and the data-driven starting point of a GLMM fit.

A fit by gradient steps is only as good as its start and its units. Before the
first fit `GLMM` (1) checks the data so that bad input fails here with the column and
row at fault instead of as a NaN loss later; (2) fits the GLM without random effects
(Newton's method on the exact log-likelihood) and starts the fixed effects there;
(3) sets each random-effects layer's `effect_scale` from the data's spread, so that
its weights are stored in units where one optimizer step means the same whatever the
units of the response and covariates.
"""

import keras
import numpy as np
import tensorflow as tf
from keras_glmm import checks as checks_lib
from keras_glmm import response as response_lib
from keras_glmm.layers import triangular
from keras_glmm.layers.fixed_effects import VariationalFixedEffects
from keras_glmm.transforms import softplus_inverse

# Newton's method for the starting GLM: a dense p x p Hessian, so only for a
# moderate number of fixed-effect columns.
MAX_GLM_COLUMNS = 500
# The starting GLM is fitted on a uniform sample of this many rows of larger data:
# it is only a start, its error on 200,000 rows is far below what the random
# effects move, and Newton's method with exact Hessians on all of 10M rows took
# 36 s and 6.9 GiB here (the same size as the streamed fits' sample, see
# `keras_glmm.streaming.SAMPLE_ROWS`, would do; twice that keeps more of a rare class).
GLM_SAMPLE_ROWS = 200_000


# Beyond this a value's square overflows float64 (the GLM start's and the engine's
# X'X): 1e300 in a covariate made the start fail with "SVD did not converge".
_SQUARE_SAFE = float(np.sqrt(np.finfo(np.float64).max))


def _column_names(model, key, width):
    """The design's names of input ``key``'s columns (a formula model), else None."""
    design = getattr(model, "design", None)
    if design is None:
        return None
    names = None
    if key == "x":
        names = design.fixed_columns
    elif key == "x_zi":
        names = design.zi_columns
    elif key.endswith("_z"):
        term = next((r for r in design.random if r.name + "_z" == key), None)
        names = None if term is None else list(term.columns)[int(term.intercept):]
    return list(names) if names is not None and len(names) == width else None


def _as_float_matrix(value, key, num_columns=None, model=None):
    """An input as a float matrix (float64, or the float type it has: no copy of a
    float32 design only to check it), checked: numeric, the right width, every value
    finite and small enough for the model's dtype and for its square (errors name the
    column)."""
    array = np.asarray(value)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise TypeError(f"Input '{key}' must be numeric. Received dtype {array.dtype}.")
    if array.dtype.kind != "f":
        array = array.astype("float64")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"Input '{key}' must be 1-D or 2-D. Received shape {array.shape}.")
    if num_columns is not None and array.shape[1] != num_columns:
        raise ValueError(
            f"Input '{key}' must have {num_columns} column(s). Received shape {array.shape}."
        )
    names = None if model is None else _column_names(model, key, array.shape[1])

    def column(col):
        return f"column {col}" if names is None else f"column {col} ('{names[col]}')"

    limit = _SQUARE_SAFE
    if model is not None:
        limit = min(limit, float(np.finfo(np.dtype(model.compute_dtype)).max))
    if checks_lib.largest_magnitude(array) <= limit:  # a NaN or inf fails it too
        return array
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"Input '{key}' holds a non-finite value ({array[row, col]}) in row {row}, "
            f"{column(col)} ({int(bad.any(axis=1).sum())} rows affected)."
        )
    big = np.abs(array) > limit
    if big.any():
        row, col = np.argwhere(big)[0]
        raise ValueError(
            f"Input '{key}' holds {array[row, col]:.6g} in row {row}, {column(col)} "
            f"({int(big.any(axis=1).sum())} rows affected): the model computes in "
            f"{model.compute_dtype if model is not None else 'float64'}, where values beyond "
            f"{limit:.3g} overflow (a square overflows float64 beyond {_SQUARE_SAFE:.3g}). "
            "Rescale the column (divide it by a power of ten, or take its log)."
        )
    return array


def check_data(model, x, y):
    """Validates a dict of in-memory inputs and the response for `model`.

    Returns:
        `(x, y, num_rows)`: arrays cast to the model's dtype.

    Raises:
        ValueError / TypeError naming the input, row and value at fault.
    """
    dtype = model.compute_dtype
    expected = {"x", "offset", response_lib.WEIGHTS}
    zero_inflation = getattr(model, "zero_inflation", None)
    if zero_inflation is not None:
        expected.add("x_zi")
    for layer in model.terms:
        expected.add(layer.name)
        if layer.num_covariates:
            expected.add(layer.name + "_z")
    unknown = sorted(set(x) - expected)
    if unknown:
        raise ValueError(
            f"Unexpected input(s) {unknown}: the model takes {sorted(expected)}."
        )
    if "x" not in x:
        raise ValueError("Inputs need 'x', the fixed-effects design (a column of ones for an intercept).")
    out = {"x": _as_float_matrix(x["x"], "x", model=model)}
    fixed = model.fixed_effects
    if (getattr(model, "design", None) is None and isinstance(fixed, (keras.layers.Dense, VariationalFixedEffects))
            and not fixed.use_bias):
        # The array API with a linear fixed part: no formula says whether the model has an
        # intercept (a network, or a Dense with a bias, carries its own).
        checks_lib.check_intercept(out["x"], getattr(model, "intercept", True))
    num_rows = out["x"].shape[0]
    for layer in model.terms:
        if layer.name not in x:
            raise ValueError(f"Inputs need '{layer.name}', the level index of each row.")
        index = np.asarray(x[layer.name]).reshape(-1)
        layer._check_index_values(index)
        # int32 where it fits: half the memory of int64 for 10M-row data, and
        # cheaper gathers of minibatches (the layer widens them in the graph).
        out[layer.name] = index.astype("int32" if layer.num_levels < 2**31 else "int64", copy=False)
        if layer.num_covariates:
            key = layer.name + "_z"
            if key not in x:
                raise ValueError(f"Inputs need '{key}', the covariates of layer '{layer.name}'.")
            out[key] = _as_float_matrix(x[key], key, layer.num_covariates, model=model)
    if zero_inflation is not None:
        if "x_zi" not in x:
            raise ValueError("Inputs need 'x_zi', the zero-inflation design (the model has a zero_inflation layer).")
        out["x_zi"] = _as_float_matrix(
            x["x_zi"], "x_zi", zero_inflation.kernel.shape[0] if zero_inflation.built else None, model=model)
    if "offset" in x:
        out["offset"] = _as_float_matrix(x["offset"], "offset", 1, model=model)[:, 0]
    if response_lib.WEIGHTS in x:
        out[response_lib.WEIGHTS] = check_weights(x[response_lib.WEIGHTS], num_rows, name="weights")
    for key, value in out.items():
        if len(value) != num_rows:
            raise ValueError(
                f"Input '{key}' has {len(value)} rows but 'x' has {num_rows}: all inputs "
                "need one row per observation."
            )
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 2 and model.family.name != "binomial":
        raise ValueError(
            f"A response of shape {y.shape} (successes and trials) needs the binomial family, "
            f"not {model.family.name!r}."
        )
    response, trials = response_lib.split(y)
    if response.ndim != 1:
        raise ValueError(
            f"The response must be 1-D (or (n, 2) successes and trials for a binomial). "
            f"Received shape {y.shape}."
        )
    if len(response) != num_rows:
        raise ValueError(f"The response has {len(response)} rows but 'x' has {num_rows}.")
    response = response.astype("float64")
    trials = None if trials is None else trials.astype("float64")
    model.family.check_response(response, trials, name="y")
    y = response if trials is None else np.stack([response, trials], axis=-1)
    # No copy of an input already in the model's dtype (the arrays `from_formula` prepared,
    # which `fit(data)` of the same frame takes again): nothing writes into them.
    cast = {k: (v if np.issubdtype(v.dtype, np.integer) else v.astype(dtype, copy=False)) for k, v in out.items()}
    return cast, y.astype(dtype), num_rows


def check_weights(weights, num_rows, name="sample_weight"):
    """Prior weights as float64 `(n,)`: finite, non-negative, one per row; errors name the row."""
    w = np.asarray(weights)
    if w.dtype == object or not (np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.bool_)):
        raise TypeError(f"`{name}` must be numeric. Received dtype {w.dtype}.")
    w = w.astype("float64").reshape(-1)
    if len(w) != num_rows:
        raise ValueError(f"`{name}` has {len(w)} values but the data have {num_rows} rows.")
    return response_lib.check_weights(w, f"`{name}`")


def _glm_design(model, x):
    """The fixed-effects design as the GLM sees it, or None if not a linear layer."""
    layer = model.fixed_effects
    design = x["x"].astype("float64")
    if isinstance(layer, VariationalFixedEffects):
        use_bias = layer.use_bias
    elif isinstance(layer, keras.layers.Dense) and layer.units == 1:
        use_bias = layer.use_bias
    else:
        return None
    if use_bias:
        design = np.concatenate([np.ones((len(design), 1)), design], axis=1)
    if design.shape[1] > MAX_GLM_COLUMNS:
        return None
    return design


def fit_glm(family, design, y, offset=None, params=None, max_iter=25, weights=None):
    """Maximum-likelihood GLM by Newton's method with step halving (float64).

    Starts from (weighted) least squares of the linked, slightly shrunk response
    (R's `mustart`), so non-canonical links start inside their domain. The
    derivatives are the family's own (`Family.log_prob_derivatives`); `weights`
    are prior weights.

    Returns:
        `(beta, eta)`: coefficients and the fitted linear predictor.
    """
    y, trials = response_lib.split(np.asarray(y, dtype="float64"))
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, "float64")
    if family.name == "binomial":
        n = np.ones_like(y) if trials is None else trials
        start = (y + 0.5) / (n + 1.0)
    elif family.name in ("poisson", "negative_binomial", "nbinom1"):
        start = y + 0.1
    else:
        start = y
    eta_start = family.link(tf.constant(start)).numpy() - offset
    eta_start = np.where(np.isfinite(eta_start), eta_start, 0.0)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, "float64")
    root = np.sqrt(w)[:, None]
    beta = np.linalg.lstsq(root * design, root[:, 0] * eta_start, rcond=None)[0]
    if family.is_gaussian_identity:
        return beta, design @ beta + offset  # least squares is the GLM's ML fit
    params = {k: float(v) for k, v in (params or {}).items()}

    def derivatives(b):
        value, first, second, _ = family.log_prob_derivatives(y, design @ b + offset, params, trials=trials)
        return float(np.sum(w * value)), w * first, w * second

    b = np.asarray(beta, "float64")
    current, first, second = derivatives(b)
    if not np.isfinite(current):
        b = np.zeros_like(b)
        current, first, second = derivatives(b)
    for _ in range(max_iter):
        hessian = design.T @ (np.maximum(-second, 0.0)[:, None] * design)
        ridge = 1e-8 * max(1.0, float(np.max(np.abs(hessian)))) * np.eye(len(b))
        try:
            step = np.linalg.solve(hessian + ridge, design.T @ first)
        except np.linalg.LinAlgError:
            break
        start_b, improved = b, False
        for _ in range(30):
            b = start_b + step
            new, new_first, new_second = derivatives(b)
            if np.isfinite(new) and new >= current - 1e-12 * abs(current):
                improved = True
                break
            step = step / 2
        if not improved:
            b = start_b
            break
        done = abs(new - current) <= 1e-10 * (abs(current) + 1.0)
        current, first, second = new, new_first, new_second
        if done:
            break
    return b, design @ b + offset


def _row_sample(x, y, max_rows, seed=0):
    """`(x, y)` itself, or a seeded uniform sample of `max_rows` of its rows."""
    num_rows = len(y)
    if num_rows <= max_rows:
        return x, y
    rows = np.sort(np.random.default_rng(seed).choice(num_rows, max_rows, replace=False))
    return {key: np.asarray(value)[rows] for key, value in x.items()}, np.asarray(y)[rows]


def initialize(model, x, y, max_rows=GLM_SAMPLE_ROWS):
    """Sets a GLMM's weights to a data-driven starting point (see module docstring).

    Data of more than `max_rows` rows start from a uniform sample of them.
    """
    x, y = _row_sample(x, y, max_rows)
    family = model.family
    y64 = np.asarray(y, dtype="float64")
    response, trials = response_lib.split(y64)
    params = family.default_params(response, trials)
    params.update(model.head.fixed_params)
    design = _glm_design(model, x)
    eta = None
    if design is not None:
        beta, eta = fit_glm(family, design, y64, x.get("offset"), params,
                            weights=response_lib.prior_weights(x))
        layer = model.fixed_effects
        if isinstance(layer, VariationalFixedEffects):
            layer.set_coefficients(beta)
        else:
            weights = [beta[1:, None], beta[:1]] if layer.use_bias else [beta[:, None]]
            layer.set_weights([w.astype(layer.variable_dtype) for w in weights])

    # The spread of the linear predictor that random effects explain: on the
    # response scale for an identity link (the GLM's residual sd); 1 on the scale
    # of the log, logit, probit and cloglog links; for an inverse link, whose eta
    # is 1/mu (1e-3 for reaction times in ms), the GLM's eta in root mean square,
    # so that a sd of half of it is a relative change of the mean of about half,
    # as 0.5 is for a log link. Half of it starts every random intercept's sd.
    if family.link.name == "identity" and eta is not None:
        resid = response - eta
        w = response_lib.prior_weights(x)
        spread = float(np.sqrt(np.mean(resid**2 if w is None else w * resid**2)))
        if family.name == "gaussian":
            params["scale"] = spread
    elif not family.link.unit_scale and eta is not None:
        spread = float(np.sqrt(np.mean(np.square(eta))))
    else:
        spread = 1.0
    spread = spread if np.isfinite(spread) and spread > 0 else 1.0
    model.head.set_params({k: v for k, v in params.items() if k not in model.head.fixed_params})
    zero_inflation = getattr(model, "zero_inflation", None)
    if zero_inflation is not None:
        # Zero-inflation coefficients: the marginal moments' constant pi, projected on x_zi.
        x_zi = np.asarray(x["x_zi"], dtype="float64")
        constant = np.full(len(x_zi), np.log(params["zi_odds"]))
        gamma = np.linalg.lstsq(x_zi, constant, rcond=None)[0]
        zero_inflation.set_weights([gamma.reshape(zero_inflation.kernel.shape).astype(zero_inflation.variable_dtype)])
    for layer in model.terms:
        scales = []
        if layer.intercept:
            scales.append(0.5 * spread)
        if layer.num_covariates:
            z = np.asarray(x[layer.name + "_z"], dtype="float64")
            sd = np.sqrt(np.mean(z**2, axis=0))  # about zero: a slope's typical size
            sd = np.where(sd > 0, sd, 1.0)
            scales.extend(0.5 * spread / sd)
        layer.set_effect_scale(scales, reset=True)


def start_posterior_scales(model, x, y, max_rows=100_000):
    """Starts each level's posterior sds at their Laplace value for the current state.

    Natural-gradient steps (`SparseAdam(natural_step=...)`) scale each level's step
    by its posterior covariance, which must then be about right from the first step:
    a level with 800,000 rows whose posterior sd still has its starting value (half
    the prior sd) would overshoot by a factor of thousands. For effect `k` of level
    `j` with `n_j` rows the Laplace (Gauss-Newton) precision is

    ```
    1 / sd_jk^2 = n_j * w * mean(z_k^2) + 1 / tau_k^2
    ```

    with `w = -E[d^2 log p(y | eta) / d eta^2]` averaged over (up to `max_rows`)
    training rows at the current linear predictor, and `tau_k` the prior sd.
    Correlations start at zero. Only mean-field `RandomEffects` layers are set.
    """
    xs, ys = _row_sample(x, y, max_rows)
    ys = tf.constant(ys, model.compute_dtype)
    pred = model(xs, training=False)
    # A watched tensor, not a tf.Variable: under a distribution strategy's scope a
    # variable would be a distributed one, which a tape cannot watch outside a replica.
    eta = tf.cast(pred["eta"], model.compute_dtype)
    with tf.GradientTape() as outer:
        outer.watch(eta)
        with tf.GradientTape() as inner:
            inner.watch(eta)
            ell = tf.reduce_sum(model.expected_log_likelihood(ys, {**pred, "eta": eta}))
        # Rows are independent: d/d eta_i of sum_j grad_j is the i-th second derivative.
        grad_sum = tf.reduce_sum(inner.gradient(ell, eta))
    curvature = outer.gradient(grad_sum, eta).numpy()
    weight = float(np.mean(-curvature[np.isfinite(curvature)]))
    if not np.isfinite(weight) or weight <= 0:
        return
    for layer in model.terms:
        z2 = [1.0] if layer.intercept else []
        if layer.num_covariates:
            z = np.asarray(xs[layer.name + "_z"], dtype="float64")
            z2.extend(np.mean(z**2, axis=0))
        counts = layer.level_counts.numpy().astype("float64")[:, None]
        tau = np.asarray(layer.prior_stddev(), dtype="float64")
        scale = np.asarray(layer.effect_scale, dtype="float64")
        sd = 1.0 / np.sqrt(counts * weight * np.asarray(z2) + 1.0 / tau**2)  # (levels, k)
        raw_sd = softplus_inverse(np.maximum(sd / scale - 1e-6, 1e-12))
        if layer.num_effects == 1:
            layer.posterior_scale_tril.assign(raw_sd.astype(layer.variable_dtype))
        else:
            diag = np.zeros(counts.shape[:1] + (layer.num_effects,) * 2)
            idx = np.arange(layer.num_effects)
            diag[:, idx, idx] = raw_sd
            packed = triangular.fill_triangular_inverse(diag)
            layer.posterior_scale_tril.assign(packed.astype(layer.variable_dtype))
