"""``group_rational``: the grouped rational function of a GR-KAN layer, as ``torch.library`` custom ops.

    F(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1||x| + |b2||x|^2 + |b3||x|^3 + |b4||x|^4)

Two custom ops, ``kat_timm::group_rational`` and ``kat_timm::group_rational_backward``, each with a fake (meta)
implementation, tied together with ``torch.library.register_autograd``. So ``torch.compile(fullgraph=True)``
traces through them, meta tensors work, and ``torch.library.opcheck`` passes. The implementations pick a backend
through ``backend.select_backend`` and work on the canonical (M, G, L) view of ``layout.py``.

An optional per-channel input bias (a preceding Linear's bias) is added inside the same pass: F(x + bias). The
backends see it as one float32 value per column of the (M, K = G * L) matrix, i.e. a (G, L) tensor: for channels
last that is the bias itself, for an image layout the bias repeated over the pixels after the channel axis. They
return the per-column sums of grad_x with it, which are folded back here into the (C,) bias gradient; so the bias
gradient costs no pass of its own.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.autograd import forward_ad

from .backend import select_backend
from .layout import channels_moved_last, empty_output, mgl_view
from .rational_torch import group_rational_autograd

__all__ = ["group_rational"]


def _implementation(backend: str, direction: str):
    """The (M, G, L) function of ``backend`` for ``direction`` ("forward" or "backward"); the native and Triton
    modules are imported on first use (building the C kernel, importing triton)."""
    if backend == "native":
        from . import rational_cpu as module
    elif backend == "triton":
        from . import rational_triton as module
    else:
        from . import rational_torch as module
    return getattr(module, f"rational_{direction}_{backend}")


def _from_mgl(t3: torch.Tensor, x: torch.Tensor, cdim: int, moved: bool) -> torch.Tensor:
    """Give a contiguous (M, G, L) result x's shape, in the layout ``empty_output`` describes."""
    if moved:
        return t3.view(x.movedim(cdim, -1).shape).movedim(-1, cdim)
    return t3.view(x.shape)


def _bias_columns(bias: torch.Tensor, x: torch.Tensor, cdim: int, moved: bool, groups: int) -> torch.Tensor:
    """The (C,) bias as the (G, L) per-column values of x's (M, G, L) view, contiguous, in the kernels' math dtype
    (float32; float64 for float64 inputs, which take the PyTorch path)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[cdim]
    columns = bias.detach().to(dtype)
    after = 1 if moved else math.prod(x.shape[cdim + 1 :])
    if after != 1:  # image layout: each channel's value repeated over the pixels that follow it
        columns = columns.view(channels, 1).expand(channels, after)
    return columns.reshape(groups, -1).contiguous()


def _bias_gradient(bias_sums: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(G, L) per-column sums of grad_x -> the (C,) bias gradient in the bias's dtype (an image layout's columns are
    each channel's pixels in a row, so the channel's sum is the sum of its run)."""
    return bias_sums.reshape(bias.shape[0], -1).sum(1).to(bias.dtype)


def _run_backward(backend: str, grad3, x3, numerator, denominator, bias3):
    implementation = _implementation(backend, "backward")
    if bias3 is None:
        # Without a bias the call has the three-argument form, which every backend module accepts.
        result = implementation(grad3, x3, numerator, denominator)
    else:
        result = implementation(grad3, x3, numerator, denominator, bias=bias3)
    # (grad_x, sums, bias_sums); a backend module that predates the bias returns (grad_x, sums).
    return tuple(result) if len(result) == 3 else (result[0], result[1], None)


