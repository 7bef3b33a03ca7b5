"""``kat-timm plot -o activations.png``: every block's learned rational activations (act1, act2), drawn by
:func:`kat_timm.tools.plot.plot_rationals`, with the weights options of ``kat-timm predict``; needs matplotlib."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from . import CLIError, run_main
from .common import add_weight_source_arguments

__all__ = ["main"]

# matplotlib's Agg renderer refuses images of 2**16 pixels a side; far below that, the pixel buffer (4 bytes a pixel)
# is what runs out: 1e8 pixels are 400 MB.
MAX_SIDE_PIXELS = 2 ** 16
MAX_PIXELS = 1e8


def build_parser(prog: str) -> argparse.ArgumentParser:
    from ..tools.plot import REFERENCES

    parser = argparse.ArgumentParser(
        prog=prog, description="Draw every block's rational activations (act1, act2) of a KAT to an image file.")
    # A str, not a Path: Path drops a trailing slash, and "-o plots/" then wrote plots.png.
    parser.add_argument("-o", "--output", default="activations.png",
                        help="image file to write; the format follows the extension: .png, .pdf, .svg, ... (.png "
                             "when there is none; default: activations.png)")
    add_weight_source_arguments(parser, default_model="kat_tiny",
                                random_help="plot the initialisation (no weights loaded)")
    parser.add_argument("--reference", choices=(*REFERENCES, "none"), default="init",
                        help="dashed comparison curve: each layer's init function (default), identity, gelu, "
                             "swish, or none")
    parser.add_argument("--x-range", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LOW", "HIGH"),
                        help="x axis range (default: -3 3)")
    parser.add_argument("--use-layer", action="store_true",
                        help="evaluate the layers' own kernels instead of the float64 reference formula")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of raster output (default: 100)")
    # argparse (before Python 3.13) reads "-1e3" as an option, so "--x-range -1e3 1e3" failed; this is the pattern
    # 3.13 itself uses: a dash followed by a digit or a decimal point is a negative number.
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    return parser


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm plot") -> int:
    """Entry point of ``kat-timm plot``."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        low, high = args.x_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise CLIError(f"--x-range {low:g} {high:g}: give two finite numbers LOW HIGH with LOW < HIGH", code=2)
        from ..tools.plot import INSTALL_HINT, find_rationals, plot_rationals, require_matplotlib
        from .common import create_model_from_options, is_weights_name

        try:
            require_matplotlib()  # before the model: a missing extra is the first thing to hear about
        except ImportError:
            raise CLIError(INSTALL_HINT) from None
        if args.dpi < 1:
            raise CLIError("--dpi must be >= 1", code=2)
        if args.output.endswith(("/", os.sep)) and not os.path.isdir(args.output):
            raise CLIError(f"-o {args.output}: no such folder; give the image file to write, e.g. "
                           f"{os.path.join(args.output, 'activations.png')} once the folder exists", code=2)
        args.output = Path(args.output)
        if args.output.is_dir():
            raise CLIError(f"{args.output} is a folder; give the image file to write, e.g. "
                           f"{args.output / 'activations.png'}", code=2)
        if not args.output.suffix:  # matplotlib would add .png itself, and the message would name another file
            args.output = args.output.with_name(args.output.name + ".png")
        from matplotlib.backend_bases import FigureCanvasBase

        formats = set(FigureCanvasBase.get_supported_filetypes())  # the extensions savefig writes
        if args.output.suffix[1:].lower() not in formats:
            raise CLIError(f"{args.output}: matplotlib cannot write {args.output.suffix} files; use one of "
                           f"{', '.join('.' + f for f in sorted(formats))}", code=2)
        if not args.output.parent.is_dir():
            raise CLIError(f"{args.output}: the folder {args.output.parent} does not exist")
        from ..files import OutputPathError, edit_atomically, output_target

        inputs = {"--checkpoint": args.checkpoint}
        try:
            output_target(args.output, inputs, label=f"-o {args.output}")  # before the model: a mistake fails fast
        except OutputPathError as error:
            raise CLIError(str(error), code=2) from None
        model = create_model_from_options(args)
        if not find_rationals(model):
            raise CLIError(f"{args.model} has no rational activations to plot (not a KAT model)", code=2)
        weights = ("random weights" if args.random_weights else
                   f"checkpoint {args.checkpoint.name}" if args.checkpoint else
                   "its own weights" if is_weights_name(args.model) else "released weights")
        try:
            figure = plot_rationals(model, reference=None if args.reference == "none" else args.reference,
                                    x_range=tuple(args.x_range), use_layer=args.use_layer,
                                    title=f"{args.model} ({weights}): rational activations, one curve per group")
        except ValueError as error:
            raise CLIError(str(error), code=2) from None
        width, height = (float(side) * args.dpi for side in figure.get_size_inches())
        if max(width, height) >= MAX_SIDE_PIXELS or width * height > MAX_PIXELS:
            most = int(min(MAX_SIDE_PIXELS / max(width, height), (MAX_PIXELS / (width * height)) ** 0.5) * args.dpi)
            raise CLIError(f"--dpi {args.dpi} makes a {width:.0f} x {height:.0f}-pixel figure, more than matplotlib "
                           f"can draw ({MAX_SIDE_PIXELS - 1} pixels a side, {MAX_PIXELS:.0e} in all); use --dpi "
                           f"{most} or less", code=2)
        try:
            # Through the partial file and a rename, as every output: a folder that fills up keeps the old image.
            edit_atomically(args.output, lambda partial: figure.savefig(partial, format=args.output.suffix[1:],
                                                                        dpi=args.dpi),
                            start_from_current=False, inputs=inputs, label=f"-o {args.output}")
        except (OSError, ValueError) as error:  # ValueError: an extension matplotlib has no writer for
            raise CLIError(f"{args.output}: cannot write the figure ({error})") from None
        print(f"wrote {args.output}: {len(find_rationals(model))} rational activations of {args.model} ({weights})")
        return 0

    return run_main(run, prog)


if __name__ == "__main__":
    sys.exit(main())
