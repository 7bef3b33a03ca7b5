"""GroupRational: parameters in the released layout, the init table, TorchScript and fx."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kat_timm.layers import RATIONAL_INITS_PATH, GroupRational, rational_init, rational_inits
from kat_timm.ops import group_rational_reference
from tests.helpers import relative_error

ROOT = Path(__file__).resolve().parents[2]

TARGETS = {
    "identity": lambda x: x,
    "swish": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01),
}
# The bounds the table promises on [-3, 3] (relu and leaky_relu can't do much better than ~3e-2: the kink).
MAX_ERROR = {
    "identity": 0.0, "swish": 1e-4, "tanh": 1e-4, "sigmoid": 1e-4, "gelu": 5e-3, "relu": 5e-2, "leaky_relu": 5e-2
}


def evaluate(name: str, x: torch.Tensor) -> torch.Tensor:
    numerator, denominator = rational_init(name)
    return group_rational_reference(
        x, torch.tensor([numerator], dtype=torch.float64), torch.tensor([denominator], dtype=torch.float64)
    )


def test_parameters_match_released_layout():
    layer = GroupRational(num_groups=8, init="swish")
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight_numerator": (1, 6), "weight_denominator": (8, 4)}
    assert "num_groups=8" in repr(layer) and "init='swish'" in repr(layer)
    numerator, denominator = rational_init("swish")
    assert torch.allclose(layer.weight_numerator.double(), torch.tensor([numerator], dtype=torch.float64))
    assert torch.allclose(layer.weight_denominator[5].double(), torch.tensor(denominator, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(MAX_ERROR))
def test_init_table_entry_within_bound(name):
    table = rational_inits()
    entry = table[name]
    assert entry["fit_range"] == [-3.0, 3.0]
    assert all(b >= 0 for b in entry["denominator"]), "denominators are stored as |b|"
    x = torch.linspace(-3, 3, 60001, dtype=torch.float64).view(-1, 1)
    error = (evaluate(name, x) - TARGETS[name](x)).abs().max().item()
    assert error <= MAX_ERROR[name], f"{name}: max abs error {error:.3e} on [-3, 3]"
    assert error <= entry["max_abs_error"] * 1.01 + 1e-12, "the table's recorded max error must be honest"
    assert abs(evaluate(name, torch.zeros(1, 1, dtype=torch.float64)).item() - TARGETS[name](torch.zeros(1)).item()) < 1e-12


def test_wide_gelu_entry_for_vit_conversion():
    """"gelu_wide" (kat_from_vit's act2) holds GELU within 7.5e-3 on [-10, 10], where trained ViTs' fc1 outputs
    reach; the narrow "gelu" is off by 0.8 at |x| = 10. F(0) = 0 exactly (ViT pre-activations cluster there)."""
    entry = rational_inits()["gelu_wide"]
    assert entry["fit_range"] == [-10.0, 10.0]
    x = torch.linspace(-10, 10, 200001, dtype=torch.float64).view(-1, 1)
    error = (evaluate("gelu_wide", x) - TARGETS["gelu"](x)).abs()
    assert error.max().item() <= 7.5e-3 and error.max().item() <= entry["max_abs_error"] * 1.01
    assert (evaluate("gelu", x) - TARGETS["gelu"](x)).abs().max().item() > 0.5
    assert evaluate("gelu_wide", torch.zeros(1, 1, dtype=torch.float64)).item() == 0.0


def test_identity_is_exact():
    numerator, denominator = rational_init("identity")
    assert numerator == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0] and denominator == [0.0, 0.0, 0.0, 0.0]
    layer = GroupRational(init="identity")
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), x)


def test_unknown_init_and_bad_groups():
    with pytest.raises(ValueError, match="unknown rational init 'gleu'.*gelu"):
        GroupRational(init="gleu")
    with pytest.raises(ValueError, match="num_groups"):
        GroupRational(num_groups=0)
    with pytest.raises(ValueError, match="C=30 .*G=8"):
        GroupRational(num_groups=8)(torch.randn(2, 30))


def test_image_layout_and_training_step():
    layer = GroupRational(num_groups=4, init="swish", channel_dim=1)
    x = torch.randn(2, 16, 5, 5)
    y = layer(x)
    expected = group_rational_reference(x, layer.weight_numerator, layer.weight_denominator, 1)
    assert relative_error(y, expected) < 1e-5
    y.square().mean().backward()
    assert layer.weight_numerator.grad is not None and layer.weight_denominator.grad.abs().sum() > 0


def test_meta_device_and_dtype():
    layer = GroupRational(init="gelu", device="meta")
    assert layer.weight_numerator.device.type == "meta"
    assert layer(torch.empty(2, 16, device="meta")).shape == (2, 16)
    layer = GroupRational(init="gelu", dtype=torch.bfloat16)
    assert layer.weight_denominator.dtype == torch.bfloat16
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_torchscript_takes_pytorch_path():
    layer = GroupRational(init="swish")
    with torch.no_grad():
        layer.weight_denominator.mul_(torch.linspace(0.5, 1.5, 8).view(8, 1))
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 7, 64, requires_grad=True)
    y = scripted(x)
    assert relative_error(y, layer(x)) < 1e-5
    y.sum().backward()
    assert x.grad is not None and scripted.weight_denominator.grad is not None


def test_torchscript_zero_denominator_still_learns():
    layer = torch.jit.script(GroupRational(init="identity"))
    (layer(torch.randn(4, 16)) ** 2).sum().backward()
    assert (layer.weight_denominator.grad != 0).all(), "scripted path must use d|b|/db = +1 at b == 0"


def test_fx_keeps_layer_as_leaf():
    from timm.layers import get_notrace_modules
    from timm.models import create_feature_extractor

    assert GroupRational in get_notrace_modules()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), GroupRational(init="gelu"), torch.nn.Linear(32, 4))
    extractor = create_feature_extractor(model, return_nodes={"1": "act"})
    features = extractor(torch.randn(3, 16))
    assert features["act"].shape == (3, 32)


def test_fit_script_new_function(tmp_path):
    """scripts/fit_rational.py fits a new function from an expression and writes it into a table."""
    output = tmp_path / "table.json"
    output.write_text(RATIONAL_INITS_PATH.read_text())
    result = subprocess.run(
        [sys.executable, "scripts/fit_rational.py", "--name", "softsign", "--expr", "x / (1 + x.abs())",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    table = json.loads(output.read_text())
    assert set(rational_inits()) <= set(table), "the other entries are kept"
    entry = table["softsign"]
    x = torch.linspace(-3, 3, 20001, dtype=torch.float64).view(-1, 1)
    fitted = group_rational_reference(
        x, torch.tensor([entry["numerator"]], dtype=torch.float64), torch.tensor([entry["denominator"]], dtype=torch.float64)
    )
    error = (fitted - x / (1 + x.abs())).abs().max().item()
    assert math.isclose(error, entry["max_abs_error"], rel_tol=0.05, abs_tol=1e-9)
    assert error < 1e-2


def test_fit_script_rejects_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/fit_rational.py", "--name", "broken", "--expr", "x +* 2",
         "--output", str(tmp_path / "t.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "expr" in (result.stderr + result.stdout).lower()
    assert not (tmp_path / "t.json").exists(), "nothing is written on failure"
