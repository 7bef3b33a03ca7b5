"""kat-train and kat-validate on timm's other readers: a Hugging Face ``datasets`` folder (``hfds/``) and WebDataset
shards (``wds/``), single process and torchrun, resume after SIGKILL, and one-line errors for every missing piece.

Everything is written in tmp_path (32 px images, a few dozen samples), read offline; kat_tiny at 32 px, 1 epoch
unless a test needs more.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kat_timm.cli import train as train_module
from kat_timm.cli import validate as validate_module
from kat_timm.cli.train import parse_args, train
from tests.cli.dataset_makers import CLASSES, make_hf_dataset, make_wds_shards
from tests.helpers import one_thread_env, sigkill_training_after_first_checkpoint

REPO = Path(__file__).resolve().parents[2]
TRAIN_SHARDS = "train-{0000..0003}.tar"
VAL_SHARDS = "validation-{0000..0003}.tar"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    """Hugging Face datasets offline, its cache in tmp_path (for this process and the ones it starts)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    import datasets
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    # Its progress bars go to stderr, which the one-line error tests read.
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    return make_hf_dataset(tmp_path / "hf")


@pytest.fixture
def shards(tmp_path) -> Path:
    """4 training shards of 8 samples, shard N all of class N; 4 validation shards of 2."""
    root = tmp_path / "shards"
    make_wds_shards(root, "train", labels_per_shard=range(4), per_shard=8)
    make_wds_shards(root, "validation", labels_per_shard=range(4), per_shard=2, seed=1)
    return root


def common(out: Path, *extra: str, experiment: str = "run") -> list:
    return ["--model", "kat_tiny", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--output", str(out),
            "--experiment", experiment, "--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu",
            "--log-interval", "1", *extra]


def wds_args(shards: Path, out: Path, *extra: str, experiment: str = "run") -> list:
    return ["--dataset", "wds/toy", "--data-dir", str(shards), "--train-split", TRAIN_SHARDS,
            "--val-split", VAL_SHARDS, "--train-num-samples", "32", "--num-classes", "4",
            *common(out, *extra, experiment=experiment)]


def one_line_error(capsys, argv: list, main=train_module.main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def validate_json(capsys, argv: list) -> dict:
    assert validate_module.main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------------------


def test_hfds_folder_trains_and_validates(hf_folder, tmp_path, capsys):
    out = tmp_path / "out"
    result = train(parse_args(["--dataset", f"hfds/{hf_folder}", *common(out, "--epochs", "1")]))
    assert len(result.history) == 1 and result.history[0]["eval_top1"] >= 0
    assert result.model.num_classes == len(CLASSES), "the class count comes from the ClassLabel feature"
    printed = capsys.readouterr().out
    assert f"hfds/{hf_folder} train: 32 images; hfds/{hf_folder} validation: 16 images; 4 classes" in printed
    checkpoint = out / "run" / "last.pth.tar"
    assert checkpoint.is_file()

    report = validate_json(capsys, ["--dataset", f"hfds/{hf_folder}", "--split", "validation", "--model",
                                    "kat_tiny", "--checkpoint", str(checkpoint), "--workers", "0", "--device", "cpu"])
    assert report["num_images"] == 16 and report["img_size"] == 32
    assert report["top1"] == pytest.approx(result.history[0]["eval_top1"], abs=1e-3), "kat-train's own evaluation"


def test_hfds_resume_after_sigkill(hf_folder, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "run"
    args = ["--dataset", f"hfds/{hf_folder}", *common(out, "--epochs", "60", "--val-split", "")]
    last_epoch = _kill_after_first_checkpoint(args, tmp_path, run_dir)
    result = train(parse_args(["--dataset", f"hfds/{hf_folder}", *common(
        out, "--epochs", str(last_epoch + 2), "--val-split", "", "--resume", str(run_dir / "last.pth.tar"))]))
    assert result.start_epoch == last_epoch + 1 and len(result.history) == 1


@pytest.mark.parametrize("option, value, expected", [
    ("--train-split", "test", "--train-split test: hfds/"),
    ("--input-key", "img", "--input-key img: hfds/"),
    ("--target-key", "lbl", "--target-key lbl: hfds/"),
])
def test_hfds_missing_split_or_key_is_one_line(hf_folder, tmp_path, capsys, option, value, expected):
    err = one_line_error(capsys, ["--dataset", f"hfds/{hf_folder}", *common(tmp_path / "out", option, value)])
    assert expected in err, err
    if option != "--train-split":
        assert "columns: image, label" in err, err
    else:
        assert "train" in err and "validation" in err, "the existing splits are named"


def test_hfds_missing_dataset_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["--dataset", f"hfds/{tmp_path / 'nowhere'}", *common(tmp_path / "out")])
    assert f"--dataset hfds/{tmp_path / 'nowhere'}: no such folder" in err, err
    err = one_line_error(capsys, ["--dataset", f"hfds/{tmp_path / 'nowhere'}", "--split", "validation"],
                         main=validate_module.main)
    assert "no such folder" in err, err


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "2"])
def test_wds_shards_train_and_validate(shards, tmp_path, capsys, workers):
    """In one process, with or without loader workers (2 workers split the 4 shards between them)."""
    out = tmp_path / "out"
    result = train(parse_args(wds_args(shards, out, "--epochs", "1", "--workers", workers)))
    assert len(result.history) == 1
    printed = capsys.readouterr().out
    assert f"wds/toy {TRAIN_SHARDS}: 32 images; wds/toy {VAL_SHARDS}: 8 images" in printed, printed
    assert "4 steps per epoch" in printed, printed
    report = validate_json(capsys, ["--dataset", "wds/toy", "--data-dir", str(shards), "--split", VAL_SHARDS,
                                    "--model", "kat_tiny", "--checkpoint", str(out / "run" / "last.pth.tar"),
                                    "--workers", "0", "--device", "cpu"])
    assert report["num_images"] == 8, "every validation sample once (counted from the shards' tar headers)"
    assert report["top1"] == pytest.approx(result.history[0]["eval_top1"], abs=1e-3)


