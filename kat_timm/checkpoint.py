"""Reading KAT checkpoints safely: weights-only loading, unwrapping training checkpoints, checking they are KATs.

The released KAT weights (``adamdad/kat_{tiny,small,base}_patch16_224[.vitft]``) are plain pickled state dicts
(``pytorch_model.bin``) next to a timm ``config.json``. Training checkpoints written by timm's ``train.py`` or
DeiT-style scripts wrap the state dict (``state_dict`` / ``model``, optionally with ``state_dict_ema`` /
``model_ema``) and may carry a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` key prefix.

Loading never runs arbitrary pickled code: ``.safetensors`` files are read with safetensors, everything else with
``torch.load(weights_only=True)`` (tensors, containers and primitive types; ``argparse.Namespace`` is allowed too, as
timm allows it, because timm training checkpoints store their arguments in one).
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["CheckpointError", "check_kat_state_dict", "load_checkpoint", "unwrap_state_dict"]

PathLike = Union[str, Path]

# Wrapper keys of training checkpoints, in the order timm's ``load_state_dict`` (and kat's checkpoint_filter_fn)
# looks for them: EMA weights first, then the raw model weights.
EMA_KEYS = ("state_dict_ema", "model_ema")
MODEL_KEYS = ("state_dict", "model")
# Wrapper prefixes of saved keys: DistributedDataParallel and torch.compile (either order, as timm strips them).
KEY_PREFIXES = ("module.", "_orig_mod.")

_RATIONAL_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.act[12]\.weight_(numerator|denominator)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, is not a KAT state dict, or does not fit the requested model."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading and unwrapping
# ---------------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Read a checkpoint file without executing pickled code.

    ``*.safetensors`` is read with ``safetensors.torch.load_file``; anything else (``.bin``, ``.pth``, ``.pt``,
    ``.pth.tar``) with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` (the ``args`` entry of timm
    training checkpoints). Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a file that is
    not a readable checkpoint or that needs a pickle global outside the allowed set (such a file is never unpickled
    unsafely: nothing it references is called).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path, e)
        if not names:
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (unpickling failed: {detail})") from e
        raise CheckpointError(
            f"{path}: refusing to load, the pickle references objects outside the weights-only allow-list "
            f"(globals: {', '.join(names)}). Nothing in it was run. Load it with weights_only=False only if you "
            "fully trust its origin, then re-save its state dict."
        ) from e
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError, EOFError, even KeyError
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unsafe_globals(path: Path, error: Exception) -> List[str]:
    """The pickle globals outside torch's weights-only allow-list that ``path`` needs, found without unpickling."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # torch >= 2.5, zip files only
    except Exception:
        names = []
    return list(names) or re.findall(r"GLOBAL (\S+)", str(error))


def _strip_prefixes(key: str) -> str:
    while True:
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def unwrap_state_dict(checkpoint: Any, use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The model state dict inside ``checkpoint`` and where it was found.

    Args:
        checkpoint: a state dict (every value a tensor) or a training checkpoint wrapping one under
            ``state_dict_ema`` / ``model_ema`` (EMA weights) or ``state_dict`` / ``model``.
        use_ema: None: the EMA weights when the checkpoint has them, else the model weights (what
            ``timm.models.load_checkpoint`` / timm's pretrained loading and ``kat_timm``'s checkpoint filter do);
            True: the EMA weights, an error when there are none; False: the model weights, never the EMA ones.

    Returns:
        ``(state_dict, source)``: keys stripped of DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes, values
        the checkpoint's tensors; ``source`` is the wrapper key used, or ``""`` for a bare state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"not a state dict or training checkpoint: the file holds a {type(checkpoint).__name__}")
    is_state_dict = len(checkpoint) > 0 and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ema_keys = [k for k in EMA_KEYS if isinstance(checkpoint.get(k), Mapping)]
    model_keys = [k for k in MODEL_KEYS if isinstance(checkpoint.get(k), Mapping)]
    if is_state_dict:
        source, state_dict = "", checkpoint
        if use_ema:
            raise CheckpointError("EMA weights requested, but the checkpoint is a bare state dict (no state_dict_ema)")
    elif use_ema is True:
        if not ema_keys:
            raise CheckpointError(f"EMA weights requested, but the checkpoint has none of {EMA_KEYS}")
        source = ema_keys[0]
    elif use_ema is None and ema_keys:
        source = ema_keys[0]
    elif model_keys:
        source = model_keys[0]
    else:
        top = ", ".join(repr(k) for k in list(checkpoint)[:8]) or "nothing"
        raise CheckpointError(
            f"no model weights found: neither a state dict of tensors nor a training checkpoint with one of "
            f"{EMA_KEYS + MODEL_KEYS} (top-level keys: {top})"
        )
    if source:
        state_dict = checkpoint[source]
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors or not state_dict:
        where = f"checkpoint[{source!r}]" if source else "the checkpoint"
        raise CheckpointError(f"{where} is not a state dict of tensors (non-tensor entries: {non_tensors[:5]})")
    cleaned: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = _strip_prefixes(key)
        if new_key in cleaned:
            raise CheckpointError(f"two keys map to {new_key!r} once the module./_orig_mod. prefixes are removed")
        cleaned[new_key] = value
    return cleaned, source


def check_kat_state_dict(state_dict: Mapping) -> int:
    """Raise ``CheckpointError`` unless ``state_dict`` looks like a KAT (a timm ViT with rational activations).

    Returns the number of blocks with rational coefficients. A plain ViT state dict (no
    ``blocks.N.mlp.act{1,2}.weight_{numerator,denominator}``) is rejected with that explanation.
    """
    blocks = {int(m.group(1)) for m in map(_RATIONAL_KEY.match, state_dict) if m}
    if not blocks:
        vit_like = "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict)
        hint = (
            " It looks like a plain ViT: kat_timm.models.kat_from_vit builds the function-preserving KAT from it."
            if vit_like
            else ""
        )
        raise CheckpointError(
            "not a KAT checkpoint: no rational activation coefficients "
            f"(blocks.N.mlp.act1/act2.weight_numerator/weight_denominator) among its {len(state_dict)} keys.{hint}"
        )
    return len(blocks)
