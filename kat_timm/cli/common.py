"""What several subcommands share: the model and weight options, their checks, and building a model from them with
one-line errors."""
from __future__ import annotations

import argparse
import difflib
import importlib
import math
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError

from . import CLIError

__all__ = ["ReleasedWeightsUnavailable", "add_model_arguments", "add_weight_source_arguments", "check_backend_setting",
           "check_image_size", "check_model_name", "check_preprocessing", "check_whole_patches",
           "check_writable_folder", "create_model", "create_model_from_options", "create_sized_model",
           "local_dir_architecture", "released_weights_file", "resolve_device"]


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "kat_tiny") -> None:
    """--model, --pretrained, --checkpoint, --use-ema, --num-classes (what ``create_model`` takes)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help=f"a timm model name, with an optional .tag, or hf-hub:OWNER/NAME or "
                            f"local-dir:FOLDER (default: {default_model})")
    group.add_argument("--pretrained", action="store_true",
                       help="load the released weights (from the Hugging Face Hub or its local cache)")
    group.add_argument("--checkpoint", metavar="FILE", type=Path,
                       help="load weights from this file (.pth/.pth.tar/.bin/.safetensors; a training checkpoint "
                            "or a bare state dict)")
    add_ema_arguments(group)
    group.add_argument("--num-classes", type=int, default=None,
                       help="classifier size (default: the checkpoint's, else the model's)")


# The one EMA rule of every command that reads a checkpoint (README, "Fine-tuning"): the EMA weights when the file
# has them (kat-train and timm rank a --model-ema run's checkpoints by them, and timm's loaders take them), unless
# --no-ema; --use-ema insists on them.
EMA_RULE = ("a checkpoint with EMA weights (a --model-ema run) is loaded with them, the weights that ranked its "
            "checkpoints")


def add_ema_arguments(parser, *extra_names: str, given: str = "with --checkpoint: ") -> None:
    """--use-ema / --no-ema (``args.use_ema``: True, False, or None for the rule ``EMA_RULE`` states); ``given``
    starts their help (the option that names the checkpoint)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--use-ema", *extra_names, dest="use_ema", action="store_const", const=True, default=None,
                       help=f"{given}the checkpoint's EMA weights, an error where it has none (default: {EMA_RULE})")
    group.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                       help=f"{given}the checkpoint's raw model weights, not the EMA's")


# Model names with a source, as timm.create_model takes them: a Hub repo, a folder timm's save_for_hf wrote.
HF_HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"


def is_weights_name(name: Optional[str]) -> bool:
    """Whether ``name`` is timm's ``local-dir:FOLDER`` or ``hf-hub:OWNER/NAME``: a model that brings its weights."""
    return bool(name) and name.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX))


def add_dataset_reader_arguments(group) -> None:
    """timm's dataset reader options (its names and meaning) that kat-train and kat-validate share."""
    group.add_argument("--dataset", metavar="NAME", default="",
                       help="timm's dataset reader: '' (default: an ImageFolder), hfds/NAME or hfds/FOLDER "
                            "(Hugging Face datasets), wds/NAME (WebDataset shards in --data-dir), torch/NAME "
                            "(torchvision), hfids/NAME, tfds/NAME")
    group.add_argument("--dataset-download", action="store_true",
                       help="download the dataset if absent (torch/, hfids/, tfds/)")
    group.add_argument("--input-img-mode", default=None, metavar="MODE",
                       help="PIL image mode the images are converted to (default: RGB)")
    group.add_argument("--input-key", default=None, metavar="KEY",
                       help="image column (hfds/, default image) or sample member (wds/, default jpg;png;webp)")
    group.add_argument("--target-key", default=None, metavar="KEY",
                       help="label column (hfds/, default label) or .json field (wds/, default: the .cls member)")


def add_weight_source_arguments(parser: argparse.ArgumentParser, default_model: str, random_help: str) -> None:
    """The weight options of predict and plot (released weights unless told otherwise)."""
    parser.add_argument("--model", default=None,
                        help=f"a timm model name with an optional .tag, e.g. kat_base.vitft, or hf-hub:OWNER/NAME "
                             f"or local-dir:FOLDER (default: the checkpoint's architecture, else {default_model})")
    parser.set_defaults(default_model=default_model)
    parser.add_argument("--checkpoint", metavar="FILE", type=Path,
                        help="weights from this file instead of the released ones (.pth/.pth.tar/.bin/.safetensors; "
                             "it also brings its architecture, image size, class count and kat-train's class names)")
    add_ema_arguments(parser)
    parser.add_argument("--random-weights", action="store_true", help=random_help)
    parser.add_argument("--offline", action="store_true",
                        help="don't contact the Hugging Face Hub; use released weights only from the local cache")



