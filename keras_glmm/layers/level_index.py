"""The levels of a grouping factor: their names, the indices that stand for them, their counts."""

import numpy as np
import pandas as pd
import tensorflow as tf


class LevelIndex:
    """Level names and indices of a `RandomEffects` layer, and its levels' training-row counts.

    Index `i` stands for level `vocabulary[i]`; `-1` for a level never seen in
    training. A mixin of `RandomEffects`, which sets `num_levels`, `vocabulary`
    and `name` and builds the `level_counts` weight that `adapt` fills.
    """

    def set_vocabulary(self, vocabulary):
        """Sets the level names (index `i` is `vocabulary[i]`) and the graph's lookup table."""
        vocabulary = [str(v) for v in vocabulary]
        if len(vocabulary) > self.num_levels:
            raise ValueError(
                f"RandomEffects layer '{self.name}': {len(vocabulary)} level names for "
                f"num_levels={self.num_levels}."
            )
        self.vocabulary = vocabulary
        self._level_index = pd.Index(vocabulary)
        with tf.init_scope():
            self._lookup_table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(vocabulary, tf.string), tf.range(len(vocabulary), dtype=tf.int64)
                ),
                default_value=-1,
            )

    def lookup(self, names):
        """Level indices of level names (numpy; -1 for a name not in the vocabulary)."""
        if self.vocabulary is None:
            raise ValueError(f"RandomEffects layer '{self.name}' has no vocabulary.")
        names = np.asarray(names).astype(str).reshape(-1)
        return self._level_index.get_indexer(names).astype("int64")

    def lookup_tensor(self, names):
        """Level indices of a string tensor, in the graph (-1 for unknown names)."""
        return self._lookup_table.lookup(tf.reshape(names, [-1]))

    # ------------------------------------------------------------ adaptation
    def adapt(self, level_index, sample_weight=None):
        """Counts each level's training rows, which scale the per-row KL.

        Args:
            level_index: integer array of the training rows' level indices, or
                their level names (strings): looked up in the vocabulary, which is
                learned here (the sorted names) when the layer has none.
            sample_weight: optional per-row weights (counted as fractional rows).
        """
        index = np.asarray(level_index).reshape(-1)
        if index.dtype.kind in "OUS":
            names = index.astype(str)
            if self.vocabulary is None:
                learned = np.unique(names)
                if len(learned) > self.num_levels:
                    raise ValueError(
                        f"RandomEffects layer '{self.name}': {len(learned)} level names for "
                        f"num_levels={self.num_levels}."
                    )
                self.set_vocabulary(learned.tolist())
            index = self.lookup(names)
            unknown = np.flatnonzero(index < 0)
            if unknown.size:
                raise ValueError(
                    f"RandomEffects layer '{self.name}': level {names[unknown[0]]!r} in row "
                    f"{int(unknown[0])} is not in the vocabulary ({unknown.size} rows)."
                )
        self._check_index_values(index)
        if not self.built:
            self.build()
        counts = np.bincount(index, weights=sample_weight, minlength=self.num_levels)
        self.level_counts.assign(counts.astype(self.level_counts.dtype))

    def _check_index_values(self, index, allow_new=False):
        if index.size and not np.issubdtype(index.dtype, np.integer):
            raise TypeError(
                f"RandomEffects layer '{self.name}': level indices must be integers. "
                f"Received dtype {index.dtype}."
            )
        bad = np.flatnonzero((index < (-1 if allow_new else 0)) | (index >= self.num_levels))
        if bad.size:
            raise ValueError(
                f"RandomEffects layer '{self.name}': level index {int(index[bad[0]])} in row "
                f"{int(bad[0])} is outside [0, {self.num_levels}) "
                f"({bad.size} rows out of range)."
            )

    def validated_index(self, level_index, training):
        """Asserts level indices lie in `[0, num_levels)`, or `[-1, ...)` at inference."""
        check = tf.debugging.assert_less(
            level_index,
            tf.constant(self.num_levels, "int64"),
            # No quotes around the name: graph assert messages escape them.
            message=(
                f"RandomEffects layer {self.name}: a level index is >= num_levels="
                f"{self.num_levels} (an unknown level?)"
            ),
        )
        lowest = 0 if training else -1
        check_low = tf.debugging.assert_greater_equal(
            level_index,
            tf.constant(lowest, "int64"),
            message=(
                f"RandomEffects layer {self.name}: a level index is below {lowest} "
                "(-1 marks a new level, allowed only at inference)"
            ),
        )
        with tf.control_dependencies([check, check_low]):
            return tf.identity(level_index)
