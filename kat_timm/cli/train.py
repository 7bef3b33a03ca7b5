"""``kat-train`` (also ``kat-timm train``): train or fine-tune any timm model, KAT included, on an ImageFolder or
any dataset timm's readers take, with timm train.py's option names and ``-c/--config FILE.yaml`` (README,
"Fine-tuning and evaluation"). Everything is built from timm's library; what is ours: checking the data before
anything starts, checkpoints that are never half-written, clear errors, and a progress bar.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from kat_timm.files import OutputPathError, same_file
from kat_timm.training import loop
from kat_timm.training.data import DataError
from kat_timm.training.evaluation import amp_autocast, create_eval_loader, default_amp_dtype, evaluate
from kat_timm.training.loop import TrainingError, TrainResult, base_lr, create_loss
from kat_timm.training.saver import (AtomicCheckpointSaver, RunFolderError, check_run_folder, claim_run_folder,
                                     edit_atomically, remove_partials, run_files)

from . import CLIError, run_main
from .common import check_backend_setting, check_preprocessing, check_writable_folder, resolve_device
from .validate import (COUNT, INDEX, KeywordArguments, add_data_arguments, check_data_options, checked_number,
                       open_split, read_checkpoint_file, resolve_checked_data_config)

__all__ = ["build_parser", "main", "parse_args", "train"]

DEFAULT_MODEL = "kat_tiny_patch16_224"
DEFAULT_OUTPUT = "./output/train"

# The schedules timm's create_scheduler_v2 builds.
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "rsqrt")

# The scores summary.csv and the epoch line show (evaluate also returns counts and timings).
_SCORES = ("loss", "top1", "top5")

# Option types that check the range (argparse's error names the option; a config's values go through them too).
FRACTION = checked_number(float, lambda value: 0 <= value < 1, "from 0 to below 1")
PROBABILITY = checked_number(float, lambda value: 0 <= value <= 1, "from 0 to 1")
RATE = checked_number(float, lambda value: 0 <= value < math.inf, "a number at least 0")
POSITIVE = checked_number(float, lambda value: value > 0, "positive")
CLASS_COUNT = checked_number(int, lambda value: value >= 1, "at least 1 (leave it out to use the number of class "
                                                            "folders)")

# Options of timm's train.py that kat-train does not offer; a config naming one gets an error that says so.
TIMM_ONLY_OPTIONS = frozenset({
    "epoch_repeats", "in_chans", "drop_connect", "drop_block", "bn_momentum", "bn_eps", "split_bn", "aug_splits",
    "jsd_loss", "resplit", "torchscript", "fuser", "fast_norm", "amp_impl", "apex_amp", "native_amp", "no_ddp_bb",
    "synchronize_step", "no_prefetcher", "prefetcher", "save_images", "tta", "log_wandb", "model_ema_force_cpu",
    "head_init_scale", "head_init_bias", "dist_url",
    # values timm's train.py computes and writes into its args.yaml; they are not options
    "distributed", "world_size", "rank", "num_aug_splits",
})


_EPILOG = """\
Data layout: DATA_DIR/train/CLASS/*.png (or .jpg/.jpeg) and DATA_DIR/validation/CLASS/*.png, the same class folders
in both. The folders are checked before training: a missing folder, a split without class folders, class folders
without images and class sets that differ between the splits are errors. An image file that cannot be decoded is
skipped with a warning naming it (once per file and loader process) and another sample takes its place; in the
evaluation it is left out. A class folder in which no image decodes is an error.

Other data (timm's readers, timm's option names): --dataset hfds/NAME|FOLDER (Hugging Face datasets),
--dataset wds/NAME --data-dir SHARDS --train-split 'train-{0000..0127}.tar' --train-num-samples N --num-classes C
(WebDataset), --dataset torch/NAME [--dataset-download]. A missing dataset, split, shard, key or sample count is
an error before training starts.

Output (OUTPUT/EXPERIMENT/): args.yaml (reusable with -c), summary.csv (one row per epoch), last.pth.tar,
checkpoint-EPOCH.pth.tar (the --checkpoint-hist best by --eval-metric), model_best.pth.tar. Every file is written
to a temporary file and renamed, so a crash, kill or full disk never leaves a partial one. Epochs are numbered from
0, as in timm.

Several GPUs or machines: torchrun --nproc_per_node=N -m kat_timm.cli.train ... (or the kat-train script under
torchrun); --batch-size is per process.
"""


def _augmentation_policy(policy: str) -> str:
    """--aa's type: timm's training transform is built with the policy once (milliseconds), so that a bad one is a
    usage error now rather than an assertion inside timm after the model and data are ready."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        detail = str(error).strip() or "not a policy timm knows"
        raise argparse.ArgumentTypeError(f"{policy}: {detail}; use e.g. rand-m9-mstd0.5 (RandAugment), augmix-m5-w3, "
                                         f"or original / v0 (AutoAugment)") from None
    return policy


def build_parser(prog: str = "kat-train") -> argparse.ArgumentParser:
    """The argument parser of ``kat-train`` (without ``-c/--config``, which ``parse_args`` handles first)."""
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [-c FILE.yaml] --data-dir DIR [--dataset NAME] [--model NAME] [OPTIONS]",
        description="Train or fine-tune any timm model, KAT included, on an ImageFolder or another dataset timm "
                    "reads (--dataset). Options keep the names of timm's train.py; -c FILE.yaml sets their defaults "
                    "as it does there.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="", metavar="FILE.yaml",
                        help="YAML file of option defaults (keys: option names with _ for -, e.g. batch_size: 64); "
                             "command-line options override it")
    group = add_data_arguments(parser, "data (an ImageFolder DATA_DIR/SPLIT/CLASS/IMAGE.png|jpg|jpeg, or --dataset)",
                               batch_size=128)
    group.add_argument("--train-split", metavar="NAME", default="train",
                       help="training split: a folder (default: train; 'training' is also found), a split name, or "
                            "for wds/ a shard pattern such as 'train-{0000..0127}.tar'")
    group.add_argument("--val-split", metavar="NAME", default="validation",
                       help="validation split folder (default: validation; also found as val, valid, eval, "
                            "evaluation) or name or shard pattern. An empty string skips evaluation.")
    group.add_argument("--train-num-samples", type=COUNT, default=None, metavar="N",
                       help="samples in the training split, for streamed readers (wds/ without _info.json)")
    group.add_argument("--val-num-samples", type=COUNT, default=None, metavar="N",
                       help="samples in the validation split, for streamed readers")
    group.add_argument("-vb", "--validation-batch-size", type=COUNT, default=None, metavar="N",
                       help="evaluation batch size (default: --batch-size)")
    group.add_argument("--pin-mem", action="store_true", help="pin CPU memory in the data loader")
    group.add_argument("--use-multi-epochs-loader", action="store_true", help="keep loader workers across epochs")
    group.add_argument("--worker-seeding", default="all", metavar="MODE",
                       help="how loader workers are seeded (timm's 'all' or 'part'; default: all)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                       help=f"any timm model name, kat_* included, optionally with a .tag, or hf-hub:OWNER/NAME or "
                            f"local-dir:FOLDER (default: {DEFAULT_MODEL})")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
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
    group.add_argument("--num-classes", type=CLASS_COUNT, default=None, metavar="N",
                       help="classifier size (default: the number of class folders)")
    group.add_argument("--gp", default=None, metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--drop", type=FRACTION, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    group.add_argument("--drop-path", type=FRACTION, default=None, metavar="PCT",
                       help="stochastic depth rate (default: the model's; the KAT recipe uses 0.1 for T/S, 0.4 for B)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=KeywordArguments, metavar="KEY=VALUE",
                       help="extra keyword arguments for timm.create_model, e.g. act_init=swish")
    group.add_argument("--channels-last", action="store_true", help="use the channels_last memory layout")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in backward to save memory")
    group.add_argument("--grad-accum-steps", type=COUNT, default=1, metavar="N",
                       help="batches whose gradients are summed per optimizer step (default: 1)")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model (default backend when given: inductor)")
    group.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    group.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                       help="share BatchNorm statistics between processes after each epoch (default: reduce; no "
                            "effect on models without BatchNorm, such as KAT)")

    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", metavar="NAME", help="any timm optimizer (default: adamw)")
    group.add_argument("--opt-eps", type=float, default=None, metavar="EPS")
    group.add_argument("--opt-betas", type=FRACTION, nargs="+", default=None, metavar="BETA",
                       help="optimizer betas: two values (three for adan)")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=RATE, default=0.05, metavar="WD",
                       help="weight decay; 1-D tensors (biases, norms) are exempt (default: 0.05)")
    group.add_argument("--clip-grad", type=POSITIVE, default=None, metavar="NORM",
                       help="clip gradients to this norm (default: no clipping)")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"),
                       help="gradient clipping mode (default: norm)")
    group.add_argument("--layer-decay", type=POSITIVE, default=None, metavar="RATE",
                       help="layer-wise learning-rate decay, e.g. 0.75 for fine-tuning (default: off)")
    group.add_argument("--opt-kwargs", nargs="*", default={}, action=KeywordArguments, metavar="KEY=VALUE",
                       help="extra keyword arguments for the optimizer")

    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--sched", default="cosine", choices=SCHEDULERS, metavar="NAME",
                       help=f"timm scheduler: {', '.join(SCHEDULERS)} (default: cosine)")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="step the schedule every optimizer update instead of every epoch")
    group.add_argument("--lr", type=RATE, default=None, metavar="LR",
                       help="peak learning rate (default: --lr-base scaled by the global batch size)")
    group.add_argument("--lr-base", type=RATE, default=5e-4, metavar="LR",
                       help="learning rate at --lr-base-size images per step (default: 5e-4, i.e. the KAT/DeiT "
                            "recipe's 1e-3 at a global batch of 1024)")
    group.add_argument("--lr-base-size", type=COUNT, default=512, metavar="N", help="(default: 512)")
    group.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt"),
                       help="how --lr-base scales with the global batch size (default: linear)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PCT")
    group.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STD")
    group.add_argument("--lr-cycle-mul", type=float, default=1.0, metavar="MULT")
    group.add_argument("--lr-cycle-decay", type=float, default=0.5, metavar="MULT")
    group.add_argument("--lr-cycle-limit", type=int, default=1, metavar="N")
    group.add_argument("--lr-k-decay", type=float, default=1.0, metavar="K")
    group.add_argument("--warmup-lr", type=RATE, default=1e-5, metavar="LR",
                       help="learning rate at the start of warmup (default: 1e-5)")
    group.add_argument("--min-lr", type=RATE, default=0.0, metavar="LR", help="floor of the schedule (default: 0)")
    group.add_argument("--epochs", type=COUNT, default=300, metavar="N", help="epochs to train (default: 300)")
    group.add_argument("--start-epoch", type=INDEX, default=None, metavar="N",
                       help="first epoch (0-based; default: 0, or the one after the --resume checkpoint)")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH")
    group.add_argument("--decay-epochs", type=float, default=90, metavar="N")
    group.add_argument("--warmup-epochs", type=INDEX, default=5, metavar="N", help="linear warmup epochs (default: 5)")
    group.add_argument("--warmup-prefix", action="store_true", help="keep the warmup epochs out of the decay schedule")
    group.add_argument("--cooldown-epochs", type=INDEX, default=0, metavar="N")
    group.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation at all")
    group.add_argument("--scale", type=POSITIVE, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                       help="random-resized-crop area range (default: 0.08 1.0)")
    group.add_argument("--ratio", type=POSITIVE, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0], metavar=("MIN", "MAX"),
                       help="random-resized-crop aspect range (default: 0.75 1.33)")
    group.add_argument("--hflip", type=PROBABILITY, default=0.5, metavar="P", help="horizontal flip probability")
    group.add_argument("--vflip", type=PROBABILITY, default=0.0, metavar="P", help="vertical flip probability")
    group.add_argument("--color-jitter", type=RATE, default=0.4, metavar="PCT")
    group.add_argument("--aa", type=_augmentation_policy, default=None, metavar="POLICY",
                       help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5 (the KAT recipe)")
    group.add_argument("--aug-repeats", type=float, default=0, metavar="N",
                       help="repeated augmentation count (distributed training only)")
    group.add_argument("--train-interpolation", default="random", metavar="NAME",
                       help="training resize interpolation (default: random)")
    group.add_argument("--reprob", type=PROBABILITY, default=0.0, metavar="P", help="random erasing probability")
    group.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"),
                       help="random erasing fill (default: pixel)")
    group.add_argument("--recount", type=COUNT, default=1, metavar="N", help="random erasing count")
    group.add_argument("--mixup", type=RATE, default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=RATE, default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, metavar="RATIO")
    group.add_argument("--mixup-prob", type=PROBABILITY, default=1.0, metavar="P")
    group.add_argument("--mixup-switch-prob", type=PROBABILITY, default=0.5, metavar="P")
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    group.add_argument("--mixup-off-epoch", type=INDEX, default=0, metavar="N",
                       help="turn mixup/cutmix off from this epoch (0: never)")
    group.add_argument("--smoothing", type=FRACTION, default=0.1, metavar="EPS", help="label smoothing (default: 0.1)")
    group.add_argument("--bce-loss", action="store_true", help="binary cross-entropy instead of softmax CE")
    group.add_argument("--bce-target-thresh", type=float, default=None, metavar="T")

    group = parser.add_argument_group("EMA")
    group.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                       help="keep an exponential moving average of the weights (evaluated, saved, and the one the "
                            "best checkpoint is ranked by)")
    group.add_argument("--model-ema-decay", type=PROBABILITY, default=0.9998, metavar="D",
                       help="EMA decay (default: 0.9998; the KAT recipe uses 0.9999)")
    group.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up at the start")

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    group.add_argument("--dist-backend", default=None, metavar="NAME",
                       help="torch.distributed backend under torchrun (default: nccl on cuda, gloo on cpu)")
    group.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                       help="autocast dtype (default: float16 with a gradient scaler on cuda; bfloat16 on cpu, "
                            "where float16 autocast is many times slower)")
    group.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
    group.add_argument("--output", default="", metavar="DIR", help="parent folder of runs (default: ./output/train)")
    group.add_argument("--experiment", default="", metavar="NAME",
                       help="run folder name (default: DATE-TIME-MODEL-SIZE, made unique; with --resume and neither "
                            "--output nor --experiment: the folder of the resumed checkpoint). One run per folder: a "
                            "folder that holds another run is refused unless --resume or --overwrite")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh in a run folder that holds another run: first remove that run's checkpoints, "
                            "summary.csv and args.yaml (nothing else in the folder)")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="metric that ranks the kept checkpoints (default: top1)")
    group.add_argument("--checkpoint-hist", type=COUNT, default=10, metavar="N",
                       help="keep the N best epoch checkpoints (default: 10)")
    group.add_argument("--log-interval", type=COUNT, default=50, metavar="N",
                       help="steps between progress lines when the output is not a terminal (default: 50)")
    group.add_argument("--recovery-interval", type=INDEX, default=0, metavar="N",
                       help="also write a recovery checkpoint every N steps (default: 0, off)")
    return parser


def _config_error(parser: argparse.ArgumentParser, message: str) -> None:
    """A config problem: one line ``<prog>: error: ...`` and exit code 2, like argparse's own errors."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _config_defaults(path: str, prog: str = "kat-train") -> Dict[str, Any]:
    """Read a YAML config into ``{dest: value}`` for ``parser.set_defaults``. Each value is written back as the
    command-line tokens of its option and parsed by kat-train's parser, so argparse converts and checks it."""
    import yaml

    parser = build_parser(prog)
    parser.exit_on_error = False  # a bad value raises ArgumentError, reported below with the file and the key
    if os.path.isdir(path):
        run_args = os.path.join(path, "args.yaml")
        hint = (f"; a run folder's config is {run_args}" if os.path.isfile(run_args)
                else "; give the YAML file (configs/*.yaml, or a run's args.yaml)")
        _config_error(parser, f"-c {path} is a folder, not a config file{hint}")
    if not os.path.isfile(path):
        _config_error(parser, f"config file not found: {path}")
    try:
        with open(path, "rb") as file:
            data = file.read()
        config = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        _config_error(parser, f"config {path}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}); save "
                              "it as UTF-8")
    except (OSError, yaml.YAMLError) as error:
        _config_error(parser, f"config {path}: not readable YAML: {str(error).splitlines()[0]}")
    if not isinstance(config, (dict, type(None))):
        _config_error(parser, f"config {path}: expected a mapping of option names to values, got "
                              f"{type(config).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in (config or {}).items():
        if key not in actions:
            _config_error(parser, f"config {path}: {_unknown_key_message(key, actions)}")
        try:
            tokens = _config_tokens(actions[key], value)
            defaults[key] = None if tokens is None else getattr(parser.parse_known_args(tokens)[0], key)
        except argparse.ArgumentError as error:
            _config_error(parser, f"config {path}: {key}: {error.message}")
    return defaults


def _unknown_key_message(key: Any, actions: Dict[str, argparse.Action]) -> str:
    if key in TIMM_ONLY_OPTIONS:
        return (f"key {key!r} is a timm train.py option that kat-train does not support; remove it, or run timm's "
                f"own train.py with --device-modules kat_timm")
    close = difflib.get_close_matches(str(key).replace("-", "_"), list(actions), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown key {key!r}{hint}; keys are kat-train option names with '_' for '-' "
            f"(e.g. batch_size for --batch-size), see kat-train --help")


def _config_tokens(action: argparse.Action, value: Any) -> Optional[List[str]]:
    """A config's ``value`` as the command-line tokens of ``action`` (None: the value None, which has none)."""
    if action.nargs == 0:  # a switch: --flag, or --no-flag for a BooleanOptionalAction, or nothing
        if not isinstance(value, bool):
            raise argparse.ArgumentError(action, f"expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0 if value else 1]]
        return action.option_strings[:1] if value else []
    if value is None:
        if action.default is not None:
            raise argparse.ArgumentError(action, f"null is not allowed (its default is {action.default!r}); give a "
                                                 "value or remove the key")
        return None
    if action.nargs == "?" and action.const is not None and isinstance(value, bool):  # --torchcompile: true
        return action.option_strings[-1:] if value else None
    if isinstance(action.nargs, int) and not (isinstance(value, list) and len(value) == action.nargs):
        raise argparse.ArgumentError(action, f"expected a list of {action.nargs} values, got {value!r}")
    if isinstance(action, KeywordArguments) and isinstance(value, dict):
        value = [f"{name}={item if isinstance(item, str) else repr(item)}" for name, item in value.items()]
    if isinstance(value, list) and action.nargs not in (None, "?"):
        return action.option_strings[-1:] + [str(item) for item in value]
    return [f"{action.option_strings[-1]}={value}" if action.option_strings else str(value)]


def parse_args(argv: List[str], prog: str = "kat-train") -> argparse.Namespace:
    """Parse ``kat-train`` arguments (without the program name), ``-c/--config FILE.yaml`` included, as timm's
    train.py does: the config's values become the defaults. A bad config is a usage error (``SystemExit(2)``) like
    argparse's own. ``--data-dir`` (filled from the positional DIR) is not required here: ``main`` checks it."""
    parser = build_parser(prog)
    argv = list(argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        defaults = _config_defaults(known.config, prog)
        if defaults.get("resume") and known.experiment:
            # An args.yaml of a resumed run (written before args.yaml left resume out) would resume that run again.
            print(f"{prog}: note: ignoring resume: {defaults.pop('resume')} of config {known.config} for the new "
                  f"--experiment {known.experiment}; give --resume FILE on the command line to continue a run",
                  file=sys.stderr)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.data and args.data_dir and args.data != args.data_dir:
        parser.error(f"the dataset is given twice, as DIR ({args.data}) and --data-dir ({args.data_dir})")
    args.data_dir = args.data_dir or args.data
    return args


@contextlib.contextmanager
def _run_folder_writes(folder: str):
    """Writes into the run folder: an OSError (disk full, quota, permissions) becomes one CLIError line naming it."""
    import errno

    try:
        yield
    except OutputPathError as error:  # a run file that is a device, FIFO or socket (a link is written through)
        raise CLIError(str(error), code=2) from None
    except OSError as error:
        where = error.filename or folder
        what = {errno.ENOSPC: f"no space left on device at {where}", errno.EDQUOT: f"disk quota exceeded at {where}",
                errno.EFBIG: f"file size limit reached writing {where} (see ulimit -f)"}.get(
            error.errno, f"cannot write {where}: {error.strerror or error}")
        raise CLIError(f"{what}. Nothing was half-written: the files from before (last.pth.tar, summary.csv) are "
                       f"intact; free space and continue with --resume {os.path.join(folder, 'last.pth.tar')} if it "
                       f"exists") from None


def _setup_logging(primary: bool) -> None:
    """Messages from timm and kat_timm.training.data (skipped images) to stderr; other ranks show warnings only."""
    import logging

    logging.getLogger("kat_timm").setLevel(logging.INFO if primary else logging.WARNING)
    logging.getLogger("timm").setLevel(logging.INFO if primary else logging.WARNING)
    logging.getLogger("timm.utils.checkpoint_saver").setLevel(logging.WARNING)  # lists every file it keeps
    # Its one line ("Dropping N rows ... from summary.csv.partial") names the temporary copy the trim works on; the
    # run's own "epochs A..B" line says from which epoch summary.csv is written.
    logging.getLogger("timm.utils.summary").setLevel(logging.WARNING)
    if not logging.getLogger().handlers:  # train() called without main(): run_main routes the records otherwise
        logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _init_device(args: argparse.Namespace):
    """Resolve --device, join the torchrun process group if there is one (timm's init_distributed_device)."""
    from timm.utils import init_distributed_device

    from .common import resolve_device

    args.device = str(resolve_device(args.device))
    try:
        device = init_distributed_device(args)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise CLIError(f"could not start distributed training on {args.device} "
                       f"(backend {args.dist_backend or 'default'}): {error}") from error
    args.device = str(device)
    return device


def _check_arguments(args: argparse.Namespace):
    """Refuse bad options before anything is built; returns the --resume checkpoint, read (the only read of it)."""
    check_data_options(args, "DIR/train/CLASS/*.png and DIR/validation/CLASS/*.png")
    check_preprocessing(vars(args), training=True)
    check_backend_setting(resolve_device(args.device))  # can the forced op backend run there (before any file)?
    for name in ("scale", "ratio"):
        low, high = getattr(args, name)
        if low > high:
            raise CLIError(f"--{name} {low:g} {high:g}: give MIN MAX with MIN <= MAX", code=2)
    if args.opt_betas is not None and len(args.opt_betas) < 2:
        raise CLIError(f"--opt-betas {' '.join(map(str, args.opt_betas))}: give two values, e.g. 0.9 0.999 "
                       "(three for adan)", code=2)
    for name in ("resume", "initial_checkpoint", "pretrained_path"):
        path = getattr(args, name)
        if path and os.path.isdir(path):
            _refuse_folder(f"--{name.replace('_', '-')}", path)
        if path and not os.path.isfile(path):
            raise CLIError(f"--{name.replace('_', '-')}: no such file: {path}", code=2)
    resumed = _read_resume(args) if args.resume else None
    if args.output:
        check_writable_folder(args.output, "--output")
    if args.overwrite and args.resume:
        raise CLIError("give --resume (continue the run) or --overwrite (start afresh), not both", code=2)
    if args.pretrained_path and args.initial_checkpoint:
        raise CLIError("give --pretrained-path or --initial-checkpoint, not both", code=2)
    if args.pretrained and args.initial_checkpoint:
        raise CLIError("give --pretrained or --initial-checkpoint, not both", code=2)
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.batch_size % 2:
        raise CLIError(f"mixup/cutmix pair the images of a batch, so --batch-size must be even (got "
                       f"{args.batch_size})", code=2)
    return resumed


def _named_run_folder(args: argparse.Namespace) -> Optional[str]:
    """The run folder where the options name it (not a generated default name)."""
    if args.resume and not args.output and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))  # continue the run where it was
    return os.path.normpath(os.path.join(args.output or DEFAULT_OUTPUT, args.experiment)) if args.experiment else None


def _check_run_folder(args: argparse.Namespace, primary: bool) -> None:
    """One run per folder, checked before anything is built (and again, under the folder's lock, before writing).
    Only the ``primary`` process (rank 0, the one that writes) probes the lock: under torchrun the others would
    take each other's probes for another run."""
    folder = _named_run_folder(args)
    if folder is None:
        return
    try:
        check_run_folder(folder, resume=bool(args.resume), overwrite=args.overwrite, locked=not primary)
    except RunFolderError as error:
        raise CLIError(str(error), code=2) from None
    if args.overwrite:
        doomed = [os.path.join(folder, name) for name in run_files(folder)]
        for name in ("initial_checkpoint", "pretrained_path"):
            path = getattr(args, name)
            if path and any(same_file(path, file) for file in doomed):
                raise CLIError(f"--{name.replace('_', '-')} {path} is a file of the run that --overwrite removes; "
                               f"copy it out of {folder} first", code=2)


def _refuse_folder(option: str, path: str) -> None:
    """A folder given where a checkpoint file is expected: name the files in it, or for a Hub-style model folder
    (what kat-timm publish writes) the option that starts a run from its weights."""
    from kat_timm.checkpoint import folder_given_message

    advice = "; start a run from its weights with --pretrained-path {weights}"
    raise CLIError(f"{option} {folder_given_message(path, hub_advice=advice)}", code=2)


def _read_resume(args: argparse.Namespace):
    """--resume: the training checkpoint, read once for everything a resume restores, and checked against the run's
    optimizer options (its state fits only the optimizer and parameter groups it was saved from)."""
    loaded = read_checkpoint_file(args.resume, code=2, use_ema=False)
    if not isinstance(loaded.raw, dict) or loaded.raw.get("epoch") is None:
        raise CLIError(f"--resume {args.resume} is not a training checkpoint (no epoch, optimizer or run options: a "
                       f"bare state dict or another file); start a new run from its weights with --initial-checkpoint "
                       f"{args.resume}, or --pretrained-path {args.resume} for another class count or image size",
                       code=2)
    if loaded.architecture is not None and args.model:
        from kat_timm.checkpoint import CheckpointError
        from kat_timm.factory import check_model_matches

        try:
            check_model_matches(args.model, loaded)
        except CheckpointError:
            raise CLIError(f"cannot resume from {args.resume} with --model {args.model}: it holds a "
                           f"{loaded.architecture}; give the matching model name (--model {loaded.architecture})")
    saved = loaded.args
    if args.no_resume_opt:
        return loaded
    if saved.get("opt") and str(saved["opt"]).lower() != args.opt.lower():
        raise CLIError(f"--resume {args.resume} was trained with --opt {saved['opt']}, not {args.opt}: its optimizer "
                       f"state does not fit. Resume with --opt {saved['opt']}, or add --no-resume-opt to keep only "
                       f"the weights and epoch", code=2)
    # The layer decay sets the parameter groups and their lr scales; the restored optimizer state would keep the old
    # scales while args.yaml and the new checkpoints recorded the new value.
    if "layer_decay" in saved and saved["layer_decay"] != args.layer_decay:
        raise CLIError(f"--resume {args.resume} was trained with --layer-decay {_option_text(saved['layer_decay'])}, "
                       f"not {_option_text(args.layer_decay)}: the optimizer's parameter groups differ. Resume with "
                       f"--layer-decay {_option_text(saved['layer_decay'])}, or add --no-resume-opt to keep only the "
                       f"weights and epoch", code=2)
    return loaded


def _check_data(args: argparse.Namespace):
    """The checked training and validation (or None) datasets, the class names in label order (None when the reader
    knows none; the validation labels follow them) and each split's name in messages."""
    from kat_timm.training.data import labelled_like

    train, classes, train_name = open_split(
        args, args.train_split, is_training=True, num_samples=args.train_num_samples, split_option="--train-split",
        samples_option="--train-num-samples", world_size=args.world_size)
    val, val_classes, val_name = None, None, ""
    if args.val_split:  # an ImageFolder's is checked for the training classes and labelled in their order
        val, val_classes, val_name = open_split(
            args, args.val_split, use_class_map=False, relabel=lambda split: labelled_like(train.split, split),
            num_samples=args.val_num_samples, split_option="--val-split", samples_option="--val-num-samples",
            world_size=args.world_size)
    if val is not None and classes is not None and val_classes is not None and val_classes != classes:
        raise CLIError(f"--dataset {args.dataset}: the splits {args.train_split} and {args.val_split} name "
                       f"other classes ({len(classes)} and {len(val_classes)}), so their labels differ", code=2)
    if classes is None and args.num_classes is None:
        raise CLIError(f"--dataset {args.dataset}: the data does not name its classes, so their number is unknown; "
                       f"give --num-classes N (or --class-map FILE with the class names in label order)", code=2)
    return train, val, classes, train_name, val_name


def _model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    options = dict(drop_rate=args.drop or None, drop_path_rate=args.drop_path, global_pool=args.gp or None)
    return {**{name: value for name, value in options.items() if value is not None}, **args.model_kwargs}


def _pretrained_alternatives(args: argparse.Namespace) -> tuple:
    """What the missing-released-weights error offers instead, in kat-train's own options: where a config may have
    set pretrained: true, leaving out --pretrained changes nothing, and --no-pretrained is what switches it off."""
    off = "--no-pretrained" if args.config else "leave out --pretrained"
    return (f"--pretrained-path FILE (a copy of the weights) or {off} (random weights)",)


def _is_npz(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".npz", ".npy")


def _create_model(args: argparse.Namespace, num_classes: int):
    """The model as timm's train.py builds it, with kat_timm's clear errors and ``img_size`` passed on. Every weight
    file is read once: --initial-checkpoint through kat_timm.factory, --pretrained-path handed to timm as a state
    dict (timm then adapts the classifier and position embedding as for the released weights)."""
    from .common import create_sized_model

    size = args.input_size[1:] if args.input_size else ([args.img_size] if args.img_size else None)
    kwargs = dict(_model_kwargs(args), num_classes=num_classes, alternatives=_pretrained_alternatives(args),
                  size_option="--input-size" if args.input_size else "--img-size")
    checkpoint = args.initial_checkpoint or None
    if checkpoint and _is_npz(checkpoint):
        # Google's ViT .npz (the .vitft recipes): timm hands it to the model's load_pretrained, which maps the ViT
        # weights, skips a head of another size and resamples the position embedding.
        from timm.models import load_checkpoint

        model = create_sized_model(args.model, size, **kwargs)
        try:
            load_checkpoint(model, checkpoint)
        except Exception as error:
            raise CLIError(f"--initial-checkpoint {checkpoint}: {args.model} cannot read it: "
                           f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
        return model
    # A --pretrained-path .npz is Google's ViT format, which only timm's loader reads: it is handed over as a file.
    own = checkpoint or (args.pretrained_path if args.pretrained_path and not _is_npz(args.pretrained_path) else None)
    loaded = read_checkpoint_file(own) if own else None
    if checkpoint:
        head = loaded.state_dict.get("head.weight")
        if head is not None and head.ndim == 2 and head.shape[0] != num_classes:
            raise CLIError(f"--initial-checkpoint {checkpoint} has a {head.shape[0]}-class classifier but the data has "
                           f"{num_classes} classes; use --pretrained-path {checkpoint} instead: it loads the weights "
                           f"with a new classifier (and resamples the position embedding for --img-size)", code=2)
        if size is not None:
            kwargs.pop("img_size", None)  # --img-size/--input-size replace the checkpoint's (and --model-kwargs')
        return create_sized_model(args.model, size, checkpoint=loaded, **kwargs)
    if args.pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(args.pretrained_path))
        if loaded is not None:
            kwargs["pretrained_cfg_overlay"]["state_dict"] = loaded.state_dict  # timm prefers it to reading the file
    model = create_sized_model(args.model, size, pretrained=args.pretrained or bool(args.pretrained_path) or None, **kwargs)
    if loaded is not None:
        _check_pretrained_path_covers(args.pretrained_path, loaded.state_dict, model, args.model)
    return model


def _check_pretrained_path_covers(path: str, state_dict, model, model_name: str) -> None:
    """--pretrained-path: timm loads the file non-strictly when it replaces the classifier, so a file holding few or
    none of the model's weights would start the run from random weights without a word. Every weight but the
    classifier (and the rational coefficients, which a KAT fills in for a ViT's weights) must come from the file."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    missing = [key for key in model.state_dict() if key not in state_dict
               and not any(key.startswith(name + ".") for name in classifiers)
               and not key.endswith(("weight_numerator", "weight_denominator"))]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CLIError(f"--pretrained-path {path} lacks {len(missing)} of {model_name}'s weights "
                       f"({', '.join(missing[:5])}{more}), so the run would start from random ones; give a "
                       f"checkpoint of {model_name} (or of the ViT it is built like)", code=2)


def _resolve_lr(args: argparse.Namespace) -> None:
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == "sqrt" else ratio)


def _schedule_warnings(args: argparse.Namespace, num_epochs: int) -> List[str]:
    """What makes the lr schedule other than the announced lr suggests: a warmup that never reaches the lr within
    the run, or one that starts above it (then the "warmup" lowers the lr)."""
    if not args.warmup_epochs:
        return []
    warnings = []
    if args.warmup_epochs >= num_epochs:
        warnings.append(f"--warmup-epochs {args.warmup_epochs} covers the whole run of {num_epochs} epoch"
                        f"{'s' if num_epochs != 1 else ''}: the lr never reaches {args.lr:.3g}; give --warmup-epochs "
                        f"below {num_epochs} (0: no warmup)")
    if args.warmup_lr > args.lr:
        warnings.append(f"--warmup-lr {args.warmup_lr:.3g} is above the lr {args.lr:.3g}: the warmup starts higher "
                        f"and lowers the lr; give --warmup-lr below {args.lr:.3g} (e.g. {args.lr / 10:.3g}) or "
                        f"--warmup-epochs 0")
    return warnings


def _check_resumed_classes(args: argparse.Namespace, classes: List[str], resumed) -> None:
    """A resumed run must see the class folders it was trained on: otherwise every label changes meaning while the
    weights load without complaint (a folder renamed, added or removed with --num-classes fixed)."""
    trained = resumed.args.get("class_names")
    if trained and list(trained) != list(classes):
        only_trained = [name for name in trained if name not in classes]
        only_data = [name for name in classes if name not in trained]
        changes = [f"not in the data: {', '.join(only_trained[:10])}" if only_trained else "",
                   f"new in the data: {', '.join(only_data[:10])}" if only_data else ""]
        detail = "; ".join(change for change in changes if change) or "the same folders in another label order"
        raise CLIError(f"--resume {args.resume} was trained on other classes than the folders of --data-dir "
                       f"({detail}), so its labels would change meaning. Resume with the original class folders, "
                       f"or start a new run from its weights with --pretrained-path {args.resume}", code=2)


def _resume(args: argparse.Namespace, resumed, model, optimizer, loss_scaler) -> int:
    """What timm's resume_checkpoint restores (weights, optimizer, AMP scaler; the epoch to start at), from the
    checkpoint already read, with its failures as clear errors. Returns the first epoch to run."""
    raw = resumed.raw
    try:
        model.load_state_dict(resumed.state_dict)
        if not args.no_resume_opt:
            if "optimizer" in raw:
                optimizer.load_state_dict(raw["optimizer"])
            if loss_scaler is not None and loss_scaler.state_dict_key in raw:
                loss_scaler.load_state_dict(raw[loss_scaler.state_dict_key])
    except (RuntimeError, KeyError, ValueError) as error:
        from kat_timm.checkpoint import load_error_detail

        detail = load_error_detail(error)
        # The usual cause: options that shape the model differ from the run's (its args are in the checkpoint).
        saved = resumed.args
        differing = [f"--{name.replace('_', '-')} {_option_text(saved[name])}"
                     for name in ("model", "img_size", "input_size", "num_classes", "layer_decay", "opt")
                     if name in saved and saved[name] != getattr(args, name)]
        hint = (f"; the run was started with {' '.join(differing)}: resume with the same options" if differing
                else f"; it looks like a checkpoint of {resumed.architecture}" if resumed.architecture else "")
        raise CLIError(f"cannot resume from {args.resume} with --model {args.model}: {detail}{hint}") from error
    # Checkpoints of version 2 and later record the epoch they finished (timm's resume_checkpoint adds one too).
    return raw["epoch"] + 1 if raw.get("version", 1) > 1 else raw["epoch"]


def _option_text(value: Any) -> str:
    if value is None:
        return "(not given)"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _write_args_yaml(path: str, parsed: Dict[str, Any]) -> None:
    import yaml

    # Not --resume: args.yaml is a config for new runs, and one naming a checkpoint would resume that run again.
    # Nor --overwrite: a config that removes a run's files whenever it is used again.
    options = {key: value for key, value in parsed.items() if key not in ("config", "data", "resume", "overwrite")}
    text = yaml.safe_dump(options, default_flow_style=False, sort_keys=False)
    edit_atomically(path, lambda partial: Path(partial).write_text(text, encoding="utf-8"), start_from_current=False)


def train(args: argparse.Namespace, prog: str = "kat-train") -> TrainResult:
    """Run the training that ``args`` (from :func:`parse_args`) describes; bad input raises ``CLIError``. Under
    torchrun every process calls this; rank 0 prints and writes the summary and checkpoints."""
    parsed = dict(vars(args))
    resumed = _check_arguments(args)
    device = _init_device(args)
    primary = args.rank == 0
    _setup_logging(primary)
    try:
        _check_run_folder(args, primary)
        with contextlib.ExitStack() as run_folder:  # holds the run folder's lock until training ends, however it ends
            return _train(args, parsed, resumed, device, primary, prog, run_folder)
    except DataError as error:
        # Raised in a loader worker, it arrives with the worker's traceback in its message: keep the last line.
        raise CLIError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    except TrainingError as error:
        raise CLIError(str(error)) from None
    finally:
        if args.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, parsed: Dict[str, Any], resumed, device, primary: bool, prog: str,
           run_folder: contextlib.ExitStack) -> TrainResult:
    from timm import utils
    from timm.data import Mixup, create_loader
    from timm.layers import convert_sync_batchnorm
    from timm.models import safe_model_name
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    def say(message: str) -> None:
        if primary:
            print(message, flush=True)

    dataset_train, dataset_eval, classes, train_name, val_name = _check_data(args)
    known_classes = len(classes) if classes is not None else None
    num_classes = args.num_classes or known_classes
    if known_classes is not None and num_classes < known_classes:
        raise CLIError(f"--num-classes {num_classes} is less than the {known_classes} classes of {train_name}", code=2)
    # One class leaves nothing to tell apart: the loss is 0 and top-1 100% from the first step, and nothing is learned.
    if known_classes == 1:
        raise CLIError(f"{train_name} has one class ({classes[0]}): a classifier learns nothing from it (loss 0 and "
                       f"top-1 100% from the start); give at least two classes", code=2)
    if num_classes == 1:
        raise CLIError("--num-classes 1: a classifier learns nothing with one class (loss 0 and top-1 100% from the "
                       "start); give at least two classes", code=2)
    args.class_names = classes  # saved in every checkpoint; kat-validate checks them
    if resumed is not None and classes is not None:
        _check_resumed_classes(args, args.class_names, resumed)
    utils.random_seed(args.seed, args.rank)

    model = _create_model(args, num_classes)
    args.num_classes = num_classes
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(enable=True)
        except (AssertionError, NotImplementedError, AttributeError) as error:
            raise CLIError(f"--grad-checkpointing: {args.model} does not support it ({error})", code=2) from error
    data_config = resolve_checked_data_config(vars(args), model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ""
        model = convert_sync_batchnorm(model)

    _resolve_lr(args)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (AssertionError, ValueError, TypeError) as error:
        raise CLIError(f"cannot create optimizer {args.opt!r}: {error}", code=2) from error

    args.amp_dtype = default_amp_dtype(args.amp_dtype, device)
    autocast = amp_autocast(args.amp, args.amp_dtype, device)
    loss_scaler = None
    if args.amp and device.type == "cuda" and args.amp_dtype == "float16":
        loss_scaler = utils.NativeScaler(device=device.type)  # bfloat16 needs no loss scaling

    resume_epoch = _resume(args, resumed, model, optimizer, loss_scaler) if resumed is not None else None

    model_ema = None
    if args.model_ema:
        # Created after the model is on its device and before DDP wraps it, as timm does.
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if resumed is not None:  # the EMA weights, or the model's in a checkpoint without (as timm's loader does)
            from kat_timm.checkpoint import unwrap_state_dict

            model_ema.module.load_state_dict(unwrap_state_dict(resumed.raw)[0])

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn = None
    if mixing:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=True,
        use_prefetcher=False, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, num_aug_repeats=args.aug_repeats if args.distributed else 0,
        interpolation=train_interpolation, mean=data_config["mean"], std=data_config["std"],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding)
    if len(loader_train) == 0:
        raise CLIError(f"{train_name} has {len(dataset_train)} images: not one full batch of "
                       f"{args.batch_size} per process ({args.world_size} process(es)); lower --batch-size", code=2)
    loader_eval = None if dataset_eval is None else create_eval_loader(
        dataset_eval, data_config, args.validation_batch_size or args.batch_size, args.workers, rank=args.rank,
        world_size=args.world_size, pin_memory=args.pin_mem)

    train_loss_fn = create_loss(args, mixing, device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    schedule_options = scheduler_kwargs(args)
    if loader_eval is None:
        schedule_options["plateau_mode"] = "min"  # without evaluation the schedule follows the training loss
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **schedule_options, updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if start_epoch >= num_epochs:
        where = (f"--start-epoch {start_epoch}" if args.start_epoch is not None
                 else f"the run {args.resume} finished at epoch {start_epoch - 1}")
        raise CLIError(f"nothing to train: {where}, and --epochs {args.epochs} ends at epoch {num_epochs - 1} "
                       f"(epochs count from 0); raise --epochs to train on", code=2)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    output_dir = saver = None
    eval_metric = args.eval_metric
    if primary:
        folder = _named_run_folder(args) or os.path.join(args.output or DEFAULT_OUTPUT, "-".join([
            datetime.now().strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model), str(data_config["input_size"][-1])]))
        try:
            with _run_folder_writes(os.path.dirname(folder)):
                output_dir, lock = claim_run_folder(os.path.dirname(folder), os.path.basename(folder),
                                                    unique=_named_run_folder(args) is None, resume=bool(args.resume),
                                                    overwrite=args.overwrite)
        except RunFolderError as error:
            raise CLIError(str(error), code=2) from None
        run_folder.enter_context(lock)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=eval_metric == "loss",
            max_history=args.checkpoint_hist)
        with _run_folder_writes(output_dir):
            remove_partials(output_dir)
            if args.resume:
                saver.restore_history(args.resume, resumed.raw)
            _write_args_yaml(os.path.join(output_dir, "args.yaml"), parsed)
            edit_atomically(os.path.join(output_dir, "summary.csv"),
                             lambda partial: utils.trim_summary(partial, start_epoch))

    unwrapped = utils.unwrap_model(model)
    params = sum(p.numel() for p in unwrapped.parameters())
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    built_size = getattr(getattr(unwrapped, "patch_embed", None), "img_size", None)
    sized = built_size is not None and (args.img_size or args.input_size)
    say(f"{prog}: model {args.model}{f' (built for img_size {tuple(built_size)})' if sized else ''}: {params:,} "
        f"parameters ({trainable:,} trainable), {num_classes} classes")
    world = f"{args.world_size} processes ({torch.distributed.get_backend()})" if args.distributed else "1 process"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    say(f"{prog}: device {device} ({device_name}), world size {world}, "
        f"AMP {args.amp_dtype if args.amp else 'off'}")
    if args.aug_repeats and not args.distributed:
        say(f"{prog}: note: --aug-repeats {args.aug_repeats:g} applies to distributed training only; it is off in "
            f"this single-process run")
    if known_classes is not None and num_classes > known_classes:
        given = f"--num-classes {num_classes}" + (f" (or num_classes: {num_classes} in {args.config})" if args.config
                                                  else "")
        say(f"{prog}: warning: {given} but the data has {known_classes} classes: the extra "
            f"{num_classes - known_classes} outputs are never a target, yet they can still win the top-1; give "
            f"--num-classes {known_classes} (it overrides a config) to match the data")
    val_note = f"{val_name}: {len(loader_eval.dataset)} images" if loader_eval is not None else "no validation split"
    say(f"{prog}: data {train_name}: {len(dataset_train)} images; {val_note}; {known_classes or num_classes} classes, "
        f"input {tuple(data_config['input_size'])}")
    steps = f"{updates_per_epoch} step{'s' if updates_per_epoch != 1 else ''}"
    # The epoch lines show the lr each epoch runs at: during a warmup, not the announced one.
    warmup = (f" (reached after {args.warmup_epochs} warmup epoch{'s' if args.warmup_epochs != 1 else ''} from "
              f"{args.warmup_lr:.3g})" if lr_scheduler is not None and args.warmup_epochs else "")
    say(f"{prog}: batch {args.batch_size} per process x {args.world_size} x {args.grad_accum_steps} accumulation "
        f"= {args.batch_size * args.world_size * args.grad_accum_steps}; {steps} per epoch; "
        f"{args.opt} lr {args.lr:.3g}{warmup}, {args.sched} schedule, weight decay {args.weight_decay}")
    for warning in _schedule_warnings(args, num_epochs) if lr_scheduler is not None else ():
        say(f"{prog}: warning: {warning}")
    resumed_note = f", resumed from {args.resume}" if args.resume else ""
    say(f"{prog}: epochs {start_epoch}..{num_epochs - 1} (0-based){resumed_note}")
    say(f"{prog}: output {os.path.abspath(output_dir) if output_dir else '-'}")

    result = TrainResult(model=unwrapped, model_ema=model_ema.module if model_ema else None, optimizer=optimizer,
                         output_dir=output_dir, start_epoch=start_epoch)
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if hasattr(dataset_train, "set_epoch"):  # streamed readers shuffle their shards by epoch, on every rank
            dataset_train.set_epoch(epoch)
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        started = time.perf_counter()
        train_metrics, num_updates = loop.train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, args, device, autocast=autocast,
            loss_scaler=loss_scaler, lr_scheduler=lr_scheduler, model_ema=model_ema, mixup_fn=mixup_fn,
            saver=saver, num_updates=num_updates, num_epochs=num_epochs, primary=primary,
            folder_writes=lambda: _run_folder_writes(output_dir))
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            utils.distribute_bn(model, args.world_size, args.dist_bn == "reduce")

        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = _evaluate_epoch(model, loader_eval, device, autocast, args.distributed)
            if model_ema is not None:
                if args.distributed and args.dist_bn in ("broadcast", "reduce"):
                    utils.distribute_bn(model_ema, args.world_size, args.dist_bn == "reduce")
                ema_metrics = _evaluate_epoch(model_ema.module, loader_eval, device, autocast, args.distributed)
                eval_metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})

        lr = base_lr(optimizer)
        # The EMA weights rank the checkpoints when there is an EMA, as in timm.
        ranking = f"ema_{eval_metric}" if model_ema is not None else eval_metric
        metric = None if eval_metrics is None else eval_metrics[ranking]
        if output_dir is not None:
            with _run_folder_writes(output_dir):
                edit_atomically(os.path.join(output_dir, "summary.csv"), lambda partial: utils.update_summary(
                    epoch, train_metrics, eval_metrics, partial, lr=lr))
                result.best_metric, result.best_epoch = saver.save_checkpoint(epoch, metric=metric)
        if lr_scheduler is not None:
            # --sched plateau needs a metric every epoch: without evaluation, the training loss (as timm does)
            lr_scheduler.step(epoch + 1, metric if metric is not None else train_metrics["loss"])

        evaluated = {f"eval_{key}": value for key, value in (eval_metrics or {}).items()}
        result.history.append({"epoch": epoch, "train_loss": train_metrics["loss"], "lr": lr, **evaluated})
        seconds = time.perf_counter() - started
        shown = ""
        for label, prefix in (("eval", ""), ("EMA", "ema_")):
            if eval_metrics is not None and prefix + "loss" in eval_metrics:
                shown += f"  | {label} " + "  ".join(f"{key} {eval_metrics[prefix + key]:.4g}" for key in _SCORES)
        say(f"epoch {epoch}: train loss {train_metrics['loss']:.4g}{shown}  | lr {lr:.3g}  {seconds:.1f} s")

    if primary:
        if result.best_metric is not None:
            ranked_by = " of the EMA weights (they rank the checkpoints)" if model_ema is not None else ""
            say(f"{prog}: best {eval_metric}{ranked_by} {result.best_metric:.4g} at epoch {result.best_epoch}")
        say(f"{prog}: checkpoints, summary.csv and args.yaml in {os.path.abspath(output_dir)}")
    return result


def _evaluate_epoch(model, loader, device, autocast, distributed: bool) -> Dict[str, float]:
    metrics = evaluate(model, loader, device, autocast, distributed=distributed)
    return {key: metrics[key] for key in _SCORES}


def main(argv: Optional[List[str]] = None, prog: str = "kat-train") -> int:
    """Entry point of ``kat-train`` and ``kat-timm train``: parse, train, and turn bad input into one clear line."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)

    def run() -> int:
        train(args, prog)
        return 0

    return run_main(run, prog)


if __name__ == "__main__":
    sys.exit(main())
