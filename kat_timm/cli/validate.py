"""``kat-validate`` (also ``kat-timm validate``): top-1, top-5 and loss of a model on an ImageFolder split or a split
of any dataset timm's readers take, printed as JSON shaped like timm's validate.py's. The images are prepared as the
model's pretrained_cfg says or, for a training checkpoint, as its run's options said; the loop is kat-train's. The
data options and checks kat-train shares live here too.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from kat_timm.training.data import DataError
from kat_timm.training.evaluation import amp_autocast, create_eval_loader, default_workers, evaluate
from kat_timm.files import OutputPathError, edit_atomically, output_target

from . import CLIError, run_main
from .common import (add_dataset_reader_arguments, add_model_arguments, check_backend_setting, check_preprocessing,
                     check_writable_folder, create_sized_model, resolve_device)

__all__ = ["build_parser", "main", "open_split", "resolve_checked_data_config"]

DEFAULT_MODEL = "kat_tiny_patch16_224"


def checked_number(convert: Callable[[str], Any], test: Callable[[Any], bool], requirement: str):
    """An argparse ``type``: ``convert(text)`` (int or float) where ``test`` holds for it, else the usage error
    ``argument --OPTION: must be REQUIREMENT, got TEXT``."""
    def parse(text: str):
        value = convert(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid int value: ..." for text that is no number
    return parse


COUNT = checked_number(int, lambda value: value >= 1, "at least 1")
INDEX = checked_number(int, lambda value: value >= 0, "at least 0")


def build_parser(prog: str = "kat-validate") -> argparse.ArgumentParser:
    """The argument parser of ``kat-validate``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Top-1, top-5 and loss of a model on an ImageFolder split, preprocessed as the "
                                "model's pretrained_cfg says; the result is printed as JSON (timm validate.py's "
                                "fields plus loss and images/s).",
        epilog="Data layout: DATA_DIR/SPLIT/CLASS/*.png (or .jpg/.jpeg). Labels follow the class folders' sorted "
               "names (timm's order), or --class-map (it may list classes without a folder), or the class list a "
               "kat-train checkpoint carries. An image that cannot be decoded is left out with a warning naming it "
               "and counted in unreadable_images; a class folder in which no image decodes is an error. A training "
               "checkpoint is evaluated with its run's image size, mean/std, crop and interpolation unless given here.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = add_data_arguments(parser, "data", batch_size=256)
    group.add_argument("--split", default="validation", metavar="NAME",
                       help="split folder (default: validation; also found as val, valid, eval, evaluation), split "
                            "name, or for wds/ a shard pattern such as 'validation-{0000..0063}.tar'")
    group.add_argument("--num-samples", type=COUNT, default=None, metavar="N",
                       help="samples in the split, for streamed readers (default: from _info.json, or counted)")
    add_model_arguments(parser, default_model=DEFAULT_MODEL)
    parser.set_defaults(model=None)  # not given: the checkpoint's own architecture, else DEFAULT_MODEL
    next(action for action in parser._actions if action.dest == "model").help = (
        f"a timm model name, with an optional .tag, or hf-hub:OWNER/NAME or local-dir:FOLDER (default: the "
        f"--checkpoint's architecture, else {DEFAULT_MODEL})")
    group = parser.add_argument_group("run")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=KeywordArguments, metavar="KEY=VALUE",
                       help="extra keyword arguments for timm.create_model (default: a kat-train checkpoint's)")
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                       help="autocast dtype (default: float16 on cuda, bfloat16 on cpu)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    group.add_argument("--results-file", default="", metavar="FILE.json", help="also write the JSON result here")
    return parser


def add_data_arguments(parser: argparse.ArgumentParser, title: str, batch_size: int):
    """The data options kat-train and kat-validate share (timm's names); returns their group for the split options."""
    parser.add_argument("data", nargs="?", metavar="DIR", default=None,
                        help="the dataset folder (timm's older positional form of --data-dir)")
    group = parser.add_argument_group(title)
    group.add_argument("--data-dir", metavar="DIR", default=None,
                       help="dataset root holding the split folders (wds/: the shard folder; hfds/, torch/: the "
                            "cache or download folder)")
    add_dataset_reader_arguments(group)
    group.add_argument("--class-map", metavar="FILE", default="",
                       help="text file of class folder names, one per line, in label order (default: the sorted "
                            "folder names)")
    group.add_argument("--img-size", type=int, default=None, metavar="N",
                       help="image size, a multiple of the model's patch size (16 for the KAT models). A model with "
                            "a fixed input size (ViT, KAT) also gets img_size=N, so its position embedding fits; "
                            "pretrained position embeddings are resampled")
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
    group.add_argument("-b", "--batch-size", type=COUNT, default=batch_size, metavar="N",
                       help=f"batch size (default: {batch_size})")
    group.add_argument("-j", "--workers", type=INDEX, default=None, metavar="N",
                       help="data loading worker processes (default: 4, or the usable CPU count if lower; 0 "
                            "loads in the main process)")
    return group


