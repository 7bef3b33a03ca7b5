"""Writing output files safely, for every command and script: the one place that decides where a write lands.

A file is written to ``NAME.partial`` beside it, flushed to disk and renamed over ``NAME`` (``os.replace``, atomic),
and the folder is flushed so the rename survives a power cut: a reader never sees half a file, and a failed write
leaves the old one intact. A rename replaces whatever has the name, so the target is checked first
(:func:`output_target`): a symbolic link is followed and its target written (the link stays a link); a folder, a
device, a FIFO or a socket is refused (a rename would replace the node with a regular file, and a FIFO would block
a plain write until someone reads it); and a path that is one of the command's own input files is refused (an
export over the checkpoint it reads would destroy the checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
from typing import Callable, Mapping, Optional, Union

__all__ = ["OutputPathError", "edit_atomically", "output_target", "same_file"]

PathLike = Union[str, "os.PathLike[str]"]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


class OutputPathError(ValueError):
    """An output path that must not be written: not a regular file, or one of the command's inputs. The message is
    one line naming the path (as the option that gave it) and what to do."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same inode where both exist (hard and symbolic links
    included), else the same path once symbolic links are resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def output_target(path: PathLike, inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
                  label: Optional[str] = None) -> str:
    """The file a write to ``path`` must land in: ``path`` itself, or where its symbolic links lead.

    Args:
        path: the output path as given.
        inputs: the command's input files, ``{option that named it: path}`` (None values are skipped); an output
            that is one of them is refused.
        label: how messages name the output (e.g. ``"-o model.onnx"``); default: the path.

    Returns:
        The resolved path (symbolic links followed, also a dangling one's missing target).

    Raises:
        OutputPathError: ``path`` is (or leads to) a folder, device, FIFO or socket, or is one of ``inputs``.
    """
    label = label or str(path)
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
        folder = os.path.dirname(target)
        if not os.path.isdir(folder) and os.path.islink(path):  # the command made no folder there: the link did
            raise OutputPathError(f"{label}: a symbolic link to {target}, whose folder {folder} does not exist; "
                                  f"create it or give another path") from None
    except OSError as error:  # a loop of symbolic links, a path through a file, ...
        raise OutputPathError(f"{label}: cannot write there ({error.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        where = "" if os.path.abspath(path) == target else f" ({target})"
        raise OutputPathError(f"{label} is {kind}{where}, not a regular file; give the path of a file to write")
    for option, source in (inputs or {}).items():
        if source and same_file(target, source):
            raise OutputPathError(f"{label} is the {option} file {source} itself, which writing would destroy; "
                                  f"give another path")
    return target


def edit_atomically(path: PathLike, edit: Callable[[str], None], start_from_current: bool = True,
                    inputs: Optional[Mapping[str, Optional[PathLike]]] = None, label: Optional[str] = None) -> str:
    """Change the file ``path`` all at once: ``edit(partial)`` writes ``TARGET.partial`` (a copy of the file when
    ``start_from_current``), which is then renamed over the target.

    Args:
        path: the file to write; checked by :func:`output_target` (``inputs``, ``label``), which also gives the
            target: where a symbolic link at ``path`` leads.
        edit: writes the file whose path it is given (nothing written: nothing changes).
        start_from_current: start from a copy of the current file, if any.
        inputs: the command's input files, which the output must not be.
        label: how messages name the output.

    Returns:
        The path of the file written (symbolic links resolved).

    Raises:
        OutputPathError: see :func:`output_target`; nothing was written.
        OSError: the write failed, with the errno and ``path`` (whatever call failed); the target is unchanged.
    """
    target = output_target(path, inputs, label)
    partial = target + ".partial"
    try:
        if start_from_current and os.path.exists(target):
            shutil.copyfile(target, partial)
        else:
            remove_file(partial)
        edit(partial)
        if os.path.exists(partial):
            fsync_file(partial)
            os.replace(partial, target)
    except OSError as error:
        remove_file(partial)
        raise OSError(error.errno, error.strerror, str(path)) from error
    except BaseException:
        remove_file(partial)
        raise
    fsync_dir(os.path.dirname(target))
    return target


def remove_file(path: PathLike) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def fsync_file(path: PathLike) -> None:
    """Flush the file ``path`` to disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
