"""The one place that decides which implementation of the grouped rational function runs.

``KAT_RATIONAL_BACKEND`` (read at every call, so it can be changed at run time):
- ``auto`` (default): Triton for CUDA tensors; the native CPU kernel for CPU float32/bfloat16/float16 tensors;
  pure PyTorch for float64, for devices neither covers, and where the native kernel can't be built.
- ``torch``: pure PyTorch everywhere.
- ``triton``: the Triton kernels; on CPU tensors only through Triton's interpreter (``TRITON_INTERPRET=1`` set
  before kat_timm is imported). Fails with a message otherwise.
- ``native``: the native CPU kernel; fails with the build error when it isn't available.
float64 inputs always take the PyTorch path (the kernels compute in float32).

``fuses_linear_bias`` is the one place that decides whether a Linear followed by the rational (KAN's fc1 -> act2)
runs as a bias-free matmul plus the op with the Linear's bias as its input bias (``group_rational(..., bias=)``),
or as the Linear with its bias plus the plain op. Both compute the same function.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch

from .rational_cpu import native_cpu_status, native_cpu_supports

__all__ = ["BACKEND_ENV", "BACKENDS", "fuses_linear_bias", "requested_backend", "select_backend", "triton_status"]

BACKEND_ENV = "KAT_RATIONAL_BACKEND"
BACKENDS = ("auto", "torch", "triton", "native")

_triton_module = None
_triton_failure: Optional[str] = None
_warned_native = False


def requested_backend() -> str:
    """The backend named by ``KAT_RATIONAL_BACKEND`` (``auto`` when unset), validated."""
    raw = os.environ.get(BACKEND_ENV)
    if raw is None:  # the usual case, first: this runs at every call of the op
        return "auto"
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _triton_kernels():
    """Import the Triton kernel module once (importing triton is slow and it is absent on some platforms)."""
    global _triton_module, _triton_failure
    if _triton_module is None and _triton_failure is None:
        try:
            from . import rational_triton

            _triton_module = rational_triton
        except Exception as error:  # ImportError, or a broken triton install
            _triton_failure = f"{type(error).__name__}: {error}"
    return _triton_module


def triton_status() -> Tuple[bool, str]:
    """(available, reason): whether the Triton kernels can be imported, and whether they run interpreted."""
    kernels = _triton_kernels()
    if kernels is None:
        return False, f"triton is not usable: {_triton_failure}"
    return True, "interpreted (TRITON_INTERPRET=1)" if kernels.kernels_are_interpreted() else "compiled"


def select_backend(x: torch.Tensor) -> str:
    """Name of the implementation that handles ``x``: ``"triton"``, ``"native"`` or ``"torch"``.

    Raises:
        RuntimeError: a backend was forced through ``KAT_RATIONAL_BACKEND`` that can't run ``x``; the message
            says why and how to fix it.
    """
    global _warned_native
    requested = requested_backend()
    if requested == "auto" and x.device.type == "cpu" and native_cpu_supports(x.dtype):
        return "native"  # the common CPU case, decided first
    if requested == "torch" or x.dtype == torch.float64:
        return "torch"
    if requested == "triton":
        kernels = _triton_kernels()
        if kernels is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton can't be imported ({_triton_failure}); "
                               "install triton or use KAT_RATIONAL_BACKEND=auto")
        if x.device.type != "cuda" and not kernels.kernels_are_interpreted():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton got a {x.device.type} tensor: Triton runs CUDA tensors, or CPU tensors "
                "through its interpreter when TRITON_INTERPRET=1 is set before kat_timm is imported. Move the "
                "tensor to a GPU, set TRITON_INTERPRET=1 first, or use KAT_RATIONAL_BACKEND=auto."
            )
        return "triton"
    if requested == "native":
        available, reason = native_cpu_status()
        if x.device.type != "cpu" or not available or not native_cpu_supports(x.dtype):
            raise RuntimeError(
                f"{BACKEND_ENV}=native needs a CPU tensor of float32, bfloat16 or float16 and a built kernel; got "
                f"{x.device.type} {x.dtype}; kernel: {reason}"
            )
        return "native"
    # auto
    if x.device.type == "cuda":
        return "triton" if _triton_kernels() is not None else "torch"
    if x.device.type == "cpu":
        if native_cpu_supports(x.dtype):
            return "native"
        available, reason = native_cpu_status()
        if not available and not _warned_native:
            _warned_native = True
            warnings.warn(f"kat_timm: native CPU kernel unavailable, using the slower PyTorch path ({reason})")
    return "torch"


@torch.compiler.assume_constant_result
def _fuses_linear_bias(device_type: str, dtype: torch.dtype) -> bool:
    # A constant for torch.compile / torch.export (the decision is made once, when the graph is traced): the
    # native kernel's availability is a ctypes call, which dynamo could not trace.
    if device_type == "cuda":
        # On a GPU cuBLAS adds a Linear's bias in its epilogue at no cost; the Triton kernels take the bias only
        # once they implement it, and whether the saved backward reduction pays there is still to be measured.
        return False
    # On a CPU the bias costs a pass of its own over the hidden activations (and its gradient another): fold it
    # into the native kernel's single pass. The PyTorch path gains nothing from it and keeps the Linear's bias.
    return device_type == "cpu" and select_backend(torch.empty(0, dtype=dtype)) == "native"


def fuses_linear_bias(x: torch.Tensor) -> bool:
    """Whether a Linear followed by ``group_rational`` on ``x``'s device and dtype should pass the Linear's bias to
    the op (a bias-free matmul, then F(x + bias) in one pass) instead of adding it in the Linear.

    True where the rational runs on the native CPU kernel; False on CUDA (cuBLAS adds the bias for free) and on the
    PyTorch path. Under ``torch.compile`` / ``torch.export`` the answer is fixed when the graph is traced.

    Args:
        x: the Linear's input (only its device and dtype matter).
    """
    return _fuses_linear_bias(x.device.type, x.dtype)
