"""Gauss-Hermite rules for expectations under a standard normal.

With the probabilists' Hermite nodes ``x_k`` and weights ``w_k`` normalised to
sum to one, ``E[f(z)] ~= sum_k w_k f(x_k)`` for ``z ~ N(0, 1)``, exact for
polynomials of degree ``< 2 G`` (``G`` nodes). Product grids extend the rule to
``N(0, I_dim)``. The families' expected log-likelihoods, the engine's adaptive
quadrature and the random-effects layers' scale expectations all use these
(numpy only: each caller makes its own tensors).

How many nodes a row needs (:func:`nodes_for_sd`): for ``f`` analytic in the strip
``|Im eta| < d`` about the real axis (the logit's log-likelihood
``y eta - log(1 + e^eta)``, singular at ``eta = i pi``: ``d = pi``), the error of
the ``K``-node rule for ``E[f(m + sd z)]`` is ``K! / (2K)! f^(2K)(xi) sd^(2K)``,
and ``|f^(2K)| <= 2 (2K - 1)! / d^(2K)`` (the two nearest poles), so

```
|error| <= (K - 1)! (sd / d)^(2K)
```

which for small ``sd`` needs far fewer nodes than a family's default: rows of
large clusters (posterior sds of eta of 0.05-0.3) need 3-7 nodes for 1e-11,
against the logit's 12. (Measured against 60 nodes for ``|m| <= 3``: the bound
holds with a factor 1.2-5 to spare for ``K <= 6``, more beyond; the plain
``(sd / d)^(2K)`` is short by ``(K - 1)!``.)
"""

import functools
import math

import numpy as np
import scipy.linalg

# The strip of analyticity of the logit's log-likelihood: `log(1 + e^eta)` is singular at `eta = i pi`.
LOGIT_HALF_WIDTH = math.pi
# Node counts are chosen for this multiple of the largest sd, and raised only when
# the sd outgrows it: callers keep one rule (one smooth objective) over many steps.
NODES_MARGIN = 1.5


def nodes_for_sd(sd, most_nodes, error, half_width=LOGIT_HALF_WIDTH):
    """The fewest nodes whose error bound `(K - 1)! (sd / d)^(2K)` (module docstring) is at most `error`.

    For a posterior sd of eta, a number or an array of them (one count each); at
    least 3, at most `most_nodes` (the family's own rule, as given where the
    bound allows no fewer). `K` nodes serve up to the sd `d (error / (K - 1)!)^(1 / 2K)`.
    """
    counts = np.arange(3, int(most_nodes))
    largest_sds = half_width * np.exp((math.log(error) - np.array([math.lgamma(k) for k in counts])) / (2 * counts))
    nodes = np.minimum(3 + np.searchsorted(np.maximum.accumulate(largest_sds), sd), int(most_nodes))
    return int(nodes) if np.ndim(nodes) == 0 else nodes


@functools.cache
def rule(num_points):
    """Nodes ``x`` and weights ``w`` (summing to 1) of the ``num_points``-node rule.

    numpy's ``hermegauss``, whose weights overflow beyond about 150 nodes: use
    :func:`log_rule` there.
    """
    x, w = np.polynomial.hermite_e.hermegauss(int(num_points))
    return x, w / w.sum()


@functools.cache
def log_rule(num_points):
    """Nodes and log weights (weights summing to 1), for any number of nodes.

    :func:`rule` up to 100 nodes; beyond, where its weights overflow (NaN from
    about 150): the nodes are the eigenvalues of the Jacobi matrix (off-diagonal
    ``sqrt(k)``), and the weights ``1 / (G p_{G-1}(x)^2)`` with ``p_k`` the
    orthonormal polynomials, by their recurrence rescaled at each step and taken
    in logarithms (the outer weights are below 1e-300; an eigenvector's tiny
    components, Golub & Welsch's weights, are only accurate to 1e-16 absolute and
    would overweight the outer nodes by e^50).
    """
    if num_points <= 100:
        x, w = rule(num_points)
        return x, np.log(w)
    x = scipy.linalg.eigh_tridiagonal(np.zeros(num_points), np.sqrt(np.arange(1.0, num_points)),
                                      eigvals_only=True)
    previous, current, log_scale = np.zeros_like(x), np.ones_like(x), np.zeros_like(x)
    for k in range(num_points - 1):  # p_{k+1} = (x p_k - sqrt(k) p_{k-1}) / sqrt(k + 1)
        previous, current = current, (x * current - math.sqrt(k) * previous) / math.sqrt(k + 1)
        big = np.maximum(np.abs(current), 1.0)
        previous, current, log_scale = previous / big, current / big, log_scale + np.log(big)
    return x, -math.log(num_points) - 2.0 * (np.log(np.abs(current)) + log_scale)


def product_grid(num_points, dim, log_weights=False):
    """The product rule for ``N(0, I_dim)``: nodes ``(G^dim, dim)`` and weights ``(G^dim,)``.

    Each node's weight is the product of its coordinates' weights, or with
    ``log_weights`` the sum of their log weights (:func:`log_rule`, any ``G``).
    """
    x, weights = log_rule(num_points) if log_weights else rule(num_points)
    nodes = np.stack([g.reshape(-1) for g in np.meshgrid(*([x] * dim), indexing="ij")], axis=-1)
    per_dim = np.stack([g.reshape(-1) for g in np.meshgrid(*([weights] * dim), indexing="ij")], axis=-1)
    return nodes, (np.sum(per_dim, axis=-1) if log_weights else np.prod(per_dim, axis=-1))
