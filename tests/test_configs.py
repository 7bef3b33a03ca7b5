"""The training recipes in configs/.

- Every key is an argument of timm's train.py and every value has the kind that argument takes (train.py's ``-c``
  passes the YAML to ``parser.set_defaults``, which accepts unknown keys silently and converts nothing), checked
  against the dests recorded in tests/data/timm_train_flags.txt; with ``TIMM_TRAIN_PY=/path/to/train.py``, also
  against timm's real parser.
- Every config parses with our ``kat-train`` parser.
- The values are the released recipe (scratch and .vitft), and the transfer recipe is what configs/README.md says.
- The checkpoint routes configs/README.md documents really load into a KAT, through the calls train.py makes:
  ``create_model(..., checkpoint_path=initial_checkpoint)`` (= ``timm.models.load_checkpoint``) and
  ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_path, num_classes=-1))``.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Dict
from unittest import mock

import pytest
import safetensors.torch
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2, optimizer_kwargs

from kat_timm.cli.train import parse_args as kat_train_parse_args
from kat_timm.models import KAT
from tests.helpers import relative_error
from tests.helpers import save_vit_as_npz

REPO = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO / "configs"
FLAGS_FILE = Path(__file__).parent / "data" / "timm_train_flags.txt"
CONFIG_NAMES = [
    "kat_tiny", "kat_small", "kat_base",
    "kat_tiny_vitft", "kat_small_vitft", "kat_base_vitft",
    "kat_tiny_transfer",
]
CONFIGS = [CONFIGS_DIR / f"{name}.yaml" for name in CONFIG_NAMES]

# The released recipe (Adamdad/kat scripts/train_kat_*_8x128*.sh): 8 processes x 128 images.
PROCESSES = 8
GLOBAL_BATCH = 1024
RELEASED_RECIPE = {
    "batch_size": 128, "epochs": 300, "opt": "adamw", "lr": 1e-3, "weight_decay": 0.05, "sched": "cosine",
    "warmup_epochs": 5, "warmup_lr": 1e-5, "min_lr": 0.0, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
    "aa": "rand-m9-mstd0.5", "reprob": 0.25, "remode": "pixel", "crop_pct": 0.875,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "amp": True, "model_ema": True, "model_ema_decay": 0.9999,
}
DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.4}
# The AugReg checkpoints the authors' .vitft runs started from, by timm's name for the same weights.
AUGREG_VIT = {
    "tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "small": "vit_small_patch16_224.augreg_in21k",
    "base": "vit_base_patch16_224.augreg_in21k",
}

KIND_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "kwargs": lambda v: isinstance(v, dict),
}


def load_config(path: Path) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    assert isinstance(config, dict), f"{path.name}: not a YAML mapping"
    return config


def timm_train_flags() -> Dict[str, str]:
    """{dest: kind} recorded from timm's train.py."""
    flags = {}
    for line in FLAGS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            dest, kind = line.split()
            assert dest not in flags, f"{FLAGS_FILE.name}: {dest} listed twice"
            flags[dest] = kind
    return flags


def value_fits(kind: str, value: Any) -> bool:
    """Whether a YAML value is what an argument of this kind holds after parsing (None: unset, always fits)."""
    if value is None:
        return True
    if kind.endswith("+"):
        return isinstance(value, list) and len(value) > 0 and all(KIND_CHECKS[kind[:-1]](v) for v in value)
    if "*" in kind:
        item, count = kind.split("*")
        return isinstance(value, list) and len(value) == int(count) and all(KIND_CHECKS[item](v) for v in value)
    return KIND_CHECKS[kind](value)


def kind_of_action(action: argparse.Action) -> str:
    """The kind (as in timm_train_flags.txt) of an argparse argument."""
    if isinstance(action, argparse._StoreTrueAction):
        return "bool"
    if action.nargs == "*":  # timm's ParseKwargs (--model-kwargs, --opt-kwargs)
        return "kwargs"
    item = {None: "str", str: "str", int: "int", float: "float"}.get(action.type, repr(action.type))
    if action.nargs == "+":
        return item + "+"
    if isinstance(action.nargs, int):
        return f"{item}*{action.nargs}"
    return item


def config_problems(config: Dict[str, Any], flags: Dict[str, str]) -> list:
    problems = []
    for key, value in config.items():
        if key not in flags:
            problems.append(f"{key}: not an argument of timm's train.py")
        elif not value_fits(flags[key], value):
            problems.append(f"{key}: {value!r} ({type(value).__name__}) is not a {flags[key]}")
    return problems


