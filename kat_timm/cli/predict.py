"""``kat-timm predict IMAGE...``: top-k ImageNet labels with probabilities (README, "Command line"); also what
``kat-timm demo`` shares with it: reading images with errors that name the file, labelled top-k lists."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from . import CLIError, run_main
from .common import (add_weight_source_arguments, check_backend_setting, create_model_from_options, is_weights_name,
                     resolve_device)

__all__ = ["Prediction", "class_labeller", "main", "predict", "read_images"]

RANDOM_WEIGHTS_WARNING = "random weights (--random-weights): the predictions below are meaningless"

def read_images(paths: Sequence[Path], problems: Optional[List[str]] = None):
    """Every image as RGB; unreadable files are named in ``problems`` (and skipped) when given, else in a
    ``CLIError``."""
    from PIL import Image, UnidentifiedImageError

    images, found = [], []
    for path in map(Path, paths):
        if not path.exists():
            found.append(f"{path}: no such file")
        elif path.is_dir():
            found.append(f"{path}: is a directory, not an image")
        else:
            try:
                with Image.open(path) as image:
                    images.append(_to_rgb(image))
            except UnidentifiedImageError:
                found.append(f"{path}: not an image file PIL can read (JPEG, PNG, WebP, BMP, ...)")
            except Image.DecompressionBombError as error:
                pixels = ", limit ".join(f"{int(n):,}" for n in re.findall(r"\d+", str(error))[:2])
                found.append(f"{path}: too many pixels for PIL to open safely ({pixels}: a possible decompression "
                             "bomb); downscale it")
            except (OSError, ValueError) as error:
                found.append(f"{path}: cannot read the image ({error})")
    if problems is not None:
        problems.extend(found)
    elif found:
        raise CLIError("; ".join(found))
    return images


def _to_rgb(image):
    """``image.convert("RGB")``, but high-bit-depth greyscale scaled to 8 bits first: PIL clips 16-bit ("I;16",
    and "I" as some versions open 16-bit PNGs) and float ("F") greyscale to 0..255, which turns it almost white."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image.convert("RGB")
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0  # floats in [0, 1], else taken as 0..255
    else:  # 16-bit integers; an "I" image whose values fit in 8 bits is left as it is
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1.0
    grey = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def class_labeller(model: torch.nn.Module, class_map: Optional[Path] = None) -> Callable[[int], str]:
    """index -> label: from ``class_map`` (line i naming class i), else the model's ``pretrained_cfg["label_names"]``,
    else ImageNet's descriptions for an ImageNet classifier size, else the class index."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if class_map is not None:
        names = _read_class_map(class_map)
        if len(names) != num_classes:
            raise CLIError(f"{class_map}: {len(names)} class names for a classifier of {num_classes} classes")
        return lambda index: names[index]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label_names = cfg.get("label_names")
    if label_names and len(label_names) <= num_classes:  # a classifier may have outputs no class was trained on
        descriptions = cfg.get("label_descriptions") or {}
        return lambda index: (descriptions.get(label_names[index], label_names[index]) if index < len(label_names)
                              else f"class {index}")
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset).index_to_description if subset else lambda index: f"class {index}"


def _read_class_map(path: Path) -> List[str]:
    from timm.data.readers.class_map import load_class_map

    if not Path(path).is_file():
        raise CLIError(f"{path}: no such class map file")
    try:
        name_to_index = load_class_map(str(path))
    except (AssertionError, ValueError, OSError, UnicodeDecodeError) as error:
        raise CLIError(f"{path}: cannot read the class map ({error or 'use a .txt file, one class name per line'})")
    names = sorted(name_to_index, key=name_to_index.__getitem__)
    if sorted(name_to_index.values()) != list(range(len(names))):
        raise CLIError(f"{path}: class indices must be 0..N-1 (duplicate names?)")
    return names


@dataclasses.dataclass
class Prediction:
    """One of an image's top-k classes."""

    index: int
    label: str
    probability: float


@torch.inference_mode()
def predict(model: torch.nn.Module, images: Sequence, labeller: Callable[[int], str], top_k: int = 5,
            batch_size: int = 16, device: Optional[torch.device] = None) -> List[List[Prediction]]:
    """Top-k softmax probabilities of each PIL image, preprocessed as the model's pretrained config says, on
    ``device`` (default: the model's)."""
    from kat_timm.transforms import create_transform

    model.eval()
    device = device or next(model.parameters()).device
    transform = create_transform(model)
    k = min(top_k, int(model.num_classes))
    results: List[List[Prediction]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]]).to(device)
        probabilities = model(batch).float().softmax(dim=-1)
        values, indices = probabilities.topk(k, dim=-1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            results.append([Prediction(i, labeller(i), p) for p, i in zip(row_values, row_indices)])
    return results


def format_predictions(names: Sequence[str], predictions: Sequence[Sequence[Prediction]], indent: str = "") -> str:
    """Human-readable top-k lists, one block per image."""
    lines = []
    for name, top in zip(names, predictions):
        lines.append(f"{indent}{name}")
        for rank, p in enumerate(top, 1):
            lines.append(f"{indent}  {rank}. {100 * p.probability:6.2f}%  {p.label}")
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Top-k ImageNet labels for images, with the released KAT "
                                                            "weights (default), a checkpoint, or random weights.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    add_weight_source_arguments(parser, default_model="kat_base", random_help="skip loading weights (for trying the "
                                "command offline; predictions are meaningless)")
    parser.add_argument("--class-map", metavar="FILE", type=Path,
                        help="class names, one per line (line i = class i), for a classifier that is not ImageNet's")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list, one object per image: image, weights, predictions")
    return parser


def weights_description(args: argparse.Namespace) -> str:
    if args.random_weights:
        return "random"
    if args.checkpoint is None and is_weights_name(args.model):
        return "its own"
    if args.checkpoint is not None:
        return f"checkpoint {args.checkpoint}" + {True: " (EMA)", False: " (raw, not EMA)"}.get(args.use_ema, "")
    return "released"


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm predict") -> int:
    """Entry point of ``kat-timm predict``."""
    parser = build_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        if args.top_k < 1:
            raise CLIError("--top-k must be >= 1", code=2)
        if args.batch_size < 1:
            raise CLIError("--batch-size must be >= 1", code=2)
        device = resolve_device(args.device)
        check_backend_setting(device)
        problems: List[str] = []
        images = read_images(args.images, problems)
        if not images:
            raise CLIError("; ".join(problems))
        model = create_model_from_options(args)
        labeller = class_labeller(model, args.class_map)
        model.to(device)
        predictions = predict(model, images, labeller, top_k=args.top_k, batch_size=args.batch_size, device=device)
        names = [str(path) for path in args.images if not any(p.startswith(f"{path}: ") for p in problems)]
        weights = weights_description(args)
        if args.random_weights:
            print(f"{prog}: warning: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr)
        if args.json:
            print(json.dumps([{"image": name, "model": args.model, "weights": weights,
                               "predictions": [dataclasses.asdict(p) for p in top]}
                              for name, top in zip(names, predictions)], indent=2))
        else:
            print(f"{args.model} ({weights} weights) on {device}")
            if args.random_weights:
                print(f"WARNING: {RANDOM_WEIGHTS_WARNING}")
            print(format_predictions(names, predictions))
        for problem in problems:  # the readable images were classified; the others are named, and the exit code is 1
            print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1 if problems else 0

    return run_main(run, prog)


if __name__ == "__main__":
    sys.exit(main())
