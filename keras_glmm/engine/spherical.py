"""The model's algebra in lme4's spherical coordinates, shared by the engine's estimators.

```
eta = offset + X beta + Z Lambda u,     b_t = Lambda_t u_t
```

A posterior mean `u` is kept per random term as an `(L_t, k_t)` array in the
engine's block order (`Structure.blocks`); a posterior covariance `V` as the blocks
of the selected inverse (`Factor.selected_inverse`) on the model's pattern. The
blocked factorization (`keras_glmm.engine.blocked`) splits its right-hand sides into
block 0 (block diagonal) and the dense part; `right_hand_side` and `split` go
between those two parts and the per-term arrays.
"""

import numpy as np


def lambda_rows(z, factor):
    """`z Lambda`: each row's design in spherical coordinates, `(n, k)`."""
    return z * factor[0, 0] if factor.shape[0] == 1 else z @ factor


def trace_random(covariance, num_random):
    """`tr V` over the random terms' diagonal blocks."""
    return float(sum(np.trace(covariance[b, b], axis1=1, axis2=2).sum() for b in range(num_random)))


class SphericalAlgebra:
    """Linear predictor, gradients in `Lambda` and row variances of one model.

    Args:
        structure: the model's `Structure`.
        system: its `BlockedSystem`.
        offset: `(n,)` offset of the linear predictor.
    """

    def __init__(self, structure, system, offset):
        self.structure = structure
        self.system = system
        self.offset = offset

    # ------------------------------------------------------------ the two parts of a solve
    def right_hand_side(self, lambdas, per_level):
        """Splits `Lambda' v` (per block, per level) into block 0 and the dense part."""
        structure, system = self.structure, self.system
        blocks = [per_level[b] @ lambdas[b] if b < structure.num_random else per_level[b]
                  for b in range(len(structure.blocks))]
        return self.right_hand_side_of_blocks(blocks)

    def right_hand_side_of_blocks(self, per_block):
        """Splits per-block values (already in spherical coordinates) into block 0 and the dense part."""
        system = self.system
        diagonal = per_block[0] if system.has_diag else np.zeros((0, 1))
        dense = np.concatenate([np.asarray(per_block[b]).reshape(-1) for b in system.dense_blocks])
        return diagonal, dense

    def split(self, diagonal, dense):
        """`(means, beta)`: per-term coefficient arrays and the fixed effects from a solve's two parts."""
        structure, system = self.structure, self.system
        out = [diagonal] if system.has_diag else []
        for b in system.dense_blocks:
            block = structure.blocks[b]
            start = system.offsets[b]
            out.append(dense[start:start + block.size].reshape(block.num_levels, block.num_effects))
        out[-1] = out[-1].reshape(-1)
        return out[:-1], out[-1]

    # ------------------------------------------------------------ rows
    def linear_predictor(self, lambdas, means, beta):
        """`offset + X beta + sum_t z_t' Lambda_t u_t[g_t(i)]` per row."""
        structure = self.structure
        eta = self.offset + structure.fixed_block.z @ beta
        for b, block in enumerate(structure.random_blocks):
            coefficients = means[b] @ lambdas[b].T  # b = Lambda u, one row per level
            for j in range(block.num_effects):  # one column gathered at a time, not (n, k)
                eta += coefficients[:, j][block.index] * block.z[:, j]
        return eta

    def row_variance(self, lambdas, covariance):
        """`Var_q(eta_i) = sum_ab z_ia' M_ab[pair] z_ib`, `M_ab = Lambda_a V_ab Lambda_b'` per pair.

        `M` is formed once per pair of levels (few), then each of its entries is
        gathered to the rows as one column: a quarter of the time of a per-row
        `(k, k)` contraction on 1e5 rows (`M_aa` is symmetric: its entries above the
        diagonal count twice, those below are skipped).
        """
        structure = self.structure
        variance = np.zeros(structure.num_rows)
        for (a, b), block_covariance in covariance.items():
            if a >= structure.num_random or b >= structure.num_random:
                continue
            per_pair = lambdas[a] @ block_covariance @ lambdas[b].T
            row_pair = structure.pairs[a, b].row_pair
            z_a, z_b = structure.blocks[a].z, structure.blocks[b].z
            for i in range(z_a.shape[1]):
                for j in range(i if a == b else 0, z_b.shape[1]):
                    weight = 1.0 if a == b and i == j else 2.0
                    variance += (weight * per_pair[:, i, j])[row_pair] * (z_a[:, i] * z_b[:, j])
        return np.maximum(variance, 0.0)

    # ------------------------------------------------------------ gradients
    def lambda_gradients(self, lambdas, means, level_scores, cross, covariance):
        """`sum_c r_tc u_tc' - sum_pairs C_ts Lambda_s V_st` for each random term."""
        structure = self.structure
        gradients = [np.einsum("la,lb->ab", level_scores[b], means[b]) for b in range(structure.num_random)]
        fixed = len(structure.blocks) - 1
        for (a, b), block_covariance in covariance.items():
            products = cross[a, b]
            factor_b = np.eye(structure.blocks[b].num_effects) if b == fixed else lambdas[b]
            # sum_p C_p Lambda_b V_p' and sum_p C_p' Lambda_a V_p as BLAS contractions.
            if a < structure.num_random:
                gradients[a] -= np.tensordot(np.matmul(products, factor_b), block_covariance, axes=([0, 2], [0, 2]))
            if b != a and b < structure.num_random:
                gradients[b] -= np.tensordot(np.matmul(np.swapaxes(products, 1, 2), lambdas[a]), block_covariance,
                                             axes=([0, 2], [0, 1]))
        return gradients

    def average_information(self, parameters, lambdas, factor, means, level_scores, weights, scale=1.0,
                            extra=None):
        """The average-information matrix of the variance parameters.

        AI-REML's approximation of the Hessian of `-log L` (Gilmour, Thompson &
        Cullis 1995): with `t_j = dV/d theta_j V^-1 e` (`e` the marginal residual)
        and `P` the projection `V^-1 - V^-1 X (X'V^-1 X)^-1 X'V^-1`,
        `AI_jk = t_j' P t_k / 2`. In the spherical coordinates, for `theta_j` the
        entry `(a, b)` of `Lambda_t`, `t_j = z_ta u_tb + (z_t' Lambda_t)_b r_ta`
        (`r` the levels' scores `Z'W e / s^2` scaled back by `s^2`), and `P t` is
        one solve with the factorization at hand. For a gaussian model the residual
        variance is one more parameter (`t = e / s^2`), profiled out at the end.

        Args:
            parameters: the `Parameters` (the positions of the entries of `Lambda_t`).
            lambdas, factor, means, level_scores: the point's factors, factorization
                of `A(weights)`, posterior means `u` and level scores.
            weights: `(n,)` the rows' weights in `A`.
            scale: `s^2` (gaussian), else 1.
            extra: optional `(n,)` column for one more parameter (the residual variance).

        Returns:
            `(d, d)` for the `theta` entries.
        """
        structure = self.structure
        columns = []
        for b, block in enumerate(structure.random_blocks):
            rows, cols = parameters.positions[b]
            spherical_rows = lambda_rows(block.z, lambdas[b])
            mean_rows = means[b][block.index]
            score_rows = level_scores[b][block.index] * scale
            for row, col in zip(rows, cols):
                columns.append(block.z[:, row] * mean_rows[:, col] + spherical_rows[:, col] * score_rows[:, row])
        if extra is not None:
            columns.append(extra)
        directions = np.stack(columns, axis=1)
        weighted = weights[:, None] * directions
        solved = []
        for j in range(directions.shape[1]):
            sums = structure.level_sums(weighted[:, j])
            diagonal, dense = self.right_hand_side(lambdas, sums)
            solution_diagonal, solution_dense, _ = factor.solve(diagonal, dense)
            solved.append((diagonal, dense, solution_diagonal, solution_dense))
        information = np.empty((directions.shape[1], directions.shape[1]))
        for j in range(directions.shape[1]):
            for k in range(j, directions.shape[1]):
                diagonal_j, dense_j, _, _ = solved[j]
                _, _, solution_diagonal_k, solution_dense_k = solved[k]
                value = float(directions[:, j] @ weighted[:, k]) - float(
                    np.sum(diagonal_j * solution_diagonal_k) + dense_j @ solution_dense_k)
                information[j, k] = information[k, j] = 0.5 * value / scale
        d = parameters.num_theta
        if extra is not None:
            information = information[:d, :d] - np.outer(information[:d, d], information[d, :d]) / information[d, d]
        return information
