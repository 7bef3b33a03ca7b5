"""``kat-train`` (also ``kat-timm train``): train or fine-tune any timm model, KAT included, on an ImageFolder.

For people without a timm checkout: the options keep the names of timm's ``train.py`` (``--batch-size``, ``--opt``,
``--mixup``, ``--model-ema`` ...) and ``-c/--config FILE.yaml`` works as it does there (the YAML keys are option
names with ``_`` for ``-``; they become the defaults, and options given on the command line override them).
Everything is built from timm's library: dataset and loader, Mixup, optimizer and scheduler factories, ModelEmaV3,
CheckpointSaver, resume_checkpoint, init_distributed_device, its losses. What is ours: checking the data before
anything starts, checkpoints that are never half-written, clear errors, and a progress bar.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Dict, List, Optional

from . import CLIError, run_main

__all__ = ["build_parser", "main", "parse_args"]

DEFAULT_MODEL = "kat_tiny_patch16_224"

# Options of timm's train.py that kat-train does not offer; a config naming one gets an error that says so.
TIMM_ONLY_OPTIONS = frozenset({
    "dataset", "dataset_download", "epoch_repeats", "in_chans", "drop_connect", "drop_block", "bn_momentum",
    "bn_eps", "split_bn", "aug_splits", "jsd_loss", "resplit", "torchscript", "fuser", "fast_norm", "amp_impl",
    "apex_amp", "native_amp", "no_ddp_bb", "synchronize_step", "no_prefetcher", "prefetcher", "save_images",
    "tta", "log_wandb", "model_ema_force_cpu", "head_init_scale", "head_init_bias", "dist_url",
    # values timm's train.py computes and writes into its args.yaml; they are not options
    "distributed", "world_size", "rank", "num_aug_splits",
})


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", metavar="DIR", default=None,
                        help="the dataset folder (timm's older positional form of --data-dir)")
    group = parser.add_argument_group("data (an ImageFolder: DATA_DIR/SPLIT/CLASS/IMAGE.png|jpg|jpeg)")
    group.add_argument("--data-dir", metavar="DIR", default=None,
                       help="dataset root holding the --train-split and --val-split folders")
    group.add_argument("--train-split", metavar="NAME", default="train",
                       help="training split folder (default: train; 'training' is also found)")
    group.add_argument("--val-split", metavar="NAME", default="validation",
                       help="validation split folder (default: validation; also found as val, valid, eval, "
                            "evaluation). An empty string skips evaluation.")
    group.add_argument("--class-map", metavar="FILE", default="",
                       help="text file of class folder names, one per line, in label order (default: the sorted "
                            "folder names)")
    group.add_argument("--img-size", type=int, default=None, metavar="N",
                       help="image size. A model with a fixed input size (ViT, KAT) also gets img_size=N, so "
                            "its position embedding fits; pretrained position embeddings are resampled")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="full input size, e.g. 3 224 224 (default: the model's)")
    group.add_argument("--crop-pct", type=float, default=None, metavar="PCT",
                       help="centre crop fraction for evaluation (default: the model's)")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN",
                       help="normalisation mean per channel (default: the model's)")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD",
                       help="normalisation std per channel (default: the model's)")
    group.add_argument("--interpolation", default="", metavar="NAME",
                       help="resize interpolation for evaluation (default: the model's)")
    group.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                       help="batch size per process (default: 128)")
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                       help="evaluation batch size (default: --batch-size)")
    group.add_argument("-j", "--workers", type=int, default=4, metavar="N",
                       help="data loading processes per training process (default: 4; 0 loads in the main process)")
    group.add_argument("--pin-mem", action="store_true", help="pin CPU memory in the data loader")
    group.add_argument("--use-multi-epochs-loader", action="store_true",
                       help="keep the loader's worker processes across epochs")
    group.add_argument("--worker-seeding", default="all", metavar="MODE",
                       help="how loader workers are seeded (timm's 'all' or 'part'; default: all)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                       help=f"any timm model name, kat_* included, optionally with a .tag (default: {DEFAULT_MODEL})")
    group.add_argument("--pretrained", action="store_true",
                       help="start from the released weights (Hugging Face Hub or its local cache); a classifier of "
                            "another size is re-initialised")
    group.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="start from this file as if it were the released weights (implies --pretrained: "
                            "classifier and position embeddings are adapted)")
    group.add_argument("--initial-checkpoint", default="", metavar="FILE",
                       help="start from the weights in this file, loaded strictly (a training checkpoint or state "
                            "dict for exactly this model)")
    group.add_argument("--resume", default="", metavar="FILE",
                       help="continue a run from its checkpoint (e.g. OUTPUT/last.pth.tar): weights, optimizer, AMP "
                            "scaler, EMA, schedule and epoch")
    group.add_argument("--no-resume-opt", action="store_true",
                       help="with --resume: restore the weights and epoch but start a fresh optimizer")
    group.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help="classifier size (default: the number of class folders)")
    group.add_argument("--gp", default=None, metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    group.add_argument("--drop-path", type=float, default=None, metavar="PCT",
                       help="stochastic depth rate (default: the model's; the KAT recipe uses 0.1 for T/S, 0.4 for B)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=_KeywordArguments, metavar="KEY=VALUE",
                       help="extra keyword arguments for timm.create_model, e.g. act_init=swish")
    group.add_argument("--channels-last", action="store_true", help="use the channels_last memory layout")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in backward to save memory")
    group.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                       help="batches whose gradients are summed per optimizer step (default: 1)")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model (default backend when given: inductor)")
    group.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    group.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                       help="share BatchNorm statistics between processes after each epoch (default: reduce; no "
                            "effect on models without BatchNorm, such as KAT)")


def _add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", metavar="NAME",
                       help="any timm optimizer (default: adamw)")
    group.add_argument("--opt-eps", type=float, default=None, metavar="EPS")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="BETA")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.05, metavar="WD",
                       help="weight decay; 1-D tensors (biases, norms) are exempt (default: 0.05)")
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                       help="clip gradients to this norm (default: no clipping)")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"),
                       help="gradient clipping mode (default: norm)")
    group.add_argument("--layer-decay", type=float, default=None, metavar="RATE",
                       help="layer-wise learning-rate decay, e.g. 0.75 for fine-tuning (default: off)")
    group.add_argument("--opt-kwargs", nargs="*", default={}, action=_KeywordArguments, metavar="KEY=VALUE",
                       help="extra keyword arguments for the optimizer")


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--sched", default="cosine", metavar="NAME",
                       help="timm scheduler: cosine, tanh, step, multistep, plateau, poly (default: cosine)")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="step the schedule every optimizer update instead of every epoch")
    group.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="peak learning rate (default: --lr-base scaled by the global batch size)")
    group.add_argument("--lr-base", type=float, default=5e-4, metavar="LR",
                       help="learning rate at --lr-base-size images per step (default: 5e-4, i.e. the KAT/DeiT "
                            "recipe's 1e-3 at a global batch of 1024)")
    group.add_argument("--lr-base-size", type=int, default=512, metavar="N", help="(default: 512)")
    group.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt"),
                       help="how --lr-base scales with the global batch size (default: linear)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PCT")
    group.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STD")
    group.add_argument("--lr-cycle-mul", type=float, default=1.0, metavar="MULT")
    group.add_argument("--lr-cycle-decay", type=float, default=0.5, metavar="MULT")
    group.add_argument("--lr-cycle-limit", type=int, default=1, metavar="N")
    group.add_argument("--lr-k-decay", type=float, default=1.0, metavar="K")
    group.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR",
                       help="learning rate at the start of warmup (default: 1e-5)")
    group.add_argument("--min-lr", type=float, default=0.0, metavar="LR",
                       help="floor of the schedule (default: 0)")
    group.add_argument("--epochs", type=int, default=300, metavar="N", help="epochs to train (default: 300)")
    group.add_argument("--start-epoch", type=int, default=None, metavar="N",
                       help="first epoch (0-based; default: 0, or the one after the --resume checkpoint)")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH")
    group.add_argument("--decay-epochs", type=float, default=90, metavar="N")
    group.add_argument("--warmup-epochs", type=int, default=5, metavar="N",
                       help="epochs of linear warmup (default: 5)")
    group.add_argument("--warmup-prefix", action="store_true",
                       help="keep the warmup epochs out of the decay schedule")
    group.add_argument("--cooldown-epochs", type=int, default=0, metavar="N")
    group.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")


def _add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation at all")
    group.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT",
                       help="random-resized-crop area range (default: 0.08 1.0)")
    group.add_argument("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], metavar="RATIO",
                       help="random-resized-crop aspect range (default: 0.75 1.33)")
    group.add_argument("--hflip", type=float, default=0.5, metavar="P", help="horizontal flip probability")
    group.add_argument("--vflip", type=float, default=0.0, metavar="P", help="vertical flip probability")
    group.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT")
    group.add_argument("--aa", default=None, metavar="POLICY",
                       help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5 (the KAT recipe)")
    group.add_argument("--aug-repeats", type=float, default=0, metavar="N",
                       help="repeated augmentation count (distributed training only)")
    group.add_argument("--train-interpolation", default="random", metavar="NAME",
                       help="training resize interpolation (default: random)")
    group.add_argument("--reprob", type=float, default=0.0, metavar="P", help="random erasing probability")
    group.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"),
                       help="random erasing fill (default: pixel)")
    group.add_argument("--recount", type=int, default=1, metavar="N", help="random erasing count")
    group.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, metavar="RATIO")
    group.add_argument("--mixup-prob", type=float, default=1.0, metavar="P")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, metavar="P")
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    group.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                       help="turn mixup/cutmix off from this epoch (0: never)")
    group.add_argument("--smoothing", type=float, default=0.1, metavar="EPS",
                       help="label smoothing (default: 0.1)")
    group.add_argument("--bce-loss", action="store_true", help="binary cross-entropy instead of softmax CE")
    group.add_argument("--bce-target-thresh", type=float, default=None, metavar="T")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA")
    group.add_argument("--model-ema", action="store_true",
                       help="keep an exponential moving average of the weights (evaluated, saved, and the one the "
                            "best checkpoint is ranked by)")
    group.add_argument("--model-ema-decay", type=float, default=0.9998, metavar="D",
                       help="EMA decay (default: 0.9998; the KAT recipe uses 0.9999)")
    group.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up at the start")

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu or cuda (default: cuda when available, else cpu)")
    group.add_argument("--dist-backend", default=None, metavar="NAME",
                       help="torch.distributed backend under torchrun (default: nccl on cuda, gloo on cpu)")
    group.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                       help="autocast dtype (default: float16, with a gradient scaler on cuda)")
    group.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
    group.add_argument("--output", default="", metavar="DIR",
                       help="parent folder of the run folders (default: ./output/train)")
    group.add_argument("--experiment", default="", metavar="NAME",
                       help="run folder name (default: DATE-TIME-MODEL-SIZE)")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="metric that ranks the kept checkpoints (default: top1)")
    group.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                       help="keep the N best epoch checkpoints (default: 10)")
    group.add_argument("--log-interval", type=int, default=50, metavar="N",
                       help="steps between progress lines when the output is not a terminal (default: 50)")
    group.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                       help="also write a recovery checkpoint every N steps (default: 0, off)")


class _KeywordArguments(argparse.Action):
    """``KEY=VALUE ...`` into a dict, values read as Python literals where they parse (timm's convention)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        result = {}
        for item in values:
            if "=" not in item:
                parser.error(f"argument {option_string}: expected KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            try:
                result[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                result[key] = value
        setattr(namespace, self.dest, result)


_EPILOG = """\
Data layout: DATA_DIR/train/CLASS/*.png (or .jpg/.jpeg) and DATA_DIR/validation/CLASS/*.png, the same class folders
in both. The folders are checked before training: a missing folder, a split without class folders, class folders
without images and class sets that differ between the splits are errors. An image file that cannot be decoded is
skipped with a warning naming it (once per file and loader process) and another sample takes its place.

Output (OUTPUT/EXPERIMENT/): args.yaml (reusable with -c), summary.csv (one row per epoch), last.pth.tar,
checkpoint-EPOCH.pth.tar (the --checkpoint-hist best by --eval-metric), model_best.pth.tar. Checkpoints are written
to a temporary file and renamed, so a crash or kill never leaves a partial one. Epochs are numbered from 0, as in
timm.

Several GPUs or machines: torchrun --nproc_per_node=N -m kat_timm.cli.train ... (or the kat-train script under
torchrun); --batch-size is per process.
"""


def build_parser(prog: str = "kat-train") -> argparse.ArgumentParser:
    """The argument parser of ``kat-train`` (without ``-c/--config``, which ``parse_args`` handles first)."""
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [-c FILE.yaml] --data-dir DIR [--model NAME] [OPTIONS]",
        description=__doc__.strip().splitlines()[0], epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="", metavar="FILE.yaml",
                        help="YAML file of option defaults (keys: option names with _ for -, e.g. batch_size: 64); "
                             "command-line options override it")
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_optimizer_arguments(parser)
    _add_schedule_arguments(parser)
    _add_augmentation_arguments(parser)
    _add_run_arguments(parser)
    return parser


def _config_error(parser: argparse.ArgumentParser, message: str) -> None:
    """A config problem: one line ``<prog>: error: ...`` and exit code 2, like argparse's own errors."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _config_defaults(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config into ``{dest: value}``, checking every key and the type of every value."""
    import yaml

    if not os.path.isfile(path):
        _config_error(parser, f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        _config_error(parser, f"config {path}: not readable YAML: {str(error).splitlines()[0]}")
    if config is None:
        return {}
    if not isinstance(config, dict):
        _config_error(parser, f"config {path}: expected a mapping of option names to values, got {type(config).__name__}")

    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    for key, value in config.items():
        if not isinstance(key, str) or key not in actions:
            _config_error(parser, f"config {path}: {_unknown_key_message(key, actions)}")
        problem = _check_value(actions[key], value)
        if problem:
            _config_error(parser, f"config {path}: {key}: {problem}")
    return config


def _unknown_key_message(key: Any, actions: Dict[str, argparse.Action]) -> str:
    if key in TIMM_ONLY_OPTIONS:
        return (f"key {key!r} is a timm train.py option that kat-train does not support; remove it, or run timm's "
                f"own train.py with --device-modules kat_timm")
    hint = ""
    if isinstance(key, str):
        close = difflib.get_close_matches(key.replace("-", "_"), list(actions), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown key {key!r}{hint}; keys are kat-train option names with '_' for '-' "
            f"(e.g. batch_size for --batch-size), see kat-train --help")


def _check_value(action: argparse.Action, value: Any) -> Optional[str]:
    """Why ``value`` cannot stand for ``action``'s option, or None when it can.

    argparse converts string defaults with the option's type but leaves other defaults alone, so a YAML value of
    the wrong kind would otherwise pass silently.
    """
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if value is None:
        return None
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(action, _KeywordArguments):
        return None if isinstance(value, dict) else f"expected a mapping of keyword arguments, got {value!r}"
    items = value if takes_list and isinstance(value, list) else [value]
    if takes_list and not isinstance(value, list) and isinstance(action.nargs, int) and action.nargs > 1:
        return f"expected a list of {action.nargs} values, got {value!r}"
    for item in items:
        if action.type is int and not (isinstance(item, int) and not isinstance(item, bool)):
            if not (isinstance(item, str) and _parses(int, item)):
                return f"expected an integer, got {item!r}"
        elif action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            if not (isinstance(item, str) and _parses(float, item)):
                return f"expected a number, got {item!r}"
        if action.choices is not None and item not in action.choices:
            return f"expected one of {', '.join(map(repr, action.choices))}, got {item!r}"
    return None


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A checked YAML value in the type the option's own parser would produce (e.g. "1e-3" -> 0.001)."""
    if value is None or action.type not in (int, float):
        return value
    if isinstance(value, list):
        return [action.type(item) for item in value]
    return action.type(value)


def _parse_args(argv: List[str], prog: str) -> argparse.Namespace:
    parser = build_parser(prog)
    config_parser = argparse.ArgumentParser(prog=prog, add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        actions = {action.dest: action for action in parser._actions}
        defaults = _config_defaults(known.config, parser)
        parser.set_defaults(**{key: _coerce(actions[key], value) for key, value in defaults.items()})
    args = parser.parse_args(argv)
    if args.data and args.data_dir and args.data != args.data_dir:
        parser.error(f"the dataset is given twice, as DIR ({args.data}) and --data-dir ({args.data_dir})")
    args.data_dir = args.data_dir or args.data
    return args


def parse_args(argv: List[str]) -> argparse.Namespace:
    """Parse ``kat-train`` arguments, ``-c/--config FILE.yaml`` included, as timm's train.py does.

    The YAML keys are option destinations (``batch_size`` for ``--batch-size``); they replace the defaults and any
    option on the command line overrides them. An unknown key, a value of the wrong type or a missing file is a
    usage error: like every argparse error it prints ``kat-train: error: ...`` (naming the key) and raises
    ``SystemExit(2)``. ``--data-dir`` is not required here (a config can be parsed on its own); ``main`` checks it.

    Args:
        argv: the command-line arguments, without the program name.

    Returns:
        The parsed options; ``data_dir`` is filled from the positional DIR when only that was given.
    """
    return _parse_args(list(argv), "kat-train")


def main(argv: Optional[List[str]] = None, prog: str = "kat-train") -> int:
    """Entry point of ``kat-train`` and ``kat-timm train``."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(argv, prog)
    return run_main(lambda: _train(args, prog), prog)


def _train(args: argparse.Namespace, prog: str) -> int:
    raise CLIError("training is not implemented yet")

