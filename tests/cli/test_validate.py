"""kat-validate on a checkpoint that kat-train wrote (CPU, synthetic colour ImageFolder), and its clear errors."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from kat_timm.cli import validate as validate_module
from kat_timm.cli.train import parse_args, train
from tests.helpers import fill_uninitialised_, torch_threads
from tests.training.test_data import make_image_folder, write_corrupt_image

pytestmark = pytest.mark.usefixtures("single_thread")

TIMM_KEYS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct", "interpolation"]

# A recipe that learns the three colours in a few dozen steps, given as a YAML config (kat-train -c).
RECIPE = """\
model: kat_tiny
img_size: 32
batch_size: 8
workers: 0
epochs: 5
lr: 1.0e-3
warmup_epochs: 0
no_aug: true
smoothing: 0.0
device: cpu
seed: 7
model_ema: true
model_ema_decay: 0.5
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, run folder, TrainResult) of kat_tiny trained 5 epochs on red/green/blue images."""
    root = tmp_path_factory.mktemp("validate")
    data = make_image_folder(root / "data")
    (root / "recipe.yaml").write_text(RECIPE)
    with torch_threads(1):  # as the single_thread fixture does (module scope cannot use it)
        result = train(parse_args(["-c", str(root / "recipe.yaml"), "--data-dir", str(data), "--output",
                                   str(root / "out"), "--experiment", "run"]))
    return data, root / "out" / "run", result


def run_validate(capsys, *argv):
    code = validate_module.main(["--workers", "0", "--device", "cpu", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_checkpoint_accuracy_above_chance_as_timm_shaped_json(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    results_file = tmp_path / "results" / "kat_tiny.json"
    code, out, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny",
                                  "--checkpoint", run_dir / "last.pth.tar", "--results-file", results_file)
    assert code == 0, err
    result = json.loads(out)
    assert list(result)[:len(TIMM_KEYS)] == TIMM_KEYS
    assert {"loss", "images_per_second", "num_images"} <= result.keys()
    assert result["num_images"] == 24
    assert result["top1"] >= 90.0, f"3 colours are trivially separable (chance 33%): {result}"
    assert result["top1_err"] == pytest.approx(100.0 - result["top1"])
    assert result["top5"] == 100.0, "with 3 classes every label is in the top 5"
    assert result["img_size"] == 32, "the training image size is read from the kat-train checkpoint"
    assert result["param_count"] == pytest.approx(5.49, abs=0.01)
    assert json.loads(results_file.read_text()) == result


def test_training_evaluation_and_kat_validate_agree(trained, capsys):
    """Both use validate.evaluate: the last epoch's eval metrics are the checkpoint's kat-validate result (its EMA
    weights unless --no-ema, the rule of every command)."""
    data, run_dir, result = trained
    last = result.history[-1]
    for flags, prefix in ((["--no-ema"], "eval_"), ([], "eval_ema_"), (["--use-ema"], "eval_ema_")):
        code, out, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny",
                                      "--checkpoint", run_dir / "last.pth.tar", *flags)
        assert code == 0, err
        measured = json.loads(out)
        assert measured["loss"] == pytest.approx(last[prefix + "loss"], abs=1e-5), flags
        assert measured["top1"] == pytest.approx(last[prefix + "top1"], abs=1e-3), flags


def test_checkpoint_of_another_architecture(trained, capsys):
    data, run_dir, _ = trained
    code, _, err = run_validate(capsys, "--data-dir", data, "--model", "kat_small_patch16_224",
                                "--checkpoint", run_dir / "last.pth.tar")
    assert code == 1
    assert "does not fit kat_small_patch16_224: it holds a kat_tiny; give the matching model name" in err, err


def test_use_ema_on_a_checkpoint_without_ema(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    bare = tmp_path / "bare.pth"
    checkpoint = torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=False)
    torch.save(checkpoint["state_dict"], bare)
    code, _, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", "--img-size", "32",
                                "--checkpoint", bare, "--use-ema")
    assert code == 1 and "EMA weights requested" in err, err


def test_folders_the_checkpoint_was_not_trained_on(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    other = make_image_folder(tmp_path / "other", classes=("red", "green", "cyan"), splits=(("validation", 1),))
    code, _, err = run_validate(capsys, "--data-dir", other, "--model", "kat_tiny",
                                "--checkpoint", run_dir / "last.pth.tar")
    assert code == 1
    assert "class folders the checkpoint" in err and "cyan" in err and "trained on blue, green, red" in err, err


def test_subset_of_the_trained_classes_keeps_their_labels(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    subset = tmp_path / "subset"
    shutil.copytree(data / "validation" / "red", subset / "validation" / "red")
    code, out, err = run_validate(capsys, "--data-dir", subset, "--model", "kat_tiny",
                                  "--checkpoint", run_dir / "last.pth.tar")
    assert code == 0, err
    assert json.loads(out)["top1"] >= 75.0, "red must keep label 2 (blue, green, red), not become label 0"


def test_corrupt_validation_image_is_skipped_with_a_warning(trained, tmp_path, capsys, caplog):
    data, run_dir, _ = trained
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    bad = write_corrupt_image(copy / "validation" / "green" / "2.png")
    with caplog.at_level(logging.WARNING, logger="kat_timm.training.data"):
        code, out, err = run_validate(capsys, "--data-dir", copy, "--model", "kat_tiny",
                                      "--checkpoint", run_dir / "last.pth.tar")
    assert code == 0, err
    result = json.loads(out)
    assert (result["num_images"], result["unreadable_images"]) == (23, 1), \
        "the unreadable image is left out and counted, not replaced by a neighbour that is scored twice"
    assert "1 of 24 images could not be decoded and were left out" in err
    assert any(str(bad) in record.getMessage() for record in caplog.records), caplog.text


def test_a_class_without_one_readable_image_is_an_error(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for path in (copy / "validation" / "green").iterdir():
        write_corrupt_image(path)
    code, _, err = run_validate(capsys, "--data-dir", copy, "--model", "kat_tiny",
                                "--checkpoint", run_dir / "last.pth.tar")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"kat-validate: error: no image could be decoded in 1 class folder(s) of "
                           f"{copy / 'validation'}: green (8 file(s)). Replace the files, or remove the folders.")


def test_model_classes_differ_from_the_folders(trained, capsys):
    data, _, _ = trained
    code, _, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", "--img-size", "32")
    assert code == 1
    assert "the model has 1000 classes but" in err and "has 3 class folders" in err, err


def test_unknown_model(trained, capsys):
    data, _, _ = trained
    code, _, err = run_validate(capsys, "--data-dir", data, "--model", "kat_colossal")
    assert code == 2 and "unknown model 'kat_colossal'" in err, err


def test_missing_split(tmp_path, capsys):
    make_image_folder(tmp_path, splits=(("train", 1),))
    code, _, err = run_validate(capsys, "--data-dir", tmp_path, "--model", "kat_tiny")
    assert code == 1
    assert f"no 'validation' split in {tmp_path}" in err and "validation/CLASS/*.png" in err, err


def test_missing_data_dir_argument(capsys):
    code, _, err = run_validate(capsys, "--model", "kat_tiny")
    assert code == 2 and "--data-dir DIR" in err, err


def _with_run_args(checkpoint_path, tmp_path, name, **changes):
    """A copy of a kat-train checkpoint whose saved run options (``args``) are changed."""
    import argparse

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint["args"] = argparse.Namespace(**{**vars(checkpoint["args"]), **changes})
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_preprocessing_of_the_training_run_is_used(trained, tmp_path, capsys):
    """A run trained with its own --mean/--std/--crop-pct/--interpolation is evaluated with them, not with the
    model's defaults (which would load fine and score silently lower)."""
    data, run_dir, _ = trained
    options = dict(mean=[0.9, 0.1, 0.5], std=[0.05, 0.3, 0.2], crop_pct=0.5, interpolation="nearest")
    recorded = _with_run_args(run_dir / "last.pth.tar", tmp_path, "recorded.pth.tar", **options)
    results = {}
    for name, argv in (("recorded", ["--checkpoint", recorded]),
                       ("explicit", ["--checkpoint", run_dir / "last.pth.tar", "--mean", "0.9", "0.1", "0.5",
                                     "--std", "0.05", "0.3", "0.2", "--crop-pct", "0.5", "--interpolation",
                                     "nearest"]),
                       ("defaults", ["--checkpoint", run_dir / "last.pth.tar"])):
        code, out, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", *argv)
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["recorded"]["crop_pct"] == 0.5 and results["recorded"]["interpolation"] == "nearest"
    for key in ("loss", "top1", "top5"):
        assert results["recorded"][key] == results["explicit"][key], key
    assert results["recorded"]["loss"] != results["defaults"]["loss"], "the recorded mean/std made no difference"


