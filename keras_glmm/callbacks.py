"""Callbacks: stopping a fit when its ELBO has converged."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_glmm")
class ELBOConvergence(keras.callbacks.Callback):
    """Stops training when the ELBO no longer improves, lowering the step size first.

    At the end of each epoch the callback compares the epoch's mean loss (the
    negative ELBO per observation) with the previous epoch's. Adam at a fixed
    learning rate ends up oscillating around the optimum instead of settling there,
    so when the improvement falls below `reduce_below` (or the loss goes up) the
    learning rate is multiplied by `factor`, down to `min_learning_rate`. Training
    stops, with `converged = True`, once the change per observation has stayed below
    `tolerance` for `patience` consecutive epochs; `converged` stays False when
    `epochs` run out first.

    A change of `tolerance` per observation is a change of `n * tolerance` nats in
    the total ELBO: the default 1e-7 is 1e-4 nats on 1,000 rows.

    Args:
        tolerance: convergence threshold on |change in loss| per observation.
        patience: consecutive epochs below `tolerance` before stopping.
        reduce_below: improvement under which the learning rate is lowered.
        factor: multiplier of the learning rate on a plateau.
        min_learning_rate: lower bound of the learning rate.
        monitor: the History key to watch.
    """

    def __init__(
        self,
        tolerance=1e-7,
        patience=2,
        reduce_below=1e-5,
        factor=0.5,
        min_learning_rate=1e-4,
        monitor="loss",
    ):
        super().__init__()
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.reduce_below = float(reduce_below)
        self.factor = float(factor)
        self.min_learning_rate = float(min_learning_rate)
        self.monitor = monitor
        self.converged = False
        self.last_delta = np.inf

    @classmethod
    def for_minibatches(cls):
        """The settings `GLMM.fit` uses for minibatch fits.

        An epoch's mean loss is then averaged along a moving, noisy path: it keeps
        creeping down as each halving of the learning rate halves the jitter of the
        random effects (and of the fixed effects' Adam steps): the learning rate is
        halved on each plateau, down to 1e-4, and a change below 1e-5 per
        observation over two epochs then moves the estimates far less than their
        standard errors.
        """
        return cls(tolerance=1e-5, patience=2, reduce_below=1e-4, factor=0.5, min_learning_rate=1e-4)

    def on_train_begin(self, logs=None):
        self.converged = False
        self.last_delta = np.inf
        self._previous = None
        self._wait = 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self._previous is not None:
            delta = self._previous - value  # > 0: improvement
            self.last_delta = abs(delta)
            if abs(delta) < self.tolerance:
                self._wait += 1
                if self._wait >= self.patience:
                    self.converged = True
                    self.model.stop_training = True
            else:
                self._wait = 0
            if delta < self.reduce_below:
                self._reduce_learning_rate()
        self._previous = value

    def _reduce_learning_rate(self):
        optimizer = self.model.optimizer
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if lr > self.min_learning_rate:
            optimizer.learning_rate = max(lr * self.factor, self.min_learning_rate)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_config(self):
        return {
            "tolerance": self.tolerance,
            "patience": self.patience,
            "reduce_below": self.reduce_below,
            "factor": self.factor,
            "min_learning_rate": self.min_learning_rate,
            "monitor": self.monitor,
        }
