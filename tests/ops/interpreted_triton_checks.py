"""Checks of the Triton kernels themselves, run through Triton's interpreter on CPU tensors.

Not collected by the normal test session (the file name has no ``test_`` prefix): ``test_triton_interpreter.py``
runs it in a subprocess with ``TRITON_INTERPRET=1`` and ``KAT_RATIONAL_BACKEND=triton``, because the interpreter
must be switched on before the kernels are defined.
"""
import os

import pytest
import torch

from kat_timm.ops import group_rational, group_rational_reference, select_backend, triton_status
from kat_timm.layers import rational_init
from tests.helpers import (
    assert_backward_deterministic,
    assert_matches_rounded_reference,
    check_against_reference,
    magnitudes,
    random_coefficients,
    relative_error,
)

SHAPES = [
    ((3, 7, 64), -1, 8),  # tile spans several groups (per-column partials)
    ((5, 40), -1, 8),  # C = 40: masked column tile
    ((1, 40), -1, 8),  # one row
    ((2, 13, 21), -1, 7),  # prime group count
    ((2, 40, 5, 3), 1, 8),  # image layout, odd spatial sizes
    ((4, 3, 2048), -1, 8),  # tile inside one group (scalar partials)
    ((67, 96), -1, 8),  # several row programs
    ((600, 192), -1, 8),  # KAT-T act1 (L = 24): 16-byte segments, a row loop of several tiles
    ((3, 11, 384), -1, 8),  # KAT-S act1 (L = 48): three segments per group
    ((2, 5, 3072), -1, 8),  # KAT-B act2 (L = 384): 128-column segments
]


def test_environment_is_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    available, mode = triton_status()
    assert available and mode.startswith("interpreted"), mode


def test_kan_calls_fc1_as_a_module_on_triton():
    """KAN on the Triton backend: a hook on fc1 fires and a LoRA-style wrapper of fc1 is used and trained (the fused
    fc1-bias path must never bypass what the user attached; tests/layers/test_kan.py covers the CPU backends)."""
    from tests.layers.test_kan import LoraLinear, _called_one_by_one, _kan

    assert select_backend(torch.randn(2, 32)) == "triton"
    kan = _kan()
    fired = []
    kan.fc1.register_forward_hook(lambda module, args, out: fired.append(out))
    kan.fc1 = LoraLinear(kan.fc1)
    x = torch.randn(3, 32)
    y = kan(x)
    assert len(fired) == 1, "the hook on the base Linear fires when the wrapper calls it"
    assert relative_error(y, _called_one_by_one(kan, x)) <= 1e-5
    y.sum().backward()
    assert kan.fc1.lora_a.grad is not None and kan.fc1.lora_a.grad.abs().sum() > 0
    assert select_backend(torch.randn(2, 8)) == "triton"


@pytest.mark.parametrize("shape,channel_dim,groups", SHAPES)
@pytest.mark.parametrize("shared_numerator", [True, False])
def test_triton_matches_reference(shape, channel_dim, groups, shared_numerator):
    x = torch.randn(shape) * 2
    numerator, denominator = random_coefficients(groups, shared_numerator)
    check_against_reference(x, numerator, denominator, channel_dim)


def test_triton_zero_denominator_and_channels_last():
    numerator = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    denominator = torch.zeros(8, 4)
    x = torch.randn(3, 16)
    y = check_against_reference(x, numerator, denominator)
    assert torch.equal(y, x)
    image = torch.randn(2, 16, 3, 5).to(memory_format=torch.channels_last)
    y = check_against_reference(image, *random_coefficients(8), channel_dim=1)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_triton_deterministic():
    assert_backward_deterministic(torch.randn(64, 96), *random_coefficients(8))  # per-column partials
    assert_backward_deterministic(torch.randn(40, 2048), *random_coefficients(8))  # one group per tile
    # The coefficient-gradient reduction runs one program per (sum, group): per-group numerators too.
    assert_backward_deterministic(torch.randn(9, 3 * 48), *random_coefficients(3, shared_numerator=False))


def test_triton_launchers_take_empty_inputs():
    """The launchers themselves (not only the op, which returns early) take inputs without elements."""
    from kat_timm.ops.rational_triton import rational_backward_triton, rational_forward_triton

    numerator, denominator = (t.detach() for t in random_coefficients(8))
    for shape in [(0, 8, 3), (4, 8, 0)]:
        x3 = torch.empty(shape)
        assert rational_forward_triton(x3, numerator, denominator).shape == shape
        grad_x, grad_num, grad_den, bias_sums = rational_backward_triton(x3, x3, numerator, denominator,
                                                                         bias=torch.zeros(shape[1:]))
        assert grad_x.shape == shape and bias_sums.shape == shape[1:], shape
        assert not grad_num.any() and not grad_den.any() and not bias_sums.any(), shape


