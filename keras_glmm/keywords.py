"""Keyword arguments checked by name, with R's habits mapped to this package's words.

`kg.glmm(formula, data, REML=True)` used to fail deep inside Keras with
"Unrecognized keyword arguments passed to GLMM: {'REML': True}". An lme4 user
types lme4's names; `check_keywords` answers with the argument that exists:
`glmm() got an unexpected keyword argument 'REML': did you mean reml=True?`.
R's names with a different spelling here are in `R_NAMES`; others get the
closest names by `difflib` (case-insensitive), or the list of valid ones.
"""

import difflib
import inspect

# R's (lme4's, glmmTMB's) argument names -> this package's, or advice where there is no argument.
R_NAMES = {
    "REML": "reml",
    "nAGQ": "agq_points",
    "na.action": "na_action",
    "control": "checks",  # lmerControl(check.* = ): checks={"nobs_vs_nlev": "ignore"}
    "offset": "an offset(...) term in the formula",
    "subset": "a data frame of the rows (data[mask])",
    "contrasts": "C(x, Sum) in the formula",
}


def _suggestion(name, value, allowed):
    if name in R_NAMES:
        target = R_NAMES[name]
        if target in allowed:
            return f"did you mean {target}={value!r}?"
        return f"use {target}"
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    if close:
        names = [lowered[c] for c in close]
        if len(names) == 1:
            return f"did you mean {names[0]}={value!r}?"
        return "did you mean one of " + ", ".join(f"{n}=" for n in names) + "?"
    return "valid keyword arguments are " + ", ".join(sorted(allowed))


def check_keywords(options, allowed, caller):
    """Raises a TypeError naming the first keyword of `options` not in `allowed`.

    Args:
        options: the keyword arguments received (a dict).
        allowed: the names `caller` accepts.
        caller: the function's name for the message, e.g. `"glmm()"`.

    Raises:
        TypeError: `glmm() got an unexpected keyword argument 'REML': did you mean reml=True?`.
    """
    allowed = set(allowed)
    for name, value in options.items():
        if name not in allowed:
            raise TypeError(
                f"{caller} got an unexpected keyword argument {name!r}: {_suggestion(name, value, allowed)}")


def parameters(*functions, exclude=()):
    """The names of the keyword parameters of `functions` (no `self`, `*args` or `**kwargs`)."""
    names = set()
    for function in functions:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    return names - {"self", "cls"} - set(exclude)
