"""Plots of a fitted GLMM: the random effects (lme4's dotplot) and the residuals.

Both return a matplotlib `Figure` drawn on an Agg canvas, outside pyplot's
state (nothing opens a window or leaks between calls; in a notebook the figure
displays as it is returned; `figure.savefig("ranef.png")` writes it).

* `ranef_figure` (`fit.plot_ranef()`): lme4's `dotplot(ranef(fit, condVar =
  TRUE))`. One row of panels per grouping factor, one panel per effect; each
  level's conditional mean with its `prob` interval, `mean +- z sd` (`z` the
  normal quantile, 1.96 for 95%; `sd` the posterior sd, lme4's condVar). The
  levels are in ONE order across a factor's panels, sorted by the first effect
  (as lme4 orders them), so a level keeps its row from panel to panel; they are
  named on the y axis (up to `LABELLED_LEVELS` levels). The x axes say the
  scale: the linear predictor's, in the response's units for an identity link
  (`effect on Reaction`), `log-odds of ...` for a logit link, and slopes per
  unit of their covariate (`effect on Reaction per unit of Days`).
* `residuals_figure` (`fit.plot_residuals()`): the response residuals against
  the fitted values (with 0 and a running mean), a normal Q-Q plot of the
  standardized residuals and one of each term's conditional modes per effect
  (lme4's `qqmath(ranef(fit))`), each with the line through the quartiles
  (R's `qqline`).

`keras_glmm.tensorboard.caterpillar_figure` draws `ranef_figure`.
"""

import math

import numpy as np
from scipy import special

from keras_glmm import results as results_lib

# Level names are written on the y axis of a factor with at most this many levels
# (drawn); beyond, the axis says how many levels are shown.
LABELLED_LEVELS = 100


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def response_name(model):
    """The response's name: the formula's (`cbind(a, b)`: `a`), `y` for the array API."""
    design = getattr(model, "design", None)
    name = None if design is None else design.spec.response
    if not name:
        return "y"
    name = str(name).strip()
    if name.startswith("cbind(") and name.endswith(")"):
        name = name[len("cbind("):-1].split(",")[0].strip()
    return name


def scale_label(model):
    """The linear predictor's scale in words: `Reaction`, `log-odds of incidence`, `log count`."""
    name = response_name(model)
    link = model.family.link.name
    return {
        "identity": name,
        "log": f"log {name}",
        "logit": f"log-odds of {name}",
        "probit": f"probit of {name}",
        "cloglog": f"cloglog of {name}",
        "inverse": f"1 / {name}",
    }.get(link, f"{link}({name})")


def _groups(model):
    """`[(group, [(effect, means (L,), sds (L,))], level names)]`: terms on one factor share it."""
    out = {}
    for term in model.terms:
        group = results_lib.term_group(model, term)
        mean = np.asarray(results_lib.conditional_mean(model, term), "float64")
        sd = np.asarray(results_lib.conditional_stddev(model, term), "float64")
        effects = [(name, mean[:, j], sd[:, j]) for j, name in enumerate(results_lib.term_columns(model, term))]
        if group in out:
            out[group][0].extend(effects)
        else:
            out[group] = (effects, [str(level) for level in results_lib.term_levels(model, term)])
    return [(group, effects, levels) for group, (effects, levels) in out.items()]


def level_order(means):
    """The levels' shared order: by the first effect's conditional mean (lme4's dotplot)."""
    return np.argsort(np.asarray(means, "float64"), kind="stable")


