"""Minnesota radon: keras_glmm against lme4 and TensorFlow Probability's GLMM tutorial.

The model is a varying-intercept regression of log radon on the floor of the
reading (0 = basement, 1 = first floor), with one random intercept per county:

    log_radon_i = beta_0 + beta_1 floor_i + b_county(i) + e_i
    b_c ~ N(0, tau^2),  e_i ~ N(0, sigma^2)

Two fits by keras_glmm:

(a) the TFP tutorial's exact model ("Fitting Generalized Linear Mixed-effects
    Models Using Variational Inference"): Normal(0, 1) priors on beta_0 and beta_1,
    a HalfNormal(1) hyperprior on tau, and sigma fixed at 1;
(b) the model one would fit with lme4: sigma learned, tau an empirical-Bayes point
    estimate. Its ELBO is then the exact marginal likelihood at the optimum, so its
    -ELBO is comparable with lme4's -logLik.

The script prints a table of both fits beside the reference numbers, writes the
tutorial's two figures (county effects, their posterior sds) as PNG files into
`examples/output/`, and TensorBoard logs of the ELBO into `examples/output/logs/`.

Run: `make example` (or `python examples/radon.py`).
"""

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_glmm as kg  # noqa: E402

OUTPUT_DIR = Path(__file__).resolve().parent / "output"

# lme4 1.1: lmer(log_radon ~ floor + (1 | county)) on the same 919 rows.
LME4_REML = dict(intercept=1.4616, floor=-0.6930, county_sd=0.3282, residual_sd=0.7556)
LME4_ML = dict(intercept=1.4612, floor=-0.6926, county_sd=0.3245, residual_sd=0.7552,
               neg_elbo=1081.825)
# The TFP tutorial's published posterior means (its residual sd is fixed at 1).
TUTORIAL = dict(intercept=1.4353, floor=-0.6702, county_sd=0.2873, residual_sd=1.0)


def radon_inputs(df):
    """The model's input dict (intercept and floor columns, county index) and response."""
    x = {
        "x": np.stack([np.ones(len(df)), df["floor"].to_numpy(dtype="float64")], axis=1),
        "county": df["county_code"].to_numpy(),
    }
    return x, df["log_radon"].to_numpy(dtype="float64")


def _tensorboard(name):
    log_dir = OUTPUT_DIR / "logs" / name
    # Epoch-level scalars only: `loss` (-ELBO per observation), `elbo`, `nll`, `kl`.
    return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False), log_dir


def _summary(model, x, y, seconds, history, log_dir):
    county = model.random_effects[0]
    return dict(
        model=model,
        intercept=float(model.coefficients()[0]),
        floor=float(model.coefficients()[1]),
        county_sd=float(county.prior_stddev()[0]),
        residual_sd=model.dispersion()["scale"],
        neg_elbo=-model.elbo(x, y)["elbo"],
        seconds=seconds,
        epochs=len(history.epoch),
        converged=model.converged_,
        county_means=county.conditional_mean()[:, 0],
        county_sds=county.conditional_stddev()[:, 0],
        log_dir=log_dir,
    )


def fit_right_model(df, tensorboard=True):
    """lme4's model: learned residual sd, empirical-Bayes county sd, point fixed effects."""
    x, y = radon_inputs(df)
    callbacks, log_dir = [], None
    if tensorboard:
        cb, log_dir = _tensorboard("right_model")
        callbacks.append(cb)
    start = time.perf_counter()
    model = kg.GLMM(
        random_effects=[kg.RandomEffects(85, name="county")],
        family="gaussian",
    )
    history = model.fit(x, y, callbacks=callbacks)
    seconds = time.perf_counter() - start
    return _summary(model, x, y, seconds, history, log_dir)


def fit_tutorial_model(df, tensorboard=True):
    """The TFP tutorial's model: N(0,1) fixed-effect priors, HalfNormal(1) on tau, sigma = 1.

    The expectation over q(tau) is by quadrature, so this ELBO is deterministic too
    and the default convergence rule applies.
    """
    x, y = radon_inputs(df)
    callbacks = []
    log_dir = None
    if tensorboard:
        cb, log_dir = _tensorboard("tutorial_model")
        callbacks.append(cb)
    start = time.perf_counter()
    model = kg.GLMM(
        random_effects=[kg.RandomEffects(85, scale_prior=1.0, name="county")],
        fixed_effects=kg.VariationalFixedEffects(prior_scale=1.0),
        family="gaussian",
        fixed_params={"scale": 1.0},
    )
    history = model.fit(x, y, callbacks=callbacks)
    seconds = time.perf_counter() - start
    return _summary(model, x, y, seconds, history, log_dir)


