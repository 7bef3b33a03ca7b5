"""kat-train on a tiny synthetic ImageFolder (CPU): training, resume, kill -9 safety, torchrun, configs, bad input.

The runs are in-process (``main([...])`` / ``train(parse_args([...]))``) except the two that need processes of their
own: the SIGKILL test and torchrun. kat_tiny is built at 32 px (4 patches) so an epoch is a fraction of a second.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch

from kat_timm.cli import train as train_module
from kat_timm.training import loop as loop_module
from kat_timm.cli.train import parse_args, train
from tests.helpers import fill_uninitialised_, one_thread_env, save_vit_as_npz, sigkill_training_after_first_checkpoint
from tests.training.test_data import make_image_folder, write_corrupt_image

REPO = Path(__file__).resolve().parents[2]

# One intra-op thread: on a busy 2-core machine OpenMP's barriers make 2 threads far slower (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")


def run_args(data: Path, out: Optional[Path], *extra: str, experiment: str = "run") -> list:
    """kat-train arguments for kat_tiny at 32 px on ``data`` (a few steps per epoch, no worker processes); the
    run folder is ``out/experiment`` (none given when ``out`` is None)."""
    where = ["--output", str(out), "--experiment", experiment] if out is not None else []
    return ["--data-dir", str(data), "--model", "kat_tiny", "--img-size", "32", "--batch-size", "8",
            "--workers", "0", *where, "--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu",
            "--log-interval", "1", *extra]


def load_training_checkpoint(path: Path) -> dict:
    """Load a training checkpoint as timm's resume does (weights_only, argparse.Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def summary_epochs(run_dir: Path) -> list:
    with open(run_dir / "summary.csv", newline="") as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def record_starting_weights(monkeypatch) -> dict:
    """Make kat-train record the model's state dict as its first epoch starts: ``returned["start"]``."""
    seen = {}
    original = loop_module.train_one_epoch

    def spy(epoch, model, *args, **kwargs):
        seen.setdefault("start", copy.deepcopy(model.state_dict()))
        return original(epoch, model, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", spy)
    return seen


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data")


def test_two_epochs_then_resume_restores_optimizer_ema_schedule_and_epoch(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = train(parse_args(run_args(data, out, "--epochs", "2", "--mixup", "0.8", "--model-ema",
                                      "--model-ema-decay", "0.9")))
    run_dir = out / "run"
    losses = [row["train_loss"] for row in first.history]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    assert losses[1] < losses[0], f"training loss did not decrease: {losses}"
    assert all(math.isfinite(row["eval_loss"]) and math.isfinite(row["eval_ema_loss"]) for row in first.history)
    assert {"last.pth.tar", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "model_best.pth.tar", "summary.csv",
            "args.yaml"} <= {path.name for path in run_dir.iterdir()}
    saved = load_training_checkpoint(run_dir / "last.pth.tar")
    assert saved["epoch"] == 1 and "state_dict_ema" in saved
    assert saved["args"].class_names == ["blue", "green", "red"]

    seen = {}
    original = loop_module.train_one_epoch

    def spy(epoch, model, loader, optimizer, *args, **kwargs):
        if not seen:  # the state the resumed run starts from
            # deep copies: training updates these tensors in place
            seen.update(epoch=epoch, optimizer=copy.deepcopy(optimizer.state_dict()),
                        model=copy.deepcopy(model.state_dict()),
                        ema=copy.deepcopy(kwargs["model_ema"].module.state_dict()), lr=optimizer.param_groups[0]["lr"])
        return original(epoch, model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", spy)
    resumed = train(parse_args(run_args(data, out, "--epochs", "3", "--mixup", "0.8", "--model-ema",
                                        "--model-ema-decay", "0.9", "--resume", str(run_dir / "last.pth.tar"))))
    assert resumed.start_epoch == 2 and seen["epoch"] == 2, "the run after epochs 0 and 1 must continue at epoch 2"
    assert [row["epoch"] for row in resumed.history] == [2]
    assert summary_epochs(run_dir) == [0, 1, 2]

    saved_state = saved["optimizer"]["state"]
    restored_state = seen["optimizer"]["state"]
    assert saved_state.keys() == restored_state.keys() and saved_state
    for key, state in saved_state.items():
        assert int(restored_state[key]["step"]) == int(state["step"]) == 12, f"Adam step of parameter {key}"
        torch.testing.assert_close(restored_state[key]["exp_avg"], state["exp_avg"], rtol=0, atol=0,
                                   msg=f"exp_avg of parameter {key} not restored")
        torch.testing.assert_close(restored_state[key]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0,
                                   msg=f"exp_avg_sq of parameter {key} not restored")
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(seen["model"][name], value, rtol=0, atol=0, msg=f"weight {name} not restored")
    for name, value in saved["state_dict_ema"].items():
        torch.testing.assert_close(seen["ema"][name], value, rtol=0, atol=0, msg=f"EMA weight {name} not restored")
    # Cosine over 3 epochs without warmup: epoch 2 runs at lr * (1 + cos(2 pi / 3)) / 2 = lr / 4.
    assert seen["lr"] == pytest.approx(2.5e-4), "the schedule did not resume at epoch 2"

    final = load_training_checkpoint(run_dir / "last.pth.tar")
    assert final["epoch"] == 2
    assert all(int(state["step"]) == 18 for state in final["optimizer"]["state"].values()), \
        "the optimizer must keep counting from the 12 restored steps (6 per epoch)"


def test_sigkill_mid_epoch_leaves_loadable_checkpoints_and_resumes(data, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "run"
    args = run_args(data, out, "--epochs", "60", "--checkpoint-hist", "2")
    sigkill_training_after_first_checkpoint(args, tmp_path, run_dir, tmp_path / "train.log", timeout_s=120)

    checkpoints = sorted(run_dir.glob("*.pth.tar"))
    assert checkpoints
    for path in checkpoints:  # nothing under a final name is ever half-written
        checkpoint = load_training_checkpoint(path)
        assert {"state_dict", "optimizer", "epoch"} <= checkpoint.keys(), path
    last_epoch = load_training_checkpoint(run_dir / "last.pth.tar")["epoch"]

    # No --output/--experiment: a resumed run continues in the folder of its checkpoint.
    result = train(parse_args(run_args(data, None, "--epochs", str(last_epoch + 2), "--checkpoint-hist", "2",
                                       "--resume", str(run_dir / "last.pth.tar"))))
    assert result.start_epoch == last_epoch + 1 and Path(result.output_dir) == run_dir
    assert load_training_checkpoint(run_dir / "last.pth.tar")["epoch"] == last_epoch + 1
    assert summary_epochs(run_dir) == list(range(last_epoch + 2)), "each epoch once in summary.csv"
    assert not list(run_dir.glob("*.partial")), "no temporary file left after a clean run"


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    from kat_timm.cli.train import parse_args, train

    result = train(parse_args(sys.argv[2:]))
    digest = hashlib.sha256()
    for module in (result.model, result.model_ema):
        for name, value in module.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    with open(os.path.join(sys.argv[1], "rank%s.txt" % os.environ["RANK"]), "w") as file:
        file.write("%s %r %s" % (digest.hexdigest(), result.history[-1]["train_loss"], result.output_dir))
""")


def test_torchrun_two_cpu_processes_end_with_identical_weights(data, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = one_thread_env(PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path), *run_args(data, tmp_path / "out", "--epochs", "1", "--mixup", "0.8", "--model-ema")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "world size 2 processes (gloo)" in completed.stdout
    rank0 = (tmp_path / "rank0.txt").read_text().split()
    rank1 = (tmp_path / "rank1.txt").read_text().split()
    assert rank0[0] == rank1[0], "the ranks' weights (model and EMA) differ after DDP training"
    assert rank0[1] == rank1[1], "the epoch's training loss is averaged over both ranks, so it must agree"
    assert rank1[2] == "None" and Path(rank0[2]).is_dir(), "only rank 0 writes the run folder"
    assert (Path(rank0[2]) / "last.pth.tar").is_file()


def test_config_file_sets_defaults_and_the_command_line_overrides(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model: kat_small_patch16_224\nlr: 1e-3\nepochs: 300\nmean: [0.5, 0.5, 0.5]\namp: true\n"
                      "model_ema_decay: 0.9999\nmodel_kwargs: {act_init: swish}\n")
    args = parse_args(["-c", str(config), "--epochs", "5", "--data-dir", "somewhere"])
    assert args.model == "kat_small_patch16_224" and args.lr == 1e-3 and isinstance(args.lr, float)
    assert args.epochs == 5, "an option on the command line overrides the config"
    assert args.mean == [0.5, 0.5, 0.5] and args.amp is True and args.model_ema_decay == 0.9999
    assert args.model_kwargs == {"act_init": "swish"} and args.data_dir == "somewhere"


@pytest.mark.parametrize("line, expected", [
    ("batchsize: 8", "unknown key 'batchsize' (did you mean batch_size"),
    ("no_prefetcher: true", "'no_prefetcher' is a timm train.py option that kat-train does not support"),
    ("epochs: ten", "epochs: invalid int value: 'ten'"),
    ("amp: 'yes'", "amp: expected true or false"),
    ("amp_dtype: float32", "amp_dtype: invalid choice: 'float32' (choose from 'float16', 'bfloat16')"),
])
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path, capsys, line, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: kat_tiny\n{line}\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["-c", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"kat-train: error: config {config}: ") and expected in error, error


def test_config_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("model: kat_tiny\n# r\u00e9glages\nepochs: 2\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["-c", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error == (f"kat-train: error: config {config}: not UTF-8 text (byte 0xe9 at line 2); save it as "
                     "UTF-8\n"), error


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["-c", str(tmp_path / "none.yaml")])
    assert f"config file not found: {tmp_path / 'none.yaml'}" in capsys.readouterr().err


def test_args_yaml_of_a_run_is_a_valid_config(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_module.main(run_args(data, out, "--epochs", "1", "--val-split", "")) == 0
    args = parse_args(["-c", str(out / "run" / "args.yaml")])
    assert args.img_size == 32 and args.epochs == 1 and args.model == "kat_tiny"
    assert "no validation split" in capsys.readouterr().out


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train_module.main(["--data-dir", str(missing), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("kat-train: error: data folder not found: ") and str(missing) in error
    assert "train/CLASS/*.png" in error


def test_no_data_dir_given(capsys):
    assert train_module.main(["--device", "cpu"]) == 2
    assert "give the dataset folder: --data-dir DIR" in capsys.readouterr().err


def test_empty_class_folder(data, tmp_path, capsys):
    (data / "train" / "yellow").mkdir()
    assert train_module.main(run_args(data, tmp_path / "out")) == 1
    assert f"1 class folder(s) in {data / 'train'} hold no images" in capsys.readouterr().err


def test_train_and_validation_classes_differ(data, tmp_path, capsys):
    make_image_folder(data, classes=("cyan",), splits=(("validation", 1),))
    assert train_module.main(run_args(data, tmp_path / "out")) == 1
    assert f"only in {data / 'validation'}: cyan" in capsys.readouterr().err


def test_one_class_is_refused_before_the_run_starts(tmp_path, capsys):
    """Issue 21, item 14: one class trained to loss 0 and top-1 100 without a word."""
    data = make_image_folder(tmp_path / "data", classes=("red",), splits=(("train", 8), ("validation", 2)))
    assert train_module.main(run_args(data, tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip() == (
        f"kat-train: error: {data / 'train'} has one class (red): a classifier learns nothing from it (loss 0 and "
        f"top-1 100% from the start); give at least two classes")
    assert not (tmp_path / "out").exists()


def test_unknown_model_name(data, tmp_path, capsys):
    assert train_module.main(run_args(data, tmp_path / "out", "--model", "kat_gigantic")) == 2
    assert "kat-train: error: unknown model 'kat_gigantic'" in capsys.readouterr().err


def test_resume_from_a_checkpoint_of_another_architecture(data, tmp_path, capsys, ckpt):
    other = tmp_path / "small.pth"
    torch.save({"state_dict": ckpt.random_kat_state_dict(5, "kat_small_patch16_224", weight_init="skip"),
                "epoch": 3}, other)
    assert train_module.main(run_args(data, tmp_path / "out", "--resume", str(other))) == 1
    error = capsys.readouterr().err
    assert f"kat-train: error: cannot resume from {other} with --model kat_tiny" in error
    assert "kat_small_patch16_224" in error, "the message should say what the checkpoint is for"


@pytest.mark.parametrize("source", ["--pretrained", "--pretrained-path"])
def test_fine_tune_released_weights_at_another_size_and_class_count(data, tmp_path, monkeypatch, released_hub,
                                                                    kat_tiny_weights, ckpt, source):
    """Transfer: the 224-px, 1000-class weights start a 32-px, 3-class run (new head, resampled position embed)."""
    released = kat_tiny_weights["scratch"]
    extra = ["--pretrained"]
    if source == "--pretrained-path":
        extra = ["--pretrained-path", str(ckpt.save_released(released, tmp_path / "weights" / "kat_tiny.bin"))]
    seen = record_starting_weights(monkeypatch)
    args = run_args(data, tmp_path / "out", "--model", "kat_tiny_patch16_224", "--epochs", "1", "--val-split", "",
                    *extra)
    result = train(parse_args(args))
    start = seen["start"]
    assert start["head.weight"].shape == (3, 192) and start["pos_embed"].shape == (1, 5, 192)
    for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "blocks.5.mlp.act2.weight_denominator"):
        torch.testing.assert_close(start[name], released[name], rtol=0, atol=0, msg=f"{name} not from {source}")
    assert math.isfinite(result.history[0]["train_loss"])


def test_initial_checkpoint_with_another_class_count_points_to_pretrained_path(data, tmp_path, capsys, ckpt):
    weights = ckpt.save_released(ckpt.random_kat_state_dict(3, weight_init="skip"), tmp_path / "kat_tiny.bin")
    code = train_module.main(run_args(data, tmp_path / "out", "--model", "kat_tiny_patch16_224", "--img-size", "224",
                                      "--initial-checkpoint", str(weights)))
    assert code == 2
    error = capsys.readouterr().err
    assert "has a 1000-class classifier but the data has 3 classes" in error
    assert f"use --pretrained-path {weights}" in error


def test_initial_checkpoint_vit_npz(data, tmp_path, monkeypatch):
    """The .vitft recipes' route: a ViT in Google's .npz layout (here 21 classes, 32 px) starts a KAT run."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=21, img_size=32)
    save_vit_as_npz(vit, tmp_path / "vit.npz")
    seen = record_starting_weights(monkeypatch)
    train(parse_args(run_args(data, tmp_path / "out", "--model", "kat_tiny_patch16_224", "--epochs", "1",
                              "--val-split", "", "--initial-checkpoint", str(tmp_path / "vit.npz"))))
    for name in ("blocks.5.mlp.fc1.weight", "blocks.0.attn.qkv.bias", "pos_embed"):
        torch.testing.assert_close(seen["start"][name], vit.state_dict()[name], rtol=0, atol=0, msg=name)
    assert seen["start"]["head.weight"].shape == (3, 192), "the 21-class head is not loaded into a 3-class one"


def test_corrupt_training_image_is_skipped_with_a_warning(data, tmp_path, caplog):
    bad = write_corrupt_image(data / "train" / "red" / "3.png")
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "")) == 0
    warnings = [record.getMessage() for record in caplog.records if record.name == "kat_timm.training.data"]
    assert len(warnings) == 1 and str(bad) in warnings[0], warnings


def test_a_class_whose_every_image_is_unreadable_stops_the_run_before_it_starts(data, tmp_path, capsys):
    for path in (data / "train" / "green").iterdir():
        write_corrupt_image(path)
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1")) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"kat-train: error: no image could be decoded in 1 class folder(s) of {data / 'train'}: green "
                     f"(16 file(s)). Replace the files, or remove the folders."), error
    assert not (tmp_path / "out").exists()


def test_a_long_run_of_unreadable_images_is_one_line_not_a_traceback(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", splits=(("train", 40), ("validation", 2)))
    for number in range(1, 40):  # red keeps one readable image, so the pre-check passes
        write_corrupt_image(data / "train" / "red" / f"{number}.png")
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kat-train: error: 32 images in a row could not be decoded"), error


def test_odd_batch_with_mixup_is_refused(data, tmp_path, capsys):
    assert train_module.main(run_args(data, tmp_path / "out", "--batch-size", "7", "--mixup", "0.8")) == 2
    assert "--batch-size must be even (got 7)" in capsys.readouterr().err


def test_batch_larger_than_the_data(data, tmp_path, capsys):
    assert train_module.main(run_args(data, tmp_path / "out", "--batch-size", "64")) == 2
    assert "not one full batch of 64" in capsys.readouterr().err


def test_help_mentions_img_size_for_fixed_size_models_and_the_corrupt_image_rule(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "also gets img_size=N" in text
    assert "skipped with a warning naming it" in text


def _fake_run_checkpoint(path: Path, img_size: int = 32, num_classes: int = 3, **run_args) -> Path:
    """A kat-train-like checkpoint of kat_tiny (random weights) whose run options are ``run_args``."""
    from kat_timm.cli.common import create_model

    model = fill_uninitialised_(create_model("kat_tiny", img_size=img_size, num_classes=num_classes, weight_init="skip"))
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "version": 2,
                "args": argparse.Namespace(model="kat_tiny", img_size=img_size, num_classes=num_classes,
                                           **run_args)}, path)
    return path


def test_resume_onto_renamed_class_folders_is_refused(data, tmp_path, capsys):
    """Same class count, other folders: the weights would load and every label would silently change meaning."""
    checkpoint = _fake_run_checkpoint(tmp_path / "last.pth.tar", class_names=["blue", "crimson", "green"])
    assert train_module.main(run_args(data, tmp_path / "out", "--resume", str(checkpoint))) == 2
    error = capsys.readouterr().err
    assert f"--resume {checkpoint} was trained on other classes" in error, error
    assert "not in the data: crimson; new in the data: red" in error, error


def test_resume_onto_the_same_classes_in_another_order_is_refused(data, tmp_path, capsys):
    checkpoint = _fake_run_checkpoint(tmp_path / "last.pth.tar", class_names=["red", "green", "blue"])
    assert train_module.main(run_args(data, tmp_path / "out", "--resume", str(checkpoint))) == 2
    assert "the same folders in another label order" in capsys.readouterr().err


def test_resume_with_another_image_size_names_the_run_option(data, tmp_path, capsys):
    checkpoint = _fake_run_checkpoint(tmp_path / "last.pth.tar", img_size=48, class_names=["blue", "green", "red"])
    assert train_module.main(run_args(data, tmp_path / "out", "--resume", str(checkpoint))) == 1
    error = capsys.readouterr().err
    assert "size mismatch for pos_embed" in error and "the run was started with --img-size 48" in error, error


def test_mean_of_the_wrong_length(data, tmp_path, capsys):
    assert train_module.main(run_args(data, tmp_path / "out", "--mean", "0.5", "0.5")) == 2
    assert "kat-train: error: --mean takes 1 value or one per input channel (3), got 2" in capsys.readouterr().err


def test_plateau_schedule_without_validation_follows_the_training_loss(data, tmp_path, monkeypatch):
    """Without a validation split, --sched plateau must still see a metric each epoch (it never decayed before)."""
    from timm.scheduler import PlateauLRScheduler

    seen = []
    original = PlateauLRScheduler.step

    def spy(self, epoch, metric=None):
        seen.append((epoch, metric, self.lr_scheduler.mode))
        return original(self, epoch, metric)

    monkeypatch.setattr(PlateauLRScheduler, "step", spy)
    result = train(parse_args(run_args(data, tmp_path / "out", "--epochs", "2", "--val-split", "", "--sched",
                                       "plateau")))
    stepped = [(epoch, metric, mode) for epoch, metric, mode in seen if epoch > 0]
    assert stepped == [(epoch + 1, row["train_loss"], "min") for epoch, row in enumerate(result.history)]


def test_gradient_accumulation_short_last_group_steps_with_its_own_mean_gradient(data, tmp_path, monkeypatch):
    """48 images, batch 8, 4 accumulation steps: 6 batches, so updates over 4 batches and then 2. The second update
    must move the weights by -lr x the mean gradient over exactly those 16 images (a 1/4 scaling would halve it)."""
    record = {}
    original = loop_module.train_one_epoch

    def spy(epoch, model, loader, optimizer, loss_fn, *args, **kwargs):
        record.update(model=model, copy=copy.deepcopy(model), images=[], targets=[], before_step=[])
        model.register_forward_pre_hook(lambda module, inputs: record["images"].append(inputs[0].detach().clone()))

        def recording_loss(output, targets):
            record["targets"].append(targets.detach().clone())
            return loss_fn(output, targets)

        step = optimizer.step

        def recording_step(*step_args, **step_kwargs):
            record["before_step"].append({name: value.detach().clone() for name, value in model.named_parameters()})
            return step(*step_args, **step_kwargs)

        monkeypatch.setattr(optimizer, "step", recording_step)
        return original(epoch, model, loader, optimizer, recording_loss, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", spy)
    lr = 0.05
    train(parse_args(run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "", "--no-aug", "--smoothing",
                              "0", "--drop-path", "0", "--opt", "momentum", "--momentum", "0", "--weight-decay", "0",
                              "--lr", str(lr), "--grad-accum-steps", "4")))
    assert len(record["images"]) == 6 and len(record["before_step"]) == 2, "6 batches, 2 optimizer updates"

    reference = record["copy"]
    reference.load_state_dict(record["before_step"][1], strict=False)
    reference.train()
    loss = torch.nn.functional.cross_entropy(reference(torch.cat(record["images"][4:])),
                                             torch.cat(record["targets"][4:]))
    loss.backward()
    final = dict(record["model"].named_parameters())
    for name in ("head.weight", "blocks.11.mlp.fc2.weight", "blocks.0.mlp.act2.weight_numerator"):
        expected = record["before_step"][1][name] - lr * dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(final[name].detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_repeated_augmentation_in_a_single_process_is_announced_as_off(data, tmp_path, capsys):
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "",
                                      "--aug-repeats", "3")) == 0
    assert "--aug-repeats 3 applies to distributed training only" in capsys.readouterr().out