def test_the_configs_are_all_here():
    assert sorted(CONFIGS_DIR.glob("*.yaml")) == sorted(CONFIGS)


def test_flags_file_is_well_formed():
    flags = timm_train_flags()
    assert len(flags) > 100
    for dest, kind in flags.items():
        assert kind.rstrip("+").split("*")[0] in KIND_CHECKS, f"{dest}: unknown kind {kind}"
    for dest in ("device_modules", "initial_checkpoint", "pretrained_path", "layer_decay", "grad_checkpointing",
                 "torchcompile", "model_ema_decay", "grad_accum_steps", "lr_base", "lr_base_size"):
        assert dest in flags, dest


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_NAMES)
def test_config_keys_are_timm_train_arguments_of_the_right_kind(path):
    assert config_problems(load_config(path), timm_train_flags()) == []


def test_the_kind_check_catches_yaml_pitfalls():
    """YAML 1.1 reads 1e-3 as a string and 'yes' as a bool; a typo'd key would be silently ignored by train.py."""
    flags = timm_train_flags()
    config = yaml.safe_load("lr: 1e-3\nepochs: yes\nmean: 0.5\ninput_size: [3, 224]\nmodel_emma: true\namp: 1\n")
    problems = config_problems(config, flags)
    assert [p.split(":")[0] for p in problems] == ["lr", "epochs", "mean", "input_size", "model_emma", "amp"]
    assert config_problems(yaml.safe_load("lr: 1.0e-3\nmean: [0.5]\nmodel_kwargs: {img_size: 32}"), flags) == []


def parse_with_train_py(train_py: Path, config: Path) -> argparse.Namespace:
    """The arguments a timm-style train.py parses from ``-c config``, through its own ``_parse_args``.

    The script is imported afresh for every config (its parsers are module globals and ``-c`` changes their
    defaults); its ``main`` is not run.
    """
    spec = importlib.util.spec_from_file_location(f"_train_py_{next(_imports)}", train_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "_parse_args") and hasattr(module, "parser"), f"{train_py}: not a timm train.py"
    with mock.patch.object(sys, "argv", [str(train_py), "-c", str(config), "DATA"]):
        parsed = module._parse_args()
    args = parsed[0] if isinstance(parsed, tuple) else parsed  # (args, args_text) in timm >= 0.6
    args.parser_actions = {action.dest: action for action in module.parser._actions}
    return args


_imports = itertools.count()


def assert_parsed_as_written(args: argparse.Namespace, config: Dict[str, Any], name: str) -> None:
    for key, value in config.items():
        assert getattr(args, key) == value, f"{name}: {key} parsed as {getattr(args, key)!r}, written {value!r}"


# timm's wheel and its sdists (1.0.15 and 1.0.31 checked, 2026-12-02) ship no train.py: it lives only in the GitHub
# repository. Passed 2026-12-02 with the train.py of huggingface/pytorch-image-models aa4b5850 (1.0.29.dev0).
@pytest.mark.skipif(not os.environ.get("TIMM_TRAIN_PY"),
                    reason="set TIMM_TRAIN_PY to a checkout's train.py (timm's wheel and sdist ship none) to run this")
def test_configs_parse_with_timms_train_py():
    train_py = Path(os.environ["TIMM_TRAIN_PY"])
    assert train_py.is_file(), f"TIMM_TRAIN_PY={train_py}: no such file"
    for path in CONFIGS:
        config = load_config(path)
        args = parse_with_train_py(train_py, path)
        kinds = {dest: kind_of_action(action) for dest, action in args.parser_actions.items()}
        assert config_problems(config, kinds) == [], f"{path.name} against {train_py}"
        assert_parsed_as_written(args, config, path.name)
    recorded = {dest: kind for dest, kind in timm_train_flags().items() if dest in kinds}
    assert {dest: kinds[dest] for dest in recorded} == recorded, f"{FLAGS_FILE.name} disagrees with {train_py}"


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_NAMES)
def test_configs_parse_with_kat_train(path):
    config = load_config(path)
    args = kat_train_parse_args(["-c", str(path), "--data-dir", "DATA"])
    assert_parsed_as_written(args, config, path.name)
    # The command line still overrides the config, as in timm.
    assert kat_train_parse_args(["-c", str(path), "--lr", "0.0005"]).lr == 5e-4


