"""kat_timm.training.data: ImageFolder checks with clear errors, and corrupt images skipped with one warning per file.

``make_image_folder`` builds the synthetic data set the train/validate tests use too: one colour per class (red,
green, blue plus noise), trivially separable.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from kat_timm.training.data import (DataError, ImageFolderDataset, ImageFolderSplit, check_class_sets, check_readable_classes,
                           check_split, collate_readable, find_split_folder, load_class_names)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def make_image_folder(root: Path, classes: Sequence[str] = tuple(COLOURS), splits=(("train", 16), ("validation", 8)),
                      size: int = 32, seed: int = 0) -> Path:
    """Write ``root/SPLIT/CLASS/N.png``: each class one colour with Gaussian noise (sigma 30 of 255)."""
    rng = np.random.default_rng(seed)
    for split, count in splits:
        for index, name in enumerate(classes):
            colour = np.array(COLOURS.get(name, (80 * index % 256, 160, 40 * index % 256)), dtype=np.float64)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = 0.7 * colour + 40 + rng.normal(0.0, 30.0, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{number}.png")
    return root


def write_corrupt_image(path: Path) -> Path:
    """A file with an image name whose bytes are not an image."""
    path.write_bytes(b"this is not a PNG file" * 8)
    return path


def test_check_split_lists_classes_in_timm_order(tmp_path):
    make_image_folder(tmp_path, classes=("c10", "c2", "c1"), splits=(("train", 1),))
    split = check_split(tmp_path, "train")
    assert split.root == tmp_path / "train"
    assert split.classes == ("c1", "c2", "c10"), "timm sorts class folders naturally (c2 before c10)"
    assert split.class_to_idx == {"c1": 0, "c2": 1, "c10": 2}


def test_validation_split_found_under_timm_synonym(tmp_path):
    make_image_folder(tmp_path, splits=(("val", 1),))
    assert find_split_folder(tmp_path, "validation") == tmp_path / "val"


def test_missing_data_dir_names_the_path_and_the_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        check_split(missing, "train")
    assert str(missing) in str(error.value)
    assert "train/CLASS/*.png" in str(error.value)


def test_missing_split_says_what_was_looked_for_and_what_is_there(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    with pytest.raises(DataError) as error:
        check_split(tmp_path, "validation")
    message = str(error.value)
    assert "no 'validation' split" in message and str(tmp_path / "val") in message
    assert "holds the folders: train" in message


def test_split_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        check_split(tmp_path, "train")


def test_images_directly_in_the_split_folder(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "stray.png")
    with pytest.raises(DataError, match="image\\(s\\) directly"):
        check_split(tmp_path, "train")


def test_empty_class_folders_are_named(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    (tmp_path / "train" / "empty_b").mkdir()
    (tmp_path / "train" / "empty_a").mkdir()
    (tmp_path / "train" / "empty_a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as error:
        check_split(tmp_path, "train")
    assert "2 class folder(s)" in str(error.value)
    assert "empty_a, empty_b" in str(error.value)


def test_hidden_folders_are_not_classes(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    assert check_split(tmp_path, "train").classes == ("blue", "green", "red")


def test_images_in_sub_folders_of_a_class(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    nested = tmp_path / "train" / "red" / "more"
    nested.mkdir()
    Image.new("RGB", (4, 4)).save(nested / "x.png")
    with pytest.raises(DataError, match="keep images in sub-folders: red"):
        check_split(tmp_path, "train")


def test_class_sets_that_differ_are_named(tmp_path):
    make_image_folder(tmp_path, classes=("red", "green"), splits=(("train", 1),))
    make_image_folder(tmp_path, classes=("red", "blue"), splits=(("validation", 1),))
    with pytest.raises(DataError) as error:
        check_class_sets(check_split(tmp_path, "train"), check_split(tmp_path, "validation"))
    assert f"only in {tmp_path / 'train'}: green" in str(error.value)
    assert f"only in {tmp_path / 'validation'}: blue" in str(error.value)


def test_class_map_fixes_the_label_order_and_must_match(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 1),))
    class_map = tmp_path / "classes.txt"
    class_map.write_text("red\ngreen\nblue\n")
    assert check_split(tmp_path, "train", load_class_names(class_map)).classes == ("red", "green", "blue")
    with pytest.raises(DataError, match="folders not in the class map: red"):
        check_split(tmp_path, "train", ["green", "blue"])
    with pytest.raises(DataError, match="without a folder: cyan"):
        check_split(tmp_path, "train", ["red", "green", "blue", "cyan"])
    assert check_split(tmp_path, "train", ["red", "green", "blue", "cyan"], allow_missing=True).classes[-1] == "cyan"


def test_dataset_labels_follow_the_split_class_order(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 2),))
    split = ImageFolderSplit(tmp_path / "train", ("red", "green", "blue"))
    dataset = ImageFolderDataset(split)
    assert len(dataset) == 6
    for index in range(len(dataset)):
        image, label = dataset[index]
        folder = Path(dataset.filename(index, absolute=True)).parent.name
        assert label == split.classes.index(folder), f"sample {index} from {folder} got label {label}"
        assert image.mode == "RGB"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_skipped_with_one_warning_naming_it(tmp_path, caplog, damage):
    make_image_folder(tmp_path, splits=(("train", 3),))
    bad = tmp_path / "train" / "green" / "1.png"
    if damage == "garbage":
        write_corrupt_image(bad)
    else:
        bad.write_bytes(bad.read_bytes()[:200])  # header intact, pixel data cut off
    dataset = ImageFolderDataset(check_split(tmp_path, "train"))
    index = next(i for i in range(len(dataset)) if dataset.filename(i, absolute=True) == str(bad))
    with caplog.at_level(logging.WARNING, logger="kat_timm.training.data"):
        image, label = dataset[index]
        dataset[index]  # a second visit (a second epoch) warns no more
    substitute = dataset.filename((index + 1) % len(dataset), absolute=True)
    assert label == dataset.reader.samples[(index + 1) % len(dataset)][1], f"expected the sample of {substitute}"
    assert image.size == (32, 32)
    warnings = [record.getMessage() for record in caplog.records if record.name == "kat_timm.training.data"]
    assert len(warnings) == 1, warnings
    assert str(bad) in warnings[0] and "skipping unreadable image" in warnings[0]


def test_a_split_of_only_corrupt_images_is_an_error(tmp_path):
    make_image_folder(tmp_path, classes=("red",), splits=(("train", 2),))
    for path in (tmp_path / "train" / "red").iterdir():
        write_corrupt_image(path)
    dataset = ImageFolderDataset(check_split(tmp_path, "train"))
    with pytest.raises(DataError, match="could not be decoded"):
        dataset[0]


def test_a_class_without_one_readable_image_is_named(tmp_path):
    make_image_folder(tmp_path, splits=(("train", 3),))
    for path in (tmp_path / "train" / "green").iterdir():
        write_corrupt_image(path)
    write_corrupt_image(tmp_path / "train" / "red" / "0.png")  # one bad file among good ones is fine
    with pytest.raises(DataError) as error:
        check_readable_classes(check_split(tmp_path, "train"))
    assert str(error.value) == (f"no image could be decoded in 1 class folder(s) of {tmp_path / 'train'}: green "
                                f"(3 file(s)). Replace the files, or remove the folders.")


def test_evaluation_leaves_an_unreadable_image_out_instead_of_repeating_a_neighbour(tmp_path):
    from torch.utils.data import DataLoader

    make_image_folder(tmp_path, splits=(("validation", 3),))
    bad = write_corrupt_image(tmp_path / "validation" / "green" / "1.png")
    dataset = ImageFolderDataset(check_split(tmp_path, "validation"), transform=np.asarray, skip_unreadable=True)
    index = next(i for i in range(len(dataset)) if dataset.filename(i, absolute=True) == str(bad))
    assert dataset[index] is None
    batches = [batch for batch in DataLoader(dataset, batch_size=4, collate_fn=collate_readable)]
    labels = [label for images, label in (batch for batch in batches if batch is not None) for label in label.tolist()]
    assert len(labels) == len(dataset) - 1 == 8
    assert sorted(labels) == [0, 0, 0, 1, 1, 2, 2, 2], "green (label 1) has one image fewer, no one counts twice"
    assert collate_readable([None, None]) is None
