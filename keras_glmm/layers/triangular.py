"""Lower-triangular packings in numpy, laid out exactly as TensorFlow Probability's.

The layers store Cholesky factors as unconstrained vectors: a posterior's factor in
`tfp.math.fill_triangular`'s order, a prior's correlation factor through
`tfb.CorrelationCholesky`. The training graph uses those TFP ops; outside it
(results, starting values, the engine writing its estimates) these numpy twins do
the same without an eager TensorFlow call per use (milliseconds each, which add up
over a fit's epochs). Tests check them against TFP.
"""

import functools

import numpy as np


def _size(m):
    n = int(round((np.sqrt(8 * m + 1) - 1) / 2))
    if n * (n + 1) // 2 != m:
        raise ValueError(f"A packed triangle has n(n+1)/2 entries. Received {m}.")
    return n


def fill_triangular(x):
    """`(..., n(n+1)/2) -> (..., n, n)` lower triangle, as `tfp.math.fill_triangular`."""
    x = np.asarray(x)
    n = _size(x.shape[-1])
    full = np.concatenate([x[..., n:], x[..., ::-1]], axis=-1).reshape(x.shape[:-1] + (n, n))
    return np.tril(full)


@functools.lru_cache(maxsize=None)
def _positions(n):
    """Rows, columns and vector positions of the lower triangle of an `n x n` matrix."""
    index = fill_triangular(np.arange(n * (n + 1) // 2))
    rows, cols = np.tril_indices(n)
    return rows, cols, index[rows, cols]


def fill_triangular_inverse(matrix):
    """`(..., n, n) -> (..., n(n+1)/2)`, as `tfp.math.fill_triangular_inverse` (lower)."""
    matrix = np.asarray(matrix)
    n = matrix.shape[-1]
    rows, cols, where = _positions(n)
    out = np.empty(matrix.shape[:-2] + (len(where),), dtype=matrix.dtype)
    out[..., where] = matrix[..., rows, cols]
    return out


def correlation_cholesky(raw):
    """Unconstrained `(k(k-1)/2,)` -> the Cholesky factor of a correlation matrix, as
    `tfb.CorrelationCholesky().forward`: fill the strictly lower triangle, unit
    diagonal, rows normalized."""
    raw = np.asarray(raw, dtype=np.float64)
    k = _size(raw.shape[-1]) + 1
    tril = np.zeros(raw.shape[:-1] + (k, k))
    tril[..., 1:, :-1] = fill_triangular(raw)
    idx = np.arange(k)
    tril[..., idx, idx] = 1.0
    return tril / np.linalg.norm(tril, axis=-1, keepdims=True)


def correlation_cholesky_inverse(tril):
    """The inverse of `correlation_cholesky` (`tfb.CorrelationCholesky().inverse`)."""
    tril = np.asarray(tril, dtype=np.float64)
    scaled = tril / np.diagonal(tril, axis1=-2, axis2=-1)[..., None]
    return fill_triangular_inverse(scaled[..., 1:, :-1])
