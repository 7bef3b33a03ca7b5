"""``GroupRational``: the learnable grouped rational activation of a GR-KAN layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.group_rational import group_rational, group_rational_
from ..ops.rational_torch import group_rational_autograd
from .rational_inits import rational_init

__all__ = ["GroupRational"]


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
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"GroupRational: num_groups must be a positive int, got {num_groups!r}")
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
