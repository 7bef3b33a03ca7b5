"""One way to build a model: from a timm name, a checkpoint, or both. :func:`read_checkpoint` reads a file once and
keeps what it records or its tensors imply (architecture, image size, classes), so :func:`create_model` needs no
option to load a checkpoint trained at ``img_size=32`` or for 10 classes, and a contradicting name is one clear error.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
from timm.models import is_model, is_model_in_modules, split_model_name_tag

from .checkpoint import (EMA_KEYS, MODEL_KEYS, CheckpointError, check_finite, check_kat_state_dict, load_checkpoint,
                         load_error_detail, unwrap_state_dict)
from .models.kat import KAT, SIZES, checkpoint_filter_fn

__all__ = ["LoadedCheckpoint", "check_model_matches", "create_model", "infer_architecture", "read_checkpoint"]

PathLike = Union[str, Path]


@dataclass
class LoadedCheckpoint:
    """What :func:`read_checkpoint` got from one read of a checkpoint file."""

    path: Path
    state_dict: Dict[str, torch.Tensor]  # unwrapped (EMA or not, as asked), without DDP / torch.compile prefixes
    source: str  # the wrapper key the weights came from (state_dict_ema, state_dict, ...; "": a bare state dict)
    raw: Any  # everything the file holds (optimizer, epoch, args, ... of a training checkpoint)
    architecture: Optional[str]  # the model name it records or, for a KAT without one, the one its shapes match
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # recorded or implied: img_size, num_classes, ...
    args: Dict[str, Any] = field(default_factory=dict)  # the training arguments ({} for a bare state dict)

    @property
    def other_weights(self) -> Optional[str]:
        """The wrapper key of the weights not loaded (the raw model's when the EMA's were, or the reverse), None when
        the file holds one set only."""
        if not isinstance(self.raw, Mapping) or not self.source:
            return None
        others = MODEL_KEYS if self.source in EMA_KEYS else EMA_KEYS
        return next((key for key in others if isinstance(self.raw.get(key), Mapping)), None)

    @property
    def class_names(self) -> Optional[Tuple[str, ...]]:
        """The class names kat-train recorded, in label order (None when there are none)."""
        names = self.args.get("class_names")
        return tuple(names) if names else None


def _kat_shapes(state_dict: Mapping) -> Tuple[int, Tuple[int, int], int]:
    """(embed dim, patch size, depth) of a KAT state dict; ``CheckpointError`` for anything else."""
    check_kat_state_dict(state_dict)
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError("cannot infer the architecture: no 4-d patch_embed.proj.weight; pass the model name")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k))
    return int(proj.shape[0]), (int(proj.shape[-2]), int(proj.shape[-1])), depth


def _kat_layout(state_dict: Mapping) -> Tuple[Optional[str], Dict[str, Any]]:
    """(size, kwargs) of a KAT state dict: the ``SIZES`` entry its shapes match (None: none does), and the image size
    its position embedding was built for."""
    embed_dim, patch, depth = _kat_shapes(state_dict)
    matches = [s for s, cfg in SIZES.items() if (cfg["embed_dim"], cfg["depth"]) == (embed_dim, depth)]
    kwargs: Dict[str, Any] = {}
    pos = state_dict.get("pos_embed")
    if pos is not None and patch[0] == patch[1]:
        reg = state_dict.get("reg_token")
        tokens = pos.shape[-2] - int("cls_token" in state_dict) - (int(reg.shape[1]) if reg is not None else 0)
        grid = round(tokens ** 0.5)
        if grid * grid == tokens and grid * patch[0] != 224:
            kwargs["img_size"] = grid * patch[0]
    return (matches[0] if matches and patch == (16, 16) else None), kwargs


def infer_architecture(state_dict: Mapping) -> str:
    """The released KAT architecture whose shapes match ``state_dict`` (``"kat_tiny_patch16_224"``: the swish and
    GELU variants share every shape); ``CheckpointError`` for a non-KAT or a layout other than the released 224 px."""
    embed_dim, patch, depth = _kat_shapes(state_dict)
    size = next((s for s, cfg in SIZES.items() if cfg["embed_dim"] == embed_dim), None)
    if size is None:
        known = ", ".join(f"{cfg['embed_dim']} (kat_{s})" for s, cfg in SIZES.items())
        raise CheckpointError(f"unknown architecture: embed dim {embed_dim} matches no KAT size (known: {known}); "
                              "pass the model name")
    problems = [f"depth {depth} != {SIZES[size]['depth']}"] if depth != SIZES[size]["depth"] else []
    if patch != (16, 16):
        problems.append(f"patch size {patch[0]}x{patch[1]} != 16x16")
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape[-2] != 1 + (224 // 16) ** 2:
        problems.append(f"pos_embed of {pos.shape[-2]} tokens != 197 (a 224x224 input)")
    if problems:
        raise CheckpointError(f"ambiguous architecture: embed dim {embed_dim} suggests kat_{size}_patch16_224, but "
                              f"{'; '.join(problems)}; pass the model name (and its arguments) explicitly")
    return f"kat_{size}_patch16_224"


def read_checkpoint(path: PathLike, use_ema: Optional[bool] = None) -> LoadedCheckpoint:
    """Read a checkpoint file once: its weights (``use_ema`` as in :func:`~kat_timm.checkpoint.unwrap_state_dict`),
    and the architecture and model arguments it records or implies; ``CheckpointError`` for a bad file."""
    path = Path(path)
    raw = load_checkpoint(path)
    try:
        state_dict, source = unwrap_state_dict(raw, use_ema=use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    args = raw.get("args") if isinstance(raw, Mapping) and source else {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args  # timm's train.py saves a Namespace
    args = dict(args) if isinstance(args, Mapping) else {}
    arch = raw.get("arch") if source else None  # timm's saver: args.model, or the class name without args
    architecture = args.get("model") or (arch if isinstance(arch, str) and is_model(split_model_name_tag(arch)[0])
                                         else None)
    recorded = args.get("model_kwargs")
    model_kwargs: Dict[str, Any] = dict(recorded) if isinstance(recorded, Mapping) else {}
    if args.get("num_classes"):
        model_kwargs.setdefault("num_classes", int(args["num_classes"]))
    try:
        size, implied = _kat_layout(state_dict)
    except CheckpointError:  # not a KAT
        size, implied = None, {}
    if "head.weight" in state_dict:
        implied["num_classes"] = int(state_dict["head.weight"].shape[0])
    model_kwargs.update(implied)  # the tensors are the truth where they tell
    if architecture is None and size is not None:
        architecture = f"kat_{size}_patch16_224"
    return LoadedCheckpoint(path, state_dict, source, raw, architecture, model_kwargs, args)


def local_dir_config(name: str) -> dict:
    """The config.json of a ``local-dir:FOLDER`` model name's folder (``~`` expanded), as a dict.

    Raises:
        OSError: the file can't be read; ValueError: it is not JSON, or not a JSON object.
    """
    import json

    config = json.loads((Path(name[len("local-dir:"):]).expanduser() / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"config.json holds a JSON {type(config).__name__}, not an object")
    return config


def _local_dir_architecture(name: str) -> str:
    """The architecture that a ``local-dir:FOLDER`` name's config.json names (``name`` itself for other names or an
    unreadable folder: then timm's own error says what is wrong)."""
    if not name.startswith("local-dir:"):
        return name
    try:
        architecture = local_dir_config(name).get("architecture")
    except (OSError, ValueError):
        return name
    return architecture if isinstance(architecture, str) else name


