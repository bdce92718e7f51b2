"""The exact marginal likelihood of a GLMM by adaptive Gauss-Hermite quadrature.

For binary and count data Gaussian VI is a lower bound with a bias, and Laplace's
approximation (lme4, glmmTMB) another one: for binary data in clusters of a few rows
Laplace halves the variance components, and VI gets only part of the way back
(guimmun: mothers' sd 1.13 by Laplace, 1.83 by VI, 2.32 at the exact ML). Where the
random effects factorize into low-dimensional integrals the exact log-likelihood is
cheap: adaptive Gauss-Hermite quadrature (AGQ; Pinheiro & Bates 1995, lme4's
`nAGQ`), centred at each integrand's mode and scaled by its curvature there, is
exact to the number of nodes. Two designs qualify here:

- **one term** (`k <= 2` effects): `L = prod_c int N(u; 0, I) prod_{i in c} p(y_i | eta_i) du`,
  a `k`-dimensional rule per level;
- **two scalar nested terms** (each level of the first, e.g. mothers, lies in one
  level of the second, e.g. communities): per outer level a rule centred at the
  joint mode and scaled by the Schur complement of the inner levels, each of its
  nodes holding one inner rule per inner level, centred at the inner level's mode
  given the outer node (nested AGQ).

In lme4's spherical coordinates (`b = Lambda u`, `u ~ N(0, I)`) the log-likelihood's
gradient is, by Fisher's identity, the posterior expectation of the complete-data
score, `E[d log p(y | u) / d params]`, here with the rule's nodes and posterior
weights: one evaluation gives both, for a quasi-Newton ascent from the Gaussian
VI fit (`keras_glmm.engine.solver`).

**"Exact to the number of nodes" is checked, not assumed.** A rule of `G` nodes
integrates `N(u) * poly(u)` of degree `2G - 1` exactly; the integrand here is a
Gaussian times a likelihood, and where the posterior is far from Gaussian (binary
data, one to four rows per level, an sd of 7: guPrenat's mothers) a 25-node rule
is nats off and its optimum is not the ML. `points` holds the nodes per dimension
(one term: one count; nested: outer, inner), and the solver raises them
(`next_points`) until the log-likelihood and its gradient stop moving.

**Cost.** One evaluation touches every row at every node: `rows x nodes` entries
(`nodes = G^k`, or `outer x inner` nested), `BYTES_PER_NODE` bytes each at the
peak. The clusters (levels, or outer levels when nested) are independent, so an
evaluation runs over groups of clusters whose entries fit `memory_budget`
(`chunks`): the peak is one group's, never the whole, and a cluster that alone
exceeds the budget is refused (`ValueError` naming it) rather than allocated.
"""

import math

import numpy as np
import scipy.sparse as sp
from scipy.special import logsumexp

from keras_glmm import gauss_hermite

# Peak bytes one evaluation holds per row and node (float64 arrays alive at once:
# the linear predictor, the family's value and derivatives with their
# temporaries, the posterior weights and their products), measured with
# tracemalloc on binomial logit models: 57 for one term with k = 2, 62 nested;
# with a margin.
BYTES_PER_NODE = 80


def _rule(num_points, dim):
    """Probabilists' Gauss-Hermite product rule: nodes `(G^dim, dim)`, log weights + |t|^2/2."""
    nodes, logw = gauss_hermite.product_grid(int(num_points), dim, log_weights=True)
    return nodes, logw + 0.5 * np.sum(nodes**2, axis=-1)


def next_points(points):
    """The next rung of the node ladder: `2 G + 1` (odd, so the mode stays a node)."""
    return 2 * int(points) + 1


def design_of(structure):
    """`"single"`, `"nested"` or None: whether the model's integrals factorize (see module doc)."""
    blocks = structure.random_blocks
    if len(blocks) == 1 and blocks[0].num_effects <= 2:
        return "single"
    if len(blocks) == 2 and blocks[0].num_effects == 1 and blocks[1].num_effects == 1:
        pair = structure.pairs[0, 1]
        if pair.num_pairs == blocks[0].num_levels:  # each inner level in one outer level
            return "nested"
    return None


def _indicator(segment, num_segments):
    """The `(num_segments, n)` 0/1 matrix summing rows by segment."""
    n = len(segment)
    return sp.csr_matrix((np.ones(n), (segment, np.arange(n))), shape=(num_segments, n))


def _segment(indicator, values):
    """`indicator @ values` over the first axis of `values` `(n, ...)`."""
    out = indicator @ values.reshape(values.shape[0], -1)
    return np.asarray(out).reshape((indicator.shape[0],) + values.shape[1:])


