"""group_rational on CPU: every CPU backend against the float64 reference, plus the op's contract."""
import contextlib

import sys

import pytest
import torch

from kat_timm.ops import group_rational, group_rational_, group_rational_reference, native_cpu_status, select_backend
from kat_timm.layers import rational_init
from tests.helpers import (
    assert_backward_deterministic,
    assert_matches_rounded_reference,
    check_against_reference,
    compile_and_capture,
    magnitudes,
    random_coefficients,
    relative_error,
    torch_threads,
)

CPU_BACKENDS = ["torch", "native"]

SHAPES = [
    # (shape, channel_dim, groups)
    ((3, 7, 64), -1, 8),  # token layout, odd leading sizes
    ((5, 40), -1, 8),  # C = 40: groups of 5
    ((1, 40), -1, 8),  # one row
    ((2, 13, 3 * 7), -1, 7),  # prime group count, 3 channels per group
    ((2, 40, 5, 3), 1, 8),  # image layout, odd spatial sizes
    ((1, 16, 1, 1), 1, 8),  # image layout, one pixel
    ((4, 3, 2048), -1, 8),  # wide groups (the kernels' one-group-per-tile path)
    ((2, 3, 5, 24), 3, 4),  # channel_dim as a positive last index
]


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request, use_backend):
    if request.param == "native":
        available, reason = native_cpu_status()
        assert available, f"the native CPU kernel must build on the test machines: {reason}"
    use_backend(request.param)
    return request.param


@pytest.mark.parametrize("shape,channel_dim,groups", SHAPES)
@pytest.mark.parametrize("shared_numerator", [True, False])
def test_matches_reference(cpu_backend, shape, channel_dim, groups, shared_numerator):
    x = torch.randn(shape) * 2
    assert select_backend(x) == cpu_backend
    numerator, denominator = random_coefficients(groups, shared_numerator)
    check_against_reference(x, numerator, denominator, channel_dim)


def test_exact_zero_coefficients_and_identity(cpu_backend):
    """b == 0 exactly (identity init): value is P(x), and d|b|/db is taken as +1 so the denominator still learns."""
    x = torch.randn(4, 6, 16)
    numerator = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    denominator = torch.zeros(8, 4)
    y = check_against_reference(x, numerator, denominator)
    assert torch.equal(y, x), "the identity init must reproduce x exactly"
    numerator.requires_grad_()
    denominator.requires_grad_()
    (group_rational(x, numerator, denominator) ** 2).sum().backward()
    assert (denominator.grad != 0).all(), "a zero denominator must receive a nonzero gradient (sign(0) = +1)"
    # Mixed: some coefficients exactly zero, some negative.
    numerator2 = torch.tensor([[0.0, 0.5, 0.0, -0.2, 0.0, 0.1]])
    denominator2 = torch.tensor([[0.0, -0.3, 0.0, 0.2]]).repeat(8, 1)
    check_against_reference(x, numerator2, denominator2)


def test_x_exactly_zero(cpu_backend):
    """At x == 0, dQ/dx uses sign(0) = +1: dF/dx = a1 - a0 * |b1|."""
    x = torch.zeros(2, 8)
    numerator = torch.tensor([[0.3, 0.7, 0.1, 0.0, 0.0, 0.0]], requires_grad=True)
    denominator = torch.full((8, 4), 0.5, requires_grad=True)
    x.requires_grad_()
    group_rational(x, numerator, denominator).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.7 - 0.3 * 0.5)), x.grad


def test_gradcheck_float64(use_backend):
    """gradcheck in float64 (float64 always takes the PyTorch path, which must be exact)."""
    use_backend("auto")
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    numerator, denominator = random_coefficients(8, shared_numerator=False, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: group_rational(*a, -1), (x, numerator, denominator))
    x_img = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    num1, den1 = random_coefficients(4, shared_numerator=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: group_rational(*a, 1), (x_img, num1, den1))


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(6, 9, 64), (3, 5, 1024)])  # short groups (row mode), long groups
def test_low_precision(cpu_backend, dtype, rtol, shape):
    """fp16/bf16 in, same dtype out, math in fp32: error no worse than rounding the exact result to the dtype."""
    x = (torch.randn(shape) * 2).to(dtype)
    numerator, denominator = random_coefficients(8)
    y = group_rational(x, numerator, denominator)
    assert y.dtype == dtype
    exact = group_rational_reference(x, numerator, denominator)
    rounding = relative_error(exact.to(dtype), exact)
    assert relative_error(y, exact) <= max(2 * rounding, rtol), (relative_error(y, exact), rounding)

    x.requires_grad_()
    y = group_rational(x, numerator, denominator)
    grad = torch.randn_like(y)
    y.backward(grad)
    _, ref_dx, ref_dnum, ref_dden = group_rational_reference(x, numerator, denominator, -1, grad)
    assert x.grad.dtype == dtype
    assert numerator.grad.dtype == torch.float32, "coefficient grads come back in the parameters' dtype"
    assert relative_error(x.grad, ref_dx) <= 4 * rtol, "grad x"
    # Coefficient sums are accumulated in fp32 from the low-precision inputs: only input rounding remains.
    assert relative_error(numerator.grad, ref_dnum) <= 1e-4, "grad numerator"
    assert relative_error(denominator.grad, ref_dden) <= 1e-4, "grad denominator"


