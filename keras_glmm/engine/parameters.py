"""The outer parameters of a GLMM as one vector: covariance factors, dispersions, zero-inflation.

The optimizer (`keras_glmm.engine.quasi_newton`) sees one vector: the free entries
of each term's lower-triangular relative covariance factor `Lambda_t` (its diagonal
bounded below by 0, lme4's `theta`), then the logarithms of the dispersion
parameters the fit estimates, then, with a zero-inflation design `X_zi` (glmmTMB's
`ziformula` with covariates), its coefficients `gamma`, unbounded.
"""

import math

import numpy as np


def semidefinite_cholesky(sigma):
    """Lower-triangular `L` with `L L' = sigma`, a column of zeros at each zero pivot."""
    k = len(sigma)
    out = np.zeros_like(sigma)
    for j in range(k):
        pivot = sigma[j, j] - out[j, :j] @ out[j, :j]
        if pivot <= 1e-14 * max(np.max(np.abs(np.diag(sigma))), 1e-300):
            continue
        out[j, j] = math.sqrt(pivot)
        out[j + 1:, j] = (sigma[j + 1:, j] - out[j + 1:, :j] @ out[j, :j]) / out[j, j]
    return out


def check_zi_design(zi_design, family, fixed_params, num_rows):
    """`zi_design` as float64 `(n, q)`, or a ValueError saying what is wrong with it."""
    if "zi_odds" not in family.dispersion_params:
        raise ValueError(f"`zi_design` needs a zero-inflated family; {family.name!r} is not one.")
    if "zi_odds" in fixed_params:
        raise ValueError("`zi_design` and a fixed `zi_odds` exclude each other.")
    zi = np.asarray(zi_design, dtype=np.float64)
    if zi.ndim != 2 or len(zi) != num_rows or not zi.shape[1]:
        raise ValueError(f"`zi_design` must be ({num_rows}, q) with q >= 1. Received shape {zi.shape}.")
    rank = np.linalg.matrix_rank(zi)
    if rank < zi.shape[1]:
        raise ValueError(f"`zi_design` has rank {rank} with {zi.shape[1]} columns: its coefficients are not "
                         "identified (drop the columns that are linear combinations of the others).")
    return zi


class Parameters:
    """Packs the lower-triangular factors `Lambda_t` (and log-dispersions) into a vector.

    With a zero-inflation design `X_zi` (glmmTMB's `ziformula` with covariates) the
    vector ends with its coefficients `gamma`, unbounded, and the family's `zi_odds`
    is one value per row, `log(zi_odds_i) = logit(pi_i) = x_zi,i' gamma`.

    Args:
        blocks: the random terms' `Block`s, in the engine's order.
        dispersion_names: the dispersion parameters the fit estimates.
        zi_design: `(n, q)` zero-inflation design, or None.
    """

    def __init__(self, blocks, dispersion_names=(), zi_design=None):
        # `Lambda_t = unit * vector entries`: the optimizer sees entries of order 1
        # whatever the link's units (see `VariationalSolver.start`).
        self.unit = 1.0
        self.slices, self.positions, lower = [], [], []
        start = 0
        for block in blocks:
            k = block.num_effects
            rows, cols = np.tril_indices(k) if block.correlated else (np.arange(k), np.arange(k))
            self.positions.append((rows, cols))
            self.slices.append(slice(start, start + len(rows)))
            lower.extend(np.where(rows == cols, 0.0, -np.inf))
            start += len(rows)
        self.num_theta = start
        self.names = [f"Lambda[{block.name}]({r + 1},{c + 1})" for block, (rows, cols) in zip(blocks, self.positions)
                      for r, c in zip(rows, cols)]
        self.dispersion_names = list(dispersion_names)
        self.zi_design = zi_design
        self.num_zi = 0 if zi_design is None else zi_design.shape[1]
        lower.extend([-np.inf] * (len(self.dispersion_names) + self.num_zi))
        self.names += [f"log {name}" for name in self.dispersion_names] + [f"zi[{j}]" for j in range(self.num_zi)]
        self.lower = np.asarray(lower)
        self.blocks = blocks

    def lambdas(self, vector):
        """The factors `Lambda_t`, one `(k, k)` lower-triangular matrix per term."""
        out = []
        for block, entries, (rows, cols) in zip(self.blocks, self.slices, self.positions):
            factor = np.zeros((block.num_effects, block.num_effects))
            factor[rows, cols] = self.unit * vector[entries]
            out.append(factor)
        return out

    def dispersion(self, vector):
        """The dispersion parameters by name; with `X_zi`, `zi_odds` per row."""
        out = {name: math.exp(v) for name, v in zip(self.dispersion_names, vector[self.num_theta:])}
        if self.num_zi:
            with np.errstate(over="ignore"):  # pi = 1 exactly: the line search steps back
                out["zi_odds"] = np.exp(self.zi_design @ self.zi_coefficients(vector))
        return out

    def zi_coefficients(self, vector):
        """`gamma`, the last `num_zi` entries (of this vector, or of one with more before them)."""
        return vector[len(vector) - self.num_zi:]

    def pack(self, lambdas, dispersion=None, zi=None):
        """The vector of `lambdas`, `dispersion` (by name) and `zi` (`gamma`)."""
        parts = [factor[rows, cols] / self.unit for factor, (rows, cols) in zip(lambdas, self.positions)]
        parts.append([math.log(dispersion[name]) for name in self.dispersion_names])
        if self.num_zi:
            parts.append(np.asarray(zi, dtype=np.float64).reshape(self.num_zi))
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]) if parts else np.zeros(0)

    def gradient(self, lambda_gradients, dispersion_gradient=None):
        """Packs `d/d Lambda_t` matrices (and `d/d log dispersion`) like `pack`.

        With `X_zi`, `dispersion_gradient["zi_odds"]` is per row, in the rows' log-odds;
        the chain rule gives `d/d gamma = X_zi' (odds_i d ell_i / d odds_i)`.
        """
        parts = [self.unit * grad[rows, cols] for grad, (rows, cols) in zip(lambda_gradients, self.positions)]
        parts.append([dispersion_gradient[name] for name in self.dispersion_names])
        if self.num_zi:
            parts.append(self.zi_design.T @ dispersion_gradient["zi_odds"])
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])

    def canonical(self, vector):
        """The same covariances `Lambda_t Lambda_t'` with a zero column under each zero diagonal.

        The objective depends on `Lambda_t` only through `Lambda_t Lambda_t'` (the
        posterior of `u` turns with it), and at `Lambda_jj = 0` the entries below
        it are not unique: the Cholesky factor of a semidefinite matrix that skips
        zero pivots puts them in the later columns. The bounded optimizer probes
        an sd at 0 from here (see `quasi_newton`).
        """
        out = []
        for factor in self.lambdas(vector):
            out.append(semidefinite_cholesky(factor @ factor.T) if np.any(np.diag(factor) == 0) else factor)
        return self.pack(out, self.dispersion(vector), self.zi_coefficients(vector))
