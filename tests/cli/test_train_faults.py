"""Fault injection for kat-train: a kill at each write of a resumed epoch, a kill inside the summary rewrite, a full
disk (a file-size limit) while writing a checkpoint or the run options, a resume from a file that is no training
checkpoint, an output folder that can't be written.

Every fault is injected at an exact point in a child process (``os._exit`` at the Nth rename into the run folder,
or inside timm's CSV writer; ``RLIMIT_FSIZE`` for the full disk, which makes ``write`` fail as a full disk does).
The assertions are the same each time: the previous good state is intact (every ``*.pth.tar`` loads, summary.csv
keeps its rows, nothing ``.partial`` stays, ``model_best`` is the best epoch), and resuming continues from it.

The evaluation is replaced by fixed metrics per epoch (top-1 10, 20, 5 for epochs 0, 1, 2), so which epoch is best
is known: epoch 1, saved by the run that is killed. Training itself is real (kat_tiny at 32 px, as in test_train).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kat_timm.cli import train as train_module
from kat_timm.training import loop as loop_module
from kat_timm.training import saver as saver_module
from tests.cli.test_train import load_training_checkpoint, run_args, summary_epochs
from tests.helpers import one_thread_env, torch_threads
from tests.training.test_data import make_image_folder

REPO = Path(__file__).resolve().parents[2]
TOP1 = {0: 10.0, 1: 20.0, 2: 5.0}  # epoch 1 is the best
KILLED = 137

pytestmark = pytest.mark.usefixtures("single_thread")

# Runs kat-train with one fault armed. argv[1]: JSON {"argv": [...], "fault": ..., "folder": ..., "n": ...}.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    spec = json.loads(sys.argv[1])
    top1 = {int(epoch): value for epoch, value in spec["top1"].items()}
    from kat_timm.cli import train as t
    from kat_timm.training import loop

    current = {}
    real_epoch, real_replace = loop.train_one_epoch, os.replace

    def one_epoch(epoch, *args, **kwargs):
        current["epoch"] = epoch
        return real_epoch(epoch, *args, **kwargs)

    loop.train_one_epoch = one_epoch
    t._evaluate_epoch = lambda *args: {"loss": 1.0, "top1": top1[current["epoch"]], "top5": 100.0}
    fault = spec["fault"]
    if fault == "kill_at_replace":  # before the Nth rename into the run folder
        count = [0]

        def replace(src, dst):
            if os.path.abspath(dst).startswith(spec["folder"]):
                count[0] += 1
                if count[0] == spec["n"]:
                    os._exit(137)
            return real_replace(src, dst)

        os.replace = replace
    elif fault == "kill_in_csv_writer":  # timm's trim_summary has opened its file for writing
        import csv
        csv.writer = lambda *args, **kwargs: os._exit(137)
    elif fault == "file_size_limit":
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["n"], spec["n"]))
    sys.exit(t.main(spec["argv"]))
""")


