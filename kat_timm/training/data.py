"""ImageFolder datasets for ``kat-train`` and ``kat-validate``: checked before use, and tolerant of corrupt images.

timm's ImageFolder reader silently drops class folders without images (shifting every later label), uses
``DATA_DIR`` itself when a split folder is missing, and numbers each split's classes on its own; here each of
those is an error naming the path and the expected layout.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers import create_reader
from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

__all__ = ["DataError", "ImageFolderDataset", "ImageFolderSplit", "check_class_sets", "check_readable_classes",
           "check_split", "collate_readable", "find_split_folder", "folder_dataset_hint", "labelled_like",
           "load_class_names"]

_logger = logging.getLogger(__name__)

# Split names timm's create_dataset also accepts for a split (it tries the exact name first).
_SPLIT_SYNONYMS = {name: tuple(group) for group in (_TRAIN_SYNONYM, _EVAL_SYNONYM) for name in group}

# What PIL raises for a file it cannot read or decode (UnidentifiedImageError and truncation are OSErrors; some
# decoders raise SyntaxError or ValueError on malformed headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# After this many unreadable files in a row the data is not worth training on: stop with an error.
MAX_CONSECUTIVE_FAILURES = 32


class DataError(ValueError):
    """A dataset folder that cannot be used as it is; the message says what is wrong and the expected layout."""


@dataclass(frozen=True)
class ImageFolderSplit:
    """A checked split folder: where it is and its class names in label order (``class_to_idx``: name -> label)."""

    root: Path
    classes: Tuple[str, ...]

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return {name: index for index, name in enumerate(self.classes)}


def _layout(data_dir: Union[str, Path], split: str = "train") -> str:
    return f"{Path(data_dir) / split / 'CLASS'}/*.png (or .jpg/.jpeg), one folder per class"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in get_img_extensions(as_set=True)


def find_split_folder(data_dir: Union[str, Path], split: str) -> Path:
    """The folder of ``split`` under ``data_dir``, found as timm's create_dataset finds it (``val`` for
    ``validation`` and so on), else a :class:`DataError` naming what was looked for and what is there."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data folder not found: {data_dir} (expected {_layout(data_dir, split)})")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder (expected {_layout(data_dir, split)})")
    candidates = [split] + [name for name in _SPLIT_SYNONYMS.get(split, ()) if name != split]
    for name in candidates:
        if (data_dir / name).is_dir():
            return data_dir / name
    present = sorted(entry.name for entry in data_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    found = f"; it holds the folders: {', '.join(present)}" if present else "; it holds no folders"
    looked = ", ".join(str(data_dir / name) for name in candidates)
    raise DataError(f"no {split!r} split in {data_dir} (looked for {looked}){found}. "
                    f"Expected layout: {_layout(data_dir, split)}")


def load_class_names(class_map: Union[str, Path]) -> List[str]:
    """Class names in label order from a timm class-map text file (one folder name per line)."""
    path = Path(class_map)
    if not path.is_file():
        raise DataError(f"class map not found: {path} (expected a text file with one class folder name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"class map {path} lists no classes")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"class map {path} lists these classes more than once: {', '.join(repeated)}")
    return names


def check_split(data_dir: Union[str, Path], split: str, class_names: Optional[Sequence[str]] = None,
                allow_missing: bool = False) -> ImageFolderSplit:
    """One split of an ImageFolder, checked: its folder and classes, labelled by ``class_names`` (``--class-map``;
    ``allow_missing``: names without a folder are fine) or else by the folder names in timm's natural sort order."""
    root = find_split_folder(data_dir, split)
    class_dirs, loose_images = [], 0
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue  # .ipynb_checkpoints and the like
        if entry.is_dir():
            class_dirs.append(entry.name)
        elif _is_image(entry.name):
            loose_images += 1
    if loose_images:
        raise DataError(f"{root} holds {loose_images} image(s) directly; put each image in the folder of its class: "
                        f"{_layout(data_dir, root.name)}")
    if not class_dirs:
        raise DataError(f"{root} has no class folders. Expected layout: {_layout(data_dir, root.name)}")

    class_dirs.sort(key=natural_key)
    empty, nested = [], []
    for name in class_dirs:
        direct, deeper = _count_images(root / name)
        if deeper:
            nested.append(name)
        elif not direct:
            empty.append(name)
    if empty:
        raise DataError(f"{len(empty)} class folder(s) in {root} hold no images (.png, .jpg, .jpeg): "
                        f"{_name_list(empty)}. Add images or remove the folders.")
    if nested:
        raise DataError(f"class folder(s) in {root} keep images in sub-folders: {_name_list(nested)}. timm labels an "
                        f"image by its innermost folder, so put each class's images directly in {root}/CLASS/.")

    if class_names is None:
        return ImageFolderSplit(root, tuple(class_dirs))
    unlisted = [name for name in class_dirs if name not in set(class_names)]
    missing = [] if allow_missing else [name for name in class_names if name not in set(class_dirs)]
    if unlisted or missing:
        parts = [f"folders not in the class map: {_name_list(unlisted)}" if unlisted else "",
                 f"classes of the class map without a folder: {_name_list(missing)}" if missing else ""]
        raise DataError(f"the class map does not match {root}: {'; '.join(filter(None, parts))}")
    return ImageFolderSplit(root, tuple(class_names))


def check_class_sets(first: ImageFolderSplit, second: ImageFolderSplit) -> None:
    """A :class:`DataError` unless both splits have the same classes (so a label means the same class in both)."""
    only_first = sorted(set(first.classes) - set(second.classes), key=natural_key)
    only_second = sorted(set(second.classes) - set(first.classes), key=natural_key)
    if only_first or only_second:
        parts = [f"only in {first.root}: {_name_list(only_first)}" if only_first else "",
                 f"only in {second.root}: {_name_list(only_second)}" if only_second else ""]
        raise DataError("the splits have different class folders (" + "; ".join(filter(None, parts)) + "); every "
                        "split needs the same classes so that the labels agree")


def check_readable_classes(split: ImageFolderSplit) -> None:
    """A :class:`DataError` naming the class folders of ``split`` in which no image decodes (an unreadable training
    image is replaced by the next one, so such a class would train on others' images); one image per sound class."""
    unreadable = []
    for name in split.classes:
        folder = split.root / name
        if not folder.is_dir():
            continue  # a class-map entry without a folder (allowed when evaluating a subset)
        images = sorted((entry.name for entry in os.scandir(folder) if entry.is_file() and _is_image(entry.name)),
                        key=natural_key)
        if images and not any(_decodes(folder / image) for image in images):
            unreadable.append(f"{name} ({len(images)} file(s))")
    if unreadable:
        raise DataError(f"no image could be decoded in {len(unreadable)} class folder(s) of {split.root}: "
                        f"{_name_list(unreadable)}. Replace the files, or remove the folders.")


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()  # every pixel: a truncated file fails here, not at open
    except _DECODE_ERRORS:
        return False
    return True


def collate_readable(batch):
    """``default_collate`` of the samples that are not None (``ImageFolderDataset.skip_unreadable``), else None."""
    from torch.utils.data import default_collate

    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def _count_images(folder: Path) -> Tuple[int, int]:
    """(images directly in ``folder``, images in its sub-folders up to the first that holds any)."""
    counts = []
    for _, subdirs, files in os.walk(folder, followlinks=True):  # top-down: ``folder`` itself comes first
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        counts.append(sum(1 for name in files if _is_image(name)))
        if len(counts) > 1 and counts[-1]:
            break
    return counts[0], sum(counts[1:])


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageFolderDataset(ImageDataset):
    """timm's ImageDataset over a checked split (its class order fixes the labels) that skips undecodable images.

    Such a file is named in a warning once per file and process. In training the next sample takes its place
    (``MAX_CONSECUTIVE_FAILURES`` in a row raise :class:`DataError`); with ``skip_unreadable`` (evaluation) the
    sample is None, which :func:`collate_readable` leaves out, so nothing is scored twice.
    """

    def __init__(self, split: ImageFolderSplit, transform=None, skip_unreadable: bool = False):
        reader = create_reader("", root=str(split.root), class_map=split.class_to_idx)
        super().__init__(str(split.root), reader=reader, transform=transform)
        self.split = split
        self.skip_unreadable = skip_unreadable
        self._warned: Set[str] = set()

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.split.classes

    def __getitem__(self, index: int):
        failures = 0
        while True:
            try:
                file, target = self.reader[index]
                with file:
                    # convert() decodes every pixel, so a truncated file fails here rather than inside the transform.
                    image = Image.open(file).convert(self.input_img_mode or "RGB")
                break
            except _DECODE_ERRORS as error:
                self._warn_skipped(index, error)
                if self.skip_unreadable:
                    return None
                failures += 1
                if failures >= min(MAX_CONSECUTIVE_FAILURES, len(self)):
                    raise DataError(f"{failures} images in a row could not be decoded (the last: "
                                    f"{self.filename(index, absolute=True)}); check the files in "
                                    f"{self.split.root}") from error
                index = (index + 1) % len(self)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _warn_skipped(self, index: int, error: BaseException) -> None:
        path = self.filename(index, absolute=True)
        if path in self._warned:
            return
        self._warned.add(path)
        reason = str(error).split(" <_io.", 1)[0] or type(error).__name__
        instead = "it is left out" if self.skip_unreadable else "another sample takes its place"
        _logger.warning("skipping unreadable image %s (%s); %s", path, reason, instead)


def folder_dataset_hint(dataset: str) -> str:
    """For an ImageFolder error when ``--dataset NAME`` was given without a reader prefix (timm then reads an
    ImageFolder too): a note that says so and names the prefixes, else ""."""
    if not dataset:
        return ""
    return (f" (--dataset {dataset} has no reader prefix, so it is read as an ImageFolder, as in timm; "
            f"hfds/{dataset}, wds/{dataset} or torch/{dataset} pick another reader)")


def labelled_like(reference: ImageFolderSplit, split: ImageFolderSplit) -> ImageFolderSplit:
    """``split`` labelled in the class order of ``reference`` once :func:`check_class_sets` finds the same classes."""
    check_class_sets(reference, split)
    return ImageFolderSplit(split.root, reference.classes)