def check_model_name(name: str) -> None:
    """Raise ``CLIError`` (code 2) naming the closest models (or the pretrained tags) for an unknown name (or tag),
    and for a ``local-dir:`` folder or ``hf-hub:`` repo name that timm could not build from."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    importlib.import_module("kat_timm")  # registers the kat_* models in timm
    if name.startswith(LOCAL_DIR_PREFIX):
        local_dir_architecture(name)
        return
    if name.startswith(HF_HUB_PREFIX):
        from kat_timm.tools.download import resolve_hub_repo

        try:
            resolve_hub_repo(name)
        except ValueError as error:
            raise CLIError(str(error), code=2) from None
        return
    architecture, tag = split_model_name_tag(name)
    if architecture not in timm.list_models(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise CLIError(f"unknown model {name!r}{hint}; 'kat-timm info' lists the KAT models", code=2)
    try:
        get_pretrained_cfg(name)
    except RuntimeError:  # a known architecture with an unknown .tag
        from kat_timm.tools.download import pretrained_names

        raise CLIError(f"{architecture} has no pretrained tag {tag!r}; its pretrained names: "
                       f"{', '.join(pretrained_names(architecture)) or 'none'}", code=2) from None


def local_dir_architecture(name: str) -> str:
    """The registered architecture that the ``config.json`` of a ``local-dir:FOLDER`` model names; ``CLIError``
    (code 2) saying what is wrong with the folder."""
    import timm

    folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
    if not folder.exists():
        raise CLIError(f"{name}: no such folder", code=2)
    if not folder.is_dir():
        raise CLIError(f"{name}: not a folder (local-dir: takes the folder that holds config.json and the weights)",
                       code=2)
    config = folder / "config.json"
    if not config.is_file():
        raise CLIError(f"{name}: the folder holds no config.json (a folder that timm's save_for_hf or "
                       "scripts/convert_checkpoint.py wrote)", code=2)
    from kat_timm.factory import local_dir_config

    try:
        architecture = local_dir_config(name).get("architecture")
    except (ValueError, OSError) as error:
        raise CLIError(f"{config}: not a readable timm config.json ({error})", code=2) from None
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise CLIError(f"{config}: its architecture {architecture!r} is not a model timm knows", code=2)
    return architecture


# Largest --img-size any command accepts: far larger values only end in an allocation failure deep inside torch.
MAX_IMAGE_SIZE = 4096

# Interpolation names timm's transforms take (timm.data.transforms.str_to_interp_mode); "random" only for training.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_image_size(img_size: Optional[int] = None, input_size: Optional[Sequence[int]] = None) -> None:
    """Raise ``CLIError`` (code 2) for an ``--img-size`` or ``--input-size`` that no model can take."""
    if img_size is not None and not 1 <= img_size <= MAX_IMAGE_SIZE:
        raise CLIError(f"--img-size {img_size}: the image size must be 1 to {MAX_IMAGE_SIZE} pixels", code=2)
    given = f"--input-size {' '.join(map(str, input_size or ()))}"
    if input_size is not None and input_size[0] != 3:
        raise CLIError(f"{given}: images are loaded as RGB, so the first value (channels) must be 3", code=2)
    if input_size is not None and not all(1 <= side <= MAX_IMAGE_SIZE for side in input_size[1:]):
        raise CLIError(f"{given}: height and width must be 1 to {MAX_IMAGE_SIZE} pixels", code=2)


def check_whole_patches(sides: Sequence[int], patch: Sequence[int], option: str) -> None:
    """Raise ``CLIError`` (code 2) unless every side of an image size given by ``option`` is a multiple of the
    model's patch: the one image-size rule of the commands and the benchmark scripts. A ViT cuts the image into
    whole patches, so a border that fills no whole patch would be dropped without a word.

    Args:
        sides: height and width in pixels.
        patch: the patch's height and width in pixels.
        option: the option the size came from, as the message names it (e.g. ``"--img-size"``).
    """
    if all(side % edge == 0 for side, edge in zip(sides, patch)):
        return
    given = " x ".join(map(str, sides)) if len(set(sides)) > 1 else str(sides[0])
    edge = "x".join(map(str, patch)) if len(set(patch)) > 1 else str(patch[0])
    nearest = sorted({max(edge, side // edge * edge) for side, edge in zip(sides, patch)}
                     | {-(-side // edge) * edge for side, edge in zip(sides, patch)})
    raise CLIError(f"{option} {given} is not a multiple of the model's {edge}-pixel patches: the image is cut into "
                   f"whole patches, and the border that fills none would be dropped; use a multiple, e.g. "
                   f"{' or '.join(map(str, nearest))}", code=2)


def check_model_input_size(model: torch.nn.Module, size: Sequence[int], option: str,
                           whole_patches: bool = False) -> None:
    """Raise ``CLIError`` (code 2) when a patch-based model's patches are larger than the image (no patch at all);
    ``whole_patches``: also when a side is not a multiple of the patch (:func:`check_whole_patches`), unless the
    model pads the image to whole patches itself (``dynamic_img_pad``)."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        return
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    sides = tuple(size) if len(size) > 1 else (int(size[0]), int(size[0]))
    if any(side < edge for side, edge in zip(sides, patch)):
        raise CLIError(f"{option} {' x '.join(map(str, sides))} is smaller than the model's {patch[0]}-pixel "
                       f"patches; use at least {max(patch)}", code=2)
    if whole_patches and not getattr(embed, "dynamic_img_pad", False):
        check_whole_patches(sides, patch, option)


