"""A pilot fit: the start of a GLMM fit on many rows, fitted to a share of its levels.

On many rows each evaluation of the profiled ELBO (`keras_glmm.engine.variational`)
is a quadrature over all of them, and from a generic start the outer iterations far
from the optimum (where the working-model curvature overshoots) cost the most. The
same model fitted to a share of the data lands near the optimum for a fraction of
the cost; the full fit starts there, and its own optimizer and end check decide the
answer (the same optimum: the 1M-row fit's ELBO agreed to 1e-9).
"""

import numpy as np

# Non-gaussian fits of at least this many rows start from a pilot fit to a
# `PILOT_SHARE` of them. Measured on nested binary data (`y ~ x + (x|g) + (1|h)`):
# 1e5 rows 1.54 s -> 1.17 s with an eighth (1.24 s with a quarter), 1e6 rows
# 21.6 s -> 10.5 s; crossed 1e5 rows 4.13 s -> 4.02 s.
PILOT_FROM_ROWS = 2**16
PILOT_SHARE = 1 / 8
# The pilot's seed: the same data give the same start, hence the same fit.
PILOT_SEED = 0


def pilot_start(solver, lambdas, beta=None, dispersion=None, zi=None):
    """`solver.start`'s arguments fitted to every row of a random `PILOT_SHARE` of the levels
    of the largest term (a `VariationalSolver` of those rows, by VI to its convergence).

    Whole levels keep their within-level information; the other terms keep most of
    their levels. The pilot starts from the given point; the full fit starts from its
    variance parameters, fixed effects and posterior means.

    Returns the full fit's start (`lambdas`, `beta`, `dispersion`, `u`, `zi`), or None (the given start stands)
    where the share holds too few rows, or the pilot fails, ends on a bound or does
    not converge.
    """
    structure = solver.structure
    largest = structure.random_blocks[0]
    keep = np.random.default_rng(PILOT_SEED).random(largest.num_levels) < PILOT_SHARE
    rows = np.flatnonzero(keep[largest.index])
    if len(rows) < PILOT_SHARE * solver.num_rows / 2:
        return None  # a few levels hold most rows: the share would say little
    given = [structure.random_blocks[structure.order[j]] for j in range(structure.num_random)]
    terms = [(block.name, block.index[rows], block.z[rows], block.num_levels, block.correlated)
             for block in given]
    pilot = type(solver)(
        structure.fixed_block.z[rows], terms, solver.y[rows], solver.family,
        trials=None if solver.trials is None else solver.trials[rows], weights=solver.weights[rows],
        offset=solver.offset[rows], fixed_params=solver.fixed_params, num_points=solver.stage.num_points,
        memory_budget=solver.memory_budget, agq_points=0,
        zi_design=solver.parameters.zi_design[rows] if solver.parameters.num_zi else None)
    try:
        pilot.start(lambdas, beta, dispersion, None, zi, pilot=False)
        if not pilot.fit_variational():
            return None
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):
        return None
    if np.any(pilot.optimizer.x <= pilot.parameters.lower):
        return None  # a boundary of the share's fit says little of the full data's
    fitted = pilot.results()
    return {"lambdas": fitted["factors"], "beta": fitted["beta"],
            "dispersion": {k: v for k, v in fitted["dispersion"].items() if k not in solver.fixed_params},
            "u": [pilot.state.means[structure.order[j]] for j in range(structure.num_random)],
            "zi": fitted.get("zi")}
