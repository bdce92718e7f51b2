"""The blocked Cholesky factorization of a GLMM's precision matrix, and its selected inverse.

In the spherical coordinates `u` of lme4 (`b_t = Lambda_t u_t`, `u ~ N(0, I)`) a
Gaussian posterior over the random effects, and the fixed effects `beta` beside
them, has the precision

```
A = [ Lambda' Z' H Z Lambda + I    Lambda' Z' H X ]
    [ X' H Z Lambda                X' H X         ]
```

with `H` a diagonal of row weights (prior weights for a gaussian model, the
expected curvature of the log-likelihood otherwise). Its sparsity is that of the
model's blocks (`keras_glmm.engine.structure`): block 0, the random term with the
most coefficients, is block diagonal (`A00`, a `k0 x k0` block per level), and the
other terms with the fixed effects form a dense part `D`. The factorization is
MixedModels.jl's blocked Cholesky (Bates, Alday & Kokandakar; lme4's PLS, Bates et
al. 2015):

```
A00 = L00 L00'            (one small Cholesky per level)
F   = L00^-1 A0D          (sparse: a level of block 0 meets few columns of D)
S   = ADD - F' F = LD LD' (dense)
```

so `A = L L'` with `L = [[L00, 0], [F', LD]]`. Solves cost one pass over `F`
and two dense triangular solves.

The engine also needs entries of `A^-1` (posterior covariances), but only on the
*pattern* of the model: the diagonal blocks of every level and the blocks of pairs
of levels that occur in the same row (`Structure.pairs`). With `G = F S^-1`,

```
(A^-1)_0D = -L00^-T G,      (A^-1)_00 = L00^-T (I + G F') L00^-1,      (A^-1)_DD = S^-1
```

and a row of `G` is needed only on the columns its level of block 0 meets: level
`c` costs `n_c^2` products for its `n_c` columns (the *triples* below), not a
dense `K0 x q` matrix, unless the levels meet so many columns that the dense
product is the cheaper (`DENSE_G_SPEEDUP`). With `mode="random"` the same is
done for the random part only, `(A_uu)^-1`, whose Schur complement is the leading block of `S` (the fixed
effects come last): the posterior covariance of `u` when `beta` is a point
estimate.
"""

import numpy as np
import scipy.linalg


# A product of the dense `G = F S^-1` costs about this many times fewer seconds per
# multiply-add (BLAS) than one triple of the sparse one (gathers and bincounts).
DENSE_G_SPEEDUP = 100


class TooLarge(ValueError):
    """The blocks of a model exceed the memory budget of the engine."""


def _transform(factor_a, products, factor_b):
    """`Lambda_a' C Lambda_b` for every pair: `(P, ka, kb)`; `None` means the identity."""
    # Stacked matmuls, not einsum: numpy's einsum does not call BLAS for these.
    if factor_a is not None:
        products = np.matmul(factor_a.T, products) if factor_a.shape[0] > 1 else products * factor_a[0, 0]
    if factor_b is not None:
        products = np.matmul(products, factor_b) if factor_b.shape[0] > 1 else products * factor_b[0, 0]
    return products


