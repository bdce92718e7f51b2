"""Seeded generators of synthetic GLMM data with known truth (crossed, nested, one factor).

Every benchmark on synthetic data draws it here, so the same seed gives the same
rows in every run and in every program (the CSV written for R is this data).
Nothing large is committed: the data are regenerated on demand.

The model of `crossed` is

```
eta_i = beta_0 + beta_x x_i + beta_z z_i + u[user_i] . (1, x_i) + v[item_i]
u_j ~ N(0, Sigma_u),  Sigma_u = diag(sd_u) [[1, rho], [rho, 1]] diag(sd_u)
v_k ~ N(0, sd_v^2)
y_i ~ Bernoulli(logistic(eta_i))    (family="binomial")
y_i ~ N(eta_i, sigma^2)             (family="gaussian")
```

with `x, z ~ N(0, 1)`. Users are drawn uniformly; items uniformly or from a Zipf
law (`item_zipf`: P(item k) proportional to k^-a, as clicks in a catalogue are).

`nested` (groups in outer groups, a random slope on the groups) and `one_factor` (one
large factor) describe their own models.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TRUTH_DEFAULTS = {
    "(Intercept)": -0.5,
    "x": 0.8,
    "z": -0.3,
    "sd_user": 0.8,
    "sd_user_x": 0.4,
    "cor_user": 0.3,
    "sd_item": 0.5,
    "sigma": 1.0,
}


def crossed(
    num_rows,
    num_users,
    num_items,
    family="binomial",
    user_slope=True,
    item_zipf=None,
    seed=0,
    truth=None,
):
    """Draws a crossed user x item data set.

    Args:
        num_rows: rows to draw.
        num_users: users (levels of `user`), drawn uniformly per row.
        num_items: items (levels of `item`).
        family: `"binomial"` (0/1 response) or `"gaussian"`.
        user_slope: users get a random slope on `x` (correlated with their intercept);
            else a random intercept only.
        item_zipf: None for uniform items, or the Zipf exponent `a > 0`.
        seed: the seed of everything.
        truth: overrides of `TRUTH_DEFAULTS`.

    Returns:
        `(data, truth)`: a DataFrame with columns y, x, z, user, item (levels as
        integer codes `0..num_users-1`, `0..num_items-1`) and the truth as a dict.
        `truth["sample"]` holds the fixed effects that this sample identifies: the
        drawn effects of the levels in the data have a mean that is not exactly 0
        (its sd is `sd_item / sqrt(num_items)`, 0.011 for 2,000 items of sd 0.5),
        and no estimator can tell it from the intercept (or the slope), so the
        sample's intercept is `beta_0` plus the means of the drawn user and item
        intercepts (and its slope on x `beta_x` plus the users' mean slope).
    """
    t = dict(TRUTH_DEFAULTS, **(truth or {}))
    if not user_slope:
        t.pop("sd_user_x")
        t.pop("cor_user")
    if family != "gaussian":
        t.pop("sigma")
    rng = np.random.default_rng(seed)
    user = rng.integers(0, num_users, num_rows, dtype=np.int32)
    if item_zipf is None:
        item = rng.integers(0, num_items, num_rows, dtype=np.int32)
    else:
        p = np.arange(1, num_items + 1, dtype=np.float64) ** -float(item_zipf)
        cdf = np.cumsum(p / p.sum())
        item = np.minimum(np.searchsorted(cdf, rng.random(num_rows)), num_items - 1).astype(np.int32)
        # Popular items anywhere in the code range, not only the first codes.
        item = rng.permutation(num_items).astype(np.int32)[item]
    x = rng.standard_normal(num_rows, dtype=np.float32)
    z = rng.standard_normal(num_rows, dtype=np.float32)
    user_int = rng.standard_normal(num_users) * t["sd_user"]
    eta = t["(Intercept)"] + t["x"] * x + t["z"] * z + user_int[user]
    if user_slope:
        rho = t["cor_user"]
        user_x = t["sd_user_x"] * (
            rho * user_int / t["sd_user"] + np.sqrt(1 - rho**2) * rng.standard_normal(num_users)
        )
        eta += user_x[user] * x
    item_int = rng.standard_normal(num_items) * t["sd_item"]
    eta += item_int[item]
    seen_users = np.bincount(user, minlength=num_users) > 0
    seen_items = np.bincount(item, minlength=num_items) > 0
    t["sample"] = {
        "(Intercept)": t["(Intercept)"] + user_int[seen_users].mean() + item_int[seen_items].mean(),
        "x": t["x"] + (user_x[seen_users].mean() if user_slope else 0.0),
        "z": t["z"],
    }
    if family == "binomial":
        y = (rng.random(num_rows) < 1 / (1 + np.exp(-eta))).astype(np.float32)
    elif family == "gaussian":
        y = (eta + t["sigma"] * rng.standard_normal(num_rows)).astype(np.float32)
    else:
        raise ValueError(f"family must be 'binomial' or 'gaussian'. Received: {family!r}")
    data = pd.DataFrame({"y": y, "x": x, "z": z, "user": user, "item": item})
    return data, t


NESTED_DEFAULTS = {
    "(Intercept)": 0.3,
    "x": 0.5,
    "sd_g": 0.6,
    "sd_g_x": 0.3,
    "cor_g": -0.2,
    "sd_h": 0.4,
    "sigma": 1.0,
}


def _response(eta, family, sigma, rng):
    if family == "binomial":
        return (rng.random(len(eta)) < 1 / (1 + np.exp(-eta))).astype(np.float32)
    if family == "gaussian":
        return (eta + sigma * rng.standard_normal(len(eta))).astype(np.float32)
    raise ValueError(f"family must be 'binomial' or 'gaussian'. Received: {family!r}")


def nested(num_rows, num_groups=2000, num_outer=50, family="gaussian", seed=0, truth=None):
    """Draws groups nested in outer groups, with a random slope on the groups.

    The model is `y ~ x + (1 + x | g) + (1 | h)`:

    ```
    eta_i = beta_0 + beta_x x_i + u[g_i] . (1, x_i) + w[h_i],   h of g_i fixed by g
    u_j ~ N(0, Sigma_g),  Sigma_g = diag(sd_g, sd_g_x) [[1, cor_g], [cor_g, 1]] diag(...)
    w_k ~ N(0, sd_h^2)
    ```

    with `x ~ N(0, 1)` and the family's response (`"gaussian"`: `N(eta, sigma^2)`,
    `"binomial"`: Bernoulli(logistic(eta))).

    Args:
        num_rows: rows to draw; each row's group is drawn uniformly.
        num_groups: levels of `g` (2,000 by default).
        num_outer: levels of `h` (50); group `j` belongs to `h = j % num_outer`, so
            each outer group holds `num_groups / num_outer` groups.
        family: `"gaussian"` or `"binomial"`.
        seed: the seed of everything.
        truth: overrides of `NESTED_DEFAULTS`.

    Returns:
        `(data, truth)`: columns y, x, g, h (integer codes; g's codes are unique
        across outer groups, so `(1|g)` is the nested term) and the truth as a dict.
    """
    t = dict(NESTED_DEFAULTS, **(truth or {}))
    if family != "gaussian":
        t.pop("sigma")
    rng = np.random.default_rng(seed)
    g = rng.integers(0, num_groups, num_rows, dtype=np.int32)
    h = (g % num_outer).astype(np.int32)
    x = rng.standard_normal(num_rows, dtype=np.float32)
    rho = t["cor_g"]
    z1 = rng.standard_normal(num_groups)
    u0 = t["sd_g"] * z1
    u1 = t["sd_g_x"] * (rho * z1 + np.sqrt(1 - rho**2) * rng.standard_normal(num_groups))
    w = t["sd_h"] * rng.standard_normal(num_outer)
    eta = t["(Intercept)"] + t["x"] * x + u0[g] + u1[g] * x + w[h]
    y = _response(eta, family, t.get("sigma", 1.0), rng)
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h}), t


def one_factor(num_rows, num_levels, family="gaussian", seed=0, sd=0.5, sigma=1.0):
    """Draws `y ~ x + (1 | g)` with `num_levels` levels of `g`, drawn uniformly.

    Returns:
        `(data, truth)`: columns y, x, g (integer codes) and
        `{"(Intercept)": 0.2, "x": 0.5, "sd_g": sd, "sigma": sigma}` (no sigma for
        the binomial).
    """
    rng = np.random.default_rng(seed)
    g = rng.integers(0, num_levels, num_rows, dtype=np.int32)
    x = rng.standard_normal(num_rows, dtype=np.float32)
    t = {"(Intercept)": 0.2, "x": 0.5, "sd_g": sd}
    if family == "gaussian":
        t["sigma"] = sigma
    eta = t["(Intercept)"] + t["x"] * x + sd * rng.standard_normal(num_levels)[g]
    y = _response(eta, family, sigma, rng)
    return pd.DataFrame({"y": y, "x": x, "g": g}), t
