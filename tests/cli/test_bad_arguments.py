"""Bad arguments to every command: one line ``<prog>: error: ...`` naming the option, its exit code, no traceback,
and (where the value alone is wrong) no work done first: kat-train and kat-validate refuse before building a model.

The cases are the ones an adversarial sweep found ending in a traceback (issue 14, item 8) plus their siblings. The
commands run in-process, so a traceback would fail the test as an uncaught exception.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from kat_timm.cli import common
from kat_timm.cli import demo as demo_cli
from kat_timm.cli import export as export_cli
from kat_timm.cli import plot as plot_cli
from kat_timm.cli import predict as predict_cli
from kat_timm.cli import train as train_module
from kat_timm.cli import validate as validate_module
from tests.helpers import fill_uninitialised_
from tests.training.test_data import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", splits=(("train", 8), ("validation", 2)))


@pytest.fixture
def models_built(monkeypatch):
    """Count the models ``common.create_model`` builds (it stays the real thing)."""
    built = []
    real = common.create_model

    def counting(*args, **kwargs):
        built.append(args[0] if args else kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "create_model", counting)
    return built


def _exit_code(main, argv) -> int:
    """``main(argv)``'s exit code, whether returned or raised by argparse as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _one_line_error(capsys, prog: str, expected: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and expected in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _train_args(data, tmp_path, *extra):
    return ["--data-dir", str(data), "--model", "kat_tiny", "--img-size", "32", "--batch-size", "8", "--workers", "0",
            "--epochs", "1", "--device", "cpu", "--output", str(tmp_path / "out"), "--experiment", "run", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "0"], "--img-size 0: the image size must be 1 to 4096 pixels"),
    (["--img-size", "-32"], "--img-size -32: the image size must be 1 to 4096"),
    (["--img-size", "100000"], "--img-size 100000: the image size must be 1 to 4096"),
    (["--input-size", "1", "32", "32"], "images are loaded as RGB, so the first value (channels) must be 3"),
    (["--sched", "foo"], "argument --sched: invalid choice: 'foo'"),
    (["--aa", "foo"], "argument --aa: foo: "),
    (["--smoothing", "2"], "argument --smoothing: must be from 0 to below 1, got 2"),
    (["--drop-path", "5"], "argument --drop-path: must be from 0 to below 1, got 5"),
    (["--reprob", "-0.5"], "argument --reprob: must be from 0 to 1, got -0.5"),
    (["--start-epoch", "-5"], "argument --start-epoch: must be at least 0, got -5"),
    (["--num-classes", "0"], "argument --num-classes: must be at least 1 (leave it out to use the number of "
                                "class folders), got 0"),
    (["--crop-pct", "5"], "--crop-pct 5: the centre crop is a fraction"),
    (["--std", "0", "0", "0"], "--std 0.0 0.0 0.0: every value must be positive"),
    (["--interpolation", "foo"], "--interpolation foo: unknown interpolation"),
    (["--train-interpolation", "foo"], "--train-interpolation foo: unknown interpolation; use one of nearest"),
    (["--lr", "nan"], "argument --lr: must be a number at least 0, got nan"),
    (["--scale", "0.9", "0.1"], "--scale 0.9 0.1: give MIN MAX with MIN <= MAX"),
    (["--opt-betas", "0.9"], "--opt-betas 0.9: give two values, e.g. 0.9 0.999 (three for adan)"),
    (["--layer-decay", "-1"], "argument --layer-decay: must be positive, got -1"),
    (["--lr-base-size", "0"], "argument --lr-base-size: must be at least 1, got 0"),
    (["--recount", "-1"], "argument --recount: must be at least 1, got -1"),
])
def test_kat_train_refuses_before_any_work(data, tmp_path, capsys, models_built, extra, message):
    assert _exit_code(train_module.main, _train_args(data, tmp_path, *extra)) == 2
    _one_line_error(capsys, "kat-train", message)
    assert not models_built, "the arguments must be checked before the model is built"
    assert not (tmp_path / "out").exists()


def test_kat_train_image_smaller_than_a_patch(data, tmp_path, capsys):
    assert train_module.main(_train_args(data, tmp_path, "--img-size", "7")) == 2
    _one_line_error(capsys, "kat-train", "--img-size 7 x 7 is smaller than the model's 16-pixel patches; use at least "
                                         "16")


