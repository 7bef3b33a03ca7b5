"""Hub folders for KAT checkpoints: model cards, timm/transformers-loadable ``config.json``, checkpoint conversion
(README, "Deployment")."""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import timm
from huggingface_hub.utils.sha import sha_fileobj

from ..checkpoint import CheckpointError, check_finite, check_kat_state_dict, load_checkpoint, unwrap_state_dict
from ..factory import infer_architecture
from ..files import OutputPathError, edit_atomically, output_target
from ..models import RELEASED_TOP1

__all__ = ["ConversionResult", "check_hub_files", "convert_checkpoint", "fix_hub_folder", "hub_config",
           "kat_num_params", "model_card", "released_top1", "save_hub_folder"]

PathLike = Union[str, Path]

OUTPUT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "README.md")
# Arguments transformers' TimmWrapper passes to timm.create_model itself (num_classes from the config's root
# ``num_classes``): the same key in ``model_args`` makes it fail with "got multiple values for keyword argument".
WRAPPER_OWN_ARGS = ("num_classes", "pretrained")

_SIZE_OF_NAME = re.compile(r"^kat_(tiny|small|base)(?:_|$)")
_SIZE_TITLES = {"tiny": "KAT-T", "small": "KAT-S", "base": "KAT-B"}
_GITHUB = "https://github.com/Adamdad/kat"


def kat_num_params(model_name: str, **kwargs) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no initialisation cost)."""
    model = timm.create_model(model_name, device="meta", **kwargs)
    return sum(p.numel() for p in model.parameters())


def _size_of(model_name: str) -> Optional[str]:
    return match.group(1) if (match := _SIZE_OF_NAME.match(model_name)) else None


def released_top1(model_name: str, tag: str = "") -> Optional[float]:
    """ImageNet-1k top-1 (%) reported with the released checkpoint ``model_name``[.``tag``], None if not released."""
    size = _size_of(model_name)
    if size is None or "gelu" in model_name or tag not in ("", "vitft"):
        return None
    return RELEASED_TOP1[size][1 if tag == "vitft" else 0]


def _comparison_table(model_name: str, tag: str) -> str:
    """The six released checkpoints with their reported top-1; this checkpoint's row in bold."""
    rows = ["| Model | Tag | Params | ImageNet-1k top-1 (%) |", "|---|---|---|---|"]
    for size, results in RELEASED_TOP1.items():
        name = f"kat_{size}_patch16_224"
        params = kat_num_params(name) / 1e6
        for row_tag, top1 in zip(("", "vitft"), results):
            cells = [f"`{name}.{row_tag}`" if row_tag else f"`{name}`", "ViT init" if row_tag else "from scratch",
                     f"{params:.1f}M", f"{top1:.1f}"]
            if size == _size_of(model_name) and row_tag == tag and "gelu" not in model_name:
                cells = [f"**{c}**" for c in cells]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


_CITATION = """@article{yang2024kat,
  title={Kolmogorov-Arnold Transformer},
  author={Yang, Xingyi and Wang, Xinchao},
  journal={arXiv preprint arXiv:2409.10594},
  year={2024}
}"""


