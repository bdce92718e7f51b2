"""`GLMMTensorBoard`: a GLMM's variance components, random effects and report in TensorBoard.

Keras's own `keras.callbacks.TensorBoard` logs the History (`epoch_loss`,
`epoch_elbo`, `epoch_nll`, `epoch_kl`) under `log_dir/train`; this callback adds
what is specific to a mixed model under `log_dir/glmm`, so both can share one
`log_dir` and show up as the runs `train` and `glmm`:

* every epoch, scalars `varcorr/<grp>/<var1>` (the random effects' standard
  deviations), `varcorr/<grp>/corr_<var1>_<var2>` (their correlations),
  `dispersion/<name>` (gaussian `scale`, negative binomial `dispersion`, gamma
  `shape`) and `elbo/elbo`, `elbo/nll`, `elbo/kl` (per observation);
* every `histogram_freq` epochs, histograms `ranef/<term>/<effect>/mean` and
  `ranef/<term>/<effect>/sd` of the levels' posterior means and sds;
* at the end of training, the image `ranef/caterpillar` (each term's sorted
  conditional means with +-1.96 posterior sd bars) and the text `report`.
"""

import io

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm import plots
from keras_glmm import results as results_lib

RUN_NAME = "glmm"


def _tag(text):
    """A tag component: slashes would make new tag levels, so they become '_'."""
    return str(text).replace("/", "_")


def _code_block(text):
    # TensorBoard's text plugin renders markdown: a fenced block keeps the
    # report's column alignment.
    return "```\n" + text + "\n```"


def caterpillar_figure(model, max_levels=None):
    """Each term's conditional means with 95% intervals: `keras_glmm.plots.ranef_figure`.

    lme4's `dotplot(ranef(fit, condVar = TRUE))`, one way of drawing it for
    `fit.plot_ranef()` and TensorBoard alike.

    Args:
        model: a `GLMM`.
        max_levels: draw at most this many levels per factor (evenly spaced in the
            sorted order); None draws all.
    """
    return plots.ranef_figure(model, max_levels=max_levels)


def figure_to_png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def training_summary(model, logs=None, epochs=None, stopped_early=None):
    """A plain-text summary of a model's current state that needs no `fit_summary_`.

    `GLMM.fit` computes the exact ELBO, the standard errors and the convergence
    flag only after Keras's `fit` has returned; this is what can be said at the
    end of Keras's `fit`: the last epoch's ELBO per observation, the variance
    components, the dispersion and the fixed-effect estimates.
    """
    logs = logs or {}
    lines = [
        "GLMM training summary (end of training; variational inference, "
        f"{getattr(model, 'posterior_kind', '?')} posterior)",
        f" Family: {model.family.name}  ( {model.family.link.name} )",
    ]
    design = getattr(model, "design", None)
    if design is not None:
        lines.append(f"Formula: {design.spec.formula}")
    if epochs is not None:
        stop = "" if stopped_early is None else ("  (stopped early)" if stopped_early else "")
        lines.append(f" Epochs: {epochs}{stop}")
    parts = [f"{key} {float(logs[key]):.6g}" for key in ("elbo", "nll", "kl") if key in logs]
    if parts:
        lines.append(" Last epoch, per observation: " + "   ".join(parts))
    lines.append("")
    lines.append("Random effects:")
    vc = results_lib.varcorr(model)
    vc = vc.astype(object).where(vc.notna(), "")
    lines.append(vc.to_string(index=False) if len(vc) else "(none)")
    dispersion = model.dispersion()
    if dispersion:
        lines.append("")
        lines.append("Dispersion: " + ", ".join(f"{k} {v:.6g}" for k, v in dispersion.items()))
    lines.append("")
    lines.append("Fixed effects (estimates):")
    try:
        fixef = pd.Series(model.coefficients(), index=results_lib.fixed_names(model), name="Estimate")
        lines.append(fixef.to_string())
    except Exception as err:  # noqa: BLE001 - the summary must be written regardless
        lines.append(f"(unavailable: {err})")
    return "\n".join(lines)