def test_amp_on_cpu_defaults_to_bfloat16(data, tmp_path, capsys, monkeypatch):
    # float16 autocast on a CPU is tens of times slower than float32; bfloat16 is the CPU's own low precision.
    dtypes = []
    real_autocast = torch.autocast

    def recording_autocast(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "", "--amp")) == 0
    assert "AMP bfloat16" in capsys.readouterr().out
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_resume_with_another_layer_decay_is_refused_naming_both_values(data, tmp_path, capsys):
    """Issue 11, item 2: the restored optimizer would keep 0.75's lr scales while the run records 0.65."""
    checkpoint = _fake_run_checkpoint(tmp_path / "last.pth.tar", opt="adamw", layer_decay=0.75,
                                      class_names=["blue", "green", "red"])
    assert train_module.main(run_args(data, tmp_path / "out", "--resume", str(checkpoint), "--layer-decay",
                                      "0.65")) == 2
    error = capsys.readouterr().err
    assert f"--resume {checkpoint} was trained with --layer-decay 0.75, not 0.65" in error, error
    assert "Resume with --layer-decay 0.75, or add --no-resume-opt" in error and error.count("\n") == 1, error


def test_args_yaml_of_a_resumed_run_does_not_resume_it_again_and_a_finished_run_says_so(data, tmp_path, capsys):
    """Issue 11, item 3: a resumed run's args.yaml used to hold resume:, so -c args.yaml --experiment new resumed the
    old run again and trained nothing (exit 0); re-running a finished run also exited 0 without a word."""
    out = tmp_path / "out"
    assert train_module.main(run_args(data, out, "--epochs", "1", "--val-split", "")) == 0
    last = out / "run" / "last.pth.tar"
    assert train_module.main(run_args(data, None, "--epochs", "2", "--val-split", "", "--resume", str(last))) == 0
    capsys.readouterr()
    args = parse_args(["-c", str(out / "run" / "args.yaml"), "--experiment", "new"])
    assert args.resume == "" and args.epochs == 2, "args.yaml must be a config for a new run"

    assert train_module.main(run_args(data, None, "--epochs", "2", "--val-split", "", "--resume", str(last))) == 2
    error = capsys.readouterr().err
    assert (f"nothing to train: the run {last} finished at epoch 1, and --epochs 2 ends at epoch 1 (epochs count "
            f"from 0); raise --epochs to train on") in error, error


