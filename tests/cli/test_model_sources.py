"""Model names with a source, as ``timm.create_model`` takes them (README, "Deployment"): ``local-dir:FOLDER`` (a
folder timm's ``save_for_hf`` wrote) and ``hf-hub:OWNER/NAME`` (the same files in the Hugging Face cache). Every
command that takes a model name builds that model with those weights; a bad folder or repo name is one line.

Offline: the hf-hub repo is in the fake cache of tests/conftest.py. The model is a 1-block kat_tiny at 32 px with 3
classes; what each command computes is checked against ``timm.create_model`` of the same name.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from kat_timm.cli import CLIError
from kat_timm.cli.common import create_model, create_sized_model
from kat_timm.cli.demo import sample_images

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = "someone/tiny-kat"


@pytest.fixture
def folder(tmp_path, ckpt):
    """A local-dir folder (config.json, model.safetensors, pytorch_model.bin) of a small random KAT."""
    from kat_timm.tools.hub import save_hub_folder

    model = timm.create_model("kat_tiny", depth=1, img_size=32, num_classes=3)
    model.load_state_dict(ckpt.random_kat_state_dict(5, depth=1, img_size=32, num_classes=3, weight_init="skip"))
    save_hub_folder(model, tmp_path / "published")
    return tmp_path / "published"


@pytest.fixture
def hub_repo(folder, offline_hub):
    """The same files as the Hub repo ``REPO`` in the offline cache."""
    for path in folder.iterdir():
        offline_hub.add_file(REPO, path.name, path.read_bytes())
    return f"hf-hub:{REPO}"


def _assert_same_weights(model, name):
    expected = timm.create_model(name, pretrained=True).state_dict()
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_create_model_takes_both_sources(source, folder, hub_repo):
    name = f"local-dir:{folder}" if source == "local-dir" else hub_repo
    model = create_model(name, pretrained=True)
    assert model.num_classes == 3 and len(model.blocks) == 1
    _assert_same_weights(model, name)
    trained = create_sized_model(name, [32], pretrained=True, num_classes=2)  # the kat-train route
    assert trained.num_classes == 2
    random = create_model(name, pretrained=False)  # the architecture of config.json, no weights (--random-weights)
    assert len(random.blocks) == 1
    assert not torch.equal(random.state_dict()["cls_token"], model.state_dict()["cls_token"])


def _name(source, folder, hub_repo):
    return f"local-dir:{folder}" if source == "local-dir" else hub_repo


@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_predict_takes_them(source, folder, hub_repo, capsys):
    from kat_timm.cli import predict

    name = _name(source, folder, hub_repo)
    image = str(sample_images()[0])
    assert predict.main([image, "--model", name, "--json", "--device", "cpu"]) == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)[0]
    model = timm.create_model(name, pretrained=True).eval()
    expected = predict.predict(model, predict.read_images([image]), predict.class_labeller(model), top_k=3)[0]
    assert [p["index"] for p in record["predictions"]] == [p.index for p in expected]
    assert [p["probability"] for p in record["predictions"]] == pytest.approx([p.probability for p in expected])
    assert record["model"] == name


@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_plot_and_validate_take_them(source, folder, hub_repo, tmp_path, capsys):
    from PIL import Image

    from kat_timm.cli import plot, validate

    name = _name(source, folder, hub_repo)
    assert plot.main(["--model", name, "-o", str(tmp_path / "rationals.png")]) == 0, capsys.readouterr().err
    assert (tmp_path / "rationals.png").stat().st_size > 0
    for label in ("a", "b", "c"):
        (tmp_path / "data" / "validation" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "validation" / label / "0.png")
    assert validate.main([str(tmp_path / "data"), "--model", name, "--pretrained", "--device", "cpu", "--workers",
                          "0"]) == 0, capsys.readouterr().err
    assert f'"model": "{name}"' in capsys.readouterr().out


def test_export_takes_them(folder, tmp_path, capsys, monkeypatch):
    """The model export builds (the ONNX step itself is tested in test_export.py: ~20 s)."""
    import kat_timm.tools.export
    from kat_timm.cli import export

    built = []

    def export_onnx(model, output, **kwargs):
        built.append(model)
        raise PermissionError(13, "stopped by the test")

    monkeypatch.setattr(kat_timm.tools.export, "export_onnx", export_onnx)
    name = f"local-dir:{folder}"
    assert export.main([name, "--pretrained", "-o", str(tmp_path / "m.onnx")]) == 1
    assert "stopped by the test" in capsys.readouterr().err
    _assert_same_weights(built[0], name)


def test_demo_takes_them(hub_repo, capsys):
    from kat_timm.cli import demo

    assert demo.main(["--model", hub_repo, "--device", "cpu", "--skip-benchmark"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"2. Model {hub_repo}" in out and f"released weights from {REPO}" in out
    assert "Could not fetch" not in out and "meaningless" not in out


def test_train_takes_them(folder, tmp_path, capsys):
    from PIL import Image

    from kat_timm.cli import train

    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200 * (label == "a"), 0, 0)).save(tmp_path / "data" / split / label / "0.png")
    code = train.main(["--data-dir", str(tmp_path / "data"), "--model", f"local-dir:{folder}", "--pretrained",
                       "--epochs", "1", "--batch-size", "2", "--img-size", "32", "--output", str(tmp_path / "runs"),
                       "--experiment", "x", "--workers", "0", "--device", "cpu", "--warmup-epochs", "0"])
    assert code == 0, capsys.readouterr().err
    # The run records the name it was given: its checkpoint builds from the folder, and says so once it is gone.
    from kat_timm.cli import predict

    checkpoint = tmp_path / "runs" / "x" / "last.pth.tar"
    image = str(sample_images()[0])
    assert predict.main([image, "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    folder.rename(tmp_path / "moved")
    assert predict.main([image, "--checkpoint", str(checkpoint), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"kat-timm predict: error: {checkpoint} records the model local-dir:{folder}, "
                                       f"which can't be read now (Config file not found: {folder}/config.json); "
                                       "restore it, or pass the architecture's name\n")


@pytest.mark.parametrize("name, message", [
    ("local-dir:MISSING", "local-dir:MISSING: no such folder"),
    ("local-dir:EMPTY", "local-dir:EMPTY: the folder holds no config.json (a folder that timm's save_for_hf or "
                        "scripts/convert_checkpoint.py wrote)"),
    ("hf-hub:no-owner", "'hf-hub:no-owner' is not of the form hf-hub:owner/repo"),
])
def test_bad_sources_are_one_line(name, message, tmp_path, offline_hub, capsys):
    from kat_timm.cli import predict

    (tmp_path / "empty").mkdir()
    replace = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}
    for key, value in replace.items():
        name, message = name.replace(key, value), message.replace(key, value)
    with pytest.raises(CLIError) as caught:
        create_model(name)
    assert str(caught.value) == message
    assert caught.value.code == 2
    assert predict.main([str(sample_images()[0]), "--model", name]) == 2
    err = capsys.readouterr().err
    assert err == f"kat-timm predict: error: {message}\n", err


def test_hf_hub_repo_missing_from_the_cache_offline_names_the_download(offline_hub):
    with pytest.raises(CLIError, match=r"kat-timm download hf-hub:someone/absent"):
        create_model("hf-hub:someone/absent", pretrained=True)


def test_local_dir_with_a_tilde_is_the_home_folder(folder, monkeypatch):
    """The shell expands ~ only at the start of a word: local-dir:~/x reaches the command as written."""
    monkeypatch.setenv("HOME", str(folder.parent))
    model = create_model(f"local-dir:~/{folder.name}", pretrained=True)
    _assert_same_weights(model, f"local-dir:{folder}")
