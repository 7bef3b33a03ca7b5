"""Native CPU kernels: build ``csrc/group_rational_cpu.c`` on first use, load it with ctypes, call it.

Why not a PyTorch C++ extension: compiling against the PyTorch headers takes about a minute and needs ninja;
this file is plain C with OpenMP and builds in about a second with the system C compiler. The library is cached
under ``$KAT_TIMM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kat_timm`` or ``~/.cache/kat_timm``), keyed by a hash of
the source, the compiler's version and the flags, and written through a temporary file and a rename so that
concurrent processes never load a half-written library. Machines without a C compiler (or where the build fails)
use the pure-PyTorch path instead; ``native_cpu_status()`` says why.

The library is linked with ``-fopenmp`` but not against a particular libgomp: PyTorch has already loaded its
own ``libgomp.so.1`` when this runs, so both share one OpenMP runtime and one thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["native_cpu_status", "native_cpu_supports", "rational_forward_native", "rational_backward_native"]

_SOURCE = Path(__file__).with_name("csrc") / "group_rational_cpu.c"
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None


def _cache_dir() -> Path:
    if os.environ.get("KAT_TIMM_CACHE_DIR"):
        return Path(os.environ["KAT_TIMM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kat_timm"


def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"


def _build(compiler: str, flags: list) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        source + _compiler_identity(compiler).encode() + " ".join(flags).encode() + platform.machine().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"group_rational_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"`{compiler} {' '.join(flags)}` failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> Optional[ctypes.CDLL]:
    """Build (once per machine) and load the library; on failure remember why and return None."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        compiler = os.environ.get("CC", "cc")
        if shutil.which(compiler) is None:
            _failure = f"no C compiler found (looked for `{compiler}`; set CC or install gcc)"
            return None
        errors = []
        # The second attempt drops the per-ISA clones, for compilers that do not know target_clones.
        for flags in (_BASE_FLAGS, _BASE_FLAGS + ["-DKAT_NO_CLONES"]):
            try:
                library = ctypes.CDLL(str(_build(compiler, flags)))
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                errors.append(str(error))
        else:
            _failure = "building the native CPU kernel failed: " + "\n".join(errors)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        library.kat_rational_supports.argtypes = [ctypes.c_int]
        library.kat_rational_forward.argtypes = [
            ctypes.c_int, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int,
        ]
        library.kat_rational_backward_grads.argtypes = [
            ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int,
        ]
        _library = library
        return _library


def native_cpu_status() -> Tuple[bool, str]:
    """(available, reason): whether the native CPU kernel could be built and loaded here, and if not, why."""
    library = _load()
    return (True, "ok") if library is not None else (False, _failure or "unknown")


def native_cpu_supports(dtype: torch.dtype) -> bool:
    """True when the native kernel is available and handles tensors of ``dtype``."""
    supported = _supported.get(dtype)
    if supported is None:  # asked once per dtype: the answer can't change once the library is loaded
        library = _load()
        supported = library is not None and dtype in _DTYPE_CODES and bool(
            library.kat_rational_supports(_DTYPE_CODES[dtype]))
        _supported[dtype] = supported
    return supported


_supported = {}


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    # Parameters are float32 and contiguous already: no copy, no detach (the kernel only reads the pointer).
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().to(torch.float32).contiguous()


# Below this many elements one thread does the whole call, as PyTorch's own elementwise ops do (at::parallel_for's
# grain): an OpenMP team for a few microseconds of work costs more than it saves, far more on a busy machine.
_PARALLEL_GRAIN = 32768


def _threads(numel: int) -> int:
    return torch.get_num_threads() if numel > _PARALLEL_GRAIN else 1


def _check(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"native group_rational kernel failed with code {code} (1: dtype, 2: out of memory)")


def _bias_pointer(bias: Optional[torch.Tensor], x3: torch.Tensor) -> Optional[int]:
    """Address of the (G, L) float32 bias the dispatcher hands over, or None (a NULL pointer) without one."""
    if bias is None:
        return None
    if bias.dtype != torch.float32 or not bias.is_contiguous() or tuple(bias.shape) != tuple(x3.shape[1:]):
        raise ValueError(f"native group_rational: bias must be a contiguous float32 {tuple(x3.shape[1:])} tensor, "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    return bias.data_ptr()


def rational_forward_native(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Forward on a contiguous CPU (M, G, L) view: F(x3 + bias) (bias: None or float32 (G, L), one value per
    column); returns a new tensor of x3's dtype."""
    library = _library or _load()
    out = torch.empty_like(x3)
    num, den = _as_f32(numerator), _as_f32(denominator)
    rows, groups, length = x3.shape
    code = library.kat_rational_forward(
        _DTYPE_CODES[x3.dtype], x3.data_ptr(), out.data_ptr(), x3.numel(), groups, length,
        num.data_ptr(), 0 if num.shape[0] == 1 else 6, den.data_ptr(), _bias_pointer(bias, x3), _threads(x3.numel()),
    )
    if code:
        _check(code)
    return out


def rational_backward_native(
    grad3: torch.Tensor,
    x3: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward on contiguous CPU (M, G, L) views of F(x3 + bias).

    Returns:
        grad_x (x3's dtype), the gradients of numerator and denominator (their shapes and dtypes, from coefficient
        sums the kernel accumulates in float64) and, with a bias, the (G, L) float32 per-column sums of grad_x
        (taken before the cast to x3's dtype); None without one.
    """
    library = _library or _load()
    grad_x = torch.empty_like(x3)
    num, den = _as_f32(numerator), _as_f32(denominator)
    rows, groups, length = x3.shape
    grad_numerator = torch.empty(num.shape, dtype=torch.float32)
    grad_denominator = torch.empty(den.shape, dtype=torch.float32)
    bias_pointer = _bias_pointer(bias, x3)
    bias_sums = None if bias is None else torch.empty(groups, length, dtype=torch.float32)
    code = library.kat_rational_backward_grads(
        _DTYPE_CODES[x3.dtype], grad3.data_ptr(), x3.data_ptr(), grad_x.data_ptr(), x3.numel(), groups, length,
        num.data_ptr(), 0 if num.shape[0] == 1 else 6, den.data_ptr(), bias_pointer, grad_numerator.data_ptr(),
        grad_denominator.data_ptr(), None if bias_sums is None else bias_sums.data_ptr(), _threads(x3.numel()),
    )
    if code:
        _check(code)
    return grad_x, grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype), bias_sums