def check_preprocessing(options: dict, training: bool = False) -> None:
    """Raise ``CLIError`` (code 2) for preprocessing ``options`` (``vars(args)``) that timm would reject with a
    traceback, or worse, use; ``training``: also kat-train's training-only ones."""
    check_image_size(options.get("img_size"), options.get("input_size"))
    crop_pct = options.get("crop_pct")
    if crop_pct is not None and not 0.01 <= crop_pct <= 1.0:  # also catches NaN
        raise CLIError(f"--crop-pct {crop_pct:g}: the centre crop is a fraction of the resized image, 0.01 to 1 "
                       f"(1: no crop; the KAT models use 0.875)", code=2)
    for name in ("mean", "std"):
        values = options.get(name) or ()
        if not all(math.isfinite(value) for value in values):
            raise CLIError(f"--{name} {' '.join(map(str, values))}: values must be finite numbers", code=2)
    if any(value <= 0 for value in options.get("std") or ()):
        raise CLIError(f"--std {' '.join(map(str, options['std']))}: every value must be positive (images are "
                       f"divided by it)", code=2)
    names = {"interpolation": INTERPOLATIONS, "train_interpolation": INTERPOLATIONS + ("random",) if training else ()}
    for name, allowed in names.items():
        value = options.get(name)
        if value and allowed and value not in allowed:
            raise CLIError(f"--{name.replace('_', '-')} {value}: unknown interpolation; use one of "
                           f"{', '.join(allowed)}", code=2)


def check_writable_folder(folder, option: str) -> None:
    """Raise ``CLIError`` (code 2) naming ``option`` unless files can be written in ``folder`` (created if missing)."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option}: cannot write there ({existing} is "
                       f"{'not a folder' if not existing.is_dir() else 'not writable'})", code=2)


def check_backend_setting(device: Optional[torch.device] = None) -> None:
    """Raise ``CLIError`` (code 2) when ``KAT_RATIONAL_BACKEND`` names no backend; given the ``device`` the command
    runs its model on, also when the backend it forces can't run there (``triton`` without a GPU, ``native`` where
    the kernel can't be built). Called before any model is built or file written: the op's own dispatch is asked,
    so the answer is the one the model's first forward would meet."""
    from kat_timm.ops import BACKEND_ENV, native_cpu_status, requested_backend, select_backend, triton_status

    try:
        requested = requested_backend()
    except ValueError as error:
        raise CLIError(f"{error}; unset it or set one of those", code=2) from None
    if device is None or requested in ("auto", "torch"):
        return
    try:
        select_backend(torch.empty(0, device=device))
        return
    except RuntimeError as error:
        # The kernel's build error runs over many lines; 'kat-timm info' shows all of them.
        cause = str(error).strip().splitlines()[0].rstrip(":")
    instead = f"unset {BACKEND_ENV} (auto picks what runs here) or set it to torch"
    if requested == "triton":
        usable, reason = triton_status()
        if not usable:
            cause = reason
        elif device.type != "cuda":
            where = "" if torch.cuda.is_available() else " (there is no CUDA GPU here)"
            cause = (f"Triton runs the op on a CUDA GPU (on a CPU only in its interpreter, TRITON_INTERPRET=1), and "
                     f"this command runs on the {device.type}{where}")
    elif requested == "native":
        available, reason = native_cpu_status()
        if not available:
            cause = f"the native CPU kernel is not available: {reason.strip().splitlines()[0].rstrip(':')}"
        elif device.type != "cpu":
            cause = f"the native kernel runs on the CPU only, and this command runs on {device} (add --device cpu)"
    raise CLIError(f"{BACKEND_ENV}={requested}: {cause}; {instead}", code=2)


