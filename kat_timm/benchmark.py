"""The machine a measurement ran on: device name, package versions, load average (kat-timm demo and info, and the
benchmark scripts' headers)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Optional

import torch

__all__ = ["device_name", "package_version", "load_average"]


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