def test_kat_train_unknown_model_kwarg(data, tmp_path, capsys):
    assert train_module.main(_train_args(data, tmp_path, "--model-kwargs", "foo=1")) == 2
    _one_line_error(capsys, "kat-train", "kat_tiny does not take the keyword argument foo")


@pytest.mark.parametrize("kwarg,message", [
    ("num_groups=0", "kat_tiny: KAT: num_groups=0 is not valid: it must be a positive integer that divides "
                     "embed_dim=192 and mlp_hidden_width=768; valid values: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, "
                     "96, 192 (check --model-kwargs)"),
    ("act_init=nope", "kat_tiny: unknown rational init 'nope'; known: gelu, gelu_wide, identity"),
])
def test_kat_train_model_kwarg_the_model_refuses(data, tmp_path, capsys, kwarg, message):
    """A value the model's constructor refuses (ValueError) is one line naming it, not a traceback."""
    assert train_module.main(_train_args(data, tmp_path, "--model-kwargs", kwarg)) == 2
    _one_line_error(capsys, "kat-train", message)


def _run_checkpoint(path, **run_args):
    model = fill_uninitialised_(common.create_model("kat_tiny", img_size=32, num_classes=3, weight_init="skip"))
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "version": 2,
                "args": argparse.Namespace(model="kat_tiny", img_size=32, num_classes=3,
                                           class_names=["blue", "green", "red"], **run_args)}, path)
    return path


def test_kat_train_resume_with_another_optimizer(data, tmp_path, capsys):
    checkpoint = _run_checkpoint(tmp_path / "last.pth.tar", opt="adamw")
    assert train_module.main(_train_args(data, tmp_path, "--resume", str(checkpoint), "--opt", "sgd")) == 2
    _one_line_error(capsys, "kat-train", f"--resume {checkpoint} was trained with --opt adamw, not sgd")


def _validate_args(data, *extra):
    return ["--data-dir", str(data), "--model", "kat_tiny", "--workers", "0", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--crop-pct", "-1"], "--crop-pct -1: the centre crop is a fraction of the resized image, 0.01 to 1"),
    (["--crop-pct", "1e-9"], "--crop-pct 1e-09: the centre crop is a fraction"),
    (["--crop-pct", "0"], "--crop-pct 0: the centre crop is a fraction"),
    (["--crop-pct", "5"], "--crop-pct 5: the centre crop is a fraction"),
    (["--std", "0", "0", "0"], "--std 0.0 0.0 0.0: every value must be positive"),
    (["--interpolation", "foo"], "--interpolation foo: unknown interpolation; use one of nearest, bilinear, bicubic"),
    (["--img-size", "1000000"], "--img-size 1000000: the image size must be 1 to 4096 pixels"),
    (["--num-classes", "-5"], "--num-classes must be at least 1, got -5"),
])
def test_kat_validate_refuses_before_any_work(data, capsys, models_built, extra, message):
    assert validate_module.main(_validate_args(data, *extra)) == 2
    _one_line_error(capsys, "kat-validate", message)
    assert not models_built


def test_kat_validate_results_file_that_is_a_folder(data, tmp_path, capsys, models_built):
    folder = tmp_path / "results"
    folder.mkdir()
    assert validate_module.main(_validate_args(data, "--results-file", str(folder))) == 2
    _one_line_error(capsys, "kat-validate", f"--results-file {folder} is a folder")
    assert not models_built and not (tmp_path / "results.partial").exists()


def test_kat_validate_results_file_where_nothing_can_be_written(data, tmp_path, capsys, models_built):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "sub" / "results.json"  # under a file: unwritable for every user, root included
    assert validate_module.main(_validate_args(data, "--results-file", str(target))) == 2
    _one_line_error(capsys, "kat-validate", f"--results-file {target}: cannot write there ({blocker} is not a "
                                            f"folder)")
    assert not models_built


