"""A crossed logistic GLMM on 1M rows: keras_glmm against glmer, and both against the truth.

`y ~ x + z + (1 + x | user) + (1 | item)`, binomial: 1,000,000 rows, 20,000 users
(correlated random intercept and slope), 2,000 items, drawn by `synthetic.crossed`
(seed 1 unless `--seed`). glmer runs at its fastest setting (`nAGQ = 0`) through
Rscript when R and lme4 are installed (Debian: `apt-get install r-base-core
r-cran-lme4`), on the same rows (written to a temporary CSV), in the same run; it
takes the better part of an hour on 2 cores: `--no-glmer` skips it, and
`--glmer-json FILE` reuses the result line (the JSON that the R script prints last)
of an earlier glmer run on the same rows, which the table then marks as such.
Estimates are compared with the simulation's truth and with the fixed effects that
the sample identifies (`synthetic.crossed`); other seeds show the spread.

Usage:
    python benchmarks/bench_crossed.py [--rows 1000000] [--seed 1] [--no-glmer | --glmer-json FILE]
"""

import argparse
import json
import os
import resource
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))

import keras_glmm as kg  # noqa: E402
from keras_glmm.model import default_batch_size  # noqa: E402
import synthetic  # noqa: E402
from _results import append_results  # noqa: E402
from _rscript import run_rscript  # noqa: E402

FORMULA = "y ~ x + z + (1 + x | user) + (1 | item)"
NAMES = ["(Intercept)", "x", "z", "sd user", "sd user:x", "cor user", "sd item"]

R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1])
d$user <- factor(d$user); d$item <- factor(d$item)
cpu <- proc.time()
t <- system.time(f <- glmer(y ~ x + z + (1 + x | user) + (1 | item), d, family = binomial, nAGQ = 0))
vc <- as.data.frame(VarCorr(f))
cat(sprintf('{"seconds": %f, "cpu": %f, "fixef": [%s], "se": [%s], "sdcor": [%s], "logLik": %f, "version": "%s"}\n',
    t[["elapsed"]], t[["user.self"]] + t[["sys.self"]], paste(fixef(f), collapse=","),
    paste(sqrt(diag(as.matrix(vcov(f)))), collapse=","), paste(vc$sdcor, collapse=","),
    as.numeric(logLik(f)), as.character(packageVersion("lme4"))))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-glmer", action="store_true")
    parser.add_argument("--glmer-json", help="result line of an earlier glmer run on the same rows")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data, truth = synthetic.crossed(args.rows, args.users, args.items, seed=args.seed)
    truth_values = [truth[k] for k in ("(Intercept)", "x", "z", "sd_user", "sd_user_x", "cor_user", "sd_item")]
    sample_fixed = [truth["sample"][k] for k in ("(Intercept)", "x", "z")]

    start = time.perf_counter()
    fit = kg.glmm(FORMULA, data, family="binomial")
    seconds = time.perf_counter() - start
    ours = [*fit.fixef().values, *fit.varcorr()["sdcor"].values]
    reused = bool(args.glmer_json)
    if reused:
        with open(args.glmer_json) as f:
            glmer = json.loads(f.read().strip().splitlines()[-1])
    else:
        glmer = None if args.no_glmer else run_rscript(R_SCRIPT, data, "glmer", timeout=None)

    def row(name, secs, values, epochs=""):
        out = {"fit": name, "seconds": round(secs, 1) if secs else None, "epochs": epochs}
        out.update({n: round(float(v), 4) for n, v in zip(NAMES, values)})
        out["max |fixed - truth|"] = round(max(abs(a - b) for a, b in zip(values[:3], truth_values[:3])), 4)
        out["max |fixed - sample's|"] = round(max(abs(a - b) for a, b in zip(values[:3], sample_fixed)), 4)
        out["max sd rel. error"] = f"{max(abs(values[i] / truth_values[i] - 1) for i in (3, 4, 6)):.1%}"
        return out

    rows = [
        row("truth (simulation)", None, truth_values),
        row("truth, this sample's fixed effects", None, [*sample_fixed, *truth_values[3:]]),
    ]
    if glmer is not None:
        label = "glmer nAGQ=0" + (" (earlier run, same rows)" if reused else "")
        rows.append(row(label, glmer["seconds"], [*glmer["fixef"], *glmer["sdcor"]]))
    rows.append(row("keras_glmm (mean-field, minibatch)", seconds, ours, fit.fit_summary_["epochs"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    notes = [
        f"- Data: `synthetic.crossed({args.rows}, {args.users}, {args.items}, seed={args.seed})`, "
        f"`{FORMULA}`, binomial; {data.y.mean():.3f} of the responses are 1.",
        f"- keras_glmm seconds: `kg.glmm(formula, data, family='binomial')` from the data frame "
        f"to the fitted model (design, GLM start, tracing, {fit.fit_summary_['epochs']} epochs of "
        f"{default_batch_size(args.rows):,}-row batches, natural-gradient steps for the random "
        "effects, M-steps for their covariances); "
        f"converged: {fit.converged_}; peak resident memory of the process {peak:.2f} GiB.",
    ]
    if glmer is not None:
        cpu = glmer.get("cpu")
        notes.append(
            f"- Time ratio glmer / keras_glmm: **{glmer['seconds'] / seconds:.0f}x** elapsed"
            + (f", {cpu / seconds:.0f}x against glmer's CPU time ({cpu:.0f} s)" if cpu else "")
            + (f" (glmer from `{args.glmer_json}`, an earlier run on the same rows)" if reused
               else " (both measured in this run)") + "."
        )
    else:
        notes.append("- glmer not run (`--no-glmer`, or R/lme4 not installed).")
    notes.append(
        "- Errors are against the simulation's truth: the estimation error of either method "
        f"includes the sampling error of {args.users:,} users and {args.items:,} items (about "
        f"{100 / (2 * args.items) ** 0.5:.1f}% on the item sd). The sample's fixed effects add "
        "the means of the drawn effects of the levels in the data, which no estimator can tell "
        "from the fixed effects (`synthetic.crossed`): here "
        f"{sample_fixed[0] - truth_values[0]:+.4f} on the intercept "
        f"(the items' mean has sd {truth_values[6] / args.items ** 0.5:.4f}) and "
        f"{sample_fixed[1] - truth_values[1]:+.4f} on x."
    )
    notes = "\n".join(notes)
    if not args.no_record:
        append_results(
            "Crossed logistic GLMM, 1M rows: keras_glmm vs glmer",
            "python benchmarks/bench_crossed.py" + (f" --seed {args.seed}" if args.seed != 1 else "")
            + (" --no-glmer" if args.no_glmer else "")
            + (f" --glmer-json {args.glmer_json}" if reused else ""),
            rows, notes=notes, versions={"lme4": glmer["version"]} if glmer else None,
        )
    for r in rows:
        print(r)
    print(notes)


if __name__ == "__main__":
    main()
