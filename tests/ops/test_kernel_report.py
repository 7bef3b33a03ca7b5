"""The Triton kernels' resources, from a static compile for every GPU target (Triton's compiler and bundled tools run
without a GPU): no spills, 16-byte vector I/O, enough loads in flight per SM to reach HBM bandwidth at KAT shapes on
sm_80, sm_90a, sm_100 and gfx942, a grid sized from the kernel's real occupancy, and the launcher's latent limits.

CI stays lean: sm_90a is checked at every KAT shape and variant, the bandwidth targets at every KAT shape (plain
passes), every other target at two KAT shapes (group lengths 24 and 384: the smallest and the largest segment) in
every dtype plus the heaviest variant; ``scripts/kernel_report.py --arch all --variant all`` is the full matrix."""
import re

import pytest
import torch

pytest.importorskip("triton", reason="the static compile needs triton (installed with torch on Linux)")

from kat_timm.ops import rational_triton  # noqa: E402
from kat_timm.ops.kernel_report import (  # noqa: E402
    ARCHS,
    BANDWIDTH_ARCHS,
    compile_for,
    kat_shapes,
    kernel_resources,
    op_launches,
    ptxas_info,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KAT_SHAPES = kat_shapes(128)
ODD_SHAPES = [(37, 8, 5), (1000, 8, 21), (2, 8, 75), (640, 8, 12), (197, 7, 3)]
MIN_IN_FLIGHT = 32 * 1024  # bytes per SM; an H200 needs ~29 KB (Little's law)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,shape", KAT_SHAPES, ids=[label for label, _ in KAT_SHAPES])
@pytest.mark.parametrize("arch", BANDWIDTH_ARCHS)
def test_kat_shapes_reach_bandwidth(arch, label, shape, dtype, direction):
    r = kernel_resources(direction, shape, dtype, arch)
    where = f"{direction} {label} {dtype} {arch}"
    assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{where}: {r.spill_bytes} B spilled, {r.stack_bytes} B stack"
    assert r.vectorised, f"{where}: narrow accesses: {r.scalar_load_bytes} B loads, {r.scalar_store_bytes} B stores"
    tensors = 2 if direction == "backward" else 1  # x and the gradient, or x
    tile = r.constexprs["BLOCK_M"] * r.constexprs["BLOCK_L"] // (ARCHS[arch].warp_size * r.num_warps)
    assert r.vector_load_bytes == tensors * tile * dtype.itemsize, f"{where}: not every element loaded once"
    assert r.in_flight_per_sm >= MIN_IN_FLIGHT, (
        f"{where}: {r.in_flight_per_sm / 1024:.1f} KB in flight per SM ({r.programs_per_sm} programs x "
        f"{r.num_warps * 32} threads x {r.vector_load_bytes} B, {r.registers} registers); need >= 32 KB"
    )


@pytest.mark.parametrize("arch", BANDWIDTH_ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_grid_uses_real_occupancy(arch, dtype):
    # The grid is sized from the compiled kernel's resources through the same function the launcher calls at its
    # first launch on a GPU (rational_triton.resident_programs), so what is reported is what runs.
    for label, shape in KAT_SHAPES:
        r = kernel_resources("backward", shape, dtype, arch)
        limits = ARCHS[arch].limits
        expected = rational_triton.resident_programs(limits, r.registers, r.num_warps, r.shared_bytes)
        assert r.programs_per_sm == expected >= 1, f"{label} {dtype} {arch}: {r.programs_per_sm} vs {expected}"
        launch = rational_triton.backward_launch(*shape, dtype.itemsize, limits, r.programs_per_sm)
        assert ARCHS[arch].backend == "cuda" or r.occupancy_reported * 4 // r.num_warps == r.programs_per_sm, (
            f"{label} {dtype} {arch}: the assembler's occupancy ({r.occupancy_reported} waves per SIMD) disagrees")
        assert r.grid == launch.grid[0], f"{label} {dtype} {arch}: the report's grid is not the launcher's"
        assert r.vectorised and r.spill_bytes == 0, f"{label} {dtype} {arch}"


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes_do_not_spill(shape, dtype, direction):
    r = kernel_resources(direction, shape, dtype, "sm_90a")
    assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{direction} {shape} {dtype}: spills {r.spill_bytes} B"


OTHER_ARCHS = [arch for arch in ARCHS if arch not in BANDWIDTH_ARCHS]
REPRESENTATIVE = [("KAT-T act1", (128 * 197, 8, 24)), ("KAT-B act2", (128 * 197, 8, 384))]


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_every_target_compiles_kat_shapes_without_spills(arch):
    """Volta to Blackwell consumer parts and the MI250X: every dtype, both directions; the heaviest variant (the
    large-|x| pass with a bias) in fp32. bf16 compiles before sm_80 too (Triton emulates its conversions)."""
    checks = [(label, shape, dtype, direction, False, False) for label, shape in REPRESENTATIVE for dtype in DTYPES
              for direction in ("forward", "backward")]
    checks += [("KAT-B act2", REPRESENTATIVE[1][1], torch.float32, direction, True, True)
               for direction in ("forward", "backward")]
    for label, shape, dtype, direction, bias, safe in checks:
        r = kernel_resources(direction, shape, dtype, arch, bias=bias, safe=safe)
        where = f"{arch} {direction} {label} {dtype} bias={bias} safe={safe}"
        assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{where}: {r.spill_bytes} B spilled, {r.stack_bytes} B stack"
        assert r.programs_per_sm >= 1 and (safe or r.vectorised), f"{where}: {r}"


@pytest.mark.parametrize("arch", ["sm_100", "gfx942"])
def test_bandwidth_targets_other_variants_do_not_spill(arch):
    for direction in ("forward", "backward"):
        for dtype in DTYPES:
            r = kernel_resources(direction, REPRESENTATIVE[1][1], dtype, arch, bias=True, safe=True)
            assert r.spill_bytes == 0 and r.stack_bytes == 0, (
                f"{arch} {direction} {dtype}: {r.spill_bytes} B spilled, {r.stack_bytes} B stack")


def test_launches_per_call_at_kat_t_act1():
    """The op at (128 x 197, 192) fp32: two launches forward, three backward; the large-|x| pass and the
    coefficient sums start a number of programs that doesn't grow with the input."""
    ops = op_launches((128 * 197, 8, 24), torch.float32, "sm_90a")
    assert [name for name, _ in ops["forward"]] == ["plain", "large-|x|"]
    assert [name for name, _ in ops["backward"]] == ["plain", "large-|x|", "coefficient sums"]
    assert dict(ops["forward"])["large-|x|"] <= 4 * 132 and dict(ops["backward"])["coefficient sums"] == 9
    bigger = op_launches((1024 * 197, 8, 24), torch.float32, "sm_90a")
    assert dict(bigger["forward"])["large-|x|"] == dict(ops["forward"])["large-|x|"]
    assert dict(bigger["forward"])["plain"] > dict(ops["forward"])["plain"]


def test_backward_grid_fills_whole_waves():
    # KAT-B act2 at batch 128: enough rows for several waves; the grid must not leave a ragged last wave.
    limits = rational_triton.DeviceLimits(sm_count=132)
    launch = rational_triton.backward_launch(128 * 197, 8, 384, 2, limits, 4)
    slots = 132 * 4
    waves = -(-launch.grid[0] // slots)
    assert launch.grid[0] / (waves * slots) >= 0.9, f"{launch.grid[0]} programs on {slots} slots: ragged last wave"
    assert launch.programs_m * launch.rows_per_program >= 128 * 197


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("safe,bias", [(True, False), (False, True), (True, True)], ids=["safe", "bias", "safe+bias"])
def test_other_variants_do_not_spill(direction, dtype, safe, bias):
    # The large-|x| pass and the input-bias variants, at KAT-B act2 (C = 3072).
    r = kernel_resources(direction, (128 * 197, 8, 384), dtype, "sm_90a", bias=bias, safe=safe)
    assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{direction} {dtype} safe={safe} bias={bias}: {r}"


def test_finalize_kernel_compiles_without_spills():
    partials = torch.empty(16, dtype=torch.float32)
    kernel = compile_for(
        rational_triton._coefficient_grads_kernel, [partials, partials, partials, partials, 55, 8],
        dict(CHUNKS=3, SHARED_NUMERATOR=1, BLOCK_R=rational_triton._FINALIZE_ROWS), num_warps=4, num_stages=1,
        arch="sm_90a",
    )
    registers, spills, stack = ptxas_info(kernel.asm["ptx"], "sm_90a")
    assert spills == 0 and stack == 0 and registers < 255
    for arch in ("sm_70", "sm_100", "gfx942"):
        kernel = compile_for(
            rational_triton._coefficient_grads_kernel, [partials, partials, partials, partials, 55, 8],
            dict(CHUNKS=3, SHARED_NUMERATOR=0, BLOCK_R=rational_triton._FINALIZE_ROWS), num_warps=4, num_stages=1,
            arch=arch,
        )
        assert ("amdgcn" in kernel.asm) == (arch == "gfx942"), arch


# A data pointer (x, y, grad, dx: bf16 here) moved by a 32-bit offset: ``tt.addptr`` of a bf16 pointer (or tensor
# of them) with an i32 offset, and 32-bit products of tensors (the tile offsets rows x K).
_NARROW_ADDRESS = re.compile(r"tt\.addptr .*: (?:tensor<[0-9x]+x)?!tt\.ptr<bf16>>?, (?:tensor<[0-9x]+x)?i32>?"
                             r"|arith\.muli .*: tensor<[0-9x]+xi32>")


@pytest.mark.parametrize("direction,shape", [
    ("forward", (600, 8, 528392)),  # the review's example: BLOCK_M = 512, 512 x K = 2.16e9 > 2^31
    ("backward", (600, 8, 1048584)),  # BLOCK_M = 256: 256 x K = 2.15e9
], ids=["forward", "backward"])
def test_offsets_past_int32_are_64_bit(direction, shape):
    """channel_dim=1 with a large C x H x W: the tile offsets and the row step (BLOCK_M x K) pass 2^31. The
    launcher picks the WIDE specialisation there, whose address arithmetic on the data pointers is 64-bit."""
    rows, groups, length = shape
    limits = ARCHS["sm_90a"].limits
    launch = (rational_triton.forward_launch(rows, groups, length, 2, limits) if direction == "forward"
              else rational_triton.backward_launch(rows, groups, length, 2, limits, 4))
    assert launch.constexprs["BLOCK_M"] * groups * length >= 2**31, "the shape no longer crosses 2^31"
    assert launch.constexprs["WIDE"] == 1
    r = kernel_resources(direction, shape, torch.bfloat16, "sm_90a", keep_ir=True)
    narrow = [line.strip()[:160] for line in r.ttir.splitlines() if _NARROW_ADDRESS.search(line)]
    assert not narrow, f"{direction} {shape}: 32-bit address arithmetic on the data:\n" + "\n".join(narrow)
    assert r.spill_bytes == 0 and r.stack_bytes == 0
    # The usual shapes keep the 32-bit tile offsets (fewer registers): WIDE only where needed.
    assert rational_triton.forward_launch(128 * 197, 8, 384, 2, limits).constexprs["WIDE"] == 0


def test_launchers_accept_empty_shapes():
    limits = rational_triton.DeviceLimits(sm_count=132)
    for rows, groups, length in [(0, 8, 24), (5, 8, 0), (0, 1, 0)]:
        forward = rational_triton.forward_launch(rows, groups, length, 4, limits)
        backward = rational_triton.backward_launch(rows, groups, length, 4, limits, 4)
        assert forward.grid == (0,) and backward.grid == (0,), (rows, groups, length)
        assert backward.programs_m == 0 and backward.rows_per_program >= 1


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_large_input_pass_grid_does_not_grow(direction):
    """The large-|x| pass is a fixed grid of a few programs per SM walking the first pass's flags: at most
    4 x SMs programs, the same for KAT-B act2 at batch 128 and at batch 1024."""
    limits = rational_triton.DeviceLimits(sm_count=132)
    grids = []
    for batch in (1, 128, 1024):
        shape = (batch * 197, 8, 384)
        launch = (rational_triton.forward_launch(*shape, 2, limits) if direction == "forward"
                  else rational_triton.backward_launch(*shape, 2, limits, 4))
        assert launch.safe_grid[0] <= 4 * 132 and launch.safe_grid[0] <= max(1, launch.grid[0])
        grids.append(launch.safe_grid[0])
    assert grids[1] == grids[2], f"{direction}: the large-|x| grid grew with the input: {grids}"
    assert rational_triton.coefficient_grads_launch(8, True) == (9,)


def test_script_help_shows_the_defaults(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exited:
        script.main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ['sm_80', 'sm_90a'])" in text and "(default: [128, 1])" in text, text
