"""Pure-PyTorch grouped rational function: the fallback that runs everywhere.

Large inputs: for |x| > ``LARGE_INPUT`` the function is evaluated in the reciprocal form F(x) = x * P~(u) / Q~(|u|), u = 1 / x,
with P~, Q~ the reversed polynomials (P(x) = x^5 P~(u), Q(|x|) = |x|^4 Q~(|u|)), and the gradients likewise, so
no power of a large x is ever formed: F is finite wherever its true value is (the plain form overflowed from
|x| ~ 5e7 in float32). Where Q~ underflows (a denominator whose top coefficients are zero, e.g. b == 0) the plain
form is exact and is used. Below ``LARGE_INPUT`` the plain form has no overflow to fear (and is exact for the
identity init); the choice is made per element, so a value never depends on its neighbours. The explicit backend
skips the reciprocal form for chunks without a large input.

Two flavours:
- ``rational_forward_torch`` / ``rational_backward_torch``: explicit forward and backward on the canonical
  (M, G, L) view (see ``layout.py``), in-place Horner in chunks of rows so the temporaries stay small. Used by
  the custom op when neither the native CPU kernel nor Triton applies (float64, no compiler, forced by
  ``KAT_RATIONAL_BACKEND=torch``). Low-precision inputs are computed in float32, float64 in float64.
- ``group_rational_autograd``: the formula written with differentiable ops only, TorchScript-compatible. It is
  what a scripted ``GroupRational`` runs, and the "plain PyTorch" baseline of the benchmark. ``|t|`` is written
  ``t * s(t)`` with ``s`` a detached sign that is +1 at 0, so autograd gives d|t|/dt = +1 at t == 0 like the
  kernels (``torch.abs`` would give 0 there and freeze an identity-initialised denominator).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "COEFFICIENT_SUMS",
    "coefficient_grads",
    "group_rational_autograd",
    "group_rational_plain",
    "rational_backward_torch",
    "rational_forward_torch",
]

# Backends return the ten coefficient sums per group, in this order:
#   S_i = sum g * x^i / Q           (i = 0..5)  -> grad of a_i
#   T_j = sum g * P / Q^2 * |x|^j   (j = 1..4)  -> grad of b_j is -sign(b_j) * T_j
COEFFICIENT_SUMS = 10

# Rows per chunk are chosen so a chunk holds about this many elements (a few MB of fp32 temporaries).
_CHUNK_ELEMENTS = 1 << 18

# Above this |x| the reciprocal form is used, below it the plain one, which can't overflow there in float32
# (x^5 <= 1e15, coefficients up to ~1e20). The native kernel and the ONNX decomposition use the same bound.
LARGE_INPUT = 1e3


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, row_len: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, row_len))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _horner(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_k c_k x^k for c of shape (G, 1, n) broadcast over x of shape (m, G, L); highest power first."""
    n = coefficients.shape[-1]
    acc = torch.addcmul(coefficients[..., n - 2], coefficients[..., n - 1], x)
    for k in range(n - 3, -1, -1):
        torch.addcmul(coefficients[..., k], acc, x, out=acc)
    return acc


def _prepare(numerator: torch.Tensor, denominator: torch.Tensor, dtype: torch.dtype):
    groups = denominator.shape[0]
    a = numerator.to(dtype).expand(groups, 6).unsqueeze(1)  # (G, 1, 6)
    b_abs = denominator.to(dtype).abs()
    # Q = 1 + |b1||x| + ... as a polynomial in |x| with constant term 1.
    q_coefficients = torch.cat([torch.ones_like(b_abs[:, :1]), b_abs], dim=1).unsqueeze(1)  # (G, 1, 5)
    return a, b_abs.unsqueeze(1), q_coefficients


def coefficient_grads(sums: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor):
    """(G, 10) sums [S0..S5, T1..T4] -> gradients of numerator and denominator, in their shapes and dtypes."""
    grad_numerator = sums[:, :6]
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    # d|b|/db with sign(0) = +1, so a zero (identity-initialised) denominator still learns.
    sign_b = torch.where(denominator < 0, -1.0, 1.0).to(sums.dtype)
    grad_denominator = -sign_b * sums[:, 6:]
    return grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


