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

In plain eager mode (no compile, tracing, dispatch mode, subclass or functorch transform: ``_plain_eager``) the
same forward and backward run through a ``torch.autograd.Function`` instead, or directly when no gradient is
needed: the custom op's Python dispatch alone costs several times a GELU call, which a KAT pays 24 times a step.
Inside ``torch.func`` transforms and forward-mode AD, for which the custom op has no rule, and for a backward with
``create_graph=True``, the op runs as differentiable PyTorch ops (``group_rational_autograd``) instead.

Under ``torch.compile`` (not ``torch.export``, which keeps the op), where no gradient is needed: where the native CPU
kernel runs on a large enough x (``native_in_place_pays``), the graph copies x into a buffer of its own (inductor
writes it where x is computed, e.g. in the LayerNorm's kernel) and ``kat_timm::group_rational_in_place`` overwrites
it, and ``group_rational_`` (KAN's act2 over fc1's output) overwrites x itself: the native kernel's values, and no
output allocated; inductor's code for the same math (both forms per element, then a select) costs more per element
than the pass it would save by fusing. Elsewhere (small tensors, whose per-call cost the kernel would not earn back;
Triton; the PyTorch path) the op is written as pointwise ops (``group_rational_plain``), which inductor fuses with
what surrounds it (act1 with the LayerNorm before it, act2 with fc1's bias add). Where a gradient is needed the
custom op stays, with the kernels' deterministic backward (d|b|/db = +1 at b == 0) and their exact forward values.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.utils._python_dispatch
from torch.autograd import forward_ad

from .backend import native_kernel_runs, select_backend, triton_implementation
from .layout import channels_moved_last, empty_output, mgl_view
from .rational_torch import group_rational_autograd, group_rational_plain

__all__ = ["group_rational", "group_rational_"]

_IMPLEMENTATIONS = {}


def _implementation(backend: str, direction: str):
    """The (M, G, L) function of ``backend`` for ``direction`` ("forward" or "backward"); the native and Triton
    modules are imported on first use (building the C kernel, importing triton)."""
    function = _IMPLEMENTATIONS.get((backend, direction))
    if function is None:
        if backend == "triton":  # guarded: a kernel that can't compile or launch falls back to PyTorch
            function = _IMPLEMENTATIONS[(backend, direction)] = triton_implementation(direction)
            return function
        if backend == "native":
            from . import rational_cpu as module
        else:
            from . import rational_torch as module
        function = _IMPLEMENTATIONS[(backend, direction)] = getattr(module, f"rational_{direction}_{backend}")
    return function


def _from_mgl(t3: torch.Tensor, x: torch.Tensor, cdim: int, moved: bool) -> torch.Tensor:
    """Give a contiguous (M, G, L) result x's shape, in the layout ``empty_output`` describes."""
    if moved:
        return t3.view(x.movedim(cdim, -1).shape).movedim(-1, cdim)
    return t3.view_as(x)


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


def _no_bias_gradient(x: torch.Tensor) -> torch.Tensor:
    """The placeholder the backward op returns for the bias gradient when there is no bias (an op can't return
    None): an empty tensor."""
    return x.new_empty((0,))


def _forward(x, numerator, denominator, channel_dim: int, bias) -> torch.Tensor:
    """F(x + bias) through the selected backend: what the custom op and the eager path both run."""
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


def _backward(grad, x, numerator, denominator, channel_dim: int, bias):
    """(grad_x, grad_numerator, grad_denominator, grad_bias) through the selected backend; grad_bias is
    ``_no_bias_gradient`` without a bias."""
    cdim = channel_dim % x.dim()
    moved = channels_moved_last(x, cdim)
    if x.numel() == 0:
        return (
            empty_output(x, cdim, moved),
            torch.zeros_like(numerator),
            torch.zeros_like(denominator),
            _no_bias_gradient(x) if bias is None else torch.zeros_like(bias),
        )
    groups = denominator.shape[0]
    x3 = mgl_view(x, cdim, groups, moved)
    grad3 = mgl_view(grad.to(x.dtype), cdim, groups, moved)  # copies only if grad's layout differs from x's
    implementation = _implementation(select_backend(x), "backward")
    if bias is None:
        grad_x3, grad_numerator, grad_denominator, _ = implementation(grad3, x3, numerator, denominator)
        grad_bias = _no_bias_gradient(x)
    else:
        grad_x3, grad_numerator, grad_denominator, bias_sums = implementation(
            grad3, x3, numerator, denominator, bias=_bias_columns(bias, x, cdim, moved, groups)
        )
        grad_bias = _bias_gradient(bias_sums, bias)
    return _from_mgl(grad_x3, x, cdim, moved), grad_numerator, grad_denominator, grad_bias


def _forward_in_place(x, numerator, denominator, channel_dim: int, bias) -> torch.Tensor:
    """x = F(x + bias), in x's memory when the native kernel can write it there (a contiguous token layout), else
    computed into a new tensor and copied back."""
    cdim = channel_dim % x.dim()
    if x.numel() and cdim == x.dim() - 1 and x.is_contiguous() and select_backend(x) == "native":
        groups = denominator.shape[0]
        x3 = x.view(-1, groups, x.shape[-1] // groups)
        columns = None if bias is None else _bias_columns(bias, x, cdim, False, groups)
        _implementation("native", "forward")(x3, numerator, denominator, bias=columns, in_place=True)
        return x
    return x.copy_(_forward(x, numerator, denominator, channel_dim, bias))


@torch.library.custom_op("kat_timm::group_rational", mutates_args=())
def _group_rational_op(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _forward(x, numerator, denominator, channel_dim, bias)


@_group_rational_op.register_fake
def _(x, numerator, denominator, channel_dim, bias=None):
    cdim = channel_dim % x.dim()
    return empty_output(x, cdim, channels_moved_last(x, cdim))


@torch.library.custom_op("kat_timm::group_rational_in_place", mutates_args=("x",))
def _group_rational_in_place_op(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    bias: Optional[torch.Tensor] = None,
) -> None:
    # What torch.compile runs for inference where the native kernel applies (see the module docstring): inductor
    # writes x into a buffer of its own and the kernel overwrites it, so no output is allocated.
    _forward_in_place(x, numerator, denominator, channel_dim, bias)


@_group_rational_in_place_op.register_fake
def _(x, numerator, denominator, channel_dim, bias=None):
    return None


@torch.library.custom_op("kat_timm::group_rational_backward", mutates_args=())
def _group_rational_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, x, numerator, denominator, channel_dim, bias)


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


def _op_backward(ctx, grad):
    x, numerator, denominator, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # the autograd engine enables grad mode in a backward only for create_graph=True
        return _differentiable_backward(grad, x, numerator, denominator, ctx.channel_dim, bias)
    grad_x, grad_numerator, grad_denominator, grad_bias = _group_rational_backward_op(
        grad, x, numerator, denominator, ctx.channel_dim, bias
    )
    return grad_x, grad_numerator, grad_denominator, None, None if bias is None else grad_bias


_group_rational_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerGroupRational(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the torch.library dispatch, which costs several
    times GELU's whole call on small tensors. Used only where nothing needs to see an operator (see
    ``_plain_eager``)."""

    @staticmethod
    def forward(ctx, x, numerator, denominator, channel_dim, bias):
        ctx.save_for_backward(x, numerator, denominator, bias)
        ctx.channel_dim = channel_dim
        return _forward(x, numerator, denominator, channel_dim, bias)

    @staticmethod
    def backward(ctx, grad):
        x, numerator, denominator, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return _differentiable_backward(grad, x, numerator, denominator, ctx.channel_dim, bias)
        grad_x, grad_numerator, grad_denominator, grad_bias = _backward(
            grad, x, numerator, denominator, ctx.channel_dim, bias
        )
        return grad_x, grad_numerator, grad_denominator, None, None if bias is None else grad_bias


# Under torch.compile the native kernel is called from Python, at a fixed cost per call, while inductor's fused
# pointwise code costs nothing per call but more per element: below this many elements (KAT-T/S at batch 1) the
# pointwise code is faster, above it (batch 8) the kernel (scripts/README.md, "Deployment").
NATIVE_UNDER_COMPILE_MIN_ELEMENTS = 1 << 19


def native_in_place_pays(x: torch.Tensor) -> bool:
    """Whether compiled inference should run the rational on ``x`` as the native kernel written in place
    (``kat_timm::group_rational_in_place``) rather than as pointwise ops for inductor: where the native kernel runs
    and x has at least ``NATIVE_UNDER_COMPILE_MIN_ELEMENTS`` elements (a guard on x's size when it is dynamic)."""
    return native_kernel_runs(x) and x.numel() >= NATIVE_UNDER_COMPILE_MIN_ELEMENTS


def exporting() -> bool:
    """True while torch.export traces. ``torch.compiler.is_exporting()`` alone reads True in every dynamo trace,
    torch.compile's too, before torch 2.12 (dynamo folded it to a constant); the flag torch.export sets, which it
    returns elsewhere, tells the two apart on every version."""
    return torch.compiler.is_exporting() and getattr(torch.compiler, "_is_exporting_flag", True)


def _compiling_not_exporting() -> bool:
    """True while torch.compile's dynamo traces the call, False for torch.export (its programs keep the op)."""
    return torch.compiler.is_compiling() and not exporting()


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_in_dispatch_mode = torch.utils._python_dispatch.is_in_torch_dispatch_mode  # user and infra modes alike


def _plain_eager(x: torch.Tensor) -> bool:
    """True when the call can bypass the custom op: a plain tensor in plain eager mode. Anything that must see
    the op as an operator takes the custom op: torch.compile / torch.export (dynamo), jit tracing (ONNX), fake and
    meta tensors, tensor subclasses, dispatch and function modes (FlopCounterMode, FakeTensorMode, a device
    context), functorch transforms (vmap, grad, jvp) and forward-mode AD."""
    return (
        type(x) is torch.Tensor
        and not _in_dispatch_mode()
        and not torch._C._is_torch_function_mode_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not _functorch_wrapped(x)
        and forward_ad._current_level < 0
        and x.device.type != "meta"
    )


def _under_transform() -> bool:
    """True inside a ``torch.func`` transform or a forward-AD dual level, where the custom op has no rule (see the
    module docstring). torch.compile / torch.export trace the op itself (dynamo handles what they need)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _validate(x, numerator, denominator, channel_dim, bias) -> None:
    # The common case is checked with a few cheap tests first (this runs at every call); the full checks below
    # only run to name what is wrong.
    try:
        if (x.dtype.is_floating_point and numerator.dtype.is_floating_point and denominator.dtype.is_floating_point
                and type(channel_dim) is int and -x.dim() <= channel_dim < x.dim()
                and denominator.dim() == 2 and denominator.shape[1] == 4 and numerator.dim() == 2
                and numerator.shape[1] == 6 and numerator.shape[0] in (1, denominator.shape[0])
                and denominator.shape[0] >= 1 and x.shape[channel_dim] % denominator.shape[0] == 0
                and x.device == numerator.device == denominator.device
                and (bias is None or (bias.dtype.is_floating_point and bias.dim() == 1
                                      and bias.shape[0] == x.shape[channel_dim] and bias.device == x.device))):
            return
    except (AttributeError, TypeError):
        pass
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
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool) or not -x.dim() <= channel_dim < x.dim():
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
    if _plain_eager(x):
        if torch.is_grad_enabled() and (
            x.requires_grad or numerator.requires_grad or denominator.requires_grad
            or (bias is not None and bias.requires_grad)
        ):
            return _EagerGroupRational.apply(x, numerator, denominator, channel_dim, bias)
        return _forward(x, numerator, denominator, channel_dim, bias)
    if _compiling_not_exporting() and not (torch.is_grad_enabled() and (
        x.requires_grad or numerator.requires_grad or denominator.requires_grad
        or (bias is not None and bias.requires_grad)
    )):
        if native_in_place_pays(x):
            y = x.clone()  # a buffer of the graph's own, which inductor fills where x is computed
            _group_rational_in_place_op(y, numerator, denominator, channel_dim, bias)
            return y
        return group_rational_plain(x, numerator, denominator, channel_dim, bias)
    if _under_transform():
        return _differentiable(x, numerator, denominator, channel_dim, bias)
    if bias is None:
        return _group_rational_op(x, numerator, denominator, channel_dim)
    return _group_rational_op(x, numerator, denominator, channel_dim, bias)


def group_rational_(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int = -1,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-place ``group_rational``: overwrites ``x`` with F(x + bias) and returns it. For inference only.

    Where the native CPU kernel runs on a contiguous ``[..., C]`` tensor it writes the result over its input in
    the same pass, so no output tensor is allocated (on a CPU, the fresh pages of a large output cost about as
    much as the pass itself). Elsewhere (other backends, layouts, compile/export tracing) the result is computed
    out of place and copied into ``x``: the same values, never faster than ``group_rational``.

    Args:
        x: input, overwritten; as for ``group_rational``.
        numerator, denominator, channel_dim, bias: as for ``group_rational``.

    Returns:
        ``x``.

    Raises:
        RuntimeError: autograd would need the result's inputs: grad mode is on and x, the coefficients or the bias
            require grad (use ``group_rational``).
        TypeError, ValueError: as ``group_rational``.
    """
    _validate(x, numerator, denominator, channel_dim, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or numerator.requires_grad or denominator.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        raise RuntimeError(
            "group_rational_: the in-place op is for inference, but autograd needs its inputs here (grad mode is on "
            "and a tensor requires grad); use group_rational, or run under torch.no_grad() / torch.inference_mode()"
        )
    if _plain_eager(x):
        # The native kernel writes behind autograd's back. An empty in-place write through torch first applies
        # torch's own rules for in-place ops to x (an inference tensor outside inference mode, a view made in
        # no-grad mode or by a multi-output op: torch's errors, raised here before anything is written) and bumps
        # x's version counter, so a graph that saved x fails at its backward instead of using the new values.
        x.narrow(0, 0, 0).zero_()
        return _forward_in_place(x, numerator, denominator, channel_dim, bias)
    if _compiling_not_exporting():  # the kernel's values, as in eager mode
        if native_kernel_runs(x):
            _group_rational_in_place_op(x, numerator, denominator, channel_dim, bias)
            return x
        return x.copy_(_group_rational_op(x, numerator, denominator, channel_dim, bias))
    return x.copy_(group_rational(x, numerator, denominator, channel_dim, bias))
