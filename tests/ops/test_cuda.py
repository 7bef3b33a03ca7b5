"""group_rational's Triton kernels on a real GPU. Skipped, with the reason shown, where there is no CUDA device."""
import pytest
import torch

from kat_timm.ops import group_rational, group_rational_reference, select_backend
from tests.helpers import assert_backward_deterministic, check_against_reference, random_coefficients, relative_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run these where one can be had)"),
]

# Kernel error must stay within a small multiple of the dtype's own rounding of the exact result.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _auto_backend(use_backend):
    use_backend("auto")


def test_cuda_uses_triton():
    assert select_backend(torch.randn(2, 8, device="cuda")) == "triton"


@pytest.mark.parametrize(
    "shape,channel_dim", [((3, 7, 64), -1), ((5, 40), -1), ((2, 40, 5, 3), 1), ((4, 3, 2048), -1), ((64, 197, 96), -1)]
)
@pytest.mark.parametrize("shared_numerator", [True, False])
def test_fp32_matches_reference(shape, channel_dim, shared_numerator):
    x = torch.randn(shape, device="cuda") * 2
    numerator, denominator = random_coefficients(8, shared_numerator)
    check_against_reference(x, numerator.cuda(), denominator.cuda(), channel_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 197, 768), (128, 197, 3072), (32, 768, 14, 14)])
def test_large_shapes_per_dtype(dtype, shape):
    channel_dim = 1 if len(shape) == 4 else -1
    x = (torch.randn(shape, device="cuda") * 2).to(dtype).requires_grad_()
    numerator, denominator = random_coefficients(8)
    numerator, denominator = numerator.detach().cuda().requires_grad_(), denominator.detach().cuda().requires_grad_()
    y = group_rational(x, numerator, denominator, channel_dim)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_y, ref_dx, ref_dnum, ref_dden = group_rational_reference(x, numerator, denominator, channel_dim, grad)
    rounding = relative_error(ref_y.to(dtype), ref_y)
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert relative_error(y, ref_y) <= max(2 * rounding, 1e-6), f"value {dtype}"
    assert relative_error(x.grad, ref_dx) <= GRAD_RTOL[dtype], f"grad x {dtype}"
    assert relative_error(numerator.grad, ref_dnum) <= 1e-4, f"grad numerator {dtype}"
    assert relative_error(denominator.grad, ref_dden) <= 1e-4, f"grad denominator {dtype}"


def test_non_contiguous_and_channels_last():
    numerator, denominator = (t.detach().cuda() for t in random_coefficients(8, shared_numerator=False))
    check_against_reference(torch.randn(6, 64, 10, device="cuda").transpose(1, 2), numerator, denominator, -1)
    check_against_reference(torch.randn(4, 9, 128, device="cuda")[:, ::2, ::2], numerator, denominator, -1)
    image = torch.randn(2, 32, 5, 7, device="cuda").to(memory_format=torch.channels_last)
    y = check_against_reference(image, numerator, denominator, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 197, 384), (128, 197, 3072)])
def test_deterministic(dtype, shape):
    x = torch.randn(shape, device="cuda").to(dtype)
    numerator, denominator = (t.detach().cuda() for t in random_coefficients(8))
    assert_backward_deterministic(x, numerator, denominator)


def test_autocast_keeps_low_precision_io():
    linear = torch.nn.Linear(64, 256, device="cuda")
    numerator, denominator = (t.detach().cuda() for t in random_coefficients(8))
    x = torch.randn(16, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = group_rational(linear(x), numerator, denominator)
    assert y.dtype == torch.bfloat16, "no fp32 copy of the activation under autocast"


def test_torch_compile_inductor_cuda():
    torch._dynamo.reset()
    numerator, denominator = (t.detach().cuda().requires_grad_() for t in random_coefficients(8))
    compiled = torch.compile(lambda x, n, d: group_rational(x * 2, n, d), fullgraph=True)
    x = torch.randn(64, 384, device="cuda", requires_grad=True)
    y = compiled(x, numerator, denominator)
    y.sum().backward()
    assert relative_error(y, group_rational_reference(x * 2, numerator, denominator)) < 1e-5
    assert numerator.grad is not None and denominator.grad is not None


def test_finite_large_inputs_fp16():
    from kat_timm.layers import rational_init

    for init in ("identity", "swish", "gelu"):
        a, b = rational_init(init)
        numerator = torch.tensor([a], device="cuda")
        denominator = torch.tensor([b], device="cuda").repeat(8, 1)
        x = torch.linspace(-1e4, 1e4, 8 * 1001, device="cuda").half().view(1001, 8)
        assert torch.isfinite(group_rational(x, numerator, denominator)).all(), init


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (launch on the tensor's device)")
def test_second_device_while_first_is_current():
    numerator, denominator = (t.detach().to("cuda:1") for t in random_coefficients(8))
    with torch.cuda.device(0):
        check_against_reference(torch.randn(64, 384, device="cuda:1"), numerator, denominator)


def test_cuda_graphs_reduce_overhead_match_eager():
    torch._dynamo.reset()
    numerator, denominator = (t.detach().cuda().requires_grad_() for t in random_coefficients(8))

    def step(x):
        y = group_rational(x, numerator, denominator)
        return y, torch.autograd.grad(y, (x, numerator, denominator), torch.ones_like(y) * 0.5)

    compiled = torch.compile(step, mode="reduce-overhead")
    x = torch.randn(128, 197, 384, device="cuda", requires_grad=True)
    eager_y, eager_grads = step(x)
    for _ in range(3):  # record, then replay the graph
        y, grads = compiled(x)
    torch.cuda.synchronize()
    assert torch.equal(y, eager_y), "CUDA graph replay changed the forward"
    for name, got, want in zip(("x", "numerator", "denominator"), grads, eager_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"CUDA graph replay changed grad {name}"
