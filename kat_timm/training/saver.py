"""Checkpoints and run files that are never half-written: timm's CheckpointSaver with atomic writes
(:func:`kat_timm.files.edit_atomically`, also re-exported here). A write goes to ``NAME.partial``, is flushed to disk
and renamed over ``NAME`` (``os.replace``, atomic), and the folder is flushed so the rename survives a power cut.

One run per folder: :func:`claim_run_folder` creates or takes a run folder and locks it for the run's life, refusing
a folder another process runs in or that holds another run's files (unless the run resumes it, or overwrites it).
"""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import stat
from typing import List, Optional, Tuple

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

from timm.utils import CheckpointSaver

from kat_timm.files import edit_atomically, fsync_dir, output_target, remove_file

__all__ = ["AtomicCheckpointSaver", "RunFolderError", "RunFolderLock", "check_run_folder", "checkpoint_epoch",
           "claim_run_folder", "edit_atomically", "remove_partials", "run_files"]


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, changed so that no file ever appears under a ``*.pth.tar`` name half-written.

    timm's saver writes ``tmp.pth.tar`` in place, deletes ``last.pth.tar`` before renaming over it and copies into
    the final name where hard links fail; here every write and link goes to a ``.partial`` name that is renamed into
    place. A failed write raises ``OSError`` with the errno and file name (torch.save says only "iostream error").
    """

    _relink_only = False  # see restore_history: save_checkpoint's bookkeeping without writing last.pth.tar again

    def _save(self, save_path, epoch, metric=None):
        if not self._relink_only:
            edit_atomically(save_path, lambda partial: self._write(partial, epoch, metric), start_from_current=False)

    def _write(self, path, epoch, metric):
        with open(path, "wb") as raw:
            file = _ErrnoKeepingFile(raw)
            try:
                super()._save(file, epoch, metric)  # timm's _save hands the file to torch.save
            except Exception as error:
                if file.error is None:
                    raise
                raise file.error from error

    def _replace(self, src, dst):
        if self._relink_only:
            return
        target = output_target(dst)  # a link's target, never the link; a device or FIFO refused
        os.replace(src, target)
        fsync_dir(os.path.dirname(target))

    def _duplicate(self, src, dst):
        edit_atomically(dst, lambda partial: _link_or_copy(src, partial), start_from_current=False)

    def save_recovery(self, epoch, batch_idx=0):
        """timm's save_recovery, also removing the recovery files of earlier, killed processes (timm keeps them)."""
        super().save_recovery(epoch, batch_idx)
        keep = {os.path.abspath(path) for path in (self.curr_recovery_file, self.prev_recovery_file) if path}
        pattern = os.path.join(self.recovery_dir, self.recovery_prefix + "-*" + self.extension)
        for path in glob.glob(pattern):
            if os.path.abspath(path) not in keep:
                remove_file(path)

    def restore_history(self, checkpoint_path: str, checkpoint: dict) -> None:
        """timm's ``load_state_dict_from_checkpoint`` from the already read ``checkpoint`` (the file at
        ``checkpoint_path``), then repair what a kill between two writes of ``save_checkpoint`` left behind: an epoch
        that exists only as ``last`` is linked as ``checkpoint-N`` if it earns a place, and ``model_best`` is linked
        again from the best epoch's file if it holds another."""
        if checkpoint.get("saver") is not None:
            self.load_state_dict(checkpoint["saver"])
        last = os.path.join(self.checkpoint_dir, "last" + self.extension)
        if os.path.exists(last) and os.path.samefile(checkpoint_path, last):
            epoch, metric = (checkpoint.get("saver") or {}).get("pending", (None, None))
            if epoch is not None and epoch == checkpoint.get("epoch") and \
                    not os.path.exists(self._checkpoint_path(epoch)):
                self._relink_only = True
                try:
                    self.save_checkpoint(epoch, metric)  # timm's retention and best-file logic on the existing last
                finally:
                    self._relink_only = False
        if self.best_epoch is None:
            return
        numbered = self._checkpoint_path(self.best_epoch)
        best = os.path.join(self.checkpoint_dir, "model_best" + self.extension)
        if os.path.exists(numbered) and checkpoint_epoch(best) != self.best_epoch:
            self._duplicate(numbered, best)


