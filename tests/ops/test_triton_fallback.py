"""A Triton kernel that can't run where the PyTorch path would: ``auto`` falls back for that (device, dtype) with one
warning and the same values, ``kat-timm info`` shows it, a forced ``KAT_RATIONAL_BACKEND=triton`` raises with the
reason. The failure is a real one: the compiled (not interpreted) kernels launched on CPU tensors, which Triton's
launcher refuses (no GPU driver here; on a GPU machine, a CPU pointer)."""
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the fallback wraps the Triton kernels")

from kat_timm.cli import info  # noqa: E402
from kat_timm.ops import backend, rational_torch  # noqa: E402
from tests.helpers import random_coefficients  # noqa: E402


@pytest.fixture
def fresh_fallbacks(monkeypatch):
    """An empty fallback table for the test (the failures it causes are not left behind for other tests)."""
    monkeypatch.setattr(backend, "_triton_failed", {})
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    if backend._triton_kernels().kernels_are_interpreted():
        pytest.skip("under TRITON_INTERPRET=1 the kernels run on CPU tensors: nothing fails")


def _inputs(dtype=torch.float32):
    numerator, denominator = (t.detach() for t in random_coefficients(8))
    x3 = torch.randn(5, 8, 6).to(dtype)
    return x3, torch.randn_like(x3), numerator, denominator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_failing_kernel_falls_back_once_with_the_same_values(fresh_fallbacks, dtype):
    x3, grad3, numerator, denominator = _inputs(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = backend.triton_implementation("forward")(x3, numerator, denominator)
        y_again = backend.triton_implementation("forward")(x3, numerator, denominator)
        grads = backend.triton_implementation("backward")(grad3, x3, numerator, denominator)
    messages = [str(w.message) for w in caught if "Triton" in str(w.message)]
    assert len(messages) == 1, f"one warning per (device, dtype), got {messages}"
    name = str(dtype).replace("torch.", "")
    assert f"the Triton forward kernel failed on cpu {name} (" in messages[0] and "kat-timm info" in messages[0]
    assert torch.equal(y, rational_torch.rational_forward_torch(x3, numerator, denominator)) and torch.equal(y, y_again)
    for actual, expected, what in zip(grads, rational_torch.rational_backward_torch(grad3, x3, numerator, denominator),
                                      ("grad x", "grad numerator", "grad denominator", "bias sums")):
        assert (actual is None and expected is None) or torch.equal(actual, expected), what
    assert list(backend.triton_fallbacks()) == [f"cpu {name}"]


def test_forced_triton_raises_with_the_reason(fresh_fallbacks, monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    x3, _, numerator, denominator = _inputs()
    with pytest.raises(RuntimeError, match=r"KAT_RATIONAL_BACKEND=triton: the Triton forward kernel failed on cpu "
                                           r"float32 \(\w+: .+\); use KAT_RATIONAL_BACKEND=auto"):
        backend.triton_implementation("forward")(x3, numerator, denominator)
    assert backend.triton_fallbacks() == {}, "a forced backend must not fall back"


def test_info_shows_the_fallback(fresh_fallbacks, capsys):
    x3, _, numerator, denominator = _inputs()
    with pytest.warns(RuntimeWarning, match="the Triton forward kernel failed"):
        backend.triton_implementation("forward")(x3, numerator, denominator)
    report = info.backend_report()
    reason = report["triton_fallbacks"]["cpu float32"]
    assert reason and reason == backend.triton_fallbacks()["cpu float32"]
    text = info._text({"versions": info._versions(), "backend": report, "hub": {"cache": "-", "offline": True},
                       "models": []}, flops=False)
    assert f"triton failed on cpu float32, PyTorch runs there instead: {reason}" in text
