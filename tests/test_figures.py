"""report.figures: stability thresholds per optimizer (checked by direct simulation), labelled axes, no
overlapping text."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import test_lab_common  # noqa: F401  (single-threaded torch)
import torch

from optiscope.report.figures import (
    OptimizerInfo,
    optimizer_info,
    plot_loss,
    plot_one_norm,
    plot_r_med,
    plot_sharpness,
    sharpness_threshold,
)
from optiscope.utils.plotting import plt


def _diverges(spec: str, lam: float, steps: int = 3000) -> bool:
    """Run the optimizer on f(x) = lam x^2 / 2 from x = 1; diverged when |x| blew up."""
    from optiscope.optim.factory import make_optimizer

    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer(spec, [x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x ** 2).sum().backward()
        opt.step()
        if not torch.isfinite(x).all() or abs(float(x.detach())) > 1e6:
            return True
    return abs(float(x.detach())) > 1.0


@pytest.mark.parametrize("spec", ["sgdm:lr=0.05", "sgd:lr=0.05,momentum=0.5", "sgd:lr=0.05",
                                  "heavyball:lr=0.05,momentum=0.9"])
def test_momentum_threshold_separates_convergence_from_divergence(spec):
    info = optimizer_info(spec)
    th = sharpness_threshold(info)
    assert th == pytest.approx(2 * (1 + info.momentum) / 0.05)
    assert not _diverges(spec, 0.97 * th)
    assert _diverges(spec, 1.03 * th)


def test_sgdm_threshold_is_76_not_40_and_adaptive_has_none():
    assert sharpness_threshold(optimizer_info("sgdm:lr=0.05,momentum=0.9")) == pytest.approx(76.0)
    adam = optimizer_info("adam:lr=1e-3")
    assert adam.adaptive and adam.beta1 == pytest.approx(0.9) and sharpness_threshold(adam) is None
    assert sharpness_threshold(optimizer_info("signgd:lr=0.1")) is None


def _frame():
    rows = []
    for run in ("sgdm", "adam"):
        for step in range(0, 101, 20):
            rows += [(run, "", step, "loss", "", 2.0 / (1 + step)), (run, "", step, "eval_loss", "", 2.2 / (1 + step)),
                     (run, "", step, "sharpness", "", 30 + step / 5), (run, "", step, "one_norm", "", 10.0 - step / 20),
                     (run, "", step, "one_norm_eps", "", 1e-8)]
            for layer in ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                          "a_rather_long_layer_name.weight"):
                rows.append((run, "", step, "r_med", layer, 3.0 + step / 50))
            if run == "adam" and step:
                rows += [(run, "", step, "precond_sharpness", "", 1e4 + step),
                         (run, "", step, "precond_sharpness_threshold", "", 38000.0)]
    return pd.DataFrame(rows, columns=["run", "optimizer", "step", "metric", "layer", "value"])


def _texts(fig):
    out = []
    if fig._suptitle is not None:
        out.append(fig._suptitle)
    for ax in fig.axes:
        if not ax.axison:
            continue
        out += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    return out


def _assert_no_overlap(fig):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in _texts(fig)]
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"{a!r} overlaps {b!r}"


def test_sharpness_figure_lines_labels_and_layout():
    df = _frame()
    infos = {"sgdm": optimizer_info("sgdm:lr=0.05"), "adam": optimizer_info("adam:lr=1e-3")}
    fig = plot_sharpness(df, infos)
    raw, pre = fig.axes
    raw_levels = sorted({float(line.get_ydata()[0]) for line in raw.lines if len(set(line.get_ydata())) == 1})
    assert raw_levels == [pytest.approx(76.0)]  # 2(1+beta)/lr for SGD+M; nothing at 2/lr = 40 or 2/1e-3
    pre_levels = sorted({float(line.get_ydata()[0]) for line in pre.lines if len(set(line.get_ydata())) == 1})
    assert pre_levels == [pytest.approx(38000.0)]
    assert raw.get_ylabel() and pre.get_ylabel() and raw.get_xlabel() and pre.get_xlabel()
    _assert_no_overlap(fig)
    plt.close(fig)


@pytest.mark.parametrize("fn", [plot_loss, plot_r_med, plot_one_norm])
def test_every_axis_labelled_and_no_overlap(fn):
    fig = fn(_frame())
    for ax in fig.axes:
        if ax.axison and ax.lines:
            assert ax.get_ylabel(), (fn.__name__, ax.get_title())
    xlabels = [ax.get_xlabel() for ax in fig.axes if ax.axison]
    assert any("step" in x for x in xlabels)
    _assert_no_overlap(fig)
    plt.close(fig)


def test_one_norm_label_is_mathtext():
    fig = plot_one_norm(_frame())
    assert r"$\|g\|_{1,\epsilon}" in fig.axes[0].get_ylabel()
    plt.close(fig)


def test_bare_lr_mapping_still_accepted():
    fig = plot_sharpness(_frame(), {"sgdm": 0.05})
    levels = sorted({float(line.get_ydata()[0]) for line in fig.axes[0].lines if len(set(line.get_ydata())) == 1})
    assert levels == [pytest.approx(40.0)]  # a bare float means momentum-free SGD
    assert isinstance(OptimizerInfo("sgd", 0.1), OptimizerInfo)
    plt.close(fig)
    assert np.isfinite(sharpness_threshold(OptimizerInfo("sgd", 0.1)))
