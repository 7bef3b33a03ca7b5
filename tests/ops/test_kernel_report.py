"""The Triton kernels' resources, from a static compile for sm_90a and sm_80 (Triton's compiler and bundled ptxas run
without a GPU): no spills, 16-byte vector I/O, enough loads in flight per SM to reach HBM bandwidth at KAT shapes,
and a grid sized from the kernel's real occupancy."""
import pytest
import torch

pytest.importorskip("triton", reason="the static compile needs triton (installed with torch on Linux)")

from kat_timm.ops import rational_triton  # noqa: E402
from kat_timm.ops.kernel_report import ARCHS, compile_for, kat_shapes, kernel_resources, ptxas_info  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KAT_SHAPES = kat_shapes(128)
ODD_SHAPES = [(37, 8, 5), (1000, 8, 21), (2, 8, 75), (640, 8, 12), (197, 7, 3)]
MIN_IN_FLIGHT = 32 * 1024  # bytes per SM; an H200 needs ~29 KB (Little's law)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,shape", KAT_SHAPES, ids=[label for label, _ in KAT_SHAPES])
def test_kat_shapes_reach_bandwidth_on_sm90(label, shape, dtype, direction):
    r = kernel_resources(direction, shape, dtype, "sm_90a")
    where = f"{direction} {label} {dtype} sm_90a"
    assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{where}: {r.spill_bytes} B spilled, {r.stack_bytes} B stack"
    assert r.vectorised, f"{where}: narrow accesses: {r.scalar_load_bytes} B loads, {r.scalar_store_bytes} B stores"
    tensors = 2 if direction == "backward" else 1  # x and the gradient, or x
    tile = r.constexprs["BLOCK_M"] * r.constexprs["BLOCK_L"] // (32 * r.num_warps)
    assert r.vector_load_bytes == tensors * tile * dtype.itemsize, f"{where}: not every element loaded once"
    assert r.in_flight_per_sm >= MIN_IN_FLIGHT, (
        f"{where}: {r.in_flight_per_sm / 1024:.1f} KB in flight per SM ({r.programs_per_sm} programs x "
        f"{r.num_warps * 32} threads x {r.vector_load_bytes} B, {r.registers} registers); need >= 32 KB"
    )


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_grid_uses_real_occupancy(arch, dtype):
    for label, shape in KAT_SHAPES:
        r = kernel_resources("backward", shape, dtype, arch)
        assumed = rational_triton.backward_programs_per_sm(dtype)
        assert r.programs_per_sm == assumed, (
            f"{label} {dtype} {arch}: the compiled backward fits {r.programs_per_sm} programs per SM "
            f"({r.registers} registers), the grid is sized for {assumed}: "
            "update BACKWARD_PROGRAMS_PER_SM in kat_timm/ops/rational_triton.py"
        )
        assert r.vectorised and r.spill_bytes == 0, f"{label} {dtype} {arch}"


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes_do_not_spill(shape, dtype, direction):
    r = kernel_resources(direction, shape, dtype, "sm_90a")
    assert r.spill_bytes == 0 and r.stack_bytes == 0, f"{direction} {shape} {dtype}: spills {r.spill_bytes} B"


def test_backward_grid_fills_whole_waves():
    # KAT-B act2 at batch 128: enough rows for several waves; the grid must not leave a ragged last wave.
    launch = rational_triton.backward_launch(128 * 197, 8, 384, torch.bfloat16, 132)
    slots = 132 * rational_triton.backward_programs_per_sm(torch.bfloat16)
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
        dict(CHUNKS=3, SHARED_NUMERATOR=1, BLOCK_R=64), num_warps=4, num_stages=1, arch="sm_90a",
    )
    registers, spills, stack = ptxas_info(kernel.asm["ptx"], "sm_90a")
    assert spills == 0 and stack == 0 and registers < 255


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
