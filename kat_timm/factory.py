"""One way to build a model: from a timm name, a checkpoint, or both.

:func:`read_checkpoint` reads a file once (weights-only, see :mod:`kat_timm.checkpoint`) and keeps everything a
command needs from it: the unwrapped state dict, the whole dict (optimizer, epoch, args for a resume), the
architecture and the model arguments it records (kat-train's ``args`` dict, timm train.py's ``args`` Namespace) or
that its tensors imply. :func:`create_model` builds the model from that, so a checkpoint trained at ``img_size=32``
or for 10 classes needs no option to load, and a given name that contradicts the checkpoint is one clear error.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, check_kat_state_dict, load_checkpoint, unwrap_state_dict
from .models.kat import KAT, SIZES, checkpoint_filter_fn

__all__ = ["LoadedCheckpoint", "create_model", "infer_architecture", "read_checkpoint"]

PathLike = Union[str, Path]

@dataclass
class LoadedCheckpoint:
    """What :func:`read_checkpoint` got from one read of a checkpoint file.

    Attributes:
        path: the file.
        state_dict: the model weights, unwrapped (EMA or not, as asked) and without DDP / torch.compile prefixes.
        source: the wrapper key the weights came from (``state_dict_ema``, ``state_dict``, ...; ``""``: bare).
        raw: everything the file holds (optimizer, epoch, args, ... of a training checkpoint).
        architecture: the model name it records (``args.model`` / ``arch``) or, for a KAT without one, the
            released name its shapes match; None when neither tells.
        model_kwargs: the model arguments it records or its tensors imply (``img_size``, ``num_classes``, the
            ``model_kwargs`` of the run), which :func:`create_model` passes unless told otherwise.
        args: the training arguments as a dict ({} for a bare state dict).
    """

    path: Path
    state_dict: Dict[str, torch.Tensor]
    source: str
    raw: Any
    architecture: Optional[str]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    args: Dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> Optional[Tuple[str, ...]]:
        """The class names kat-train recorded, in label order (None when there are none)."""
        names = self.args.get("class_names")
        return tuple(names) if names else None


def _kat_layout(state_dict: Mapping) -> Tuple[Optional[str], Dict[str, Any]]:
    """(size, kwargs) of a KAT state dict: the ``SIZES`` entry its embed dim and depth match (None: none does), and
    the image size its position embedding was built for. Raises ``CheckpointError`` for a non-KAT."""
    check_kat_state_dict(state_dict)
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError("cannot infer the architecture: no 4-d patch_embed.proj.weight; pass the model name")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k))
    size = next((s for s, cfg in SIZES.items() if (cfg["embed_dim"], cfg["depth"]) == (embed_dim, depth)), None)
    kwargs: Dict[str, Any] = {}
    pos = state_dict.get("pos_embed")
    prefix = int("cls_token" in state_dict) + (int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0)
    if pos is not None and proj.shape[-2] == patch:
        grid = round((pos.shape[-2] - prefix) ** 0.5)
        if grid * grid == pos.shape[-2] - prefix and grid * patch != 224:
            kwargs["img_size"] = grid * patch
    if "head.weight" in state_dict:
        kwargs["num_classes"] = int(state_dict["head.weight"].shape[0])
    return (size if patch == 16 else None), kwargs


def infer_architecture(state_dict: Mapping) -> str:
    """The registered KAT architecture whose shapes match ``state_dict`` (e.g. ``"kat_tiny_patch16_224"``).

    Reads embed dim (192 / 384 / 768 for KAT-T / S / B), depth, patch size and position-embedding length from the
    tensors. The swish- and GELU-initialised variants share every shape (only the initial rational coefficients
    differ), so the released name ``kat_{size}_patch16_224`` is returned. Raises ``CheckpointError`` when the
    checkpoint is not a KAT or matches no released 224-pixel layout; pass the model name explicitly in that case
    (:func:`read_checkpoint` also reports the image size, so a KAT trained at another size needs no name).
    """
    check_kat_state_dict(state_dict)
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError("cannot infer the architecture: no 4-d patch_embed.proj.weight; pass the model name")
    embed_dim, patch = int(proj.shape[0]), (int(proj.shape[-2]), int(proj.shape[-1]))
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k))
    size = next((s for s, cfg in SIZES.items() if cfg["embed_dim"] == embed_dim), None)
    if size is None:
        known = ", ".join(f"{cfg['embed_dim']} (kat_{s})" for s, cfg in SIZES.items())
        raise CheckpointError(
            f"unknown architecture: embed dim {embed_dim} matches no KAT size (known: {known}); pass the model name"
        )
    problems = [f"depth {depth} != {SIZES[size]['depth']}"] if depth != SIZES[size]["depth"] else []
    if patch != (16, 16):
        problems.append(f"patch size {patch[0]}x{patch[1]} != 16x16")
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape[-2] != 1 + (224 // 16) ** 2:
        problems.append(f"pos_embed of {pos.shape[-2]} tokens != 197 (a 224x224 input)")
    if problems:
        raise CheckpointError(
            f"ambiguous architecture: embed dim {embed_dim} suggests kat_{size}_patch16_224, but "
            f"{'; '.join(problems)}; pass the model name (and its arguments) explicitly"
        )
    return f"kat_{size}_patch16_224"


def _as_dict(args: Any) -> Dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def read_checkpoint(path: PathLike, use_ema: Optional[bool] = None) -> LoadedCheckpoint:
    """Read a checkpoint file once: its weights, and the architecture and model arguments it records.

    Args:
        path: ``.pth`` / ``.pth.tar`` / ``.bin`` / ``.pt`` (read with ``torch.load(weights_only=True)``) or
            ``.safetensors``; a bare state dict or a training checkpoint (kat-train, timm's train.py, DeiT).
        use_ema: None: the EMA weights when there are any (timm's ``load_checkpoint`` does the same); True: the
            EMA weights, an error without them; False: the model weights.

    Raises:
        CheckpointError: missing, unreadable or unsafe file, no weights in it, or EMA weights asked for and absent.
    """
    path = Path(path)
    try:
        raw = load_checkpoint(path)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None
    try:
        state_dict, source = unwrap_state_dict(raw, use_ema=use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    args = _as_dict(raw.get("args")) if isinstance(raw, Mapping) and source else {}
    architecture = args.get("model") or (raw.get("arch") if source and isinstance(raw.get("arch"), str) else None)
    model_kwargs: Dict[str, Any] = {}
    recorded = args.get("model_kwargs")
    if isinstance(recorded, Mapping):
        model_kwargs.update(recorded)
    if args.get("num_classes"):
        model_kwargs.setdefault("num_classes", int(args["num_classes"]))
    try:
        size, implied = _kat_layout(state_dict)
    except CheckpointError:
        size, implied = None, {}
        if "head.weight" in state_dict:
            implied["num_classes"] = int(state_dict["head.weight"].shape[0])
    model_kwargs.update(implied)  # the tensors are the truth where they tell
    if architecture is None and size is not None:
        architecture = f"kat_{size}_patch16_224"
    return LoadedCheckpoint(path, state_dict, source, raw, architecture, model_kwargs, args)


def _base_name(name: str) -> str:
    """What decides a model's tensors: the architecture without its pretrained tag, KAT names by size (kat_tiny,
    kat_tiny_patch16_224 and its swish / gelu variants share every shape)."""
    from timm.models import split_model_name_tag

    architecture = split_model_name_tag(name)[0]
    match = re.match(r"^kat_(tiny|small|base)(?:_(?:swish|gelu))?(?:_patch16_224)?$", architecture)
    return f"kat_{match.group(1)}" if match else architecture


def _check_finite(checkpoint: LoadedCheckpoint) -> None:
    broken = [key for key, value in checkpoint.state_dict.items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise CheckpointError(f"{checkpoint.path} holds non-finite values (NaN or infinity) in "
                              f"{', '.join(broken[:5])}{more}: the run that wrote it probably diverged; use an "
                              "earlier checkpoint")


def _load_into(model: torch.nn.Module, checkpoint: LoadedCheckpoint, name: str) -> None:
    """Strict load of the checkpoint's weights; a mismatch names the keys and the architecture they are for."""
    state_dict = checkpoint.state_dict
    try:
        if isinstance(model, KAT):  # refuses partly missing rationals, resamples position embeddings
            state_dict = checkpoint_filter_fn(state_dict, model)
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        # torch's first line only says "Error(s) in loading state_dict for KAT:"; the keys are on the next ones
        detail = "; ".join(line.rstrip(".") for line in lines[1:4]) if len(lines) > 1 else lines[0]
        hint = f"; the weights look like {checkpoint.architecture}" if checkpoint.architecture else ""
        raise CheckpointError(f"{checkpoint.path} does not fit {name}: {detail}{hint}") from None


def create_model(
    model_name: Optional[str] = None,
    checkpoint: Optional[Union[PathLike, LoadedCheckpoint]] = None,
    pretrained: bool = False,
    use_ema: Optional[bool] = None,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """A timm model from a name, a checkpoint, or both.

    Args:
        model_name: a timm name (``"kat_tiny"``, ``"kat_base_patch16_224.vitft"``); None: the architecture the
            checkpoint records or its shapes imply.
        checkpoint: a file or a :func:`read_checkpoint` result, whose weights are loaded strictly. Its recorded
            ``img_size``, ``num_classes`` and model arguments are used unless ``model_kwargs`` gives others (a
            KAT's position embedding is then resampled); a kat-train checkpoint's class names become the model's
            ``pretrained_cfg["label_names"]``.
        pretrained: the released weights, through timm (only without ``checkpoint``).
        use_ema: which weights of a training checkpoint, as in :func:`read_checkpoint` (only for a path).
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``num_classes``, ``drop_path_rate``, ...).

    Raises:
        CheckpointError: an unreadable checkpoint, one whose architecture differs from ``model_name``, weights that
            don't fit, or no way to tell the architecture.
        ValueError: both ``pretrained`` and ``checkpoint``.
    """
    import timm
    from timm.models import is_model_in_modules, split_model_name_tag

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
    elif recorded is not None and _base_name(model_name) != _base_name(recorded):
        raise CheckpointError(f"{checkpoint.path} holds a {recorded}, not a {model_name}: give the matching model "
                              "name, or none to build the checkpoint's own")
    _check_finite(checkpoint)
    kwargs = {**checkpoint.model_kwargs, **model_kwargs}
    if is_model_in_modules(split_model_name_tag(model_name)[0], ["kat"]):
        kwargs.setdefault("weight_init", "skip")  # every tensor is overwritten by the strict load that follows
    else:  # another family: pass only what it was given, and the classifier size
        kwargs = {k: v for k, v in kwargs.items() if k in model_kwargs or k == "num_classes"
                  or k in (checkpoint.args.get("model_kwargs") or {})}
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    _load_into(model, checkpoint, model_name)
    names = checkpoint.class_names
    if names and len(names) <= int(getattr(model, "num_classes", 0) or 0):
        model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}, label_names=names)
    return model
