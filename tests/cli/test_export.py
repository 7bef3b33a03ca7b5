"""``kat-timm export``: one real export of a checkpoint to ONNX (kat_tiny at 32 px, ~20 s), and the usage errors,
which must fail before any model is built or exported."""
from __future__ import annotations

import importlib.util
import re

import pytest
import timm
import torch

from kat_timm.cli import common
from kat_timm.cli import export as cli
from kat_timm.cli import main as kat_timm_main
from tests.conftest import random_kat_state_dict

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if an export starts: usage errors must be caught first."""
    import kat_timm.tools.export

    monkeypatch.setattr(kat_timm.tools.export, "export_program", lambda *a, **k: pytest.fail("an export was started"))


@pytest.mark.skipif(not HAS_ONNX, reason='onnx, onnxscript or onnxruntime not installed (pip install onnx onnxscript onnxruntime)')
def test_export_of_a_checkpoint_with_check(tmp_path, capsys, single_thread):
    from kat_timm.tools.export import check_onnx, onnx_op_domains

    checkpoint = tmp_path / "kat_tiny.pth"
    state_dict = random_kat_state_dict(11)  # 224 px, as trained; the export resamples it to 32 px
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint)  # a training checkpoint (wrapped)
    output = tmp_path / "kat.onnx"
    code = kat_timm_main(["export", "kat_tiny", "--checkpoint", str(checkpoint), "-o", str(output), "--img-size", "32",
                          "--batch-size", "2", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"wrote {output} (" in out and "opset 18): images [2, 3, 32, 32] -> logits [2, 1000]" in out
    reported = float(re.search(r"onnxruntime vs PyTorch, .*batch 2: ([0-9.e+-]+) \(max", out).group(1))
    assert reported <= cli.CHECK_RTOL
    fast = float(re.search(r"onnxruntime \+ kat_timm kernel vs PyTorch, .*batch 2: ([0-9.e+-]+) \(max", out).group(1))
    assert fast <= cli.CHECK_RTOL
    # Standard ops, and each rational one kat_timm node (with its standard-op function body in the file).
    assert set(onnx_op_domains(output)) == {"", "kat_timm"}

    # The file computes the checkpoint's function (at 32 px), not a fresh model's.
    model = timm.create_model("kat_tiny")
    model.load_state_dict(state_dict)
    model.set_input_size(img_size=(32, 32))
    assert check_onnx(output, model.eval())[2] <= cli.CHECK_RTOL
    fresh = timm.create_model("kat_tiny", img_size=32).eval()
    assert check_onnx(output, fresh)[2] > 0.1


def test_missing_output_folder(tmp_path, capsys, no_export):
    assert cli.main(["kat_tiny", "-o", str(tmp_path / "nowhere" / "kat.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kat-timm export: error: output folder ") and "nowhere does not exist" in err


@pytest.mark.parametrize("args,message", [
    (["--opset", "16"], "--opset 16 is too old: a KAT needs opset 17 or newer"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--img-size", "0"], "--img-size 0: the image size must be 1 to 4096 pixels"),
    (["--use-ema"], "--use-ema needs --checkpoint"),
    (["--opset", "99"], "--opset 99 is newer than the installed onnx knows"),
])
def test_usage_errors(tmp_path, capsys, no_export, args, message):
    assert cli.main(["kat_tiny", "-o", str(tmp_path / "kat.onnx"), *args]) == 2
    assert capsys.readouterr().err.strip().startswith(f"kat-timm export: error: {message}")


def test_output_that_is_a_folder(tmp_path, capsys, no_export):
    assert cli.main(["kat_tiny", "-o", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; give the .onnx file to write" in capsys.readouterr().err


def test_failed_opset_conversion_is_one_line_and_random_weights_are_announced(tmp_path, capsys, monkeypatch):
    import kat_timm.tools.export

    def fail(*args, **kwargs):
        raise kat_timm.tools.export.OpsetConversionError("the ONNX exporter could not convert the graph to opset 23")

    monkeypatch.setattr(kat_timm.tools.export, "export_onnx", fail)
    assert cli.main(["kat_tiny", "-o", str(tmp_path / "kat.onnx"), "--opset", "23", "--img-size", "32"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["kat-timm export: warning: no --pretrained or --checkpoint: exporting kat_tiny with random weights",
                   "kat-timm export: error: the ONNX exporter could not convert the graph to opset 23"]


def test_unknown_model(tmp_path, capsys, no_export):
    assert cli.main(["kat_huge", "-o", str(tmp_path / "kat.onnx")]) == 2
    assert "unknown model 'kat_huge'" in capsys.readouterr().err


def test_pretrained_and_checkpoint_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["kat_tiny", "--pretrained", "--checkpoint", "x.pth", "-o", str(tmp_path / "kat.onnx")])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_pretrained_weights_not_in_the_cache_point_to_download(offline_hub, tmp_path, capsys, no_export):
    assert cli.main(["kat_tiny", "--pretrained", "-o", str(tmp_path / "kat.onnx")]) == 1
    err = capsys.readouterr().err
    assert "could not load the released weights of kat_tiny" in err and "kat-timm download kat_tiny" in err


@pytest.mark.parametrize("check,missing", [(False, "onnxscript"), (True, "onnxruntime")])
def test_missing_packages_say_how_to_install_them(tmp_path, capsys, monkeypatch, no_export, check, missing):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else
                        real_find_spec(name, *a))
    assert cli.main(["kat_tiny", "-o", str(tmp_path / "kat.onnx")] + (["--check"] if check else [])) == 1
    err = capsys.readouterr().err
    assert f"needs {missing} (not installed)" in err and 'pip install onnx onnxscript onnxruntime' in err


def test_checkpoint_trained_at_32_px_exports_at_its_size_without_a_model_name(tmp_path, capsys, monkeypatch,
                                                                             single_thread):
    """Issue 11, item 1: a run at img_size=32 records it; export builds that model (no --img-size, no MODEL)."""
    import kat_timm.tools.export

    built = []

    def export_onnx(model, output, **kwargs):  # stands in for the ONNX export only; the model is the real one
        built.append(model)
        raise PermissionError(13, "stopped by the test")

    monkeypatch.setattr(kat_timm.tools.export, "export_onnx", export_onnx)
    checkpoint = tmp_path / "last.pth.tar"
    state_dict = random_kat_state_dict(11, img_size=32, num_classes=4, weight_init="skip")
    torch.save({"state_dict": state_dict, "args": {"model": "kat_tiny", "model_kwargs": {"img_size": 32}}}, checkpoint)
    assert cli.main(["--checkpoint", str(checkpoint), "-o", str(tmp_path / "kat.onnx")]) == 1
    assert "stopped by the test" in capsys.readouterr().err
    (model,) = built
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 4
    assert torch.equal(model.state_dict()["pos_embed"], state_dict["pos_embed"])


def test_no_model_and_no_checkpoint_is_a_usage_error(tmp_path, capsys, no_export):
    assert cli.main(["-o", str(tmp_path / "kat.onnx")]) == 2
    assert "give the MODEL to export, or --checkpoint FILE" in capsys.readouterr().err


def test_an_output_name_without_the_onnx_suffix_is_warned_about_before_the_export(tmp_path, capsys, monkeypatch):
    """-o m.txt: a warning (the suffix is the user's to choose, so no refusal), given before the model is built."""
    import kat_timm.tools.export

    monkeypatch.setattr(kat_timm.tools.export, "export_onnx", lambda *a, **k: pytest.fail("stop: the warning came"))
    monkeypatch.setattr(common, "create_model", lambda *a, **k: pytest.fail("no warning before the model is built"))
    output = tmp_path / "m.txt"
    with pytest.raises(pytest.fail.Exception, match="no warning before"):
        cli.main(["kat_tiny", "-o", str(output)])
    assert capsys.readouterr().err == (f"kat-timm export: warning: {output} does not end in .onnx; an ONNX model is "
                                       "written there all the same\n")
    with pytest.raises(pytest.fail.Exception):
        cli.main(["kat_tiny", "-o", str(tmp_path / "m.ONNX")])
    assert capsys.readouterr().err == ""
