"""One image-size rule (issue 22, item 13): an ``--img-size`` / ``--input-size`` given by the user must be a multiple
of the model's patch size, in kat-train, kat-validate, export and scripts/benchmark_models.py alike (kat-train and
export took 40 for 16-pixel patches and dropped the border without a word; the benchmark refused it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kat_timm.cli import export, train, validate
from tests.training.test_data import make_image_folder

REPO = Path(__file__).resolve().parents[2]
RULE = ("is not a multiple of the model's 16-pixel patches: the image is cut into whole patches, and the border that "
        "fills none would be dropped; use a multiple, e.g. 32 or 48")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=("red", "green"),
                             splits=(("train", 4), ("validation", 2)))


@pytest.mark.parametrize("command, size", [
    ("train", ["--img-size", "40"]), ("train", ["--input-size", "3", "40", "32"]), ("validate", ["--img-size", "40"]),
    ("export", ["--img-size", "40"]),
])
def test_a_size_that_is_not_whole_patches_is_refused_by_every_command(command, size, data, tmp_path, capsys):
    argv = {
        "train": (train, ["--data-dir", str(data), "--model", "kat_tiny", "--device", "cpu", "--batch-size", "4",
                          "--workers", "0", "--epochs", "1", "--output", str(tmp_path / "out"), *size]),
        "validate": (validate, ["--model", "kat_tiny", "--device", "cpu", "--workers", "0", str(data), *size]),
        "export": (export, ["kat_tiny", "-o", str(tmp_path / "m.onnx"), *size]),
    }
    module, args = argv[command]
    assert module.main(args) == 2
    err = capsys.readouterr().err.strip()
    given = "--input-size 40 x 32" if "--input-size" in size else "--img-size 40"
    assert err.endswith(f"error: {given} {RULE}"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_benchmark_models_states_the_same_rule(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_models", REPO / "scripts" / "benchmark_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--img-size", "40", "--device", "cpu"])
    assert capsys.readouterr().err.strip().endswith(f"error: --img-size 40 {RULE}")


def test_a_model_that_pads_to_whole_patches_takes_any_size():
    from kat_timm.cli.common import create_sized_model

    model = create_sized_model("kat_tiny", [40], "--img-size", dynamic_img_size=True, dynamic_img_pad=True,
                               weight_init="skip")
    assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 1000)
