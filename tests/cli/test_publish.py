"""kat-timm publish (issue 22): a tiny kat-train run at 32 px on three named classes -> a Hub folder that timm
(``local-dir:``), ``kat-timm predict``, transformers (AutoModel and pipeline) and kat-validate load with the class
names and the same logits; a truthful card; ``--push`` at huggingface_hub's API boundary (no network). Also the
rules every checkpoint-reading command shares: one EMA rule, one wrong-model message, a folder given for a file.

One training run (module fixture, 2 blocks, 1 epoch, EMA) and one publish serve every test.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kat_timm  # noqa: F401  (registers the KAT models)
import timm
from kat_timm.cli import export as export_module
from kat_timm.cli import plot as plot_module
from kat_timm.cli import predict as predict_module
from kat_timm.cli import publish as publish_module
from kat_timm.cli import train as train_module
from kat_timm.cli import validate as validate_module
from kat_timm.cli.train import parse_args, train
from tests.helpers import torch_threads
from tests.training.test_data import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ("red", "green", "blue")  # folders; labels follow their sorted names: blue, green, red
LABELS = ["blue", "green", "red"]
REPO_ID = "someone/kat-tiny-shapes"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run folder of kat_tiny (2 blocks) trained 1 epoch with EMA on 3 colours at 32 px, and its published
    folder (``--repo-id`` given, no push)."""
    root = tmp_path_factory.mktemp("publish")
    data = make_image_folder(root / "shapes", classes=CLASSES, splits=(("train", 8), ("validation", 4)))
    with torch_threads(1):
        train(parse_args(["--data-dir", str(data), "--model", "kat_tiny", "--img-size", "32", "--model-kwargs",
                          "depth=2", "--batch-size", "8", "--workers", "0", "--output", str(root / "out"),
                          "--experiment", "run", "--lr", "1e-3", "--warmup-epochs", "0", "--epochs", "1",
                          "--device", "cpu", "--model-ema", "--model-ema-decay", "0.5", "--seed", "3"]))
        folder = root / "published"
        assert publish_module.main([str(root / "out" / "run" / "model_best.pth.tar"), "-o", str(folder),
                                    "--repo-id", REPO_ID]) == 0
    return SimpleNamespace(root=root, data=data, dir=root / "out" / "run",
                           checkpoint=root / "out" / "run" / "model_best.pth.tar", folder=folder)


def _checkpoint(path: Path) -> dict:
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _expected_logits(run, x: torch.Tensor, use_ema=None) -> torch.Tensor:
    from kat_timm.factory import create_model

    with torch.no_grad():
        return create_model(checkpoint=run.checkpoint, use_ema=use_ema).eval()(x)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# The folder, its config and card
# --------------------------------------------------------------------------------------------------------------------


