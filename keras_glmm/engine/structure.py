"""The sparsity structure of a mixed model's design, learned once from its rows.

The coefficients of a GLMM fall into *blocks*: one per random-effect term (`L`
levels of `k` effects each) and one for the fixed effects (one "level" of `p`
effects). Row `i` touches one level of every block: level `g_b(i)` of block `b`
through the design row `z_ib` (the term's intercept and covariates; the fixed
effects' `x_i`). Everything the engine needs of the data is therefore a sum over
rows of products `h_i z_ib z_ib'^T` grouped by the *pair* of levels the row
touches in two blocks, as in MixedModels.jl's blocked `Z'Z`:

```
C_bb'[pair (c, c')] = sum over rows i with g_b(i) = c, g_b'(i) = c' of  h_i z_ib z_ib'^T
```

Block 0 is the random term with the most coefficients: its levels are kept block
diagonal (a `k x k` block per level) by the engine; the other random terms and the
fixed effects form the dense part (`keras_glmm.engine.blocked`).

No TensorFlow here: numpy and scipy only.
"""

import numpy as np
import scipy.sparse as sp


class Block:
    """One block of coefficients: a random-effect term, or the fixed effects.

    Attributes:
        name: the term's name (`"(fixed)"` for the fixed effects).
        index: `(n,)` int64, the level of each row (all 0 for the fixed effects).
        z: `(n, k)` float64, each row's design in this block.
        num_levels: `L`.
        num_effects: `k`.
        fixed: whether this is the fixed-effects block (flat prior, no `I`).
        correlated: for a random term, whether its effects are correlated (a full
            lower-triangular relative covariance factor) or independent (diagonal).
    """

    def __init__(self, name, index, z, num_levels, fixed=False, correlated=True):
        self.name = name
        self.index = np.ascontiguousarray(index, dtype=np.int64)
        self.z = np.ascontiguousarray(z, dtype=np.float64)
        if self.z.ndim == 1:
            self.z = self.z[:, None]
        self.num_levels = int(num_levels)
        self.num_effects = int(self.z.shape[1])
        self.fixed = bool(fixed)
        self.correlated = bool(correlated)

    @property
    def size(self):
        return self.num_levels * self.num_effects


class Pair:
    """The co-occurring levels of two blocks `first <= second`.

    Attributes:
        first, second: positions of the blocks in `Structure.blocks`.
        row_pair: `(n,)` int64, the pair of levels each row touches.
        levels_first, levels_second: `(P,)` int64, the levels of each pair.
    """

    def __init__(self, first, second, row_pair, levels_first, levels_second):
        self.first, self.second = first, second
        self.row_pair = row_pair
        self.levels_first = levels_first
        self.levels_second = levels_second

    @property
    def num_pairs(self):
        return len(self.levels_first)


def _pair_of(blocks, a, b):
    """The `Pair` of blocks `a <= b`: levels that occur together in some row."""
    first, second = blocks[a], blocks[b]
    if a == b or second.fixed or first.fixed:
        # One block, or a block with the fixed effects (one "level"): the pairs are
        # the first block's levels (every level is paired with the single one).
        own = first if not first.fixed else second
        levels = np.arange(own.num_levels, dtype=np.int64)
        other = levels if a == b else np.zeros_like(levels)
        return Pair(a, b, own.index, levels, other)
    key = first.index * np.int64(second.num_levels) + second.index
    unique, row_pair = np.unique(key, return_inverse=True)
    return Pair(a, b, row_pair.reshape(-1).astype(np.int64), unique // second.num_levels,
                unique % second.num_levels)


