"""Datasets that are not an ImageFolder, for ``kat-train`` and ``kat-validate``: timm's readers, checked first.

What timm's ``create_dataset`` reports as a traceback, a bare ``KeyError`` or (WebDataset) a silently empty epoch
becomes a one-line :class:`~kat_timm.training.data.DataError` naming the option and what exists instead (README,
"Other datasets"). :func:`open_checked_split` opens any split, ImageFolder or not, for both commands.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import tarfile
from typing import List, Optional, Tuple

from .data import (DataError, ImageFolderDataset, check_readable_classes, check_split, folder_dataset_hint,
                   load_class_names)

__all__ = ["READER_PREFIXES", "check_shard_spread", "dataset_class_names", "dataset_prefix",
           "is_folder_dataset", "open_checked_split", "open_dataset"]

# The --dataset prefixes timm's create_dataset reads with a reader of its own (anything else is a folder or tar).
READER_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")
# Image keys timm's WebDataset reader tries by default, in order.
WDS_IMAGE_KEYS = "jpg;png;webp"


def dataset_prefix(name: Optional[str]) -> str:
    """The reader prefix of a ``--dataset`` value, lower case (``"hfds"`` for ``"HFDS/foo"``), ``""`` for none."""
    prefix, sep, _ = (name or "").partition("/")
    return prefix.lower() if sep and prefix.lower() in READER_PREFIXES else ""


def is_folder_dataset(name: Optional[str]) -> bool:
    """Whether ``--dataset name`` is read from an ImageFolder (timm's default reader; see kat_timm.training.data)."""
    return dataset_prefix(name) == ""


def open_dataset(args, split: str, is_training: bool, num_samples: Optional[int] = None,
                 split_option: str = "--train-split", samples_option: str = "--train-num-samples"):
    """timm's ``create_dataset`` for a non-folder ``--dataset`` of kat-train's or kat-validate's ``args`` (timm
    train.py's options; ``is_training`` and ``num_samples`` as there), after checks that make every mistake one
    :class:`DataError` line naming ``split_option`` / ``samples_option``."""
    from timm.data import create_dataset

    prefix = dataset_prefix(args.dataset)
    if prefix == "wds":
        shards = _check_wds(args, split, is_training, num_samples, split_option, samples_option)
        if not is_training and num_samples is None and not _wds_counted(args, split):
            # An evaluation split of unknown size would report 0 samples (and make the loader warn); its headers
            # give the count without decoding anything.
            lengths = _shard_lengths(shards)
            num_samples = None if lengths is None else sum(lengths)
    elif prefix == "hfds":
        _check_hfds(args, split, split_option)
    keys = {name: key for name, key in (("input_key", args.input_key), ("target_key", args.target_key)) if key}
    seed = getattr(args, "seed", 42)  # kat-validate has no --seed
    try:
        return create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map or None,
            download=args.dataset_download, batch_size=args.batch_size, num_samples=num_samples, seed=seed,
            input_img_mode=args.input_img_mode or "RGB", **keys)
    except Exception as error:  # each reader fails its own way: FileNotFoundError, ValueError, KeyError, assert
        raise DataError(_explain(args, split, split_option, error)) from None