def test_command_line_preprocessing_overrides_the_training_run(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    recorded = _with_run_args(run_dir / "last.pth.tar", tmp_path, "recorded.pth.tar", crop_pct=0.5)
    code, out, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", "--checkpoint", recorded,
                                  "--crop-pct", "0.8")
    assert code == 0, err
    assert json.loads(out)["crop_pct"] == 0.8


def test_checkpoint_with_more_outputs_than_class_folders(data_and_wide_checkpoint, capsys):
    """kat-train --num-classes 5 on 3 folders: the checkpoint's class list labels the first 3 outputs."""
    data, checkpoint = data_and_wide_checkpoint
    code, out, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", "--checkpoint", checkpoint)
    assert code == 0, err
    assert json.loads(out)["num_images"] == 24


@pytest.fixture
def data_and_wide_checkpoint(tmp_path):
    import argparse

    from kat_timm.cli.common import create_model

    data = make_image_folder(tmp_path / "data")
    model = fill_uninitialised_(create_model("kat_tiny", img_size=32, num_classes=5, weight_init="skip"))
    path = tmp_path / "wide.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "version": 2,
                "args": argparse.Namespace(model="kat_tiny", img_size=32, num_classes=5,
                                           class_names=["blue", "green", "red"])}, path)
    return data, path


