"""Small datasets in the formats of timm's other readers, written in tmp_path: a Hugging Face ``datasets`` folder
(``DatasetDict.save_to_disk``) and WebDataset tar shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

CLASSES = ("red", "green", "blue", "grey")
_COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One noisy image of class ``label``'s colour (the classes are learnable in a few steps)."""
    colour = np.array(_COLOURS[CLASSES[label]], dtype=np.float64)
    pixels = 0.7 * colour + 40 + rng.normal(0.0, 30.0, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_hf_dataset(root: Path, splits: Dict[str, int] = None, seed: int = 0) -> Path:
    """``root`` written by ``DatasetDict.save_to_disk``: columns image and label (a ClassLabel of CLASSES), each
    split ``count`` images per class."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    parts = {}
    for split, count in (splits or {"train": 8, "validation": 4}).items():
        labels = [label for label in range(len(CLASSES)) for _ in range(count)]
        images = [class_image(label, rng) for label in labels]
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds_shards(root: Path, prefix: str, labels_per_shard: Sequence[int], per_shard: int, seed: int = 0,
                    members: Sequence[str] = ("png", "cls", "json")) -> List[Path]:
    """``root/PREFIX-000N.tar``: shard N holds ``per_shard`` samples of class ``labels_per_shard[N]`` (one class per
    shard, so the labels a process sees tell which shards it read), each ``KEY.png``, ``KEY.cls`` and a
    ``KEY.json`` with the label under ``"class"``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, label in enumerate(labels_per_shard):
        path = root / f"{prefix}-{shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{prefix}_{shard:04d}_{index:04d}"
                if "png" in members:
                    _add(tar, f"{key}.png", _png(class_image(label, rng)))
                if "cls" in members:
                    _add(tar, f"{key}.cls", str(label).encode())
                if "json" in members:
                    _add(tar, f"{key}.json", json.dumps({"class": label, "shard": shard}).encode())
        paths.append(path)
    return paths
