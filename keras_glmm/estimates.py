"""The engine's float64 estimates, reported as the engine computed them.

The layers hold their weights in Keras's default float32 (what `predict`,
`save` and the SavedModel use), while the engine (`keras_glmm.engine`) computes
in float64. Results read back from the weights carried float32's rounding into
every report: `fixef()` printed `-1.3990000486` for an estimate of
`-1.3989999999...`, and standard errors, z values and sds went the same way.

`record(model, results)` keeps the engine's final results beside a fingerprint
of the weights they were written into; `current(model)` returns them as long as
those weights are unchanged, and None once anything moved them (a later fit by
stochastic VI, `load_weights`, `BackupAndRestore`'s restore, an assignment): the
results then come from the weights, cast to float64.
"""

import hashlib

import numpy as np


def fingerprint(model):
    """A digest of the model's trainable weights (their exact bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for variable in model.trainable_weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.digest()


def record(model, results):
    """The engine's `results` (`VariationalSolver.results`) for reporting, with the weights' fingerprint.

    Call it right after the results were written into the layers.

    Returns:
        A dict: `beta`, per term `stddev` `(k,)`, `correlation` `(k, k)`, `level_means`
        `(L, k)` and `level_stddev` `(L, k)`, `dispersion` and `zi` (or None), all float64.
    """
    stddev, correlation = [], []
    for cov in results["covariances"]:
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        safe = np.where(sd > 0, sd, 1.0)
        corr = cov / np.outer(safe, safe)
        np.fill_diagonal(corr, 1.0)  # as the layers store it (`keras_glmm.fitting.engine.write_results`)
        stddev.append(sd)
        correlation.append(corr)
    return {
        "fingerprint": fingerprint(model),
        "beta": np.asarray(results["beta"], "float64").reshape(-1),
        "stddev": stddev,
        "correlation": correlation,
        "level_means": [np.asarray(m, "float64") for m in results["level_means"]],
        "level_stddev": [np.sqrt(np.maximum(np.diagonal(c, axis1=-2, axis2=-1), 0.0))
                         for c in results["level_covariances"]],
        "dispersion": {k: float(v) for k, v in results["dispersion"].items()},
        "zi": None if results.get("zi") is None else np.asarray(results["zi"], "float64").reshape(-1),
    }


def current(model):
    """The recorded estimates while the weights are those they were written into, else None."""
    fit = getattr(model, "_engine_fit", None)
    recorded = None if fit is None else fit.get("estimates")
    if recorded is None or recorded["fingerprint"] != fingerprint(model):
        return None
    return recorded


def term_value(model, term, key):
    """Term `term`'s recorded `key` (`stddev`, `correlation`, `level_means`, `level_stddev`), or None."""
    recorded = current(model)
    if recorded is None or term not in model.terms:
        return None
    return recorded[key][model.terms.index(term)].copy()
