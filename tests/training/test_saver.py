"""kat_timm.training.saver: timm's CheckpointSaver with atomic writes."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from kat_timm.files import OutputPathError
from kat_timm.training import saver as saver_module
from kat_timm.training.saver import (LOCK_FILE, AtomicCheckpointSaver, RunFolderError, check_run_folder,
                                     claim_run_folder, run_files)
from tests.helpers import lock_held_by_another_process


def test_atomic_saver_never_exposes_a_partial_checkpoint(tmp_path, monkeypatch):
    """Every file under a *.pth.tar name appears by rename, complete; timm's unlink-then-rename is gone."""
    model = torch.nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                                  max_history=2)
    complete_names = []
    real_replace = os.replace

    def watch_replace(src, dst):
        assert not str(src).endswith(".pth.tar") or Path(src).name == "tmp.pth.tar", src
        assert torch.load(src, weights_only=True)["epoch"] >= 0, f"{src} is incomplete when renamed"
        complete_names.append(Path(dst).name)
        real_replace(src, dst)

    unlinked = []
    monkeypatch.setattr(saver_module.os, "replace", watch_replace)
    monkeypatch.setattr(os, "unlink", lambda path: unlinked.append(path))
    for epoch, metric in enumerate([1.0, 3.0, 2.0]):
        saver.save_checkpoint(epoch, metric)
    assert not unlinked, "last.pth.tar must be replaced, never deleted first"
    assert {"tmp.pth.tar", "last.pth.tar", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "model_best.pth.tar",
            "checkpoint-2.pth.tar"} <= set(complete_names)
    kept = sorted(path.name for path in tmp_path.glob("checkpoint-*.pth.tar"))
    assert kept == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"], "the 2 best by metric are kept"
    assert torch.load(tmp_path / "model_best.pth.tar", weights_only=True)["epoch"] == 1


# --------------------------------------------------------------------------------------------------------------------
# Issue 21, item 4: checkpoints never replace a link or a node; item 5: one run per folder
# --------------------------------------------------------------------------------------------------------------------


def _saver(folder):
    model = torch.nn.Linear(3, 2)
    return AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(folder),
                                 max_history=2)


def test_a_linked_last_checkpoint_is_written_through_and_a_device_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth.tar").symlink_to(elsewhere / "last.pth.tar")
    _saver(run).save_checkpoint(0, 1.0)
    assert (run / "last.pth.tar").is_symlink(), "the link was replaced by a file"
    assert torch.load(elsewhere / "last.pth.tar", weights_only=False)["epoch"] == 0

    device_run = tmp_path / "device_run"
    device_run.mkdir()
    os.mknod(device_run / "last.pth.tar", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(OutputPathError, match=r"last\.pth\.tar is a character device"):
        _saver(device_run).save_checkpoint(0, 1.0)
    assert stat.S_ISCHR((device_run / "last.pth.tar").lstat().st_mode), "the device node was replaced"


def test_a_locked_folder_is_refused_naming_the_holder_and_free_once_it_is_gone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with lock_held_by_another_process(folder) as pid:
        message = f"{folder} is in use by another kat-train run (process {pid}); wait for it to end, or give another"
        with pytest.raises(RunFolderError, match=re.escape(message)):
            claim_run_folder(str(tmp_path), "run")
        with pytest.raises(RunFolderError, match=re.escape(message)):
            check_run_folder(str(folder))  # the early check, before a model is built
    # The holder died and left its lock file (with its pid) behind: the kernel dropped the lock with it.
    assert (folder / LOCK_FILE).read_text() == f"{pid}\n"
    claimed, lock = claim_run_folder(str(tmp_path), "run")
    try:
        assert claimed == str(folder) and (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderError, match=rf"process {os.getpid()}\)"):
            claim_run_folder(str(tmp_path), "run")  # a second run in this very process is refused too
    finally:
        lock.release()
    claim_run_folder(str(tmp_path), "run")[1].release()  # released: free again


def test_two_generated_names_of_the_same_second_differ(tmp_path):
    first, first_lock = claim_run_folder(str(tmp_path), "20261207-120000-kat_tiny-32", unique=True)
    second, second_lock = claim_run_folder(str(tmp_path), "20261207-120000-kat_tiny-32", unique=True)
    first_lock.release()
    second_lock.release()
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert sorted(os.listdir(tmp_path)) == ["20261207-120000-kat_tiny-32", "20261207-120000-kat_tiny-32-1"]


RUN_FILES = ["args.yaml", "checkpoint-3.pth.tar", "last.pth.tar", "model_best.pth.tar", "recovery-2-10.pth.tar",
             "summary.csv", "summary.csv.partial"]


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in RUN_FILES + ["notes.txt", "checkpoint-x.pth.tar", "teacher.pth"]:
        (folder / name).write_text(name)
    assert run_files(str(folder)) == RUN_FILES
    with pytest.raises(RunFolderError, match=re.escape(
            f"{folder} holds another run (args.yaml, checkpoint-3.pth.tar, last.pth.tar, model_best.pth.tar, ...); "
            f"continue it with --resume {folder / 'last.pth.tar'}, start afresh there with --overwrite")):
        claim_run_folder(str(tmp_path), "run")
    assert sorted(os.listdir(folder)) == sorted(RUN_FILES + ["notes.txt", "checkpoint-x.pth.tar", "teacher.pth",
                                                             LOCK_FILE])
    claim_run_folder(str(tmp_path), "run", resume=True)[1].release()
    assert run_files(str(folder)) == RUN_FILES, "a resume keeps the run's files"
    claim_run_folder(str(tmp_path), "run", overwrite=True)[1].release()
    assert sorted(os.listdir(folder)) == ["checkpoint-x.pth.tar", "notes.txt", "run.lock", "teacher.pth"], \
        "--overwrite removes the run's own files, nothing else"


def test_a_run_folder_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(RunFolderError, match=rf"^{re.escape(str(tmp_path / 'run'))} is a file, not a folder; give "
                                             r"another --experiment"):
        claim_run_folder(str(tmp_path), "run")
