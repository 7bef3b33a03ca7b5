"""Checkpoints and run files that are never half-written: timm's CheckpointSaver with atomic writes
(:func:`kat_timm.files.edit_atomically`, also re-exported here). A write goes to ``NAME.partial``, is flushed to disk
and renamed over ``NAME`` (``os.replace``, atomic), and the folder is flushed so the rename survives a power cut.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Optional

from timm.utils import CheckpointSaver

from kat_timm.files import edit_atomically, fsync_dir, output_target, remove_file

__all__ = ["AtomicCheckpointSaver", "checkpoint_epoch", "edit_atomically", "remove_partials"]


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
