"""FLOP formulas of the grouped rational function for ``torch.utils.flop_counter.FlopCounterMode``.

``FlopCounterMode`` counts only operators that have a formula in its registry (matmuls, convolutions, attention).
Our custom ops ``kat_timm::group_rational`` and ``kat_timm::group_rational_backward`` would count as zero, so
``register_flop_formulas`` (called when ``kat_timm.ops`` is imported) adds one for each. FlopCounterMode copies the
registry when it is constructed: import kat_timm before creating the counter.

The counts follow what the kernels compute per element (``csrc/group_rational_cpu.c``, ``rational_torch.py``),
one FLOP per add, multiply, divide, abs or sign select. Work done once per group (|b_j|, the constant multiples
j * a_j of the derivative polynomials) is not per element and is left out.

Forward, ``F(x) = P(x) / Q(|x|)`` with both polynomials by Horner's rule:

    |x|                                    1
    P = a0 + x(a1 + x(a2 + ... x a5))      10  (5 mul + 5 add)
    Q = 1 + |x|(b1 + |x|(... |x| b4))      8   (4 mul + 4 add)
    P / Q                                  1
                                           --
                                           20

Backward (grad_x and the ten per-group coefficient sums, as the native kernel does it):

    P, Q, |x| as above                     19
    sign(x) select                         1
    P' (degree 4, Horner)                  8   (4 mul + 4 add)
    Q' (degree 3 in |x|, Horner)           6   (3 mul + 3 add)
    r = 1 / Q,  F = P r                    2
    grad_x = g (P' - F sign(x) Q') r       5
    gq = g r,  gf = gq F                   2
    x^2, x^4                               2
    ten sums: gq x^i (i = 0..5) and gf |x|^j (j = 1..4), multiplies + one add each:
      gq, gq x, gq x^2, gq x^2 x, gq x^4, gq x^4 x       1 + 2 + 2 + 3 + 2 + 3 = 13
      gf |x|, gf x^2, gf x^2 |x|, gf x^4                  2 + 2 + 3 + 2 = 9
                                           22
                                           --
                                           67

The final reduction of the per-thread/per-group partial sums is O(threads x groups), not per element: not counted.
"""
from __future__ import annotations

import importlib
from math import prod
from typing import Sequence

import torch
from torch.utils import flop_counter

__all__ = [
    "RATIONAL_BACKWARD_FLOPS_PER_ELEMENT",
    "RATIONAL_FORWARD_FLOPS_PER_ELEMENT",
    "group_rational_backward_flops",
    "group_rational_flops",
    "register_flop_formulas",
]

RATIONAL_FORWARD_FLOPS_PER_ELEMENT = 20
RATIONAL_BACKWARD_FLOPS_PER_ELEMENT = 67


def group_rational_flops(x_shape: Sequence[int]) -> int:
    """FLOPs of one ``group_rational`` forward on an input of shape ``x_shape``."""
    return prod(x_shape) * RATIONAL_FORWARD_FLOPS_PER_ELEMENT


def group_rational_backward_flops(x_shape: Sequence[int]) -> int:
    """FLOPs of one ``group_rational`` backward (grad_x and the coefficient gradients) for an input of ``x_shape``."""
    return prod(x_shape) * RATIONAL_BACKWARD_FLOPS_PER_ELEMENT


# FlopCounterMode calls formulas with the op's arguments, tensors replaced by their shapes, and out_shape=.
# The optional input bias (a Linear's bias added inside the op) is not counted: FlopCounterMode does not count a
# Linear's bias add or its gradient's reduction either, so a model counts the same whether the bias is fused or not.
def _forward_formula(x_shape, numerator_shape, denominator_shape, channel_dim, bias_shape=None, *, out_shape=None,
                     **kwargs) -> int:
    return group_rational_flops(x_shape)


def _backward_formula(grad_shape, x_shape, numerator_shape, denominator_shape, channel_dim, bias_shape=None, *,
                      out_shape=None, **kwargs) -> int:
    return group_rational_backward_flops(x_shape)


def register_flop_formulas() -> None:
    """Add the two custom ops to ``torch.utils.flop_counter``'s registry (idempotent: a module reload or a second
    call leaves the first registration in place instead of raising torch's duplicate-registration error)."""
    importlib.import_module(f"{__package__}.group_rational")  # defines the custom ops under torch.ops.kat_timm
    for packet, formula in (
        (torch.ops.kat_timm.group_rational, _forward_formula),
        (torch.ops.kat_timm.group_rational_backward, _backward_formula),
    ):
        if packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet)(formula)


register_flop_formulas()