class BlockedSystem:
    """Index maps of the blocked factorization of one `Structure`, built once.

    Args:
        structure: the model's `Structure`.
        memory_budget: bytes the dense part and the triples may take; beyond it
            `TooLarge` names the term at fault.
    """

    def __init__(self, structure, memory_budget=2 * 2**30):
        self.structure = structure
        blocks = structure.blocks
        self.has_diag = structure.num_random > 0
        first = 1 if self.has_diag else 0
        self.dense_blocks = list(range(first, len(blocks)))
        self.offsets = {}
        offset = 0
        for b in self.dense_blocks:
            self.offsets[b] = offset
            offset += blocks[b].size
        self.num_dense = offset
        self.num_fixed = structure.num_fixed
        self.num_dense_random = offset - self.num_fixed
        if self.has_diag:
            self.num_diag_levels = blocks[0].num_levels
            self.k0 = blocks[0].num_effects
        else:
            self.num_diag_levels, self.k0 = 0, 1
        dense_bytes = 3 * 8 * self.num_dense**2
        if dense_bytes > memory_budget:
            random_blocks = [blocks[b] for b in self.dense_blocks[:-1]]
            if random_blocks:
                largest = max(random_blocks, key=lambda blk: blk.size)
                culprit = (f"term '{largest.name}' alone has {largest.size:,} ({largest.num_levels:,} "
                           f"levels x {largest.num_effects})")
                if self.has_diag:
                    culprit += f" beside '{blocks[0].name}' ({blocks[0].size:,})"
            else:  # only the fixed effects are dense: the budget is below any model's
                culprit = f"the {self.num_fixed:,} fixed effects alone"
            raise TooLarge(
                f"The joint posterior needs a dense block of {self.num_dense:,} coefficients "
                f"({dense_bytes / 2**30:.1f} GiB, {dense_bytes:,} bytes; budget {memory_budget:,} bytes): "
                f"{culprit}."
            )
        self._build_entries()
        self._build_dense_positions()
        # `G` as a dense product where the levels of block 0 meet so many columns
        # that it is cheaper than the triples (a 1M-row crossed model: 68M triples,
        # 4.8 s per inverse, against 0.2 s for the product).
        dense_g_bytes = 2 * 8 * self.num_diag_levels * self.k0 * self.num_dense_random
        self.dense_g = bool(
            self.num_entries
            and dense_g_bytes <= memory_budget
            and self.num_diag_levels * self.num_dense_random**2 < DENSE_G_SPEEDUP * self.num_triples
        )
        # Each triple's two entries and its position in the inverse, as numpy's own index
        # type: gathers by int32 indices convert them to it first, at four times the
        # cost of the gather (crossed 1e5 rows: 0.8 s of a 6 s fit).
        triples_bytes = 3 * np.dtype(np.intp).itemsize * self.num_triples
        if not self.dense_g and triples_bytes > memory_budget:
            raise TooLarge(
                f"The joint posterior's selected inverse needs {self.num_triples:,} products "
                f"({triples_bytes / 2**30:.1f} GiB; budget {memory_budget / 2**30:.1f} GiB): the "
                f"levels of '{blocks[0].name}' meet too many levels of the other terms."
            )

    # ------------------------------------------------------------ index maps
    def _build_entries(self):
        """The nonzero columns of `F` (per level of block 0) and the triples."""
        structure = self.structure
        level_parts, column_parts, self.entry_bases = [], [], {}
        base = 0
        for b in self.dense_blocks[:-1] if self.has_diag else []:
            pair = structure.pairs[0, b]
            kb = structure.blocks[b].num_effects
            self.entry_bases[b] = base
            level_parts.append(np.repeat(pair.levels_first, kb))
            column_parts.append(
                (self.offsets[b] + pair.levels_second[:, None] * kb + np.arange(kb)).reshape(-1)
            )
            base += pair.num_pairs * kb
        self.num_entries = base
        levels = np.concatenate(level_parts) if level_parts else np.zeros(0, np.int64)
        columns = np.concatenate(column_parts) if column_parts else np.zeros(0, np.int64)
        self.entry_order = np.argsort(levels, kind="stable")
        self.entry_level = levels[self.entry_order]
        self.entry_col = columns[self.entry_order]
        # Triples: every pair `first <= second` of entries of the same level of block 0
        # (the inverse is symmetric: the pair serves both orders).
        counts = np.bincount(self.entry_level, minlength=self.num_diag_levels) if base else np.zeros(0, int)
        ends = np.cumsum(counts)
        self._pairs_per_entry = (ends[self.entry_level] - np.arange(base)) if base else np.zeros(0, np.int64)
        self.num_triples = int(np.sum(self._pairs_per_entry))
        self._triples = None
        self._flat = {}

    @property
    def triples(self):
        """`(first, second)` entry indices of the triples, built on first use."""
        if self._triples is None:
            size = self._pairs_per_entry
            first = np.repeat(np.arange(self.num_entries, dtype=np.intp), size)
            within = np.arange(self.num_triples, dtype=np.intp) - np.repeat(np.cumsum(size) - size, size)
            self._triples = (first, first + within)
        return self._triples

    def lower_flat(self, rows, cols, dim):
        """Row-major positions in a `dim x dim` array of the lower-triangle twin of `(rows, cols)`.

        dpotri writes the inverse into the lower triangle only: reading every entry
        `(i, j)` at `(max, min)` saves symmetrizing a dense matrix.
        """
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        return np.maximum(rows, cols) * dim + np.minimum(rows, cols)

    def triple_positions(self, dim):
        """`lower_flat` of the triples' column pairs, cached per inverse size."""
        if dim not in self._flat:
            first, second = self.triples
            flat = self.lower_flat(self.entry_col[first], self.entry_col[second], dim)
            self._flat[dim] = flat.astype(np.intp, copy=False)
        return self._flat[dim]

    def off_diagonal_triples(self, dim):
        """`(first, second, positions)` of the triples of two different entries, cached per
        inverse size (each serves both orders of its pair)."""
        key = ("off_diagonal", dim)
        if key not in self._flat:
            first, second = self.triples
            off = np.flatnonzero(first != second)
            self._flat[key] = (first[off], second[off], self.triple_positions(dim)[off])
        return self._flat[key]

    def _build_dense_positions(self):
        """Rows and columns in `S` of each pair of dense blocks' `(P, ka, kb)` values."""
        structure = self.structure
        self.dense_positions = {}
        for a in self.dense_blocks:
            for b in self.dense_blocks:
                if b < a:
                    continue
                pair = structure.pairs[a, b]
                ka, kb = structure.blocks[a].num_effects, structure.blocks[b].num_effects
                rows = self.offsets[a] + pair.levels_first[:, None, None] * ka + np.arange(ka)[None, :, None]
                cols = self.offsets[b] + pair.levels_second[:, None, None] * kb + np.arange(kb)[None, None, :]
                rows, cols = np.broadcast_arrays(rows, cols)
                self.dense_positions[a, b] = (rows, cols)

    # ------------------------------------------------------------ factor
    def factor(self, lambdas, cross):
        """Factors `A` for relative covariance factors `lambdas` and cross products `cross`.

        Args:
            lambdas: one `(k, k)` lower-triangular matrix per random block (in
                `Structure.blocks` order).
            cross: `Structure.cross_products(h)`.

        Returns:
            A `Factor`.

        Raises:
            numpy.linalg.LinAlgError: `A` is not positive definite (the fixed-effects
                design is rank deficient given the weights).
        """
        structure = self.structure
        factors = {b: lambdas[b] for b in range(structure.num_random)}
        factors[len(structure.blocks) - 1] = None
        num_levels, k0 = self.num_diag_levels, self.k0
        if self.has_diag:
            diagonal_block = _transform(factors[0], cross[0, 0], factors[0]) + np.eye(k0)
            if k0 == 1:
                if not np.all(diagonal_block > 0):
                    raise np.linalg.LinAlgError("A is not positive definite")
                l00 = np.sqrt(diagonal_block)
                l00_inv = 1.0 / l00
            else:
                l00 = np.linalg.cholesky(diagonal_block)
                l00_inv = np.linalg.inv(l00)
        else:
            l00 = l00_inv = np.zeros((0, 1, 1))
        # F = L00^-1 A0D, its random columns as sorted entries (E, k0), its fixed
        # columns dense (L0, k0, p).
        parts = []
        for b in self.dense_blocks[:-1] if self.has_diag else []:
            off_diagonal = _transform(factors[0], cross[0, b], factors[b])  # (P, k0, kb)
            parts.append(np.swapaxes(off_diagonal, 1, 2).reshape(-1, k0))
        entries = np.concatenate(parts)[self.entry_order] if parts else np.zeros((0, k0))
        fixed = len(structure.blocks) - 1
        if self.has_diag:
            f_fixed = _transform(factors[0], cross[0, fixed], None)  # (L0, k0, p)
            f_fixed = np.einsum("lab,lbp->lap", l00_inv, f_fixed) if k0 > 1 else f_fixed * l00_inv
            if k0 > 1:
                entries = np.einsum("eab,eb->ea", l00_inv[self.entry_level], entries)
            else:
                entries = entries * l00_inv[self.entry_level, 0]
        else:
            f_fixed = np.zeros((0, 1, self.num_fixed))
        # S = ADD - F'F.
        num_dense, random_end = self.num_dense, self.num_dense_random
        dense = np.zeros((num_dense, num_dense))
        for (a, b), (rows, cols) in self.dense_positions.items():
            values = _transform(factors[a], cross[a, b], factors[b])
            if a == b and not structure.blocks[a].fixed:
                values = values + np.eye(values.shape[-1])
            dense[rows, cols] = values
            if a != b:
                dense[cols, rows] = values
        flat_fixed = f_fixed.reshape(num_levels * k0, self.num_fixed)
        if self.num_entries and self.dense_g:
            # Where the levels of block 0 meet most columns (kb07's subjects see every
            # item) a dense `F` and BLAS beat the sparse product by 50x.
            f_random = self._dense_random_columns(entries)
            dense[:random_end, :random_end] -= f_random.T @ f_random
            cross_rx = f_random.T @ flat_fixed
        elif self.num_entries:
            # `F'F` by the triples the selected inverse uses: each pair of entries of a
            # level adds its product to the lower triangle, the only one the Cholesky
            # factorization reads (half the time of scipy's sparse product, whose
            # symbolic phase runs again at every call).
            first, second = self.triples
            products = np.take(entries[:, 0], first) * np.take(entries[:, 0], second)
            for a in range(1, self.k0):
                products += np.take(entries[:, a], first) * np.take(entries[:, a], second)
            lower = np.bincount(self.triple_positions(random_end), products, minlength=random_end * random_end)
            dense[:random_end, :random_end] -= lower.reshape(random_end, random_end)
            cross_rx = self.random_transpose_times(entries, f_fixed)
        if self.num_entries:
            dense[:random_end, random_end:] -= cross_rx
            dense[random_end:, :random_end] -= cross_rx.T
        dense[random_end:, random_end:] -= flat_fixed.T @ flat_fixed
        # Cholesky reads the lower triangle only (where the triples' product went).
        dense_factor = scipy.linalg.cholesky(dense, lower=True, check_finite=False) if num_dense else np.zeros((0, 0))
        return Factor(self, l00, l00_inv, entries, f_fixed, dense_factor)

    def random_transpose_times(self, entries, level_values):
        """`F_R' v`, `F_R` the random columns of `F` held as `entries`, for `v` per level of
        block 0: `(L0, k0)` gives `(q_r,)`, `(L0, k0, m)` gives `(q_r, m)` (`m` may be 0)."""
        weighted = np.einsum("ea,ea...->e...", entries, level_values[self.entry_level])
        if weighted.ndim == 1:
            return np.bincount(self.entry_col, weighted, minlength=self.num_dense_random)
        out = np.zeros((self.num_dense_random, weighted.shape[1]))
        for j in range(weighted.shape[1]):
            out[:, j] = np.bincount(self.entry_col, weighted[:, j], minlength=self.num_dense_random)
        return out

    def _dense_random_columns(self, entries):
        """`F`'s random columns as a dense `(L0 k0, q_r)` array."""
        out = np.zeros((self.num_diag_levels, self.k0, self.num_dense_random))
        out[self.entry_level, :, self.entry_col] = entries
        return out.reshape(self.num_diag_levels * self.k0, self.num_dense_random)


