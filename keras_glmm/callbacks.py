"""Callbacks: stopping a fit when its ELBO has converged; the epoch-end M-step of minibatch fits."""

import keras
import numpy as np

from keras_glmm import compat
from keras_glmm.layers.family_head import FamilyHead
from keras_glmm.layers.fixed_effects import is_network
from keras_glmm.layers.random_effects import RandomEffects
from keras_glmm.optimizers import check_adapted


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
        monitor: the History key to watch. For `"loss"`, a GLMM's `elbo` log is read
            where there is one (its negative is the loss): it is weighted by each
            replica's rows, while Keras's `loss` log of a multi-worker fit weights
            the replicas' shares of the loss as if their batches were equal (biased
            where workers' shares of files differ).
        sd_tolerance: optional; the learning rate is lowered (and convergence
            declared) only once no random-effect sd moved by more than this
            relative change in the epoch. A minibatch loss plateaus at its noise
            level while the sds are still climbing by EM steps; lowering the rate
            then would freeze the levels' means, and the sds with them.
    """

    def __init__(
        self,
        tolerance=1e-7,
        patience=2,
        reduce_below=1e-5,
        factor=0.5,
        min_learning_rate=1e-4,
        monitor="loss",
        sd_tolerance=None,
    ):
        super().__init__()
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.reduce_below = float(reduce_below)
        self.factor = float(factor)
        self.min_learning_rate = float(min_learning_rate)
        self.monitor = monitor
        self.sd_tolerance = None if sd_tolerance is None else float(sd_tolerance)
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
        return cls(
            tolerance=1e-5, patience=2, reduce_below=1e-4, factor=0.5, min_learning_rate=1e-4,
            sd_tolerance=0.01,
        )

    def on_train_begin(self, logs=None):
        self.converged = False
        self.last_delta = np.inf
        self._previous = None
        self._wait = 0
        self._sds = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = -logs["elbo"] if self.monitor == "loss" and "elbo" in logs else logs.get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        settled = self._sds_settled()
        if self._previous is not None:
            delta = self._previous - value  # > 0: improvement
            self.last_delta = abs(delta)
            if abs(delta) < self.tolerance and settled:
                self._wait += 1
                if self._wait >= self.patience:
                    self.converged = True
                    self.model.stop_training = True
            else:
                self._wait = 0
            if delta < self.reduce_below and settled:
                self._reduce_learning_rate()
        self._previous = value

    def _sds_settled(self):
        """Whether every random-effect sd changed by less than `sd_tolerance` (relative)."""
        terms = random_effect_layers(self.model) if self.sd_tolerance is not None else []
        if not terms:
            return True
        sds = np.concatenate([np.ravel(t.prior_stddev()) for t in terms])
        previous, self._sds = self._sds, sds
        return previous is not None and bool(np.all(np.abs(sds / previous - 1) < self.sd_tolerance))

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
            "sd_tolerance": self.sd_tolerance,
        }


# ---------------------------------------------------------------- recentring
def random_effect_layers(model):
    """Every `RandomEffects` layer of a model (a GLMM's terms, or those inside any Keras model)."""
    terms = getattr(model, "terms", None)
    if terms is not None:
        return list(terms)
    return [layer for layer in compat.sublayers(model) if isinstance(layer, RandomEffects)]


def output_bias(network):
    """The bias of a network's output, when its output layer is a linear `Dense(1)` with a bias.

    Adding `c` to it and subtracting `c` from every level's random intercept
    leaves every linear predictor unchanged, which `recenter_into` uses.
    """
    layer = network
    for _ in range(32):
        if isinstance(layer, keras.Sequential):
            layer = layer.layers[-1] if layer.layers else None
        elif isinstance(layer, keras.Model) and getattr(layer, "outputs", None):
            outputs = keras.tree.flatten(layer.outputs)
            if len(outputs) != 1:
                return None
            layer = compat.producing_layer(outputs[0])
        else:
            break
    if (isinstance(layer, keras.layers.Dense) and layer.units == 1 and layer.use_bias
            and layer.activation in (keras.activations.linear, None)):
        return layer.bias
    return None


def head_bias(model):
    """In a model of your own: the bias of a linear `Dense(1)` whose output is a part of a
    `FamilyHead`'s linear predictor (the head adds its parts), or None."""
    heads = [layer for layer in compat.sublayers(model) if isinstance(layer, FamilyHead)]
    for head in heads:
        # The tensors of the head's call (its first, if called more than once).
        for tensor in keras.tree.flatten(getattr(head, "input", [])):
            layer = compat.producing_layer(tensor)
            if isinstance(layer, keras.Model):
                bias = output_bias(layer)
            elif (isinstance(layer, keras.layers.Dense) and layer.units == 1 and layer.use_bias
                    and layer.activation in (keras.activations.linear, None)):
                bias = layer.bias
            else:
                bias = None
            if bias is not None:
                return bias
    return None


def recenter_into(bias, terms):
    """Moves each term's mean random intercept into `bias` (an exact step along the
    direction the data do not identify; see `keras_glmm.callbacks.recenter`)."""
    if bias is None:
        return 0.0
    total = 0.0
    for term in terms:
        if not term.intercept or term.scale_prior is not None:
            continue
        seen = term.level_counts.numpy() > 0
        if not seen.any():
            continue
        scale = float(term.effect_scale[0])
        mean = term.posterior_mean.numpy().astype("float64")
        if term.num_effects == 1:
            shift = float(mean[seen, 0].mean() * scale)
        else:
            # Slopes without a fixed counterpart: the conditional shift of the intercept.
            precision = np.linalg.inv(term.prior_covariance().astype("float64"))
            shift = float((precision @ (mean[seen].mean(axis=0) * np.asarray(term.effect_scale)))[0]
                          / precision[0, 0])
        mean[seen, 0] -= shift / scale
        term.posterior_mean.assign(mean.astype(term.posterior_mean.dtype))
        total += shift
    if total:
        bias.assign(bias.numpy() + np.asarray(total, bias.dtype))
    return total


def recenter(model):
    """Moves each random effect's mean over its levels into the matching fixed effect.

    Adding `c` to a fixed coefficient and subtracting it from the same effect of
    every level of a grouping factor leaves every row's linear predictor unchanged
    (each training row has exactly one level), so only the levels' KLs change:
    `sum_c (mu_c - c)' Sigma^-1 (mu_c - c)`, smallest at `c = mean_c mu_c` over the
    levels with training rows. This exact step along the one direction that the
    data do not identify is what per-level steps (natural-gradient or Newton) are
    slowest at: the intercept and the levels' mean trade off with a contraction of
    about `n_c w / (n_c w + 1 / tau^2)` per pass, 0.96 for levels with 500 rows, so
    without it a minibatch fit's intercept drifts for many epochs (the classic
    centring problem of hierarchical models). `VarianceUpdate` takes this step
    before the M-step.

    Only formula models qualify, where the design says which fixed column equals
    which random-effect column (same name, as `x` in `y ~ x + (1 + x | g)`), with
    point-estimated fixed effects (a `Dense` kernel): a fixed-effects prior would
    make the step inexact.

    Returns:
        `{(term name, column): shift}` of the shifts made.
    """
    design = getattr(model, "design", None)
    fixed = getattr(model, "fixed_effects", None)
    if design is None or not isinstance(fixed, keras.layers.Dense) or fixed.use_bias:
        return {}
    fixed_index = {name: j for j, name in enumerate(design.fixed_columns)}
    kernel = fixed.kernel.numpy().astype("float64")
    shifts = {}
    for term in model.random_effects:
        seen = term.level_counts.numpy() > 0
        if not seen.any():
            continue
        columns = design.term(term.name).columns
        matched = [(e, fixed_index[c]) for e, c in enumerate(columns) if c in fixed_index]
        if not matched:
            continue
        scale = np.asarray(term.effect_scale, dtype="float64")
        mean = term.posterior_mean.numpy().astype("float64")
        average = mean[seen].mean(axis=0) * scale
        effects = [e for e, _ in matched]
        if len(effects) == len(columns):
            shift = average
        else:
            # Some effects have no fixed counterpart: the best shift of the others
            # is the conditional one, through the prior's precision.
            precision = np.linalg.inv(term.prior_covariance().astype("float64"))
            block = precision[np.ix_(effects, effects)]
            shift = np.zeros(len(columns))
            shift[effects] = np.linalg.solve(block, (precision @ average)[effects])
        for e, j in matched:
            kernel[j, 0] += shift[e]
            shifts[(term.name, columns[e])] = float(shift[e])
        mean[seen] -= shift / scale
        term.posterior_mean.assign(mean.astype(term.posterior_mean.dtype))
    if shifts:
        fixed.kernel.assign(kernel.astype(fixed.kernel.dtype))
    return shifts


class VarianceUpdate(keras.callbacks.Callback):
    """At each epoch's end, moves every random-effect prior to its optimum given q.

    First the fixed effects take up the levels' mean (`recenter`), then the priors
    move.

    The M-step of variational EM (`RandomEffects.update_prior`): with natural-gradient
    steps the levels' posteriors follow the prior within a pass, and this exact update
    of the prior keeps up with them, where Adam's steps from noisy minibatch
    gradients of `tau` crawl. EM itself crawls when levels have few rows, so the
    steps are over-relaxed adaptively: while an sd keeps moving the same way its
    relaxation doubles (up to `max_relaxation`), and it drops back to 1 when the
    direction turns. `GLMM.fit` adds this callback to minibatch fits.

    It works on any Keras model holding `RandomEffects` layers. Recentring needs a
    fixed part that takes up the levels' mean: a formula GLMM's intercept column, a
    network's output bias (its last layer a linear `Dense(1)`), or in a model of
    your own the bias of `intercept`, or of a linear `Dense(1)` layer that feeds a
    `FamilyHead` directly (found automatically). At the start of training it checks
    that every random-effects layer was adapted to its level counts.

    Args:
        max_relaxation: the largest over-relaxation factor.
        intercept: optional; in a Keras model of your own, the `Dense(1)` layer (or its
            bias variable) whose output adds to the linear predictor.
    """

    def __init__(self, max_relaxation=8.0, intercept=None):
        super().__init__()
        self.max_relaxation = float(max_relaxation)
        self.intercept = intercept

    def on_train_begin(self, logs=None):
        self._state = {}
        check_adapted(random_effect_layers(self.model))

    def _recenter(self):
        model = self.model
        if hasattr(model, "terms"):  # a GLMM
            if is_network(model.fixed_effects):
                recenter_into(output_bias(model.fixed_effects), model.terms)
            else:
                recenter(model)
            return
        bias = self.intercept
        if isinstance(bias, keras.layers.Dense):
            bias = bias.bias
        if bias is None:
            bias = head_bias(model)
        recenter_into(bias, random_effect_layers(model))

    def on_epoch_end(self, epoch, logs=None):
        self._recenter()
        for term in random_effect_layers(self.model):
            relaxation, previous = self._state.get(term.name, (1.0, None))
            step = term.update_prior(relaxation)
            if previous is not None and np.all(np.sign(step) == np.sign(previous)):
                relaxation = min(2.0 * relaxation, self.max_relaxation)
            else:
                relaxation = 1.0
            self._state[term.name] = (relaxation, step)

    def get_config(self):
        return {"max_relaxation": self.max_relaxation}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