class ReleasedWeightsUnavailable(CLIError):
    """The released weights could not be loaded; ``reason`` says why in a few words (for ``kat-timm demo``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def create_model(name: Optional[str] = None, pretrained: Optional[bool] = None, checkpoint: Optional[Path] = None,
                 use_ema: Optional[bool] = None, num_classes: Optional[int] = None, offline: bool = False,
                 alternatives: Sequence[str] = (), **kwargs: Any) -> torch.nn.Module:
    """:func:`kat_timm.factory.create_model` with the usual failures turned into one-line ``CLIError``.

    ``offline``: released weights from the cache only; ``use_ema``: True: the checkpoint's EMA weights or an error,
    False: its raw model weights, None: the EMA's where it has them (``EMA_RULE``); ``pretrained``: None (the
    default): a ``local-dir:``/``hf-hub:`` name loads its own weights, any other name none; True / False: load the
    weights or not (``--random-weights``);
    ``alternatives``: the calling command's options that the missing-weights error offers (an option another
    command has would mislead).
    """
    from timm.models import is_model_in_modules, split_model_name_tag

    from kat_timm.checkpoint import CheckpointError, load_error_detail
    from kat_timm.factory import create_model as factory_create_model

    if name is not None:
        check_model_name(name)  # also imports kat_timm, which registers the kat_* models in timm
    check_backend_setting()
    if pretrained and checkpoint is not None:
        raise CLIError("give --pretrained or --checkpoint, not both", code=2)
    if use_ema is not None and checkpoint is None:
        raise CLIError(f"{'--use-ema' if use_ema else '--no-ema'} needs --checkpoint", code=2)
    if is_weights_name(name) and checkpoint is not None:
        raise CLIError(f"{name} brings its own weights; give it or --checkpoint, not both", code=2)
    if pretrained is None:  # local-dir:/hf-hub: name the weights to load (timm loads them only with pretrained)
        pretrained = is_weights_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    own_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if is_weights_name(name) and own_file:
        raise CLIError(f"{name} brings its own weights; to load {own_file}, give the architecture's name instead",
                       code=2)
    timm_name, weights_file = name, None
    if name is not None and name.startswith(LOCAL_DIR_PREFIX):  # the shell leaves local-dir:~/x unexpanded
        timm_name = LOCAL_DIR_PREFIX + os.path.expanduser(name[len(LOCAL_DIR_PREFIX):])
    elif name is not None and name.startswith(HF_HUB_PREFIX):
        # The repo's files through the same bounded Hub access as the released weights, then built from the cache's
        # snapshot folder (timm would fetch config.json itself, retrying an unreachable Hub for seconds).
        config = released_weights_file(name, offline, alternatives, filename="config.json")
        if pretrained:
            weights_file = released_weights_file(name, offline, alternatives)
        timm_name = f"{LOCAL_DIR_PREFIX}{Path(config).parent}"
        kwargs["pretrained_cfg_overlay"] = dict(hf_hub_id=name[len(HF_HUB_PREFIX):])
    elif pretrained and not own_file:  # a released name (the two branches above took the sourced ones)
        weights_file = released_weights_file(name, offline, alternatives)
        kwargs["pretrained_cfg_overlay"] = dict(file=weights_file)
        if num_classes is None and is_model_in_modules(split_model_name_tag(name)[0], ["kat"]):
            kwargs.setdefault("weight_init", "skip")  # every tensor is overwritten by the strict load that follows
    try:
        return factory_create_model(timm_name, checkpoint=checkpoint, pretrained=pretrained,
                                    use_ema=use_ema, **kwargs)
    except CheckpointError as error:
        raise CLIError(str(error)) from None
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        taken = ", ".join(sorted(key for key in kwargs if f"'{key}'" in str(error))) or str(error)
        raise CLIError(f"{name} does not take the keyword argument {taken} (from --model-kwargs or an "
                       f"option); remove it", code=2) from None
    except (RuntimeError, OSError, ValueError, SafetensorError) as error:
        if not pretrained and isinstance(error, ValueError):  # the model's constructor refused an argument
            raise CLIError(f"{name}: {error} (check --model-kwargs)", code=2) from None
        if not pretrained:
            raise
        text = load_error_detail(error)
        if "loading state_dict" not in str(error):
            text = f"{type(error).__name__}: {text}"
        if own_file:  # --pretrained-path: the user's file, not the released weights
            raise CLIError(f"could not load {own_file} into {name}: {text}") from None
        if weights_file is None:  # local-dir: the user's folder
            raise CLIError(f"could not load the weights of {name}: {text}") from None
        damage = _cached_file_damage(weights_file, error, text)
        if damage is not None:
            text = f"{damage}; fetch it again with 'kat-timm download {name} --force'"
        raise ReleasedWeightsUnavailable(f"could not load the released weights of {name}: {text}", text) from None


def _cached_file_damage(path: str, error: Exception, detail: str) -> Optional[str]:
    """Why the cached weights file ``path`` could not be read (its checksum does not match, or ``error`` is a read
    failure of an unchecked file), or None where the file is fine and ``error`` is about its content."""
    from kat_timm.tools.download import cached_file_intact

    if Path(path).is_file() and not cached_file_intact(path):
        return (f"the cached weights file {path} is damaged (its content does not match its checksum: a download or "
                "a copy was cut short)")
    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)) or "zip archive" in str(error):
        return f"the cached weights file {path} cannot be read ({detail})"
    return None


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: cuda when available, else cpu; asking for cuda where there is none is an error."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name}: {error}; use cpu or cuda", code=2) from error
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name}: not a device kat_timm runs on; use cpu or cuda", code=2)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu", code=2)
    return device


def create_sized_model(name: str, size: Optional[Sequence[int]] = None, size_option: Optional[str] = None,
                       **kwargs: Any) -> torch.nn.Module:
    """:func:`create_model`, also passing a training run's image size (``[N]`` or ``[H, W]``) as ``img_size`` to
    models that take it (an ``img_size`` in ``kwargs`` wins). ``size_option``: the option the user gave the size
    with; it must then be whole patches (:func:`check_whole_patches`; a checkpoint's recorded size is taken as is)."""
    if size is None or "img_size" in kwargs:
        return create_model(name, **kwargs)
    img_size = tuple(size) if len(size) > 1 else int(size[0])
    try:
        model = create_model(name, img_size=img_size, **kwargs)
    except CLIError as error:
        if "keyword argument img_size" not in str(error):
            raise
        return create_model(name, **kwargs)
    check_model_input_size(model, size, size_option or "the image size", whole_patches=size_option is not None)
    return model


def create_model_from_options(args: argparse.Namespace) -> torch.nn.Module:
    """The model :func:`add_weight_source_arguments`' options ask for; ``args.model`` is set to the name built."""
    if args.random_weights and args.checkpoint is not None:
        raise CLIError("give --checkpoint or --random-weights, not both", code=2)
    name = args.model or (None if args.checkpoint is not None else args.default_model)
    model = create_model(name, pretrained=not args.random_weights and args.checkpoint is None,
                         checkpoint=args.checkpoint, use_ema=args.use_ema, offline=args.offline,
                         alternatives=("--checkpoint FILE", "--random-weights"))
    args.model = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    return model


def released_weights_file(name: str, offline: bool = False, alternatives: Sequence[str] = (),
                          filename: Optional[str] = None) -> str:
    """The local path of ``name``'s released weights, or of its repo's file ``filename``
    (:func:`kat_timm.tools.download.weights_path`)."""
    from kat_timm.tools.download import DownloadError, resolve_hub_repo, weights_path

    try:
        repo_id, revision, weights = resolve_hub_repo(name)
    except ValueError:
        raise CLIError(f"{name} has no released weights on the Hugging Face Hub; drop the pretrained option") from None
    try:
        return weights_path(repo_id, filename or weights, revision, offline)
    except DownloadError as error:
        instead = f", or pass {' or '.join(alternatives)}" if alternatives else ""
        raise ReleasedWeightsUnavailable(f"could not load the released weights of {name}: {error.reason}. Run "
                                         f"'kat-timm download {name}' where the Hub is reachable (then share or copy "
                                         f"the cache){instead}.", error.reason) from None
    except Exception as error:  # the Hub refused the download
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ReleasedWeightsUnavailable(f"could not load the released weights of {name}: "
                                         f"{type(error).__name__}: {first}", first) from None