@pytest.mark.parametrize("size", DROP_PATH)
def test_scratch_and_vitft_recipes_are_the_released_ones(size):
    scratch = load_config(CONFIGS_DIR / f"kat_{size}.yaml")
    assert scratch == dict(RELEASED_RECIPE, model=f"kat_{size}_patch16_224", drop_path=DROP_PATH[size])
    assert scratch["batch_size"] * PROCESSES == GLOBAL_BATCH

    vitft = load_config(CONFIGS_DIR / f"kat_{size}_vitft.yaml")
    checkpoint = vitft.pop("initial_checkpoint")
    assert vitft == scratch, "the .vitft recipe is the scratch recipe plus the ViT checkpoint"
    # The file named is the one timm itself knows for these AugReg weights (the download URL in the README).
    url = timm.models.get_pretrained_cfg(AUGREG_VIT[size]).url
    assert url.startswith("https://storage.googleapis.com/vit_models/augreg/")
    assert checkpoint == "checkpoints/" + url.rsplit("/", 1)[1]


def create_model_like_train_py(config: Dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """``timm.create_model`` called as timm's train.py calls it with these arguments (its defaults elsewhere)."""
    args = dict(config, **overrides)
    factory_kwargs = {}
    if args.get("pretrained_path"):
        factory_kwargs["pretrained_cfg_overlay"] = dict(file=args["pretrained_path"], num_classes=-1)
    return timm.create_model(
        args["model"],
        pretrained=args.get("pretrained", False),
        in_chans=3,
        num_classes=args.get("num_classes"),
        drop_rate=args.get("drop", 0.0),
        drop_path_rate=args.get("drop_path"),
        drop_block_rate=None,
        global_pool=None,
        bn_momentum=None,
        bn_eps=None,
        scriptable=False,
        checkpoint_path=args.get("initial_checkpoint", ""),
        **factory_kwargs,
        **args.get("model_kwargs", {}),
    )


def pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


SMALL = dict(img_size=32)  # the test models: 2 x 2 patches, so building and running them is quick


@pytest.fixture
def vit_21k_like(single_thread) -> torch.nn.Module:
    """A random ViT-Ti in the layout of an AugReg ImageNet-21k checkpoint: another class count than the KAT's."""
    return timm.create_model("vit_tiny_patch16_224", num_classes=21, **SMALL).eval()


def test_vitft_recipe_loads_an_augreg_npz(tmp_path, vit_21k_like):
    """The configs' route: --initial-checkpoint X.npz. The shared weights load (the 21k head does not: its class
    count differs) and the KAT starts as the ViT's function."""
    path = tmp_path / "augreg.npz"
    save_vit_as_npz(vit_21k_like, path)
    config = load_config(CONFIGS_DIR / "kat_small_vitft.yaml")
    model = create_model_like_train_py(config, model="kat_tiny_patch16_224", initial_checkpoint=str(path),
                                       model_kwargs=SMALL).eval()
    assert isinstance(model, KAT) and model.num_classes == 1000
    assert torch.equal(model.blocks[5].mlp.fc1.weight, vit_21k_like.blocks[5].mlp.fc1.weight)
    x = torch.randn(2, 3, 32, 32)
    assert relative_error(pre_logits(model, x), pre_logits(vit_21k_like, x)) <= 1e-2


def test_vit_state_dict_with_another_head_needs_pretrained_path(tmp_path, vit_21k_like):
    """A timm-layout ViT file (e.g. timm/vit_small_patch16_224.augreg_in21k's model.safetensors): --initial-checkpoint
    loads strictly, so a head of another size is an error naming it; --pretrained --pretrained-path replaces the
    head and keeps the rest."""
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(vit_21k_like.state_dict(), str(path))
    config = dict(model="kat_tiny_patch16_224", model_kwargs=SMALL)
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.weight"):
        create_model_like_train_py(config, initial_checkpoint=str(path))
    model = create_model_like_train_py(config, pretrained=True, pretrained_path=str(path)).eval()
    assert model.num_classes == 1000
    x = torch.randn(2, 3, 32, 32)
    assert relative_error(pre_logits(model, x), pre_logits(vit_21k_like, x)) <= 1e-2
    # The same file with a matching head loads through --initial-checkpoint, head included.
    vit = timm.create_model("vit_tiny_patch16_224", **SMALL).eval()
    safetensors.torch.save_file(vit.state_dict(), str(path))
    model = create_model_like_train_py(config, initial_checkpoint=str(path)).eval()
    with torch.no_grad():
        assert relative_error(model(x), vit(x)) <= 1e-2


def test_pretrained_path_does_not_read_npz(tmp_path, vit_21k_like):
    """Why the configs use --initial-checkpoint for the AugReg .npz files: --pretrained-path reads a torch or
    safetensors file only."""
    path = tmp_path / "augreg.npz"
    save_vit_as_npz(vit_21k_like, path)
    with pytest.raises(RuntimeError):
        create_model_like_train_py(dict(model="kat_tiny_patch16_224", model_kwargs=SMALL),
                                   pretrained=True, pretrained_path=str(path))


def test_transfer_recipe_comments_say_what_kat_train_does():
    """Issue 22, item 11: the comment said another img_size also needs model_kwargs, which is timm's train.py only
    (kat-train builds the model for --img-size, as the README says); and how to change the class count."""
    text = (CONFIGS_DIR / "kat_tiny_transfer.yaml").read_text()
    lines = [line for line in text.splitlines() if "model_kwargs" in line]
    assert lines and all("timm's train.py" in line for line in lines), lines
    assert "kat-train builds the model for another" in text
    assert "--num-classes N (N = your number of class folders; it overrides num_classes below)" in text


def test_transfer_recipe(released_hub, kat_tiny_weights, single_thread):
    """The released KAT-T with a new 10-class head, and timm's optimizer factory given the recipe's arguments:
    layer-wise lr decay over the KAT's blocks, rational coefficients not decayed."""
    config = load_config(CONFIGS_DIR / "kat_tiny_transfer.yaml")
    assert (config["pretrained"], config["num_classes"], config["layer_decay"]) == (True, 10, 0.75)
    assert config["batch_size"] == 64 and config["epochs"] == 30 and config["model_ema"] is False
    assert config["lr"] == pytest.approx(5e-4 * 64 / 256)
    model = create_model_like_train_py(config)
    assert isinstance(model, KAT) and model.head.out_features == 10
    released = kat_tiny_weights["scratch"]
    assert torch.equal(model.blocks[3].mlp.act2.weight_denominator, released["blocks.3.mlp.act2.weight_denominator"])
    assert torch.equal(model.blocks[3].attn.qkv.weight, released["blocks.3.attn.qkv.weight"])

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=argparse.Namespace(momentum=0.9, **config)))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: group for group in optimizer.param_groups for p in group["params"]}
    assert groups["head.weight"]["lr_scale"] == 1.0
    assert groups["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75)
    assert groups["blocks.0.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75 ** 12)
    assert groups["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** 13)
    rationals = [n for n in groups if n.endswith(("weight_numerator", "weight_denominator"))]
    assert len(rationals) == 48 and all(groups[n]["weight_decay"] == 0.0 for n in rationals)
    assert groups["blocks.0.mlp.fc1.weight"]["weight_decay"] == 0.05


def test_scratch_recipe_trains_a_kat_through_timms_components(single_thread):
    """One step of what timm's train.py builds from kat_tiny.yaml (plus --grad-checkpointing): timm's optimizer,
    scheduler, Mixup/CutMix with smoothing, soft-target loss, autocast and ModelEmaV3 on a (small) KAT."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3

    config = load_config(CONFIGS_DIR / "kat_tiny.yaml")
    args = argparse.Namespace(momentum=0.9, **config)
    model = create_model_like_train_py(config, model_kwargs=SMALL)
    model.set_grad_checkpointing(True)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=10)
    assert epochs == 300
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # warmup starts at warmup_lr
    scheduler.step(5)
    # The peak after 5 warmup epochs (the cosine counts from epoch 0, so it has decayed by ~7e-4 relative).
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-3)
    ema = ModelEmaV3(model, decay=config["model_ema_decay"])
    mixup = Mixup(mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"], label_smoothing=config["smoothing"],
                  num_classes=model.num_classes)

    def train_step(step: int) -> None:
        images, targets = mixup(torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = SoftTargetCrossEntropy()(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        optimizer.step()
        ema.update(model, step=step)  # as train.py: step = optimizer updates so far (the first one copies)

    denominator = model.blocks[0].mlp.act2.weight_denominator
    before = denominator.detach().clone()
    train_step(1)
    assert not torch.equal(denominator, before), "the rational coefficients learn"
    ema_before = ema.module.blocks[0].mlp.act2.weight_denominator.clone()
    train_step(2)
    expected_ema = ema_before * 0.9999 + denominator.detach() * 1e-4
    assert torch.allclose(ema.module.blocks[0].mlp.act2.weight_denominator, expected_ema, rtol=0, atol=1e-7)