def _low_precision_rtol(dtype, exact: torch.Tensor) -> float:
    """How far a 16-bit output the kernel computed in fp32 may be from the exact (float64) value, relative to its
    largest magnitude: the rounding to ``dtype`` and no more. Triton's interpreter truncates fp32 -> bf16 (a GPU
    rounds to nearest: tests/ops/test_cuda.py holds it to half an ulp), so a bf16 element may be off by one whole
    ulp, less than 2^-7 of its magnitude; fp16 is rounded to nearest, so twice the error of rounding the exact
    result covers the fp32 arithmetic before the rounding."""
    if dtype == torch.bfloat16:
        return 2.0 ** -7
    return max(2 * relative_error(exact.to(dtype), exact), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 64), (50, 192), (3, 768)])
def test_triton_low_precision_io_against_reference(dtype, shape):
    """16-bit input and gradient, fp32 math inside: F and dF/dx within the dtype's rounding of the float64 reference
    at the same (16-bit) input; the coefficient gradients, summed in fp32 whatever the I/O dtype, within fp32's 1e-5.
    """
    x = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    numerator, denominator = (t.detach().requires_grad_() for t in random_coefficients(8))
    y = group_rational(x, numerator, denominator)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_y, ref_dx, ref_dnum, ref_dden = group_rational_reference(x, numerator, denominator, -1, grad)
    assert y.dtype == dtype and x.grad.dtype == dtype
    for name, actual, exact in (("value", y, ref_y), ("grad x", x.grad, ref_dx)):
        error, bound = relative_error(actual, exact), _low_precision_rtol(dtype, exact)
        assert error <= bound, f"{name} {dtype}: rel err {error:.3e} > {bound:.3e} (the dtype's rounding)"
    for name, actual, exact in (("numerator", numerator.grad, ref_dnum), ("denominator", denominator.grad, ref_dden)):
        assert relative_error(actual, exact) <= 1e-5, f"grad {name} {dtype}: rel err {relative_error(actual, exact):.3e}"


@pytest.mark.parametrize("shape,channel_dim,groups", SHAPES)
def test_triton_bias_matches_reference(shape, channel_dim, groups):
    """group_rational(..., bias=): F(x + bias) and the bias gradient from the Triton kernels (the dispatcher hands
    them a (G, L) float32 per-column bias and folds their (G, L) bias sums back to the (C,) gradient)."""
    x = torch.randn(shape) * 2
    numerator, denominator = random_coefficients(groups, shared_numerator=False)
    check_against_reference(x, numerator, denominator, channel_dim, bias=torch.randn(shape[channel_dim]))


def test_triton_large_inputs_issue_example():
    """a5 = 1, b4 = 1, so F(x) ~ x: the plain form gave [1e7, inf, nan]; tiles holding |x| > 1e3 are redone in the
    reciprocal form."""
    y = group_rational(torch.tensor([1e7, 1e8, 1e10]), torch.tensor([[0.0, 0, 0, 0, 0, 1]]), torch.tensor([[0.0, 0, 0, 1]]))
    torch.testing.assert_close(y, torch.tensor([1e7, 1e8, 1e10]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -7), (torch.float16, 2e-3)])
@pytest.mark.parametrize("coefficients", ["swish", "random"])
def test_triton_large_inputs_match_reference(dtype, rtol, coefficients):
    """F, dF/dx and the coefficient gradients for inputs up to the dtype's largest, small ones in the same tiles."""
    if coefficients == "random":
        numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator=False))
        denominator = denominator.abs() + 0.1
    else:
        numerator, denominator = (torch.tensor([c]) for c in rational_init(coefficients))
        denominator = denominator.repeat(8, 1)
    values = magnitudes(dtype)
    x = values.view(-1, 1, 1).expand(-1, 8, 24).contiguous().view(-1, 192).requires_grad_()  # L = 24, as KAT-T
    y = group_rational(x, numerator, denominator)
    grad = torch.ones_like(y)
    y.backward(grad)
    ref_y, ref_dx, _, _ = group_rational_reference(x, numerator, denominator, -1, grad)
    assert_matches_rounded_reference(y, ref_y, rtol, "value")
    scale = ref_dx.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert not torch.isnan(x.grad).any(), "grad x: NaN for a finite input"
    assert ((x.grad.double() - ref_dx).abs() / scale).max() <= 4 * rtol, "grad x"
    # Coefficient gradients where their sums fit float32 (magnitudes up to 1e6), large and small in one tile.
    x32 = (torch.logspace(-3, 6, 384) * torch.where(torch.rand(384) < 0.5, -1.0, 1.0)).view(2, 192)
    check_against_reference(x32, numerator, denominator, rtol=1e-5)


