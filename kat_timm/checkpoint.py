"""Reading KAT checkpoints safely (weights-only: no pickled code ever runs), unwrapping training checkpoints, checking
that they are KATs."""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.models import clean_state_dict

__all__ = ["CheckpointError", "check_finite", "check_floating", "check_kat_state_dict", "folder_given_message",
           "load_checkpoint", "load_error_detail", "unwrap_state_dict"]

PathLike = Union[str, Path]

# Wrapper keys of training checkpoints, in the order timm's ``load_state_dict`` (and kat's checkpoint_filter_fn)
# looks for them: EMA weights first, then the raw model weights.
EMA_KEYS = ("state_dict_ema", "model_ema")
MODEL_KEYS = ("state_dict", "model")

# What timm's save_for_hf (and the released Hub repos) hold beside config.json, and checkpoint file endings.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".safetensors", ".ckpt")

_RATIONAL_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.act[12]\.weight_(numerator|denominator)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, is not a KAT state dict, or does not fit the requested model."""


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """A checkpoint file's content without executing pickled code (``torch.load(weights_only=True)`` plus the
    ``argparse.Namespace`` of timm training checkpoints, or safetensors); ``CheckpointError`` if unreadable or
    unsafe."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_given_message(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
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
        raise CheckpointError(f"{path}: refusing to load, the pickle references objects outside the weights-only "
                              f"allow-list (globals: {', '.join(names)}). Nothing in it was run. Load it with "
                              "weights_only=False only if you fully trust its origin, then re-save its state "
                              "dict.") from e
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError, EOFError, even KeyError
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def folder_given_message(path: PathLike, hub_advice: str = ", which loads by the model name local-dir:{folder}") -> str:
    """What to say when a folder is given where a checkpoint file is expected: a Hub-style model folder (config.json
    and weights, as ``kat-timm publish`` or timm's ``save_for_hf`` write) gets ``hub_advice`` (formatted with
    ``folder`` and ``weights``, its weights file: the calling command's way to use it); for another folder, the
    checkpoint files it holds are named."""
    path = Path(path)
    weights = next((path / name for name in HUB_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is not None and (path / "config.json").is_file():
        return (f"{path} is a folder, not a checkpoint file: a Hub-style model folder (config.json + weights)"
                + hub_advice.format(folder=path, weights=weights))
    found = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    shown = f"; it holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}" if found else ""
    return f"{path} is a folder, not a checkpoint file: give a file in it{shown}"


def _unsafe_globals(path: Path, error: Exception) -> List[str]:
    """The pickle globals outside torch's weights-only allow-list that ``path`` needs, found without unpickling."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # torch >= 2.5, zip files only
    except Exception:
        names = []
    return list(names) or re.findall(r"GLOBAL (\S+)", str(error))


def unwrap_state_dict(checkpoint: Any, use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, source)``: the model weights without DDP / torch.compile prefixes, and the wrapper key they came
    from (``""``: a bare state dict). ``use_ema``: None: the EMA weights if any (as timm does); True: those or an
    error; False: the model weights."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"not a state dict or training checkpoint: the file holds a {type(checkpoint).__name__}")
    if len(checkpoint) > 0 and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if use_ema:
            raise CheckpointError("EMA weights requested, but the checkpoint is a bare state dict (no state_dict_ema)")
        source = ""
    else:
        wanted = (EMA_KEYS if use_ema is not False else ()) + (MODEL_KEYS if not use_ema else ())
        source = next((key for key in wanted if isinstance(checkpoint.get(key), Mapping)), None)
    if source is None and use_ema:
        raise CheckpointError(f"EMA weights requested, but the checkpoint has none of {EMA_KEYS}")
    ema_only = next((key for key in EMA_KEYS if isinstance(checkpoint.get(key), Mapping)), None)
    if source is None and ema_only:
        raise CheckpointError(f"it holds only EMA weights ({ema_only}), no raw model weights, which were asked for "
                              f"(--no-ema, use_ema=False); load its EMA weights: leave out --no-ema")
    if source is None:
        top = ", ".join(repr(k) for k in list(checkpoint)[:8]) or "nothing"
        raise CheckpointError(f"no model weights found: neither a state dict of tensors nor a training checkpoint "
                              f"with one of {EMA_KEYS + MODEL_KEYS} (top-level keys: {top})")
    state_dict = checkpoint[source] if source else checkpoint
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors or not state_dict:
        where = f"checkpoint[{source!r}]" if source else "the checkpoint"
        raise CheckpointError(f"{where} is not a state dict of tensors (non-tensor entries: {non_tensors[:5]})")
    cleaned = clean_state_dict(state_dict)  # timm's: DDP module. and torch.compile _orig_mod., in either order
    if len(cleaned) < len(state_dict):
        names = [next(iter(clean_state_dict({key: None}))) for key in state_dict]
        twice = next(name for name in names if names.count(name) > 1)
        raise CheckpointError(f"two keys map to {twice!r} once the module./_orig_mod. prefixes are removed")
    return cleaned, source


def check_kat_state_dict(state_dict: Mapping) -> int:
    """The number of blocks with rational coefficients; ``CheckpointError`` unless ``state_dict`` looks like a KAT."""
    blocks = {int(m.group(1)) for m in map(_RATIONAL_KEY.match, state_dict) if m}
    if not blocks:
        vit_like = "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict)
        hint = (" It looks like a plain ViT: kat_timm.models.kat_from_vit builds the function-preserving KAT from it."
                if vit_like else "")
        raise CheckpointError("not a KAT checkpoint: no rational activation coefficients (blocks.N.mlp.act1/act2."
                              f"weight_numerator/weight_denominator) among its {len(state_dict)} keys.{hint}")
    return len(blocks)


def check_finite(state_dict: Mapping, path: PathLike) -> None:
    """``CheckpointError`` naming the tensors of ``state_dict`` (read from ``path``) that hold NaN or infinity."""
    broken = [key for key, value in state_dict.items()
              if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise CheckpointError(f"{path} holds non-finite values (NaN or infinity) in {', '.join(broken[:5])}{more}: "
                              "the run that wrote it probably diverged; use an earlier checkpoint")


def check_floating(state_dict: Mapping, model: torch.nn.Module) -> None:
    """``CheckpointError`` naming the entries of ``state_dict`` that would fill a floating-point parameter or buffer
    of ``model`` from an integer or bool tensor: ``load_state_dict`` converts them silently (an all-zero model from
    a file of integers), where no trained weights look like that."""
    targets = model.state_dict()
    wrong = [f"{key} ({value.dtype})" for key, value in state_dict.items()
             if torch.is_tensor(value) and not value.is_floating_point() and key in targets
             and targets[key].is_floating_point()]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise CheckpointError(f"the checkpoint holds integer or bool tensors where the model has floating-point "
                              f"weights: {', '.join(wrong[:5])}{more}; these are not trained weights (a wrongly "
                              "converted or exported file?): re-export them as float32")


def load_error_detail(error: Exception) -> str:
    """The keys of torch's ``load_state_dict`` error (its first line only says "Error(s) in loading state_dict for
    KAT:"), or the first line of any other error."""
    lines = [line.strip().rstrip(".") for line in str(error).strip().splitlines() if line.strip()]
    if not (len(lines) > 1 and "loading state_dict" in lines[0]):
        return "".join(lines[:1])
    # torch lists every missing/unexpected key on one line and every size mismatch on its own: a wrong model gives
    # kilobytes. A few of each, and how many there are, say as much.
    parts, mismatches = [], [line for line in lines[1:] if line.startswith("size mismatch for ")]
    for line in lines[1:]:
        what, found, keys = line.partition(": ")
        if found and what.endswith("key(s) in state_dict"):
            names = re.findall(r'"([^"]+)"', keys)
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{what}: {', '.join(names[:3])}{more}")
    parts += mismatches[:2]
    if len(mismatches) > 2:
        parts.append(f"and {len(mismatches) - 2} more size mismatches")
    return "; ".join(parts) or "; ".join(lines[1:4])
