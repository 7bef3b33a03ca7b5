"""``kat-timm download MODEL[.TAG]... [--cache-dir DIR]``: released weights into the Hugging Face cache (README,
"Offline machines"); a model that fails is one line on stderr, the others are still fetched (exit code 1)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import CLIError, run_main

__all__ = ["main"]

ALL = "all"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fetch the config and weights of released models into the Hugging Face cache, so that "
                               "timm.create_model(name, pretrained=True) later works offline (HF_HUB_OFFLINE=1) on a "
                               "machine that shares the cache. Files already cached are not fetched again.",
        epilog="examples: %(prog)s kat_tiny kat_base.vitft | %(prog)s all | "
               "%(prog)s all --cache-dir /shared/hf-hub  (then: export HF_HUB_CACHE=/shared/hf-hub)")
    parser.add_argument("models", nargs="+", metavar="MODEL[.TAG]",
                        help=f"timm model names with an optional pretrained tag (kat_tiny, kat_small.vitft, "
                             f"kat_base_patch16_224), hf-hub:owner/repo, or '{ALL}' for every released KAT checkpoint")
    parser.add_argument("--cache-dir", metavar="DIR", type=Path,
                        help="Hugging Face hub cache folder to fill instead of the default (HF_HUB_CACHE, else "
                             "~/.cache/huggingface/hub). timm only reads it when HF_HUB_CACHE=DIR is set, so run "
                             "your program with HF_HUB_CACHE=DIR (and HF_HUB_OFFLINE=1 offline)")
    parser.add_argument("--force", action="store_true",
                        help="fetch every file again, even when cached (a cached file whose content does not match "
                             "its checksum is fetched again anyway)")
    return parser


def _run(args: argparse.Namespace, prog: str) -> int:
    from huggingface_hub import constants

    from kat_timm.tools.download import (DownloadError, download_pretrained, format_size, released_models,
                                         resolve_hub_repo)

    # "all": every released checkpoint; duplicates dropped, order kept
    names = list(dict.fromkeys(item for name in args.models for item in (released_models() if name == ALL else [name])))
    unknown = 0
    for name in names:  # every name checked before anything is fetched
        try:
            resolve_hub_repo(name)
        except ValueError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            unknown += 1
    if unknown:
        return 2
    if args.force and constants.is_offline_mode():
        raise CLIError("--force fetches every file from the Hub again, but HF_HUB_OFFLINE=1 is set: run it without "
                       "HF_HUB_OFFLINE on a machine that reaches the Hub", code=2)
    if args.cache_dir is not None:
        if args.cache_dir.exists() and not args.cache_dir.is_dir():
            raise CLIError(f"--cache-dir {args.cache_dir} exists and is not a folder", code=2)
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CLIError(f"--cache-dir {args.cache_dir}: cannot create it ({error.strerror or error})",
                           code=2) from None
    cache = args.cache_dir if args.cache_dir is not None else constants.HF_HUB_CACHE

    fetched = cached = failures = 0
    for name in names:
        try:
            result = download_pretrained(name, cache_dir=args.cache_dir, force=args.force)
        except DownloadError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            failures += 1
            continue
        print(f"{result.model} ({result.repo_id})")
        width = max(len(f.filename) for f in result.files)
        for file in result.files:
            status = "fetched" if file.fetched else "already cached"
            print(f"  {file.filename:<{width}}  {format_size(file.size):>9}  {status}")
        print(f"  in {result.folder}")
        fetched += result.fetched_bytes
        cached += result.cached_bytes
    done = len(names) - failures
    if done:
        print(f"{done} of {len(names)} model(s) ready in {cache}: fetched {format_size(fetched)}, "
              f"{format_size(cached)} already cached")
    if done and args.cache_dir is not None:
        print(f"timm reads this cache with HF_HUB_CACHE={args.cache_dir} (add HF_HUB_OFFLINE=1 on offline machines)")
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm download") -> int:
    """Entry point of ``kat-timm download``."""
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: _run(args, prog), prog)
