"""Optimizers side by side on kb07's maximal model: which reaches lme4's optimum, how fast.

`RTtrunc ~ 1 + S + P + C + SP + SC + PC + SPC + (1 + ... + SPC | subj) + (1 + ... + SPC | item)`:
two 8 x 8 covariance factors, 72 variance parameters, the profiled log-likelihood
(lme4's objective) with its exact gradient from the engine. lme4 1.1-31 reaches
logLik -14293.1588 with bobyqa in 222 s (`tests/reference/lme4_reference_maximal.json`).

Each optimizer starts from the engine's starting point and minimizes the same
function (`LinearMixed.objective`); times are the optimizer's
alone (one BLAS thread, as the engine runs it):

- the engine's bounded BFGS with the average-information curvature alone (its
  rule before the convergence check), run until it claims convergence;
- scipy's L-BFGS-B with the exact gradient;
- NLopt's LN_BOBYQA (derivative-free, lme4's nloptwrap and MixedModels.jl's default);
- Py-BOBYQA (derivative-free, Powell's BOBYQA as lme4's `bobyqa`);
- the engine as shipped (`kg.glmm`: L-BFGS-B, the convergence check, the bound tests).

    python benchmarks/bench_optimizers.py [--max-evaluations 20000]

Needs the `bench` extra (`nlopt`, `Py-BOBYQA`); missing ones are skipped.
"""

import argparse
import time
import warnings

import numpy as np
import scipy.optimize

import keras_glmm as kg
from keras_glmm.engine import quasi_newton
from keras_glmm.engine import solver as solver_lib

from _results import append_results

FORMULA = ("RTtrunc ~ 1 + S + P + C + SP + SC + PC + SPC + (1 + S + P + C + SP + SC + PC + SPC | subj) + "
           "(1 + S + P + C + SP + SC + PC + SPC | item)")
LME4_LOGLIK = -14293.1588163294
LME4_SECONDS = 222.0


def _solver_and_start(data):
    """The engine's solver for the model and its starting vector (a fit stopped after its start)."""
    captured = {}
    original = solver_lib.VariationalSolver.start

    def start(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        captured["solver"], captured["x0"] = self, self.optimizer.x.copy()
        return out

    solver_lib.VariationalSolver.start = start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kg.glmm(FORMULA, data, epochs=1)
    finally:
        solver_lib.VariationalSolver.start = original
    return captured["solver"], captured["x0"]


class Counted:
    """The objective with an evaluation count and the best value seen."""

    def __init__(self, function):
        self.function, self.count, self.best = function, 0, np.inf

    def __call__(self, x):
        self.count += 1
        value, gradient = self.function(np.asarray(x, dtype=np.float64))
        if np.isfinite(value):
            self.best = min(self.best, value)
        return value, gradient

    def value(self, x, *unused):
        value = self(x)[0]
        return value if np.isfinite(value) else 1e300


def run_bounded_bfgs(solver, x0, budget):
    f = Counted(solver.stage.objective)
    opt = quasi_newton.BoundedBFGS(f, x0, solver.parameters.lower, curvature=solver.stage.curvature,
                                   refresh="always", tolerance=1e-12, canonical=solver.parameters.canonical)
    while not opt.step() and f.count < budget:
        pass
    return f


def run_lbfgsb(solver, x0, budget):
    f = Counted(solver.stage.objective)
    bounds = [(lo, None) if np.isfinite(lo) else (None, None) for lo in solver.parameters.lower]
    scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxfun": budget, "maxiter": budget, "ftol": 1e-15, "gtol": 1e-9})
    return f


def run_nlopt_bobyqa(solver, x0, budget):
    import nlopt

    f = Counted(solver.stage.objective)
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_lower_bounds(np.where(np.isfinite(solver.parameters.lower), solver.parameters.lower, -1e10))
    opt.set_min_objective(lambda x, grad: f.value(x))
    # lme4's nloptwrap settings: ftol_abs 1e-8, xtol_abs 1e-8 (1e-6 in older versions).
    opt.set_ftol_abs(1e-8)
    opt.set_xtol_abs(1e-8)
    opt.set_maxeval(budget)
    opt.set_initial_step(np.where(np.isfinite(solver.parameters.lower), 0.75, 0.25))
    try:
        opt.optimize(np.array(x0, dtype=np.float64))
    except nlopt.RoundoffLimited:
        pass
    return f


def run_pybobyqa(solver, x0, budget):
    import pybobyqa

    f = Counted(solver.stage.objective)
    lower = np.where(np.isfinite(solver.parameters.lower), solver.parameters.lower, -1e10)
    pybobyqa.solve(f.value, np.array(x0, dtype=np.float64), bounds=(lower, np.full(len(x0), 1e10)),
                   maxfun=budget, rhobeg=0.2, rhoend=1e-8, seek_global_minimum=False, scaling_within_bounds=False)
    return f


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-evaluations", type=int, default=20_000)
    args = parser.parse_args()
    data = kg.datasets.load_kb07()
    solver, x0 = _solver_and_start(data)
    rows = []
    runs = [("engine's bounded BFGS + AI curvature alone", run_bounded_bfgs),
            ("scipy L-BFGS-B, exact gradient", run_lbfgsb),
            ("NLopt LN_BOBYQA (derivative-free)", run_nlopt_bobyqa),
            ("Py-BOBYQA (derivative-free)", run_pybobyqa)]
    with solver.threads():
        for name, run in runs:
            try:
                start = time.perf_counter()
                f = run(solver, x0, args.max_evaluations)
                seconds = time.perf_counter() - start
            except ImportError as err:
                print(f"{name}: skipped ({err})")
                continue
            rows.append({"optimizer": name, "seconds": round(seconds, 2), "evaluations": f.count,
                         "logLik": round(-f.best, 4), "minus lme4's": round(-f.best - LME4_LOGLIK, 4)})
            print(rows[-1], flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        fit = kg.glmm(FORMULA, data)
        seconds = time.perf_counter() - start
    rows.append({"optimizer": "kg.glmm as shipped (formula to fit, checked)", "seconds": round(seconds, 2),
                 "evaluations": None, "logLik": round(fit.logLik(), 4),
                 "minus lme4's": round(fit.logLik() - LME4_LOGLIK, 4)})
    print(rows[-1])
    rows.append({"optimizer": "lme4 1.1-31 bobyqa (reference time)", "seconds": LME4_SECONDS, "evaluations": None,
                 "logLik": LME4_LOGLIK, "minus lme4's": 0.0})
    notes = (f"- One evaluation is the profiled log-likelihood and its gradient (blocked Cholesky and "
             f"selected inverse), ~{1000 * rows[1]['seconds'] / max(rows[1]['evaluations'], 1):.0f} ms here; "
             f"the derivative-free methods use the value only. Budget {args.max_evaluations} evaluations.\n"
             f"- kg.glmm converged: {fit.converged_}; check: {fit.fit_summary_['convergence']}.")
    append_results("Optimizers on kb07's maximal model", "python benchmarks/bench_optimizers.py", rows, notes=notes)
    print(notes)


if __name__ == "__main__":
    main()
