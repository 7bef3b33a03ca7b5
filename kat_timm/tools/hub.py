"""Hub folders for KAT checkpoints: model cards, timm/transformers-loadable ``config.json``, checkpoint conversion
(README, "Deployment")."""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import timm
from huggingface_hub.utils.sha import sha_fileobj

from ..checkpoint import CheckpointError, check_kat_state_dict
from ..factory import LoadedCheckpoint, infer_architecture
from ..files import OutputPathError, edit_atomically, output_target
from ..models import RELEASED_TOP1

__all__ = ["ConversionResult", "PushError", "check_hub_files", "convert_checkpoint", "fix_hub_folder", "hub_config",
           "kat_num_params", "model_card", "push_folder", "released_top1", "run_model_card", "save_hub_folder"]

PathLike = Union[str, Path]

OUTPUT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "README.md")
# Arguments transformers' TimmWrapper passes to timm.create_model itself (num_classes from the config's root
# ``num_classes``): the same key in ``model_args`` makes it fail with "got multiple values for keyword argument".
WRAPPER_OWN_ARGS = ("num_classes", "pretrained")
# Arguments that say how a model was built here, not what it is: a folder's model built with weight_init="skip" would
# hold uninitialised tensors wherever it is created without its weights.
RUNTIME_ARGS = ("weight_init", "pretrained_cfg_overlay")

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


def _transformers_usage(model: Any) -> str:
    """The model cards' transformers snippet: the image-classification pipeline of ``model`` (a repo id or folder)."""
    return f"""With Hugging Face transformers (`pip install kat-timm[hf]`), through its timm wrapper:

```python
import kat_timm  # first: transformers builds the model through timm, which must know KAT
from transformers import pipeline

classifier = pipeline("image-classification", model="{model}")
print(classifier("image.jpg"))
```
"""


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