def print_table(right, tutorial_fit):
    header = (f"{'fit':<36}{'intercept':>10}{'floor':>9}{'county sd':>11}"
              f"{'resid sd':>10}{'-ELBO':>10}{'seconds':>9}")
    print(header)
    print("-" * len(header))

    def row(name, r, neg="", secs=""):
        neg = f"{r['neg_elbo']:.3f}" if "neg_elbo" in r else neg
        secs = f"{r['seconds']:.2f}" if "seconds" in r else secs
        print(f"{name:<36}{r['intercept']:>10.4f}{r['floor']:>9.4f}{r['county_sd']:>11.4f}"
              f"{r['residual_sd']:>10.4f}{neg:>10}{secs:>9}")

    row("lme4 REML", LME4_REML)
    row("lme4 ML (-logLik)", LME4_ML)
    row("TFP tutorial, published (sd = 1)", TUTORIAL)
    row("keras_glmm (a) tutorial's model", tutorial_fit)
    row("keras_glmm (b) learned sd, EB tau", right)
    print("-" * len(header))
    print("-ELBO is in nats over all 919 rows; (a)'s is that of the tutorial's model "
          "(sigma = 1, with priors),\nnot comparable with lme4's -logLik. (b)'s ELBO is "
          "the marginal likelihood at the optimum.")
    for name, r in (("(a)", tutorial_fit), ("(b)", right)):
        print(f"{name}: {r['epochs']} epochs of 100 full-batch steps, converged={r['converged']}")


def plot_figures(df, right, tutorial_fit=None):
    """The tutorial's two figures, for model (b) (model (a) overlaid in grey)."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    counts = np.bincount(df["county_code"].to_numpy(), minlength=85)
    names = list(df["county"].cat.categories) if hasattr(df["county"], "cat") else [
        str(i) for i in range(85)
    ]
    order = np.argsort(counts, kind="stable")
    positions = np.arange(len(order))

    fig, ax = plt.subplots(figsize=(16, 6))
    if tutorial_fit is not None:
        ax.errorbar(positions + 0.25, tutorial_fit["county_means"][order],
                    yerr=tutorial_fit["county_sds"][order], fmt="s", ms=3, color="0.6",
                    elinewidth=1, label="(a) tutorial's model (sd fixed at 1)")
    ax.errorbar(positions, right["county_means"][order], yerr=right["county_sds"][order],
                fmt="o", ms=4, color="C0", elinewidth=1.2,
                label="(b) learned residual sd, empirical-Bayes county sd")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{names[i]} ({counts[i]})" for i in order], rotation=90, fontsize=6)
    ax.set_xlim(-1, len(order))
    ax.set_ylabel("county effect (log radon), mean ± 1 posterior sd")
    ax.set_title("County random effects, counties sorted by number of readings (in brackets)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    effects_path = OUTPUT_DIR / "radon_county_effects.png"
    fig.savefig(effects_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    if tutorial_fit is not None:
        ax.scatter(np.log1p(counts), tutorial_fit["county_sds"], s=14, color="0.6", marker="s",
                   label="(a) tutorial's model")
    ax.scatter(np.log1p(counts), right["county_sds"], s=16, color="C0",
               label="(b) learned residual sd, EB county sd")
    ax.set_xlabel("log(1 + number of readings in the county)")
    ax.set_ylabel("posterior sd of the county effect")
    ax.set_title("More readings, less posterior uncertainty")
    ax.legend()
    fig.tight_layout()
    sds_path = OUTPUT_DIR / "radon_county_sds.png"
    fig.savefig(sds_path, dpi=120)
    plt.close(fig)
    return effects_path, sds_path


def main():
    df = kg.datasets.load_radon()
    print(f"Minnesota radon: {len(df)} readings in {df['county_code'].nunique()} counties\n")
    right = fit_right_model(df)
    tutorial_fit = fit_tutorial_model(df)
    print_table(right, tutorial_fit)
    paths = plot_figures(df, right, tutorial_fit)
    print("\nFigures:")
    for p in paths:
        print(f"  {os.path.relpath(p)}")
    logs = OUTPUT_DIR / "logs"
    print(f"TensorBoard logs of the ELBO: {os.path.relpath(logs)}  "
          f"(view with `tensorboard --logdir {os.path.relpath(logs)}`)")

    # The same lme4 model from its formula, with lme4's report; REML as lme4's default.
    print("\nkg.glmm('log_radon ~ floor + (1 | county)', df, reml=True).report():\n")
    fit = kg.glmm("log_radon ~ floor + (1 | county)", df, reml=True)
    print(fit.report())
    return right, tutorial_fit


if __name__ == "__main__":
    main()
