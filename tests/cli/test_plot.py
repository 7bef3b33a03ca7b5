"""``kat-timm plot``: the PNG the command writes, its errors, and the message when matplotlib is missing.

The plotting library (``kat_timm.tools.plot``) is tested in tests/tools/test_plot.py; ``small_kat`` is in conftest."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
from PIL import Image

import kat_timm.tools.plot
from kat_timm.cli import plot as plot_cli
from kat_timm.tools.plot import plot_rationals

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = 8


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


def test_output_ending_in_a_slash_is_a_folder_not_a_file_name(monkeypatch, capsys, tmp_path):
    """Issue 21, item 14: "-o plots/" wrote plots.png; a missing folder is named, an existing one is refused."""
    from kat_timm.cli import common

    monkeypatch.setattr(common, "create_model_from_options", lambda *args, **kwargs: pytest.fail("model built"))
    assert plot_cli.main(["-o", f"{tmp_path / 'plots'}/", "--random-weights"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kat-timm plot: error: -o {tmp_path / 'plots'}/: no such folder; give the image file to write, e.g. "
        f"{tmp_path / 'plots' / 'activations.png'} once the folder exists")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "plots").mkdir()
    assert plot_cli.main(["-o", f"{tmp_path / 'plots'}/", "--random-weights"]) == 2
    assert "is a folder; give the image file to write" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "plots"]


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