def test_wds_labels_from_the_json_sidecar(shards, tmp_path, capsys):
    """--target-key reads the label from each sample's .json, as in timm."""
    result = train(parse_args(wds_args(shards, tmp_path / "out", "--epochs", "1", "--target-key", "class")))
    assert len(result.history) == 1


@pytest.mark.parametrize("change, expected", [
    (("--train-split", "train-{0000..0007}.tar"), "--train-split train-{0000..0007}.tar: 4 of 8 shard files are "
                                                  "missing"),
    (("--train-split", "imagenet-train"), "--train-split imagenet-train: not a WebDataset split"),
    (("--train-num-samples", None), "--train-split train-{0000..0003}.tar: the number of samples is unknown"),
    (("--target-key", "label"), "--target-key label: not a field of the .json of sample"),
    (("--input-key", "jpg"), "--input-key jpg: sample train_0000_0000 of"),
    (("--num-classes", None), "--dataset wds/toy: the data does not name its classes"),
    (("--num-classes", "1"), "--num-classes 1: a classifier learns nothing with one class (loss 0 and top-1 100%"),
    (("--data-dir", "MISSING"), "(the WebDataset shards of --dataset wds/toy)"),
    (("--workers", "8"), "4 shards for 8 loaders (1 process x 8 workers)"),
])
def test_wds_bad_arguments_are_one_line(shards, tmp_path, capsys, change, expected):
    argv = wds_args(shards, tmp_path / "out")
    option, value = change
    if option not in argv:
        argv += [option, value]
    elif value is None:
        del argv[argv.index(option):argv.index(option) + 2]
    else:
        argv[argv.index(option) + 1] = str(tmp_path / value) if value == "MISSING" else value
    err = one_line_error(capsys, argv)
    assert expected in err, err


def test_wds_sample_without_a_label_is_one_line(tmp_path, capsys):
    make_wds_shards(tmp_path / "nolabel", "train", labels_per_shard=[0], per_shard=8, members=("png",))
    argv = ["--dataset", "wds/toy", "--data-dir", str(tmp_path / "nolabel"), "--train-split", "train-0000.tar|8",
            "--val-split", "", "--num-classes", "4", *common(tmp_path / "out")]
    err = one_line_error(capsys, argv)
    assert "has no .cls label" in err and "--target-key FIELD" in err, err


def test_dataset_without_a_reader_prefix_is_an_image_folder_as_in_timm(tmp_path, capsys):
    from tests.training.test_data import make_image_folder

    argv = ["--dataset", "imagenet", "--data-dir", str(tmp_path / "folder"), *common(tmp_path / "o")]
    assert train_module.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no reader prefix, so it is read as an ImageFolder" in err, err
    assert "hfds/imagenet, wds/imagenet or torch/imagenet" in err, err
    make_image_folder(tmp_path / "folder", splits=(("train", 8), ("validation", 2)))
    assert len(train(parse_args(argv + ["--epochs", "1"])).history) == 1