def test_a_configs_resume_is_ignored_for_a_new_experiment_with_a_note(tmp_path, capsys):
    """Issue 11, item 3, for args.yaml files written before resume was left out of them."""
    config = tmp_path / "args.yaml"
    config.write_text("resume: old/last.pth.tar\nepochs: 3\n")
    assert parse_args(["-c", str(config)]).resume == "old/last.pth.tar"
    assert parse_args(["-c", str(config), "--experiment", "new"]).resume == ""
    assert "ignoring resume: old/last.pth.tar of config" in capsys.readouterr().err
    assert parse_args(["-c", str(config), "--experiment", "new", "--resume", "x.pth.tar"]).resume == "x.pth.tar"


def test_offline_pretrained_error_suggests_only_options_kat_train_has(data, tmp_path, capsys, offline_hub):
    """Issue 11, item 4: the advice said --checkpoint FILE, which argparse reads as --checkpoint-hist."""
    assert train_module.main(run_args(data, tmp_path / "out", "--pretrained")) == 1
    error = capsys.readouterr().err
    suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", error))
    assert suggested, error
    known = train_module.build_parser()._option_string_actions
    assert all(option in known for option in suggested), (sorted(suggested - set(known)), error)


def test_offline_pretrained_error_of_a_config_with_pretrained_true_advises_no_pretrained(data, tmp_path, capsys,
                                                                                         offline_hub):
    """Issue 22, item 6: "leave out --pretrained" when the config set it, where only --no-pretrained helps."""
    config = tmp_path / "recipe.yaml"
    config.write_text("pretrained: true\n")
    assert train_module.main(["-c", str(config), *run_args(data, tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "or --no-pretrained (random weights)" in error and "leave out" not in error, error
    assert train_module.main(run_args(data, tmp_path / "out", "--pretrained")) == 1
    assert "or leave out --pretrained (random weights)" in capsys.readouterr().err


def test_config_pretrained_true_is_switched_off_on_the_command_line(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("pretrained: true\nmodel_ema: true\nepochs: 3\n")
    assert parse_args(["-c", str(config)]).pretrained is True
    args = parse_args(["-c", str(config), "--no-pretrained", "--no-model-ema"])
    assert args.pretrained is False and args.model_ema is False and args.epochs == 3


@pytest.mark.parametrize("line, expected", [
    ("epochs: 1.5", "epochs: invalid int value: '1.5'"),
    ("lr: true", "lr: invalid float value: 'True'"),
    ("input_size: [3, 32]", "input_size: expected a list of 3 values, got [3, 32]"),
    ("hflip: null", "hflip: null is not allowed (its default is 0.5); give a value or remove the key"),
    ("epochs: null", "epochs: null is not allowed (its default is 300)"),
    ("scale: 0.5", "scale: expected a list of 2 values, got 0.5"),
])
def test_config_values_go_through_the_options_own_types(tmp_path, capsys, line, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(line + "\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(config)])
    assert expected in capsys.readouterr().err


def test_config_values_that_read_as_the_command_line_would(tmp_path):
    """null where the default is None, ``torchcompile: true`` as the bare option, a quoted number in model_kwargs
    converted as ``--model-kwargs img_size=32`` converts it."""
    config = tmp_path / "recipe.yaml"
    config.write_text("torchcompile: true\npretrained_path: null\nmodel_kwargs: {img_size: '32', act_init: swish}\n")
    args = parse_args(["-c", str(config)])
    assert args.torchcompile == "inductor" and args.pretrained_path is None
    assert args.model_kwargs == {"img_size": 32, "act_init": "swish"}
    config.write_text("torchcompile: false\n")
    assert parse_args(["-c", str(config)]).torchcompile is None


def test_default_workers_stay_within_the_cpus_without_pytorchs_warning(data, tmp_path, monkeypatch):
    """Issue 11, item 7: the default --workers 4 made PyTorch warn on a 2-core machine, several times per run."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    argv = [item for item in run_args(data, tmp_path / "out", "--epochs", "1") if item != "--workers"]
    argv.remove("0")
    assert parse_args(argv).workers is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_module.main(argv) == 0
    worker_warnings = [str(item.message) for item in caught if "worker" in str(item.message)]
    assert not worker_warnings, worker_warnings


def test_progress_and_epoch_lines_show_the_same_unscaled_lr_with_layer_decay(data, tmp_path, capsys):
    """Issue 11, item 7: the progress bar showed the most-decayed group's lr, the epoch line the mean (12x apart)."""
    assert train_module.main(run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "", "--batch-size",
                                      "48", "--layer-decay", "0.5")) == 0
    out = capsys.readouterr().out
    assert "; 1 step per epoch;" in out, out
    progress = re.findall(r"\[1/1\].* lr (\S+)", out)
    epoch = re.findall(r"epoch 0: .*\| lr (\S+)", out)
    assert progress and epoch and float(progress[0]) == float(epoch[0]) == 1e-3, out


def test_a_warmup_that_covers_the_run_or_starts_above_the_lr_is_announced(tmp_path, capsys):
    """Issue 22, item 10: "lr 7.81e-06" announced, the epochs ran at 1e-05 falling (warmup-lr above the scaled lr,
    5 warmup epochs for a short run), without a word."""
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), splits=(("train", 4), ("validation", 1)))
    argv = run_args(data, tmp_path / "out", "--epochs", "1", "--val-split", "")
    argv[argv.index("--warmup-epochs") + 1] = "2"
    assert train_module.main([*argv, "--warmup-lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "adamw lr 0.001 (reached after 2 warmup epochs from 0.01), cosine schedule" in out, out
    assert ("kat-train: warning: --warmup-epochs 2 covers the whole run of 1 epoch: the lr never reaches 0.001; give "
            "--warmup-epochs below 1 (0: no warmup)") in out, out
    assert ("kat-train: warning: --warmup-lr 0.01 is above the lr 0.001: the warmup starts higher and lowers the lr; "
            "give --warmup-lr below 0.001 (e.g. 0.0001) or --warmup-epochs 0") in out, out
    assert float(re.findall(r"epoch 0: .*\| lr (\S+)", out)[0]) == 0.01, "the epoch ran at the warmup lr"
    assert train_module.main([*argv, "--warmup-lr", "1e-5", "--epochs", "3", "--experiment", "quiet"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_more_classes_than_the_data_says_which_option_to_change(tmp_path, capsys):
    """Issue 22, item 11: a config's num_classes: 10 on a 3-class folder trained to top-1 0 after a vague note."""
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), splits=(("train", 4), ("validation", 1)))
    config = tmp_path / "recipe.yaml"
    config.write_text("num_classes: 4\n")
    assert train_module.main(["-c", str(config), *run_args(data, tmp_path / "out", "--epochs", "1")]) == 0
    assert (f"kat-train: warning: --num-classes 4 (or num_classes: 4 in {config}) but the data has 2 classes: the "
            f"extra 2 outputs are never a target, yet they can still win the top-1; give --num-classes 2 (it "
            f"overrides a config) to match the data") in capsys.readouterr().out


def test_a_resumed_run_reads_its_checkpoint_once(data, tmp_path, monkeypatch):
    """Weights, optimizer, EMA, epoch, saver history and the checks all come from one read of last.pth.tar (it was
    read four times)."""
    out = tmp_path / "out"
    assert train_module.main(run_args(data, out, "--epochs", "1", "--model-ema")) == 0
    last = (out / "run" / "last.pth.tar").resolve()
    reads = []
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        if Path(os.fspath(file)).resolve() == last:
            reads.append(kwargs.get("mmap"))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    result = train(parse_args(run_args(data, None, "--epochs", "2", "--model-ema", "--resume", str(last))))
    assert result.start_epoch == 1 and [row["epoch"] for row in result.history] == [1]
    assert len(reads) == 1, f"last.pth.tar was read {len(reads)} times"


def test_timms_log_lines_are_prefixed_and_the_trim_names_no_temporary_file(data, tmp_path, capsys, monkeypatch,
                                                                          kat_tiny_weights, ckpt):
    """Issue 22, item 12: timm's lines came out bare, one naming summary.csv.partial, a file the user never sees."""
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh kat-train process (pytest's capture handler removed)
    monkeypatch.setattr(root, "level", root.level)
    weights = ckpt.save_released(kat_tiny_weights["scratch"], tmp_path / "kat_tiny.bin")
    argv = run_args(data, tmp_path / "out", "--model", "kat_tiny_patch16_224", "--epochs", "2")
    assert train_module.main([*argv, "--pretrained-path", str(weights)]) == 0
    err = capsys.readouterr().err
    assert "\nkat-train: Loading pretrained weights from state dict\n" in f"\n{err}", err
    assert train_module.main([*argv, "--resume", str(tmp_path / "out" / "run" / "checkpoint-0.pth.tar")]) == 0
    err = capsys.readouterr().err
    assert ".partial" not in err and "Dropping" not in err, err
    assert all(line.startswith("kat-train: ") for line in err.splitlines()), err
    assert summary_epochs(tmp_path / "out" / "run") == [0, 1]


def test_pretrained_path_is_read_once(data, tmp_path, monkeypatch, kat_tiny_weights, ckpt):
    """timm gets the state dict kat-train read (for its coverage check) instead of reading the file again."""
    weights = ckpt.save_released(kat_tiny_weights["scratch"], tmp_path / "weights" / "kat_tiny.bin").resolve()
    reads = []
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        if Path(os.fspath(file)).resolve() == weights:
            reads.append(file)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    result = train(parse_args(run_args(data, tmp_path / "out", "--model", "kat_tiny_patch16_224", "--epochs", "1",
                                       "--val-split", "", "--pretrained-path", str(weights))))
    assert math.isfinite(result.history[0]["train_loss"]) and len(reads) == 1, f"read {len(reads)} times"
