"""pandas in, pandas out: per-row results indexed like the caller's rows.

A model fitted from a data frame (`kg.glmm`, `GLMM.from_formula`) answers a pandas
user in pandas, as R answers with named vectors and data frames:

| call | data frame in (or a formula model's training rows) | arrays in |
|---|---|---|
| `predict_response(newdata)`, `fitted()`, `residuals()`, `predict(frame)` | a `Series` indexed like the rows | a numpy array `(rows,)` |
| `simulate(nsim)` | a `DataFrame`, one row per observation, columns `sim_1` ... `sim_<nsim>` (lme4's `simulate`) | numpy `(nsim, rows)` |
| `posterior_predictive(newdata, num_draws)` | a `DataFrame`, one row per observation, columns `draw_1` ... `draw_<num_draws>` | numpy `(num_draws, rows)` |

The index is that of the rows the model used: with `na_action="omit"` the rows
with missing values are not among them (`GLMM._frame_arrays` records the index of
those it kept). Arrays in, arrays out, as before.
"""

import numpy as np
import pandas as pd


def series(values, index, name=None):
    """`values` `(rows,)` as a Series on `index`, or as they are when `index` is None."""
    if index is None:
        return values
    values = np.asarray(values)
    if len(values) != len(index):
        raise ValueError(f"{len(values)} values for {len(index)} rows of the data frame ({name}).")
    return pd.Series(values, index=index, name=name)


def draws(values, index, prefix):
    """Draws `(num_draws, rows)` as a DataFrame of rows x draws (`<prefix>_1`, ...), or as they are."""
    if index is None:
        return values
    values = np.asarray(values)
    columns = [f"{prefix}_{i + 1}" for i in range(values.shape[0])]
    return pd.DataFrame(values.T, index=index, columns=columns)