class _ErrnoKeepingFile:
    """What torch.save writes through: retries a short write (so the next reports the error) and remembers the
    ``OSError`` that torch turns into a bare RuntimeError."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += self.file.write(view[done:])
        except OSError as error:
            self.error = error
            raise
        return done

    def flush(self) -> None:
        self.file.flush()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network and Windows file systems)
        shutil.copyfile(src, dst)


def checkpoint_epoch(path: str) -> Optional[int]:
    """The epoch a training checkpoint holds (its tensors memory-mapped, not read); None if there is none."""
    from timm.utils.checkpoint_saver import load_checkpoint_metadata

    try:
        checkpoint = load_checkpoint_metadata(path)
    except Exception:  # missing or unreadable: whatever it is, it is not the best epoch's checkpoint
        return None
    return checkpoint.get("epoch") if isinstance(checkpoint, dict) else None


def remove_partials(folder: str) -> None:
    """Remove the ``*.partial`` files a killed run left in ``folder``: none of them was ever complete."""
    for stale in glob.glob(os.path.join(folder, "*.partial")):
        remove_file(stale)


# --------------------------------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------------------------------

LOCK_FILE = "run.lock"
# What a kat-train run writes into its folder (AtomicCheckpointSaver's names with timm's default prefixes), besides
# the lock file: a folder holding any of these holds a run.
_RUN_FILE_PATTERNS = (r"args\.yaml", r"summary\.csv", r"(last|model_best|tmp)\.pth\.tar", r"checkpoint-\d+\.pth\.tar",
                      r"recovery-\d+-\d+\.pth\.tar")
_RUN_FILE = re.compile("(?:" + "|".join(_RUN_FILE_PATTERNS) + r")(?:\.partial)?")


class RunFolderError(Exception):
    """A run folder that kat-train must not write into; the message is one line saying what to do."""


def run_files(folder: str) -> List[str]:
    """The names of the files of a kat-train run in ``folder`` (checkpoints, summary.csv, args.yaml and their
    ``.partial`` leftovers), sorted; empty where there is no run (or no folder)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name for name in names if _RUN_FILE.fullmatch(name))


class RunFolderLock:
    """An exclusive lock on a run folder (``flock`` of ``FOLDER/run.lock``, which records the holder's pid), held
    until :meth:`release` or the end of the process, however it ends: the kernel drops the lock of a dead process,
    so a lock file left by a killed run never blocks. Where there is no ``fcntl`` (Windows) nothing is locked.

    Raises:
        RunFolderError: another process holds the lock (its pid named), or ``run.lock`` is not a regular file.
    """

    def __init__(self, folder: str):
        self.folder, self.descriptor = folder, None
        if fcntl is None:
            return
        path = os.path.join(folder, LOCK_FILE)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
        except OSError as error:  # ELOOP: a symbolic link (O_NOFOLLOW); ENXIO and friends: a FIFO or device
            raise RunFolderError(f"{path}: cannot use it as the run's lock file ({error.strerror}); "
                                 f"remove it") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise RunFolderError(f"{path} is not a regular file; remove it so that kat-train can lock the run folder")
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            os.close(descriptor)
            raise RunFolderError(f"{folder} is in use by another kat-train run (process {holder or 'unknown'}); wait "
                                 f"for it to end, or give another --experiment") from None
        except OSError:  # a file system without locks (ENOLCK, EINVAL): run unlocked, as where there is no fcntl
            os.close(descriptor)
            return
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self.descriptor = descriptor

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would let two processes lock two different files)."""
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_folder(folder: str, resume: bool = False, overwrite: bool = False, locked: bool = False) -> None:
    """Raise :class:`RunFolderError` where kat-train must not start a run in ``folder``: it is a file, another process
    runs there (its lock held; not checked when ``locked``: this process holds it, or does not take it), or it holds
    the files of another run and neither ``resume`` nor ``overwrite``."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"{folder} is a file, not a folder; give another --experiment (or --output)")
    if not locked and fcntl is not None and os.path.isfile(os.path.join(folder, LOCK_FILE)):
        RunFolderLock(folder).release()  # a probe: refused now rather than after the model is built
    found = run_files(folder)
    if found and not (resume or overwrite):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        last = os.path.join(folder, "last.pth.tar")
        resume_hint = f"continue it with --resume {last}, " if os.path.isfile(last) else ""
        raise RunFolderError(f"{folder} holds another run ({shown}); {resume_hint}start afresh there with "
                             f"--overwrite (removes that run's checkpoints, summary.csv and args.yaml), or give "
                             f"another --experiment")


def claim_run_folder(parent: str, name: str, unique: bool = False, resume: bool = False,
                     overwrite: bool = False) -> Tuple[str, RunFolderLock]:
    """Create (or take) the run folder ``parent/name`` and lock it for this run.

    Args:
        parent: the folder of runs (created if missing).
        name: the run folder's name.
        unique: a generated name: the folder is created exclusively, as ``name``, else ``name-1``, ``name-2``, ...
            so that two runs started in the same second never share one.
        resume: the run continues one (from its checkpoint): a folder holding run files is taken as it is.
        overwrite: a folder holding another run is taken after that run's files (:func:`run_files`) are removed.

    Returns:
        (the folder, its lock): release the lock when the run ends.

    Raises:
        RunFolderError: see :func:`check_run_folder` and :class:`RunFolderLock`.
    """
    os.makedirs(parent, exist_ok=True)
    if unique:
        for count in itertools.count():
            folder = os.path.join(parent, name if count == 0 else f"{name}-{count}")
            try:
                os.mkdir(folder)
                break
            except FileExistsError:
                continue
    else:
        folder = os.path.join(parent, name)
        if os.path.exists(folder) and not os.path.isdir(folder):
            check_run_folder(folder)  # raises: a file
        os.makedirs(folder, exist_ok=True)
    lock = RunFolderLock(folder)
    try:
        check_run_folder(folder, resume=resume, overwrite=overwrite, locked=True)
        if overwrite and not resume:
            for stale in run_files(folder):
                remove_file(os.path.join(folder, stale))
            fsync_dir(folder)
    except BaseException:
        lock.release()
        raise
    return folder, lock