def model_card(model_name: str, tag: str = "", num_params: Optional[int] = None, repo_id: Optional[str] = None,
               source: Optional[str] = None) -> str:
    """README.md (Hub model card) of a converted KAT checkpoint, by timm's own card generator; ``source`` says where
    the weights came from, ``num_params`` defaults to the 1000-class model's."""
    from timm.models._hub import generate_readme

    size = _size_of(model_name)
    full_name = f"{model_name}.{tag}" if tag else model_name
    if num_params is None and size is not None:
        num_params = kat_num_params(f"kat_{size}_patch16_224")
    title = _SIZE_TITLES.get(size, "KAT")
    origin = "initialised from a pretrained (AugReg) ViT and fine-tuned" if tag == "vitft" else "trained from scratch"
    top1 = released_top1(model_name, tag)
    # Without a repo id, a released name loads through its registered pretrained cfg; anything else needs a repo.
    hub_name = f"hf-hub:{repo_id}" if repo_id else (full_name if top1 is not None else "hf-hub:OWNER/REPO")
    details = {
        "Model Type": f"image classification / feature backbone ({title}, {origin})",
        "Architecture": f"`{model_name}`" + (f", pretrained tag `{tag}`" if tag else ""),
        "Params": f"{num_params / 1e6:.2f}M ({num_params:,})" if num_params else None,
        "Image size": "224 x 224 (bicubic resize, crop_pct 0.875, ImageNet mean/std)",
        "Reported ImageNet-1k top-1": f"{top1:.1f}%" if top1 is not None else None,
        "Dataset": "ImageNet-1k",
        "Papers": "[Kolmogorov-Arnold Transformer](https://arxiv.org/abs/2409.10594)",
        "Original": _GITHUB,
        "Weights converted from": source,
    }
    usage = f"""Needs `pip install kat-timm` (it provides the model code; timm alone does not know KAT):

```python
import timm
import torch
import kat_timm  # registers the KAT models (and their rational-activation kernels) in timm

model = timm.create_model("{hub_name}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)

with torch.no_grad():
    logits = model(transform(img).unsqueeze(0))  # img: a PIL image
top5 = logits.softmax(-1).topk(5)
```

With Hugging Face transformers (`pip install kat-timm[hf]`), through its timm wrapper:

```python
import kat_timm  # first: transformers builds the model through timm, which must know KAT
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id or 'OWNER/REPO'}")
print(classifier("image.jpg"))
```

Without `import kat_timm`, transformers reports that the architecture is not supported by the installed timm:
upgrading timm does not help, importing kat_timm does.
"""
    card = {
        "tags": ["image-classification", "timm", "kat", "kolmogorov-arnold"],
        "license": "mit",
        "description": f"{title}, a Kolmogorov-Arnold Transformer (KAT) {origin} on ImageNet-1k. KAT is a Vision "
                       "Transformer whose MLPs are group-rational KANs: learnable rational functions P(x)/Q(x), shared "
                       "within groups of channels, around the first linear layer.",
        "details": {key: value for key, value in details.items() if value},
        "usage": usage,
        "comparison": "ImageNet-1k top-1 accuracy as reported by the authors with the released checkpoints (not "
                      "re-measured by the conversion).\n\n" + _comparison_table(model_name, tag) + "\n",
        "citation": _CITATION,
    }
    return generate_readme(card, full_name)


def hub_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a timm ``config.json`` dict that also loads in transformers' ``TimmWrapper``: its own arguments
    (``WRAPPER_OWN_ARGS``) only at the root, where timm reads them too."""
    fixed, model_args = dict(config), config.get("model_args") or {}
    if "num_classes" in model_args:
        fixed.setdefault("num_classes", model_args["num_classes"])
    model_args = {key: value for key, value in model_args.items() if key not in WRAPPER_OWN_ARGS}
    if model_args:
        fixed["model_args"] = model_args
    else:
        fixed.pop("model_args", None)
    return fixed


def save_hub_folder(model: torch.nn.Module, output_dir: PathLike,
                    safe_serialization: Union[bool, str] = "both") -> None:
    """Write a timm model as a Hub folder that timm and transformers both load: timm's ``save_for_hf``
    (``safe_serialization``: "both" files, or True: model.safetensors only), then ``fix_hub_folder``."""
    from timm.models import save_for_hf

    output_dir = Path(output_dir)
    check_hub_files(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(output_dir), safe_serialization=safe_serialization)
    fix_hub_folder(output_dir)


def check_hub_files(output_dir: PathLike, inputs: Optional[Mapping[str, Any]] = None) -> None:
    """Raise :class:`kat_timm.files.OutputPathError` where a file a Hub folder is written into (``OUTPUT_FILES``)
    is a device, FIFO, socket or folder, or one of ``inputs`` (``{what: path}``); symbolic links are written
    through."""
    for name in OUTPUT_FILES:
        output_target(Path(output_dir) / name, inputs)


def fix_hub_folder(folder: PathLike) -> bool:
    """Rewrite ``folder/config.json`` through ``hub_config``, atomically; returns whether it changed."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a timm Hub folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fixed = hub_config(config)
    if fixed == config:
        return False
    text = json.dumps(fixed, indent=2) + "\n"
    edit_atomically(config_path, lambda partial: Path(partial).write_text(text, encoding="utf-8"),
                    start_from_current=False)
    return True


@dataclasses.dataclass
class ConversionResult:
    """What ``convert_checkpoint`` wrote."""
    output_dir: Path
    model_name: str
    tag: str
    num_params: int
    num_classes: int
    source_key: str
    files: List[str]