class _Chunk:
    """A group of clusters and their rows, with what an evaluation reads of them."""

    def __init__(self, quadrature, first, last, rows):
        q = quadrature
        self.rows = rows
        self.clusters = slice(first, last)
        self.x = q.x[rows]
        self.y = q.y[rows]
        self.trials = None if q.trials is None else q.trials[rows]
        self.weights = q.weights[rows]
        if q.kind == "single":
            self.g = q.inner.index[rows] - first
            self.z = q.inner.z[rows]
            self.levels = _indicator(self.g, last - first)
        else:
            lo, hi = q._inner_start[first], q._inner_start[last]
            self.inner = q._inner_order[lo:hi]  # the inner levels whose parent is in the chunk
            self.gi = q._inner_rank[q.inner.index[rows]] - lo
            self.go = q.outer.index[rows] - first
            self.parent = q.parent[self.inner] - first
            self.zi = q.inner.z[rows, 0]
            self.zo = q.outer.z[rows, 0]
            self.by_inner = _indicator(self.gi, hi - lo)
            self.by_outer = _indicator(self.go, last - first)
            self.by_parent = _indicator(self.parent, last - first)


class AdaptiveQuadrature:
    """The log-likelihood and its gradient for a `Structure` whose `design_of` is not None.

    Args:
        structure: the model's `Structure`.
        family: a `keras_glmm.families.Family`.
        y, trials, weights, offset: the response, binomial trials, prior weights and
            offset per row (arrays or None).
        num_points: nodes per dimension: a count for all, or one per dimension
            (`dimensions`: the term; nested, the outer then the inner term).
        memory_budget: bytes an evaluation's `(rows, nodes)` arrays may take at
            once (None: no limit); see `chunks`.
    """

    def __init__(self, structure, family, y, trials=None, weights=None, offset=None, num_points=25,
                 memory_budget=None):
        self.kind = design_of(structure)
        if self.kind is None:
            raise ValueError("Adaptive quadrature needs one term or two nested scalar terms.")
        self.structure = structure
        self.family = family
        self.y = np.asarray(y, np.float64)
        self.trials = None if trials is None else np.asarray(trials, np.float64)
        n = structure.num_rows
        self.weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        self.offset = np.zeros(n) if offset is None else np.asarray(offset, np.float64)
        self.memory_budget = memory_budget
        blocks = structure.random_blocks
        self.inner = blocks[0]
        self.x = structure.fixed_block.z
        if self.kind == "nested":
            self.outer = blocks[1]
            pair = structure.pairs[0, 1]
            parent = np.empty(self.inner.num_levels, np.int64)
            parent[pair.levels_first] = pair.levels_second
            self.parent = parent
            self._inner_order = np.argsort(parent, kind="stable")
            self._inner_rank = np.empty_like(self._inner_order)
            self._inner_rank[self._inner_order] = np.arange(len(parent))
            self._inner_start = np.concatenate(
                [[0], np.cumsum(np.bincount(parent, minlength=self.outer.num_levels))])
            self.dimensions = [self.outer.name, self.inner.name]
            self.cluster = self.outer.index
        else:
            self.dimensions = [self.inner.name]
            self.cluster = self.inner.index
        self.num_clusters = int(self.cluster.max()) + 1 if n else 0
        self.cluster_rows = np.bincount(self.cluster, minlength=self.num_clusters)
        self._row_order = np.argsort(self.cluster, kind="stable")
        self._cluster_start = np.concatenate([[0], np.cumsum(self.cluster_rows)])
        self.points = None
        self.set_points(num_points)
        self.modes = None  # warm starts of the modes

    # ------------------------------------------------------------ the rule's size
    def set_points(self, points):
        """Sets the nodes per dimension (a count, or one per dimension)."""
        points = [int(points)] * len(self.dimensions) if np.ndim(points) == 0 else [int(p) for p in points]
        if len(points) != len(self.dimensions) or min(points) < 1:
            raise ValueError(f"`points` must be one positive count per dimension {self.dimensions}. "
                             f"Received {points}.")
        if points != self.points:
            self.points = points
            self._chunks = None

    def nodes_per_row(self, points=None):
        """Nodes each row is evaluated at: `G^k` for one term, `outer x inner` nested."""
        points = self.points if points is None else points
        if self.kind == "single":
            return int(points[0]) ** self.inner.num_effects
        return int(points[0]) * int(points[1])

    def nodes_per_evaluation(self, points=None):
        """Rows times nodes per row of one evaluation: what a log-likelihood costs."""
        return self.structure.num_rows * self.nodes_per_row(points)

    def bytes_per_evaluation(self, points=None):
        """Peak bytes of one evaluation over all rows at once (no chunks)."""
        return BYTES_PER_NODE * self.nodes_per_evaluation(points)

    def largest_cluster_bytes(self, points=None):
        """Peak bytes of the largest cluster's rows: the least a chunk needs."""
        most = int(self.cluster_rows.max()) if len(self.cluster_rows) else 0
        return BYTES_PER_NODE * most * self.nodes_per_row(points)

    def chunks(self):
        """Groups of consecutive clusters whose `rows x nodes` entries fit `memory_budget`."""
        if self._chunks is not None:
            return self._chunks
        per_row = BYTES_PER_NODE * self.nodes_per_row()
        limit = math.inf if self.memory_budget is None else self.memory_budget // per_row
        counts = self.cluster_rows
        if len(counts) and counts.max() > limit:
            big = int(np.argmax(counts))
            name = self.dimensions[0]
            raise ValueError(
                f"Adaptive quadrature with {self.points} nodes needs {counts.max() * per_row / 2**20:.1f} MiB "
                f"for the {counts.max()} rows of level {big} of '{name}' alone, more than "
                f"memory_budget={self.memory_budget}: raise `memory_budget` or lower `agq_points`.")
        chunks, first, rows = [], 0, 0
        for c in range(self.num_clusters):
            if rows + counts[c] > limit and c > first:
                chunks.append(self._chunk(first, c))
                first, rows = c, 0
            rows += counts[c]
        if self.num_clusters:
            chunks.append(self._chunk(first, self.num_clusters))
        self._chunks = chunks
        return chunks

    def _chunk(self, first, last):
        rows = self._row_order[self._cluster_start[first]:self._cluster_start[last]]
        return _Chunk(self, first, last, rows)

    # ------------------------------------------------------------ the family
    def _log_p(self, eta, y, trials, w, params):
        """Weighted `log p`, `d/d eta`, `d2/d eta2` at `eta` `(m, ...)` for rows `y` `(m,)`,
        and the parameters' gradients per entry (weighted, not summed)."""
        shape = (len(y),) + (1,) * (eta.ndim - 1)
        params = {k: np.reshape(v, shape) if np.ndim(v) else v for k, v in (params or {}).items()}
        y, w = y.reshape(shape), w.reshape(shape)
        trials = None if trials is None else trials.reshape(shape)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            value, first, second, grads = self.family._numpy_log_prob(y, eta, params, trials)
        return w * value, w * first, w * second, {k: w * g for k, g in grads.items()}

    def _row_log_p(self, eta, params):
        """`_log_p` for all rows at one point each (the modes' Newton steps)."""
        rows_params = params
        return self._log_p(eta, self.y, self.trials, self.weights, rows_params)

    @staticmethod
    def _chunk_params(params, rows):
        return {k: v[rows] if np.ndim(v) else v for k, v in (params or {}).items()}

    # ------------------------------------------------------------ evaluation
    def log_likelihood(self, beta, lambdas, params):
        """`(log L, gradient)`, the gradient a dict: `beta` `(p,)`, `lambdas` (one `(k, k)`
        per term), `params` (by name); and the levels' posterior moments in `u`."""
        if not self.family._has_numpy_kernel():
            raise ValueError(f"Adaptive quadrature needs the {self.family.name} family's numpy kernel.")
        eta0 = self.offset + self.x @ beta
        if self.kind == "single":
            value, grads = self._single(eta0, lambdas[0], params)
        else:
            value, grads = self._nested(eta0, lambdas[0], lambdas[1], params)
        # What prior weights add beside w * log p (the gaussian's precisions) does
        # not depend on the random effects: it leaves the integrals.
        extra = self.family._weight_terms(self.weights, params, np)
        if extra is not None:
            value += float(np.sum(extra[0]))
            grads["expected_log_likelihood"] += float(np.sum(extra[0]))
            for k, g in extra[1].items():
                grads["params"][k] = grads["params"].get(k, 0.0) + float(np.sum(g))
        return value, grads

    @staticmethod
    def _add_param_grads(out, grads, weight, rows, num_rows):
        """Adds `sum_nodes weight * grad` per parameter: per row where it varies by row."""
        axes = tuple(range(1, weight.ndim))
        for k, g in grads.items():
            per_entry = np.sum(np.broadcast_to(g, weight.shape) * weight, axis=axes)
            if np.ndim(g) and g.shape[0] == len(rows) and k in out.get("_per_row", ()):
                out[k][rows] += per_entry
            else:
                out[k] = out.get(k, 0.0) + float(np.sum(per_entry))

    def _param_sink(self, params):
        """Gradient accumulators: an array per row for per-row parameters, else 0."""
        per_row = [k for k, v in (params or {}).items() if np.ndim(v)]
        sink = {k: np.zeros(self.structure.num_rows) for k in per_row}
        sink["_per_row"] = set(per_row)
        return sink

    def _single_modes(self, eta0, zl, params):
        """Each level's mode of `log p(y, u)` and the Cholesky factor of its curvature there."""
        block = self.inner
        k, L = block.num_effects, block.num_levels
        g = block.index
        u = self.modes if self.modes is not None and np.shape(self.modes) == (L, k) else np.zeros((L, k))

        def log_joint(u):
            value, first, second, _ = self._row_log_p(eta0 + np.sum(zl * u[g], 1), params)
            per_level = np.bincount(g, value, minlength=L) - 0.5 * np.sum(u**2, 1)
            return per_level, first, second

        # Newton per level, halving the step of a level whose log density drops.
        current, first, second = log_joint(u)
        for _ in range(50):
            grad = np.stack([np.bincount(g, first * zl[:, a], minlength=L) for a in range(k)], 1) - u
            hess = np.eye(k) + _segment_outer(g, L, np.maximum(-second, 0.0), zl)
            step = np.linalg.solve(hess, grad[..., None])[..., 0]
            scale = np.ones(L)
            for _ in range(30):
                trial = u + scale[:, None] * step
                new, new_first, new_second = log_joint(trial)
                worse = new < current - 1e-12 * np.abs(current)
                if not worse.any():
                    break
                scale = np.where(worse, 0.5 * scale, scale)
            u, current, first, second = trial, new, new_first, new_second
            if np.max(np.abs(scale[:, None] * step)) < 1e-10:
                break
        self.modes = u
        hess = np.eye(k) + _segment_outer(g, L, np.maximum(-second, 0.0), zl)
        return u, np.linalg.cholesky(hess)  # H = R R'

    def _single(self, eta0, lam, params):
        block = self.inner
        k, L, p = block.num_effects, block.num_levels, self.x.shape[1]
        zl = block.z @ lam  # (n, k): z' Lambda
        u, chol = self._single_modes(eta0, zl, params)
        nodes, logw = _rule(self.points[0], k)
        total, ell = 0.0, 0.0
        grad_beta, grad_lam = np.zeros(p), np.zeros((k, k))
        sink = self._param_sink(params)
        mean, cov = np.zeros((L, k)), np.zeros((L, k, k))
        for c in self.chunks():
            levels, rows = c.clusters, c.rows
            # u(t) = mode + R^-T t, for the chunk's levels and every node: (Lc, T, k).
            shift = np.linalg.solve(np.swapaxes(chol[levels], 1, 2)[:, None], nodes[None, :, :, None])[..., 0]
            u_nodes = u[levels][:, None, :] + shift
            del shift
            zl_c = zl[rows]
            eta = eta0[rows][:, None] + zl_c[:, :1] * u_nodes[c.g, :, 0]
            for a in range(1, k):
                eta += zl_c[:, a:a + 1] * u_nodes[c.g, :, a]
            value, first, _, pgrads = self._log_p(eta, c.y, c.trials, c.weights, self._chunk_params(params, rows))
            del eta
            terms = logw[None, :] + _segment(c.levels, value) - 0.5 * np.sum(u_nodes**2, -1)  # (Lc, T)
            norm = logsumexp(terms, axis=1)
            total += float(np.sum(norm) - np.sum(np.log(np.diagonal(chol[levels], axis1=1, axis2=2))))
            post = np.exp(terms - norm[:, None])  # (Lc, T)
            row_post = post[c.g]  # (nc, T)
            ell += float(np.sum(row_post * value))
            del value
            weighted = row_post * first  # E[f'] per row and node
            del first
            grad_beta += c.x.T @ np.sum(weighted, 1)
            # d/dLambda[a, b] = sum_i z_ia E[f' u_b]: by level first, then over nodes.
            for a in range(k):
                by_level = _segment(c.levels, c.z[:, a:a + 1] * weighted)  # (Lc, T)
                grad_lam[a] += np.einsum("lt,ltb->b", by_level, u_nodes)
            self._add_param_grads(sink, pgrads, row_post, rows, len(eta0))
            del weighted, row_post, pgrads
            m = np.einsum("lt,ltk->lk", post, u_nodes)
            mean[levels] = m
            cov[levels] = np.einsum("lt,ltj,ltk->ljk", post, u_nodes, u_nodes) - m[:, :, None] * m[:, None, :]
        sink.pop("_per_row")
        return total, {"beta": grad_beta, "lambdas": [grad_lam], "params": sink,
                       "expected_log_likelihood": ell, "moments": [(mean, cov)]}

    def _nested_modes(self, eta0, zi, zo, params):
        """The joint mode of (inner, outer) and the curvatures there."""
        inner, outer = self.inner, self.outer
        Li, Lo = inner.num_levels, outer.num_levels
        gi, go = inner.index, outer.index
        parent = self.parent
        if self.modes is not None and len(self.modes[0]) == Li:
            ui, uo = self.modes
        else:
            ui, uo = np.zeros(Li), np.zeros(Lo)

        def log_joint(ui, uo):
            value, first, second, _ = self._row_log_p(eta0 + zi * ui[gi] + zo * uo[go], params)
            inner_part = np.bincount(gi, value, minlength=Li) - 0.5 * ui**2
            per_outer = np.bincount(parent, inner_part, minlength=Lo) - 0.5 * uo**2
            return per_outer, first, second

        def curvature(second):
            h = np.maximum(-second, 0.0)
            h_ii = 1.0 + np.bincount(gi, h * zi * zi, minlength=Li)
            h_io = np.bincount(gi, h * zi * zo, minlength=Li)
            h_oo = 1.0 + np.bincount(go, h * zo * zo, minlength=Lo)
            return h_ii, h_io, h_oo

        # Newton, the inner levels eliminated (a Schur complement per outer level).
        current, first, second = log_joint(ui, uo)
        for _ in range(50):
            g_i = np.bincount(gi, first * zi, minlength=Li) - ui
            g_o = np.bincount(go, first * zo, minlength=Lo) - uo
            h_ii, h_io, h_oo = curvature(second)
            schur = h_oo - np.bincount(parent, h_io**2 / h_ii, minlength=Lo)
            step_o = (g_o - np.bincount(parent, h_io * g_i / h_ii, minlength=Lo)) / schur
            step_i = (g_i - h_io * step_o[parent]) / h_ii
            scale = np.ones(Lo)
            for _ in range(30):
                t_o, t_i = uo + scale * step_o, ui + scale[parent] * step_i
                new, new_first, new_second = log_joint(t_i, t_o)
                worse = new < current - 1e-12 * np.abs(current)
                if not worse.any():
                    break
                scale = np.where(worse, 0.5 * scale, scale)
            ui, uo, current, first, second = t_i, t_o, new, new_first, new_second
            if max(np.max(np.abs(scale * step_o)), np.max(np.abs(scale[parent] * step_i))) < 1e-10:
                break
        self.modes = (ui, uo)
        h_ii, h_io, h_oo = curvature(second)
        schur = h_oo - np.bincount(parent, h_io**2 / h_ii, minlength=Lo)
        return ui, uo, h_ii, h_io, schur

    def _nested(self, eta0, lam_in, lam_out, params):
        inner, outer = self.inner, self.outer
        Li, Lo, p = inner.num_levels, outer.num_levels, self.x.shape[1]
        zi_all = inner.z[:, 0] * lam_in[0, 0]
        zo_all = outer.z[:, 0] * lam_out[0, 0]
        ui, uo, h_ii, h_io, schur = self._nested_modes(eta0, zi_all, zo_all, params)
        s_nodes, s_logw = _rule(self.points[0], 1)
        t_nodes, t_logw = _rule(self.points[1], 1)
        s_nodes, t_nodes = s_nodes[:, 0], t_nodes[:, 0]
        uo_nodes = uo[:, None] + s_nodes[None, :] / np.sqrt(schur)[:, None]  # (Lo, S)
        total, ell = 0.0, 0.0
        grad_beta, grad_in, grad_out = np.zeros(p), 0.0, 0.0
        sink = self._param_sink(params)
        mean_i, var_i, mean_o, var_o = np.zeros(Li), np.zeros(Li), np.zeros(Lo), np.zeros(Lo)
        for c in self.chunks():
            rows, outer_c, inner_c = c.rows, c.clusters, c.inner
            cp = self._chunk_params(params, rows)
            zi, zo = zi_all[rows], zo_all[rows]
            uo_c = uo_nodes[outer_c]  # (Loc, S)
            # Inner modes given each outer node: Newton from the joint mode's linear prediction.
            ratio = (h_io / h_ii)[inner_c]
            ui_s = ui[inner_c][:, None] - ratio[:, None] * (uo_c[c.parent] - uo[outer_c][c.parent][:, None])
            base = eta0[rows][:, None] + zo[:, None] * uo_c[c.go]  # (nc, S)
            for _ in range(50):
                _, first, second, _ = self._log_p(base + zi[:, None] * ui_s[c.gi], c.y, c.trials, c.weights, cp)
                grad = _segment(c.by_inner, first * zi[:, None]) - ui_s
                hess = 1.0 + _segment(c.by_inner, np.maximum(-second, 0.0) * (zi**2)[:, None])
                # Log-concave in u for the usual families; the step is capped for the others.
                step = np.clip(grad / hess, -3.0, 3.0)
                ui_s = ui_s + step
                if np.max(np.abs(step)) < 1e-10:
                    break
            _, _, second, _ = self._log_p(base + zi[:, None] * ui_s[c.gi], c.y, c.trials, c.weights, cp)
            h_s = 1.0 + _segment(c.by_inner, np.maximum(-second, 0.0) * (zi**2)[:, None])  # (Lic, S)
            ui_nodes = ui_s[:, :, None] + t_nodes[None, None, :] / np.sqrt(h_s)[:, :, None]  # (Lic, S, T)
            eta = base[:, :, None] + zi[:, None, None] * ui_nodes[c.gi]  # (nc, S, T)
            del base
            value, first, _, pgrads = self._log_p(eta, c.y, c.trials, c.weights, cp)
            del eta
            inner_terms = t_logw[None, None, :] + _segment(c.by_inner, value) - 0.5 * ui_nodes**2  # (Lic, S, T)
            inner_norm = logsumexp(inner_terms, axis=2)
            log_inner = inner_norm - 0.5 * np.log(h_s)  # (Lic, S)
            outer_terms = s_logw[None, :] + _segment(c.by_parent, log_inner) - 0.5 * uo_c**2  # (Loc, S)
            outer_norm = logsumexp(outer_terms, axis=1)
            total += float(np.sum(outer_norm - 0.5 * np.log(schur[outer_c])))
            post_o = np.exp(outer_terms - outer_norm[:, None])  # (Loc, S)
            post_t = np.exp(inner_terms - inner_norm[:, :, None])  # (Lic, S, T)
            del inner_terms
            weight = post_t[c.gi]
            weight *= post_o[c.go][:, :, None]  # (nc, S, T): posterior weight of each node
            ell += float(np.sum(weight * value))
            del value
            self._add_param_grads(sink, pgrads, weight, rows, len(eta0))
            del pgrads
            weighted = weight * first
            del weight, first
            grad_beta += c.x.T @ np.sum(weighted, axis=(1, 2))
            grad_in += float(np.sum(_segment(c.by_inner, inner.z[rows, 0][:, None, None] * weighted) * ui_nodes))
            grad_out += float(np.sum(_segment(c.by_outer, outer.z[rows, 0][:, None] * np.sum(weighted, 2)) * uo_c))
            del weighted
            inner_post = post_o[c.parent][:, :, None] * post_t  # (Lic, S, T)
            m = np.sum(inner_post * ui_nodes, axis=(1, 2))
            mean_i[inner_c] = m
            var_i[inner_c] = np.sum(inner_post * ui_nodes**2, axis=(1, 2)) - m**2
            m = np.sum(post_o * uo_c, 1)
            mean_o[outer_c] = m
            var_o[outer_c] = np.sum(post_o * uo_c**2, 1) - m**2
        sink.pop("_per_row")
        return total, {
            "beta": grad_beta,
            "lambdas": [np.array([[grad_in]]), np.array([[grad_out]])],
            "params": sink,
            "expected_log_likelihood": ell,
            "moments": [(mean_i[:, None], var_i[:, None, None]), (mean_o[:, None], var_o[:, None, None])],
        }


def _segment_outer(segment, num_segments, h, z):
    """`sum_i h_i z_i z_i'` per segment: `(num_segments, k, k)`."""
    k = z.shape[1]
    out = np.empty((num_segments, k, k))
    for a in range(k):
        for b in range(k):
            out[:, a, b] = np.bincount(segment, h * z[:, a] * z[:, b], minlength=num_segments)
    return out
