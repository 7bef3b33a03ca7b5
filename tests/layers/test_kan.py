"""KAN respects the modules it holds: whatever the user attached to fc1 or act2 (hooks, LoRA-style wrappers,
quantized Linears, parametrizations, a patched forward) runs, on every backend, with the same results as calling
the modules one after the other. The fused fc1-bias path is an optimisation that must never change that."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import kat_timm  # noqa: F401  (registers the KAT models in timm, for the peft test)
from kat_timm.layers import KAN
from tests.helpers import relative_error

BACKENDS = ["auto", "native", "torch"]  # triton: tests/ops/interpreted_triton_checks.py (interpreter subprocess)


def _kan(seed: int = 0) -> KAN:
    torch.manual_seed(seed)
    kan = KAN(32, 64, num_groups=8)
    with torch.no_grad():  # nonzero biases and a non-trivial act1, so that a skipped piece shows in the output
        kan.fc1.bias.normal_(0, 0.3)
        kan.fc2.bias.normal_(0, 0.3)
        kan.act1.weight_denominator.normal_(0, 0.2)
    return kan


def _called_one_by_one(kan: KAN, x: torch.Tensor) -> torch.Tensor:
    """What KAN must compute: each submodule called as a module, in order (dropout is off in these tests)."""
    return kan.fc2(kan.norm(kan.act2(kan.fc1(kan.act1(x)))))


class LoraLinear(nn.Module):
    """A LoRA-style wrapper, as PEFT builds one: the frozen base Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 4, scale: float = 0.5):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)  # nonzero: the update must show
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a.t() @ self.lora_b.t())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward", "pre", "global_forward", "global_pre"])
def test_hooks_on_fc1_fire_and_see_its_real_output(use_backend, backend, kind):
    use_backend(backend)
    kan = _kan()
    x = torch.randn(2, 5, 32)
    seen = []

    def record(module, args, out=None):
        if module is kan.fc1:
            seen.append(out if out is not None else args[0])

    if kind == "forward":
        handle = kan.fc1.register_forward_hook(record)
    elif kind == "pre":
        handle = kan.fc1.register_forward_pre_hook(record)
    elif kind == "global_forward":
        handle = nn.modules.module.register_module_forward_hook(record)
    else:
        handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        y = kan(x)
    finally:
        handle.remove()
    assert len(seen) == 1, f"a {kind} hook on fc1 must fire once (backend {backend})"
    if kind in ("forward", "global_forward"):
        expected = kan.fc1(kan.act1(x))
        assert relative_error(seen[0], expected) <= 1e-6, "the hook must see fc1's output, bias included"
    assert relative_error(y, _called_one_by_one(kan, x)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hook_on_act2_sees_fc1s_full_output(use_backend, backend):
    use_backend(backend)
    kan = _kan()
    x = torch.randn(3, 32)
    seen = []
    kan.act2.register_forward_pre_hook(lambda module, args: seen.append(args))
    kan(x)
    assert len(seen[0]) == 1, "act2 must be called on fc1's output alone when a hook is attached"
    assert relative_error(seen[0][0], kan.fc1(kan.act1(x))) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [True, False])
def test_lora_wrapped_fc1_changes_the_output_and_trains(use_backend, backend, grad):
    use_backend(backend)
    kan = _kan()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        before = kan(x)
    kan.fc1 = LoraLinear(kan.fc1)
    if not grad:
        with torch.no_grad():
            y = kan(x)
        assert relative_error(y, _called_one_by_one(kan, x)) <= 1e-5
        return
    y = kan(x)
    assert relative_error(y, before) > 1e-3, "the adapter must change the output"
    assert relative_error(y, _called_one_by_one(kan, x)) <= 1e-5
    y.square().sum().backward()
    for name in ("lora_a", "lora_b"):
        grad_value = getattr(kan.fc1, name).grad
        assert grad_value is not None and grad_value.abs().sum() > 0, f"the adapter's {name} must get a gradient"
    assert kan.fc1.base.weight.grad is None, "the frozen base Linear gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_and_patched_fc1_run_as_modules(use_backend, backend):
    use_backend(backend)
    kan = _kan()
    x = torch.randn(4, 32)

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrize.register_parametrization(kan.fc1, "weight", Double())
    assert relative_error(kan(x), _called_one_by_one(kan, x)) <= 1e-5
    parametrize.remove_parametrizations(kan.fc1, "weight", leave_parametrized=False)
    calls = []
    original = kan.fc1.forward
    kan.fc1.forward = lambda t: calls.append(1) or original(t) * 0.5  # as accelerate's hooks patch a module
    y = kan(x)
    assert calls, "a forward patched on the instance must run"
    assert relative_error(y, _called_one_by_one(kan, x)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamically_quantized_kan_runs_close_to_float(use_backend, backend):
    use_backend(backend)
    kan = _kan().eval()
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        reference = kan(x)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(kan, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        y = quantized(x)
    assert type(quantized.fc1) is not nn.Linear
    assert relative_error(y, reference) <= 5e-2, relative_error(y, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_lora_on_fc1_trains_the_adapter(use_backend, backend):
    """The real PEFT library (a test extra), as a user fine-tuning KAT with LoRA would use it."""
    import peft  # the dev extra installs it
    import timm

    use_backend(backend)
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny_patch16_224", img_size=32, depth=2, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    logits = lora(x)
    assert relative_error(logits, before) > 1e-4, "the LoRA adapters on fc1 must change the logits"
    logits.square().sum().backward()
    for name, parameter in lora.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"
