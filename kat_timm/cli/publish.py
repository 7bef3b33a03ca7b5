"""``kat-timm publish CHECKPOINT -o FOLDER [--repo-id OWNER/NAME] [--push]``: a checkpoint (kat-train's, timm
train.py's or a released file) as a Hub folder that timm (``local-dir:``/``hf-hub:``), transformers and every kat-timm
command load, with its class names, image size and an honest model card; ``--push`` uploads it. The library side is
:func:`kat_timm.tools.hub.convert_checkpoint` (scripts/convert_checkpoint.py runs this same command)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import CLIError, run_main
from .common import EMA_RULE, add_ema_arguments, check_writable_folder

__all__ = ["build_parser", "main"]


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The argument parser of ``kat-timm publish``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Write a KAT checkpoint as a Hugging Face Hub model folder (config.json with the "
                               "class names, image size and model arguments; model.safetensors and "
                               "pytorch_model.bin; README.md, a model card from what the run recorded), and "
                               "optionally upload it.",
        epilog=f"Weights: {EMA_RULE} (--no-ema for the raw ones). The folder loads with timm.create_model("
               "'local-dir:FOLDER', pretrained=True) after 'import kat_timm', with transformers' "
               "AutoModelForImageClassification or pipeline, and with 'kat-timm predict --model local-dir:FOLDER'.")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="kat-train's model_best.pth.tar / last.pth.tar, a timm train.py checkpoint, a released "
                             ".bin/.pth or a .safetensors file")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="FOLDER",
                        help="folder to write (must be empty or absent)")
    parser.add_argument("--repo-id", metavar="OWNER/NAME",
                        help="Hub repo the card's usage snippets name (default: the local folder); with --push, the "
                             "repo to upload to")
    parser.add_argument("--push", action="store_true",
                        help="upload the folder to --repo-id (created if missing) with huggingface_hub; the token "
                             "comes from HF_TOKEN or 'hf auth login'")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    parser.add_argument("--model", help="the model name, to check the checkpoint against it (default: the one it "
                                        "records, or the released KAT its shapes match)")
    parser.add_argument("--tag", help="pretrained tag written in the config: '' (default for a training run) or "
                                      "vitft (released weights of the ViT-initialised models)")
    add_ema_arguments(parser, "--ema", given="")
    parser.add_argument("--safe-serialization", choices=("both", "true"), default="both",
                        help="both: model.safetensors and pytorch_model.bin (default); true: model.safetensors only")
    parser.add_argument("--force", action="store_true", help="overwrite the files of a non-empty output folder")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the folder to check the weights")
    return parser


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(f"--repo-id {repo_id}: not a Hub repo id ({str(error).splitlines()[0]})", code=2) from None
    if repo_id.count("/") != 1:
        raise CLIError(f"--repo-id {repo_id}: give OWNER/NAME (your user or organisation, then the model's name)",
                       code=2)


def _publish(args: argparse.Namespace, prog: str) -> int:
    from kat_timm.checkpoint import CheckpointError, folder_given_message
    from kat_timm.tools.hub import PushError, convert_checkpoint, push_folder

    from .common import check_backend_setting

    if args.private and not args.push:
        raise CLIError("--private makes the repo that --push creates private; add --push, or leave --private out",
                       code=2)
    if args.push and not args.repo_id:
        raise CLIError("--push needs --repo-id OWNER/NAME (the Hub repo to upload to)", code=2)
    if args.repo_id:
        _check_repo_id(args.repo_id)
    if args.push:
        from huggingface_hub import constants

        if constants.is_offline_mode():  # said before the work, not after it
            raise CLIError(f"--push: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set); unset it to "
                           f"upload, or publish without --push and upload {args.output_dir} later "
                           f"('hf upload {args.repo_id} {args.output_dir}')", code=2)
    if args.checkpoint.is_dir():  # (publish takes no model name: a folder it wrote is to upload, not to load)
        advice = ("; it is published already: upload it with 'hf upload OWNER/NAME {folder}', or give the checkpoint "
                  "it was written from")
        raise CLIError(folder_given_message(args.checkpoint, hub_advice=advice), code=2)
    check_writable_folder(args.output_dir, f"-o {args.output_dir}")
    check_backend_setting()
    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, model_name=args.model, tag=args.tag,
                                    use_ema=args.use_ema, force=args.force, repo_id=args.repo_id,
                                    safe_serialization=True if args.safe_serialization == "true" else "both",
                                    verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError) as error:
        raise CLIError(str(error), code=2) from None
    except OSError as error:
        raise CLIError(f"-o {args.output_dir}: cannot write the folder ({error.strerror or error})") from None
    name = f"{result.model_name}.{result.tag}" if result.tag else result.model_name
    weights = f"checkpoint[{result.source_key!r}]" if result.source_key else "state dict"
    size = f", {result.img_size[0]}x{result.img_size[1]} px" if result.img_size else ""
    labels = f" ({', '.join(result.label_names[:5])}{' ...' if len(result.label_names) > 5 else ''})" \
        if result.label_names else ""
    print(f"converted {args.checkpoint} ({weights}) -> {name}, {result.num_params:,} params, "
          f"{result.num_classes} classes{labels}{size}")
    print(f"wrote {result.output_dir}: {', '.join(result.files)}")
    if args.push:
        try:
            url = push_folder(result.output_dir, args.repo_id, private=args.private or None)
        except PushError as error:
            raise CLIError(f"{error}; the folder {result.output_dir} is written: upload it later with 'hf upload "
                           f"{args.repo_id} {result.output_dir}'") from None
        print(f"uploaded to {url}; load it with timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    else:
        print(f"load it with timm.create_model('local-dir:{result.output_dir}', pretrained=True) after "
              f"'import kat_timm'" + (f"; upload it with {prog} ... --repo-id {args.repo_id} --push"
                                      if args.repo_id else ""))
    return 0


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm publish") -> int:
    """Entry point of ``kat-timm publish`` (and of scripts/convert_checkpoint.py)."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: _publish(args, prog), prog)


if __name__ == "__main__":
    sys.exit(main())
