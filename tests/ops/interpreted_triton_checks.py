"""Checks of the Triton kernels themselves, run through Triton's interpreter on CPU tensors.

Not collected by the normal test session (the file name has no ``test_`` prefix): ``test_triton_interpreter.py``
runs it in a subprocess with ``TRITON_INTERPRET=1`` and ``KAT_RATIONAL_BACKEND=triton``, because the interpreter
must be switched on before the kernels are defined.
"""
import os

import pytest
import torch

from kat_timm.ops import group_rational, select_backend, triton_status
from tests.helpers import assert_backward_deterministic, check_against_reference, random_coefficients

SHAPES = [
    ((3, 7, 64), -1, 8),  # tile spans several groups (per-column partials)
    ((5, 40), -1, 8),  # C = 40: masked column tile
    ((1, 40), -1, 8),  # one row
    ((2, 13, 21), -1, 7),  # prime group count
    ((2, 40, 5, 3), 1, 8),  # image layout, odd spatial sizes
    ((4, 3, 2048), -1, 8),  # tile inside one group (scalar partials)
    ((67, 96), -1, 8),  # several row programs
]


def test_environment_is_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    available, mode = triton_status()
    assert available and mode.startswith("interpreted"), mode
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_io(dtype):
    x = torch.randn(4, 64).to(dtype)
    numerator, denominator = random_coefficients(8)
    y = group_rational(x, numerator.detach(), denominator.detach())
    assert y.dtype == dtype
    expected = group_rational(x.float(), numerator.detach(), denominator.detach())
    assert torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape,channel_dim,groups", SHAPES)
def test_triton_bias_matches_reference(shape, channel_dim, groups):
    """group_rational(..., bias=): F(x + bias) and the bias gradient from the Triton kernels (the dispatcher hands
    them a (G, L) float32 per-column bias and folds their (G, L) bias sums back to the (C,) gradient)."""
    x = torch.randn(shape) * 2
    numerator, denominator = random_coefficients(groups, shared_numerator=False)
    check_against_reference(x, numerator, denominator, channel_dim, bias=torch.randn(shape[channel_dim]))


def test_triton_large_inputs_stay_finite():
    """Inputs up to float32's largest: the reciprocal form above 1e3 (as the native kernel and the PyTorch path)."""
    x = torch.tensor([1e7, 1e8, 1e10, -1e30, 3e38, 2e3, -5e4, 0.5]).view(-1, 1).expand(-1, 8).contiguous()
    numerator = torch.tensor([[0.0, 0.5, 0.25, 0.05, 0.006, 0.0003]])
    denominator = torch.tensor([[0.0, 0.1, 0.0, 0.0005]]).repeat(8, 1)
    check_against_reference(x, numerator, denominator, rtol=1e-5)
