#!/usr/bin/env python
"""Resource report of the Triton kernels, compiled for GPUs without one; see scripts/README.md, "Kernel report"."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from kat_timm.benchmark import json_path_problem
from kat_timm.files import OutputPathError, edit_atomically
from kat_timm.ops.kernel_report import ARCHS, TOKENS, kat_shapes, op_launches, report_rows

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VARIANTS = {"plain": (False, False), "bias": (True, False), "safe": (False, True), "safe+bias": (True, True)}
ODD_SHAPES = [("odd C=40 (L=5)", (37, 8, 5)), ("odd C=168 (L=21)", (1000, 8, 21)),
              ("image 2x40x5x3 (L=75)", (2, 8, 75)), ("C=96 (L=12)", (640, 8, 12))]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every option's default, and the description as written."""


def main(argv=None) -> int:
    """Compile the kernels, print the markdown report, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS) + ["all"], default=["sm_80", "sm_90a"],
                        metavar="ARCH", help=f"targets: {', '.join(ARCHS)}, or all")
    parser.add_argument("--batch", nargs="+", type=int, default=[128, 1], help="batch sizes (x 197 tokens)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES), metavar="DTYPE",
                        help=f"{', '.join(sorted(DTYPES))}")
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS) + ["all"], default=["plain"], metavar="VARIANT",
                        help="plain, bias (input bias), safe (the large-|x| pass), safe+bias, or all")
    parser.add_argument("--odd", action="store_true", help="also report odd shapes (masked, unaligned)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch):
        parser.error("--batch values must be >= 1")
    problem = json_path_problem(args.json)  # before the compile: a bad path must not cost the run
    if problem:
        parser.error(f"--json {args.json}: {problem}")
    arches = list(ARCHS) if "all" in args.arch else list(dict.fromkeys(args.arch))
    variants = list(VARIANTS) if "all" in args.variant else list(dict.fromkeys(args.variant))
    shapes = []
    for batch in args.batch:
        shapes += [(f"{label} batch {batch}", shape) for label, shape in kat_shapes(batch)]
    if args.odd:
        shapes += ODD_SHAPES
    try:
        rows = report_rows(shapes, [DTYPES[d] for d in args.dtype], arches,
                           variants=[(name, *VARIANTS[name]) for name in variants])
        launches = {arch: op_launches((128 * TOKENS, 8, 24), torch.float32, arch) for arch in arches}
    except RuntimeError as error:  # a bundled tool missing or failing: one line, not a traceback
        print(f"kernel_report: {error}", file=sys.stderr)
        return 1
    import triton

    print(f"# Triton kernel resources ({datetime.date.today().isoformat()}, triton {triton.__version__}, "
          f"static compile, no GPU needed)\n")
    for arch in arches:
        a = ARCHS[arch]
        unit = "CU" if a.backend == "hip" else "SM"
        print(f"- {arch} ({a.device}: {a.sm_count} {unit}s, warp {a.warp_size}, {a.hbm_bytes_per_s / 1e12:.2f} TB/s, "
              f"latency {a.latency_s * 1e6:.1f} us assumed): {a.needed_in_flight / 1024:.1f} KB in flight per {unit} "
              f"keep HBM busy." + (f" Note: {a.note}." if a.note else ""))
    print("\nThe op at (128 x 197, 192) fp32 (KAT-T act1), launches and the programs each starts:\n")
    for arch, ops in launches.items():
        print(f"- {arch}: " + "; ".join(f"{direction}: {len(kernels)} launches ("
                                         + ", ".join(f"{name} {programs}" for name, programs in kernels) + ")"
                                         for direction, kernels in ops.items()))
    print(f"\nRows are (M, G, L) with M = batch x {TOKENS} tokens. Registers are VGPRs (SGPRs after the slash) on AMD. "
          "Loads and stores are bytes per thread per iteration (16-byte vector / narrower).\n")
    print("| arch | shape | (M, G, L) | dtype | kernel | variant | regs | spill B | stack B | smem B | warps | "
          "programs/SM | occupancy | load B (vec/narrow) | store B (vec/narrow) | in flight/SM | HBM bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        regs = f"{r['registers']}/{r['sgprs']}" if r["sgprs"] is not None else f"{r['registers']}"
        print(f"| {r['arch']} | {r['label']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['variant']} | {regs} | "
              f"{r['spill_bytes']} | {r['stack_bytes']} | {r['shared_bytes']} | {r['num_warps']} | "
              f"{r['programs_per_sm']} | {r['occupancy']:.2f} | {r['vector_load_bytes']}/{r['scalar_load_bytes']} | "
              f"{r['vector_store_bytes']}/{r['scalar_store_bytes']} | {r['in_flight_per_sm'] / 1024:.1f} KB | "
              f"{r['bandwidth_bound'] * 100:.0f}% |")
    if args.json:
        try:
            text = json.dumps({"date": datetime.date.today().isoformat(), "triton": triton.__version__, "rows": rows,
                               "launches": launches}, indent=1, default=str)
            edit_atomically(args.json, lambda partial: Path(partial).write_text(text, encoding="utf-8"),
                            start_from_current=False, label=f"--json {args.json}")
        except (OSError, OutputPathError) as error:
            print(f"kernel_report: can't write {args.json}: {getattr(error, 'strerror', None) or error}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