@pytest.mark.parametrize("size, message", [
    ("7", "--img-size 7 x 7 is smaller than the model's 16-pixel patches"),
    ("100000", "--img-size 100000: the image size must be 1 to 4096 pixels"),
])
def test_export_image_size(tmp_path, capsys, size, message):
    assert export_cli.main(["kat_tiny", "-o", str(tmp_path / "m.onnx"), "--img-size", size]) == 2
    _one_line_error(capsys, "kat-timm export", message)
    assert not list(tmp_path.iterdir())


def test_plot_dpi_too_large_for_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    output = tmp_path / "act.png"
    assert plot_cli.main(["--random-weights", "--model", "kat_tiny", "-o", str(output), "--dpi", "100000"]) == 2
    line = _one_line_error(capsys, "kat-timm plot", "--dpi 100000 makes a")
    most = int(line.rsplit("use --dpi ", 1)[1].split()[0])
    assert 1 <= most < 100000 and not output.exists()


def test_plot_output_folder_is_refused_not_renamed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert plot_cli.main(["--random-weights", "--model", "kat_tiny", "-o", str(tmp_path)]) == 2
    _one_line_error(capsys, "kat-timm plot", f"{tmp_path} is a folder; give the image file to write")
    assert not tmp_path.with_name(tmp_path.name + ".png").exists()


def test_predict_on_the_meta_device(capsys):
    image = str(common.Path(predict_cli.__file__).parents[1] / "assets" / "crossword.png")
    assert predict_cli.main([image, "--random-weights", "--model", "kat_tiny", "--device", "meta"]) == 2
    _one_line_error(capsys, "kat-timm predict", "--device meta: not a device kat_timm runs on; use cpu or cuda")


def test_demo_with_an_unknown_backend_setting(monkeypatch, capsys):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "garbage")
    assert demo_cli.main(["--skip-benchmark", "--offline"]) == 2
    _one_line_error(capsys, "kat-timm demo", "KAT_RATIONAL_BACKEND='garbage' is not one of auto, torch, triton, native")


def test_plot_takes_negative_numbers_in_exponent_form(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    output = tmp_path / "act.png"
    assert plot_cli.main(["--random-weights", "--model", "kat_tiny", "-o", str(output), "--x-range", "-1e3",
                          "1e3"]) == 0
    assert output.read_bytes().startswith(b"\x89PNG")


def test_a_cached_weight_file_that_does_not_fit_names_the_keys(offline_hub, ckpt, kat_tiny_weights, capsys):
    broken = dict(kat_tiny_weights["scratch"])
    broken["blocks.0.attn.qkv.weight"] = broken["blocks.0.attn.qkv.weight"][:100]
    offline_hub.add_released(f"{ckpt.HF_ORG}/{ckpt.TINY}", broken)
    image = str(common.Path(predict_cli.__file__).parents[1] / "assets" / "crossword.png")
    assert predict_cli.main([image, "--model", "kat_tiny"]) == 1
    line = _one_line_error(capsys, "kat-timm predict", "could not load the released weights of kat_tiny: ")
    assert "size mismatch for blocks.0.attn.qkv.weight" in line, line


@pytest.mark.parametrize("damage, message", [
    ("resized", "could not load {path} into kat_tiny: size mismatch for blocks.0.attn.qkv.weight"),
    ("unrelated", "--pretrained-path {path} lacks 150 of kat_tiny's weights (cls_token, pos_embed"),
])
def test_kat_train_pretrained_path_that_does_not_fit(data, tmp_path, capsys, kat_tiny_weights, damage, message):
    weights = dict(kat_tiny_weights["scratch"])
    if damage == "resized":
        weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"][:100]
    else:
        weights = {"encoder.weight": torch.zeros(3)}
    path = tmp_path / "mine.pth"
    torch.save(weights, path)
    code = train_module.main(_train_args(data, tmp_path, "--pretrained-path", str(path)))
    assert code in (1, 2)
    line = _one_line_error(capsys, "kat-train", message.format(path=path))
    assert "released weights" not in line
    assert not (tmp_path / "out" / "run" / "last.pth.tar").exists()


def test_plot_x_range_error_names_the_option(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert plot_cli.main(["--random-weights", "--model", "kat_tiny", "-o", str(tmp_path / "act.png"), "--x-range",
                          "3", "-3"]) == 2
    _one_line_error(capsys, "kat-timm plot", "--x-range 3 -3: give two finite numbers LOW HIGH with LOW < HIGH")