def dataset_class_names(dataset) -> Optional[List[str]]:
    """The class names of a dataset from ``open_dataset`` in label order, or None when the reader knows none
    (WebDataset ``.cls`` labels, a label column without class names)."""
    reader = getattr(dataset, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
    if class_to_idx:
        ordered = sorted(class_to_idx.items(), key=lambda item: item[1])
        if [index for _, index in ordered] == list(range(len(ordered))):
            return [str(name) for name, _ in ordered]
    classes = getattr(dataset, "classes", None)  # torchvision datasets
    return [str(name) for name in classes] if classes else None


def _check_hfds(args, split: str, split_option: str) -> None:
    """The dataset and split open, and the image and label keys are columns of it. (timm's reader casts a missing
    image column without a word and fails on the first sample; a missing label column is a bare KeyError.)"""
    path = args.dataset.split("/", 1)[1]
    if not path:
        raise DataError("--dataset hfds/: give the dataset after the prefix: hfds/OWNER/NAME (a Hub dataset) or "
                        "hfds/FOLDER (a data folder, or one written by save_to_disk)")
    looks_local = path.startswith((".", "/", "~"))  # a Hub name is OWNER/NAME or NAME
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise DataError(f"--dataset {args.dataset}: no such folder: {path}")
    try:
        import datasets

        # Memory-mapped and cached: timm's reader opens the same files again at no real cost.
        columns = list(datasets.load_dataset(path, split=split, cache_dir=args.data_dir).column_names)
    except ImportError:
        raise DataError(f"--dataset {args.dataset} needs Hugging Face datasets: pip install datasets (or "
                        f"kat-timm[data])") from None
    except Exception as error:
        raise DataError(_explain(args, split, split_option, error)) from None
    for option, keys in (("--input-key", args.input_key or "image"), ("--target-key", args.target_key or "label")):
        for key in keys.split(","):
            if key.strip() not in columns:
                raise DataError(f"{option} {key.strip()}: {args.dataset} split {split} has no such column (columns: "
                                f"{', '.join(columns)})")


def _explain(args, split: str, split_option: str, error: BaseException) -> str:
    """One line for what timm's create_dataset raised."""
    prefix = dataset_prefix(args.dataset)
    text = " ".join(str(error).split()) or type(error).__name__
    if prefix == "hfds":
        if "Unknown split" in text or "split" in text.lower() and isinstance(error, ValueError):
            return f"{split_option} {split}: {args.dataset} has no such split ({text})"
        if isinstance(error, (FileNotFoundError, ConnectionError)) or "offline" in text.lower():
            return (f"--dataset {args.dataset}: not found ({text}); give a Hub dataset name (online, or cached with "
                    f"HF_DATASETS_OFFLINE=1), a data folder, or a folder written by save_to_disk")
    if prefix == "torch":
        if isinstance(error, AssertionError) and "Unknown torchvision dataset" in text:
            return f"--dataset {args.dataset}: {text}; e.g. torch/cifar10, torch/cifar100, torch/mnist, torch/imagenet"
        if "download" in text.lower() or isinstance(error, (FileNotFoundError, RuntimeError)):
            return (f"--dataset {args.dataset} in --data-dir {args.data_dir}: {text} (add --dataset-download to fetch "
                    f"it there)")
    return f"--dataset {args.dataset} {split_option} {split}: {type(error).__name__}: {text}"


def _wds_shards(args, split: str, split_option: str) -> List[str]:
    """The shard files of a wds split (a brace pattern, optionally ``|N`` samples, or a split of _info.json)."""
    from webdataset.shardlists import expand_urls

    pattern = split.split("|")[0]
    if "tar" in pattern or ".." in pattern:
        names = expand_urls(pattern)
    else:
        info = _wds_info(args.data_dir)
        splits = info.get("splits") or {}
        if split not in splits:
            where = f"{args.data_dir}/_info.json lists {', '.join(sorted(splits))}" if splits else \
                f"{args.data_dir} has no _info.json naming splits"
            raise DataError(f"{split_option} {split}: not a WebDataset split ({where}); give the shards as a brace "
                            f"pattern, e.g. {split_option} 'train-{{0000..0127}}.tar'")
        names = list(splits[split].get("filenames") or [])
    return [os.path.join(args.data_dir, name) for name in names]


def _wds_info(root: str) -> dict:
    for name in ("_info.json", "info.json"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as file:
                    return json.load(file)
            except (OSError, ValueError) as error:
                raise DataError(f"{path}: not readable JSON ({error})") from None
    return {}


def _check_wds(args, split: str, is_training: bool, num_samples: Optional[int], split_option: str,
               samples_option: str) -> List[str]:
    if importlib.util.find_spec("webdataset") is None:  # timm's reader needs it, and fails later less clearly
        raise DataError(f"--dataset {args.dataset} needs webdataset: pip install webdataset (or kat-timm[data])")
    if not args.data_dir:
        raise DataError(f"--dataset {args.dataset}: give the folder of the shards with --data-dir DIR")
    if not os.path.isdir(args.data_dir):
        raise DataError(f"--data-dir {args.data_dir}: no such folder (the WebDataset shards of --dataset "
                        f"{args.dataset})")
    shards = _wds_shards(args, split, split_option)
    if not shards:
        raise DataError(f"{split_option} {split}: names no shard files")
    missing = [path for path in shards if "://" not in path and not os.path.isfile(path)]
    if missing:
        present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(args.data_dir, "*.tar")))[:5]
        raise DataError(f"{split_option} {split}: {len(missing)} of {len(shards)} shard files are missing, e.g. "
                        f"{missing[0]} ({args.data_dir} holds {', '.join(present) or 'no .tar files'})")
    if is_training and not num_samples and not _wds_counted(args, split):
        raise DataError(f"{split_option} {split}: the number of samples is unknown (no _info.json with shard "
                        f"lengths); give {samples_option} N, or append it to the pattern: '{split}|N'")
    first = shards[0]
    if "://" not in first:
        _check_wds_sample(first, args)
    return shards


