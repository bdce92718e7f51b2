"""`fit.plot_ranef()` and `fit.plot_residuals()` (keras_glmm.plots): what the figures hold."""

import numpy as np
import pytest

import keras_glmm as kg
from keras_glmm import plots
from keras_glmm.tensorboard import caterpillar_figure


@pytest.fixture(scope="module")
def sleep_fit():
    return kg.glmm("Reaction ~ Days + (Days | Subject)", kg.datasets.load_sleepstudy())


@pytest.fixture(scope="module")
def cbpp_fit():
    return kg.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", kg.datasets.load_cbpp(),
                   family="binomial")


def _points(axes):
    """The (x, y) of an errorbar panel's points."""
    line = axes.containers[0].lines[0]
    return np.asarray(line.get_xdata(), "float64"), np.asarray(line.get_ydata(), "float64")


def test_plot_ranef_shares_one_level_order_across_panels(sleep_fit):
    figure = sleep_fit.plot_ranef()
    intercept, days = figure.axes
    ranef = sleep_fit.ranef()["Subject"]
    order = np.argsort(ranef["(Intercept)"].to_numpy(), kind="stable")
    expected_levels = [str(level) for level in ranef.index[order]]
    # The first panel names the levels, sorted by the first effect (lme4's dotplot) ...
    assert [t.get_text() for t in intercept.get_yticklabels()] == expected_levels
    x0, y0 = _points(intercept)
    np.testing.assert_array_equal(y0, np.arange(18))
    np.testing.assert_allclose(x0, ranef["(Intercept)"].to_numpy()[order])
    assert np.all(np.diff(x0) >= 0)
    # ... and the second panel keeps each level on its row (not sorted by its own values).
    x1, y1 = _points(days)
    np.testing.assert_allclose(x1, ranef["Days"].to_numpy()[order])
    assert not np.all(np.diff(x1) >= 0)
    assert days.get_shared_y_axes().joined(intercept, days)
    # 95% intervals: mean +- 1.96 posterior sd.
    bars = intercept.containers[0].lines[2][0].get_segments()
    half = np.array([(seg[1][0] - seg[0][0]) / 2 for seg in bars])
    np.testing.assert_allclose(half, 1.959964 * ranef["(Intercept) sd"].to_numpy()[order], rtol=1e-5)
    assert intercept.get_title() == "Subject: (Intercept)" and days.get_title() == "Subject: Days"
    assert intercept.get_xlabel() == "effect on Reaction (95% interval)"
    assert days.get_xlabel() == "effect on Reaction per unit of Days (95% interval)"
    assert intercept.get_ylabel() == "Subject"


def test_plot_ranef_link_scale_and_max_levels(cbpp_fit):
    (axes,) = cbpp_fit.plot_ranef().axes
    assert axes.get_xlabel() == "effect on log-odds of incidence (95% interval)"
    assert len(_points(axes)[0]) == 15
    (axes,) = cbpp_fit.plot_ranef(max_levels=5, prob=0.5).axes
    x, _ = _points(axes)
    assert len(x) == 5 and axes.get_xlabel() == "effect on log-odds of incidence (50% interval)"
    means = np.sort(cbpp_fit.ranef()["herd"]["(Intercept)"].to_numpy())
    assert x[0] == pytest.approx(means[0]) and x[-1] == pytest.approx(means[-1])  # the extremes kept
    with pytest.raises(ValueError, match="prob"):
        cbpp_fit.plot_ranef(prob=1.5)


def test_caterpillar_figure_is_the_ranef_figure(sleep_fit):
    ours, board = sleep_fit.plot_ranef(), caterpillar_figure(sleep_fit)
    assert [a.get_title() for a in board.axes] == [a.get_title() for a in ours.axes]
    for a, b in zip(ours.axes, board.axes):
        np.testing.assert_array_equal(_points(a)[0], _points(b)[0])


def test_plot_residuals(sleep_fit):
    figure = sleep_fit.plot_residuals()
    assert [a.get_title() for a in figure.axes] == [
        "Residuals vs fitted", "Normal Q-Q: residuals", "Normal Q-Q: Subject: (Intercept)",
        "Normal Q-Q: Subject: Days"]
    scatter = figure.axes[0].lines[0]
    np.testing.assert_allclose(scatter.get_xdata(), np.asarray(sleep_fit.fitted()))
    np.testing.assert_allclose(scatter.get_ydata(), np.asarray(sleep_fit.residuals()))
    assert figure.axes[0].get_xlabel() == "fitted Reaction"
    assert figure.axes[0].get_ylabel() == "residual (Reaction - fitted)"
    qq = figure.axes[1].lines[0]
    assert len(qq.get_xdata()) == 180
    np.testing.assert_allclose(qq.get_xdata(), plots.normal_quantiles(180))
    assert np.all(np.diff(qq.get_ydata()) >= 0)
    modes = figure.axes[2].lines[0]
    np.testing.assert_allclose(modes.get_ydata(), np.sort(sleep_fit.ranef()["Subject"]["(Intercept)"]))
    assert figure.axes[3].get_ylabel() == "conditional mode (Reaction per unit of Days)"


def test_normal_quantiles_are_r_ppoints():
    # R: qnorm(ppoints(20)) for n > 10 is qnorm((1:20 - 0.5) / 20)
    np.testing.assert_allclose(plots.normal_quantiles(20)[:3], [-1.959964, -1.439531, -1.150349], atol=1e-6)


def test_plots_of_the_array_api():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(12), 10)
    y = 1.0 + rng.normal(size=12)[g] + rng.normal(size=120)
    model = kg.GLMM(random_effects=[kg.RandomEffects(12, name="g")])
    model.fit({"x": np.ones((120, 1)), "g": g}, y)
    (axes,) = model.plot_ranef().axes
    assert axes.get_title() == "g: (Intercept)" and axes.get_xlabel() == "effect on y (95% interval)"
    assert len(model.plot_residuals().axes) == 3