def _reciprocal_form(xc: torch.Tensor, a: torch.Tensor, b_abs: torch.Tensor):
    """Where the reciprocal form applies (|x| > LARGE_INPUT and Q~ normal), and the inputs each form may safely see.

    Returns (use_reciprocal, x_plain, x_recip, u, |u|, Q~): x_plain is 0 where the reciprocal form applies, x_recip
    is 2 where it does not, so neither branch of a ``torch.where`` overflows or divides by zero.
    """
    large = xc.abs() > LARGE_INPUT
    x_recip = torch.where(large, xc, torch.full_like(xc, 2.0))
    u = 1.0 / x_recip
    au = u.abs()
    q_rev = torch.cat([b_abs.flip(-1), torch.ones_like(b_abs[..., :1])], dim=-1)  # |b4|, |b3|, |b2|, |b1|, 1
    q_recip = _horner(au, q_rev)
    use = large & (q_recip >= torch.finfo(xc.dtype).tiny)
    x_plain = torch.where(use, torch.zeros_like(xc), xc)
    x_recip = torch.where(use, xc, torch.full_like(xc, 2.0))
    u = 1.0 / x_recip
    au = u.abs()
    return use, x_plain, x_recip, u, au, _horner(au, q_rev)


def _forward_safe(xc: torch.Tensor, a: torch.Tensor, b_abs: torch.Tensor, q_coefficients: torch.Tensor):
    """F on a chunk that holds large inputs (see the module docstring)."""
    use, x_plain, x_recip, u, _, q_recip = _reciprocal_form(xc, a, b_abs)
    plain = _horner(x_plain, a).div_(_horner(x_plain.abs(), q_coefficients))
    recip = x_recip * _horner(u, a.flip(-1)) / q_recip
    return torch.where(use, recip, plain)


def _backward_safe(gc, xc, a, b_abs, q_coefficients, da, dq):
    """(dx, [g x^i / Q for i = 0..5], [g F |x|^j / Q for j = 1..4]) on a chunk that holds large inputs."""
    use, x_plain, x_recip, u, au, q_recip = _reciprocal_form(xc, a, b_abs)
    sign = torch.where(xc < 0, -torch.ones_like(xc), torch.ones_like(xc))
    # Plain form where the reciprocal one does not apply.
    ax = x_plain.abs()
    q = _horner(ax, q_coefficients)
    f_plain = _horner(x_plain, a) / q
    dx_plain = (_horner(x_plain, da) - f_plain * sign * _horner(ax, dq)) / q
    # Reciprocal form: P'(x) / Q = P'~(u) / Q~, Q'(|x|) / Q = |u| Q'~(|u|) / Q~, x^i / Q = u^(4 - i) / Q~ (i <= 4),
    # x^5 / Q = x / Q~, |x|^j / Q = |u|^(4 - j) / Q~, with P'~, Q'~ the reversed derivative polynomials.
    h = _horner(u, a.flip(-1)) / q_recip  # F / x: F sign(x) |u| = h, and no F (which may overflow) is formed
    dx_recip = (_horner(u, da.flip(-1)) - h * _horner(au, dq.flip(-1))) / q_recip
    dx = gc * torch.where(use, dx_recip, dx_plain)
    gq_plain, gq_recip = gc / q, gc / q_recip
    x_terms, abs_terms = [], []
    for i in range(6):
        recip = gq_recip * (x_recip if i == 5 else u ** (4 - i))
        x_terms.append(torch.where(use, recip, gq_plain * x_plain ** i))
    for j in range(1, 5):
        # g F |x|^j / Q = g h sign(x) |u|^(3 - j) / Q~ (j <= 3), g h x / Q~ (j = 4)
        recip = gq_recip * h * (x_recip if j == 4 else sign * au ** (3 - j))
        abs_terms.append(torch.where(use, recip, gq_plain * f_plain * ax ** j))
    return dx, x_terms, abs_terms


