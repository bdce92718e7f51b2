"""The response of a GLMM as arrays: the one home of successes, trials and prior weights.

Conventions, everywhere in the package:

- `y` is `(n,)`, or `(n, 2)` holding `[successes, trials]` for a binomial response
  with trials (`cbind(s, f)`, or proportions with `weights`); without trials a
  binomial response is 0/1 (one trial);
- prior weights (lme4's `weights` for every family but a binomial proportion's)
  travel with the inputs as `x["weights"]` (or Keras's `sample_weight`): each row's
  log-likelihood is multiplied by its weight, so a gaussian row has variance
  `sigma^2 / w`.
"""

import numpy as np
import tensorflow as tf

WEIGHTS = "weights"  # the inputs' key of the prior weights


def split(y):
    """`(response, trials or None)` of a response array (numpy)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 2:
        return y[:, 0], y[:, 1]
    if y.ndim == 2 and y.shape[1] == 1:
        return y[:, 0], None
    return y, None


def split_tensor(y):
    """`split` for a tensor: `(n, 2)` -> successes and trials, else `(n,)` and None."""
    if len(y.shape) == 2 and y.shape[-1] == 2:
        return y[:, 0], y[:, 1]
    return tf.reshape(y, [-1]), None


def proportion(y):
    """The response on the mean's scale: successes / trials, or `y` itself (float64)."""
    response, trials = split(np.asarray(y, np.float64))
    return response if trials is None else response / trials


def prior_weights(x, num_rows=None):
    """The prior weights of inputs `x`, or None."""
    w = x.get(WEIGHTS) if isinstance(x, dict) else None
    return None if w is None else np.asarray(w, np.float64).reshape(-1)


def check_weights(weights, what="weights", labels=None):
    """Prior weights as float64 `(n,)`, finite and non-negative.

    Raises:
        ValueError: naming `what`, the first offending row (its label in `labels`,
            e.g. a data frame's index, else its position) and its value, and how
            many rows are affected.
    """
    w = np.asarray(weights, np.float64).reshape(-1)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = repr(labels[i]) if labels is not None else str(i)
        raise ValueError(
            f"{what} must be finite and non-negative: row {row} has {float(w[i])!r} "
            f"({int(bad.sum())} rows affected)."
        )
    return w