def test_non_contiguous_and_channels_last(cpu_backend):
    numerator, denominator = random_coefficients(8, shared_numerator=False)
    base = torch.randn(6, 64, 10)
    x_transposed = base.transpose(1, 2)  # (6, 10, 64), not contiguous
    y = check_against_reference(x_transposed, numerator, denominator, -1)
    assert y.is_contiguous()
    x_sliced = torch.randn(4, 9, 128)[:, ::2, ::2]  # strided in every dim
    check_against_reference(x_sliced, numerator, denominator, -1)
    image = torch.randn(2, 32, 5, 7).to(memory_format=torch.channels_last)
    y = check_against_reference(image, numerator, denominator, 1)
    assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input gives channels_last output"
    out = group_rational(base, numerator.detach(), denominator.detach(), 1)
    assert out.data_ptr() != base.data_ptr(), "output must be a fresh tensor"


def test_deterministic(cpu_backend):
    assert_backward_deterministic(torch.randn(16, 197, 96), *random_coefficients(8))  # short groups (row mode)
    assert_backward_deterministic(torch.randn(4, 50, 2048), *random_coefficients(8))  # long groups


def test_native_independent_of_thread_count(use_backend):
    use_backend("native")
    x = torch.randn(32, 197, 96)
    numerator, denominator = random_coefficients(8)
    grad = torch.randn_like(x)
    grads = []
    for n in (1, 2):
        with torch_threads(n):
            for t in (numerator, denominator):
                t.grad = None
            x.requires_grad_()
            group_rational(x, numerator, denominator).backward(grad)
            grads.append((numerator.grad.clone(), denominator.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_nan_stays_local(cpu_backend):
    x = torch.randn(4, 32)
    x[1, 5] = float("nan")
    numerator, denominator = random_coefficients(8)
    y = group_rational(x, numerator.detach(), denominator.detach())
    nan = torch.isnan(y)
    assert nan[1, 5] and nan.sum() == 1, "NaN must appear at its own position only"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("init", ["identity", "swish", "gelu", "tanh", "sigmoid", "relu", "leaky_relu"])
def test_finite_for_large_inputs(use_backend, dtype, init):
    use_backend("auto")
    numerator, denominator = rational_init(init)
    numerator = torch.tensor([numerator])
    denominator = torch.tensor([denominator]).repeat(8, 1)
    x = torch.linspace(-1e4, 1e4, 8 * 1001).to(dtype).view(1001, 8)
    y = group_rational(x, numerator, denominator)
    assert torch.isfinite(y).all(), f"non-finite output for {init} in {dtype}"


def test_zero_size_input(cpu_backend):
    x = torch.randn(0, 16, requires_grad=True)
    numerator, denominator = random_coefficients(8)
    y = group_rational(x, numerator, denominator)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(numerator.grad, torch.zeros_like(numerator))


def test_bad_inputs():
    numerator, denominator = random_coefficients(8)
    with pytest.raises(ValueError, match=r"C=40 .*G=6"):
        group_rational(torch.randn(2, 40), numerator, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"\(G, 4\).*\(8, 5\)"):
        group_rational(torch.randn(2, 40), numerator, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"\(1, 6\).*\(8, 6\).*\(2, 6\)"):
        group_rational(torch.randn(2, 40), torch.randn(2, 6), denominator)
    with pytest.raises(TypeError, match="floating-point"):
        group_rational(torch.arange(16).view(2, 8), numerator, denominator)
    with pytest.raises(TypeError, match="floating-point"):
        group_rational(torch.ones(2, 8, dtype=torch.bool), numerator, denominator)
    with pytest.raises(ValueError, match="channel_dim"):
        group_rational(torch.randn(2, 8), numerator, denominator, channel_dim=2)
    with pytest.raises(ValueError, match="scalar"):
        group_rational(torch.tensor(1.0), numerator, denominator)


def test_backend_env_errors(use_backend):
    x = torch.randn(2, 8)
    use_backend("cuda-please")
    with pytest.raises(ValueError, match="KAT_RATIONAL_BACKEND"):
        select_backend(x)
    use_backend("triton")
    # In this (non-interpreted) session the Triton kernels can't take CPU tensors: the message says how to fix it.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_rational(x, *random_coefficients(8))
    use_backend("native")
    with pytest.raises(RuntimeError, match="native"):
        select_backend(torch.randn(2, 8, device="meta"))
    assert select_backend(x.double()) == "torch", "float64 takes the torch path even when native is forced"


def test_float64_routes_to_torch(use_backend):
    use_backend("auto")
    assert select_backend(torch.randn(2, 8, dtype=torch.float64)) == "torch"
    assert select_backend(torch.randn(2, 8)) == "native"


def test_meta_tensors():
    x = torch.empty(2, 197, 384, device="meta", requires_grad=True)
    numerator = torch.empty(1, 6, device="meta", requires_grad=True)
    denominator = torch.empty(8, 4, device="meta", requires_grad=True)
    y = group_rational(x, numerator, denominator)
    assert y.device.type == "meta" and y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and numerator.grad.shape == (1, 6) and denominator.grad.shape == (8, 4)


@pytest.mark.parametrize("channel_dim,shape", [(-1, (3, 7, 64)), (1, (2, 16, 5, 5))])
def test_opcheck(cpu_backend, channel_dim, shape):
    x = torch.randn(shape, requires_grad=True)
    numerator, denominator = random_coefficients(8)
    torch.library.opcheck(torch.ops.kat_timm.group_rational.default, (x, numerator, denominator, channel_dim))
    grad = torch.randn(shape)
    torch.library.opcheck(
        torch.ops.kat_timm.group_rational_backward.default,
        (grad, x.detach(), numerator.detach(), denominator.detach(), channel_dim),
    )


def test_torch_compile_fullgraph(use_backend):
    use_backend("auto")
    torch._dynamo.reset()
    numerator, denominator = random_coefficients(8)
    linear = torch.nn.Linear(64, 64)

    def block(x, num, den):
        return linear(group_rational(x, num, den)).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 64, requires_grad=True)
    loss = compiled(x, numerator, denominator)
    loss.backward()
    grads = [t.grad.clone() for t in (x, numerator, denominator)]
    for t in (x, numerator, denominator):
        t.grad = None
    block(x, numerator, denominator).backward()
    assert torch.allclose(loss, block(x, numerator, denominator))
    for compiled_grad, t in zip(grads, (x, numerator, denominator)):
        assert torch.allclose(compiled_grad, t.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor(use_backend):
    """The default inductor backend, forward and backward, without graph breaks."""
    use_backend("auto")
    torch._dynamo.reset()
    numerator, denominator = random_coefficients(8)
    compiled = torch.compile(lambda x, n, d: group_rational(x * 2, n, d), fullgraph=True)
    x = torch.randn(4, 32, requires_grad=True)
    y = compiled(x, numerator, denominator)
    y.sum().backward()
    expected = group_rational_reference(x * 2, numerator, denominator)
    assert relative_error(y, expected) < 1e-5
    assert x.grad is not None and numerator.grad is not None and denominator.grad is not None


@pytest.mark.parametrize("channel_dim,shape,lowered", [(-1, (4, 7, 8 * 24), True), (-1, (3, 8 * 200), True),
                                                       (1, (2, 16, 5, 5), True), (-1, (2, 197, 1536), False)])
def test_torch_compile_inference_on_the_native_kernel(use_backend, monkeypatch, channel_dim, shape, lowered):
    """Compiled inference on a CPU runs the native kernel over a copy the graph owns (kat_timm::group_rational_in_place)
    for tensors of NATIVE_UNDER_COMPILE_MIN_ELEMENTS or more (lowered to 0 for the small shapes): the eager op's
    values bit for bit, large inputs included, and the caller's input untouched."""
    use_backend("native")
    if lowered:
        monkeypatch.setattr(sys.modules["kat_timm.ops.group_rational"], "NATIVE_UNDER_COMPILE_MIN_ELEMENTS", 0)
    torch._dynamo.reset()
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    x = torch.randn(shape) * 3
    x.view(-1)[::97] = 3e19
    bias = torch.randn(shape[channel_dim])
    kept = x.clone()
    compiled = torch.compile(lambda t, b: group_rational(t, numerator, denominator, channel_dim, bias=b),
                             fullgraph=True)
    with torch.no_grad():
        y = compiled(x, bias)
    assert torch.equal(y, group_rational(x, numerator, denominator, channel_dim, bias=bias))
    assert torch.equal(x, kept), "the input was written over"


def test_torch_compile_inference_of_small_tensors_is_pointwise(use_backend):
    """Below NATIVE_UNDER_COMPILE_MIN_ELEMENTS compiled inference reaches the backend as pointwise ops (no kat_timm
    op), within float32 rounding of the kernel, large inputs included."""
    use_backend("native")
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    x = torch.randn(4, 7, 64) * 3
    x.view(-1)[::97] = 3e19
    y, targets = compile_and_capture(lambda t: group_rational(t, numerator, denominator), x, mode=torch.no_grad)
    assert not any("kat_timm" in target for target in targets)
    assert relative_error(y, group_rational(x, numerator, denominator)) < 1e-6


def test_torch_compile_reduce_overhead_runs_on_cpu(use_backend):
    """mode="reduce-overhead" (CUDA graphs on a GPU, tests/ops/test_cuda.py) compiles and runs the op on a CPU."""
    use_backend("auto")
    torch._dynamo.reset()
    numerator, denominator = random_coefficients(8)
    compiled = torch.compile(lambda x, n, d: group_rational(x, n, d), mode="reduce-overhead", fullgraph=True)
    x = torch.randn(6, 64, requires_grad=True)
    for _ in range(2):
        y = compiled(x, numerator, denominator)
    y.backward(torch.ones_like(y))
    assert relative_error(y, group_rational_reference(x, numerator, denominator)) < 1e-5
    assert numerator.grad is not None and denominator.grad is not None


def test_eager_path_equals_the_custom_op(cpu_backend):
    """Plain eager calls skip torch.library's dispatch (host overhead); they must compute exactly what the op does."""
    x = torch.randn(5, 7, 64, requires_grad=True)
    numerator, denominator = random_coefficients(8)
    grad = torch.randn(5, 7, 64)
    y = group_rational(x, numerator, denominator)
    eager = torch.autograd.grad(y, (x, numerator, denominator), grad)
    y_op = torch.ops.kat_timm.group_rational(x, numerator, denominator, -1)
    op = torch.autograd.grad(y_op, (x, numerator, denominator), grad)
    assert "GroupRational" in type(y.grad_fn).__name__, "the eager path was not taken"
    assert torch.equal(y, y_op), "forward differs between the eager path and the custom op"
    for name, a, b in zip(("x", "numerator", "denominator"), eager, op):
        assert torch.equal(a, b), f"grad {name} differs between the eager path and the custom op"
    with torch.no_grad():
        assert torch.equal(group_rational(x, numerator, denominator), y_op)


def test_eager_path_only_where_nothing_must_see_the_op():
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    op_module = sys.modules["kat_timm.ops.group_rational"]  # the package exports a function of the same name
    x = torch.randn(2, 16)
    assert op_module._plain_eager(x)
    with FlopCounterMode(display=False):
        assert not op_module._plain_eager(x), "FlopCounterMode must see the custom op"
    with torch.device("meta"):
        assert not op_module._plain_eager(x), "a device context (function mode) must see the custom op"
    with FakeTensorMode() as mode:
        assert not op_module._plain_eager(mode.from_tensor(x))
    assert not op_module._plain_eager(torch.nn.Parameter(x)), "a tensor subclass goes through the custom op"
    with torch.autograd.forward_ad.dual_level():
        assert not op_module._plain_eager(x), "forward-mode AD goes through the custom op"
    seen = []
    torch.func.vmap(lambda row: seen.append(op_module._plain_eager(row)) or row)(x)
    assert seen == [False], "functorch transforms go through the custom op"


# ------------------------------------------------------------------------------------------- input bias


def channel_bias(x, channel_dim, dtype=torch.float32):
    return torch.randn(x.shape[channel_dim], dtype=dtype)


@pytest.mark.parametrize("shape,channel_dim,groups", SHAPES)
def test_bias_matches_reference(cpu_backend, shape, channel_dim, groups):
    """F(x + bias) and the bias gradient (per-channel sum of grad_x), in the token and image layouts."""
    x = torch.randn(shape) * 2
    numerator, denominator = random_coefficients(groups, shared_numerator=False)
    check_against_reference(x, numerator, denominator, channel_dim, bias=channel_bias(x, channel_dim))


@pytest.mark.parametrize("shape", [(16, 197, 96), (5, 3, 768), (2, 3, 40000)])
def test_bias_row_and_tile_paths(cpu_backend, shape):
    """Short groups (per-column accumulators), long groups (row tiles) and rows wider than a chunk."""
    x = torch.randn(shape)
    check_against_reference(x, *random_coefficients(8), bias=channel_bias(x, -1), rtol=2e-5)


def test_bias_equals_shifted_input(cpu_backend):
    """group_rational(x, bias=b) is group_rational(x + b), value and x gradient; and b's gradient is the sum of x's."""
    x = torch.randn(7, 5, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    numerator, denominator = random_coefficients(8)
    grad = torch.randn(7, 5, 64)
    fused = group_rational(x, numerator, denominator, bias=bias)
    dx, dbias = torch.autograd.grad(fused, (x, bias), grad)
    x_shifted = (x + bias).detach().requires_grad_()
    plain = group_rational(x_shifted, numerator, denominator)
    (dx_plain,) = torch.autograd.grad(plain, (x_shifted,), grad)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dbias, dx_plain.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_bias_channels_last_image(cpu_backend):
    image = torch.randn(2, 32, 5, 7).to(memory_format=torch.channels_last)
    y = check_against_reference(image, *random_coefficients(8), channel_dim=1, bias=channel_bias(image, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_bias_low_precision(cpu_backend, dtype, rtol):
    """Low-precision x and bias: math in fp32, the bias gradient summed from fp32 dx, returned in the bias dtype."""
    x = (torch.randn(6, 9, 256) * 2).to(dtype).requires_grad_()
    bias = torch.randn(256).to(dtype).requires_grad_()
    numerator, denominator = random_coefficients(8)
    y = group_rational(x, numerator, denominator, bias=bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_y, ref_dx, _, _, ref_dbias = group_rational_reference(x, numerator, denominator, -1, grad, bias=bias)
    assert y.dtype == dtype and bias.grad.dtype == dtype
    assert relative_error(y, ref_y) <= 2 * rtol, "value"
    assert relative_error(x.grad, ref_dx) <= 4 * rtol, "grad x"
    assert relative_error(bias.grad, ref_dbias) <= rtol, "grad bias"


def test_bias_float64_gradcheck(use_backend):
    use_backend("auto")
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    numerator, denominator = random_coefficients(8, shared_numerator=False, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: group_rational(a[0], a[1], a[2], -1, bias=a[3]),
                                    (x, numerator, denominator, bias))
    image = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    image_bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    num1, den1 = random_coefficients(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: group_rational(a[0], a[1], a[2], 1, bias=a[3]),
                                    (image, num1, den1, image_bias))


def test_bias_deterministic_and_thread_independent(use_backend):
    use_backend("native")
    numerator, denominator = random_coefficients(8)
    for shape in ((32, 197, 96), (8, 50, 3072)):
        x = torch.randn(shape, requires_grad=True)
        bias = torch.randn(shape[-1], requires_grad=True)
        grad = torch.randn(shape)
        grads = []
        for n in (1, 2, 2):
            with torch_threads(n):
                grads.append(torch.autograd.grad(group_rational(x, numerator, denominator, bias=bias),
                                                 (x, numerator, denominator, bias), grad))
        for other in grads[1:]:
            for name, first, again in zip(("x", "numerator", "denominator", "bias"), grads[0], other):
                assert torch.equal(first, again), f"grad {name} differs between calls / thread counts ({shape})"


def test_bias_zero_size_and_meta(cpu_backend):
    x = torch.randn(0, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    numerator, denominator = random_coefficients(8)
    group_rational(x, numerator, denominator, bias=bias).sum().backward()
    assert torch.equal(bias.grad, torch.zeros(16))
    meta = torch.empty(2, 197, 384, device="meta", requires_grad=True)
    meta_bias = torch.empty(384, device="meta", requires_grad=True)
    y = group_rational(meta, numerator.detach().to("meta"), denominator.detach().to("meta"), bias=meta_bias)
    y.sum().backward()
    assert y.shape == meta.shape and meta_bias.grad.shape == (384,)


@pytest.mark.parametrize("channel_dim,shape", [(-1, (3, 7, 64)), (1, (2, 16, 5, 5))])
def test_bias_opcheck(cpu_backend, channel_dim, shape):
    x = torch.randn(shape, requires_grad=True)
    bias = torch.randn(shape[channel_dim], requires_grad=True)
    numerator, denominator = random_coefficients(8)
    torch.library.opcheck(torch.ops.kat_timm.group_rational.default, (x, numerator, denominator, channel_dim, bias))
    torch.library.opcheck(
        torch.ops.kat_timm.group_rational_backward.default,
        (torch.randn(shape), x.detach(), numerator.detach(), denominator.detach(), channel_dim, bias.detach()),
    )


def test_bias_torch_compile_fullgraph(use_backend):
    use_backend("auto")
    torch._dynamo.reset()
    numerator, denominator = random_coefficients(8)
    bias = torch.randn(64, requires_grad=True)
    compiled = torch.compile(lambda x: group_rational(x, numerator, denominator, bias=bias).square().sum(),
                             fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 64, requires_grad=True)
    compiled(x).backward()
    expected = torch.autograd.grad(group_rational(x, numerator, denominator, bias=bias).square().sum(), (x, bias))
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(bias.grad, expected[1])


def test_bias_bad_inputs():
    numerator, denominator = random_coefficients(8)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\).*got \(8,\)"):
        group_rational(x, numerator, denominator, bias=torch.randn(8))
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\).*got \(1, 40\)"):
        group_rational(x, numerator, denominator, bias=torch.randn(1, 40))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        group_rational(torch.randn(2, 5, 3), numerator[:, :], torch.randn(5, 4), channel_dim=1, bias=torch.randn(3))
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        group_rational(x, numerator, denominator, bias=torch.arange(40))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        group_rational(x, numerator, denominator, bias=[0.0] * 40)
    with pytest.raises(ValueError, match="bias must be on x's device cpu, got meta"):
        group_rational(x, numerator, denominator, bias=torch.empty(40, device="meta"))


# ------------------------------------------------------------------- forward-mode AD, torch.func, double backward


def _float64_case(channel_dim=-1, with_bias=False):
    shape = (3, 5, 16) if channel_dim == -1 else (2, 8, 3, 3)
    x = torch.randn(shape, dtype=torch.float64) * 2
    numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator=False, dtype=torch.float64))
    bias = torch.randn(x.shape[channel_dim], dtype=torch.float64) if with_bias else None
    return x, numerator, denominator, bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_jvp_matches_reference_and_finite_differences(use_backend, channel_dim, with_bias):
    """torch.func.jvp and torch.autograd.forward_ad give the true tangent (they gave zeros / None)."""
    use_backend("auto")
    x, numerator, denominator, bias = _float64_case(channel_dim, with_bias)
    tangent = torch.randn_like(x)
    f = lambda t: group_rational(t, numerator, denominator, channel_dim, bias=bias)  # noqa: E731
    y, jvp = torch.func.jvp(f, (x,), (tangent,))
    ref = group_rational_reference(x, numerator, denominator, channel_dim, torch.ones_like(x), bias=bias)
    assert relative_error(y, ref[0]) <= 1e-12
    assert relative_error(jvp, ref[1] * tangent) <= 1e-12, "jvp = dF/dx * tangent"
    eps = 1e-6
    finite = (group_rational_reference(x + eps * tangent, numerator, denominator, channel_dim, bias=bias)
              - group_rational_reference(x - eps * tangent, numerator, denominator, channel_dim, bias=bias)) / (2 * eps)
    assert relative_error(jvp, finite) <= 1e-6, "jvp vs central differences"
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        out = torch.autograd.forward_ad.unpack_dual(f(dual))
    assert out.tangent is not None, "forward AD must give a tangent"
    assert relative_error(out.tangent, jvp) <= 1e-12


def test_jvp_in_float32_and_through_the_coefficients(use_backend):
    use_backend("auto")
    x = torch.randn(4, 7, 64)
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    dn, dd = torch.randn_like(numerator), torch.randn_like(denominator)
    _, jvp = torch.func.jvp(lambda a, b: group_rational(x, a, b), (numerator, denominator), (dn, dd))
    # The reference's coefficient gradients, contracted with the tangents, per element: use finite differences.
    eps = 1e-6
    x64, n64, d64 = x.double(), numerator.double(), denominator.double()
    finite = (group_rational_reference(x64, n64 + eps * dn, d64 + eps * dd)
              - group_rational_reference(x64, n64 - eps * dn, d64 - eps * dd)) / (2 * eps)
    assert jvp.dtype == torch.float32 and relative_error(jvp, finite) <= 1e-5


@pytest.mark.parametrize("with_bias", [False, True])
def test_func_grad_jacrev_hessian(use_backend, with_bias):
    use_backend("auto")
    x, numerator, denominator, bias = _float64_case(with_bias=with_bias)
    loss = lambda t: group_rational(t, numerator, denominator, bias=bias).sum()  # noqa: E731
    ref = group_rational_reference(x, numerator, denominator, -1, torch.ones_like(x), bias=bias)
    assert relative_error(torch.func.grad(loss)(x), ref[1]) <= 1e-12, "torch.func.grad"
    row = x[0, 0]
    jac = torch.func.jacrev(lambda t: group_rational(t, numerator, denominator, bias=bias))(row)
    assert relative_error(jac, torch.diag(ref[1][0, 0])) <= 1e-12, "jacrev of an elementwise function is diagonal"
    hessian = torch.func.hessian(loss)(x)
    eps = 1e-5
    step = torch.zeros_like(x)
    step[1, 2, 3] = eps
    grad_at = lambda t: group_rational_reference(t, numerator, denominator, -1, torch.ones_like(t), bias=bias)[1]  # noqa: E731
    finite = (grad_at(x + step) - grad_at(x - step)) / (2 * eps)
    assert relative_error(hessian[1, 2, 3], finite) <= 1e-6, "hessian column vs differences of the gradient"
    batched = torch.func.vmap(lambda t: group_rational(t, numerator, denominator, bias=bias))(x)
    assert relative_error(batched, ref[0]) <= 1e-12, "vmap"


@pytest.mark.parametrize("with_bias", [False, True])
def test_double_backward(use_backend, with_bias):
    use_backend("auto")
    x, numerator, denominator, bias = _float64_case(with_bias=with_bias)
    inputs = [x, numerator, denominator] + ([bias] if with_bias else [])
    inputs = [t.clone().requires_grad_() for t in inputs]
    op = lambda *a: group_rational(a[0], a[1], a[2], -1, bias=a[3] if with_bias else None)  # noqa: E731
    assert torch.autograd.gradgradcheck(op, inputs)
    # create_graph=True on the float32 fast path too: the gradient has a gradient.
    x32 = torch.randn(4, 64, requires_grad=True)
    n32, d32 = random_coefficients(8)
    (gx,) = torch.autograd.grad(group_rational(x32, n32, d32).square().sum(), x32, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x32)
    assert torch.isfinite(ggx).all() and ggx.abs().sum() > 0


# ----------------------------------------------------------------------------------------- large finite inputs


def test_large_inputs_issue_example(cpu_backend):
    """The issue's example: a5 = 1, b4 = 1, so F(x) ~ x; it gave [1e7, inf, nan]."""
    y = group_rational(torch.tensor([1e7, 1e8, 1e10]), torch.tensor([[0.0, 0, 0, 0, 0, 1]]), torch.tensor([[0.0, 0, 0, 1]]))
    torch.testing.assert_close(y, torch.tensor([1e7, 1e8, 1e10]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("coefficients", ["swish", "identity", "random"])
@pytest.mark.parametrize("length", [3, 200])  # short groups (row mode) and long ones (pieces)
def test_large_inputs_match_reference(cpu_backend, dtype, rtol, coefficients, length):
    """F and dF/dx for inputs up to the dtype's largest: finite (and right) wherever the exact value is."""
    if coefficients == "random":
        numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator=False))
        denominator = denominator.abs() + 0.1  # |b4| > 0: F grows like x, dF/dx stays bounded
    else:
        numerator, denominator = (torch.tensor([c]) for c in rational_init(coefficients))
        denominator = denominator.repeat(8, 1)
    values = magnitudes(dtype)
    x = values.view(-1, 1, 1).expand(-1, 8, length).contiguous().view(-1, 8 * length).requires_grad_()
    y = group_rational(x, numerator, denominator)
    grad = torch.ones_like(y)
    y.backward(grad)
    ref_y, ref_dx, _, _ = group_rational_reference(x, numerator, denominator, -1, grad)
    assert_matches_rounded_reference(y, ref_y, rtol, "value")
    # dF/dx cancels near the rational's extrema: compare it on the scale of its own largest value per row.
    if coefficients != "identity":
        scale = ref_dx.abs().amax(1, keepdim=True).clamp_min(1e-30)
        assert not torch.isnan(x.grad).any(), "grad x: NaN for a finite input"
        assert ((x.grad.double() - ref_dx).abs() / scale).max() <= 4 * rtol, "grad x"
    else:
        assert torch.equal(y, x.detach()) or dtype != torch.float32, "the identity stays exact at every magnitude"
        assert_matches_rounded_reference(x.grad, ref_dx, rtol, "grad x")


def test_large_inputs_float64_and_coefficient_gradients(use_backend):
    """float64 (the PyTorch path) up to 1e300; coefficient gradients of large inputs against the reference."""
    use_backend("auto")
    numerator = torch.tensor([[0.1, 0.5, -0.2, 0.05, 0.01, 0.02]], dtype=torch.float64, requires_grad=True)
    denominator = torch.tensor([[0.3, -0.1, 0.05, 0.4]], dtype=torch.float64).repeat(8, 1).requires_grad_()
    x = magnitudes(torch.float64).view(-1, 1).expand(-1, 8).contiguous().requires_grad_()
    y = group_rational(x, numerator, denominator)
    y.backward(torch.ones_like(y))
    ref_y, ref_dx, _, _ = group_rational_reference(x, numerator, denominator, -1, torch.ones_like(y))
    assert_matches_rounded_reference(y, ref_y, 1e-12, "value")
    assert_matches_rounded_reference(x.grad, ref_dx, 1e-9, "grad x")
    # Coefficient gradients: magnitudes up to 1e6 in float32 (sums of x / Q~ stay well inside float32's range).
    x32 = (torch.logspace(-3, 6, 400) * torch.where(torch.rand(400) < 0.5, -1.0, 1.0)).view(50, 8)
    check_against_reference(x32, numerator.detach().float(), denominator.detach().float(), rtol=1e-5)


def test_large_inputs_differentiable_formula_and_onnx_decomposition():
    """The TorchScript / forward-AD formula and the ONNX decomposition take the same reciprocal form. (Reverse mode
    through the differentiable formula is checked up to 1e30: beyond ~1e37 autograd's chain rule multiplies an
    overflowing x * dh/du by an underflowing du/dx; the op's own backward has no such limit.)"""
    from kat_timm.tools.export import group_rational_plain
    from kat_timm.ops import group_rational_autograd

    numerator, denominator = (torch.tensor([c]) for c in rational_init("swish"))
    denominator = denominator.repeat(8, 1)
    x = magnitudes(torch.float32).view(-1, 1).expand(-1, 8).contiguous()
    ref = group_rational_reference(x, numerator, denominator)
    assert_matches_rounded_reference(group_rational_plain(x, numerator, denominator), ref, 1e-5, "onnx decomposition")
    scripted = torch.jit.script(group_rational_autograd)
    assert_matches_rounded_reference(scripted(x, numerator, denominator, -1, None), ref, 1e-5, "differentiable formula")
    xg = x[x[:, 0].abs() <= 1e30].clone().requires_grad_()
    scripted(xg, numerator, denominator, -1, None).sum().backward()
    assert torch.isfinite(xg.grad).all(), "the differentiable formula's gradient is finite (no NaN from torch.where)"
    _, tangent = torch.func.jvp(lambda t: group_rational(t, numerator, denominator), (x,), (torch.ones_like(x),))
    _, ref_dx, _, _ = group_rational_reference(x, numerator, denominator, -1, torch.ones_like(x))
    assert ((tangent.double() - ref_dx).abs() / ref_dx.abs().amax(1, keepdim=True)).max() <= 1e-5, "jvp"


# ---------------------------------------------------------------------------------------------------------------------
# group_rational_: in place, for inference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", [((3, 7, 64), 8), ((2, 5, 3000), 1), ((16, 197, 768), 8), ((1, 40), 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_in_place_equals_out_of_place(cpu_backend, dtype, shape, groups, with_bias):
    torch.manual_seed(0)
    numerator, denominator = (t.detach() for t in random_coefficients(groups))
    x = (torch.randn(shape) * 3).to(dtype)
    x.view(-1)[::997] = 3e19  # large inputs: the kernel redoes their blocks in the safe form, from the input
    bias = torch.randn(shape[-1]) if with_bias else None
    expected = group_rational(x, numerator, denominator, bias=bias)
    overwritten = x.clone()
    result = group_rational_(overwritten, numerator, denominator, bias=bias)
    assert result is overwritten
    assert torch.equal(overwritten, expected), "the in-place op must give the out-of-place op's values bit for bit"


@pytest.mark.parametrize("channel_dim,shape", [(1, (2, 16, 5, 5)), (-1, (4, 6, 32))])
def test_in_place_other_layouts(cpu_backend, channel_dim, shape):
    # Image layouts and non-contiguous inputs are computed out of place and copied back: still x, still exact.
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    base = torch.randn(shape)
    x = base if channel_dim == 1 else base.transpose(0, 1)  # a non-contiguous token tensor
    expected = group_rational(x, numerator, denominator, channel_dim)
    result = group_rational_(x, numerator, denominator, channel_dim)
    assert result is x and torch.equal(x, expected)


def test_in_place_refuses_autograd():
    numerator, denominator = random_coefficients(8)  # require grad
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="for inference.*torch.no_grad"):
        group_rational_(x, numerator, denominator)
    with torch.no_grad():
        group_rational_(x, numerator, denominator)
    with pytest.raises(ValueError, match="multiple of G"):
        group_rational_(torch.randn(4, 60), numerator.detach(), denominator.detach())


def _in_place_situations():
    """(name, make) pairs: ``make()`` returns (target, check) where target is the tensor an in-place op writes and
    check() is what runs afterwards (a backward that needs the old values, or nothing)."""

    def saved_for_backward():
        weight = torch.randn(4, 64, requires_grad=True)
        x = torch.randn(4, 64)
        loss = (weight * x).sum()  # saves x for weight's gradient
        return x, loss.backward

    def inference_tensor_outside():
        with torch.inference_mode():
            x = torch.randn(4, 64)
        return x, lambda: None

    def view_made_without_grad():
        base = torch.randn(3, 4, 64, requires_grad=True)
        with torch.no_grad():
            view = base[1]
        return view, lambda: None

    def plain_no_grad_leaf():
        leaf = torch.randn(4, 64, requires_grad=True)
        return leaf, lambda: None

    return [saved_for_backward, inference_tensor_outside, view_made_without_grad, plain_no_grad_leaf]


@pytest.mark.parametrize("situation", _in_place_situations(), ids=lambda f: f.__name__)
def test_in_place_follows_torchs_in_place_rules(cpu_backend, situation):
    """group_rational_ raises where torch's own in-place ops raise (at the call or at the backward that needs the
    overwritten values), bumps the version counter, and writes nothing before refusing."""
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    no_grad = situation.__name__ == "plain_no_grad_leaf"  # a no-grad update of a leaf (as optimizers do)

    def outcome(op):
        """(the RuntimeError type raised or None, whether x was handled right: untouched if the call itself refused,
        its version counter moved if the write happened)."""
        torch.manual_seed(1)
        target, check = situation()
        version = lambda: None if target.is_inference() else target._version  # noqa: E731 (no counter there)
        before, version_before = target.detach().clone(), version()
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                op(target)
        except RuntimeError as error:
            return type(error), torch.equal(target.detach(), before)
        written = version() != version_before
        try:
            check()
        except RuntimeError as error:
            return type(error), written
        return None, written

    torch_raised, _ = outcome(torch.Tensor.sigmoid_)
    ours_raised, handled = outcome(lambda t: group_rational_(t, numerator, denominator))
    assert ours_raised == torch_raised, f"torch.sigmoid_ -> {torch_raised}, group_rational_ -> {ours_raised}"
    assert handled, "a refused call must leave x untouched, a write must move x's version counter"


def test_in_place_inside_inference_mode_writes_inference_tensors(cpu_backend):
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    with torch.inference_mode():
        x = torch.randn(4, 7, 64)
        expected = group_rational(x, numerator, denominator)
        assert group_rational_(x, numerator, denominator) is x
    assert torch.equal(x, expected)


def test_in_place_under_compile(use_backend):
    use_backend("native")
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    x = torch.randn(4, 7, 64)
    expected = group_rational(x, numerator, denominator)

    @torch.compile(fullgraph=True, backend="eager")
    def apply(t):
        return group_rational_(t, numerator, denominator)

    apply(x)
    assert torch.equal(x, expected)


# Row tiles of the native backward: groups of 32..1024 channels go four rows per reduction (backward_quad), the rows
# left over one by one; shorter groups take row mode, longer ones (no bias) flat pieces.
TILE_SHAPES = [((13, 8 * 48), 8), ((10, 197, 768), 8), ((3, 2, 8 * 96), 8), ((7, 5, 4 * 1024), 4), ((5, 8 * 1500), 8)]


@pytest.mark.parametrize("shape,groups", TILE_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_backward_row_tiles(use_backend, shape, groups, with_bias):
    use_backend("native")
    torch.manual_seed(1)
    numerator, denominator = random_coefficients(groups, shared_numerator=False)
    x = torch.randn(shape) * 2
    x.view(-1, shape[-1])[5 % x.view(-1, shape[-1]).shape[0], 3] = 5e4  # a large input: its four rows go safe
    bias = channel_bias(x, -1) if with_bias else None
    check_against_reference(x, numerator, denominator, bias=bias, rtol=2e-5)
    results = []
    for n in (1, 2):
        with torch_threads(n):
            leaves = [t.detach().requires_grad_() for t in (x, numerator, denominator)]
            b = None if bias is None else bias.detach().requires_grad_()
            group_rational(*leaves, bias=b).backward(torch.ones(shape))
            results.append([t.grad for t in leaves] + ([] if b is None else [b.grad]))
    assert all(torch.equal(one, two) for one, two in zip(*results)), "gradients must not depend on the thread count"