def _wds_counted(args, split: str) -> bool:
    """Whether timm's reader knows the sample count of ``split`` ('PATTERN|N', or a split of _info.json)."""
    if "|" in split:
        return True
    if "tar" in split or ".." in split:
        return False  # a pattern's count comes from _info.json only when its shards are listed there: not assumed
    return bool(_wds_info(args.data_dir))


def _sample_key(member: tarfile.TarInfo) -> Tuple[str, str]:
    """(sample key, extension) of a shard member, as WebDataset groups them: the path up to the name's first dot."""
    key, _, extension = os.path.basename(member.name).partition(".")
    return os.path.join(os.path.dirname(member.name), key), extension


def _shard_lengths(shards: List[str]) -> Optional[List[int]]:
    """Samples (distinct keys) in each local shard, read from the tar headers; None for remote shards."""
    if any("://" in path for path in shards):
        return None
    counts = []
    for path in shards:
        try:
            with tarfile.open(path) as tar:
                counts.append(len({_sample_key(member)[0] for member in tar if member.isfile()}))
        except (OSError, tarfile.TarError) as error:
            raise DataError(f"{path}: not a readable tar shard ({error})") from None
    return counts


def check_shard_spread(args, split: str, world_size: int, workers: int, num_samples: Optional[int] = None,
                       split_option: str = "--val-split", is_training: bool = False) -> None:
    """A :class:`DataError` for a ``wds/`` split that timm's reader would read only in part. It gives loader ``g`` of
    ``G = world_size x max(workers, 1)`` the shards ``g, g + G, ...`` capped at ``ceil(N / G)`` samples (``N``:
    ``num_samples``, else the tar headers' count): in training a loader without a shard reads nothing, so each epoch
    would see only part of the data; under torchrun an evaluation loader holding more is cut short without a word."""
    if dataset_prefix(args.dataset) != "wds" or not (is_training or world_size > 1):
        return
    shards = _wds_shards(args, split, split_option)
    readers = world_size * max(workers, 1)
    loaders = f"{readers} loaders ({world_size} process{'es' if world_size != 1 else ''} x {max(workers, 1)} workers)"
    if is_training:
        if len(shards) < readers:
            raise DataError(f"{split_option} {split}: {len(shards)} shards for {loaders}: a loader without a shard "
                            f"reads nothing and each epoch would see only part of the data; cut the data into at "
                            f"least {readers} shards or lower --workers")
        return
    lengths = _shard_lengths(shards)
    if lengths is None:
        return
    cap = -(-(num_samples or sum(lengths)) // readers)
    per_loader = [sum(lengths[g::readers]) for g in range(readers)]
    if max(per_loader) > cap:
        raise DataError(f"{split_option} {split}: {len(lengths)} shards over {loaders} would score only "
                        f"{sum(min(count, cap) for count in per_loader)} of {sum(lengths)} samples (timm caps each "
                        f"loader at {cap}); give at least {readers} shards of equal length, fewer --workers, or "
                        f"--val-split \"\" and kat-validate the checkpoints afterwards")


def _check_wds_sample(shard: str, args) -> None:
    """The first sample of ``shard`` has an image under the input key and a label where the target key says."""
    extensions: List[str] = []
    fields: List[str] = []  # of the .json sidecar
    first_key = None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _sample_key(member)
                if first_key is None:
                    first_key = key
                if key != first_key:
                    break
                extensions.append(extension)
                if args.target_key and extension == "json":
                    sidecar = json.load(tar.extractfile(member))
                    fields = list(sidecar) if isinstance(sidecar, dict) else []
    except (OSError, tarfile.TarError, ValueError) as error:
        raise DataError(f"{shard}: not a readable tar shard ({error})") from None
    if first_key is None:
        raise DataError(f"{shard}: the shard holds no samples")
    listed = ", ".join("." + extension for extension in extensions)
    input_keys = (args.input_key or WDS_IMAGE_KEYS).split(";")
    if not any(key in extensions for key in input_keys):
        raise DataError(f"--input-key {args.input_key or WDS_IMAGE_KEYS}: sample {first_key} of {shard} has no such "
                        f"member (it has {listed})")
    if args.target_key:  # the labels come from the .json sidecar rather than the .cls member
        if "json" not in extensions:
            raise DataError(f"--target-key {args.target_key}: sample {first_key} of {shard} has no .json sidecar "
                            f"(it has {listed})")
        for key in args.target_key.split(","):
            if key.strip() not in fields:
                raise DataError(f"--target-key {key.strip()}: not a field of the .json of sample {first_key} in "
                                f"{shard} (fields: {', '.join(fields) or 'none'})")
    elif "cls" not in extensions:
        raise DataError(f"sample {first_key} of {shard} has no .cls label (it has {listed}); give --target-key FIELD "
                        f"to read the label from its .json")


def open_checked_split(args, split: str, *, is_training: bool = False, use_class_map: bool = True,
                       allow_missing: bool = False, relabel=None, num_samples: Optional[int] = None,
                       split_option: str = "--split", samples_option: str = "--num-samples", world_size: int = 1):
    """One split of ``args.dataset`` under ``args.data_dir`` (kat-train's or kat-validate's options), checked:
    ``(dataset, class names in label order or None, its name in messages)``, else a :class:`DataError`. An
    ImageFolder is checked by :mod:`kat_timm.training.data` (``relabel(split)``: e.g. ``labelled_like`` the training
    split), any other ``--dataset`` by :func:`open_dataset` and :func:`check_shard_spread`."""
    if is_folder_dataset(args.dataset):
        try:
            class_names = load_class_names(args.class_map) if use_class_map and args.class_map else None
            folder = check_split(args.data_dir, split, class_names, allow_missing=allow_missing)
            folder = relabel(folder) if relabel is not None else folder
            check_readable_classes(folder)
        except DataError as error:
            raise DataError(str(error) + folder_dataset_hint(args.dataset)) from error
        return ImageFolderDataset(folder), list(folder.classes), str(folder.root)
    dataset = open_dataset(args, split, is_training, num_samples, split_option, samples_option)
    check_shard_spread(args, split, world_size, args.workers, num_samples, split_option, is_training)
    return dataset, dataset_class_names(dataset), f"{args.dataset} {split}"
