"""What several subcommands share: the model arguments and building a model from them with clear errors."""
from __future__ import annotations

import argparse
import difflib
import importlib
from pathlib import Path
from typing import Any, Optional

import torch

from . import CLIError

__all__ = ["add_model_arguments", "create_model", "load_weights", "resolve_device"]


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


def _is_registered(name: str) -> bool:
    import timm

    base = name.split(".", 1)[0]
    return base in timm.list_models(base)


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

    importlib.import_module("kat_timm")  # registers the kat_* models in timm

    if not _is_registered(name):
        close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise CLIError(f"unknown model {name!r}{hint}; 'kat-timm info' lists the KAT models", code=2)
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
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as error:
        if not pretrained:
            raise
        raise CLIError(_pretrained_failure(name, error)) from error
    if state_dict is not None:
        load_weights(model, state_dict, name, str(checkpoint))
    return model


def _read_state_dict(path: Path, use_ema: Optional[bool]) -> dict:
    from kat_timm.hub import CheckpointError, load_checkpoint, unwrap_state_dict

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
        from kat_timm.hub import CheckpointError, infer_architecture

        try:
            hint = f"; the weights look like {infer_architecture(state_dict)}, pass --model accordingly"
        except CheckpointError as why:
            hint = f" ({why})"
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CLIError(f"{source} does not fit {model_name}: {detail}{hint}") from error


def _pretrained_failure(name: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    offline = any(word in text for word in ("offline", "LocalEntryNotFound", "connect", "Connection", "resolve"))
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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu", code=2)
    return device