def test_mean_of_the_wrong_length(trained, capsys):
    data, run_dir, _ = trained
    code, _, err = run_validate(capsys, "--data-dir", data, "--model", "kat_tiny", "--checkpoint",
                                run_dir / "last.pth.tar", "--mean", "0.5", "0.5")
    assert code == 2
    assert "--mean takes 1 value or one per input channel (3), got 2" in err, err


def test_model_kwargs_without_equals_sign_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        validate_module.main(["--model-kwargs", "act_init"])
    assert exit_info.value.code == 2
    assert "--model-kwargs: expected KEY=VALUE, got 'act_init'" in capsys.readouterr().err


@pytest.mark.parametrize("recorded", [{"img_size": 32, "model_kwargs": {"img_size": 32}},
                                      {"img_size": None, "model_kwargs": {"img_size": 32}}],
                         ids=["timm-train-img-size-and-model-kwargs", "model-kwargs-only"])
def test_checkpoint_trained_at_another_size_through_model_kwargs(trained, tmp_path, capsys, recorded):
    """Issue 11, item 1: a run recording img_size=32 in its model_kwargs (timm's train.py needs both --img-size and
    --model-kwargs img_size=N) crashed with "got multiple values for argument 'img_size'"."""
    data, run, _ = trained
    checkpoint = _with_run_args(run / "model_best.pth.tar", tmp_path, "sized.pth.tar", **recorded)
    code, out, err = run_validate(capsys, "--data-dir", data, "--checkpoint", checkpoint)
    assert code == 0, err
    result = json.loads(out)
    assert result["img_size"] == 32 and result["model"] == "kat_tiny" and result["top1"] > 50, result


def test_model_defaults_to_the_checkpoints_architecture(trained, tmp_path, capsys):
    data, run, _ = trained
    code, out, err = run_validate(capsys, "--data-dir", data, "--checkpoint", run / "last.pth.tar")
    assert code == 0 and json.loads(out)["model"] == "kat_tiny", err
