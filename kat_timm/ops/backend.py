"""The one place that decides which implementation of the grouped rational function runs.

``KAT_RATIONAL_BACKEND`` (read at every call, so it can be changed at run time):
- ``auto`` (default): Triton for CUDA tensors; the native CPU kernel for CPU float32/bfloat16/float16 tensors;
  pure PyTorch for float64, for devices neither covers, and where the native kernel can't be built. Where Triton
  can't compile or launch its kernel for a (device, dtype) (an architecture or dtype it doesn't support, a compiler
  error), that pair falls back to PyTorch from then on, with one warning (``triton_fallbacks`` lists them,
  ``kat-timm info`` shows them).
- ``torch``: pure PyTorch everywhere.
- ``triton``: the Triton kernels; on CPU tensors only through Triton's interpreter (``TRITON_INTERPRET=1`` set
  before kat_timm is imported). Fails with a message otherwise, and with the reason where a kernel fails.
- ``native``: the native CPU kernel; fails with the build error when it isn't available.
float64 inputs always take the PyTorch path (the kernels compute in float32).

``fuses_linear_bias`` is the one place that decides whether a Linear followed by the rational (KAN's fc1 -> act2)
runs as a bias-free matmul plus the op with the Linear's bias as its input bias (``group_rational(..., bias=)``),
or as the Linear with its bias plus the plain op. Both compute the same function.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import rational_torch
from .rational_cpu import native_cpu_status, native_cpu_supports

__all__ = ["BACKEND_ENV", "BACKENDS", "fuses_linear_bias", "native_kernel_runs", "probe_triton", "requested_backend",
           "select_backend", "triton_fallbacks", "triton_implementation", "triton_status"]

BACKEND_ENV = "KAT_RATIONAL_BACKEND"
BACKENDS = ("auto", "torch", "triton", "native")

_triton_module = None
_triton_failure: Optional[str] = None
_warned_native = False
# (device, dtype) -> why the Triton kernels failed there; the PyTorch path runs those pairs instead.
_triton_failed: Dict[Tuple[str, torch.dtype], str] = {}
_REPORT_HINT = ("please report it to the kat_timm maintainers with this message and the output of `kat-timm info`; "
                "KAT_RATIONAL_BACKEND=torch silences this")


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
        if _triton_failed and (str(x.device), x.dtype) in _triton_failed:
            return "torch"
        return "triton" if _triton_kernels() is not None else "torch"
    if x.device.type == "cpu":
        if native_cpu_supports(x.dtype):
            return "native"
        available, reason = native_cpu_status()
        if not available and not _warned_native:
            _warned_native = True
            warnings.warn(f"kat_timm: native CPU kernel unavailable, using the slower PyTorch path ({reason})")
    return "torch"


def triton_fallbacks() -> Dict[str, str]:
    """Where the Triton kernels failed in this process and the PyTorch path runs instead: ``{"cuda:0 bfloat16":
    reason}``."""
    return {f"{device} {str(dtype).replace('torch.', '')}": reason
            for (device, dtype), reason in _triton_failed.items()}


def triton_implementation(direction: str) -> Callable:
    """The Triton (M, G, L) function for ``direction`` ("forward" or "backward"), guarded: if the kernel can't be
    compiled or launched for the tensors' (device, dtype), ``KAT_RATIONAL_BACKEND=auto`` runs the PyTorch path for
    them (now and, through ``select_backend``, from then on) after one warning with the reason; a forced
    ``KAT_RATIONAL_BACKEND=triton`` raises a RuntimeError with the reason instead. Running out of GPU memory is
    raised as it is (the PyTorch path would need more)."""
    kernel = getattr(_triton_kernels(), f"rational_{direction}_triton")
    fallback = getattr(rational_torch, f"rational_{direction}_torch")

    def run(*args, **kwargs):
        try:
            return kernel(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # any compiler or launcher error: named in the warning, never swallowed
            tensor = args[0]
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()
            where = f"{tensor.device} {str(tensor.dtype).replace('torch.', '')}"
            if requested_backend() == "triton":
                raise RuntimeError(f"{BACKEND_ENV}=triton: the Triton {direction} kernel failed on {where} "
                                   f"({reason}); use KAT_RATIONAL_BACKEND=auto to fall back to PyTorch") from error
            key = (str(tensor.device), tensor.dtype)
            if key not in _triton_failed:
                _triton_failed[key] = reason
                warnings.warn(f"kat_timm: the Triton {direction} kernel failed on {where} ({reason}); the slower "
                              f"PyTorch path runs there from now on; {_REPORT_HINT}", RuntimeWarning, stacklevel=2)
            return fallback(*args, **kwargs)

    return run


def probe_triton(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Compile and run the Triton forward and backward once on a tiny input of ``device`` and ``dtype`` through the
    op's guard (``triton_implementation``); the reason they failed there, or None. For ``kat-timm info``: a
    failure is recorded and warned about as at the op's first call (under ``KAT_RATIONAL_BACKEND=triton`` it
    raises, as the op would)."""
    key = (str(torch.empty(0, device=device).device), dtype)
    if key not in _triton_failed:
        x3 = torch.linspace(-3, 3, 2 * 8 * 4, device=device).to(dtype).view(2, 8, 4)
        numerator = torch.full((1, 6), 0.5, device=device)
        denominator = torch.full((8, 4), 0.5, device=device)
        triton_implementation("forward")(x3, numerator, denominator)
        if key not in _triton_failed:
            triton_implementation("backward")(x3, x3, numerator, denominator)
    return _triton_failed.get(key)


@torch.compiler.assume_constant_result
def _native_kernel_runs(device_type: str, dtype: torch.dtype) -> bool:
    # A constant for torch.compile / torch.export (the decision is made once, when the graph is traced): the
    # native kernel's availability is a ctypes call, which dynamo could not trace.
    return device_type == "cpu" and select_backend(torch.empty(0, dtype=dtype)) == "native"


def native_kernel_runs(x: torch.Tensor) -> bool:
    """Whether ``group_rational`` on ``x``'s device and dtype runs the native CPU kernel (fixed when a graph is
    traced under ``torch.compile`` / ``torch.export``)."""
    return _native_kernel_runs(x.device.type, x.dtype)


def fuses_linear_bias(x: torch.Tensor) -> bool:
    """Whether a Linear followed by ``group_rational`` on ``x``'s device and dtype should pass the Linear's bias to
    the op (a bias-free matmul, then F(x + bias) in one pass) instead of adding it in the Linear.

    True where the rational runs on the native CPU kernel; False on CUDA (cuBLAS adds the bias for free) and on the
    PyTorch path. Under ``torch.compile`` / ``torch.export`` the answer is fixed when the graph is traced.

    Args:
        x: the Linear's input (only its device and dtype matter).
    """
    # On a GPU cuBLAS adds a Linear's bias in its epilogue at no cost; the Triton kernels take the bias only once
    # they implement it, and whether the saved backward reduction pays there is still to be measured. On a CPU the
    # bias costs a pass of its own over the hidden activations (and its gradient another): fold it into the native
    # kernel's single pass. The PyTorch path gains nothing from it and keeps the Linear's bias.
    return native_kernel_runs(x)
