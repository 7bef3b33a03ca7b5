"""Inference paths of a KAT: channels_last images, bfloat16 weights, bfloat16 autocast, and torch.inference_mode.

Each runs on CPU here and on CUDA where there is a GPU (the CUDA cases are marked ``cuda`` and skipped, with the
reason, elsewhere). The model is kat_tiny at 32 x 32 px with jittered random weights; results are compared with the
float32 forward by the relative error of the whole logits tensor.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch

import kat_timm  # noqa: F401  (registers the KAT models)

from tests.conftest import random_kat_tiny_32
from tests.helpers import compile_and_capture

# bfloat16 keeps 8 significant bits; through 12 blocks the logits drift ~2% (measured 1.9-2.3% on CPU).
BF16_RTOL = 5e-2

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run these where one can be had)"),
    ]),
]


@pytest.fixture(scope="module")
def kat_tiny_cpu():
    return random_kat_tiny_32(21)


@pytest.fixture
def model_and_images(kat_tiny_cpu, request, monkeypatch):
    """(model on the device, 4 random images on the device, float32 logits); the model is a copy tests may change."""
    device = request.param
    # Full float32 convolutions on CUDA: with TF32 (cuDNN's default) the reference itself would be ~1e-3 off, and
    # differently so for each memory layout's algorithm.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = copy.deepcopy(kat_tiny_cpu).to(device)
    images = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():
        reference = model(images)
    return model, images, reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def _rational_io(model):
    """Forward hooks recording (input, output) of every rational activation."""
    records = []
    handles = [
        module.register_forward_hook(lambda m, args, out: records.append((args[0], out)))
        for name, module in model.named_modules() if name.endswith(("act1", "act2"))
    ]
    return records, handles


@pytest.mark.parametrize("model_and_images", DEVICES, indirect=True)
def test_channels_last_matches_contiguous(model_and_images):
    model, images, reference = model_and_images
    rtol = 1e-5 if images.device.type == "cpu" else 1e-4
    with torch.no_grad():
        from_channels_last_images = model(images.to(memory_format=torch.channels_last))
        model.to(memory_format=torch.channels_last)
        from_channels_last_model = model(images.to(memory_format=torch.channels_last))
    assert relative_error(from_channels_last_images, reference) <= rtol
    assert relative_error(from_channels_last_model, reference) <= rtol


@pytest.mark.parametrize("model_and_images", DEVICES, indirect=True)
def test_bfloat16_weights_match_float32(model_and_images):
    model, images, reference = model_and_images
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(images.bfloat16())
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, reference) <= BF16_RTOL


@pytest.mark.parametrize("model_and_images", DEVICES, indirect=True)
def test_bfloat16_autocast_matches_float32_and_keeps_the_rationals_in_bfloat16(model_and_images):
    model, images, reference = model_and_images
    records, handles = _rational_io(model)
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16):
        logits = model(images)
    for handle in handles:
        handle.remove()
    assert relative_error(logits, reference) <= BF16_RTOL
    act2 = records[1::2]
    assert len(act2) == 12
    # act2 follows fc1, which autocast runs in bfloat16: the rational reads and writes bfloat16, no float32 copy.
    assert all(x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 for x, y in act2)


@pytest.mark.parametrize("model_and_images", DEVICES, indirect=True)
def test_inference_mode_records_no_autograd_graph(model_and_images):
    model, images, reference = model_and_images
    saved = []

    def forward_counting_saved_tensors():
        records, handles = _rational_io(model)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            logits = model(images)
        for handle in handles:
            handle.remove()
        return logits, records

    # With autograd on (what inference_mode avoids): the rational's backward is recorded and x saved for it.
    logits, records = forward_counting_saved_tensors()
    rational_backward = type(records[0][1].grad_fn).__name__.lower().replace("_", "")  # custom op or eager Function
    assert logits.grad_fn is not None and "grouprational" in rational_backward, rational_backward
    assert saved, "autograd saved tensors for the backward"

    saved.clear()
    with torch.inference_mode():
        logits, records = forward_counting_saved_tensors()
    assert logits.grad_fn is None and not logits.requires_grad and torch.is_inference(logits)
    assert all(y.grad_fn is None and torch.is_inference(y) for _, y in records), "no rational recorded a backward"
    assert saved == [], "nothing was saved for a backward"
    assert relative_error(logits, reference) <= 1e-6


def test_torch_compile_inference_runs_the_native_kernel_in_place(kat_tiny_cpu, use_backend, monkeypatch):
    """On a CPU, compiled inference runs each rational on a large enough tensor (here: every one, the threshold
    lowered) as the native kernel written over a buffer of the graph's own (act1 over its LayerNorm's output, act2
    over fc1's, fc1's bias added in the same pass): no functional op, no output allocated; the values stay eager's
    and the caller's tensors are not touched."""
    use_backend("native")
    monkeypatch.setattr(sys.modules["kat_timm.ops.group_rational"], "NATIVE_UNDER_COMPILE_MIN_ELEMENTS", 0)
    images = torch.randn(2, 3, 32, 32)
    kept = images.clone()
    compiled, targets = compile_and_capture(kat_tiny_cpu, images)
    with torch.inference_mode():
        eager = kat_tiny_cpu(images)
    in_place = [t for t in targets if "kat_timm" in t]
    assert len(in_place) == 2 * len(kat_tiny_cpu.blocks), in_place
    assert all(t == "kat_timm.group_rational_in_place.default" for t in in_place), in_place
    assert relative_error(compiled, eager) < 1e-6
    assert torch.equal(images, kept)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_torch_compile_inference_sees_pointwise_rationals_without_the_native_kernel(kat_tiny_cpu, use_backend,
                                                                                     backend):
    """Where the native kernel does not run (here forced to the PyTorch path; on a GPU, Triton) or does not pay
    (tensors below NATIVE_UNDER_COMPILE_MIN_ELEMENTS, as this small model's), the rationals reach the backend as
    pointwise ops, which inductor fuses with the LayerNorm before act1 and fc1's bias before act2."""
    use_backend(backend)
    images = torch.randn(2, 3, 32, 32)
    compiled, targets = compile_and_capture(kat_tiny_cpu, images)
    with torch.inference_mode():
        eager = kat_tiny_cpu(images)
    assert targets and not any("kat_timm" in target for target in targets), "the opaque op reached the backend"
    assert relative_error(compiled, eager) < 1e-5


def test_torch_compile_inductor_inference_matches_eager(kat_tiny_cpu):
    """The default backend (inductor) on the native in-place op: eager's logits, the input untouched."""
    torch._dynamo.reset()
    images = torch.randn(2, 3, 32, 32)
    kept = images.clone()
    with torch.inference_mode():
        compiled = torch.compile(kat_tiny_cpu, fullgraph=True)(images)
        eager = kat_tiny_cpu(images)
    assert relative_error(compiled, eager) < 1e-5
    assert torch.equal(images, kept)


def test_aoti_package_matches_eager(tmp_path):
    """An AOTInductor package (rationals decomposed into pointwise ops) of a 1-block KAT: eager's logits; compiling
    it stays within a minute-scale budget (it is a C++ build)."""
    import time

    import timm

    from kat_timm.tools.export import aoti_package

    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", img_size=32, depth=1, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    started = time.perf_counter()
    path = aoti_package(model, tmp_path / "kat.pt2", example_input=images)
    elapsed = time.perf_counter() - started
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.inference_mode():
        assert relative_error(runner(images), model(images)) < 1e-5
    assert elapsed < 240, f"AOTInductor compile took {elapsed:.0f} s"
