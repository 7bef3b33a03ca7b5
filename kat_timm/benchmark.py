"""What a measurement reports and the benchmark scripts share: the machine (device name, package versions, load
average; also kat-timm demo and info), the scripts' common options, the timer, markdown tables and the JSON file."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from kat_timm.files import OutputPathError, edit_atomically, output_target
from kat_timm.ops import BACKEND_ENV

__all__ = ["device_name", "package_version", "load_average", "benchmark_parser", "parse_benchmark_args", "Timer",
           "load_text", "verdict", "error_text", "markdown_table", "run_meta", "version_lines", "json_path_problem",
           "write_json"]


def device_name(device: str) -> str:
    """The GPU's name for "cuda", else the CPU model (from /proc/cpuinfo where there is one)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> Optional[float]:
    """1-minute load average (None where the OS has none): other busy processes skew CPU timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def benchmark_parser(doc: str, batch_help: str, reps_help: str, quick_help: str) -> argparse.ArgumentParser:
    """A parser with the options of every benchmark script: --device, --batch, --threads, --reps, --quick, --json;
    ``doc`` is the script's module docstring (its first paragraph becomes the description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (top of the script) for what is measured.")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None, help=batch_help)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads on CPU (default: leave PyTorch's setting)")
    parser.add_argument("--reps", type=int, default=None, help=reps_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the raw results to this JSON file")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, reject what no benchmark can run (CUDA where there is none, non-positive thread, repetition or batch
    counts), apply --threads, and record the load average and the date at the start of the run."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for name in ("threads", "reps", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    problem = json_path_problem(args.json)
    if problem:
        parser.error(f"--json {args.json}: {problem}")
    if args.device == "cpu" and args.threads is not None:
        torch.set_num_threads(args.threads)
    args.load_at_start = load_average()
    args.date = datetime.datetime.now().isoformat(timespec="minutes")
    return args


def json_path_problem(path: Optional[str]) -> Optional[str]:
    """Why results can't be written to ``path`` (None when they can, or when no path was given).

    Checked before anything is measured, so a bad ``--json`` never loses a finished measurement: the folder must exist,
    the path must not be a folder, and the file must open for writing (it is opened for appending, so an existing file
    keeps its content until the results replace it, and one created by the check is removed again).
    """
    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if os.path.isdir(path):
        return "is a folder; give a file path such as " + os.path.join(path, "results.json")
    try:
        path = output_target(path, label="it")  # a device, FIFO or socket is refused (opening a FIFO would block)
    except OutputPathError as error:
        return str(error)
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        return f"can't be written ({error.strerror})"
    if not existed:
        os.remove(path)
    return None


def load_text(value: Optional[float]) -> str:
    """A load average for a header line."""
    return "unknown" if value is None else f"{value:.2f}"


def verdict(passed: bool) -> str:
    """A target's PASS / FAIL."""
    return "PASS" if passed else "FAIL"


class Timer:
    """Times a no-argument callable: ``calibrate`` warms up and returns the calls per sample that make a sample last
    ``min_rep_s``; ``sample`` gives seconds per call, by CUDA events on CUDA, else (or ``wall``) time.perf_counter."""

    def __init__(self, device: str, warmup: int = 0, min_rep_s: float = 0.0):
        self.device, self.warmup, self.min_rep_s = device, warmup, min_rep_s

    def calibrate(self, fn: Callable[[], object]) -> int:
        for _ in range(self.warmup):
            fn()
        return max(1, int(self.min_rep_s / max(self.sample(fn, 1), 1e-9) + 0.999))

    def sample(self, fn: Callable[[], object], calls: int, wall: bool = False) -> float:
        events = self.device == "cuda" and not wall
        if self.device == "cuda":
            torch.cuda.synchronize()
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        for _ in range(calls):
            fn()
        if events:
            end.record()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls if events else (time.perf_counter() - start) / calls

    def median(self, fn: Callable[[], object], reps: int) -> float:
        """Median seconds per call over ``reps`` calibrated samples."""
        calls = self.calibrate(fn)
        return statistics.median(self.sample(fn, calls) for _ in range(reps))


def error_text(error: Exception) -> str:
    """``Type: first line of the message``: what a failed case records (one failure shouldn't lose the whole run)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def markdown_table(columns: List[str], rows: List[List[str]]) -> List[str]:
    """The lines of a markdown table; a short row (a failure) is padded with empty cells to the header's width."""
    cells = ["| " + " | ".join(row + [""] * (len(columns) - len(row))) + " |" for row in [columns, *rows]]
    return cells[:1] + ["|" + "---|" * len(columns)] + cells[1:]


def run_meta(args: argparse.Namespace, **extra) -> dict:
    """The JSON ``meta`` of a run: where, when, with what; ``extra`` adds the script's own fields."""
    return {"device": device_name(args.device), "device_type": args.device, "threads": torch.get_num_threads(),
            "load_at_start": args.load_at_start, "date": args.date, "torch": torch.__version__,
            "triton": package_version("triton"), "python": platform.python_version(), "batch": args.batch,
            "reps": args.reps, "quick": args.quick, "backend_env": os.environ.get(BACKEND_ENV, "auto"), **extra}


def version_lines(args: argparse.Namespace, versions: str = "") -> List[str]:
    """The date and versions lines of a printed header; ``versions`` names more packages (``"timm 1.0, "``)."""
    return [f"- date: {args.date}",
            f"- torch {torch.__version__}, {versions}triton {package_version('triton')}, "
            f"python {platform.python_version()}"]


def write_json(path: Optional[str], **payload) -> None:
    """``payload`` as indented JSON at ``path`` (nothing when no --json was given).

    The scripts call it after every measured case, so a run cut off by a time limit keeps what it measured; the file
    is replaced in one step (written beside it, then renamed), so it is never left half written."""
    if path:
        text = json.dumps(payload, indent=2)
        edit_atomically(path, lambda partial: Path(partial).write_text(text, encoding="utf-8"),
                        start_from_current=False, label=f"--json {path}")