@keras.saving.register_keras_serializable(package="keras_glmm")
class GLMMTensorBoard(keras.callbacks.Callback):
    """Logs a GLMM's variance components, random effects and report to TensorBoard.

    Writes to `log_dir + "/glmm"` (TensorBoard's run `glmm`), beside the `train`
    run of `keras.callbacks.TensorBoard(log_dir)`, so the two can be used together:

    ```python
    model.fit(x, y, callbacks=[keras.callbacks.TensorBoard(log_dir), GLMMTensorBoard(log_dir)])
    ```

    Every epoch (step = Keras's epoch index): scalars `varcorr/<grp>/<var1>`
    (standard deviations), `varcorr/<grp>/corr_<var1>_<var2>` (correlations),
    `dispersion/<name>` and `elbo/elbo`, `elbo/nll`, `elbo/kl` (per observation,
    from the epoch's logs). Every `histogram_freq` epochs: histograms
    `ranef/<term>/<effect>/mean` and `.../sd` of the levels' posterior means and
    sds. At the end of training: the image `ranef/caterpillar` (when `image`) and
    the text `report`.

    The `report` text: `GLMM.fit` computes `fit_summary_` (exact ELBO, AIC),
    `converged_` and the standard errors only after Keras's `fit` returns, i.e.
    after `on_train_end`. So `on_train_end` writes `model.report()` when a fresh
    fit summary exists, and otherwise a `training_summary` of the state at that
    point (variance components, dispersion, estimates, last ELBO); `write_final`
    then writes the full `model.report()` one step later (step = number of
    epochs), once, after `GLMM.fit` has finished.

    Args:
        log_dir: the log directory (the same as Keras's TensorBoard callback's).
        histogram_freq: write the random-effect histograms every this many epochs
            (0: never).
        image: write the caterpillar plot at the end of training.
    """

    def __init__(self, log_dir, histogram_freq=1, image=True):
        super().__init__()
        histogram_freq = int(histogram_freq)
        if histogram_freq < 0:
            raise ValueError(f"`histogram_freq` must be >= 0. Received: histogram_freq={histogram_freq}")
        self.log_dir = str(log_dir)
        self.histogram_freq = histogram_freq
        self.image = bool(image)
        self._writer = None
        self._last_epoch = None
        self._stopped_early = None
        self._final_pending = False
        self._last_logs = {}

    # ------------------------------------------------------------- writer
    @property
    def run_dir(self):
        return self.log_dir.rstrip("/\\") + "/" + RUN_NAME

    @property
    def writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.run_dir)
        return self._writer

    def close(self):
        """Flushes and closes the event file (a later write opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------ summaries
    def write_scalars(self, model, step, logs=None):
        logs = logs or {}
        with self.writer.as_default(step=int(step)):
            vc = results_lib.varcorr(model)
            for row in vc.itertuples(index=False):
                if row.grp == "Residual":  # the gaussian residual sd: dispersion/scale
                    continue
                prefix = f"varcorr/{_tag(row.grp)}"
                if isinstance(row.var2, str):
                    tag = f"{prefix}/corr_{_tag(row.var1)}_{_tag(row.var2)}"
                else:
                    tag = f"{prefix}/{_tag(row.var1)}"
                tf.summary.scalar(tag, float(row.sdcor))
            for name, value in model.dispersion().items():
                tf.summary.scalar(f"dispersion/{_tag(name)}", float(value))
            for key in ("elbo", "nll", "kl"):
                if key in logs and logs[key] is not None:
                    tf.summary.scalar(f"elbo/{key}", float(logs[key]))

    def write_histograms(self, model, step):
        with self.writer.as_default(step=int(step)):
            for term in model.terms:
                names = results_lib.term_columns(model, term)
                mean = np.asarray(results_lib.conditional_mean(model, term))
                sd = np.asarray(results_lib.conditional_stddev(model, term))
                for j, name in enumerate(names):
                    prefix = f"ranef/{_tag(term.name)}/{_tag(name)}"
                    tf.summary.histogram(prefix + "/mean", mean[:, j])
                    tf.summary.histogram(prefix + "/sd", sd[:, j])

    def write_image(self, model, step):
        png = figure_to_png(caterpillar_figure(model))
        image = tf.image.decode_png(png, channels=4)
        with self.writer.as_default(step=int(step)):
            tf.summary.image("ranef/caterpillar", image[None], max_outputs=1)

    def write_report(self, text, step):
        with self.writer.as_default(step=int(step)):
            tf.summary.text("report", _code_block(text))

    def write_final(self, model=None):
        """Writes `model.report()` once `GLMM.fit` has set `fit_summary_`.

        Called after `fit` (by `GLMM.fit`, or by hand); a no-op when this training
        run's report was already written (a second call, or `on_train_end` saw a
        fresh fit summary) or when no training ended since the last call.
        """
        model = model if model is not None else self.model
        if not self._final_pending or model is None:
            return
        if getattr(model, "fit_summary_", None) is None:
            return
        self._final_pending = False
        step = 0 if self._last_epoch is None else self._last_epoch + 1
        self.write_report(model.report(), step)
        self.writer.flush()

    # ------------------------------------------------------------ callbacks
    def on_train_begin(self, logs=None):
        self._summary_at_begin = getattr(self.model, "fit_summary_", None)
        self._last_epoch = None
        self._stopped_early = None
        self._final_pending = False
        self._last_logs = {}

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = int(epoch)
        self.write_scalars(self.model, epoch, logs)
        if self.histogram_freq and (epoch + 1) % self.histogram_freq == 0:
            self.write_histograms(self.model, epoch)
        self._last_logs = dict(logs or {})
        self.writer.flush()

    def on_train_end(self, logs=None):
        model = self.model
        if self._last_epoch is None:  # no epoch ran
            return
        step = self._last_epoch
        self._stopped_early = bool(getattr(model, "stop_training", False))
        if self.histogram_freq and (step + 1) % self.histogram_freq != 0:
            self.write_histograms(model, step)  # the final state always gets one
        if self.image:
            self.write_image(model, step)
        summary = getattr(model, "fit_summary_", None)
        if summary is not None and summary is not self._summary_at_begin:
            self.write_report(model.report(), step)
        else:
            text = training_summary(
                model, logs=self._last_logs or logs, epochs=step + 1,
                stopped_early=self._stopped_early,
            )
            self.write_report(text, step)
            self._final_pending = True
        self.writer.flush()

    def get_config(self):
        return {"log_dir": self.log_dir, "histogram_freq": self.histogram_freq, "image": self.image}

    @classmethod
    def from_config(cls, config):
        # keras.callbacks.Callback defines no from_config.
        return cls(**config)