def test_folder_holds_labels_size_and_model_args_and_files_share_one_mode(run):
    files = sorted(p.name for p in run.folder.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "pytorch_model.bin"]
    modes = {name: stat.S_IMODE((run.folder / name).stat().st_mode) for name in files}
    assert len(set(modes.values())) == 1, f"one mode for every file (safetensors wrote 0600): {modes}"
    config = json.loads((run.folder / "config.json").read_text())
    assert config["architecture"] == "kat_tiny" and config["num_classes"] == 3
    assert config["label_names"] == LABELS  # where timm's save_for_hf puts them (read into the pretrained cfg)
    assert config["model_args"] == {"depth": 2, "img_size": [32, 32], "in_chans": 3, "global_pool": "token"}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_card_tells_what_the_run_recorded_and_claims_no_imagenet_result(run):
    card = (run.folder / "README.md").read_text()
    assert "imagenet" not in card.lower() and "74.6" not in card and "adamdad/" not in card
    with open(run.dir / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    last = rows[-1]
    assert f"Final validation (epoch {last['epoch']}):** top-1 {float(last['eval_top1']):.2f}%" in card
    assert f"(EMA weights, epoch {last['epoch']}):** top-1 {float(last['eval_ema_top1']):.2f}%" in card
    assert "Epochs trained:** 1" in card
    assert "Classes:** 3: `blue`, `green`, `red`" in card
    assert "Training data:** `shapes`" in card and "Image size:** 32 x 32" in card
    assert "Started from:** random initialisation" in card
    assert f'timm.create_model("hf-hub:{REPO_ID}", pretrained=True)' in card
    assert f'pipeline("image-classification", model="{REPO_ID}")' in card
    assert "`state_dict_ema` of `model_best.pth.tar`" in card  # the EMA weights, by the one rule


# --------------------------------------------------------------------------------------------------------------------
# Every loader: timm, kat-timm predict, transformers, kat-validate
# --------------------------------------------------------------------------------------------------------------------


def test_timm_local_dir_gives_the_checkpoints_logits(run):
    x = torch.randn(3, 3, 32, 32)
    model = timm.create_model(f"local-dir:{run.folder}", pretrained=True).eval()
    assert list(model.pretrained_cfg["label_names"]) == LABELS
    with torch.no_grad():
        torch.testing.assert_close(model(x), _expected_logits(run, x), rtol=0, atol=1e-5)


def test_predict_on_the_folder_prints_the_class_names(run, capsys):
    image = run.data / "validation" / "red" / "0.png"
    assert predict_module.main([str(image), "--model", f"local-dir:{run.folder}", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)[0]
    assert result["weights"] == "its own"
    assert sorted(p["label"] for p in result["predictions"]) == LABELS, captured
    from PIL import Image

    from kat_timm.transforms import create_transform

    model = timm.create_model(f"local-dir:{run.folder}", pretrained=True).eval()
    with torch.no_grad():
        probabilities = model(create_transform(model)(Image.open(image).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    assert result["predictions"][0]["label"] == LABELS[int(probabilities.argmax())]
    assert result["predictions"][0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_transformers_auto_model_and_pipeline_name_the_classes(run):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForImageClassification.from_pretrained(str(run.folder)).eval()
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {name: index for index, name in enumerate(LABELS)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, _expected_logits(run, x), rtol=0, atol=1e-5)
    classify = transformers.pipeline("image-classification", model=str(run.folder))
    found = classify(str(run.data / "validation" / "blue" / "0.png"))
    assert sorted(item["label"] for item in found) == LABELS


def test_kat_validate_of_the_folder_matches_the_checkpoint(run, capsys):
    results = []
    for source in (["--model", f"local-dir:{run.folder}"], ["--checkpoint", str(run.checkpoint)]):
        code = validate_module.main(["--data-dir", str(run.data), "--workers", "0", "--device", "cpu", *source])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        results.append(json.loads(captured.out))
    folder, checkpoint = results
    assert folder["top1"] == checkpoint["top1"] and folder["num_images"] == checkpoint["num_images"] == 12
    assert folder["loss"] == pytest.approx(checkpoint["loss"], abs=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# --push, at huggingface_hub's API boundary
# --------------------------------------------------------------------------------------------------------------------


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo / upload_folder replaced by recorders (online mode, sockets blocked, HF_TOKEN set)."""
    from huggingface_hub import HfApi, constants, get_token

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token, get_token()))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", kwargs, sorted(p.name for p in folder.iterdir()), self.token, get_token()))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_creates_the_repo_and_uploads_the_folder_with_hf_token(run, tmp_path, fake_hub, capsys):
    out = tmp_path / "to_push"
    assert publish_module.main([str(run.checkpoint), "-o", str(out), "--repo-id", REPO_ID, "--push",
                                "--private"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"load it with timm.create_model('hf-hub:{REPO_ID}', "
                                                    "pretrained=True)")
    (name, repo_id, kwargs, token, env_token), upload = fake_hub
    assert (name, repo_id, kwargs) == ("create_repo", REPO_ID, {"repo_type": "model", "private": True,
                                                                "exist_ok": True})
    assert token is None and env_token == "hf_from_the_environment", "the token is huggingface_hub's: HF_TOKEN"
    assert upload[0] == "upload_folder"
    assert {k: upload[1][k] for k in ("repo_id", "folder_path", "repo_type")} == {
        "repo_id": REPO_ID, "folder_path": str(out), "repo_type": "model"}
    assert upload[2] == ["README.md", "config.json", "model.safetensors", "pytorch_model.bin"]


def test_push_offline_or_without_repo_is_one_line_before_any_work(run, tmp_path, offline_hub, capsys):
    out = tmp_path / "never"
    assert publish_module.main([str(run.checkpoint), "-o", str(out), "--repo-id", REPO_ID, "--push"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--push: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)" in line and not out.exists()
    assert publish_module.main([str(run.checkpoint), "-o", str(out), "--push"]) == 2
    assert "--push needs --repo-id OWNER/NAME" in _one_line(capsys.readouterr().err)
    assert publish_module.main([str(run.checkpoint), "-o", str(out), "--repo-id", "no/such/repo"]) == 2
    assert "--repo-id no/such/repo: not a Hub repo id" in _one_line(capsys.readouterr().err)
    # --private says how the repo --push creates is made: without --push it would be ignored without a word.
    assert publish_module.main([str(run.checkpoint), "-o", str(out), "--repo-id", REPO_ID, "--private"]) == 2
    assert _one_line(capsys.readouterr().err) == ("kat-timm publish: error: --private makes the repo that --push "
                                                  "creates private; add --push, or leave --private out")
    assert not out.exists()


def test_push_refused_by_the_hub_is_one_line_naming_the_login(run, monkeypatch):
    from huggingface_hub import HfApi, constants

    from kat_timm.tools.hub import PushError, push_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(self, repo_id, **kwargs):
        raise PermissionError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n"
                              "Invalid credentials in Authorization header")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(PushError) as raised:
        push_folder(run.folder, REPO_ID)
    message = str(raised.value)
    assert "\n" not in message and "cannot upload to someone/kat-tiny-shapes" in message and "401" in message
    assert "hf auth login" in message and "HF_TOKEN" in message


def test_output_under_a_file_is_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert publish_module.main([str(run.checkpoint), "-o", str(blocker / "sub")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"-o {blocker / 'sub'}: cannot write there ({blocker} is not a folder)" in line


# --------------------------------------------------------------------------------------------------------------------
# One EMA rule (issue 22.9 / 21.12)
# --------------------------------------------------------------------------------------------------------------------


def _validate(capsys, *argv):
    code = validate_module.main(["--workers", "0", "--device", "cpu", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_says_which_weights_it_evaluated_and_how_to_get_the_others(run, capsys):
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", run.checkpoint)
    assert code == 0, err
    assert (f"note: evaluating the EMA weights (state_dict_ema) of {run.checkpoint}; --no-ema evaluates its raw "
            f"model weights") in err
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", run.checkpoint, "--no-ema")
    assert code == 0, err
    assert (f"note: evaluating the raw model weights (state_dict) of {run.checkpoint}; leave out --no-ema to "
            f"evaluate its EMA weights") in err


def test_validate_says_when_the_run_scored_the_other_weights_higher(run, tmp_path, capsys):
    """The issue's trap: the EMA ranked model_best at 66.67 while its raw weights scored 33.33."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run.checkpoint, copy / "model_best.pth.tar")
    epoch = _checkpoint(run.checkpoint)["epoch"]
    (copy / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,eval_ema_loss,eval_ema_top1,"
                                      f"eval_ema_top5,lr\n{epoch},1.0,1.0,33.33,100,0.9,66.67,100,0.001\n")
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", copy / "model_best.pth.tar", "--no-ema")
    assert code == 0, err
    assert (f"(in training the EMA weights scored higher: top-1 66.67 (EMA) vs 33.33 (raw) at epoch {epoch}, so the "
            "others may score higher here too)") in err


def test_ema_only_file_is_evaluated_with_a_note_and_no_ema_explains_itself(run, tmp_path, capsys):
    checkpoint = _checkpoint(run.checkpoint)
    ema_only = tmp_path / "ema_only.pth.tar"
    torch.save({"state_dict_ema": checkpoint["state_dict_ema"], "epoch": checkpoint["epoch"],
                "args": checkpoint["args"]}, ema_only)
    code, out, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", ema_only)
    assert code == 0, err
    assert f"note: evaluating the EMA weights (state_dict_ema) of {ema_only}, the only weights it holds" in err
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", ema_only, "--no-ema")
    assert code == 1
    assert ("it holds only EMA weights (state_dict_ema), no raw model weights, which were asked for (--no-ema, "
            "use_ema=False); load its EMA weights: leave out --no-ema") in _one_line(err)
    image = run.data / "validation" / "red" / "0.png"
    assert predict_module.main([str(image), "--checkpoint", str(ema_only), "--no-ema", "--device", "cpu"]) == 1
    assert "it holds only EMA weights" in _one_line(capsys.readouterr().err)


def test_predict_export_plot_publish_take_the_ema_weights_unless_no_ema(run):
    """The one rule through the shared loader every command uses (kat_timm.cli.common.create_model)."""
    from kat_timm.cli.common import create_model

    checkpoint = _checkpoint(run.checkpoint)
    for use_ema, key in ((None, "state_dict_ema"), (True, "state_dict_ema"), (False, "state_dict")):
        state = create_model(None, checkpoint=run.checkpoint, use_ema=use_ema).state_dict()
        assert all(torch.equal(state[k], v) for k, v in checkpoint[key].items()), (use_ema, key)
    for module in (predict_module, export_module, plot_module, publish_module, validate_module):
        parser = module.build_parser("x") if hasattr(module, "build_parser") else module._parser("x")
        text = parser.format_help()
        assert "--no-ema" in text and "--use-ema" in text, module.__name__


# --------------------------------------------------------------------------------------------------------------------
# A checkpoint of the wrong model (22.7) and a folder where a file is expected (22.8): one line everywhere
# --------------------------------------------------------------------------------------------------------------------


WRONG = "does not fit kat_small: it holds a kat_tiny; give the matching model name"


def test_wrong_model_is_the_same_one_line_in_every_command(run, tmp_path, capsys):
    data, ckpt = str(run.data), str(run.checkpoint)
    train_args = ["--data-dir", data, "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                  "--output", str(tmp_path / "out"), "--epochs", "1"]
    commands = {
        "validate": lambda: validate_module.main(["--data-dir", data, "--checkpoint", ckpt, "--model", "kat_small",
                                                  "--workers", "0", "--device", "cpu"]),
        "train --initial-checkpoint": lambda: train_module.main(train_args + ["--model", "kat_small",
                                                                             "--initial-checkpoint", ckpt]),
        "train --resume": lambda: train_module.main(train_args + ["--model", "kat_small", "--resume", ckpt]),
        "predict": lambda: predict_module.main([str(run.data / "validation" / "red" / "0.png"), "--checkpoint", ckpt,
                                                "--model", "kat_small", "--device", "cpu"]),
        "export": lambda: export_module.main(["kat_small", "--checkpoint", ckpt, "-o", str(tmp_path / "m.onnx")]),
        "plot": lambda: plot_module.main(["--checkpoint", ckpt, "--model", "kat_small", "-o", str(tmp_path / "a.png")]),
        "publish": lambda: publish_module.main([ckpt, "--model", "kat_small", "-o", str(tmp_path / "pub")]),
    }
    for name, command in commands.items():
        code = command()
        line = _one_line(capsys.readouterr().err)
        assert code != 0, name
        expected = (f"cannot resume from {ckpt} with --model kat_small: it holds a kat_tiny; give the matching "
                    "model name" if name == "train --resume" else f"{ckpt} {WRONG}")
        assert expected in line, (name, line)
        assert len(line) < 400, (name, line)


def test_a_mismatch_within_one_architecture_is_one_short_line(run, capsys):
    """torch lists every mismatch on a line of its own (and every missing key on one line): the same architecture
    built with other arguments said so in kilobytes."""
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", run.checkpoint, "--model-kwargs",
                             "mlp_ratio=2")
    line = _one_line(err)
    assert code == 1
    assert "does not fit kat_tiny: size mismatch for blocks.0.mlp.fc1.weight" in line, line
    assert "and 4 more size mismatches" in line and "look like" not in line and len(line) < 600, line
    code, _, err = _validate(capsys, "--data-dir", run.data, "--checkpoint", run.checkpoint, "--model-kwargs",
                             "depth=1")
    line = _one_line(err)
    assert code == 1
    assert ("does not fit kat_tiny: Unexpected key(s) in state_dict: blocks.1.norm1.weight, blocks.1.norm1.bias, "
            "blocks.1.attn.qkv.weight and 13 more") in line and len(line) < 400, line


def test_a_folder_given_for_a_checkpoint_says_so(run, tmp_path, capsys):
    image = str(run.data / "validation" / "red" / "0.png")
    run_folder, hub_folder = str(run.dir), str(run.folder)
    loads_by_name = f", which loads by the model name local-dir:{hub_folder}"
    # publish takes no model name: for a folder it wrote, what to do with that folder instead.
    published = (f"; it is published already: upload it with 'hf upload OWNER/NAME {hub_folder}', or give the "
                 "checkpoint it was written from")
    for command, hub_advice in (
            (lambda path: predict_module.main([image, "--checkpoint", path, "--device", "cpu"]), loads_by_name),
            (lambda path: validate_module.main(["--data-dir", str(run.data), "--checkpoint", path, "--workers", "0"]),
             loads_by_name),
            (lambda path: export_module.main(["--checkpoint", path, "-o", str(tmp_path / "m.onnx")]), loads_by_name),
            (lambda path: plot_module.main(["--checkpoint", path, "-o", str(tmp_path / "a.png")]), loads_by_name),
            (lambda path: publish_module.main([path, "-o", str(tmp_path / "pub")]), published)):
        assert command(run_folder) != 0
        line = _one_line(capsys.readouterr().err)
        assert f"{run_folder} is a folder, not a checkpoint file: give a file in it; it holds " in line, line
        assert "model_best.pth.tar" in line
        assert command(hub_folder) != 0
        line = _one_line(capsys.readouterr().err)
        assert (f"{hub_folder} is a folder, not a checkpoint file: a Hub-style model folder (config.json + weights)"
                f"{hub_advice}") in line, line
        assert line.endswith(hub_advice), line
    train_args = ["--data-dir", str(run.data), "--model", "kat_tiny", "--output", str(tmp_path / "out")]
    assert train_module.main(train_args + ["--resume", run_folder]) == 2
    assert f"--resume {run_folder} is a folder, not a checkpoint file: give a file in it" in _one_line(
        capsys.readouterr().err)
    assert train_module.main(train_args + ["--initial-checkpoint", hub_folder]) == 2
    assert (f"--initial-checkpoint {hub_folder} is a folder, not a checkpoint file: a Hub-style model folder "
            f"(config.json + weights); start a run from its weights with --pretrained-path "
            f"{os.path.join(hub_folder, 'model.safetensors')}") in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exited:
        train_module.main(["-c", run_folder])
    assert exited.value.code == 2
    assert (f"-c {run_folder} is a folder, not a config file; a run folder's config is "
            f"{os.path.join(run_folder, 'args.yaml')}") in _one_line(capsys.readouterr().err)


def test_validate_reads_the_class_names_of_a_folder_given_under_home(run, monkeypatch):
    """``local-dir:~/FOLDER`` (as a shell leaves it when quoted): kat-validate finds the folder's class names as
    every other command finds the folder, ``~`` expanded."""
    monkeypatch.setenv("HOME", str(run.folder.parent))
    assert validate_module._folder_label_names(f"local-dir:~/{run.folder.name}") == LABELS
