"""The canonical (M, G, L) view every backend works on.

Cutting the channel axis into G contiguous groups makes any input a 3-D array (M, G, L) in which each group is a
contiguous run of L elements with one set of coefficients:
- channels last ``[..., C]``: M = prod(leading dims), L = C / G;
- channels at ``channel_dim`` of a contiguous tensor (``[B, C, H, W]``): M = prod(dims before C),
  L = (C / G) * prod(dims after C).
A tensor whose memory is channels-last although its channel axis is not the last (``torch.channels_last``
images) is viewed through ``movedim`` without a copy, and its output keeps that memory format. Anything else is
copied to contiguous first. The fake (meta) implementations use the same rules, so their strides match.
"""
from __future__ import annotations

import math
import torch

__all__ = ["channels_moved_last", "mgl_view", "empty_output", "as_layout", "check_column_bias"]


def channels_moved_last(x: torch.Tensor, cdim: int) -> bool:
    """True when x is viewed as channels-last through movedim (no copy) rather than as a contiguous tensor."""
    return (not x.is_contiguous()) and cdim != x.dim() - 1 and x.movedim(cdim, -1).is_contiguous()


def as_layout(t: torch.Tensor, cdim: int, moved: bool) -> torch.Tensor:
    """t in the memory order the kernels read: channels-last through movedim, or contiguous (copying if needed)."""
    return t.movedim(cdim, -1).contiguous() if moved else t.contiguous()


def mgl_view(t: torch.Tensor, cdim: int, groups: int, moved: bool) -> torch.Tensor:
    """The (M, G, L) view of ``as_layout(t, ...)`` (a view, never a copy, of an already laid out tensor)."""
    channels = t.shape[cdim]
    if cdim == t.dim() - 1 and t.is_contiguous():  # the common token layout, checked first: this is per call
        return t.view(-1, groups, channels // groups)
    laid = as_layout(t, cdim, moved)
    if moved:
        rows = math.prod(laid.shape[:-1])
        return laid.view(rows, groups, channels // groups)
    rows = math.prod(t.shape[:cdim])
    return laid.view(rows, groups, (channels // groups) * math.prod(t.shape[cdim + 1 :]))


def empty_output(x: torch.Tensor, cdim: int, moved: bool, dtype: torch.dtype = None) -> torch.Tensor:
    """A fresh tensor shaped like x in the layout the kernels write (the same layout for real and fake tensors)."""
    dtype = x.dtype if dtype is None else dtype
    if moved:
        return torch.empty(x.movedim(cdim, -1).shape, dtype=dtype, device=x.device).movedim(-1, cdim)
    return torch.empty(x.shape, dtype=dtype, device=x.device)



def check_column_bias(bias: torch.Tensor, x3: torch.Tensor, backend: str) -> torch.Tensor:
    """The per-column bias a kernel backend gets from the dispatcher: contiguous float32 (G, L) for an (M, G, L)
    input. Anything else is a dispatcher bug, named here rather than read as garbage by a kernel."""
    if bias.dtype != torch.float32 or not bias.is_contiguous() or tuple(bias.shape) != tuple(x3.shape[1:]):
        raise ValueError(f"{backend} group_rational: bias must be a contiguous float32 {tuple(x3.shape[1:])} tensor, "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    return bias