def rational_forward_torch(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Forward on a contiguous (M, G, L) view: F(x3 + bias), bias None or (G, L) (one value per column);
    returns a new (M, G, L) tensor of x3's dtype."""
    cdt = _compute_dtype(x3.dtype)
    a, b_abs, q_coefficients = _prepare(numerator, denominator, cdt)
    shift = None if bias is None else bias.to(cdt)
    out = torch.empty_like(x3)
    rows, groups, length = x3.shape
    for start, stop in _row_chunks(rows, groups * length):
        xc = x3[start:stop].to(cdt)
        if shift is not None:
            xc = xc + shift  # not in place: for cdt == x3.dtype, xc is a view of x3
        if bool((xc.abs() > LARGE_INPUT).any()):
            out[start:stop] = _forward_safe(xc, a, b_abs, q_coefficients)
            continue
        p = _horner(xc, a)
        q = _horner(xc.abs(), q_coefficients)
        out[start:stop] = p.div_(q)
    return out


def rational_backward_torch(
    grad3: torch.Tensor,
    x3: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward on contiguous (M, G, L) views of F(x3 + bias).

    Returns:
        ``grad_x`` of shape (M, G, L) in x3's dtype, the gradients of numerator and denominator (their shapes and
        dtypes) from the (G, 10) coefficient sums (see ``COEFFICIENT_SUMS``), and, with a bias, its (G, L)
        per-column sums of grad_x (None without one); sums in float32 (float64 for float64 inputs).
    """
    cdt = _compute_dtype(x3.dtype)
    a, b_abs, q_coefficients = _prepare(numerator, denominator, cdt)
    shift = None if bias is None else bias.to(cdt)
    powers = torch.arange(1, 6, dtype=cdt, device=x3.device)
    da = a[..., 1:] * powers  # P' coefficients, (G, 1, 5)
    dq = b_abs * powers[:4]  # Q' coefficients in |x|, (G, 1, 4)
    grad_x = torch.empty_like(x3)
    rows, groups, length = x3.shape
    sums = torch.zeros(groups, 10, dtype=cdt, device=x3.device)
    bias_sums = None if bias is None else torch.zeros(groups, length, dtype=cdt, device=x3.device)
    for start, stop in _row_chunks(rows, groups * length):
        xc = x3[start:stop].to(cdt)
        if shift is not None:
            xc = xc + shift
        gc = grad3[start:stop].to(cdt)
        if bool((xc.abs() > LARGE_INPUT).any()):
            dx, x_terms, abs_terms = _backward_safe(gc, xc, a, b_abs, q_coefficients, da, dq)
            grad_x[start:stop] = dx
            if bias_sums is not None:
                bias_sums += dx.sum(0)
            for i in range(6):
                sums[:, i] += x_terms[i].sum(dim=(0, 2))
            for j in range(4):
                sums[:, 6 + j] += abs_terms[j].sum(dim=(0, 2))
            continue
        ax = xc.abs()
        p = _horner(xc, a)
        q = _horner(ax, q_coefficients)
        gq = gc / q  # not in place: gc may be the caller's gradient tensor itself
        f = p.div_(q)  # F = P / Q
        # dQ/dx = sign(x) * Q'(|x|) with sign(0) = +1.
        dq_dx = _horner(ax, dq)
        dq_dx = torch.where(xc < 0, -dq_dx, dq_dx)
        dx = (_horner(xc, da) - f * dq_dx) * gq
        grad_x[start:stop] = dx
        if bias_sums is not None:
            bias_sums += dx.sum(0)
        x_pow = torch.ones_like(xc)
        for i in range(6):
            sums[:, i] += (gq * x_pow).sum(dim=(0, 2))
            x_pow.mul_(xc)
        gf = gq.mul_(f)
        for j in range(1, 5):
            gf.mul_(ax)
            sums[:, 5 + j] += gf.sum(dim=(0, 2))
    return (grad_x,) + coefficient_grads(sums, numerator, denominator) + (bias_sums,)


def _sign_zero_positive(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 0, -torch.ones_like(t), torch.ones_like(t)).detach()


def _reversed_denominator(au: torch.Tensor, b_abs: torch.Tensor) -> torch.Tensor:
    """Q~(|u|) = |b4| + |b3||u| + |b2||u|^2 + |b1||u|^3 + |u|^4, with Q(|x|) = |x|^4 Q~(1 / |x|); b_abs (..., 4)."""
    q = au + b_abs[..., 0]
    for j in range(1, 4):
        q = q * au + b_abs[..., j]
    return q


def group_rational_autograd(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int = -1,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The grouped rational function with plain differentiable PyTorch ops (TorchScript-compatible).

    Args:
        x: input; its ``channel_dim`` axis is cut into G = denominator.shape[0] contiguous groups.
        numerator: (1, 6) or (G, 6).
        denominator: (G, 4).
        channel_dim: the channel axis.
        bias: optional (C,) per-channel input bias: the result is F(x + bias).

    Returns:
        F(x) in x's dtype (computed in x's dtype: this path makes no precision promises for fp16/bf16).
    """
    groups = denominator.shape[0]
    cdim = channel_dim % x.dim()
    xl = x.movedim(cdim, -1)
    if bias is not None:
        xl = xl + bias.to(x.dtype)
    channels = xl.shape[-1]
    lead = xl.shape[:-1]
    xg = xl.reshape(lead + (groups, channels // groups))
    a = numerator.to(x.dtype).expand(groups, 6).unsqueeze(-2)  # (G, 1, 6)
    b = denominator.to(x.dtype)
    b_abs = (b * _sign_zero_positive(b)).unsqueeze(-2)  # (G, 1, 4)
    # Reciprocal form for |x| > 1 (see the module docstring). The choice of form is made on detached values;
    # each branch sees safe inputs where the other is chosen (0, resp. 2), so neither produces inf or NaN that
    # torch.where's gradient would turn into NaN.
    with torch.no_grad():
        large = xg.abs() > 1e3  # LARGE_INPUT (TorchScript reads no module-level floats)
        u_probe = 1.0 / torch.where(large, xg, torch.full_like(xg, 2.0))
        use = large & torch.isfinite(1.0 / _reversed_denominator(u_probe.abs(), b_abs))
    x_plain = torch.where(use, torch.zeros_like(xg), xg)
    x_recip = torch.where(use, xg, torch.full_like(xg, 2.0))
    ax = x_plain * _sign_zero_positive(x_plain)
    p = a[..., 5]
    for i in range(4, -1, -1):
        p = p * x_plain + a[..., i]
    q = b_abs[..., 3]
    for j in range(2, -1, -1):
        q = q * ax + b_abs[..., j]
    q = q * ax + 1.0
    u = 1.0 / x_recip
    p_recip = a[..., 0]
    for i in range(1, 6):
        p_recip = p_recip * u + a[..., i]
    q_recip = _reversed_denominator(u * _sign_zero_positive(u), b_abs)
    y = torch.where(use, x_recip * p_recip / q_recip, p / q).reshape(xl.shape)
    return y.movedim(-1, cdim)


def group_rational_plain(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, channel_dim: int = -1,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``kat_timm.ops.group_rational`` with elementary pointwise ops only (Horner steps, Abs, Div, Where): what an
    exported graph computes, and the forward that torch.compile fuses with its neighbours. Its own autograd gives
    d|b|/db = 0 at b == 0: train through ``group_rational`` (whose backward is the kernels')."""
    groups = denominator.shape[0]
    cdim = channel_dim % x.dim()
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc = x.to(compute)
    if bias is not None:
        # (C,) -> (C, 1, ..., 1): one value per channel, broadcast over the axes after the channel axis.
        xc = xc + bias.to(compute).reshape((x.shape[cdim],) + (1,) * (x.dim() - 1 - cdim))
    # Each group's channels, and everything after the channel axis, form one contiguous run of the last axis.
    xg = xc.reshape(tuple(x.shape[:cdim]) + (groups, -1))
    numerator, denominator = numerator.to(compute).expand(groups, 6), denominator.to(compute).abs()
    a = [numerator[:, i : i + 1] for i in range(6)]  # a0..a5, each (G, 1)
    b = [denominator[:, j : j + 1] for j in range(4)]  # |b1|..|b4|
    ax = xg.abs()
    # Large |x|: the reciprocal form x * P~(1/x) / Q~(1/|x|) (the module docstring), so that a large input
    # gives the finite value it should instead of inf or NaN; Where and Reciprocal are standard ONNX ops too.
    large = ax > LARGE_INPUT
    u = 1.0 / torch.where(large, xg, torch.full_like(xg, 2.0))
    au = u.abs()
    q_recip = _horner_steps(au, au + b[0], b[1:])
    # Q~ is below the smallest normal float only when the top b's are 0, where the plain form is exact (the kernels'
    # rule). One division for both forms: the form is chosen for numerator and denominator, then they are divided.
    use = large & (q_recip >= torch.finfo(compute).tiny)
    numerator_value = torch.where(use, xg * _horner_steps(u, a[0], a[1:]), _horner_steps(xg, a[5], a[4::-1]))
    denominator_value = torch.where(use, q_recip, _horner_steps(ax, b[3], [*b[2::-1], 1.0]))
    return (numerator_value / denominator_value).reshape(x.shape).to(x.dtype)


def _horner_steps(t: torch.Tensor, leading, coefficients):
    """``leading * t^n + c_1 * t^(n-1) + ... + c_n`` for ``coefficients`` c_1..c_n, as Mul and Add steps."""
    for coefficient in coefficients:
        leading = leading * t + coefficient
    return leading