def _base_name(name: str) -> str:
    """What decides a model's tensors: the architecture without its pretrained tag, KAT names by size (kat_tiny,
    kat_tiny_patch16_224 and its swish / gelu variants share every shape)."""
    architecture = split_model_name_tag(_local_dir_architecture(name))[0]
    match = re.match(r"^kat_(tiny|small|base)(?:_(?:swish|gelu))?(?:_patch16_224)?$", architecture)
    return f"kat_{match.group(1)}" if match else architecture


def check_model_matches(model_name: str, checkpoint: LoadedCheckpoint) -> None:
    """``CheckpointError`` (one line: what the file holds, what to give) when ``checkpoint`` records or implies an
    architecture other than ``model_name``'s; names of one size (kat_tiny, kat_tiny_patch16_224, ...) match."""
    recorded = checkpoint.architecture
    if recorded is not None and recorded.startswith(("local-dir:", "hf-hub:")):
        return  # a run started from a model folder or repo: unresolved here, the strict load decides
    if recorded is not None and _base_name(model_name) != _base_name(recorded):
        raise CheckpointError(f"{checkpoint.path} does not fit {model_name}: it holds a {recorded}; give the "
                              "matching model name, or none to build the checkpoint's own")


def create_model(model_name: Optional[str] = None, checkpoint: Optional[Union[PathLike, LoadedCheckpoint]] = None,
                 pretrained: bool = False, use_ema: Optional[bool] = None, **model_kwargs: Any) -> torch.nn.Module:
    """A timm model from a name (None: the checkpoint's architecture), a checkpoint (a file or a
    :func:`read_checkpoint` result, loaded strictly, with its recorded model arguments unless ``model_kwargs`` gives
    others, and kat-train's class names as ``pretrained_cfg["label_names"]``), or both. ``pretrained``: timm's
    released weights (only without a checkpoint). ``CheckpointError`` for a checkpoint that does not fit."""
    if checkpoint is None:
        if model_name is None:
            raise ValueError("create_model needs a model name or a checkpoint")
        return timm.create_model(model_name, pretrained=pretrained, **model_kwargs)
    if pretrained:
        raise ValueError("give pretrained=True or a checkpoint, not both")
    if not isinstance(checkpoint, LoadedCheckpoint):
        checkpoint = read_checkpoint(checkpoint, use_ema=use_ema)
    recorded = checkpoint.architecture
    if model_name is None:
        if recorded is None:
            raise CheckpointError(f"{checkpoint.path}: it records no model name and its shapes match no released KAT; "
                                  "pass the model name")
        model_name = recorded
    else:
        check_model_matches(model_name, checkpoint)
    check_finite(checkpoint.state_dict, checkpoint.path)
    kwargs = {**checkpoint.model_kwargs, **model_kwargs}
    if is_model_in_modules(split_model_name_tag(_local_dir_architecture(model_name))[0], ["kat"]):
        kwargs.setdefault("weight_init", "skip")  # every tensor is overwritten by the strict load that follows
    else:  # another family: pass only what it was given, and the classifier size
        kwargs = {k: v for k, v in kwargs.items() if k in model_kwargs or k == "num_classes"
                  or k in (checkpoint.args.get("model_kwargs") or {})}
    if model_name.startswith("local-dir:"):  # as recorded by a run given local-dir:~/x
        model_name = "local-dir:" + str(Path(model_name[len("local-dir:"):]).expanduser())
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except OSError as error:  # a run started from local-dir:FOLDER (or hf-hub:) records that name; gone since
        if model_name.startswith(("local-dir:", "hf-hub:")):
            raise CheckpointError(f"{checkpoint.path} records the model {model_name}, which can't be read now "
                                  f"({load_error_detail(error)}); restore it, or pass the architecture's "
                                  "name") from None
        raise
    state_dict = checkpoint.state_dict
    try:  # strict; a KAT's filter refuses partly missing rationals and resamples position embeddings
        model.load_state_dict(checkpoint_filter_fn(state_dict, model) if isinstance(model, KAT) else state_dict)
    except RuntimeError as error:
        differs = recorded and _base_name(recorded) != _base_name(model_name)
        detail = load_error_detail(error) + (f"; the weights look like {recorded}" if differs else "")
        raise CheckpointError(f"{checkpoint.path} does not fit {model_name}: {detail}") from None
    names = checkpoint.class_names
    if names and len(names) <= int(getattr(model, "num_classes", 0) or 0):
        model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}, label_names=names)
    return model