def test_triton_large_inputs_stay_finite():
    """Inputs up to float32's largest: the reciprocal form above 1e3 (as the native kernel and the PyTorch path).
    F and dF/dx are checked; the coefficient gradients of such inputs overflow float32 (x / Q~ ~ 6e41 here), so
    they are checked where they fit, in test_triton_large_inputs_match_reference."""
    x = torch.tensor([1e7, 1e8, 1e10, -1e30, 3e38, 2e3, -5e4, 0.5]).view(-1, 1).expand(-1, 8).contiguous()
    x.requires_grad_()
    numerator = torch.tensor([[0.0, 0.5, 0.25, 0.05, 0.006, 0.0003]])
    denominator = torch.tensor([[0.0, 0.1, 0.0, 0.0005]]).repeat(8, 1)
    y = group_rational(x, numerator, denominator)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_y, ref_dx, _, _ = group_rational_reference(x, numerator, denominator, -1, grad)
    assert_matches_rounded_reference(y, ref_y, 1e-5, "value")
    assert_matches_rounded_reference(x.grad, ref_dx, 1e-5, "grad x")


FUZZ_GROUPS = [1, 2, 3, 4, 7, 8, 16, 32, 64]


def _fuzz_inputs(groups: int, generator: torch.Generator):
    """Small inputs for G groups: a token layout with an odd row count (C = G x L with L odd: C is not a multiple
    of 16 wherever G < 16 allows it), a channel_dim=1 image (4-D for odd G, 5-D for even), and a non-contiguous one
    (a strided slice for odd G, channels_last memory for even). G >= 32 (many programs: slow in the interpreter)
    takes one of them: the image for 32 (tokens: test_triton_32_groups_authors_crash), channels_last for 64."""
    length = 3 if groups < 16 else 1
    channels = groups * length
    token = torch.randn(5, 3, channels, generator=generator) * 2  # 15 rows
    image = torch.randn((2, channels, 3, 5) if groups % 2 else (1, channels, 3, 1, 5), generator=generator) * 2
    if groups % 2:
        other = (torch.randn(7, 2 * channels, generator=generator) * 2)[:, ::2]  # a strided channel axis
        other_dim = -1
    else:
        other = (torch.randn(3, channels, 5, 3, generator=generator) * 2).to(memory_format=torch.channels_last)
        other_dim = 1
    inputs = [(token, -1), (image, 1), (other, other_dim)]
    return inputs if groups < 32 else [inputs[1 if groups == 32 else 2]]


@pytest.mark.parametrize("groups", FUZZ_GROUPS)
def test_triton_fuzz_groups_and_layouts(groups):
    """Forward and every gradient against the float64 reference for each group count, in every layout the
    dispatcher hands the kernels, with an input bias and (for even G) one numerator per group."""
    generator = torch.Generator().manual_seed(1000 + groups)
    shared = groups % 2 == 1
    numerator = torch.randn(1 if shared else groups, 6, generator=generator) * 0.5
    denominator = torch.randn(groups, 4, generator=generator) * 0.5
    for x, channel_dim in _fuzz_inputs(groups, generator):
        bias = torch.randn(x.shape[channel_dim], generator=generator)
        assert x.shape[channel_dim] % 16 or groups >= 16 or groups * 3 % 16 == 0
        check_against_reference(x, numerator, denominator, channel_dim, bias=bias)


def test_triton_32_groups_authors_crash():
    """The authors' kernels hit an illegal memory access with 32 groups (Adamdad/kat #14): G = 32 at a KAT-T width
    (C = 192, L = 6: unaligned group starts in fp32) and at C = 768 (L = 24), per-group and shared numerators."""
    generator = torch.Generator().manual_seed(32)
    for channels, shared in ((192, False), (768, True)):
        x = torch.randn(3, 7, channels, generator=generator) * 2
        numerator = torch.randn(1 if shared else 32, 6, generator=generator) * 0.5
        denominator = torch.randn(32, 4, generator=generator) * 0.5
        check_against_reference(x, numerator, denominator)
