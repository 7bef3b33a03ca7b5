"""What the benchmark scripts print about the machine they ran on (scripts/benchmark_ops.py, benchmark_models.py)."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from typing import Optional

import torch

__all__ = ["benchmark_parser", "check_benchmark_args", "device_name", "package_version", "load_average"]


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
    """An argument parser with the options every benchmark script has: --device, --batch, --threads, --reps,
    --quick, --json. ``doc`` is the script's module docstring (its first paragraph becomes the description)."""
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


def check_benchmark_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what no benchmark can run: CUDA where there is none, non-positive thread or repetition counts."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for name in ("threads", "reps", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
