"""The ``kat-timm`` command: one entry point, one module per subcommand (``kat_timm/cli/<name>.py`` with
``main(argv, prog) -> int``), imported only when it runs. Bad input is a :class:`CLIError`, which ``run_main``
prints as ``<prog>: error: <message>`` with its exit code (2 for usage errors, as argparse does; 1 otherwise).
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from typing import Callable, List, Optional

__all__ = ["CLIError", "SUBCOMMANDS", "main", "run_main"]

# name -> one-line summary, in the order ``kat-timm --help`` lists them.
SUBCOMMANDS = {
    "demo": "build KAT-T, check the op against the reference, classify the bundled images, time KAT vs ViT",
    "info": "the op's backend on this machine, versions, the registered models with parameters and top-1",
    "predict": "top-5 ImageNet labels for images",
    "plot": "draw every block's learned rational activations (act1, act2) to a PNG",
    "download": "fetch released weights into the Hugging Face cache for offline machines",
    "export": "export a KAT to ONNX (ONNX Runtime with or without kat_timm; fastest with kat_timm's kernel)",
    "publish": "write a checkpoint as a Hub model folder (labels, size, model card) and optionally upload it",
    "train": "train or fine-tune a timm model on an ImageFolder (same as kat-train)",
    "validate": "top-1/top-5/loss on an ImageFolder split (same as kat-validate)",
}


class CLIError(Exception):
    """Bad input a command line can fix: printed as ``<prog>: error: <message>`` with exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _PrefixedFormatter(logging.Formatter):
    """Log records of timm and kat_timm as the command's own lines: ``<prog>: <message>``, with ``warning:`` (or
    ``error:``) before the message as our own warnings have it."""

    def __init__(self, prog: str):
        super().__init__("%(message)s")
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        kind = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{self.prog}: {kind}{super().format(record)}"


def _route_logging(prog: str) -> None:
    """Send log records (timm's and ours) to stderr prefixed with ``prog``, unless the process has configured logging
    itself (an application or a test that calls a command's ``main``): unconfigured, Python printed bare messages."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_PrefixedFormatter(prog))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def run_main(func: Callable[[], int], prog: str) -> int:
    """Run ``func`` and turn a :class:`CLIError` into a one-line message on stderr and its exit code; log records
    are printed as the command's own lines."""
    _route_logging(prog)
    try:
        return int(func() or 0)
    except CLIError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``kat-timm info | head``): not an error of ours. Point stdout at devnull so that
        # the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMANDS.items()]
    return ("usage: kat-timm COMMAND [ARGS...]\n\nThe Kolmogorov-Arnold Transformer for timm.\n\ncommands:\n"
            + "\n".join(lines) + "\n\n'kat-timm COMMAND --help' describes a command's arguments.")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``kat-timm``: dispatch ``argv[0]`` to ``kat_timm.cli.<argv[0]>.main``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from kat_timm import __version__

        print(f"kat-timm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"kat-timm: error: unknown command {name!r}; {hint}choose from {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"kat_timm.cli.{name}")
    return module.main(rest, prog=f"kat-timm {name}")
