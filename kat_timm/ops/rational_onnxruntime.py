"""The ONNX Runtime kernel of kat_timm's rational nodes: a custom-op library built from ``csrc/`` on first use.

ONNX files written by ``kat_timm.export_onnx`` hold each rational as one ``kat_timm::GroupRational`` (or
``GroupRationalBias``) node whose ONNX function body spells the same math in standard ops, so ONNX Runtime (and any
runtime that inlines local functions) runs them without kat_timm.
Registering this library with a session's options (``onnxruntime_session_options``) makes ONNX Runtime run those
nodes with the native CPU kernel instead: one pass over the activations per rational instead of some forty.
The library is ``csrc/group_rational_onnxruntime.c`` (ONNX Runtime's C ABI) linked with the native kernel, built and
cached like it (``kat_timm.ops.rational_cpu``).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from . import rational_cpu

__all__ = ["onnxruntime_library", "onnxruntime_session_options"]

_SOURCES = (rational_cpu._SOURCE, rational_cpu._SOURCE.with_name("group_rational_onnxruntime.c"))
_lock = threading.Lock()
_path: Optional[Path] = None


def onnxruntime_library() -> Path:
    """The path of the custom-op library (built on the first call, then cached on disk).

    Raises:
        RuntimeError: no C compiler, or the build failed (the message has the compiler's error).
    """
    global _path
    with _lock:
        if _path is None:
            _path = rational_cpu.build_library(
                lambda compiler, flags: rational_cpu._build(compiler, flags, _SOURCES, "group_rational_onnxruntime"))
        return _path


def onnxruntime_session_options(options=None, threads: Optional[int] = None):
    """ONNX Runtime ``SessionOptions`` with kat_timm's rational kernel registered (the fast path for files from
    ``kat_timm.export_onnx``); pass ``options`` to extend your own, ``threads`` to set intra-op threads.

    Raises:
        RuntimeError: the library could not be built (the file still runs without it: through its function bodies).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions() if options is None else options
    if threads is not None:
        options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(onnxruntime_library()))
    return options
