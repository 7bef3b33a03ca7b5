"""kat_timm: the Kolmogorov-Arnold Transformer (KAT, arXiv 2409.10594) for timm; see the README.

``import kat_timm`` registers the KAT models in timm. The tools and subpackages are imported on first use, so that
registering the models does not pay for onnx, matplotlib or the training loop.
"""
import importlib

from .layers import KAN, GroupRational
from .models import KAT, kat_from_vit
from .ops import group_rational
from .transforms import create_transform

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first read (PEP 562).
_LAZY = {
    "plot_rationals": "kat_timm.tools.plot",
    "download_pretrained": "kat_timm.tools.download",
    "export_program": "kat_timm.tools.export",
    "export_onnx": "kat_timm.tools.export",
    "check_onnx": "kat_timm.tools.export",
    "onnxruntime_session": "kat_timm.tools.export",
    "aoti_package": "kat_timm.tools.export",
    "save_hub_folder": "kat_timm.tools.hub",
    "fix_hub_folder": "kat_timm.tools.hub",
    "convert_checkpoint": "kat_timm.tools.hub",
    "zoo_rows": "kat_timm.tools.zoo",
}
_SUBPACKAGES = ("checkpoint", "cli", "factory", "layers", "models", "ops", "run", "tools", "training", "transforms")

__all__ = ["KAN", "KAT", "GroupRational", "create_transform", "group_rational", "kat_from_vit", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