def fixed_metrics(monkeypatch) -> None:
    """Replace the evaluation by TOP1[epoch] (in this process; the child does the same)."""
    current = {}
    real_epoch = loop_module.train_one_epoch

    def one_epoch(epoch, *args, **kwargs):
        current["epoch"] = epoch
        return real_epoch(epoch, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", one_epoch)
    monkeypatch.setattr(train_module, "_evaluate_epoch",
                        lambda *args: {"loss": 1.0, "top1": TOP1[current["epoch"]], "top5": 100.0})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(data, run folder) of one finished epoch (epoch 0), made once; tests work on copies of the folder."""
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", splits=(("train", 8), ("validation", 2)))
    with torch_threads(1), pytest.MonkeyPatch.context() as monkeypatch:  # module scope: not single_thread
        fixed_metrics(monkeypatch)
        assert train_module.main(run_args(data, root / "out", "--epochs", "1")) == 0
    return data, root / "out" / "run"


@pytest.fixture
def run(base_run, tmp_path):
    """A fresh copy of the one-epoch run folder, and the data."""
    data, folder = base_run
    copy = tmp_path / "out" / "run"
    shutil.copytree(folder, copy)
    return data, copy


def resume_args(data: Path, folder: Path, epochs: int) -> list:
    """Resume the run in ``folder`` from its last.pth.tar (no --output/--experiment: it continues in that folder)."""
    return run_args(data, None, "--epochs", str(epochs), "--resume", str(folder / "last.pth.tar"))


def run_child(argv: list, fault: str, folder: Path, n: int = 0) -> subprocess.CompletedProcess:
    spec = {"argv": argv, "fault": fault, "folder": str(folder.resolve()), "n": n, "top1": TOP1}
    env = one_thread_env(PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, cwd=folder.parent, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_good_state(folder: Path) -> None:
    """Every checkpoint under a final name loads, summary.csv has one row per epoch from 0, model_best is one."""
    checkpoints = {path.name: load_training_checkpoint(path) for path in folder.glob("*.pth.tar")}
    assert "last.pth.tar" in checkpoints
    epochs = summary_epochs(folder)
    assert epochs == list(range(len(epochs))) and epochs, f"summary.csv epochs {epochs}"
    # model_best may still be the previous best (a kill just before its link); the resume must repair that.
    assert checkpoints["model_best.pth.tar"]["epoch"] in epochs


def assert_resume_continues(data: Path, folder: Path, monkeypatch) -> None:
    """A plain resume to 3 epochs finishes from the state left behind, every epoch once, model_best = epoch 1."""
    fixed_metrics(monkeypatch)
    assert train_module.main(resume_args(data, folder, 3)) == 0
    assert summary_epochs(folder) == [0, 1, 2], "each epoch once in summary.csv"
    assert load_training_checkpoint(folder / "last.pth.tar")["epoch"] == 2
    assert load_training_checkpoint(folder / "model_best.pth.tar")["epoch"] == 1, "epoch 1 is the best"
    assert not list(folder.glob("*.partial")), "no temporary file left after a clean run"


# The renames into the run folder during a resumed epoch, in order (the child counts them): args.yaml, the
# summary's trim, the summary's new row, tmp.pth.tar, tmp -> last, checkpoint-1, model_best.
WRITES = ["args.yaml", "summary trim", "summary row", "tmp.pth.tar", "last.pth.tar", "checkpoint-1", "model_best"]


@pytest.mark.parametrize("n", range(1, len(WRITES) + 1), ids=WRITES)
def test_kill_before_each_write_of_a_resumed_epoch(run, monkeypatch, n):
    data, folder = run
    killed = run_child(resume_args(data, folder, 2), "kill_at_replace", folder, n)
    assert killed.returncode == KILLED, f"the kill point {WRITES[n - 1]} was not reached:\n{killed.stderr[-2000:]}"
    assert_good_state(folder)
    renamed_last = n > WRITES.index("last.pth.tar") + 1  # killed after last.pth.tar was replaced
    assert load_training_checkpoint(folder / "last.pth.tar")["epoch"] == (1 if renamed_last else 0)
    assert_resume_continues(data, folder, monkeypatch)


def test_kill_inside_the_summary_rewrite_at_resume_start_loses_no_row(run, monkeypatch):
    """A run killed after writing epoch 1's row but before its checkpoint: the resume trims that row, and a kill
    in the middle of that rewrite (file opened for writing, nothing written yet) must not empty summary.csv."""
    data, folder = run
    summary = folder / "summary.csv"
    with open(summary, newline="") as file:
        rows = list(csv.reader(file))
    with open(summary, "a", newline="") as file:
        csv.writer(file).writerow(["1"] + rows[1][1:])  # epoch 1's row, its checkpoint never written
    before = summary.read_text()
    killed = run_child(resume_args(data, folder, 2), "kill_in_csv_writer", folder)
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert summary.read_text() == before, "summary.csv must be untouched by a kill during its rewrite"
    assert_good_state(folder)
    assert_resume_continues(data, folder, monkeypatch)


def test_disk_full_while_writing_a_checkpoint(run, monkeypatch):
    data, folder = run
    last = digest(folder / "last.pth.tar")
    failed = run_child(resume_args(data, folder, 2), "file_size_limit", folder, 1_000_000)  # a checkpoint is ~60 MB
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"kat-train: error: file size limit reached writing {folder.resolve() / 'tmp.pth.tar'}"), \
        error
    assert "the files from before (last.pth.tar, summary.csv) are intact" in error
    assert digest(folder / "last.pth.tar") == last, "the previous last.pth.tar must stay as it was"
    assert not list(folder.glob("*.partial")), "a failed write must not leave its partial file (it fills the disk)"
    assert_good_state(folder)
    assert_resume_continues(data, folder, monkeypatch)


def test_disk_full_at_resume_start_leaves_args_yaml_as_it_was(run, monkeypatch):
    data, folder = run
    before = (folder / "args.yaml").read_text()
    failed = run_child(resume_args(data, folder, 2), "file_size_limit", folder, 100)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"file size limit reached writing {folder.resolve() / 'args.yaml'}" in failed.stderr, failed.stderr
    assert (folder / "args.yaml").read_text() == before
    assert not list(folder.glob("*.partial"))
    assert_resume_continues(data, folder, monkeypatch)


def test_no_space_left_names_the_file(run, monkeypatch, capsys):
    """ENOSPC itself (a real full disk needs a small file system, which a test can't count on): the write of the
    checkpoint file raises it, as the kernel would; the message says so and names the file."""
    import errno
    data, folder = run
    fixed_metrics(monkeypatch)
    real_write = saver_module._ErrnoKeepingFile.write

    def full(self, data):
        real_write(self, bytes(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(saver_module._ErrnoKeepingFile, "write", full)
    assert train_module.main(resume_args(data, folder, 2)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"no space left on device at {folder / 'tmp.pth.tar'}" in error, error
    assert not list(folder.glob("*.partial"))


def test_resume_from_a_bare_state_dict_is_refused_and_touches_nothing(run, capsys):
    data, folder = run
    weights = folder / "weights.pth"
    torch.save(load_training_checkpoint(folder / "last.pth.tar")["state_dict"], weights)
    before = {path.name: digest(path) for path in folder.iterdir()}
    assert train_module.main(run_args(data, None, "--epochs", "2", "--resume", str(weights))) == 2
    error = capsys.readouterr().err
    assert f"--resume {weights} is not a training checkpoint" in error and "--initial-checkpoint" in error, error
    assert {path.name: digest(path) for path in folder.iterdir()} == before


def test_output_folder_that_cannot_be_written(run, tmp_path, capsys):
    data, _ = run
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train_module.main(run_args(data, blocker / "out", "--epochs", "1")) == 2
    assert f"--output: cannot write there ({blocker} is not a folder)" in capsys.readouterr().err


def test_recovery_files_of_killed_runs_do_not_pile_up(run, monkeypatch):
    data, folder = run
    stale = [folder / f"recovery-0-{step}.pth.tar" for step in (1, 2, 3)]  # left by earlier kills
    for path in stale:
        shutil.copyfile(folder / "last.pth.tar", path)
    fixed_metrics(monkeypatch)
    assert train_module.main(resume_args(data, folder, 2) + ["--recovery-interval", "1"]) == 0
    recovery = sorted(path.name for path in folder.glob("recovery-*.pth.tar"))
    assert len(recovery) <= 2 and not set(recovery) & {path.name for path in stale}, recovery
