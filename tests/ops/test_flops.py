"""FLOP formulas of the rational op (kat_timm/ops/flops.py) under torch.utils.flop_counter.FlopCounterMode.

The op must count exactly numel x the documented per-element cost, forward and backward, on real and meta tensors;
a KAT forward must count exactly the ViT's FLOPs (same linear layers, GELU uncounted) plus its rationals.
"""
from __future__ import annotations

import importlib

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from kat_timm.layers import GroupRational  # importing kat_timm registers the models and the FLOP formulas
from kat_timm.ops import flops
from kat_timm.ops.flops import RATIONAL_BACKWARD_FLOPS_PER_ELEMENT, RATIONAL_FORWARD_FLOPS_PER_ELEMENT

FORWARD_OP = torch.ops.kat_timm.group_rational
BACKWARD_OP = torch.ops.kat_timm.group_rational_backward


def _counts(run) -> dict:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_flop_counts()["Global"]


def test_documented_per_element_counts():
    # The module docstring derives these two numbers; a change to either must be a deliberate one.
    assert (RATIONAL_FORWARD_FLOPS_PER_ELEMENT, RATIONAL_BACKWARD_FLOPS_PER_ELEMENT) == (20, 67)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("shape, channel_dim", [((3, 7, 40), -1), ((2, 24, 5, 3), 1)])
def test_group_rational_layer_counts_numel_times_per_element(device, shape, channel_dim):
    layer = GroupRational(num_groups=8, init="swish", channel_dim=channel_dim, device=device)
    x = torch.randn(shape, device=device, requires_grad=True)
    numel = x.numel()

    forward = _counts(lambda: layer(x))
    assert forward == {FORWARD_OP: numel * RATIONAL_FORWARD_FLOPS_PER_ELEMENT}, forward

    # A dense upstream gradient (not .sum()'s stride-0 one), as in training.
    grad = torch.randn(shape, device=device)
    step = _counts(lambda: layer(x).backward(grad))
    assert step == {
        FORWARD_OP: numel * RATIONAL_FORWARD_FLOPS_PER_ELEMENT,
        BACKWARD_OP: numel * RATIONAL_BACKWARD_FLOPS_PER_ELEMENT,
    }, step


def test_registration_is_idempotent():
    before = {op: flops.flop_counter.flop_registry[op] for op in (FORWARD_OP, BACKWARD_OP)}
    flops.register_flop_formulas()
    importlib.reload(flops)  # torch raises on a duplicate registration; ours must not
    assert {op: flops.flop_counter.flop_registry[op] for op in (FORWARD_OP, BACKWARD_OP)} == before


def _model_counts(name: str, x: torch.Tensor, backward: bool) -> dict:
    model = timm.create_model(name, device="meta")

    def run():
        out = model(x)
        if backward:
            out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(backward):
        return _counts(run)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "train_step"])
def test_kat_tiny_counts_vit_tiny_plus_rationals(backward):
    """KAT-T and ViT-T share every linear layer and the attention; KAT replaces GELU (which FlopCounterMode does not
    count) by two rationals per block: act1 on the embed dim, act2 on the 4x hidden dim, at every token."""
    batch, depth, embed, tokens = 2, 12, 192, 197  # 196 patches + the class token
    x = torch.empty(batch, 3, 224, 224, device="meta")
    kat = _model_counts("kat_tiny_patch16_224", x, backward)
    vit = _model_counts("vit_tiny_patch16_224", x, backward)

    assert not any("gelu" in str(op) for op in vit), f"FlopCounterMode counted GELU: {vit}"
    rational_elements = depth * batch * tokens * (embed + 4 * embed)
    expected_rational = {FORWARD_OP: rational_elements * RATIONAL_FORWARD_FLOPS_PER_ELEMENT}
    if backward:
        expected_rational[BACKWARD_OP] = rational_elements * RATIONAL_BACKWARD_FLOPS_PER_ELEMENT
    assert {op: n for op, n in kat.items() if op in (FORWARD_OP, BACKWARD_OP)} == expected_rational
    # Everything else, op by op, is the ViT's.
    assert {op: n for op, n in kat.items() if op not in (FORWARD_OP, BACKWARD_OP)} == vit
    assert sum(kat.values()) == sum(vit.values()) + sum(expected_rational.values())
