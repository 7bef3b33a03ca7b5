"""The native kernel's build cache: a damaged cached library is rebuilt with a warning (never loaded: a truncated
one used to kill Python with SIGBUS), a library without the kernel's functions is replaced, ``$CC`` may be a
command line such as ``ccache gcc``, and temporary files of killed builds are removed.

Each check runs in a child process with its own ``KAT_TIMM_CACHE_DIR``: the library is loaded once per process, and a
bad one would crash the test runner itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import one_thread_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and not os.environ.get("CC"),
                                reason="no C compiler: the native kernel is not built on this machine")

# Runs the op once on the native backend and compares it with the float64 reference.
USE = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    import torch
    from kat_timm.ops import group_rational, group_rational_reference, rational_cpu
    print("status", rational_cpu.native_cpu_status(), flush=True)
    x = torch.randn(4, 16)
    numerator, denominator = torch.randn(1, 6) * 0.5, torch.randn(8, 4) * 0.5
    out = group_rational(x, numerator, denominator)
    torch.testing.assert_close(out.double(), group_rational_reference(x.double(), numerator.double(),
                               denominator.double()), rtol=1e-5, atol=1e-6)
    print("ok", flush=True)
""")


def use_native(cache: Path, **env) -> subprocess.CompletedProcess:
    full_env = one_thread_env(KAT_TIMM_CACHE_DIR=str(cache), KAT_RATIONAL_BACKEND="native", PYTHONPATH=str(REPO),
                              **env)
    return subprocess.run([sys.executable, "-c", USE], capture_output=True, text=True, timeout=300, env=full_env)


def library(cache: Path) -> Path:
    (path,) = cache.glob("group_rational_cpu-*.so")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache folder holding a freshly built library (built once for the module)."""
    cache = tmp_path_factory.mktemp("kernel_cache")
    first = use_native(cache)
    assert first.returncode == 0 and "status (True, 'ok')" in first.stdout, first.stdout + first.stderr
    return cache


@pytest.fixture
def cache(built, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    return copy


def test_a_truncated_cached_library_is_rebuilt_with_a_warning(cache):
    path = library(cache)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a copy or a full disk cut it short
    used = use_native(cache)
    assert used.returncode == 0, f"exit {used.returncode}\n{used.stdout}{used.stderr}"  # was -7 (SIGBUS)
    assert "ok" in used.stdout and "status (True, 'ok')" in used.stdout
    assert f"the cached native CPU kernel {path} is damaged" in used.stderr and "rebuilding it" in used.stderr
    assert len(path.read_bytes()) == len(good)


def test_a_library_without_the_kernels_functions_is_replaced(cache, tmp_path):
    import hashlib

    path = library(cache)
    other = tmp_path / "other.c"
    other.write_text("int something_else(void) { return 0; }\n")
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", str(path), str(other)], check=True)
    # a complete, valid library, checksum and all, that is not the kernel
    Path(str(path) + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    used = use_native(cache)
    assert used.returncode == 0 and "ok" in used.stdout, used.stdout + used.stderr
    from kat_timm.ops.rational_cpu import _SYMBOLS

    assert f"lacks {', '.join(_SYMBOLS)}; rebuilding it" in used.stderr, used.stderr


def test_cc_may_be_a_command_line(tmp_path):
    """``CC="ccache gcc"``: the first word is the program, the rest its arguments (``env`` wraps like ccache)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    used = use_native(tmp_path / "cache", CC=f"env {compiler}")
    assert used.returncode == 0 and "status (True, 'ok')" in used.stdout, used.stdout + used.stderr


def test_temporary_files_of_killed_builds_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    orphan = cache / f"group_rational_cpu-0123456789abcdef-build-{dead_pid}-x1y2.so"
    old_style = cache / "tmpa1b2c3.so"  # what builds killed under earlier versions left
    for path in (orphan, old_style):
        path.write_bytes(b"\x7fELF partial")
    hour_ago = time.time() - 2 * 3600
    os.utime(old_style, (hour_ago, hour_ago))
    used = use_native(cache)
    assert used.returncode == 0, used.stdout + used.stderr
    assert not orphan.exists() and not old_style.exists()
    assert [path.name for path in cache.iterdir() if "-build-" in path.name] == []
