"""Parts of a table variable read and written on their own: some rows, some columns.

The random effects keep one row per level in a table variable; a training step
reads only its batch's rows (`gather_rows`), and results are read and starting
values set through views of some of its columns (`TableColumns`).
"""

import numpy as np
import tensorflow as tf


def gather_rows(variable, index):
    """Rows of a Keras variable, read without copying the whole table.

    `tf.gather` on a Keras variable first converts it to a tensor, a read of the
    whole table each step (40 MB at 10M levels); gathering from the underlying
    resource variable reads only the rows (ResourceGather), and its gradient is a
    `tf.IndexedSlices` over them.
    """
    value = getattr(variable, "value", variable)
    return tf.gather(value, index)


class TableColumns:
    """Some columns of a table variable, read and written like a variable of their own.

    A level's posterior lives in one row of one table (`RandomEffects.posterior`),
    so that a step gathers and scatters each level once; `posterior_mean` and
    `posterior_scale_tril` are these views of its columns, for reading results and
    setting starting values outside training steps (`assign` rewrites the table).
    """

    def __init__(self, variable, start, stop):
        self.variable = variable
        self.start, self.stop = int(start), int(stop)

    @property
    def shape(self):
        return (int(self.variable.shape[0]), self.stop - self.start)

    @property
    def dtype(self):
        return self.variable.dtype

    @property
    def value(self):
        """The columns as a tensor."""
        return tf.convert_to_tensor(self.variable)[:, self.start:self.stop]

    def numpy(self):
        return self.variable.numpy()[:, self.start:self.stop]

    def assign(self, value):
        table = self.variable.numpy()
        table[:, self.start:self.stop] = np.broadcast_to(np.asarray(value), self.shape)
        self.variable.assign(table)
