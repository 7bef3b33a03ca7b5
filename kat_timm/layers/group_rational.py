"""``GroupRational``: the learnable grouped rational activation of a GR-KAN layer."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from ..ops.group_rational import group_rational, group_rational_
from ..ops.rational_torch import group_rational_autograd
from .rational_inits import rational_init

__all__ = ["GroupRational", "check_num_groups"]

# Plain torch.fx.symbolic_trace records the op as one call (its input checks can't run on a Proxy): the layer's
# forward looks ``group_rational`` up in this module's globals, which fx patches while it traces.
torch.fx.wrap("group_rational")


def check_num_groups(num_groups, owner: str, **widths: int) -> None:
    """Check a channel-group count: a positive integer (not a bool) that divides every one of ``widths``.

    Args:
        num_groups: the value to check.
        owner: who takes it, for the message (e.g. ``"KAN"``).
        **widths: channel counts the groups must cut into equal chunks, by name (e.g. ``in_features=192``).

    Raises:
        ValueError: ``num_groups`` is not valid; the message names the valid values (the common divisors of the
            widths, or "a positive integer" without widths).
    """
    valid = isinstance(num_groups, numbers.Integral) and not isinstance(num_groups, bool) and num_groups >= 1
    if valid and all(width % num_groups == 0 for width in widths.values()):
        return
    if not widths:
        raise ValueError(f"{owner}: num_groups={num_groups!r} is not valid: it must be a positive integer")
    common = math.gcd(*widths.values())
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    named = " and ".join(f"{name}={width}" for name, width in widths.items())
    raise ValueError(
        f"{owner}: num_groups={num_groups!r} is not valid: it must be a positive integer that divides {named}; "
        f"valid values: {', '.join(map(str, divisors))}"
    )


class GroupRational(nn.Module):
    """F(x) = P(x) / Q(x) with one learnable denominator per channel group and one shared numerator.

    The parameters have the names and shapes of the released KAT checkpoints: ``weight_numerator`` (1, 6) and
    ``weight_denominator`` (num_groups, 4). Under TorchScript scripting the layer runs the pure-PyTorch formula.

    Args:
        num_groups: G, the number of contiguous channel groups (the channel count must be a multiple of it).
        init: name of an entry of the init table (``kat_timm.layers.rational_inits()``), e.g. ``"identity"``,
            ``"swish"``, ``"gelu"``.
        channel_dim: the channel axis of the input: -1 for tokens ``[..., C]``, 1 for images ``[B, C, H, W]``.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(self, num_groups: int = 8, init: str = "identity", channel_dim: int = -1, device=None, dtype=None):
        super().__init__()
        check_num_groups(num_groups, "GroupRational")
        rational_init(init)  # fails early, listing the known names, on a typo
        self.num_groups = num_groups
        self.init = init
        self.channel_dim = channel_dim
        factory = {"device": device, "dtype": dtype}
        self.weight_numerator = nn.Parameter(torch.empty(1, 6, **factory))
        self.weight_denominator = nn.Parameter(torch.empty(num_groups, 4, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the coefficients to the ``init`` entry of the table (every group the same)."""
        numerator, denominator = rational_init(self.init)
        self.weight_numerator.copy_(torch.tensor([numerator], dtype=torch.float64))
        self.weight_denominator.copy_(torch.tensor([denominator], dtype=torch.float64).expand(self.num_groups, 4))

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F(x), or F(x + bias) with an optional (C,) input bias (a preceding Linear's, added in the same pass)."""
        if torch.jit.is_scripting():
            return group_rational_autograd(x, self.weight_numerator, self.weight_denominator, self.channel_dim, bias)
        return group_rational(x, self.weight_numerator, self.weight_denominator, self.channel_dim, bias)

    def forward_(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F(x) (or F(x + bias)) written over ``x``, for inference (``kat_timm.ops.group_rational_``): the caller
        must own x and not need it afterwards."""
        return group_rational_(x, self.weight_numerator, self.weight_denominator, self.channel_dim, bias)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, init={self.init!r}, channel_dim={self.channel_dim}"
