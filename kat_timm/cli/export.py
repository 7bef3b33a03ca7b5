"""``kat-timm export MODEL -o model.onnx``: an ONNX file (:mod:`kat_timm.tools.export`) that ONNX Runtime runs with or
without kat_timm, fastest with kat_timm's kernel (README, "Deployment"); needs the ``onnx`` extra."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import CLIError, run_main

__all__ = ["main"]

# Largest relative error of the logits (||onnx - torch|| / ||torch||) that --check accepts.
CHECK_RTOL = 1e-4


def _parser(prog: str) -> argparse.ArgumentParser:
    from kat_timm.tools.export import DEFAULT_OPSET, MIN_OPSET

    from .common import add_ema_arguments

    parser = argparse.ArgumentParser(
        prog=prog, description="Export a KAT (or any timm image model) to ONNX. Each rational activation is one "
                               "kat_timm node whose function body, in the file, computes it with standard ONNX ops, so "
                               "ONNX Runtime runs the file with or without kat_timm, fastest with kat_timm's kernel "
                               "registered (kat_timm.onnxruntime_session). Input 'images' (N, 3, H, W) float32, "
                               "normalised as the model's pretrained config says; output 'logits'.",
        epilog="example: %(prog)s kat_tiny --pretrained -o kat_tiny.onnx --dynamic-batch --check")
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="timm model name (kat_tiny, kat_base_patch16_224.vitft, ..., hf-hub:OWNER/NAME, "
                             "local-dir:FOLDER; default: the --checkpoint's architecture)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="the released weights (from the Hugging Face Hub or its cache; see 'kat-timm "
                              "download'). Without this or --checkpoint the weights are random")
    weights.add_argument("--checkpoint", metavar="FILE", type=Path,
                         help="weights from this file (a state dict or a training checkpoint, built with the "
                              "architecture, image size and class count it records)")
    add_ema_arguments(parser)
    parser.add_argument("--offline", action="store_true",
                        help="with --pretrained: don't contact the Hugging Face Hub, use its local cache only")
    parser.add_argument("-o", "--output", metavar="FILE", type=Path, required=True,
                        help="the .onnx file to write (its folder must exist; an existing file is replaced once the "
                             "new one is complete)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="let the batch dimension vary (default: fixed to --batch-size)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="batch size of the graph without --dynamic-batch (default: 1)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                        help=f"ONNX opset, at least {MIN_OPSET} (default: {DEFAULT_OPSET}, what PyTorch's exporter "
                             "writes natively; others are converted)")
    parser.add_argument("--img-size", type=int, metavar="N",
                        help="input height and width, a multiple of the model's patch size (16 for the KAT "
                             "models; default: the model's: 224, or a kat-train checkpoint's; position embeddings are "
                             "resampled)")
    parser.add_argument("--inline-rationals", action="store_true",
                        help="write the rationals' function bodies inlined: standard ONNX ops only, no kat_timm "
                             "nodes (for tools that don't read ONNX functions, e.g. OpenVINO; ONNX Runtime then "
                             "can't use kat_timm's kernel)")
    parser.add_argument("--check", action="store_true",
                        help=f"run the file with onnxruntime (CPU) next to PyTorch on random images, as any runtime "
                             f"runs it and with kat_timm's kernel, and print the relative error of the logits; fail "
                             f"above {CHECK_RTOL:g}")
    return parser


def _validate(args: argparse.Namespace) -> None:
    from kat_timm.tools.export import MissingDependencyError, check_export_target, require_packages

    from .common import check_image_size

    try:
        check_export_target(args.output, args.opset)
    except ValueError as error:
        raise CLIError(f"--{error}", code=2) from None
    except FileNotFoundError as error:
        raise CLIError(str(error)) from None
    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1", code=2)
    check_image_size(args.img_size)
    if args.use_ema is not None and args.checkpoint is None:
        raise CLIError(f"{'--use-ema' if args.use_ema else '--no-ema'} needs --checkpoint", code=2)
    folder = args.output.parent
    if args.output.is_dir():
        raise CLIError(f"{args.output} is a folder; give the .onnx file to write (-o {args.output / 'model.onnx'})",
                       code=2)
    _check_output(args)
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write to the folder {folder} (permission denied)")
    try:
        names = ("onnx", "onnxscript") + (("onnxruntime",) if args.check else ())
        require_packages(*names, purpose="kat-timm export --check" if args.check else "kat-timm export")
    except MissingDependencyError as error:
        raise CLIError(str(error)) from error


def _check_output(args: argparse.Namespace) -> None:
    """-o: not a device, FIFO or socket (a rename would replace it), and not the --checkpoint it reads."""
    from kat_timm.files import OutputPathError, output_target

    try:
        output_target(args.output, {"--checkpoint": args.checkpoint}, label=f"-o {args.output}")
    except OutputPathError as error:
        raise CLIError(str(error), code=2) from None


def _format_shape(shape) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _run(args: argparse.Namespace, prog: str) -> int:
    _validate(args)  # before building the model: the usual mistakes fail in a second
    # A name is the user's to choose (a refusal would block m.onnx.tmp or a FIFO), but m.txt is likely a slip.
    if args.output.suffix.lower() != ".onnx" and (args.output.is_file() or not args.output.exists()):
        print(f"{prog}: warning: {args.output} does not end in .onnx; an ONNX model is written there all the same",
              file=sys.stderr)
    from kat_timm.tools.export import (INPUT_NAME, OUTPUT_NAME, OpsetConversionError, check_onnx, export_onnx,
                                       onnx_io_shapes)

    import torch

    from .common import check_backend_setting, check_model_input_size, create_model

    if args.model is None and args.checkpoint is None:
        raise CLIError("give the MODEL to export, or --checkpoint FILE to export the model it holds", code=2)
    check_backend_setting(torch.device("cpu"))  # the model is traced on the CPU
    # A checkpoint's model is built at the size it was trained at, then resized by --img-size.
    model = create_model(args.model, pretrained=args.pretrained or None, checkpoint=args.checkpoint, use_ema=args.use_ema,
                         offline=args.offline, alternatives=("--checkpoint FILE",))
    args.model = args.model or model.pretrained_cfg.get("architecture")
    if not args.pretrained and args.checkpoint is None:
        print(f"{prog}: warning: no --pretrained or --checkpoint: exporting {args.model} with random weights",
              file=sys.stderr)
    if args.img_size is not None:
        if not hasattr(model, "set_input_size"):
            raise CLIError(f"{args.model} can't change its input size (no set_input_size); drop --img-size", code=2)
        check_model_input_size(model, [args.img_size], "--img-size", whole_patches=True)
        model.set_input_size(img_size=(args.img_size, args.img_size))
    model = model.eval().float()
    try:
        export_onnx(model, args.output, dynamic_batch=args.dynamic_batch, opset=args.opset, batch_size=args.batch_size,
                    inline_rationals=args.inline_rationals)
    except OpsetConversionError as error:
        raise CLIError(str(error)) from error
    except PermissionError as error:
        raise CLIError(f"{args.output}: cannot write the file ({error.strerror})") from error
    shapes = onnx_io_shapes(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB, opset {args.opset}): "
          f"{INPUT_NAME} {_format_shape(shapes[INPUT_NAME])} -> {OUTPUT_NAME} {_format_shape(shapes[OUTPUT_NAME])}")
    if args.check:
        batches = (1, 3) if args.dynamic_batch else (args.batch_size,)
        for fast, how in ((False, "onnxruntime"), (True, "onnxruntime + kat_timm kernel")):
            if fast and args.inline_rationals:
                continue  # no kat_timm nodes left for the kernel
            try:
                errors = check_onnx(args.output, model, batch_sizes=batches, fast=fast)
            except RuntimeError as error:  # the kernel can't be built here (no C compiler): the file still runs
                print(f"{how}: not checked ({str(error).splitlines()[0]})")
                continue
            worst = max(errors.values())
            detail = ", ".join(f"batch {batch}: {error:.2e}" for batch, error in errors.items())
            print(f"{how} vs PyTorch, relative error of the logits: {detail} (max {worst:.2e})")
            if not worst <= CHECK_RTOL:  # also catches NaN
                raise CLIError(f"{how}'s logits differ from PyTorch's by {worst:.2e} (relative), more than "
                               f"{CHECK_RTOL:g}")
    return 0


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm export") -> int:
    """Entry point of ``kat-timm export``."""
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: _run(args, prog), prog)
