"""InstEval: keras_glmm against lme4, timed in the same run.

`y ~ service + (1|s) + (1|d) + (1|dept)`: 73,421 lecture evaluations, 2,972 students
crossed with 1,128 lecturers nested in 14 departments. lme4 runs through Rscript
when R and lme4 are installed (Debian: `apt-get install r-base-core r-cran-lme4`);
otherwise its reference time (20.98 s on a 2-core machine like this one) is used and
the table says so.

Usage:
    python benchmarks/bench_insteval.py
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import keras_glmm as kg  # noqa: E402
from _results import append_results  # noqa: E402
from _rscript import run_rscript  # noqa: E402

FORMULA = "y ~ C(service) + (1|s) + (1|d) + (1|dept)"
LME4 = {  # lme4 1.1-31 ML fit (shared/reference/lme4_reference.json)
    "(Intercept)": 3.2825809607, "service": -0.092588542006,
    "se": [0.028408338713, 0.013383152496],
    "s": 0.32552770945, "d": 0.51498280367, "dept": 0.07851934835, "Residual": 1.1774930546,
    "logLik": -118860.884387946, "seconds": 20.984,
}

R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1])
for (c in c("s", "d", "dept", "service")) d[[c]] <- factor(d[[c]])
t <- system.time(f <- lmer(y ~ service + (1|s) + (1|d) + (1|dept), d, REML = FALSE))
vc <- as.data.frame(VarCorr(f))
cat(sprintf('{"seconds": %f, "fixef": [%s], "sd": [%s], "logLik": %f, "version": "%s"}\n',
    t[["elapsed"]], paste(fixef(f), collapse=","), paste(vc$sdcor, collapse=","),
    as.numeric(logLik(f)), as.character(packageVersion("lme4"))))
"""


def main():
    data = kg.datasets.load_insteval()
    start = time.perf_counter()
    fit = kg.glmm(FORMULA, data)
    seconds = time.perf_counter() - start
    fixef = fit.fixef().values
    sds = fit.varcorr()["sdcor"].values
    se = np.sqrt(np.diag(fit.vcov().values))
    lme4 = run_rscript(R_SCRIPT, data, "lme4", timeout=600)
    measured = lme4 is not None
    lme4_seconds = lme4["seconds"] if measured else LME4["seconds"]
    ref_sd = [LME4["s"], LME4["d"], LME4["dept"], LME4["Residual"]]
    rows = [
        {"fit": "lme4 ML" + ("" if measured else " (reference time)"),
         "seconds": round(lme4_seconds, 2), "(Intercept)": LME4["(Intercept)"],
         "service": LME4["service"], "sd s": LME4["s"], "sd d": LME4["d"],
         "sd dept": LME4["dept"], "residual": LME4["Residual"], "logLik or ELBO": LME4["logLik"],
         "SE (Intercept)": LME4["se"][0]},
        {"fit": f"keras_glmm ({fit.posterior_kind} posterior)", "seconds": round(seconds, 2),
         "(Intercept)": round(float(fixef[0]), 6), "service": round(float(fixef[1]), 6),
         "sd s": round(float(sds[0]), 5), "sd d": round(float(sds[1]), 5),
         "sd dept": round(float(sds[2]), 5), "residual": round(float(sds[3]), 5),
         "logLik or ELBO": round(fit.fit_summary_["elbo"], 2), "SE (Intercept)": round(float(se[0]), 6)},
    ]
    worst_sd = max(abs(a / b - 1) for a, b in zip(sds, ref_sd))
    notes = (
        f"- Time ratio lme4 / keras_glmm: **{lme4_seconds / seconds:.1f}x** "
        f"({'both measured in this run' if measured else 'lme4 not installed: its reference time'}).\n"
        f"- keras_glmm seconds: `kg.glmm(formula, data)` from the data frame to the fitted "
        f"model (design, checks, tracing, {fit.fit_summary_['epochs']} closed-form steps); "
        f"converged: {fit.converged_}. The standard errors (sparse Schur complement) are "
        "computed after, outside the timing.\n"
        f"- Largest relative sd difference from lme4: {worst_sd:.2%}; fixed effects differ by "
        f"{abs(fixef[0] - LME4['(Intercept)']) / LME4['se'][0]:.3f} and "
        f"{abs(fixef[1] - LME4['service']) / LME4['se'][1]:.3f} lme4 SEs.\n"
        "- The ELBO is a lower bound of the log-likelihood: the students' and lecturers' "
        "posteriors are independent of each other given the departments and fixed effects."
    )
    versions = {"lme4": lme4["version"]} if measured else None
    append_results("InstEval: keras_glmm vs lme4", "python benchmarks/bench_insteval.py", rows,
                   notes=notes, versions=versions)
    for row in rows:
        print(row)
    print(notes)


if __name__ == "__main__":
    main()
