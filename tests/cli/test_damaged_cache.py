"""A damaged weights file in the Hugging Face cache (a download or a copy cut short): every command that loads the
released weights says which file and how to fetch it again, in one line; the demo carries on with random weights;
``kat-timm info`` calls it damaged, not cached.

The cache is the fake one of tests/conftest.py in huggingface_hub's real layout (``blobs/<sha256>`` with a snapshot
symlink, ``_as_blob``), offline, holding kat_tiny's ``model.safetensors`` cut to 1000 bytes.
"""
from __future__ import annotations

import importlib
import json

import pytest

from kat_timm.cli import CLIError
from kat_timm.cli.common import ReleasedWeightsUnavailable, create_model, create_sized_model
from kat_timm.cli.demo import sample_images

from tests.tools.test_download import TINY_REPO, _as_blob

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def damaged_hub(offline_hub, kat_tiny_weights, ckpt):
    """kat_tiny's repo with config.json and a model.safetensors blob cut to 1000 bytes; returns the snapshot path."""
    offline_hub.add_config(TINY_REPO, ckpt.released_config())
    offline_hub.add_safetensors(TINY_REPO, kat_tiny_weights["scratch"])
    blob = _as_blob(offline_hub, TINY_REPO, "model.safetensors")
    blob.write_bytes(blob.read_bytes()[:1000])
    return offline_hub.snapshot(TINY_REPO) / "model.safetensors"


def _assert_names_file_and_fix(message: str, path) -> None:
    assert str(path) in message and "is damaged" in message, message
    assert "kat-timm download kat_tiny --force" in message, message
    assert "\n" not in message and "Traceback" not in message, message


def test_create_model_names_the_damaged_file_and_the_fix(damaged_hub):
    with pytest.raises(ReleasedWeightsUnavailable) as caught:
        create_model("kat_tiny", pretrained=True, weight_init="skip")
    _assert_names_file_and_fix(str(caught.value), damaged_hub)


def test_the_training_route_names_the_damaged_file_and_the_fix(damaged_hub):
    with pytest.raises(CLIError) as caught:
        create_sized_model("kat_tiny", [32], pretrained=True)
    _assert_names_file_and_fix(str(caught.value), damaged_hub)


@pytest.mark.parametrize("command, argv", [
    ("predict", ["IMAGE", "--model", "kat_tiny"]),
    ("plot", ["--model", "kat_tiny", "-o", "OUT.png"]),
    ("export", ["kat_tiny", "--pretrained", "-o", "OUT.onnx"]),
])
def test_commands_end_in_one_line(command, argv, damaged_hub, capsys, tmp_path):
    module = importlib.import_module(f"kat_timm.cli.{command}")
    argv = [str(sample_images()[0]) if arg == "IMAGE" else arg.replace("OUT", str(tmp_path / "out")) for arg in argv]
    assert module.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kat-timm {command}: error: "), err
    _assert_names_file_and_fix(err, damaged_hub)
    assert not list(tmp_path.glob("out*")), "nothing is written"


def test_validate_ends_in_one_line(damaged_hub, capsys, tmp_path):
    from PIL import Image

    from kat_timm.cli import validate

    for name in ("a", "b"):
        (tmp_path / "data" / "validation" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "validation" / name / "0.png")
    assert validate.main([str(tmp_path / "data"), "--model", "kat_tiny", "--pretrained", "--img-size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kat-validate: error: ") or err.startswith("kat-timm validate: error: "), err
    _assert_names_file_and_fix(err, damaged_hub)


def test_demo_carries_on_with_random_weights(damaged_hub, capsys):
    from kat_timm.cli import demo

    assert demo.main(["--device", "cpu", "--skip-benchmark"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "Could not fetch the released weights" in line)
    _assert_names_file_and_fix(line, damaged_hub)
    assert "(random weights: meaningless)" in out


def test_info_says_damaged(damaged_hub, capsys):
    from kat_timm.cli import info

    assert info.main(["--json"]) == 0
    models = {model["name"]: model for model in json.loads(capsys.readouterr().out)["models"]}
    assert models["kat_tiny_patch16_224"]["cache"] == "damaged"
    assert models["kat_tiny_patch16_224"]["cached"] is False, "damaged weights are not usable weights"
    assert models["kat_small_patch16_224"]["cache"] == "not cached"
    assert info.main([]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("kat_tiny_patch16_224 "))
    assert row.endswith(" damaged"), row
