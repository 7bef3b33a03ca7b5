"""``kat_timm.tools.plot`` (``kat_timm.plot_rationals``): the grid of every block's act1/act2 and its curves' values.

The ``kat-timm plot`` command is tested in tests/cli/test_plot.py.
"""
from __future__ import annotations

import pytest
import torch

from kat_timm.layers import KAN, GroupRational
from kat_timm.ops import group_rational_reference
from kat_timm.tools.plot import plot_rationals, rational_curves
from tests.helpers import trained_like

pytestmark = pytest.mark.usefixtures("single_thread")

GROUPS = 8


def test_grid_has_one_panel_per_rational_and_one_curve_per_group(small_kat):
    figure = plot_rationals(small_kat)
    assert len(figure.axes) == 3 * 2
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [f"blocks.{i}.mlp.{act}" for i in range(3) for act in ("act1", "act2")]
    for ax in figure.axes:
        lines = ax.get_lines()
        assert len(lines) == GROUPS + 1, ax.get_title()
        assert [line.get_label() for line in lines] == [f"group {g}" for g in range(GROUPS)] + [
            "identity" if ax.get_title().endswith("act1") else "swish"]
        assert ax.get_xlim() == (-3.0, 3.0)


def test_curves_are_the_reference_function_of_each_group(small_kat):
    figure = plot_rationals(small_kat, reference="gelu", x_range=(-2, 4), num_points=50)
    layer = small_kat.blocks[1].mlp.act2
    ax = figure.axes[3]
    assert ax.get_title() == "blocks.1.mlp.act2"
    x = torch.linspace(-2, 4, 50, dtype=torch.float64)
    numerator, denominator = layer.weight_numerator, layer.weight_denominator
    for group, line in enumerate(ax.get_lines()[:GROUPS]):
        # Group g alone: its denominator row, evaluated as a one-group rational.
        expected = group_rational_reference(x.view(-1, 1), numerator, denominator[group:group + 1]).view(-1)
        assert line.get_xdata() == pytest.approx(x.numpy())
        assert line.get_ydata() == pytest.approx(expected.numpy(), rel=1e-12, abs=1e-12), f"group {group}"
    curves = [line.get_ydata() for line in ax.get_lines()[:GROUPS]]
    assert any(abs(curves[0] - other).max() > 1e-3 for other in curves[1:]), "groups must differ after jitter"
    reference = ax.get_lines()[-1]
    assert reference.get_label() == "GELU"
    assert reference.get_ydata() == pytest.approx(torch.nn.functional.gelu(x).numpy())


def test_the_layer_itself_agrees_with_the_reference(small_kat):
    layer = small_kat.blocks[0].mlp.act2
    x = torch.linspace(-3, 3, 101)
    exact = rational_curves(layer, x)
    assert exact.shape == (101, GROUPS) and exact.dtype == torch.float64
    torch.testing.assert_close(rational_curves(layer, x, use_layer=True), exact, rtol=1e-5, atol=1e-5)
    figure = plot_rationals(small_kat, reference=None, use_layer=True)
    assert all(len(ax.get_lines()) == GROUPS for ax in figure.axes)


def test_any_module_with_rationals_and_clear_errors():
    kan = trained_like(KAN(16, 32, num_groups=4))
    figure = plot_rationals(kan, reference="identity")
    assert [ax.get_title() for ax in figure.axes] == ["act1", "act2"]
    assert all(len(ax.get_lines()) == 4 + 1 for ax in figure.axes)
    with pytest.raises(ValueError, match="no GroupRational"):
        plot_rationals(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reference must be one of"):
        plot_rationals(kan, reference="relu")
    with pytest.raises(ValueError, match="x_range"):
        plot_rationals(kan, x_range=(3, -3))
    # A rational initialised from a function without a reference curve gets none under reference="init".
    figure = plot_rationals(GroupRational(4, init="tanh"))
    assert len(figure.axes[0].get_lines()) == 4
    # kat_from_vit's act2 starts as "gelu_wide" (GELU fitted on [-10, 10]): drawn against GELU.
    lines = plot_rationals(GroupRational(4, init="gelu_wide")).axes[0].get_lines()
    assert len(lines) == 4 + 1 and lines[-1].get_label() == "GELU"


def test_group_colours_are_told_apart_and_the_y_axis_is_labelled(small_kat):
    """Every two groups' curves differ clearly in colour (viridis made groups 0-3 near-identical dark blues), and the
    panels of the first column say what the y axis is."""
    from matplotlib.colors import to_rgb

    figure = plot_rationals(small_kat)
    colours = [to_rgb(line.get_color()) for line in figure.axes[0].get_lines()[:GROUPS]]
    closest = min(sum((a - b) ** 2 for a, b in zip(first, second)) ** 0.5
                  for i, first in enumerate(colours) for second in colours[i + 1:])
    assert closest > 0.25, f"two groups' colours are {closest:.3f} apart in RGB"
    assert [ax.get_ylabel() for ax in figure.axes] == ["F(x)", ""] * 3
