"""The model zoo from timm's registry (``kat-timm info``, ``scripts/model_zoo.py``): every KAT model and pretrained
tag, its size and cost (counted on the meta device), accuracy and where its weights are."""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag

from .download import cached_file_intact, cached_weights, pretrained_names, weight_files
from .hub import kat_num_params, released_top1

__all__ = ["FlopCount", "ZooRow", "cache_state", "canonical_rows", "checkpoint_cached", "markdown_table", "model_flops",
           "zoo_rows"]

# How each released tag was trained (KAT_NOTES: "from ViT" runs start from AugReg ViT ImageNet-21k checkpoints).
_TRAINING = {"": "from scratch, IN-1k", "vitft": "from AugReg ViT (IN-21k), IN-1k"}


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward (or training step), 2 per MAC, and the part spent in the rational op."""

    total: int
    rational: int

    @property
    def macs(self) -> float:
        """total / 2: the "FLOPs" of the KAT and DeiT papers and of timm's tables, which count multiply-adds."""
        return self.total / 2


@dataclasses.dataclass(frozen=True)
class ZooRow:
    """One registered model with one pretrained tag (``""``: the default; None: no weights); ``alias_of``: the
    ``model.tag`` whose weights a second name loads."""

    model: str
    tag: Optional[str]
    params: int
    hf_hub_id: Optional[str] = None
    top1: Optional[float] = None
    alias_of: Optional[str] = None
    flops: Optional[FlopCount] = None

    @property
    def name(self) -> str:
        """``model.tag`` as ``timm.create_model`` takes it."""
        return f"{self.model}.{self.tag}" if self.tag else self.model

    @property
    def has_weights(self) -> bool:
        return self.tag is not None

    @property
    def training(self) -> str:
        """How the weights were trained, or why there are none."""
        if not self.has_weights:
            return "no released weights (init variant)"
        return _TRAINING.get(self.tag, f"tag {self.tag!r}")

    @property
    def load(self) -> str:
        """The Python that creates this model (with its weights, when it has some)."""
        return f'timm.create_model("{self.name}"' + (", pretrained=True)" if self.has_weights else ")")

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field, plus ``name``, ``training`` and ``load``."""
        out = dataclasses.asdict(self)
        if self.flops is not None:
            out["flops"] = {"total": self.flops.total, "rational": self.flops.rational, "macs": self.flops.macs}
        out.update(name=self.name, training=self.training, load=self.load)
        return out


def _alias_target(model: str, tag: str, hf_hub_id: Optional[str]) -> Optional[str]:
    """The canonical ``model.tag`` whose weights a second name loads (released repos are named after it)."""
    if not hf_hub_id:
        return None
    repo_name = hf_hub_id.split("/", 1)[-1]
    return None if repo_name == (f"{model}.{tag}" if tag else model) else repo_name


def model_flops(model_name: str, img_size: int = 224, batch_size: int = 1, backward: bool = False) -> FlopCount:
    """FLOPs of any timm model on a ``batch_size`` x 3 x ``img_size`` x ``img_size`` input, counted on meta tensors;
    ``backward``: a training step instead of a forward."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {"img_size": img_size} if img_size != 224 else {}
    model = timm.create_model(model_name, device="meta", **kwargs)
    x = torch.empty(batch_size, 3, img_size, img_size, device="meta")
    with torch.set_grad_enabled(backward), FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    rational_ops = (torch.ops.kat_timm.group_rational, torch.ops.kat_timm.group_rational_backward)
    return FlopCount(total=counter.get_total_flops(), rational=sum(counts.get(op, 0) for op in rational_ops))


def cache_state(hf_hub_id: str) -> str:
    """What the local Hugging Face cache holds of ``hf_hub_id``'s weights: "cached" (weights timm loads offline),
    "damaged" (the file timm would load does not match its checksum; reads the whole file) or "not cached"."""
    cached = cached_weights(hf_hub_id, weight_files())
    if cached is None:
        return "not cached"
    return "cached" if cached_file_intact(cached[1]) else "damaged"


def checkpoint_cached(hf_hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds intact weights timm loads offline for ``hf_hub_id``."""
    return cache_state(hf_hub_id) == "cached"


def zoo_rows(pattern: str = "kat*", flops: bool = False) -> List[ZooRow]:
    """One row per model of ``timm.list_models(pattern)`` and pretrained tag, smallest first, released first;
    ``flops``: also each architecture's forward FLOPs (224 px, batch 1)."""

    @functools.lru_cache(maxsize=None)
    def measure(model: str) -> Tuple[int, Optional[FlopCount]]:
        return kat_num_params(model), model_flops(model) if flops else None

    rows: List[ZooRow] = []
    for model in timm.list_models(pattern):
        tags = [split_model_name_tag(name)[1] for name in pretrained_names(model)]  # "": the default tag
        if not tags:
            params, count = measure(model)
            rows.append(ZooRow(model=model, tag=None, params=params, flops=count))
        for tag in tags:
            hf_hub_id = get_pretrained_cfg(f"{model}.{tag}" if tag else model).hf_hub_id
            alias_of = _alias_target(model, tag, hf_hub_id)
            # A second name loads the same weights, hence is the same architecture: measure the canonical one once.
            target = split_model_name_tag(alias_of)[0] if alias_of else model
            params, count = measure(target if timm.is_model(target) else model)
            rows.append(ZooRow(model=model, tag=tag, params=params, hf_hub_id=hf_hub_id,
                               top1=released_top1(model, tag), alias_of=alias_of, flops=count))
    return sorted(rows, key=lambda r: (r.params, not r.has_weights, r.model, r.tag or ""))


def canonical_rows(rows: Iterable[ZooRow]) -> Tuple[List[ZooRow], Dict[str, List[str]]]:
    """Split ``rows`` into the rows to show and the aliases: ``(rows without alias_of, {canonical: [aliases]})``."""
    shown, aliases = [], {}
    for row in rows:
        if row.alias_of is None:
            shown.append(row)
        else:
            aliases.setdefault(row.alias_of, []).append(row.name)
    return shown, aliases


def markdown_table(rows: Iterable[ZooRow]) -> str:
    """The README's model table: the canonical rows (with FLOPs when measured), aliases in a note below."""
    shown, aliases = canonical_rows(rows)
    with_flops = all(row.flops is not None for row in shown)
    header = ["Model", "Tag", "Trained", "Params"]
    if with_flops:
        header += ["GMACs", "GFLOPs", "rational op FLOPs"]
    header += ["Top-1 (IN-1k)", "Hub id", "Load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in shown:
        cells = [f"`{row.model}`", f"`{row.tag}`" if row.tag else ("(default)" if row.has_weights else "-"),
                 row.training, f"{row.params / 1e6:.2f} M"]
        if with_flops:
            cells += [f"{row.flops.macs / 1e9:.2f}", f"{row.flops.total / 1e9:.2f}",
                      f"{row.flops.rational / 1e6:.1f} M"]
        cells += [f"{row.top1:.1f}" if row.top1 is not None else "-",
                  f"[{row.hf_hub_id}](https://huggingface.co/{row.hf_hub_id})" if row.hf_hub_id else "-",
                  f"`{row.load}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if aliases:
        lines += ["", "Other names for the same weights (same architecture, same tags):", ""]
        for target, names in aliases.items():
            lines.append(f"- `{target}`: " + ", ".join(f"`{name}`" for name in names))
    return "\n".join(lines)
