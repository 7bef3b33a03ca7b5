"""``kat_timm.plot_rationals`` and ``kat-timm plot``: the grid of every block's act1/act2, its curves' values, the PNG
the command writes, and the message when matplotlib is missing."""
from __future__ import annotations

import importlib
import sys

import pytest
import timm
import torch
from PIL import Image

import kat_timm.tools.plot
from kat_timm.cli import plot as plot_cli
from kat_timm.layers import KAN, GroupRational
from kat_timm.ops import group_rational_reference
from kat_timm.tools.plot import plot_rationals, rational_curves

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = 8


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Jitter every rational's coefficients so that its groups differ, as after training."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "weight_numerator" in name or "weight_denominator" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture
def small_kat():
    return _trained_like(timm.create_model("kat_tiny", depth=3, img_size=32))


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
    kan = _trained_like(KAN(16, 32, num_groups=4))
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


def test_missing_matplotlib_says_how_to_install_it(monkeypatch, capsys, small_kat, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    # The module itself imports without matplotlib (so kat_timm can export plot_rationals eagerly).
    importlib.reload(kat_timm.tools.plot)
    with pytest.raises(ImportError, match=r'needs matplotlib: pip install matplotlib'):
        plot_rationals(small_kat)
    assert plot_cli.main(["--random-weights", "-o", str(tmp_path / "a.png")]) == 1
    assert 'error: plotting needs matplotlib: pip install matplotlib' in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_command_writes_a_png_of_the_released_weights(monkeypatch, capsys, tmp_path, released_hub,
                                                      kat_tiny_weights):
    figures = []

    def keep(model, **kwargs):
        figures.append((model, plot_rationals(model, **kwargs)))
        return figures[-1][1]

    monkeypatch.setattr(kat_timm.tools.plot, "plot_rationals", keep)
    output = tmp_path / "activations.png"
    assert plot_cli.main(["--model", "kat_tiny", "-o", str(output), "--dpi", "40"]) == 0, capsys.readouterr().err
    assert f"wrote {output}: 24 rational activations of kat_tiny (released weights)" in capsys.readouterr().out
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    (model, figure), = figures
    torch.testing.assert_close(model.blocks[5].mlp.act2.weight_denominator,
                               kat_tiny_weights["scratch"]["blocks.5.mlp.act2.weight_denominator"])
    width, height = figure.get_size_inches() * 40
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (round(width), round(height))
    assert len(figure.axes) == 12 * 2
    assert sum(len(ax.get_lines()) for ax in figure.axes) == 24 * (GROUPS + 1)


def test_command_errors(capsys, tmp_path, offline_hub):
    assert plot_cli.main(["-o", str(tmp_path / "missing" / "a.png"), "--random-weights"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert plot_cli.main(["--model", "vit_tiny_patch16_224", "--random-weights", "-o", str(tmp_path / "a.png")]) == 2
    assert "no rational activations" in capsys.readouterr().err
    assert plot_cli.main(["--model", "kat_tiny", "-o", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert "could not load the released weights of kat_tiny" in err and "--random-weights" in err


def test_output_without_extension_is_a_png_named_so_and_unknown_formats_fail_first(monkeypatch, capsys, tmp_path,
                                                                                   small_kat):
    from kat_timm.cli import common

    monkeypatch.setattr(common, "create_model_from_options", lambda *args, **kwargs: small_kat)
    assert plot_cli.main(["-o", str(tmp_path / "curves"), "--random-weights", "--dpi", "20"]) == 0
    assert f"wrote {tmp_path / 'curves.png'}: 6 rational activations" in capsys.readouterr().out
    assert [path.name for path in tmp_path.iterdir()] == ["curves.png"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE

    monkeypatch.setattr(common, "create_model_from_options", lambda *args, **kwargs: pytest.fail("model built"))
    assert plot_cli.main(["-o", str(tmp_path / "curves.xyz"), "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert "curves.xyz: matplotlib cannot write .xyz files; use one of " in err and ".pdf" in err and ".svg" in err


def test_legend_names_each_reference_with_its_panels(small_kat):
    """act1 panels show identity and act2 panels swish: the legend names both (it said only "identity")."""
    figure = plot_rationals(small_kat)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == [f"group {g}" for g in range(GROUPS)] + ["identity (act1)", "swish (act2)"]
    figure = plot_rationals(small_kat, reference="gelu")
    assert [text.get_text() for text in figure.legends[0].get_texts()][-1] == "GELU (act1, act2)"


def test_checkpoint_trained_at_32_px_plots_without_options(capsys, tmp_path, small_kat):
    """Issue 11, item 1: a bare state dict of a 32 px, 3-block KAT is built from its shapes and plotted."""
    checkpoint = tmp_path / "run.pth.tar"
    torch.save({"state_dict": small_kat.state_dict(), "args": {"model": "kat_tiny", "model_kwargs": {"depth": 3}}},
               checkpoint)
    assert plot_cli.main(["--checkpoint", str(checkpoint), "-o", str(tmp_path / "a.png"), "--dpi", "20"]) == 0
    assert "6 rational activations of kat_tiny (checkpoint run.pth.tar)" in capsys.readouterr().out
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE
