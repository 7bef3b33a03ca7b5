"""Deployment and inspection tools: ONNX/torch.export, offline downloads, the model zoo, Hub folders, plots.

Each module is imported on first use (``kat_timm.tools.export`` after a bare ``import kat_timm`` works), so that
reading one tool does not import the dependencies of the others.
"""
import importlib

_MODULES = ("download", "export", "hub", "plot", "zoo")


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