def _prepare_output_dir(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"output path exists and is not a directory: {output_dir}")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not force:
            raise CheckpointError(f"output directory is not empty: {output_dir} (use --force to overwrite)")
        # Only what a conversion writes: a stale pytorch_model.bin next to a new model.safetensors would mislead.
        # A symbolic link stays (the new file is written through it, as every output is).
        for name in OUTPUT_FILES:
            if not (output_dir / name).is_symlink():
                (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def convert_checkpoint(checkpoint_path: PathLike, output_dir: PathLike, model_name: Optional[str] = None,
                       tag: Optional[str] = None, use_ema: Optional[bool] = None,
                       safe_serialization: Union[bool, str] = "both", force: bool = False,
                       repo_id: Optional[str] = None, verify: bool = True) -> ConversionResult:
    """Convert a KAT checkpoint into a Hub-ready folder (README, "Deployment"). ``model_name`` (with an optional tag,
    which ``tag`` overrides) is inferred from the shapes when None; ``force`` replaces only the files a conversion
    writes; ``verify`` reloads the folder and checks every tensor. The checkpoint must fit exactly but for the
    classifier, whose width sets the number of classes."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if safe_serialization not in ("both", True):
        raise CheckpointError(f"safe_serialization must be 'both' or True, not {safe_serialization!r}")
    checkpoint_path = Path(checkpoint_path)
    output_dir = Path(output_dir)
    if output_dir.resolve() == checkpoint_path.parent.resolve():
        raise CheckpointError("the output directory must not be the checkpoint's own directory")
    if output_dir.is_dir():  # before the checkpoint is read: a device, FIFO or the input among the files to write
        try:
            check_hub_files(output_dir, {"checkpoint": checkpoint_path})
        except OutputPathError as error:
            raise CheckpointError(str(error)) from None
    state_dict, source_key = unwrap_state_dict(load_checkpoint(checkpoint_path), use_ema=use_ema)
    check_kat_state_dict(state_dict)
    check_finite(state_dict, checkpoint_path)

    if model_name is None:
        model_name = infer_architecture(state_dict)
    arch, name_tag = split_model_name_tag(model_name)
    tag = name_tag if tag is None else tag
    if not arch.startswith("kat_") or not timm.is_model(arch):
        known = ", ".join(n for n in timm.list_models("kat_*") if "patch16" in n)
        raise CheckpointError(f"unknown model {arch!r}; KAT models: {known}")
    full_name = f"{arch}.{tag}" if tag else arch
    try:
        pretrained_cfg = get_pretrained_cfg(full_name, allow_unregistered=False)
    except RuntimeError as e:
        raise CheckpointError(f"{e} (known tags: '' and 'vitft' for the released models)") from e

    head = state_dict.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    kwargs = {} if num_classes == pretrained_cfg.num_classes else {"num_classes": num_classes}
    model = timm.create_model(full_name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint does not fit {full_name}: {e}") from e
    model.eval()

    _prepare_output_dir(output_dir, force)
    save_hub_folder(model, output_dir, safe_serialization=safe_serialization)
    num_params = sum(p.numel() for p in model.parameters())
    with open(checkpoint_path, "rb") as file:
        digest = sha_fileobj(file).hex()
    what = f"`{source_key}` of " if source_key else ""
    source = f"{what}`{checkpoint_path.name}` (sha256 `{digest[:16]}...`)"
    card = model_card(arch, tag, num_params, repo_id=repo_id or pretrained_cfg.hf_hub_id, source=source)
    edit_atomically(output_dir / "README.md", lambda partial: Path(partial).write_text(card, encoding="utf-8"),
                    start_from_current=False)

    if verify:
        reloaded = timm.create_model(f"local-dir:{output_dir}", pretrained=True).state_dict()
        expected = model.state_dict()
        bad = [k for k, v in expected.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
        if bad or set(reloaded) != set(expected):
            for name in OUTPUT_FILES:  # a folder that does not reload is not left for upload
                (output_dir / name).unlink(missing_ok=True)
            raise CheckpointError(f"verification failed: {output_dir} does not reload the weights exactly ({bad[:5]}); "
                                  "the files written were removed")
    files = sorted(p.name for p in output_dir.iterdir() if p.name in OUTPUT_FILES)
    return ConversionResult(output_dir, arch, tag, num_params, num_classes, source_key, files)
