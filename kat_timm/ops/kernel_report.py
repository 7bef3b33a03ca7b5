"""Static resource report of the Triton kernels: compiled for a GPU that need not be present.

Each kernel is compiled exactly as its launcher launches it (``rational_triton.forward_launch`` /
``backward_launch``: the same constexprs, warps and stages) with the JIT's own argument specialisation (16-aligned
pointers and ints divisible by 16 marked ``tt.divisibility``, ints equal to 1 folded), by Triton's compiler, for
sm_90a (H100/H200) or sm_80 (A100). Triton's bundled ``ptxas -v`` then gives registers, spills and stack frame. From
those and the PTX this module derives what bounds a memory-bound kernel's bandwidth:

- programs resident per SM: min over registers (allocated per warp in units of 256), threads (2048), blocks (32)
  and shared memory;
- bytes of global loads each thread issues per iteration (the loop body for the backward, the whole kernel for the
  forward, without the scalar coefficient loads), and whether they are 16-byte vector accesses;
- bytes in flight per SM = resident threads x those bytes, and the fraction of HBM bandwidth that can sustain by
  Little's law (bytes in flight needed per SM = bandwidth x latency / SMs).

Used by ``scripts/kernel_report.py`` and by the CI test ``tests/ops/test_kernel_report.py``. Needs triton (and its
bundled ptxas), no GPU.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["ARCHS", "KernelResources", "compile_for", "kat_shapes", "kernel_resources", "ptxas_info", "report_rows"]


@dataclass(frozen=True)
class Arch:
    """What the report needs to know of a GPU generation (the device named is the one the figures are for)."""

    capability: int
    gpu_name: str  # ptxas --gpu-name
    device: str
    sm_count: int
    hbm_bytes_per_s: float
    latency_s: float  # loaded DRAM latency assumed for Little's law
    shared_bytes_per_sm: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32

    @property
    def needed_in_flight(self) -> float:
        """Bytes of loads in flight per SM that keep HBM busy (Little's law)."""
        return self.hbm_bytes_per_s * self.latency_s / self.sm_count


ARCHS: Dict[str, Arch] = {
    "sm_90a": Arch(90, "sm_90a", "H200", 132, 4.8e12, 0.8e-6, 228 * 1024),
    "sm_80": Arch(80, "sm_80", "A100 80GB", 108, 2.0e12, 0.6e-6, 164 * 1024),
}

# Activation shapes of KAT-T/S/B at 224 px: rows = batch x 197 tokens, C = d (act1) and 4d (act2), G = 8.
_WIDTHS = {"T": (192, 768), "S": (384, 1536), "B": (768, 3072)}
TOKENS, GROUPS = 197, 8


def kat_shapes(batch: int) -> List[Tuple[str, Tuple[int, int, int]]]:
    """(label, (M, G, L)) of every rational call of KAT-T/S/B at ``batch``."""
    shapes = []
    for model, (d, hidden) in _WIDTHS.items():
        for act, width in (("act1", d), ("act2", hidden)):
            shapes.append((f"KAT-{model} {act} C={width}", (batch * TOKENS, GROUPS, width // GROUPS)))
    return shapes


@dataclass(frozen=True)
class KernelResources:
    """One compiled kernel, as the launcher launches it, and what its resources imply."""

    kernel: str
    arch: str
    dtype: str
    shape: Tuple[int, int, int]
    num_warps: int
    constexprs: dict
    grid: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    programs_per_sm: int
    occupancy: float
    vector_load_bytes: int  # per thread per iteration, 16-byte accesses
    scalar_load_bytes: int  # per thread per iteration, narrower accesses of the tensor data
    vector_store_bytes: int
    scalar_store_bytes: int
    in_flight_per_sm: float  # bytes, resident threads x load bytes per iteration
    bandwidth_bound: float  # fraction of HBM bandwidth those bytes in flight can sustain

    @property
    def vectorised(self) -> bool:
        """All bulk loads and stores are 16-byte vector accesses."""
        return self.scalar_load_bytes == 0 and self.scalar_store_bytes == 0


_PTXAS = None


def _ptxas() -> str:
    global _PTXAS
    if _PTXAS is None:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if not os.path.exists(path):
            raise RuntimeError(f"kernel report: Triton's bundled ptxas is missing ({path}); reinstall triton")
        _PTXAS = path
    return _PTXAS


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _jit_specialisation(value):
    """(type, hint) the JIT gives an argument: its own specialiser where Triton exposes it (3.4 and later), else
    the same rules (pointers and ints divisible by 16 get "D", ints equal to 1 become constants)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(BaseBackend, value, False, True, True)
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if value == 1:
        return "constexpr", 1
    return ("i32" if -2**31 <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""


def _specialise(fn, args: Sequence, constexprs: dict):
    """Signature, constants and attributes the JIT would derive from these arguments (its own specialiser)."""
    runtime_names = [name for name in fn.arg_names if name not in constexprs]
    if len(runtime_names) != len(args):
        raise ValueError(f"{fn.__name__} takes {len(runtime_names)} runtime arguments, got {len(args)}")
    signature, constants, attrs = {}, dict(constexprs), {}
    for name, value in zip(runtime_names, args):
        kind, spec = _jit_specialisation(value)
        if kind == "constexpr":  # ints equal to 1
            constants[name] = spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in constants:
        signature[name] = "constexpr"
    return {name: signature[name] for name in fn.arg_names}, constants, attrs


def compile_for(fn, args: Sequence, constexprs: dict, num_warps: int, num_stages: int, arch: str):
    """Compile a ``@triton.jit`` function for ``arch`` without a GPU; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _specialise(fn, args, constexprs)
    source = ASTSource(fn, signature, constants, attrs)
    target = GPUTarget("cuda", ARCHS[arch].capability, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_info(ptx: str, arch: str) -> Tuple[int, int, int]:
    """(registers, spill bytes, stack frame bytes) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [_ptxas(), "-v", "--gpu-name", ARCHS[arch].gpu_name, path, "-o", os.path.join(folder, "kernel.o")],
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"kernel report: ptxas failed: {result.stderr.strip()[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    stack, spill_stores, spill_loads = (int(v) for v in frame.groups())
    return registers, spill_stores + spill_loads, stack


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)\s")
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
          "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}


def _access_bytes(suffixes: str) -> int:
    parts = suffixes.strip(".").split(".")
    vector = 1
    width = 0
    for part in parts:
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        elif part in _WIDTH:
            width = _WIDTH[part]
    return vector * width


def _loop_body(ptx: str) -> str:
    """The PTX of the kernel's (outermost) loop: from a label to the last branch back to it; '' if none."""
    lines = ptx.splitlines()
    labels = {}
    best = ""
    for index, line in enumerate(lines):
        label = re.match(r"^\s*(\$L__\w+):", line)
        if label:
            labels[label.group(1)] = index
            continue
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if branch and branch.group(1) in labels:
            body = "\n".join(lines[labels[branch.group(1)]:index + 1])
            if len(body) > len(best):
                best = body
    return best


def _traffic(ptx: str, data_loads_outside: int, data_stores_outside: int) -> Tuple[int, int, int, int]:
    """(vector load, scalar load, vector store, scalar store) bytes per thread per iteration.

    With a loop, the loop body is counted; without one, the whole kernel minus its first ``data_loads_outside``
    scalar loads (the coefficients, loaded once per program) and its last ``data_stores_outside`` scalar stores
    (per-program bookkeeping such as a flag)."""
    body = _loop_body(ptx)
    text = body if body else ptx
    loads_vector = loads_scalar = stores_vector = 0
    skipped = 0 if body else data_loads_outside
    narrow_stores = []
    for match in _ACCESS.finditer(text):
        kind, nbytes = match.group(1), _access_bytes(match.group(2))
        wide = nbytes >= 16
        if kind == "ld":
            if not wide and skipped > 0:
                skipped -= 1
                continue
            if wide:
                loads_vector += nbytes
            else:
                loads_scalar += nbytes
        elif wide:
            stores_vector += nbytes
        else:
            narrow_stores.append(nbytes)
    if not body and data_stores_outside:
        narrow_stores = narrow_stores[:-data_stores_outside]
    return loads_vector, loads_scalar, stores_vector, sum(narrow_stores)


def _programs_per_sm(arch: Arch, registers: int, num_warps: int, shared: int) -> int:
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (arch.registers_per_sm // per_warp) // num_warps
    by_threads = arch.threads_per_sm // (32 * num_warps)
    by_shared = arch.shared_bytes_per_sm // (shared + 1024) if shared else arch.blocks_per_sm
    return max(0, min(by_registers, by_threads, arch.blocks_per_sm, by_shared))


def kernel_resources(direction: str, shape: Tuple[int, int, int], dtype: torch.dtype, arch: str = "sm_90a",
                     bias: bool = False, safe: bool = False) -> KernelResources:
    """Compile the ``direction`` ("forward" or "backward") kernel for an (M, G, L) input of ``dtype`` as the
    launcher would on ``arch``, and derive its resources. ``bias``: the input-bias variant; ``safe``: the second
    pass that recomputes, in the reciprocal form, the tiles the first flagged for an |x| above LARGE_INPUT (its
    programs exit at once unless flagged, so the first pass is what bounds the bandwidth)."""
    from . import rational_triton as kernels

    rows, groups, length = shape
    data = torch.empty(16, dtype=dtype)  # stands for x / y / grad / dx: only dtype and alignment matter
    coefficients = torch.empty(16, dtype=torch.float32)
    flags = torch.empty(16, dtype=torch.int32)
    target = ARCHS[arch]
    if direction == "forward":
        launch = kernels.forward_launch(rows, groups, length, data.element_size())
        fn = kernels._group_rational_forward_kernel
        args = [data, data, coefficients, coefficients, coefficients, flags, rows, groups * length, 0,
                launch.segments]
    elif direction == "backward":
        launch = kernels.backward_launch(rows, groups, length, dtype, target.sm_count)
        fn = kernels._group_rational_backward_kernel
        args = [data, data, data, coefficients, coefficients, coefficients, coefficients, coefficients, flags, rows,
                groups * length, 0, launch.segments, launch.rows_per_program]
    else:
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    constexprs = dict(launch.constexprs, HAS_BIAS=int(bias), SAFE=int(safe))
    compiled = compile_for(fn, args, constexprs, launch.num_warps, launch.num_stages, arch)
    ptx = compiled.asm["ptx"]
    registers, spills, stack = ptxas_info(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0))
    resident = _programs_per_sm(target, registers, launch.num_warps, shared)
    programs = launch.grid[0]
    resident_now = min(resident, math.ceil(programs / target.sm_count))  # a small grid fills fewer slots
    # Outside the data: the ten coefficient loads; the forward's per-program flag store.
    loads_v, loads_s, stores_v, stores_s = _traffic(ptx, data_loads_outside=10, data_stores_outside=1)
    in_flight = resident_now * 32 * launch.num_warps * (loads_v + loads_s)
    return KernelResources(
        kernel=direction, arch=arch, dtype=str(dtype).replace("torch.", ""), shape=shape,
        num_warps=launch.num_warps, constexprs=constexprs, grid=programs, registers=registers,
        spill_bytes=spills, stack_bytes=stack, shared_bytes=shared, programs_per_sm=resident,
        occupancy=resident * launch.num_warps * 32 / target.threads_per_sm,
        vector_load_bytes=loads_v, scalar_load_bytes=loads_s, vector_store_bytes=stores_v,
        scalar_store_bytes=stores_s, in_flight_per_sm=float(in_flight),
        bandwidth_bound=min(1.0, in_flight / target.needed_in_flight),
    )


def report_rows(shapes: Sequence[Tuple[str, Tuple[int, int, int]]], dtypes: Sequence[torch.dtype],
                arches: Sequence[str], directions: Sequence[str] = ("forward", "backward")) -> List[dict]:
    """One dict per (shape, dtype, arch, direction): the label and ``KernelResources`` fields."""
    rows = []
    for arch in arches:
        for label, shape in shapes:
            for dtype in dtypes:
                for direction in directions:
                    resources = kernel_resources(direction, shape, dtype, arch)
                    rows.append(dict(label=label, vectorised=resources.vectorised, **resources.__dict__))
    return rows