class Structure:
    """The blocks of a model's coefficients and the pairs of levels its rows touch.

    Args:
        x: `(n, p)` fixed-effects design.
        terms: a list of `(name, index, z, num_levels, correlated)` for the random
            terms, `z` `(n, k)` holding the intercept column when the term has one.

    Block 0 is the random term with the most coefficients (the engine's block
    diagonal); the remaining terms follow in their given order, then the fixed
    effects. `order[j]` is the position in `blocks` of the `j`-th given term.
    """

    def __init__(self, x, terms):
        x = np.ascontiguousarray(x, dtype=np.float64)
        self.num_rows = int(x.shape[0])
        self.num_fixed = int(x.shape[1])
        random = [Block(name, index, z, levels, correlated=correlated)
                  for name, index, z, levels, correlated in terms]
        for block in random:
            if len(block.index) != self.num_rows or len(block.z) != self.num_rows:
                raise ValueError(
                    f"Term '{block.name}' has {len(block.index)} rows but the fixed-effects "
                    f"design has {self.num_rows}."
                )
        if random:
            first = max(range(len(random)), key=lambda j: (random[j].size, -j))
            rank = [first] + [j for j in range(len(random)) if j != first]
        else:
            rank = []
        self.blocks = [random[j] for j in rank] + [
            Block("(fixed)", np.zeros(self.num_rows, np.int64), x, 1, fixed=True)
        ]
        self.order = [rank.index(j) for j in range(len(random))]
        self.num_random = len(random)
        self.pairs = {}
        for a in range(len(self.blocks)):
            for b in range(a, len(self.blocks)):
                self.pairs[a, b] = _pair_of(self.blocks, a, b)

    @property
    def random_blocks(self):
        return self.blocks[: self.num_random]

    @property
    def fixed_block(self):
        return self.blocks[-1]

    def cross_products(self, h):
        """`C_ab[pair] = sum_i h_i z_ia z_ib'` for every pair of blocks.

        Args:
            h: `(n,)` row weights.

        Returns:
            A dict `(a, b) -> (P, k_a, k_b)` array.
        """
        h = np.asarray(h, dtype=np.float64)
        out = {}
        for (a, b), pair in self.pairs.items():
            za, zb = self.blocks[a].z, self.blocks[b].z
            if self.blocks[a].fixed and self.blocks[b].fixed:
                out[a, b] = (za.T @ (h[:, None] * zb))[None]
                continue
            out[a, b] = segment_outer(pair.row_pair, pair.num_pairs, h, za, zb)
        return out

    def level_sums(self, values):
        """`sum_i values_i z_ib` per level of every block: a list of `(L_b, k_b)` arrays."""
        values = np.asarray(values, dtype=np.float64)
        sums = []
        for block in self.blocks:
            out = np.empty((block.num_levels, block.num_effects))  # (p, 0) for a model without fixed effects
            for j in range(block.num_effects):
                out[:, j] = np.bincount(block.index, weights=values * block.z[:, j], minlength=block.num_levels)
            sums.append(out)
        return sums


def segment_outer(segment, num_segments, h, za, zb):
    """`out[s] = sum over rows i in segment s of h_i za_i zb_i'`, `(S, ka, kb)`.

    A sparse `(S, n)` matrix holding `h` times each column of `za` multiplies `zb`:
    `ka` sparse-dense products, each touching every row once.
    """
    n = len(segment)
    ka, kb = za.shape[1], zb.shape[1]
    out = np.empty((num_segments, ka, kb))
    if ka * kb <= 16:
        # A few bincounts beat building sparse matrices (scipy's per-call overhead);
        # a block with itself (`za is zb`) is symmetric: the entries below the diagonal
        # are copies.
        symmetric = za is zb
        for i in range(ka):
            hz = h * za[:, i]
            for j in range(i if symmetric else 0, kb):
                out[:, i, j] = np.bincount(segment, weights=hz * zb[:, j], minlength=num_segments)
                if symmetric:
                    out[:, j, i] = out[:, i, j]
        return out
    rows = np.arange(n)
    for j in range(ka):
        m = sp.csr_matrix((h * za[:, j], (segment, rows)), shape=(num_segments, n))
        out[:, j, :] = m @ zb
    return out