class Factor:
    """`A = L L'` in blocks (see the module docstring), with solves and a selected inverse."""

    def __init__(self, system, l00, l00_inv, entries, f_fixed, dense_factor):
        self.system = system
        self.l00, self.l00_inv = l00, l00_inv
        self.entries, self.f_fixed = entries, f_fixed
        self.dense_factor = dense_factor
        random_end = system.num_dense_random
        log_diagonal = np.log(np.diagonal(dense_factor)) if len(dense_factor) else np.zeros(0)
        l00_log_diagonal = np.log(np.diagonal(l00, axis1=-2, axis2=-1)) if len(l00) else np.zeros(0)
        self.logdet_random = 2.0 * (np.sum(l00_log_diagonal) + np.sum(log_diagonal[:random_end]))
        self.logdet_fixed = 2.0 * np.sum(log_diagonal[random_end:])

    @property
    def logdet(self):
        """`log |A|`, fixed effects included."""
        return self.logdet_random + self.logdet_fixed

    # ------------------------------------------------------------ products with F
    def _f_times(self, dense_vector):
        """`F x` for a dense-part vector: `(L0, k0)`."""
        system = self.system
        out = np.einsum("lap,p->la", self.f_fixed, dense_vector[system.num_dense_random:])
        if system.num_entries:
            products = self.entries * dense_vector[system.entry_col][:, None]
            for a in range(system.k0):
                out[:, a] += np.bincount(system.entry_level, products[:, a], minlength=system.num_diag_levels)
        return out

    def _f_transpose_times(self, diag_vector):
        """`F' y` for a block-0 vector `(L0, k0)`: a dense-part vector."""
        system = self.system
        out = np.zeros(system.num_dense)
        out[system.num_dense_random:] = np.einsum("lap,la->p", self.f_fixed, diag_vector)
        if system.num_entries:
            out[: system.num_dense_random] = system.random_transpose_times(self.entries, diag_vector)
        return out

    def _l00_times(self, inverse, vector, transpose=False):
        if self.system.k0 == 1:
            return inverse[:, :, 0] * vector
        return np.einsum("lba,lb->la" if transpose else "lab,lb->la", inverse, vector)

    # ------------------------------------------------------------ solves
    def half_solve(self, diag_rhs, dense_rhs):
        """`L^-1 r` for `r = (r0 (L0, k0), rD (q,))`."""
        half_diagonal = self._l00_times(self.l00_inv, diag_rhs)
        remainder = dense_rhs - self._f_transpose_times(half_diagonal)
        half_dense = remainder
        if len(remainder):
            half_dense = scipy.linalg.solve_triangular(self.dense_factor, remainder, lower=True, check_finite=False)
        return half_diagonal, half_dense

    def solve(self, diag_rhs, dense_rhs):
        """`A^-1 r`; also returns `r' A^-1 r`."""
        half_diagonal, half_dense = self.half_solve(diag_rhs, dense_rhs)
        quadratic = float(np.sum(half_diagonal**2) + np.sum(half_dense**2))
        solution_dense = half_dense
        if len(half_dense):
            solution_dense = scipy.linalg.solve_triangular(self.dense_factor, half_dense, lower=True, trans="T",
                                                           check_finite=False)
        solution_diagonal = self._l00_times(self.l00_inv, half_diagonal - self._f_times(solution_dense), transpose=True)
        return solution_diagonal, solution_dense, quadratic

    def fixed_covariance(self):
        """The fixed effects' block of `A^-1`, `(p, p)`: the Schur complement's inverse."""
        random_end = self.system.num_dense_random
        fixed_factor = self.dense_factor[random_end:, random_end:]
        inverse = scipy.linalg.solve_triangular(fixed_factor, np.eye(len(fixed_factor)), lower=True, check_finite=False)
        return inverse.T @ inverse

    # ------------------------------------------------------------ selected inverse
    def _dense_inverse(self, mode):
        random_end = self.system.num_dense_random
        dense_factor = self.dense_factor if mode == "full" else self.dense_factor[:random_end, :random_end]
        if not len(dense_factor):
            return np.zeros((0, 0))
        inverse, info = scipy.linalg.lapack.dpotri(dense_factor, lower=1)
        if info:
            raise np.linalg.LinAlgError(f"dpotri failed (info={info})")
        return inverse  # lower triangle only; read through `BlockedSystem.lower_flat`

    def selected_inverse(self, mode="random"):
        """Blocks of `A^-1` on the model's pattern (see the module docstring).

        Args:
            mode: `"random"` for `(A_uu)^-1` (the fixed effects a point estimate;
                pairs with the fixed block are left out) or `"full"` for `A^-1`.

        Returns:
            A dict `(a, b) -> (P, k_a, k_b)` over `Structure.pairs`.
        """
        system = self.system
        structure = system.structure
        fixed = len(structure.blocks) - 1
        random_end, k0, num_levels = system.num_dense_random, system.k0, system.num_diag_levels
        full = mode == "full"
        schur_inverse = self._dense_inverse(mode)
        dim = len(schur_inverse)
        flat = schur_inverse.reshape(-1)
        out = {}
        if system.has_diag:
            entries = self.entries
            # G = F S^-1 on the pattern: triples for the random columns ...
            g_entries = np.zeros_like(entries)
            f_dense = g_dense = None
            if system.dense_g:
                schur_random = schur_inverse[:random_end, :random_end]
                schur_random = np.tril(schur_random) + np.tril(schur_random, -1).T
                f_dense = system._dense_random_columns(entries)
                g_dense = (f_dense @ schur_random).reshape(num_levels, k0, random_end)
                if full:
                    g_dense += np.matmul(self.f_fixed, schur_inverse[random_end:, :random_end])
                g_entries = g_dense[system.entry_level, :, system.entry_col]
            elif system.num_entries:
                first, second = system.triples
                schur_values = np.take(flat, system.triple_positions(dim))
                first_off, second_off, positions_off = system.off_diagonal_triples(dim)
                schur_off = np.take(flat, positions_off)
                for a in range(k0):
                    column = entries[:, a]
                    g_entries[:, a] = np.bincount(
                        second, np.take(column, first) * schur_values, minlength=system.num_entries
                    ) + np.bincount(first_off, np.take(column, second_off) * schur_off, minlength=system.num_entries)
            if full:
                # ... plus the fixed columns, which every level meets.
                schur_fixed_random = schur_inverse[random_end:, :random_end]  # below the diagonal: filled
                schur_fixed = schur_inverse[random_end:, random_end:]
                schur_fixed = np.tril(schur_fixed) + np.tril(schur_fixed, -1).T
                if system.num_entries and not system.dense_g:
                    g_entries += np.einsum("eap,pe->ea", self.f_fixed[system.entry_level],
                                           schur_fixed_random[:, system.entry_col])
                g_fixed = np.einsum("lap,pq->laq", self.f_fixed, schur_fixed)
                if system.num_entries:
                    g_fixed += self._random_columns_times(schur_fixed_random.T)
            # (A^-1)_00 = L00^-T (I + G F') L00^-1.
            inner = np.broadcast_to(np.eye(k0), (num_levels, k0, k0)).copy()
            if g_dense is not None:
                inner += np.matmul(g_dense, f_dense.reshape(num_levels, k0, random_end).transpose(0, 2, 1))
            elif system.num_entries:
                outer = g_entries[:, :, None] * entries[:, None, :]
                for a in range(k0):
                    for b in range(k0):
                        inner[:, a, b] += np.bincount(system.entry_level, outer[:, a, b], minlength=num_levels)
            if full:
                inner += np.einsum("lap,lbp->lab", g_fixed, self.f_fixed)
            if k0 == 1:
                out[0, 0] = inner * self.l00_inv**2
            else:
                out[0, 0] = np.einsum("lca,lcd,ldb->lab", self.l00_inv, inner, self.l00_inv)
            # (A^-1)_0D = -L00^-T G.
            if system.num_entries:
                if k0 == 1:
                    covariance_entries = -g_entries * self.l00_inv[system.entry_level, 0]
                else:
                    covariance_entries = -np.einsum("eba,eb->ea", self.l00_inv[system.entry_level], g_entries)
                unsorted = np.empty_like(covariance_entries)
                unsorted[system.entry_order] = covariance_entries
                for b in system.dense_blocks[:-1]:
                    kb = structure.blocks[b].num_effects
                    pair = structure.pairs[0, b]
                    base = system.entry_bases[b]
                    block = unsorted[base:base + pair.num_pairs * kb].reshape(pair.num_pairs, kb, k0)
                    out[0, b] = np.swapaxes(block, 1, 2)
            if full:
                out[0, fixed] = -self._l00_times_matrix(g_fixed)
        for (a, b), (rows, cols) in system.dense_positions.items():
            if not full and (structure.blocks[a].fixed or structure.blocks[b].fixed):
                continue
            key = (a, b, dim)
            if key not in system._flat:
                system._flat[key] = system.lower_flat(rows, cols, dim)
            out[a, b] = np.take(flat, system._flat[key])
        return out

    def _random_columns_times(self, matrix):
        """`F_R M` for a dense `(q_r, m)` matrix: `(L0, k0, m)`."""
        system = self.system
        out = np.zeros((system.num_diag_levels, system.k0, matrix.shape[1]))
        rows = matrix[system.entry_col]  # (E, m)
        for a in range(system.k0):
            weighted = self.entries[:, a, None] * rows
            order_sum = np.add.reduceat(weighted, _segment_starts(system.entry_level), axis=0)
            out[np.unique(system.entry_level), a, :] = order_sum
        return out

    def _l00_times_matrix(self, matrix):
        """`L00^-T g` for `(L0, k0, m)`."""
        if self.system.k0 == 1:
            return matrix * self.l00_inv
        return np.einsum("lba,lbm->lam", self.l00_inv, matrix)


def _segment_starts(sorted_segments):
    """Start positions of the runs of a sorted array."""
    if not len(sorted_segments):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_segments[1:] != sorted_segments[:-1]]))
