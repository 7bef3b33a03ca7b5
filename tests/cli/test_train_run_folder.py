"""Issue 21, item 5: one kat-train run per folder. Two runs with the same --experiment interleaved their summary.csv
rows and checkpoints; a re-run without --resume overwrote the old run's files and left its checkpoint-N beside the
new ones; two runs started in the same second without --experiment shared a folder. In-process runs of kat_tiny at
32 px (about a second an epoch); the folder's lock is held by a child process where another run must hold it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kat_timm.cli import train as train_module
from tests.cli.test_train import run_args, summary_epochs
from tests.helpers import lock_held_by_another_process
from tests.training.test_data import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", splits=(("train", 8), ("validation", 4)))


def _kat_train(capsys, *argv) -> tuple:
    code = train_module.main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.err


def _contents(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != "run.lock"}


def test_a_second_run_in_a_folder_is_refused_until_resumed_or_overwritten(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    run_dir = out / "run"
    assert _kat_train(capsys, *run_args(data, out, "--epochs", "1"))[0] == 0
    (run_dir / "checkpoint-7.pth.tar").write_bytes((run_dir / "last.pth.tar").read_bytes())  # an older run's
    (run_dir / "notes.txt").write_text("mine")
    before = _contents(run_dir)

    built = []
    monkeypatch.setattr(train_module, "_create_model", lambda *a, **k: built.append(1) or pytest.fail("built"))
    code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1"))
    assert code == 2 and not built, err
    assert err.startswith(f"kat-train: error: {run_dir} holds another run (args.yaml, checkpoint-0.pth.tar, ") and \
        f"continue it with --resume {run_dir / 'last.pth.tar'}, start afresh there with --overwrite" in err, err
    assert len(err.splitlines()) == 1 and _contents(run_dir) == before, "refused before writing anything"

    code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1", "--overwrite", "--resume",
                                             run_dir / "last.pth.tar"))
    assert (code, err) == (2, "kat-train: error: give --resume (continue the run) or --overwrite (start afresh), "
                              "not both\n")
    code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1", "--overwrite", "--initial-checkpoint",
                                             run_dir / "checkpoint-7.pth.tar"))
    assert code == 2 and "is a file of the run that --overwrite removes; copy it out of" in err, err
    monkeypatch.undo()

    assert _kat_train(capsys, *run_args(data, out, "--epochs", "1", "--overwrite"))[0] == 0
    names = set(_contents(run_dir))
    assert "checkpoint-7.pth.tar" not in names, "--overwrite removed the old run's checkpoint-N"
    assert {"notes.txt", "last.pth.tar", "checkpoint-0.pth.tar", "summary.csv", "args.yaml"} <= names
    assert (run_dir / "notes.txt").read_text() == "mine", "only the run's own files are removed"
    assert summary_epochs(run_dir) == [0]
    assert "overwrite" not in (run_dir / "args.yaml").read_text(), "a config made from args.yaml never overwrites"


def test_a_folder_another_run_holds_is_refused_with_its_pid(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    monkeypatch.setattr(train_module, "_create_model", lambda *a, **k: pytest.fail("a model was built"))
    with lock_held_by_another_process(out / "run") as pid:
        code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1"))
    assert (code, err) == (2, f"kat-train: error: {out / 'run'} is in use by another kat-train run (process {pid}); "
                              f"wait for it to end, or give another --experiment\n")
    assert sorted(p.name for p in (out / "run").iterdir()) == ["run.lock"], "nothing written"


def test_the_lock_is_taken_under_the_folder_check_too(data, tmp_path, capsys, monkeypatch):
    """A run that starts between the early check and the folder's creation is still caught: by the lock."""
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    real_check = train_module._check_run_folder
    holders = []

    def check_then_another_run_starts(*args, **kwargs):
        real_check(*args, **kwargs)
        holders.append(lock_held_by_another_process(out / "run"))
        return holders[-1].__enter__()

    monkeypatch.setattr(train_module, "_check_run_folder", check_then_another_run_starts)
    try:
        code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1"))
    finally:
        holders[0].__exit__(None, None, None)
    assert code == 2 and "is in use by another kat-train run (process " in err, err
    assert sorted(p.name for p in (out / "run").iterdir()) == ["run.lock"], "nothing written"


def test_two_runs_in_the_same_second_without_experiment_get_two_folders(data, tmp_path, capsys, monkeypatch):
    from datetime import datetime

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 7, 12, 0, 0)

    monkeypatch.setattr(train_module, "datetime", FrozenClock)
    out = tmp_path / "out"
    for _ in range(2):
        assert _kat_train(capsys, *run_args(data, None, "--epochs", "1", "--output", out))[0] == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["20261207-120000-kat_tiny-32", "20261207-120000-kat_tiny-32-1"]
    for folder in folders:
        assert summary_epochs(out / folder) == [0], "each run its own summary"


def test_an_experiment_that_is_a_file_is_named_so(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run").write_text("not a folder")
    code, err = _kat_train(capsys, *run_args(data, out, "--epochs", "1"))
    assert (code, err) == (2, f"kat-train: error: {out / 'run'} is a file, not a folder; give another --experiment "
                              f"(or --output)\n")
    assert (out / "run").read_text() == "not a folder"


def test_a_resumed_run_writes_through_links_and_refuses_a_fifo(data, tmp_path, capsys):
    """Item 4 for kat-train's own files: args.yaml a link (written through), summary.csv a FIFO (refused, in one
    line, instead of a rename that replaces it or a copy that blocks on it)."""
    import os

    out = tmp_path / "out"
    run_dir = out / "run"
    assert _kat_train(capsys, *run_args(data, out, "--epochs", "1"))[0] == 0
    kept = tmp_path / "kept"
    kept.mkdir()
    (run_dir / "args.yaml").rename(kept / "args.yaml")
    (run_dir / "args.yaml").symlink_to(kept / "args.yaml")
    (run_dir / "summary.csv").unlink()
    os.mkfifo(run_dir / "summary.csv")
    code, err = _kat_train(capsys, *run_args(data, None, "--epochs", "2", "--resume", run_dir / "last.pth.tar"))
    assert (code, err) == (2, f"kat-train: error: {run_dir / 'summary.csv'} is a FIFO (named pipe), not a regular "
                              f"file; give the path of a file to write\n")
    assert (run_dir / "args.yaml").is_symlink() and "model: kat_tiny" in (kept / "args.yaml").read_text()
    assert (run_dir / "summary.csv").is_fifo()