def test_wds_resume_after_sigkill(shards, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "run"
    last_epoch = _kill_after_first_checkpoint(wds_args(shards, out, "--epochs", "60"), tmp_path, run_dir)
    result = train(parse_args(wds_args(shards, out, "--epochs", str(last_epoch + 2),
                                       "--resume", str(run_dir / "last.pth.tar"))))
    assert result.start_epoch == last_epoch + 1 and len(result.history) == 1
    assert "eval_top1" in result.history[0]


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from kat_timm.cli import train as train_module
    from kat_timm.training import loop as loop_module

    seen = []
    original = loop_module.train_one_epoch

    class Recording:
        # the loader, recording the labels this process trains on
        def __init__(self, loader):
            self.loader = loader
        def __len__(self):
            return len(self.loader)
        def __iter__(self):
            for images, targets in self.loader:
                seen.extend(int(t) for t in targets)
                yield images, targets

    def spy(epoch, model, loader, *args, **kwargs):
        return original(epoch, model, Recording(loader), *args, **kwargs)

    loop_module.train_one_epoch = spy
    result = train_module.train(train_module.parse_args(sys.argv[2:]))
    with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as file:
        json.dump({"labels": seen, "loss": result.history[-1]["train_loss"],
                   "top1": result.history[-1]["eval_top1"]}, file)
""")


def test_wds_torchrun_two_processes_read_their_own_shards(shards, tmp_path):
    """gloo, 2 processes: each trains on 2 of the 4 shards (shard N is class N, so the labels tell which), the two
    sets are disjoint and cover all 4; evaluation covers every validation sample once, so both ranks agree."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = one_thread_env(PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path), *wds_args(shards, tmp_path / "out", "--epochs", "1", "--batch-size", "4")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "world size 2 processes (gloo)" in completed.stdout
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    labels = [set(rank["labels"]) for rank in ranks]
    assert all(len(rank["labels"]) == 16 for rank in ranks), "32 samples split evenly between 2 processes"
    assert all(len(found) == 2 for found in labels), f"each rank reads 2 whole shards: {labels}"
    assert not labels[0] & labels[1] and labels[0] | labels[1] == {0, 1, 2, 3}, labels
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["top1"] == ranks[1]["top1"], ranks


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _kill_after_first_checkpoint(args: list, tmp_path: Path, run_dir: Path) -> int:
    """Start kat-train with ``args`` in a process of its own, SIGKILL it during the epoch after its first checkpoint;
    the epoch of the last complete checkpoint."""
    import argparse

    import torch

    sigkill_training_after_first_checkpoint(args, tmp_path, run_dir, tmp_path / "train.log", timeout_s=180)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=True)["epoch"]


def test_distributed_evaluation_that_timm_would_cut_short_is_refused(tmp_path):
    """2 validation shards of 2 samples: 2 processes x 2 workers are 4 loaders capped at 1 sample each, so half the
    split would go unscored; with 2 loaders (no workers) every sample is read."""
    from kat_timm.training.data import DataError
    from kat_timm.training.readers import check_shard_spread

    make_wds_shards(tmp_path, "val", labels_per_shard=[0, 1], per_shard=2)
    spec = argparse.Namespace(dataset="wds/toy", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"would score only 2 of 4 samples \(timm caps each loader at 1\)"):
        check_shard_spread(spec, "val-{0000..0001}.tar", world_size=2, workers=2, num_samples=None)
    check_shard_spread(spec, "val-{0000..0001}.tar", world_size=2, workers=0, num_samples=None)
    check_shard_spread(spec, "val-{0000..0001}.tar", world_size=1, workers=8, num_samples=None)


def test_hfds_torchrun_two_processes(hf_folder, tmp_path):
    """gloo, 2 processes on a save_to_disk folder: timm's distributed sampler gives each half of the 32 images, and
    the averaged loss and the evaluation over all 16 validation images agree on both ranks."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = one_thread_env(PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path), "--dataset", f"hfds/{hf_folder}", *common(tmp_path / "out", "--epochs", "1",
                                                                   "--batch-size", "4")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "world size 2 processes (gloo)" in completed.stdout
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(rank["labels"]) for rank in ranks] == [16, 16]
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["top1"] == ranks[1]["top1"], ranks
    assert (tmp_path / "out" / "run" / "last.pth.tar").is_file()


def test_wds_splits_named_in_info_json(shards, tmp_path, capsys):
    """An _info.json listing each split's shards and lengths (timm's format): the default split names work and the
    sample counts need no option."""
    info = {"name": "toy", "splits": {
        name: {"name": name, "num_samples": 4 * per, "filenames": [f"{name}-{i:04d}.tar" for i in range(4)],
               "shard_lengths": [per] * 4} for name, per in (("train", 8), ("validation", 2))}}
    (shards / "_info.json").write_text(json.dumps(info))
    argv = ["--dataset", "wds/toy", "--data-dir", str(shards), "--num-classes", "4",
            *common(tmp_path / "out", "--epochs", "1")]
    result = train(parse_args(argv))
    assert len(result.history) == 1
    assert "wds/toy train: 32 images; wds/toy validation: 8 images" in capsys.readouterr().out
    argv[argv.index("--num-classes"):argv.index("--num-classes")] = ["--train-split", "training"]
    argv[argv.index("--experiment") + 1] = "second"  # one run per folder: "run" holds the first
    err = one_line_error(capsys, argv)
    assert "--train-split training: not a WebDataset split" in err and "lists train, validation" in err, err
