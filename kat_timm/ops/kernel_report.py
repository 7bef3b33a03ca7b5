"""Static resource report of the Triton kernels: compiled for GPUs that need not be present.

Each kernel is compiled exactly as its launcher launches it (``rational_triton.forward_launch`` /
``backward_launch``: the same constexprs, warps, stages and launch configuration for the target's warp size and
limits) with the JIT's own argument specialisation (16-aligned pointers and ints divisible by 16 marked
``tt.divisibility``, ints equal to 1 folded), by Triton's compiler, for every target in ``ARCHS``: NVIDIA sm_70 to
sm_120 (cubin; registers, stack and local memory read back with Triton's bundled ``cuobjdump -res-usage``) and AMD
Instinct gfx90a / gfx942 (amdgcn, whose assembler comments give VGPRs, SGPRs, scratch and occupancy; wavefronts are
64 wide). From those and the assembly this module derives what bounds a memory-bound kernel's bandwidth:

- programs resident per SM (CU): ``rational_triton.resident_programs``, the function the launcher itself applies to
  the compiled kernel at its first launch;
- bytes of global loads each thread issues per iteration (the loop body for the backward, the whole kernel for the
  forward, without the scalar coefficient loads), and whether they are 16-byte vector accesses;
- bytes in flight per SM = resident threads x those bytes, and the fraction of HBM bandwidth that can sustain by
  Little's law (bytes in flight needed per SM = bandwidth x latency / SMs).

Used by ``scripts/kernel_report.py`` and by the CI test ``tests/ops/test_kernel_report.py``. Needs triton (and its
bundled tools), no GPU.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["ARCHS", "BANDWIDTH_ARCHS", "KernelResources", "amdgcn_resources", "compile_for", "cubin_resources",
           "kat_shapes",
           "kernel_resources", "op_launches", "ptxas_info", "report_rows"]


@dataclass(frozen=True)
class Arch:
    """What the report needs to know of a GPU target (the device named is the one the figures are for).

    Attributes:
        backend: "cuda" or "hip" (Triton's target backend).
        arch: compute capability (NVIDIA, e.g. 90) or gfx name (AMD).
        device: the GPU whose figures these are.
        sm_count: SMs / CUs.
        hbm_bytes_per_s: memory bandwidth.
        latency_s: loaded DRAM latency assumed for Little's law.
        shared_bytes_per_sm: shared memory / LDS per SM / CU.
        threads_per_sm: resident threads per SM / CU.
        blocks_per_sm: resident programs per SM / CU at most.
        note: what the target lacks (e.g. bf16 arithmetic before sm_80: Triton emulates the conversions).
    """

    backend: str
    arch: object
    device: str
    sm_count: int
    hbm_bytes_per_s: float
    latency_s: float
    shared_bytes_per_sm: int
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    note: str = ""

    @property
    def warp_size(self) -> int:
        return 64 if self.backend == "hip" else 32

    @property
    def limits(self):
        """The ``rational_triton.DeviceLimits`` the launcher would read from this GPU."""
        from .rational_triton import DeviceLimits

        return DeviceLimits(sm_count=self.sm_count, warp_size=self.warp_size, threads_per_sm=self.threads_per_sm,
                            blocks_per_sm=self.blocks_per_sm, shared_per_sm=self.shared_bytes_per_sm,
                            vgprs_per_simd=512 if self.backend == "hip" else 0)

    @property
    def needed_in_flight(self) -> float:
        """Bytes of loads in flight per SM that keep HBM busy (Little's law)."""
        return self.hbm_bytes_per_s * self.latency_s / self.sm_count


_NO_BF16 = "no bf16 units: Triton emulates bf16 conversions with integer ops (compiles, slower)"
# Data-sheet figures (SMs, bandwidth, per-SM limits) of one GPU per target; latency is an assumption.
ARCHS: Dict[str, Arch] = {
    "sm_70": Arch("cuda", 70, "V100 SXM2", 80, 0.9e12, 0.6e-6, 96 * 1024, note=_NO_BF16),
    "sm_75": Arch("cuda", 75, "T4", 40, 0.32e12, 0.6e-6, 64 * 1024, threads_per_sm=1024, blocks_per_sm=16,
                  note=_NO_BF16),
    "sm_80": Arch("cuda", 80, "A100 80GB", 108, 2.0e12, 0.6e-6, 164 * 1024),
    "sm_86": Arch("cuda", 86, "RTX A6000", 84, 0.77e12, 0.6e-6, 100 * 1024, threads_per_sm=1536, blocks_per_sm=16),
    "sm_89": Arch("cuda", 89, "L40S", 142, 0.86e12, 0.6e-6, 100 * 1024, threads_per_sm=1536, blocks_per_sm=24),
    "sm_90a": Arch("cuda", 90, "H200", 132, 4.8e12, 0.8e-6, 228 * 1024),
    "sm_100": Arch("cuda", 100, "B200", 148, 8.0e12, 0.8e-6, 228 * 1024),
    "sm_120": Arch("cuda", 120, "RTX 5090", 170, 1.79e12, 0.6e-6, 100 * 1024, threads_per_sm=1536,
                   blocks_per_sm=32),
    "gfx90a": Arch("hip", "gfx90a", "MI250X (one GCD)", 110, 1.6e12, 1.0e-6, 64 * 1024),
    "gfx942": Arch("hip", "gfx942", "MI300X", 304, 5.3e12, 1.0e-6, 64 * 1024),
}
# Where the report and the CI hold the kernels to the bandwidth criterion (>= 32 KB of loads in flight per SM / CU).
BANDWIDTH_ARCHS = ("sm_80", "sm_90a", "sm_100", "gfx942")

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
    sgprs: Optional[int] = None  # AMD: scalar registers
    occupancy_reported: Optional[int] = None  # AMD: the assembler's wavefronts per SIMD
    launches: object = None  # the rational_triton.Launch the numbers are for
    max_registers: Optional[int] = None  # the register cap (maxnreg) the launcher compiles this kernel with
    ttir: str = ""  # Triton IR, when asked for

    @property
    def vectorised(self) -> bool:
        """All bulk loads and stores are 16-byte vector accesses."""
        return self.scalar_load_bytes == 0 and self.scalar_store_bytes == 0


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


def compile_for(fn, args: Sequence, constexprs: dict, num_warps: int, num_stages: int, arch: str,
                options: Optional[dict] = None):
    """Compile a ``@triton.jit`` function for ``arch`` without a GPU; returns Triton's compiled kernel. ``options``:
    more compiler options (e.g. ``maxnreg``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _specialise(fn, args, constexprs)
    source = ASTSource(fn, signature, constants, attrs)
    spec = ARCHS[arch]
    target = GPUTarget(spec.backend, spec.arch, spec.warp_size)
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})


def _bundled_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"kernel report: Triton's bundled {name} is missing ({path}); reinstall triton")
    return path


def cubin_resources(cubin: bytes) -> Tuple[int, int, int]:
    """(registers, local memory bytes, stack bytes) per thread of a cubin, from ``cuobjdump -res-usage`` (local
    memory is where spilled registers go)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        result = subprocess.run([_bundled_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", result.stdout)
    if result.returncode != 0 or usage is None:
        raise RuntimeError(f"kernel report: cuobjdump failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    registers, stack, local = (int(v) for v in usage.groups())
    return registers, local, stack


def amdgcn_resources(asm: str) -> Dict[str, int]:
    """VGPRs, SGPRs, scratch bytes and occupancy (wavefronts per SIMD) from the AMDGPU assembler's comments."""
    fields = {}
    for key, name in (("vgprs", "NumVgprs"), ("sgprs", "TotalNumSgprs"), ("scratch", "ScratchSize"),
                      ("occupancy", "Occupancy")):
        found = re.search(rf"^\s*; {name}: (\d+)", asm, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"kernel report: no '; {name}:' in the amdgcn assembly")
        fields[key] = int(found.group(1))
    return fields


def ptxas_info(ptx: str, arch: str) -> Tuple[int, int, int]:
    """(registers, spill bytes, stack frame bytes) from ``ptxas -v`` (NVIDIA targets)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [_bundled_tool("ptxas"), "-v", "--gpu-name", arch, path, "-o", os.path.join(folder, "kernel.o")],
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


_AMD_ACCESS = re.compile(r"\b(?:global|buffer)_(load|store)_(dwordx4|dwordx3|dwordx2|dword|short_d16\w*|ushort|"
                         r"short|b128|b96|b64|b32|b16)\b")
_AMD_WIDTH = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4, "b32": 4}


def _amd_traffic(asm: str, data_stores_outside: int) -> Tuple[int, int, int, int]:
    """``_traffic`` for amdgcn: the loop is the blocks the assembler marks "Loop Header" / "in Loop" at depth 1;
    the coefficients are scalar (``s_load``) loads, never counted."""
    in_loop = False
    loop, whole = [], []
    for line in asm.splitlines():
        if re.match(r"^\.LBB\d+_\d+:", line):
            in_loop = ("Loop Header" in line or "in Loop" in line) and "Depth=1" in line
        access = _AMD_ACCESS.search(line)
        if access:
            entry = (access.group(1), _AMD_WIDTH.get(access.group(2), 2))
            whole.append(entry)
            if in_loop:
                loop.append(entry)
    accesses = loop if loop else whole
    loads_vector = sum(n for kind, n in accesses if kind == "load" and n >= 16)
    loads_scalar = sum(n for kind, n in accesses if kind == "load" and n < 16)
    stores_vector = sum(n for kind, n in accesses if kind == "store" and n >= 16)
    narrow_stores = [n for kind, n in accesses if kind == "store" and n < 16]
    if not loop and data_stores_outside:
        narrow_stores = narrow_stores[:-data_stores_outside]
    return loads_vector, loads_scalar, stores_vector, sum(narrow_stores)


def kernel_resources(direction: str, shape: Tuple[int, int, int], dtype: torch.dtype, arch: str = "sm_90a",
                     bias: bool = False, safe: bool = False, keep_ir: bool = False) -> KernelResources:
    """Compile the ``direction`` ("forward" or "backward") kernel for an (M, G, L) input of ``dtype`` as the
    launcher would on ``arch``, and derive its resources. ``bias``: the input-bias variant; ``safe``: the second
    pass that recomputes, in the reciprocal form, the tiles the first flagged for an |x| above LARGE_INPUT (its
    programs exit at once unless flagged, so the first pass is what bounds the bandwidth); ``keep_ir``: keep the
    Triton IR (``ttir``) for inspection."""
    from . import rational_triton as kernels

    rows, groups, length = shape
    data = torch.empty(16, dtype=dtype)  # stands for x / y / grad / dx: only dtype and alignment matter
    coefficients = torch.empty(16, dtype=torch.float32)
    flags = torch.empty(16, dtype=torch.int32)
    target = ARCHS[arch]
    limits = target.limits
    if direction == "forward":
        launch = kernels.forward_launch(rows, groups, length, data.element_size(), limits)
        fn = kernels._group_rational_forward_kernel
        args = [data, data, coefficients, coefficients, coefficients, flags, rows, groups * length, 0,
                launch.segments, launch.grid[0]]
    elif direction == "backward":
        launch = kernels.backward_launch(rows, groups, length, data.element_size(), limits, 4)
        fn = kernels._group_rational_backward_kernel
        args = [data, data, data, coefficients, coefficients, coefficients, coefficients, coefficients, flags, rows,
                groups * length, 0, launch.segments, launch.rows_per_program, launch.grid[0]]
    else:
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    constexprs = dict(launch.constexprs, HAS_BIAS=int(bias), SAFE=int(safe), SCAN=launch.safe_scan if safe else 1)
    compiled = {}
    warps = launch.safe_warps if safe else launch.num_warps

    def resources(cap):  # what the launcher reads from the loaded kernel, here from the cubin / amdgcn
        compiled[cap] = kernel = compile_for(fn, args, constexprs, warps, launch.num_stages, arch,
                                             None if cap is None else {"maxnreg": cap})
        shared = int(getattr(kernel.metadata, "shared", 0))
        if target.backend == "hip":
            amd = amdgcn_resources(kernel.asm["amdgcn"])
            return amd["vgprs"], amd["scratch"], shared
        registers, local, stack = cubin_resources(kernel.asm["cubin"])
        return registers, local + stack, shared

    if direction == "backward" and not safe and not bias:  # the launcher's register-cap choice, made the same way
        cap, _ = kernels.backward_register_cap(limits, resources)
    else:
        cap = None
        resources(None)
    compiled = compiled[cap]
    shared = int(getattr(compiled.metadata, "shared", 0))
    sgprs = occupancy_reported = None
    if target.backend == "hip":
        asm = compiled.asm["amdgcn"]
        amd = amdgcn_resources(asm)
        registers, spills, stack = amd["vgprs"], amd["scratch"], amd["scratch"]
        sgprs, occupancy_reported = amd["sgprs"], amd["occupancy"]
        loads_v, loads_s, stores_v, stores_s = _amd_traffic(asm, data_stores_outside=1)
    else:
        registers, spills, stack = cubin_resources(compiled.asm["cubin"])
        # Outside the data: the ten coefficient loads; the forward's per-program flag store.
        loads_v, loads_s, stores_v, stores_s = _traffic(compiled.asm["ptx"], data_loads_outside=10,
                                                        data_stores_outside=1)
    resident = kernels.resident_programs(limits, registers, warps, shared)
    if direction == "backward" and not safe:  # the launcher sizes its grid from these very resources
        launch = kernels.backward_launch(rows, groups, length, data.element_size(), limits, resident)
    programs = launch.grid[0]
    threads = target.warp_size * warps
    resident_now = min(resident, math.ceil(programs / target.sm_count))  # a small grid fills fewer slots
    in_flight = resident_now * threads * (loads_v + loads_s)
    return KernelResources(
        kernel=direction, arch=arch, dtype=str(dtype).replace("torch.", ""), shape=shape,
        num_warps=warps, constexprs=constexprs, grid=programs, registers=registers,
        spill_bytes=spills, stack_bytes=stack, shared_bytes=shared, programs_per_sm=resident,
        occupancy=resident * threads / target.threads_per_sm,
        vector_load_bytes=loads_v, scalar_load_bytes=loads_s, vector_store_bytes=stores_v,
        scalar_store_bytes=stores_s, in_flight_per_sm=float(in_flight),
        bandwidth_bound=min(1.0, in_flight / target.needed_in_flight),
        sgprs=sgprs, occupancy_reported=occupancy_reported, launches=launch, max_registers=cap,
        ttir=compiled.asm["ttir"] if keep_ir else "",
    )


def report_rows(shapes: Sequence[Tuple[str, Tuple[int, int, int]]], dtypes: Sequence[torch.dtype],
                arches: Sequence[str], directions: Sequence[str] = ("forward", "backward"),
                variants: Sequence[Tuple[str, bool, bool]] = (("plain", False, False),)) -> List[dict]:
    """One dict per (arch, shape, dtype, variant, direction): the label, the variant's name and the
    ``KernelResources`` fields (without the IR). ``variants``: (name, bias, safe) triples."""
    rows = []
    for arch in arches:
        for label, shape in shapes:
            for dtype in dtypes:
                for name, bias, safe in variants:
                    for direction in directions:
                        resources = kernel_resources(direction, shape, dtype, arch, bias=bias, safe=safe)
                        fields = {k: v for k, v in resources.__dict__.items() if k not in ("ttir", "launches")}
                        rows.append(dict(label=label, variant=name, vectorised=resources.vectorised, **fields))
    return rows


def op_launches(shape: Tuple[int, int, int], dtype: torch.dtype, arch: str) -> Dict[str, List[Tuple[str, int]]]:
    """The kernel launches of one forward and one backward of the op on an (M, G, L) input on ``arch``, as
    (kernel, programs started): the plain pass, the large-|x| pass (a fixed grid) and, backward, the
    coefficient-gradient reduction (KAT's shared numerator)."""
    from . import rational_triton as kernels

    groups = shape[1]
    forward = kernel_resources("forward", shape, dtype, arch).launches
    backward = kernel_resources("backward", shape, dtype, arch).launches
    return {
        "forward": [("plain", forward.grid[0]), ("large-|x|", forward.safe_grid[0])],
        "backward": [("plain", backward.grid[0]), ("large-|x|", backward.safe_grid[0]),
                     ("coefficient sums", kernels.coefficient_grads_launch(groups, True)[0])],
    }
