"""Every training command that README.md and configs/README.md show, run as written on a tiny generated ImageFolder
(or, for the ``--dataset`` recipes, a tiny save_to_disk folder or WebDataset shards).

The commands are listed here verbatim and a test checks that the list and the READMEs' code blocks agree, so a recipe
added to (or changed in) a README cannot go untested. Each command runs in-process from a scratch folder holding a
copy of ``configs/`` (relative paths resolve as they do for a user in a checkout), with only what makes it fast
appended: one epoch, 32 px, batch 8, no loader workers, the CPU. ``torchrun --nproc_per_node N -m kat_timm.cli.train``
runs as one process here (``test_train.py`` runs torchrun itself); ``--pretrained`` reads fake released weights from
an offline Hugging Face cache; the ``.vitft`` recipe's AugReg ``.npz`` is a small random ViT written in that layout.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from kat_timm.cli import train as train_module
from tests.cli.test_train import load_training_checkpoint, summary_epochs
from tests.helpers import save_vit_as_npz
from tests.training.test_data import make_image_folder

REPO = Path(__file__).resolve().parents[2]
READMES = (REPO / "README.md", REPO / "configs" / "README.md")

pytestmark = pytest.mark.usefixtures("single_thread")

FINE_TUNE = ("kat-train --data-dir DATA --model kat_tiny_patch16_224 --pretrained --epochs 30 --batch-size 64 "
             "--lr 1.25e-4 --layer-decay 0.75 --warmup-epochs 3 --aa rand-m9-mstd0.5 --reprob 0.25 --drop-path 0.1 "
             "--amp --output output --experiment my_data")

# command as the README shows it -> where its run folder must appear (a glob relative to the working folder)
COMMANDS = {
    FINE_TUNE: "output/my_data",
    "kat-train -c configs/kat_tiny_transfer.yaml --data-dir DATA --num-classes N":
        "output/train/*-kat_tiny_patch16_224-32",
    "torchrun --nproc_per_node=8 -m kat_timm.cli.train -c configs/kat_tiny.yaml --data-dir /data/imagenet "
    "--output output": "output/*-kat_tiny_patch16_224-32",
    "kat-train <same options> --resume output/my_data/last.pth.tar": "output/my_data",
    "torchrun --nproc_per_node 8 -m kat_timm.cli.train -c configs/kat_tiny.yaml --data-dir /data/imagenet":
        "output/train/*-kat_tiny_patch16_224-32",
    "kat-train -c configs/kat_tiny_transfer.yaml --data-dir /data/my10classes":
        "output/train/*-kat_tiny_patch16_224-32",
    "torchrun --nproc_per_node 8 -m kat_timm.cli.train -c configs/kat_small_vitft.yaml --data-dir /data/imagenet":
        "output/train/*-kat_small_patch16_224-32",
    "kat-train --dataset hfds/DATA_SAVED_TO_DISK --model kat_tiny --pretrained --epochs 10":
        "output/train/*-kat_tiny-32",
    "kat-train --dataset wds/imagenet --data-dir /data/imagenet-wds --num-classes 1000 --train-split "
    "'imagenet-train-{000000..001023}.tar' --train-num-samples 1281167 --val-split 'imagenet-val-{000000..000063}.tar' "
    "-c configs/kat_tiny.yaml": "output/train/*-kat_tiny_patch16_224-32",
    "torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 --rdzv-id kat_t -m "
    "kat_timm.cli.train -c configs/kat_tiny.yaml --batch-size 32 --dataset wds/imagenet --data-dir "
    "/data/imagenet-wds --num-classes 1000 --train-split 'imagenet-train-{000000..001023}.tar' --train-num-samples "
    "1281167 --val-split 'imagenet-val-{000000..000063}.tar' --workers 8 --output /shared/output":
        "output/*-kat_tiny_patch16_224-32",
}

# The data of the --dataset recipes, written small in tmp_path: what each README word stands for.
WDS_TRAIN, WDS_VAL = "train-{0000..0003}.tar", "validation-{0000..0003}.tar"

FAST = ["--epochs", "1", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--log-interval", "1"]


def _readme_commands() -> set:
    """The kat-train command lines of the READMEs: fenced lines (with their continuations) and inline code spans."""
    found = set()
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        fenced, prose, inside = [], [], False
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
            else:
                (fenced if inside else prose).append(line)
        for line in "\n".join(fenced).replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("kat-train ") or "-m kat_timm.cli.train" in line:
                found.add(" ".join(line.split()))
        for span in re.findall(r"`(kat-train [^`]+)`", " ".join(prose)):
            if "--data-dir" in span:  # a runnable command, not an option name in prose
                found.add(" ".join(span.split()))
    return found


def test_the_list_is_every_training_command_of_the_readmes():
    assert _readme_commands() == set(COMMANDS), "update COMMANDS to the READMEs' training commands"


def _argv(command: str, data: Path) -> list:
    command = command.replace("<same options>", FINE_TUNE.split(" ", 1)[1])
    words = shlex.split(command)
    words = words[words.index("kat_timm.cli.train") + 1:] if words[0] == "torchrun" else words[1:]
    replace = {"DATA": str(data), "/data/imagenet": str(data), "/data/my10classes": str(data), "N": "3",
               "hfds/DATA_SAVED_TO_DISK": f"hfds/{data.parent / 'hf'}", "/data/imagenet-wds": str(data.parent / "wds"),
               "imagenet-train-{000000..001023}.tar": WDS_TRAIN, "imagenet-val-{000000..000063}.tar": WDS_VAL,
               "1281167": "32", "/shared/output": "output"}
    return [replace.get(word, word) for word in words] + FAST


def _make_reader_data(command: str, root: Path, monkeypatch) -> None:
    """The data a --dataset recipe reads: a save_to_disk folder (hfds/) or 4 + 4 tar shards (wds/), in ``root``."""
    from tests.cli.dataset_makers import make_hf_dataset, make_wds_shards

    if "hfds/" in command:
        import datasets
        import datasets.config

        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets_cache")
        make_hf_dataset(root / "hf")
    if "wds/" in command:
        make_wds_shards(root / "wds", "train", labels_per_shard=range(4), per_shard=8)
        make_wds_shards(root / "wds", "validation", labels_per_shard=range(4), per_shard=2, seed=1)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_training_command_runs_as_written(command, tmp_path, monkeypatch, released_hub):
    import timm

    data = make_image_folder(tmp_path / "data")
    _make_reader_data(command, tmp_path, monkeypatch)
    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")
    monkeypatch.chdir(work)
    if "vitft" in command:  # the AugReg ViT-S/16 IN-21k file the config names, as a small random ViT
        checkpoint = train_module.parse_args(["-c", "configs/kat_small_vitft.yaml"]).initial_checkpoint
        Path(checkpoint).parent.mkdir(parents=True)
        save_vit_as_npz(timm.create_model("vit_small_patch16_224", num_classes=21843, img_size=32), checkpoint)
    resumes = "--resume" in command
    if resumes:  # the run it continues
        assert train_module.main(_argv(FINE_TUNE, data)) == 0

    argv = _argv(command, data)
    if resumes:
        argv += ["--epochs", "2"]  # one more epoch than the run it resumes
    assert train_module.main(argv) == 0, command

    run_dirs = list(work.glob(COMMANDS[command]))
    assert len(run_dirs) == 1, f"{command}: run folders {run_dirs}"
    run_dir = run_dirs[0]
    assert {"last.pth.tar", "model_best.pth.tar", "summary.csv", "args.yaml"} <= {p.name for p in run_dir.iterdir()}
    assert summary_epochs(run_dir) == ([0, 1] if resumes else [0])
    assert load_training_checkpoint(run_dir / "last.pth.tar")["epoch"] == (1 if resumes else 0)
