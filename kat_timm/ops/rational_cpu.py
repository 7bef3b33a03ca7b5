"""Native CPU kernels: build ``csrc/group_rational_cpu.c`` on first use, load it with ctypes, call it.

Why not a PyTorch C++ extension: compiling against the PyTorch headers takes about a minute and needs ninja;
this file is plain C with OpenMP and builds in about a second with the system C compiler. The library is cached
under ``$KAT_TIMM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kat_timm`` or ``~/.cache/kat_timm``), keyed by a hash of
the source, the compiler's version and the flags, and written through a temporary file and a rename so that
concurrent processes never load a half-written library. A SHA-256 written beside it is checked before every load:
a damaged file (truncated by a full disk or a copy) is rebuilt with a warning instead of crashing the process.
Machines without a C compiler (or where the build fails) use the pure-PyTorch path instead; ``native_cpu_status()``
says why.

The library is linked with ``-fopenmp`` but not against a particular libgomp: PyTorch has already loaded its
own ``libgomp.so.1`` when this runs, so both share one OpenMP runtime and one thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from .layout import check_column_bias

__all__ = ["build_library", "native_cpu_status", "native_cpu_supports", "rational_forward_native",
           "rational_backward_native"]

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


def _compiler_identity(compiler: list) -> str:
    try:
        out = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"


# A build left by a process that was killed mid-way (its temporary file) is removed once it is this old, even when
# the process that made it can't be checked (another machine sharing the cache folder). A build takes seconds.
_STALE_BUILD_S = 3600.0
_SYMBOLS = ("kat_rational_supports", "kat_rational_forward", "kat_rational_backward_grads")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path) -> bool:
    """Whether ``target`` is the complete library that was built: its SHA-256 matches the one written beside it.

    Loading a truncated library maps pages past its end and kills the process with SIGBUS at the first call, so a
    cached file is never loaded unchecked.
    """
    checksum = _checksum_path(target)
    try:
        return target.is_file() and checksum.read_text().strip() == _digest(target)
    except OSError:
        return False


def _remove_stale_builds(folder: Path) -> None:
    """Remove the temporary files of builds whose process is gone (killed mid-build) or that are very old."""
    import time

    for path in list(folder.glob("group_rational_*-build-*")) + list(folder.glob("tmp*.so")):
        try:
            pid = int(path.name.split("-build-", 1)[1].split("-", 1)[0]) if "-build-" in path.name else None
            dead = pid is not None and pid != os.getpid() and not _running(pid)
            if dead or time.time() - path.stat().st_mtime > _STALE_BUILD_S:
                path.unlink()
        except (OSError, ValueError, IndexError):
            continue  # removed meanwhile, or not one of ours


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _build(compiler: list, flags: list, sources: Tuple[Path, ...] = (_SOURCE,),
           name: str = "group_rational_cpu") -> Path:
    """The cached library ``name`` of these sources, compiler and flags, built (and its checksum written) unless a
    verified one is there already. A cached file that fails verification is rebuilt, with a warning."""
    import warnings

    source = b"".join(path.read_bytes() for path in sources)
    key = hashlib.sha256(
        source + _compiler_identity(compiler).encode() + " ".join(flags).encode() + platform.machine().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    if target.exists() and _checksum_path(target).exists():  # without one: built by an older kat_timm, redo it
        warnings.warn(f"the cached native CPU kernel {target} is damaged (incomplete, or it does not match its "
                      f"checksum); rebuilding it", RuntimeWarning, stacklevel=2)
    fd, tmp = tempfile.mkstemp(prefix=f"{name}-{key}-build-{os.getpid()}-", suffix=".so",
                               dir=target.parent)
    os.close(fd)
    checksum_tmp = tmp + ".sha256"
    try:
        result = subprocess.run(
            [*compiler, *flags, "-o", tmp, *map(str, sources)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(compiler)} {' '.join(flags)}` failed:\n{result.stderr.strip()[-2000:]}")
        Path(checksum_tmp).write_text(_digest(Path(tmp)) + "\n")
        # The checksum first: a process that finds the library finds its checksum too.
        os.replace(checksum_tmp, _checksum_path(target))
        os.replace(tmp, target)
    finally:
        for path in (tmp, checksum_tmp):
            if os.path.exists(path):
                os.unlink(path)
    return target


def _open_library(compiler: list, flags: list) -> ctypes.CDLL:
    """Build or find the verified library and load it; a library without the kernel's functions (another file
    under its name) is rebuilt once, then refused."""
    path = _build(compiler, flags)
    for attempt in range(2):
        library = ctypes.CDLL(str(path))
        missing = [name for name in _SYMBOLS if not hasattr(library, name)]
        if not missing:
            return library
        if attempt == 0:
            import warnings

            warnings.warn(f"the cached native CPU kernel {path} lacks {', '.join(missing)}; rebuilding it",
                          RuntimeWarning, stacklevel=2)
            _checksum_path(path).unlink(missing_ok=True)
            path = _build(compiler, flags)
    raise RuntimeError(f"{path} does not define {', '.join(missing)}")


def build_library(build):
    """``build(compiler, flags)`` with the C compiler ($CC, default ``cc``) and the kernel's flags, retried without
    the per-ISA clones for compilers that do not know target_clones; RuntimeError saying why when it can't."""
    # $CC may be a command line ("ccache gcc", "gcc -m64"), as make and setuptools take it.
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    if shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler found (looked for `{compiler[0]}`; set CC or install gcc)")
    errors = []
    for flags in (_BASE_FLAGS, _BASE_FLAGS + ["-DKAT_NO_CLONES"]):
        try:
            return build(compiler, flags)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    raise RuntimeError("building the native CPU kernel failed: " + "\n".join(errors))


def _load() -> Optional[ctypes.CDLL]:
    """Build (once per machine) and load the library; on failure remember why and return None."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        try:
            library = build_library(_open_library)
        except RuntimeError as error:
            _failure = str(error)
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
    return check_column_bias(bias, x3, "native").data_ptr()


def rational_forward_native(
    x3: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    in_place: bool = False,
) -> torch.Tensor:
    """Forward on a contiguous CPU (M, G, L) view: F(x3 + bias) (bias: None or float32 (G, L), one value per
    column); returns a new tensor of x3's dtype, or x3 itself, overwritten, with ``in_place``."""
    library = _library or _load()
    out = x3 if in_place else torch.empty_like(x3)
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