@torch.library.custom_op("kat_timm::group_rational", mutates_args=())
def _group_rational_op(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    cdim = channel_dim % x.dim()
    moved = channels_moved_last(x, cdim)
    if x.numel() == 0:
        return empty_output(x, cdim, moved)
    groups = denominator.shape[0]
    x3 = mgl_view(x, cdim, groups, moved)
    implementation = _implementation(select_backend(x), "forward")
    if bias is None:
        y3 = implementation(x3, numerator, denominator)
    else:
        y3 = implementation(x3, numerator, denominator, bias=_bias_columns(bias, x, cdim, moved, groups))
    return _from_mgl(y3, x, cdim, moved)


@_group_rational_op.register_fake
def _(x, numerator, denominator, channel_dim, bias=None):
    cdim = channel_dim % x.dim()
    return empty_output(x, cdim, channels_moved_last(x, cdim))


def _coefficient_grads(sums: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor):
    """(G, 10) sums [S0..S5, T1..T4] -> gradients of numerator and denominator, in their dtypes."""
    grad_numerator = sums[:, :6]
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    # d|b|/db with sign(0) = +1, so a zero (identity-initialised) denominator still learns.
    sign_b = torch.where(denominator < 0, -1.0, 1.0).to(sums.dtype)
    grad_denominator = -sign_b * sums[:, 6:]
    return grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


def _no_bias_gradient(x: torch.Tensor) -> torch.Tensor:
    """The placeholder the backward op returns for the bias gradient when there is no bias (an op can't return
    None): an empty tensor."""
    return x.new_empty((0,))


@torch.library.custom_op("kat_timm::group_rational_backward", mutates_args=())
def _group_rational_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cdim = channel_dim % x.dim()
    moved = channels_moved_last(x, cdim)
    groups = denominator.shape[0]
    if x.numel() == 0:
        return (
            empty_output(x, cdim, moved),
            torch.zeros_like(numerator),
            torch.zeros_like(denominator),
            _no_bias_gradient(x) if bias is None else torch.zeros_like(bias),
        )
    x3 = mgl_view(x, cdim, groups, moved)
    grad3 = mgl_view(grad.to(x.dtype), cdim, groups, moved)  # copies only if grad's layout differs from x's
    bias3 = None if bias is None else _bias_columns(bias, x, cdim, moved, groups)
    grad_x3, sums, bias_sums = _run_backward(select_backend(x), grad3, x3, numerator, denominator, bias3)
    grad_numerator, grad_denominator = _coefficient_grads(sums, numerator, denominator)
    if bias is None:
        grad_bias = _no_bias_gradient(x)
    else:
        grad_bias = _bias_gradient(bias_sums, bias)
    return _from_mgl(grad_x3, x, cdim, moved), grad_numerator, grad_denominator, grad_bias


@_group_rational_backward_op.register_fake
def _(grad, x, numerator, denominator, channel_dim, bias=None):
    cdim = channel_dim % x.dim()
    return (
        empty_output(x, cdim, channels_moved_last(x, cdim)),
        torch.empty_like(numerator),
        torch.empty_like(denominator),
        _no_bias_gradient(x) if bias is None else torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output):
    x, numerator, denominator, channel_dim, bias = inputs
    ctx.save_for_backward(x, numerator, denominator, bias)
    ctx.channel_dim = channel_dim


def _differentiable(x, numerator, denominator, channel_dim: int, bias):
    """The op written with differentiable PyTorch ops (float32 math for float16/bfloat16, as the kernels)."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = group_rational_autograd(
        x.to(compute), numerator.to(compute), denominator.to(compute), channel_dim,
        None if bias is None else bias.to(compute),
    )
    return y.to(x.dtype)


def _differentiable_backward(grad, x, numerator, denominator, channel_dim: int, bias):
    """The gradients as a graph of differentiable ops, for a backward with ``create_graph=True`` (double backward,
    Hessians): the backward op's output would have no gradient of its own."""
    tensors = [x, numerator, denominator] + ([] if bias is None else [bias])
    # Inputs without history become fresh leaves: their gradients are still wanted, only not differentiated further.
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
    with torch.enable_grad():
        y = _differentiable(leaves[0], leaves[1], leaves[2], channel_dim, None if bias is None else leaves[3])
        grads = torch.autograd.grad(y, leaves, grad, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
    return grads[0], grads[1], grads[2], None, None if bias is None else grads[3]


def _backward(ctx, grad):
    x, numerator, denominator, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # the autograd engine enables grad mode in a backward only for create_graph=True
        return _differentiable_backward(grad, x, numerator, denominator, ctx.channel_dim, bias)
    grad_x, grad_numerator, grad_denominator, grad_bias = _group_rational_backward_op(
        grad, x, numerator, denominator, ctx.channel_dim, bias
    )
    return grad_x, grad_numerator, grad_denominator, None, None if bias is None else grad_bias


_group_rational_op.register_autograd(_backward, setup_context=_setup_context)


def _under_transform() -> bool:
    """True inside a ``torch.func`` transform or a forward-AD dual level, where the custom op has no rule (see the
    module docstring). torch.compile / torch.export trace the op itself (dynamo handles what they need)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _validate(x, numerator, denominator, channel_dim, bias) -> None:
    named = [("x", x), ("numerator", numerator), ("denominator", denominator)]
    for name, tensor in named + ([("bias", bias)] if bias is not None else []):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"group_rational: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(
                f"group_rational: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                f"got {tensor.dtype}; convert it first, e.g. {name}.float()"
            )
    if x.dim() == 0:
        raise ValueError("group_rational: x must have at least one dimension (the channel axis), got a scalar")
    if not isinstance(channel_dim, int) or not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"group_rational: channel_dim={channel_dim!r} is out of range for x of shape {tuple(x.shape)}")
    if denominator.dim() != 2 or denominator.shape[1] != 4 or denominator.shape[0] < 1:
        raise ValueError(
            f"group_rational: denominator must have shape (G, 4) (one row b1..b4 per group), "
            f"got {tuple(denominator.shape)}"
        )
    groups = denominator.shape[0]
    if tuple(numerator.shape) not in ((1, 6), (groups, 6)):
        raise ValueError(
            f"group_rational: numerator must have shape (1, 6) (one shared row a0..a5) or ({groups}, 6) (one row per "
            f"group, G = denominator.shape[0] = {groups}), got {tuple(numerator.shape)}"
        )
    channels = x.shape[channel_dim]
    if channels % groups != 0:
        raise ValueError(
            f"group_rational: the channel axis (dim {channel_dim} of shape {tuple(x.shape)}) has C={channels} "
            f"channels, which can't be cut into G={groups} equal groups; C must be a multiple of G"
        )
    if numerator.device != x.device or denominator.device != x.device:
        raise ValueError(
            f"group_rational: x, numerator and denominator must be on one device, got {x.device}, "
            f"{numerator.device}, {denominator.device}"
        )
    if bias is not None:
        if tuple(bias.shape) != (channels,):
            raise ValueError(
                f"group_rational: bias must have shape ({channels},) (one value per channel of dim {channel_dim} of x "
                f"of shape {tuple(x.shape)}), got {tuple(bias.shape)}"
            )
        if bias.device != x.device:
            raise ValueError(f"group_rational: bias must be on x's device {x.device}, got {bias.device}")


def group_rational(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int = -1,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply the grouped rational function (the GR-KAN activation).

    The channel axis of ``x`` is cut into G = ``denominator.shape[0]`` contiguous chunks of C / G channels;
    chunk g uses denominator row g and numerator row g (or the single shared numerator row)::

        F(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1||x| + |b2||x|^2 + |b3||x|^3 + |b4||x|^4)

    With ``bias`` the function is applied to x + bias (one value per channel), added in the same pass: a Linear
    without its bias followed by this op computes what the Linear with its bias followed by the op computes, one
    pass over the activations fewer, and the bias gradient comes from the backward pass too.

    Differentiable in every tensor (d|b|/db = +1 at b == 0). Any shape and strides; the result is a new
    tensor of x's dtype (math in float32 for float32/float16/bfloat16, float64 for float64). Deterministic.

    Args:
        x: input, floating point, with C channels on ``channel_dim``.
        numerator: (1, 6) shared row or (G, 6) rows of a0..a5.
        denominator: (G, 4) rows of b1..b4.
        channel_dim: the channel axis: -1 for token layouts ``[..., C]``, 1 for images ``[B, C, H, W]``.
        bias: optional (C,) input bias, floating point, on x's device; its gradient is returned in its dtype.

    Returns:
        F(x) (or F(x + bias)), shaped like ``x``.

    Raises:
        TypeError: a non-floating-point (integer, bool, complex) input.
        ValueError: wrong coefficient or bias shapes, C not a multiple of G, a bad channel_dim, mixed devices.
    """
    _validate(x, numerator, denominator, channel_dim, bias)
    if _under_transform():
        return _differentiable(x, numerator, denominator, channel_dim, bias)
    if bias is None:
        return _group_rational_op(x, numerator, denominator, channel_dim)
    return _group_rational_op(x, numerator, denominator, channel_dim, bias)