def ranef_figure(model, max_levels=None, prob=0.95):
    """lme4's `dotplot(ranef(fit, condVar = TRUE))` as a matplotlib `Figure`.

    Args:
        model: a fitted `GLMM`.
        max_levels: draw at most this many levels per factor (evenly spaced in the
            shared order); None draws all.
        prob: the intervals' coverage, `mean +- z sd` with `z = Phi^-1((1 + prob) / 2)`.

    Returns:
        A `Figure`: a row of panels per grouping factor, one panel per effect.
    """
    if not 0 < prob < 1:
        raise ValueError(f"`prob` must be in (0, 1). Received: prob={prob!r}")
    z = float(special.ndtri(0.5 + prob / 2))
    groups = _groups(model)
    if not groups:
        figure = _figure(4.0, 2.0)
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no random effects", ha="center", va="center")
        axes.set_axis_off()
        return figure
    columns = max(len(effects) for _, effects, _ in groups)
    heights = []
    for _, effects, levels in groups:
        shown = len(levels) if max_levels is None else min(len(levels), max_levels)
        heights.append(max(2.2, 0.14 * shown + 1.0) if shown <= LABELLED_LEVELS else 5.0)
    figure = _figure(3.6 * columns + 1.2, sum(heights))
    grid = figure.add_gridspec(len(groups), columns, height_ratios=heights)
    scale = scale_label(model)
    for row, (group, effects, levels) in enumerate(groups):
        order = level_order(effects[0][1])
        if max_levels is not None and len(order) > max_levels:
            order = order[np.linspace(0, len(order) - 1, max_levels).round().astype(int)]
        position = np.arange(len(order))
        first = None
        for col, (name, mean, sd) in enumerate(effects):
            axes = figure.add_subplot(grid[row, col], sharey=first)
            first = first or axes
            axes.errorbar(mean[order], position, xerr=z * sd[order], fmt="o", markersize=3,
                          elinewidth=0.8, color="tab:blue", ecolor="tab:gray")
            axes.axvline(0.0, color="black", linewidth=0.6)
            axes.set_title(f"{group}: {name}", fontsize=9)
            unit = scale if name == "(Intercept)" else f"{scale} per unit of {name}"
            axes.set_xlabel(f"effect on {unit} ({prob:.0%} interval)", fontsize=8)
            axes.tick_params(labelsize=7)
            axes.set_ylim(-0.7, len(order) - 0.3)
            if col == 0:
                if len(order) <= LABELLED_LEVELS:
                    axes.set_yticks(position)
                    axes.set_yticklabels([levels[i] for i in order], fontsize=7 if len(order) <= 40 else 6)
                    axes.set_ylabel(group, fontsize=8)
                else:
                    axes.set_yticks([])
                    axes.set_ylabel(f"{group} ({len(order)} of {len(levels)} levels, sorted)", fontsize=8)
            else:
                axes.tick_params(labelleft=False)
    figure.tight_layout()
    return figure


def normal_quantiles(n):
    """The normal quantiles of `n` sorted points, `Phi^-1((i - 1/2) / n)` (R's `ppoints` for n > 10)."""
    return special.ndtri((np.arange(1, n + 1) - 0.5) / n)


def _qq(axes, values, title, ylabel):
    values = np.sort(np.asarray(values, "float64")[np.isfinite(values)])
    theoretical = normal_quantiles(len(values))
    axes.plot(theoretical, values, "o", markersize=2.5, color="tab:blue")
    if len(values) >= 2:  # R's qqline: through the first and third quartiles
        q = np.quantile(values, [0.25, 0.75])
        t = special.ndtri(np.array([0.25, 0.75]))
        slope = (q[1] - q[0]) / (t[1] - t[0])
        axes.axline((t[0], q[0]), slope=slope if np.isfinite(slope) else 0.0, color="tab:red", linewidth=0.8)
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("standard normal quantiles", fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(labelsize=7)


def residuals_figure(model):
    """Residuals against fitted values and normal Q-Q plots, as a matplotlib `Figure`.

    Panels: (1) the response residuals `y - fitted` (proportions for a binomial)
    against the fitted means, with 0 and a running mean (a moving average over a
    tenth of the rows, sorted by fitted value); (2) a normal Q-Q plot of the
    residuals divided by their sd; (3...) one normal Q-Q plot per term and effect
    of the levels' conditional modes (lme4's `qqmath(ranef(fit))`).

    Needs the training rows (a fit in memory).
    """
    fitted = np.asarray(model.fitted(), "float64")
    residuals = np.asarray(model.residuals(), "float64")
    name = response_name(model)
    effects = [(group, effect, mean) for group, group_effects, _ in _groups(model)
               for effect, mean, _ in group_effects]
    count = 2 + len(effects)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = _figure(4.2 * columns, 3.4 * rows)
    axes = figure.add_subplot(rows, columns, 1)
    axes.plot(fitted, residuals, "o", markersize=2.5, alpha=0.6, color="tab:blue")
    axes.axhline(0.0, color="black", linewidth=0.6)
    if len(fitted) >= 10:
        order = np.argsort(fitted, kind="stable")
        width = max(5, len(fitted) // 10)
        smooth = np.convolve(residuals[order], np.ones(width) / width, mode="valid")
        axes.plot(fitted[order][width // 2: width // 2 + len(smooth)], smooth, color="tab:red", linewidth=1.0)
    axes.set_title("Residuals vs fitted", fontsize=9)
    axes.set_xlabel(f"fitted {name}", fontsize=8)
    axes.set_ylabel(f"residual ({name} - fitted)", fontsize=8)
    axes.tick_params(labelsize=7)
    sd = float(np.std(residuals))
    _qq(figure.add_subplot(rows, columns, 2), residuals / (sd if sd > 0 else 1.0),
        "Normal Q-Q: residuals", "standardized residual")
    scale = scale_label(model)
    for i, (group, effect, mean) in enumerate(effects):
        unit = scale if effect == "(Intercept)" else f"{scale} per unit of {effect}"
        _qq(figure.add_subplot(rows, columns, 3 + i), mean, f"Normal Q-Q: {group}: {effect}",
            f"conditional mode ({unit})")
    figure.tight_layout()
    return figure
