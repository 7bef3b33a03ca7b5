"""Float64 reference of the grouped rational function and its three gradients.

This is the yardstick every backend is tested against, so it is written for clarity, not speed: plain powers
(no Horner), explicit gradient formulas (no autograd), everything in float64.

    F(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1| |x| + |b2| |x|^2 + |b3| |x|^3 + |b4| |x|^4)

    dF/dx   = P'(x) / Q - P Q' / Q^2,  Q' = sign(x) * sum_j j |b_j| |x|^(j-1)
    dF/da_i = x^i / Q
    dF/db_j = -P / Q^2 * sign(b_j) * |x|^j

For |x| > 1e30 everything is evaluated in powers of u = 1 / x instead (P(x) = x^5 P~(u), Q(|x|) = |x|^4 Q~(|u|), with
P~, Q~ the reversed polynomials), so that no power of a large x is formed and the reference is exact for every
finite float64 input, not only for those whose fifth power is finite:

    F = x P~(u) / Q~,  dF/dx = (P'~(u) - F sign(x) |u| Q'~(|u|)) / Q~,
    x^i / Q = u^(4-i) / Q~ (i <= 4),  x^5 / Q = x / Q~,  |x|^j / Q = |u|^(4-j) / Q~,

where Q~ underflows (the top denominator coefficients are zero) the plain form is exact and is kept. Terms with a
zero coefficient are dropped, not multiplied by an overflowing power (0 * inf would be NaN).

sign(0) is taken as +1 for both x and b_j, as in the released kernels (an identity-initialised layer has b == 0
exactly; with sign(0) = 0 its denominator could never move).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["group_rational_reference", "sign_zero_positive"]


def sign_zero_positive(t: torch.Tensor) -> torch.Tensor:
    """+1 where t >= 0, -1 where t < 0 (NaN maps to -1; callers propagate NaN through the values)."""
    return torch.where(t >= 0, torch.ones_like(t), -torch.ones_like(t))


def _per_channel(coefficients: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """Expand a (G, k) or (1, k) table to (C, k): channel c belongs to group c // (C // G)."""
    rows = coefficients.expand(groups, coefficients.shape[1]) if coefficients.shape[0] == 1 else coefficients
    return rows.repeat_interleave(channels // groups, dim=0)


def group_rational_reference(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int = -1,
    grad_output: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
):
    """Evaluate the grouped rational function in float64, at ``x`` or, with a per-channel ``bias``, at x + bias.

    Args:
        x: input of any shape; its ``channel_dim`` axis has C channels, cut into G contiguous groups.
        numerator: (1, 6) shared or (G, 6) per-group coefficients a0..a5.
        denominator: (G, 4) coefficients b1..b4 (used through their absolute values).
        channel_dim: the channel axis of ``x``.
        grad_output: if given, the upstream gradient (shape of ``x``); the gradients are returned too.
        bias: optional (C,) input bias, one value per channel: F is evaluated at x + bias.

    Returns:
        ``y`` (float64, shape of ``x``), or ``(y, grad_x, grad_numerator, grad_denominator)`` when
        ``grad_output`` is given, followed by ``grad_bias`` (shape (C,), the per-channel sum of grad_x) when
        ``bias`` is given too; the coefficient gradients have the shapes of ``numerator`` and ``denominator``.
    """
    x64 = x.detach().to(torch.float64)
    a = numerator.detach().to(torch.float64)
    b = denominator.detach().to(torch.float64)
    groups = b.shape[0]
    cdim = channel_dim % x.dim()
    channels = x.shape[cdim]

    # Move channels last so coefficient tables broadcast as (..., C).
    xl = x64.movedim(cdim, -1)
    if bias is not None:
        xl = xl + bias.detach().to(torch.float64)
    a_c = _per_channel(a, channels, groups)  # (C, 6)
    b_c = _per_channel(b, channels, groups)  # (C, 4)
    b_abs = b_c.abs()

    def term(coefficient, power):  # coefficient * power, 0 where the coefficient is 0 (whatever the power)
        return torch.where(coefficient == 0, torch.zeros_like(power), coefficient * power)

    # Which form: reciprocal for |x| > 1e30 unless its Q~ underflows. (Below, float64 powers can't overflow for any
    # sane coefficients, and the plain powers are exact, e.g. for the identity.)
    large = xl.abs() > 1e30
    xr = torch.where(large, xl, torch.full_like(xl, 2.0))
    u = 1 / xr
    au = u.abs()
    q_rev = au**4 + sum(term(b_abs[:, j - 1], au ** (4 - j)) for j in range(1, 5))
    use = large & (q_rev >= torch.finfo(torch.float64).tiny)
    xp = torch.where(use, torch.zeros_like(xl), xl)  # plain-form input (0 where the reciprocal form is used)
    xr = torch.where(use, xl, torch.full_like(xl, 2.0))
    u = 1 / xr
    au = u.abs()
    q_rev = au**4 + sum(term(b_abs[:, j - 1], au ** (4 - j)) for j in range(1, 5))

    ax = xp.abs()
    p = sum(term(a_c[:, i], xp**i) for i in range(6))
    q = 1 + sum(term(b_abs[:, j - 1], ax**j) for j in range(1, 5))
    y_last = torch.where(use, xr * sum(term(a_c[:, i], u ** (5 - i)) for i in range(6)) / q_rev, p / q)
    y = y_last.movedim(-1, cdim)
    if grad_output is None:
        return y

    g = grad_output.detach().to(torch.float64).movedim(cdim, -1)
    sign_x = sign_zero_positive(xl)
    dp = sum(term(i * a_c[:, i], xp ** (i - 1)) for i in range(1, 6))
    dq = sign_x * sum(term(j * b_abs[:, j - 1], ax ** (j - 1)) for j in range(1, 5))
    dp_rev = sum(term(i * a_c[:, i], u ** (5 - i)) for i in range(1, 6))
    dq_rev = sum(term(j * b_abs[:, j - 1], au ** (4 - j)) for j in range(1, 5))
    dfdx = torch.where(use, (dp_rev - y_last * sign_x * au * dq_rev) / q_rev, dp / q - p * dq / q**2)
    grad_x_last = g * dfdx
    grad_x = grad_x_last.movedim(-1, cdim)
    x_over_q = [torch.where(use, (xr if i == 5 else u ** (4 - i)) / q_rev, xp**i / q) for i in range(6)]
    abs_over_q = [torch.where(use, au ** (4 - j) / q_rev, ax**j / q) for j in range(5)]

    # Per-channel sums, then per-group sums (then over groups for a shared numerator row).
    reduce_dims = tuple(range(xl.dim() - 1))
    d_a = torch.stack([(g * x_over_q[i]).sum(reduce_dims) for i in range(6)], dim=-1)  # (C, 6)
    d_b = torch.stack(
        [(-g * y_last * abs_over_q[j]).sum(reduce_dims) for j in range(1, 5)], dim=-1
    ) * sign_zero_positive(b_c)  # (C, 4)
    d_a = d_a.view(groups, channels // groups, 6).sum(1)
    d_b = d_b.view(groups, channels // groups, 4).sum(1)
    if a.shape[0] == 1:
        d_a = d_a.sum(0, keepdim=True)
    if bias is not None:
        return y, grad_x, d_a, d_b, grad_x_last.sum(reduce_dims)
    return y, grad_x, d_a, d_b