def check_data_options(args: argparse.Namespace, layout: str) -> None:
    """A usage error without the --data-dir an ImageFolder or wds/ needs; the default --workers filled in."""
    from kat_timm.training.readers import dataset_prefix, is_folder_dataset

    if not args.data_dir and (is_folder_dataset(args.dataset) or dataset_prefix(args.dataset) == "wds"):
        raise CLIError(f"give the dataset folder: --data-dir DIR (layout {layout}; for --dataset wds/NAME the folder "
                       f"of the shards)", code=2)
    if args.workers is None:
        args.workers = default_workers()


class KeywordArguments(argparse.Action):
    """``KEY=VALUE ...`` into a dict, values read as Python literals where they parse (timm's ParseKwargs
    convention, with a usage error instead of a traceback for an item without ``=``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        result = {}
        for item in values:
            if "=" not in item:
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            try:
                result[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                result[key] = value
        setattr(namespace, self.dest, result)


def read_checkpoint_file(path, code: int = 1, **options):
    """:func:`kat_timm.factory.read_checkpoint` (one read of the file), its ``CheckpointError`` a ``CLIError``."""
    from kat_timm.checkpoint import CheckpointError
    from kat_timm.factory import read_checkpoint

    try:
        return read_checkpoint(path, **options)
    except CheckpointError as error:
        raise CLIError(str(error), code=code) from None


def _trained_classes(split, trained: List[str], checkpoint: Path):
    """The split labelled in the order of the classes a kat-train checkpoint was trained on (a subset may be
    evaluated); folders the model never saw are an error."""
    from kat_timm.training.data import ImageFolderSplit

    unknown = [name for name in split.classes if name not in trained]
    if unknown:
        shown = ", ".join(trained[:10]) + (f" and {len(trained) - 10} more" if len(trained) > 10 else "")
        raise CLIError(f"{split.root} has class folders the checkpoint {checkpoint} was not trained on: "
                       f"{', '.join(unknown[:10])}; it was trained on {shown}")
    return ImageFolderSplit(split.root, tuple(trained))


# The options of timm's data config that a training checkpoint's args carry (kat-train's and timm train.py's).
_PREPROCESSING = ("img_size", "input_size", "crop_pct", "mean", "std", "interpolation")


def _preprocessing(args: argparse.Namespace, trained: Dict[str, Any]) -> Dict[str, Any]:
    """The data-config options: each from the command line, else as the checkpoint was trained, else unset (the
    model's pretrained_cfg). An image size on the command line replaces both of the checkpoint's size options."""
    given = {name: getattr(args, name) for name in _PREPROCESSING}
    sized = given["img_size"] is not None or given["input_size"] is not None
    options = {}
    for name, value in given.items():
        if value in (None, "") and not (sized and name in ("img_size", "input_size")):
            value = trained.get(name)
        options[name] = None if value == "" else value
    return options


def resolve_checked_data_config(options: Dict[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
    """timm's ``resolve_data_config(options, model=model)``, with a clear error for a ``--mean``/``--std`` that has
    neither one value nor one per input channel (timm asserts)."""
    from timm.data import resolve_data_config

    input_size = options.get("input_size")
    channels = int(input_size[0]) if input_size else 3  # what resolve_data_config assumes without input_size
    for name in ("mean", "std"):
        values = options.get(name)
        if values is not None and len(values) not in (1, channels):
            raise CLIError(f"--{name} takes 1 value or one per input channel ({channels}), got {len(values)}: "
                           f"{' '.join(map(str, values))}", code=2)
    return resolve_data_config(options, model=model)


def open_split(args: argparse.Namespace, split: str, **options):
    """:func:`~kat_timm.training.readers.open_checked_split` of kat-train and kat-validate, its ``DataError`` a
    ``CLIError`` (a usage error, code 2, for a reader's dataset)."""
    from kat_timm.training.readers import is_folder_dataset, open_checked_split

    try:
        return open_checked_split(args, split, **options)
    except DataError as error:
        raise CLIError(str(error), code=1 if is_folder_dataset(args.dataset) else 2) from error


def _validate(args: argparse.Namespace) -> int:
    from kat_timm.training.readers import is_folder_dataset

    args.data_dir = args.data_dir or args.data
    folder = is_folder_dataset(args.dataset)
    check_data_options(args, "DIR/validation/CLASS/*.png")
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes must be at least 1, got {args.num_classes} (leave it out to use the "
                       f"checkpoint's or the model's)", code=2)
    check_preprocessing(vars(args))
    check_backend_setting()
    results_file = Path(args.results_file) if args.results_file else None
    if results_file is not None:
        _check_writable(results_file, _inputs(args))
    device = resolve_device(args.device)
    check_backend_setting(device)

    if args.pretrained and args.checkpoint is not None:
        raise CLIError("give --pretrained or --checkpoint, not both", code=2)
    # Its EMA weights where it has them unless --no-ema (the one rule of every command), and its run's options.
    loaded = read_checkpoint_file(args.checkpoint, use_ema=args.use_ema) if args.checkpoint is not None else None
    trained = loaded.args if loaded is not None else {}
    args.model = args.model or (loaded.architecture if loaded is not None else None) or DEFAULT_MODEL
    trained_classes = list(trained.get("class_names") or []) or _folder_label_names(args.model)
    relabel = None
    if trained_classes and not args.class_map:
        relabel = functools.partial(_trained_classes, trained=trained_classes, checkpoint=args.checkpoint or args.model)
    dataset, classes, data_name = open_split(args, args.split, allow_missing=True, relabel=relabel,
                                             num_samples=args.num_samples)
    if not folder and classes is not None and trained_classes and trained_classes != classes:
        raise CLIError(f"{args.dataset} {args.split} names other classes than the checkpoint {args.checkpoint} was "
                       f"trained on ({len(classes)} vs {len(trained_classes)}, or another order), so the labels "
                       f"would not match")

    # A training checkpoint (kat-train's or timm train.py's) remembers how its images were prepared; evaluating
    # with other preprocessing (size, mean/std, crop) or another pooling would load fine and score silently lower.
    preprocessing = _preprocessing(args, trained)
    input_size = preprocessing["input_size"]
    size = input_size[1:] if input_size else ([preprocessing["img_size"]] if preprocessing["img_size"] else None)
    model_kwargs = dict(trained.get("model_kwargs") or {})
    if trained.get("gp"):
        model_kwargs["global_pool"] = trained["gp"]
    model_kwargs.update(args.model_kwargs)
    if loaded is not None and (args.img_size is not None or args.input_size is not None):
        model_kwargs.pop("img_size", None)  # the size given here replaces the checkpoint run's
    # The checkpoint's architecture, size and classes unless given here.
    given = "--input-size" if args.input_size is not None else "--img-size" if args.img_size is not None else None
    model = create_sized_model(args.model, size, given, pretrained=args.pretrained or None, checkpoint=loaded,
                               use_ema=args.use_ema, num_classes=args.num_classes, **model_kwargs)
    if loaded is not None:
        _say_which_weights(loaded)
    num_classes = getattr(model, "num_classes", None)
    # Labels from sorted folder names mean something only for a model with exactly that many classes; labels from
    # the checkpoint's class list or a class map may use the first outputs of a larger classifier
    # (kat-train --num-classes above the folder count). A reader's own class names are its labels.
    labelled = bool(args.class_map) or bool(trained_classes) or not folder
    if classes is not None and num_classes is not None and (
            num_classes < len(classes) or (num_classes != len(classes) and not labelled)):
        what = "class folders" if folder else "classes"
        raise CLIError(f"the model has {num_classes} classes but {data_name} has {len(classes)} {what}; validate a "
                       f"checkpoint trained on these classes (--checkpoint), or give --class-map with the model's "
                       f"{num_classes} class names in label order")
    model.to(device)

    built_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if preprocessing["img_size"] is None and preprocessing["input_size"] is None and built_size is not None:
        preprocessing["input_size"] = (3, *built_size)  # e.g. a run given only --model-kwargs img_size=32
    data_config = resolve_checked_data_config(preprocessing, model)
    loader = create_eval_loader(dataset, data_config, args.batch_size, args.workers,
                                pin_memory=device.type == "cuda")
    class_count = f"{len(classes)} classes" if classes is not None else "classes unnamed"
    print(f"validating {args.model} on {data_name}: {len(dataset)} images, {class_count}, "
          f"input {tuple(data_config['input_size'])}, {device.type}", file=sys.stderr)
    try:
        metrics = evaluate(model, loader, device, amp_autocast(args.amp, args.amp_dtype, device))
    except DataError as error:  # from a loader worker it carries the worker's traceback: keep the last line
        raise CLIError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    return _report(args, model, data_config, metrics, len(dataset), results_file)


def _folder_label_names(model: Optional[str]) -> List[str]:
    """The class names a ``local-dir:`` model folder's config.json lists (as kat-timm publish writes them), so its
    split is labelled in the model's order, as for the checkpoint it was published from; [] for other names."""
    from kat_timm.factory import local_dir_config

    if not model or not model.startswith("local-dir:"):
        return []
    try:
        names = local_dir_config(model).get("label_names")
    except (OSError, ValueError):
        return []
    return [str(name) for name in names] if isinstance(names, list) else []


def _say_which_weights(loaded) -> None:
    """Where the checkpoint holds EMA and raw weights: which ones are evaluated, how to get the others, and which
    scored higher when the run's summary.csv (beside the checkpoint) has both at the checkpoint's epoch."""
    from kat_timm.checkpoint import EMA_KEYS
    from kat_timm.training.summary import compare_ema, run_summary

    other = loaded.other_weights
    ema = loaded.source in EMA_KEYS
    if other is None:
        if ema:  # an EMA-only file: no choice to make, but say which weights these are
            print(f"note: evaluating the EMA weights ({loaded.source}) of {loaded.path}, the only weights it holds",
                  file=sys.stderr)
        return
    which = "EMA" if ema else "raw model"
    switch = "--no-ema evaluates its raw model weights" if ema else "leave out --no-ema to evaluate its EMA weights"
    note = f"evaluating the {which} weights ({loaded.source}) of {loaded.path}; {switch}"
    epoch = loaded.raw.get("epoch") if isinstance(loaded.raw.get("epoch"), int) else None
    comparison = compare_ema(run_summary(loaded.path), epoch)
    if comparison is not None and comparison.ema != comparison.raw:
        scored = "the EMA weights" if comparison.ema_better else "the raw model weights"
        evaluated = comparison.ema_better == ema
        note += (f" (in training {scored} scored higher: {comparison.describe()}"
                 f"{'' if evaluated else ', so the others may score higher here too'})")
    print(f"note: {note}", file=sys.stderr)


def _report(args: argparse.Namespace, model, data_config: Dict[str, Any], metrics: Dict[str, float],
            dataset_size: int, results_file: Optional[Path]) -> int:
    """Print (and with --results-file write) the JSON result."""
    result = {
        "model": args.model, "top1": round(metrics["top1"], 4), "top1_err": round(100.0 - metrics["top1"], 4),
        "top5": round(metrics["top5"], 4), "top5_err": round(100.0 - metrics["top5"], 4),
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "img_size": data_config["input_size"][-1], "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"], "loss": round(metrics["loss"], 6),
        "images_per_second": round(metrics["images_per_second"], 2), "num_images": metrics["count"],
        "unreadable_images": max(dataset_size - metrics["count"], 0)}
    if result["unreadable_images"]:
        print(f"{result['unreadable_images']} of {dataset_size} images could not be decoded and were left out "
              f"(named in the warnings above)", file=sys.stderr)
    text = json.dumps(result, indent=4)
    print(text)
    if results_file is not None:
        try:
            results_file.parent.mkdir(parents=True, exist_ok=True)
            edit_atomically(str(results_file), lambda partial: Path(partial).write_text(text + "\n", encoding="utf-8"),
                            start_from_current=False, inputs=_inputs(args), label=f"--results-file {results_file}")
        except OutputPathError as error:
            raise CLIError(str(error), code=2) from None
        except OSError as error:
            raise CLIError(f"--results-file {results_file}: cannot write it ({error.strerror or error})") from None
    return 0


def _inputs(args: argparse.Namespace) -> Dict[str, Any]:
    """The files kat-validate reads, which --results-file must not be."""
    return {"--checkpoint": args.checkpoint, "--class-map": args.class_map}


def _check_writable(path: Path, inputs: Dict[str, Any]) -> None:
    """--results-file: refuse a folder, a device or FIFO, an input file or an unwritable place before the evaluation
    runs, not after it."""
    if path.is_dir():
        raise CLIError(f"--results-file {path} is a folder; give the JSON file to write, e.g. "
                       f"{path / 'results.json'}", code=2)
    check_writable_folder(path.parent, f"--results-file {path}")
    try:
        output_target(path, inputs, label=f"--results-file {path}")
    except OutputPathError as error:
        raise CLIError(str(error), code=2) from None


def main(argv: Optional[List[str]] = None, prog: str = "kat-validate") -> int:
    """Entry point of ``kat-validate`` and ``kat-timm validate``."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: _validate(args), prog)


if __name__ == "__main__":
    sys.exit(main())