{_transformers_usage(repo_id or 'OWNER/REPO')}
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
    (``WRAPPER_OWN_ARGS``) only at the root, where timm reads them too, and no build-time ``RUNTIME_ARGS``."""
    fixed, model_args = dict(config), config.get("model_args") or {}
    if "num_classes" in model_args:
        fixed.setdefault("num_classes", model_args["num_classes"])
    model_args = {key: value for key, value in model_args.items() if key not in WRAPPER_OWN_ARGS + RUNTIME_ARGS}
    if model_args:
        fixed["model_args"] = model_args
    else:
        fixed.pop("model_args", None)
    return fixed


def save_hub_folder(model: torch.nn.Module, output_dir: PathLike, safe_serialization: Union[bool, str] = "both",
                    model_config: Optional[Dict[str, Any]] = None) -> None:
    """Write a timm model as a Hub folder that timm and transformers both load: timm's ``save_for_hf``
    (``safe_serialization``: "both" files, or True: model.safetensors only; ``model_config``: extra config.json
    entries, e.g. ``label_names``), then ``fix_hub_folder``."""
    from timm.models import save_for_hf

    output_dir = Path(output_dir)
    check_hub_files(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(output_dir), model_config=model_config, safe_serialization=safe_serialization)
    fix_hub_folder(output_dir)
    _match_file_mode(output_dir / "model.safetensors", output_dir / "config.json")


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
    label_names: Optional[Tuple[str, ...]] = None
    img_size: Optional[Tuple[int, int]] = None
    released: bool = False  # the card reports the released checkpoint's ImageNet result


def _prepare_output_dir(output_dir: Path, force: bool) -> None:
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "exists and is not a folder" if existing == output_dir.absolute() else f"is under {existing}, a file"
        raise CheckpointError(f"cannot write the output folder {output_dir}: it {what}")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not force:
            raise CheckpointError(f"output directory is not empty: {output_dir} (use --force to overwrite)")
        # Only what a conversion writes: a stale pytorch_model.bin next to a new model.safetensors would mislead.
        # A symbolic link stays (the new file is written through it, as every output is).
        for name in OUTPUT_FILES:
            if not (output_dir / name).is_symlink():
                (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def _match_file_mode(path: Path, like: Path) -> None:
    """safetensors writes its file owner-only (0600) where torch.save and json follow the umask (0644): a folder to
    upload or share gets one mode for all its files."""
    if path.is_file() and like.is_file():
        path.chmod(like.stat().st_mode & 0o777)


def _is_released(loaded: LoadedCheckpoint, arch: str, tag: str, num_classes: int,
                 img_size: Optional[Tuple[int, int]]) -> bool:
    """Whether the card may report the released checkpoint's ImageNet result: only for a file in the released format
    (a bare state dict with no training record) of a released architecture, with ImageNet's 1000 classes at 224 px.
    A fine-tuned run, another size or class count, and the *_gelu_* models never qualify."""
    return (not loaded.source and not loaded.args and num_classes == 1000 and img_size in (None, (224, 224))
            and released_top1(arch, tag) is not None)


def convert_checkpoint(checkpoint_path: PathLike, output_dir: PathLike, model_name: Optional[str] = None,
                       tag: Optional[str] = None, use_ema: Optional[bool] = None,
                       safe_serialization: Union[bool, str] = "both", force: bool = False,
                       repo_id: Optional[str] = None, verify: bool = True) -> ConversionResult:
    """Write a KAT checkpoint as a Hub folder (README, "Publish"): what timm's ``save_for_hf`` writes (weights,
    config.json with the image size and model arguments) plus the class names a kat-train run recorded
    (``label_names``, which timm puts in the pretrained cfg and transformers turns into ``id2label``), and a model
    card built from what the checkpoint and its run folder (args, summary.csv) record.

    Any checkpoint kat-train or timm's train.py writes, or a released file, at any image size and class count: the
    architecture and its arguments come from the checkpoint (``model_name``, optionally with a tag that ``tag``
    overrides, must match it). ``use_ema``: None: its EMA weights where it has them (the rule of every command),
    True: those or an error, False: the raw model weights. ``force`` replaces only the files a conversion writes;
    ``verify`` reloads the folder and checks every tensor."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    from ..factory import create_model, read_checkpoint

    if safe_serialization not in ("both", True):
        raise CheckpointError(f"safe_serialization must be 'both' or True, not {safe_serialization!r}")
    checkpoint_path = Path(checkpoint_path)
    output_dir = Path(output_dir)
    if output_dir.resolve() == checkpoint_path.parent.resolve():
        raise CheckpointError(f"the output folder {output_dir} is the folder the checkpoint {checkpoint_path.name} is "
                              "in; give a new or empty folder")
    if output_dir.is_dir():  # before the checkpoint is read: a device, FIFO or the input among the files to write
        try:
            check_hub_files(output_dir, {"checkpoint": checkpoint_path})
        except OutputPathError as error:
            raise CheckpointError(str(error)) from None
    loaded = read_checkpoint(checkpoint_path, use_ema=use_ema)
    check_kat_state_dict(loaded.state_dict)  # (create_model below refuses non-finite weights)

    name = model_name or loaded.architecture or infer_architecture(loaded.state_dict)  # the last one explains
    arch, name_tag = split_model_name_tag(name)
    fine_tuned = bool(loaded.args)  # a training run's tag names where it started, not these weights
    tag = tag if tag is not None else ("" if fine_tuned and model_name is None else name_tag)
    if not arch.startswith("kat_") or not timm.is_model(arch):
        known = ", ".join(n for n in timm.list_models("kat_*") if "patch16" in n)
        raise CheckpointError(f"unknown model {arch!r}; KAT models: {known}")
    full_name = f"{arch}.{tag}" if tag else arch
    try:
        get_pretrained_cfg(full_name, allow_unregistered=False)
    except RuntimeError as e:
        raise CheckpointError(f"{e} (known tags: '' and 'vitft' for the released models)") from e

    model = create_model(full_name, checkpoint=loaded).eval()  # the recorded size, classes and model arguments
    num_classes = int(model.num_classes)
    labels = tuple((model.pretrained_cfg or {}).get("label_names") or ()) or None
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    img_size = tuple(int(side) for side in built) if built is not None else None
    released = _is_released(loaded, arch, tag, num_classes, img_size)

    _prepare_output_dir(output_dir, force)
    save_hub_folder(model, output_dir, safe_serialization=safe_serialization,
                    model_config={"label_names": list(labels)} if labels else None)
    num_params = sum(p.numel() for p in model.parameters())
    with open(checkpoint_path, "rb") as file:
        digest = sha_fileobj(file).hex()
    what = f"`{loaded.source}` of " if loaded.source else ""
    source = f"{what}`{checkpoint_path.name}` (sha256 `{digest[:16]}...`)"
    if released:
        registered = get_pretrained_cfg(full_name).hf_hub_id
        card = model_card(arch, tag, num_params, repo_id=repo_id or registered, source=source)
    else:
        card = run_model_card(loaded, arch, num_params, num_classes, labels, img_size, output_dir, repo_id, source)
    edit_atomically(output_dir / "README.md", lambda partial: Path(partial).write_text(card, encoding="utf-8"),
                    start_from_current=False)

    if verify:
        reloaded = timm.create_model(f"local-dir:{output_dir}", pretrained=True).state_dict()
        expected = model.state_dict()
        bad = [k for k, v in expected.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
        if bad or set(reloaded) != set(expected):
            for file_name in OUTPUT_FILES:  # a folder that does not reload is not left for upload
                (output_dir / file_name).unlink(missing_ok=True)
            raise CheckpointError(f"verification failed: {output_dir} does not reload the weights exactly ({bad[:5]}); "
                                  "the files written were removed")
    files = sorted(p.name for p in output_dir.iterdir() if p.name in OUTPUT_FILES)
    return ConversionResult(output_dir, arch, tag, num_params, num_classes, loaded.source, files, labels, img_size,
                            released)


def _base_model(args: Mapping[str, Any]) -> Optional[str]:
    """Where a training run started, in words, from its recorded options; None when it records nothing."""
    if not any(key in args for key in ("pretrained", "pretrained_path", "initial_checkpoint")):
        return None  # a record without the options that say it (not kat-train's or timm train.py's)
    if args.get("pretrained_path"):
        return f"the weights in `{Path(str(args['pretrained_path'])).name}` (--pretrained-path)"
    if args.get("initial_checkpoint"):
        return f"the checkpoint `{Path(str(args['initial_checkpoint'])).name}` (--initial-checkpoint)"
    if args.get("pretrained"):
        return f"the released weights of `{args.get('model')}`"
    return "random initialisation (trained from scratch)"


def _metrics(rows: List[Dict[str, float]], epoch: Any = None) -> Dict[str, str]:
    """The card's training results from summary.csv rows: epochs, and the last and best evaluation (top-1/top-5 of
    the run's own validation split; the EMA's too where the run had one) of the training the weights had: up to the
    checkpoint's ``epoch`` (a run goes on after model_best or checkpoint-N is saved), and for an epoch a resumed run
    repeated, its later row."""
    by_epoch = {int(row["epoch"]): row for row in rows}  # the later row of a repeated epoch
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        by_epoch = {number: row for number, row in by_epoch.items() if number <= epoch}
    rows = [by_epoch[number] for number in sorted(by_epoch)]
    if not rows:
        return {}
    found = {"Epochs trained": f"{len(rows)} (epochs {int(rows[0]['epoch'])}-{int(rows[-1]['epoch'])}, summary.csv)"}
    for prefix, label in (("eval_", ""), ("eval_ema_", "EMA weights, ")):
        scored = [row for row in rows if prefix + "top1" in row]
        if not scored:
            continue
        last, best = scored[-1], max(scored, key=lambda row: row[prefix + "top1"])
        for title, row in (("Final", last), ("Best", best)):
            top5 = f", top-5 {row[prefix + 'top5']:.2f}%" if prefix + "top5" in row else ""
            found[f"{title} validation ({label}epoch {int(row['epoch'])})"] = f"top-1 {row[prefix + 'top1']:.2f}%{top5}"
    return found


def run_model_card(loaded: LoadedCheckpoint, arch: str, num_params: int, num_classes: int,
                   label_names: Optional[Tuple[str, ...]], img_size: Optional[Tuple[int, int]], output_dir: Path,
                   repo_id: Optional[str], source: str) -> str:
    """README.md of a KAT that is not a released checkpoint (a fine-tuned or trained run, another class count or
    size): what the checkpoint and its run folder record, usage with ``repo_id`` (or the local folder), and no
    ImageNet result, which these weights never had measured."""
    from timm.models._hub import generate_readme

    from ..training.summary import run_summary

    args = loaded.args
    title = _SIZE_TITLES.get(_size_of(arch), "KAT")
    data_dir = args.get("data_dir") or args.get("data")
    dataset = f"`{Path(str(data_dir)).name}`" if data_dir else None
    if dataset and args.get("dataset"):
        dataset += f" (reader `{args['dataset']}`)"
    shown = ", ".join(f"`{name}`" for name in (label_names or ())[:20])
    more = f" and {len(label_names) - 20} more" if label_names and len(label_names) > 20 else ""
    base = _base_model(args)
    if base is None:
        origin = "The checkpoint does not record where its training started, so that is not stated here."
    else:
        origin = f"Started from {base}" + (f", trained on the dataset folder {dataset}" if dataset else "") + "."
    details = {
        "Model Type": f"image classification ({title}, {num_classes} classes)",
        "Architecture": f"`{arch}`",
        "Params": f"{num_params / 1e6:.2f}M ({num_params:,})",
        "Image size": f"{img_size[0]} x {img_size[1]}" if img_size else None,
        "Classes": f"{num_classes}" + (f": {shown}{more}" if shown else " (no class names recorded)"),
        "Training data": dataset,
        "Started from": base,
        **_metrics(run_summary(loaded.path) if args else [], loaded.raw.get("epoch")),
        "Papers": "[Kolmogorov-Arnold Transformer](https://arxiv.org/abs/2409.10594)",
        "Model code": _GITHUB,
        "Weights converted from": source,
    }
    folder = output_dir.resolve()
    timm_name = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"
    usage = f"""Needs `pip install kat-timm` (it provides the model code; timm alone does not know KAT):

```python
import timm
import torch
import kat_timm  # registers the KAT models (and their rational-activation kernels) in timm

model = timm.create_model("{timm_name}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
labels = model.pretrained_cfg.get("label_names")

with torch.no_grad():
    probabilities = model(transform(img).unsqueeze(0)).softmax(-1)  # img: a PIL image
```

{_transformers_usage(repo_id or folder)}
From the command line: `kat-timm predict image.jpg --model {timm_name}`.
"""
    card = {
        "tags": ["image-classification", "timm", "kat", "kolmogorov-arnold"],
        "license": "mit",
        "description": f"A {title} (Kolmogorov-Arnold Transformer) image classifier for {num_classes} classes. "
                       f"{origin} KAT is a Vision Transformer whose MLPs are group-rational KANs: learnable rational "
                       "functions P(x)/Q(x), shared within groups of channels, around the first linear layer. The "
                       "results below are the training run's own validation scores (none was measured otherwise).",
        "details": {key: value for key, value in details.items() if value},
        "usage": usage,
        "citation": _CITATION,
    }
    return generate_readme(card, repo_id or folder.name)


class PushError(RuntimeError):
    """An upload to the Hugging Face Hub that could not be made (offline mode, no login, refused)."""


def push_folder(folder: PathLike, repo_id: str, private: Optional[bool] = None) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing) with huggingface_hub; its token comes
    from ``HF_TOKEN`` or ``hf auth login``. Returns the commit's URL; ``PushError`` says why it could not."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise PushError(f"cannot upload to {repo_id}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE); "
                        f"unset it, or upload {folder} later with 'hf upload {repo_id} {folder}'")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload a KAT model published with kat-timm")
    except Exception as error:  # huggingface_hub's HTTP, auth and validation errors: one line, no traceback
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = (" (log in with 'hf auth login' or set HF_TOKEN to a token with write access)"
                if "401" in first or "403" in first or "token" in first.lower() else "")
        raise PushError(f"cannot upload to {repo_id}: {type(error).__name__}: {first}{hint}") from error
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
