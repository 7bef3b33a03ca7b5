#!/usr/bin/env python
"""Convert a KAT checkpoint (released weights or a training checkpoint) into a Hugging Face Hub-ready folder for timm:
the CLI of ``kat_timm.tools.hub.convert_checkpoint`` (README, "Deployment")."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from kat_timm.checkpoint import CheckpointError
from kat_timm.tools.hub import convert_checkpoint


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line and convert; 0 on success, 2 on a bad checkpoint."""
    parser = argparse.ArgumentParser(
        description="Convert a KAT checkpoint into a Hub-ready timm folder (config.json, weights, README.md).")
    parser.add_argument("checkpoint", help="released .bin/.pth, a .safetensors file or a KAT training checkpoint")
    parser.add_argument("--model", help="registered KAT name, e.g. kat_tiny_patch16_224 (optionally .vitft); default: "
                        "inferred from the checkpoint's shapes (embed dim 192/384/768 -> "
                        "kat_tiny/small/base_patch16_224)")
    parser.add_argument("--tag", help="pretrained tag: '' (trained from scratch, default) or vitft")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction,
                        help="--ema: take the EMA weights (error if there are none); --no-ema: the raw model weights; "
                        "default: the EMA weights when the checkpoint has them, as timm does")
    parser.add_argument("-o", "--output-dir", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--safe-serialization", choices=("both", "true"), default="both",
                        help="both: model.safetensors and pytorch_model.bin (default); true: model.safetensors only")
    parser.add_argument("--repo-id", help="Hub repo id for the card's usage snippet")
    parser.add_argument("--force", action="store_true", help="overwrite the files of a non-empty output folder")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the folder to check the weights")
    args = parser.parse_args(argv)
    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, model_name=args.model, tag=args.tag,
                                    use_ema=args.ema, safe_serialization=args.safe_serialization == "true" or "both",
                                    force=args.force, repo_id=args.repo_id, verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = f"{result.model_name}.{result.tag}" if result.tag else result.model_name
    weights = f"checkpoint[{result.source_key!r}]" if result.source_key else "state dict"
    print(f"converted {args.checkpoint} ({weights}) -> {name}, {result.num_params:,} params, "
          f"{result.num_classes} classes")
    print(f"wrote {result.output_dir}: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
