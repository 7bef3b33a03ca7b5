"""What several subcommands share: the model arguments, building a model from them with clear errors, reaching the
Hugging Face Hub without hanging when it is unreachable, and the options a training checkpoint was saved with."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from . import CLIError

__all__ = [
    "HUB_PROBE_TIMEOUT_S",
    "ReleasedWeightsUnavailable",
    "add_model_arguments",
    "add_weight_source_arguments",
    "check_backend_setting",
    "check_image_size",
    "check_model_name",
    "check_preprocessing",
    "check_writable_folder",
    "checkpoint_training_args",
    "create_model",
    "create_model_with_weights",
    "create_sized_model",
    "hub_access",
    "hub_reachable",
    "load_weights",
    "resolve_device",
]


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "kat_tiny") -> None:
    """--model, --pretrained, --checkpoint, --use-ema, --num-classes (what ``create_model`` takes)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help=f"a timm model name, with an optional .tag (default: {default_model})")
    group.add_argument("--pretrained", action="store_true",
                       help="load the released weights (from the Hugging Face Hub or its local cache)")
    group.add_argument("--checkpoint", metavar="FILE", type=Path,
                       help="load weights from this file (.pth/.pth.tar/.bin/.safetensors; a training checkpoint "
                            "or a bare state dict)")
    group.add_argument("--use-ema", action="store_true",
                       help="with --checkpoint: take its EMA weights (an error when it has none)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="classifier size (default: the checkpoint's, else the model's)")


def add_dataset_reader_arguments(group) -> None:
    """timm's reader options that kat-train and kat-validate share, with timm's names and meaning: the reader
    (--dataset), its download switch and the image mode and keys of a sample."""
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
    """--model, --checkpoint, --use-ema, --random-weights, --offline: the options of the commands that use the
    released weights unless told otherwise (predict, plot); ``random_help`` says what --random-weights gives there."""
    parser.add_argument("--model", default=default_model,
                        help=f"a timm model name with an optional .tag, e.g. kat_base.vitft (default: {default_model})")
    parser.add_argument("--checkpoint", metavar="FILE", type=Path,
                        help="weights from this file instead of the released ones (.pth/.pth.tar/.bin/.safetensors; "
                             "a kat-train checkpoint also brings its image size and class names)")
    parser.add_argument("--use-ema", action="store_true", help="with --checkpoint: take its EMA weights")
    parser.add_argument("--random-weights", action="store_true", help=random_help)
    parser.add_argument("--offline", action="store_true",
                        help="don't contact the Hugging Face Hub; use released weights only from the local cache")


def check_model_name(name: str) -> None:
    """Raise ``CLIError`` (code 2) unless ``name`` is a registered model with, if it has a ``.tag``, a known
    pretrained tag. Unknown names get the closest registered ones; unknown tags the model's pretrained names."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    importlib.import_module("kat_timm")  # registers the kat_* models in timm
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


# Largest --img-size any command accepts: a 4096 x 4096 image is 200 MB in float32 and a ViT-style model sees 65,536
# patches of 16 px; far larger values only end in an allocation failure deep inside torch.
MAX_IMAGE_SIZE = 4096

# Interpolation names timm's transforms take (timm.data.transforms.str_to_interp_mode); "random" only for training.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_image_size(img_size: Optional[int] = None, input_size: Optional[Sequence[int]] = None) -> None:
    """Raise ``CLIError`` (code 2) for an ``--img-size`` or ``--input-size`` that no model can take.

    The size must be 1 to ``MAX_IMAGE_SIZE`` pixels; ``--input-size`` must have 3 channels, because every command
    loads images as RGB. Whether a model's patches fit is checked once it is built (``check_model_input_size``).
    """
    if img_size is not None and not 1 <= img_size <= MAX_IMAGE_SIZE:
        raise CLIError(f"--img-size {img_size}: the image size must be 1 to {MAX_IMAGE_SIZE} pixels", code=2)
    if input_size is not None:
        channels, *sides = input_size
        if channels != 3:
            raise CLIError(f"--input-size {' '.join(map(str, input_size))}: images are loaded as RGB, so the first "
                           f"value (channels) must be 3", code=2)
        if not all(1 <= side <= MAX_IMAGE_SIZE for side in sides):
            raise CLIError(f"--input-size {' '.join(map(str, input_size))}: height and width must be 1 to "
                           f"{MAX_IMAGE_SIZE} pixels", code=2)


def check_model_input_size(model: torch.nn.Module, size: Sequence[int], option: str) -> None:
    """Raise ``CLIError`` (code 2) when a patch-based model's patches are larger than the image (no patch at all)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    sides = tuple(size) if len(size) > 1 else (int(size[0]), int(size[0]))
    if any(side < edge for side, edge in zip(sides, patch)):
        raise CLIError(f"{option} {' x '.join(map(str, sides))} is smaller than the model's {patch[0]}-pixel "
                       f"patches; use at least {max(patch)}", code=2)


def check_preprocessing(options: dict, training: bool = False) -> None:
    """Raise ``CLIError`` (code 2) for preprocessing options that timm would reject with a traceback, or worse, use.

    Args:
        options: ``img_size``, ``input_size``, ``crop_pct``, ``mean``, ``std``, ``interpolation`` (and, when
            ``training``, ``train_interpolation``); None or "" means the model's default.
        training: also check kat-train's training-only options.
    """
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
    names = [("interpolation", INTERPOLATIONS)]
    if training:
        names.append(("train_interpolation", INTERPOLATIONS + ("random",)))
    for name, allowed in names:
        value = options.get(name)
        if value and value not in allowed:
            raise CLIError(f"--{name.replace('_', '-')} {value}: unknown interpolation; use one of "
                           f"{', '.join(allowed)}", code=2)


def check_writable_folder(folder, option: str) -> None:
    """Raise ``CLIError`` (code 2) unless files can be written in ``folder`` (created later if missing): the first
    existing folder on its path must be a writable folder. ``option`` names what asked for it in the message."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option}: cannot write there ({existing} is "
                       f"{'not a folder' if not existing.is_dir() else 'not writable'})", code=2)


def check_backend_setting() -> None:
    """Raise ``CLIError`` (code 2) when ``KAT_RATIONAL_BACKEND`` names no backend, before any work is done."""
    from kat_timm.ops import requested_backend

    try:
        requested_backend()
    except ValueError as error:
        raise CLIError(f"{error}; unset it or set one of those", code=2) from None


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[Path] = None, use_ema: bool = False,
                 num_classes: Optional[int] = None, prefer_ema: bool = True, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` with the KAT models registered, turning the usual failures into ``CLIError``.

    Unknown names, released weights that cannot be fetched (offline, no cache), unreadable checkpoints and
    checkpoints made for another architecture each get one message saying what was wrong and what to do.
    ``num_classes`` defaults to the checkpoint's classifier size when a checkpoint is given. Without ``use_ema``, a
    training checkpoint's EMA weights are taken when it has them (as ``timm.models.load_checkpoint`` does), unless
    ``prefer_ema`` is False (timm's validate.py: the model weights unless ``--use-ema``).
    """
    import timm

    check_model_name(name)  # also imports kat_timm, which registers the kat_* models in timm
    check_backend_setting()
    if pretrained and checkpoint is not None:
        raise CLIError("give --pretrained or --checkpoint, not both", code=2)
    if use_ema and checkpoint is None:
        raise CLIError("--use-ema needs --checkpoint", code=2)

    state_dict = None
    if checkpoint is not None:
        state_dict = _read_state_dict(checkpoint, True if use_ema else (None if prefer_ema else False))
        if num_classes is None and "head.weight" in state_dict:
            num_classes = int(state_dict["head.weight"].shape[0])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with hub_access() if pretrained else contextlib.nullcontext() as unreachable:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            if "unexpected keyword argument" not in str(error):
                raise
            taken = ", ".join(sorted(key for key in kwargs if f"'{key}'" in str(error))) or str(error)
            raise CLIError(f"{name} does not take the keyword argument {taken} (from --model-kwargs or an "
                           f"option); remove it", code=2) from error
        except Exception as error:
            if not pretrained:
                raise
            own_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
            raise CLIError(_pretrained_failure(name, error, unreachable, own_file)) from error
    if state_dict is not None:
        load_weights(model, state_dict, name, str(checkpoint))
    return model


def _read_state_dict(path: Path, use_ema: Optional[bool]) -> dict:
    from kat_timm.checkpoint import CheckpointError, load_checkpoint, unwrap_state_dict

    try:
        state_dict, _ = unwrap_state_dict(load_checkpoint(path), use_ema=use_ema)
    except FileNotFoundError as error:
        raise CLIError(str(error)) from error
    except CheckpointError as error:
        raise CLIError(f"{path}: {error}" if str(path) not in str(error) else str(error)) from error
    return state_dict


def load_weights(model: torch.nn.Module, state_dict: dict, model_name: str, source: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict); a mismatch names the architecture the weights are for.

    Weights holding NaN or infinity are refused: every output of such a model is NaN, which would otherwise be
    printed as predictions (or exported) without a word.
    """
    broken = [key for key, value in state_dict.items()
              if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise CLIError(f"{source} holds non-finite values (NaN or infinity) in {', '.join(broken[:5])}{more}: the "
                       "run that wrote it probably diverged; use an earlier checkpoint")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        from kat_timm.checkpoint import CheckpointError, infer_architecture

        try:
            hint = f"; the weights look like {infer_architecture(state_dict)}, pass --model accordingly"
        except CheckpointError as why:
            hint = f" ({why})"
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CLIError(f"{source} does not fit {model_name}: {detail}{hint}") from error


def _pretrained_failure(name: str, error: Exception, unreachable: Optional[str] = None,
                        own_file: Optional[str] = None) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, RuntimeError) and len(lines) > 1 and "loading state_dict" in lines[0]:
        # torch's first line only says "Error(s) in loading state_dict for KAT:"; the keys are on the next ones
        text = "; ".join(line.rstrip(".") for line in lines[1:4])
    else:
        text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if own_file:  # --pretrained-path: the user's file, not the released weights
        return f"could not load {own_file} into {name}: {text.rstrip('.')}"
    offline = any(word in text for word in ("offline", "LocalEntryNotFound", "connect", "Connection", "resolve"))
    if unreachable and offline:
        text = f"{unreachable}, and they are not in the local Hugging Face cache"
    advice = (" Run 'kat-timm download " + name + "' on a machine with internet access (sharing the Hugging Face "
              "cache, or copy it), or pass --checkpoint FILE.") if offline else ""
    return f"could not load the released weights of {name}: {text.rstrip('.')}.{advice}"


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


# ---------------------------------------------------------------------------------------------------------------------
# The model with the weights a command asked for
# ---------------------------------------------------------------------------------------------------------------------

def create_sized_model(name: str, img_size: Optional[Sequence[int]] = None, **kwargs: Any) -> torch.nn.Module:
    """``common.create_model``, also passing ``img_size`` to models that take it.

    A ViT or KAT builds its position embedding for one input size, so changing only the data pipeline's size
    (timm's ``--img-size``) would fail at the first batch. Models whose constructor has no ``img_size``
    (ResNets and other size-agnostic models) are built without it.
    """
    if img_size is None or "img_size" in kwargs:
        return create_model(name, **kwargs)
    size = tuple(img_size) if len(img_size) > 1 else int(img_size[0])
    try:
        model = create_model(name, img_size=size, **kwargs)
    except (TypeError, CLIError) as error:
        cause = error if isinstance(error, TypeError) else error.__cause__
        if not (isinstance(cause, TypeError) and "img_size" in str(cause)):
            raise
        return create_model(name, **kwargs)
    check_model_input_size(model, img_size, "the image size")
    return model


class ReleasedWeightsUnavailable(CLIError):
    """The released weights could not be loaded; ``reason`` says why in a few words (for ``kat-timm demo``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def create_model_with_weights(
    name: str,
    checkpoint: Optional[Path] = None,
    use_ema: bool = False,
    random_weights: bool = False,
    offline: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """The model with the weights a command asked for: ``checkpoint``, random, or else the released ones.

    Skips the (slow, for KAT-B several seconds) random initialisation of a KAT whose weights are loaded next.

    Raises:
        ReleasedWeightsUnavailable: the released weights could not be fetched or loaded.
        CLIError: unknown model, unreadable or mismatched checkpoint.
    """
    from timm.models import is_model_in_modules, split_model_name_tag

    if random_weights and checkpoint is not None:
        raise CLIError("give --checkpoint or --random-weights, not both", code=2)
    if use_ema and checkpoint is None:
        raise CLIError("--use-ema needs --checkpoint", code=2)
    check_model_name(name)
    if not random_weights and is_model_in_modules(split_model_name_tag(name)[0], ["kat"]):
        kwargs.setdefault("weight_init", "skip")  # every tensor is overwritten by the strict load that follows
    if checkpoint is not None:
        return _create_from_checkpoint(name, checkpoint, use_ema, **kwargs)
    if random_weights:
        return create_model(name, **kwargs)
    with hub_access(offline) as unreachable:
        try:
            return create_model(name, pretrained=True, **kwargs)
        except CLIError as error:
            cause = error.__cause__
            if cause is None:  # rejected before any loading (unknown model name): not about the weights
                raise
            from huggingface_hub import constants
            from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

            if not unreachable or not isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
                first_line = (str(cause).strip().splitlines() or [""])[0]
                raise ReleasedWeightsUnavailable(str(error), f"{type(cause).__name__}: {first_line}") from cause
            reason = f"{unreachable}, and they are not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
            raise ReleasedWeightsUnavailable(
                f"could not load the released weights of {name}: {reason}. Run 'kat-timm download {name}' where "
                "the Hub is reachable (then share or copy the cache), pass --checkpoint FILE, or --random-weights "
                "to try the command without weights.", reason) from cause


def _create_from_checkpoint(name: str, checkpoint: Path, use_ema: bool, **kwargs) -> torch.nn.Module:
    """The model with a checkpoint's weights, built at the image size a kat-train checkpoint was trained at (a ViT
    or KAT's position embedding fits one size only) and labelled with its class names (``pretrained_cfg``'s
    ``label_names``, which :func:`class_labeller` reads)."""
    trained = checkpoint_training_args(checkpoint)
    input_size = trained.get("input_size")
    size = input_size[1:] if input_size else ([trained["img_size"]] if trained.get("img_size") else None)
    model = create_sized_model(name, size, checkpoint=checkpoint, use_ema=use_ema, **kwargs)
    class_names = trained.get("class_names")
    if class_names and len(class_names) <= int(getattr(model, "num_classes", 0) or 0):
        model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}, label_names=tuple(class_names))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face Hub access and training checkpoints
# ---------------------------------------------------------------------------------------------------------------------

# How long to wait for any answer from the Hub before treating it as unreachable. Without the probe, an unreachable
# huggingface.co costs ~45 s: huggingface_hub retries each file (model.safetensors, then pytorch_model.bin) five
# times with exponential backoff before it falls back to the local cache.
HUB_PROBE_TIMEOUT_S = 3.0

# The reasons yielded by the hub_access contexts now open (innermost last), so that nested ones do not probe again.
_active_hub_access: List[Optional[str]] = []


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> Tuple[bool, str]:
    """Whether the Hugging Face Hub answers an HTTP request within ``timeout`` seconds, and why not if it doesn't.

    Uses huggingface_hub's own HTTP session (so ``HF_ENDPOINT``, proxies and certificates apply) from a daemon
    thread, because name resolution is not bound by the HTTP timeout. Any HTTP answer, even an error status, counts
    as reachable. In offline mode (``HF_HUB_OFFLINE=1``) nothing is sent.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False, "HF_HUB_OFFLINE is set"
    outcome: List[Optional[Exception]] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            outcome.append(None)
        except Exception as error:  # reported to the caller, whatever it is
            outcome.append(error)

    thread = threading.Thread(target=probe, name="kat-timm-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    host = constants.ENDPOINT.split("://", 1)[-1]
    if not outcome:
        return False, f"{host} did not answer within {timeout:g} s"
    if outcome[0] is not None:
        detail = str(outcome[0]).strip().splitlines()
        return False, f"{host} is unreachable: {detail[0] if detail else type(outcome[0]).__name__}"
    return True, f"{host} is reachable"


@contextlib.contextmanager
def hub_access(offline: bool = False, timeout: float = HUB_PROBE_TIMEOUT_S) -> Iterator[Optional[str]]:
    """Context for loading released weights that never waits long on an unreachable Hub.

    Probes the Hub (:func:`hub_reachable`) unless ``offline``; when it is unreachable or ``offline`` is set,
    huggingface_hub runs in offline mode inside the context, so weights already in the local cache still load and
    missing ones fail at once instead of after minutes of retries.

    Yields:
        None when the Hub will be contacted, else the reason it won't be (to explain a failed load).
    """
    from huggingface_hub import constants

    if _active_hub_access:  # inside another hub_access: it already probed (and set offline mode if needed)
        yield _active_hub_access[-1]
        return
    if constants.is_offline_mode():
        yield "offline mode (HF_HUB_OFFLINE=1)"
        return
    if offline:
        reason: Optional[str] = "offline mode (--offline)"
    else:
        reachable, why = hub_reachable(timeout)
        reason = None if reachable else why
    # huggingface_hub reads this module attribute at every request (constants.is_offline_mode()).
    previous = constants.HF_HUB_OFFLINE
    if reason is not None:
        constants.HF_HUB_OFFLINE = True
    _active_hub_access.append(reason)
    try:
        yield reason
    finally:
        _active_hub_access.pop()
        constants.HF_HUB_OFFLINE = previous


def checkpoint_training_args(path: Path) -> dict:
    """The ``args`` a kat-train (or timm train.py) checkpoint was saved with, as a dict; {} for a bare state dict
    or a file this cannot read (loading the weights reports that properly)."""
    try:
        from timm.utils.checkpoint_saver import load_checkpoint_metadata

        checkpoint = load_checkpoint_metadata(str(path))
    except Exception:
        return {}
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
