"""Triton kernels of the grouped rational function (CUDA; CPU tensors through ``TRITON_INTERPRET=1``).

Layout: the canonical (M, G, L) array (``layout.py``) seen as an (M, K) matrix, K = G * L. The work is cut into
*segments*: a segment is ``BLOCK_L`` consecutive columns inside one group (a group of L columns holds
``CHUNKS = cdiv(L, BLOCK_L)`` of them). A program owns one segment and a run of rows, so its ten coefficients are
scalars loaded once, not per-column vectors that would cost ten registers per column a thread touches.

Forward: one pass, reads x and writes y in x's dtype, math in fp32 registers.

Backward: writes dx and the ten coefficient sums per group (S_i = sum g x^i / Q, T_j = sum g P / Q^2 |x|^j).
Each program walks a fixed run of rows of its segment. Every loaded 16-byte vector (8 bf16/fp16 or 4 fp32 values,
all in one group) is summed inside its thread before it is added to the accumulators, so a thread keeps ten fp32
accumulators per vector it loads per iteration instead of ten per element. The program then reduces them to ten
scalars -> partials[program_m, segment, 10]. One small finalize kernel sums the partials over programs and
segments in a fixed order, applies d|b|/db = sign(b) (+1 at 0) and the sum over groups of a shared numerator, and
writes both coefficient gradients in their dtypes. The grid and every reduction order depend only on the shape, the
dtype and the device's SM count, so gradients are bitwise reproducible; there are no atomics.

Input bias (``HAS_BIAS``, a constexpr: the plain variant compiles it away): F(x + bias) with one float32 bias per
column, and the backward's per-column sums of dx (the bias gradient) from the same pass.

Large inputs: above |x| = ``LARGE_INPUT`` (1e3, as every backend) an element is evaluated in the reciprocal form
F = x P~(1/x) / Q~(1/|x|) (and its gradients likewise), so nothing overflows where the true value is finite. Both
directions run as two launches of one grid: the plain form, which also flags each program whose tiles held such an
input, then a pass that recomputes only the flagged programs in the safe form (the others exit at once). The plain
pass keeps its small register footprint, the rare safe one pays for both forms, and nothing waits on the host.

The launch parameters are plain data (``forward_launch`` / ``backward_launch``): the launchers and the static
resource report (``kernel_report.py``) both read them, so what is reported is what runs. ``GROUP_LEN`` is a
compile-time constant: the compiler then proves the 16-byte alignment of each group's start and vectorises the
loads and stores (one kernel is compiled per distinct group length; a KAT model has two).

``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is imported: set it before importing kat_timm.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .layout import check_column_bias
from .rational_torch import COEFFICIENT_SUMS

__all__ = [
    "BACKWARD_PROGRAMS_PER_SM",
    "Launch",
    "backward_launch",
    "backward_programs_per_sm",
    "forward_launch",
    "kernels_are_interpreted",
    "rational_backward_triton",
    "rational_forward_triton",
]

_MAX_BLOCK_L = 128  # columns of a segment
_FORWARD_WARPS = 4
_FORWARD_VECTORS = 4  # 16-byte vectors of x each forward thread loads (and of y it stores)
_BACKWARD_WARPS = 4
_BACKWARD_VECTORS = 2  # 16-byte vectors of x (and as many of the gradient) a backward thread loads per iteration
# Backward programs resident per SM: the compiled kernel's real occupancy (registers per thread x threads), by
# dtype, the same on sm_90a and sm_80, checked against the compiler by tests/ops/test_kernel_report.py. The grid is
# sized in whole waves of this many programs per SM.
BACKWARD_PROGRAMS_PER_SM = {torch.float32: 5, torch.bfloat16: 4, torch.float16: 4}
_MAX_WAVES = 4
_UNALIGNED_ELEMENTS = 4


@triton.jit
def _segment_coefficients(num_ptr, den_ptr, group, num_row_stride):
    """The ten coefficients of ``group`` as fp32 scalars; the b's as |b|."""
    a_base = num_ptr + group * num_row_stride
    b_base = den_ptr + group * 4
    a0 = tl.load(a_base + 0).to(tl.float32)
    a1 = tl.load(a_base + 1).to(tl.float32)
    a2 = tl.load(a_base + 2).to(tl.float32)
    a3 = tl.load(a_base + 3).to(tl.float32)
    a4 = tl.load(a_base + 4).to(tl.float32)
    a5 = tl.load(a_base + 5).to(tl.float32)
    b1 = tl.abs(tl.load(b_base + 0).to(tl.float32))
    b2 = tl.abs(tl.load(b_base + 1).to(tl.float32))
    b3 = tl.abs(tl.load(b_base + 2).to(tl.float32))
    b4 = tl.abs(tl.load(b_base + 3).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, b1, b2, b3, b4


@triton.jit
def _segment_tile(pid_segment, K, GROUP_LEN: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr):
    """Group of a segment, the columns of its tile (offsets in a row of K) and their mask (all true when
    L % BLOCK_L == 0; the kernels then skip it)."""
    group = pid_segment // CHUNKS
    in_group = (pid_segment % CHUNKS) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = group * GROUP_LEN + in_group
    col_mask = in_group < GROUP_LEN
    return group, cols, col_mask


# Above this |x| an element is evaluated in the reciprocal form (the same bound as every other backend:
# kat_timm/ops/rational_torch.py LARGE_INPUT); below it the plain form can't overflow in fp32.
LARGE_INPUT = tl.constexpr(1e3)
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _plain_value(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4):
    ax = tl.abs(x)
    p = a0 + x * (a1 + x * (a2 + x * (a3 + x * (a4 + x * a5))))
    q = 1.0 + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)))
    return p / q


@triton.jit
def _reciprocal_split(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4):
    """The reciprocal form's pieces, with P(x) = x^5 P~(u), Q(|x|) = |x|^4 Q~(|u|), u = 1 / x: where it applies
    (|x| > LARGE_INPUT and Q~ a normal float; elsewhere the plain form is exact), its x (2 where unused), u, |u|,
    Q~, P~, and the plain form's x (0 where unused), so neither form ever overflows or divides by zero."""
    big = tl.abs(x) > LARGE_INPUT
    xr = tl.where(big, x, 2.0)
    u = 1.0 / xr
    au = tl.abs(u)
    qt = b4 + au * (b3 + au * (b2 + au * (b1 + au)))
    use = big & (qt >= _FLT_MIN)
    xp = tl.where(use, 0.0, x)
    pt = a5 + u * (a4 + u * (a3 + u * (a2 + u * (a1 + u * a0))))
    return use, xr, u, au, qt, pt, xp


@triton.jit
def _safe_value(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4):
    """F(x) for any finite x: F = x P~ / Q~ where the reciprocal form applies, P / Q elsewhere."""
    use, xr, u, au, qt, pt, xp = _reciprocal_split(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
    return tl.where(use, xr * (pt / qt), _plain_value(xp, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4))


@triton.jit
def _plain_terms(x, g, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4):
    """g dF/dx and the ten coefficient terms g x^i / Q (i = 0..5), g F |x|^j / Q (j = 1..4); sign(0) = +1."""
    ax = tl.abs(x)
    sx = tl.where(x < 0.0, -1.0, 1.0)
    p = a0 + x * (a1 + x * (a2 + x * (a3 + x * (a4 + x * a5))))
    dp = a1 + x * (2.0 * a2 + x * (3.0 * a3 + x * (4.0 * a4 + x * (5.0 * a5))))
    q = 1.0 + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)))
    dq = b1 + ax * (2.0 * b2 + ax * (3.0 * b3 + ax * (4.0 * b4)))
    rq = 1.0 / q
    f = p * rq
    gq = g * rq
    dx = gq * (dp - f * sx * dq)
    x2 = x * x
    x4 = x2 * x2
    gf = gq * f
    return dx, gq, gq * x, gq * x2, gq * x2 * x, gq * x4, gq * x4 * x, gf * ax, gf * x2, gf * x2 * ax, gf * x4


@triton.jit
def _safe_terms(x, g, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4):
    """``_plain_terms`` for any finite x. In the reciprocal form, with h = F / x = P~ / Q~ (so F, which may
    overflow on its own, is never needed): dF/dx = (P'~ - h Q'~) / Q~, x^i / Q = u^(4-i) / Q~ (i <= 4),
    x^5 / Q = x / Q~, F |x|^j / Q = h sign(x) |u|^(3-j) / Q~ (j <= 3), F x^4 / Q = h x / Q~."""
    use, xr, u, au, qt, pt, xp = _reciprocal_split(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
    ax = tl.abs(xp)
    sx = tl.where(x < 0.0, -1.0, 1.0)
    p = a0 + xp * (a1 + xp * (a2 + xp * (a3 + xp * (a4 + xp * a5))))
    dp = a1 + xp * (2.0 * a2 + xp * (3.0 * a3 + xp * (4.0 * a4 + xp * (5.0 * a5))))
    q = 1.0 + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)))
    dq = b1 + ax * (2.0 * b2 + ax * (3.0 * b3 + ax * (4.0 * b4)))
    dpt = 5.0 * a5 + u * (4.0 * a4 + u * (3.0 * a3 + u * (2.0 * a2 + u * a1)))
    dqt = 4.0 * b4 + au * (3.0 * b3 + au * (2.0 * b2 + au * b1))
    rq = tl.where(use, 1.0 / qt, 1.0 / q)
    h = pt * rq
    f = tl.where(use, xr * h, p * rq)
    dx = g * tl.where(use, dpt - h * dqt, dp - f * sx * dq) * rq
    gq = g * rq
    gf = gq * f
    gh = gq * h
    x2 = xp * xp
    x4 = x2 * x2
    u2 = u * u
    au2 = au * au
    return (
        dx,
        tl.where(use, gq * u2 * u2, gq),
        tl.where(use, gq * u2 * u, gq * xp),
        tl.where(use, gq * u2, gq * x2),
        tl.where(use, gq * u, gq * x2 * xp),
        tl.where(use, gq, gq * x4),
        tl.where(use, gq * xr, gq * x4 * xp),
        tl.where(use, gh * sx * au2, gf * ax),
        tl.where(use, gh * sx * au, gf * x2),
        tl.where(use, gh * sx, gf * x2 * ax),
        tl.where(use, gh * xr, gf * x4),
    )


@triton.jit
def _forward_program(
    pid, x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, flag_ptr, M, K, num_row_stride, segments,
    GROUP_LEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr, HAS_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    pid_segment = pid % segments
    pid_m = pid // segments
    group, cols, col_mask = _segment_tile(pid_segment, K, GROUP_LEN, BLOCK_L, CHUNKS)
    a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _segment_coefficients(num_ptr, den_ptr, group, num_row_stride)
    rows = tl.arange(0, BLOCK_M)
    row0 = pid_m * BLOCK_M
    offsets = rows[:, None] * K + cols[None, :]
    base = row0.to(tl.int64) * K
    mask = (row0 + rows < M)[:, None]
    if not EVEN_L:
        mask = mask & col_mask[None, :]
    x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if SAFE:
        y = _safe_value(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
    else:
        y = _plain_value(x, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
    tl.store(y_ptr + base + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    if not SAFE:
        # Masked lanes hold x = 0 (plus a bias of 0 where the columns are masked); NaN compares false.
        large = tl.max(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1), axis=0) > LARGE_INPUT
        tl.store(flag_ptr + pid, large.to(tl.int32))


@triton.jit
def _group_rational_forward_kernel(
    x_ptr,  # (M, K) contiguous, x's dtype
    y_ptr,  # (M, K) contiguous, x's dtype
    num_ptr,  # (G, 6) rows, row stride num_row_stride (0: one shared row)
    den_ptr,  # (G, 4) contiguous
    bias_ptr,  # (K,) float32 input bias per column when HAS_BIAS (else any pointer, never read)
    flag_ptr,  # int32 (programs,): written by the plain pass (1: the tile holds an |x| > LARGE_INPUT), read by SAFE
    M,
    K,
    num_row_stride,
    segments,  # G * CHUNKS
    GROUP_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr,  # GROUP_LEN % BLOCK_L == 0: no column mask
    HAS_BIAS: tl.constexpr,
    SAFE: tl.constexpr,  # 0: the plain form, flags tiles with large inputs; 1: recompute the flagged tiles
):
    # One flat grid, segment fastest: neighbouring programs read neighbouring columns of the same rows.
    pid = tl.program_id(0)
    if SAFE:
        if tl.load(flag_ptr + pid) != 0:
            _forward_program(pid, x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, flag_ptr, M, K, num_row_stride, segments,
                             GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, HAS_BIAS, True)
    else:
        _forward_program(pid, x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, flag_ptr, M, K, num_row_stride, segments,
                         GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, HAS_BIAS, False)


@triton.jit
def _thread_sum(t, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, VEC: tl.constexpr):
    """Sum each run of VEC columns (one 16-byte vector, held by one thread) of a [BLOCK_M, BLOCK_L] tile."""
    return tl.sum(tl.reshape(t, (BLOCK_M, BLOCK_L // VEC, VEC)), axis=2)


@triton.jit
def _thread_max(t, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, VEC: tl.constexpr):
    """``_thread_sum`` with max: in registers, no exchange between threads."""
    return tl.max(tl.reshape(t, (BLOCK_M, BLOCK_L // VEC, VEC)), axis=2)


@triton.jit
def _backward_program(
    pid, grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr, bias_ptr, bias_partial_ptr, flag_ptr,
    M, K, num_row_stride, segments, rows_per_program,
    GROUP_LEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    pid_segment = pid % segments
    pid_m = pid // segments
    group, cols, col_mask = _segment_tile(pid_segment, K, GROUP_LEN, BLOCK_L, CHUNKS)
    a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _segment_coefficients(num_ptr, den_ptr, group, num_row_stride)

    s0 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    s4 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    s5 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    t4 = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    largest = tl.zeros((BLOCK_M, BLOCK_L // VEC), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
        # Per column, so per element of the tile (a handful of registers more; only in the bias variant).
        db = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)

    rows = tl.arange(0, BLOCK_M)
    offsets = rows[:, None] * K + cols[None, :]
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # 64-bit base of the program's rows; offsets inside a BLOCK_M-row tile stay 32-bit.
    start = row_start.to(tl.int64) * K
    x_rows = x_ptr + start
    g_rows = grad_ptr + start
    dx_rows = dx_ptr + start
    for row0 in range(row_start, row_end, BLOCK_M):
        mask = (row0 + rows < row_end)[:, None]
        if not EVEN_L:
            mask = mask & col_mask[None, :]
        # Masked lanes read x = 0, g = 0, so they add exactly 0 to every sum.
        x = tl.load(x_rows + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_rows + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = tl.where(mask, x + bias, 0.0)  # masked lanes stay x = 0, g = 0: they add nothing
        if SAFE:
            dx, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9 = _safe_terms(x, g, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
        else:
            dx, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9 = _plain_terms(x, g, a0, a1, a2, a3, a4, a5, b1, b2, b3, b4)
            largest = tl.maximum(largest, _thread_max(tl.abs(x), BLOCK_M, BLOCK_L, VEC))
        tl.store(dx_rows + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += dx
        x_rows += BLOCK_M * K
        g_rows += BLOCK_M * K
        dx_rows += BLOCK_M * K
        s0 += _thread_sum(e0, BLOCK_M, BLOCK_L, VEC)
        s1 += _thread_sum(e1, BLOCK_M, BLOCK_L, VEC)
        s2 += _thread_sum(e2, BLOCK_M, BLOCK_L, VEC)
        s3 += _thread_sum(e3, BLOCK_M, BLOCK_L, VEC)
        s4 += _thread_sum(e4, BLOCK_M, BLOCK_L, VEC)
        s5 += _thread_sum(e5, BLOCK_M, BLOCK_L, VEC)
        t1 += _thread_sum(e6, BLOCK_M, BLOCK_L, VEC)
        t2 += _thread_sum(e7, BLOCK_M, BLOCK_L, VEC)
        t3 += _thread_sum(e8, BLOCK_M, BLOCK_L, VEC)
        t4 += _thread_sum(e9, BLOCK_M, BLOCK_L, VEC)

    if HAS_BIAS:
        tl.store(bias_partial_ptr + pid_m.to(tl.int64) * K + cols, tl.sum(db, axis=0), mask=col_mask)
    out = partial_ptr + (pid_m * segments + pid_segment) * 10
    tl.store(out + 0, tl.sum(tl.sum(s0, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(s1, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(s2, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(s3, axis=1), axis=0))
    tl.store(out + 4, tl.sum(tl.sum(s4, axis=1), axis=0))
    tl.store(out + 5, tl.sum(tl.sum(s5, axis=1), axis=0))
    tl.store(out + 6, tl.sum(tl.sum(t1, axis=1), axis=0))
    tl.store(out + 7, tl.sum(tl.sum(t2, axis=1), axis=0))
    tl.store(out + 8, tl.sum(tl.sum(t3, axis=1), axis=0))
    tl.store(out + 9, tl.sum(tl.sum(t4, axis=1), axis=0))
    if not SAFE:
        tl.store(flag_ptr + pid, (tl.max(tl.max(largest, axis=1), axis=0) > LARGE_INPUT).to(tl.int32))


@triton.jit
def _group_rational_backward_kernel(
    grad_ptr,  # (M, K) contiguous, x's dtype
    x_ptr,  # (M, K) contiguous
    dx_ptr,  # (M, K) contiguous, x's dtype
    num_ptr,  # (G, 6) rows, row stride num_row_stride
    den_ptr,  # (G, 4)
    partial_ptr,  # fp32 (programs_m, segments, 10)
    bias_ptr,  # (K,) float32 input bias per column when HAS_BIAS
    bias_partial_ptr,  # fp32 (programs_m, K) per-column sums of dx when HAS_BIAS
    flag_ptr,  # int32 (programs,): written by the plain pass (1: an |x| > LARGE_INPUT was seen), read by SAFE
    M,
    K,
    num_row_stride,
    segments,
    rows_per_program,  # a multiple of BLOCK_M
    GROUP_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr,
    VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAFE: tl.constexpr,  # 0: the plain form, flags programs with large inputs; 1: redo the flagged programs
):
    pid = tl.program_id(0)
    if SAFE:
        if tl.load(flag_ptr + pid) != 0:
            _backward_program(pid, grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr, bias_ptr, bias_partial_ptr,
                              flag_ptr, M, K, num_row_stride, segments, rows_per_program, GROUP_LEN, BLOCK_M, BLOCK_L,
                              CHUNKS, EVEN_L, VEC, HAS_BIAS, True)
    else:
        _backward_program(pid, grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr, bias_ptr, bias_partial_ptr,
                          flag_ptr, M, K, num_row_stride, segments, rows_per_program, GROUP_LEN, BLOCK_M, BLOCK_L,
                          CHUNKS, EVEN_L, VEC, HAS_BIAS, False)


@triton.jit
def _coefficient_grads_kernel(
    partial_ptr,  # fp32 (programs_m, G * CHUNKS, 10)
    den_ptr,  # (G, 4), the denominator (its sign)
    grad_num_ptr,  # (1, 6) when SHARED_NUMERATOR else (G, 6), the numerator's dtype
    grad_den_ptr,  # (G, 4), the denominator's dtype
    programs_m,
    G,
    CHUNKS: tl.constexpr,
    SHARED_NUMERATOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program, a fixed order: the sums are reproducible bit for bit.
    sums = tl.arange(0, 16)
    sum_mask = sums < 10
    shared = tl.zeros((16,), dtype=tl.float32)
    for group in range(0, G):
        total = tl.zeros((BLOCK_R, 16), dtype=tl.float32)
        # Rows of the partials that belong to this group: (program p, chunk c) -> p * G * CHUNKS + group * CHUNKS + c.
        for start in range(0, programs_m * CHUNKS, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            program = r // CHUNKS
            row = program * (G * CHUNKS) + group * CHUNKS + r % CHUNKS
            mask = (r < programs_m * CHUNKS)[:, None] & sum_mask[None, :]
            total += tl.load(partial_ptr + row[:, None] * 10 + sums[None, :], mask=mask, other=0.0)
        group_sums = tl.sum(total, axis=0)  # [16]: S0..S5, T1..T4, padding
        b = tl.load(den_ptr + group * 4 + (sums - 6), mask=(sums >= 6) & sum_mask, other=0.0).to(tl.float32)
        sign_b = tl.where(b < 0.0, -1.0, 1.0)
        tl.store(grad_den_ptr + group * 4 + (sums - 6), (-sign_b * group_sums).to(grad_den_ptr.dtype.element_ty),
                 mask=(sums >= 6) & sum_mask)
        if SHARED_NUMERATOR:
            shared += group_sums
        else:
            tl.store(grad_num_ptr + group * 6 + sums, group_sums.to(grad_num_ptr.dtype.element_ty), mask=sums < 6)
    if SHARED_NUMERATOR:
        tl.store(grad_num_ptr + sums, shared.to(grad_num_ptr.dtype.element_ty), mask=sums < 6)


def kernels_are_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_group_rational_forward_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched for one (M, G, L) shape and dtype: grid, tile and compile-time constants.

    Attributes:
        grid: the (flat) grid, ``segments * programs_m`` programs.
        segments: G * chunks, column segments of ``block_l`` columns each, inside one group.
        programs_m: programs along the rows.
        rows_per_program: rows each program walks (backward; the forward's programs own ``block_m`` rows).
        constexprs: the kernel's compile-time arguments (GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L[, VEC]).
        num_warps: warps per program.
        num_stages: software-pipelining depth passed to the compiler.
    """

    grid: Tuple[int]
    segments: int
    programs_m: int
    rows_per_program: int
    constexprs: dict
    num_warps: int
    num_stages: int = 1


def _segment_shape(length: int, element_size: int) -> Tuple[int, int, int]:
    """(BLOCK_L, CHUNKS, VEC) for groups of ``length`` columns of ``element_size``-byte elements.

    When every group starts on a 16-byte boundary (L x element size a multiple of 16), BLOCK_L is the largest power
    of two (<= 128) dividing L, so segments tile the group exactly with no masked lanes, and VEC is the elements of
    a 16-byte vector. Otherwise no access can be vectorised: VEC = 1 and one masked power of two covers L.
    """
    if (length * element_size) % 16 == 0:
        block_l, vec = min(_MAX_BLOCK_L, length & -length), 16 // element_size
    else:
        block_l, vec = min(_MAX_BLOCK_L, triton.next_power_of_2(length)), 1
    return block_l, triton.cdiv(length, block_l), vec


def _block_m(block_l: int, elements_per_thread: int, num_warps: int) -> int:
    """Rows of a tile so that each thread holds ``elements_per_thread`` elements of it."""
    return max(1, (32 * num_warps * elements_per_thread) // block_l)


def _elements_per_thread(vec: int, vectors: int) -> int:
    # Unvectorised (VEC = 1) tiles keep a few elements per thread: each costs registers, not bytes in flight.
    return vec * vectors if vec > 1 else _UNALIGNED_ELEMENTS


def forward_launch(rows: int, groups: int, length: int, element_size: int) -> Launch:
    """Launch parameters of the forward kernel for an (M, G, L) input of ``element_size``-byte elements."""
    block_l, chunks, vec = _segment_shape(length, element_size)
    block_m = _block_m(block_l, _elements_per_thread(vec, _FORWARD_VECTORS), _FORWARD_WARPS)
    segments = groups * chunks
    programs_m = triton.cdiv(rows, block_m)
    return Launch(
        grid=(segments * programs_m,), segments=segments, programs_m=programs_m, rows_per_program=block_m,
        constexprs=dict(GROUP_LEN=length, BLOCK_M=block_m, BLOCK_L=block_l, CHUNKS=chunks,
                        EVEN_L=int(length % block_l == 0)),
        num_warps=_FORWARD_WARPS,
    )


def backward_programs_per_sm(dtype: torch.dtype) -> int:
    """Programs of the backward kernel that fit on one SM at once (see ``BACKWARD_PROGRAMS_PER_SM``)."""
    return BACKWARD_PROGRAMS_PER_SM.get(dtype, 4)


def backward_launch(rows: int, groups: int, length: int, dtype: torch.dtype, sm_count: int) -> Launch:
    """Launch parameters of the backward kernel.

    Each program walks ``rows_per_program`` rows (a multiple of BLOCK_M) of one segment. Among grids of 1 to
    ``_MAX_WAVES`` whole waves (``sm_count`` SMs x the kernel's resident programs per SM), the one with the least
    work on the busiest slot wins (waves x rows per program); ties go to the smaller grid (fewer partial sums).
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    block_l, chunks, vec = _segment_shape(length, element_size)
    block_m = _block_m(block_l, _elements_per_thread(vec, _BACKWARD_VECTORS), _BACKWARD_WARPS)
    segments = groups * chunks
    slots = sm_count * backward_programs_per_sm(dtype)
    row_tiles = triton.cdiv(rows, block_m)
    best = None
    for waves in range(1, _MAX_WAVES + 1):
        programs_m = max(1, min(row_tiles, (waves * slots) // segments))
        rows_per_program = triton.cdiv(row_tiles, programs_m) * block_m
        programs_m = triton.cdiv(rows, rows_per_program)
        cost = (triton.cdiv(programs_m * segments, slots) * rows_per_program, programs_m)
        if best is None or cost < best[0]:
            best = (cost, programs_m, rows_per_program)
    _, programs_m, rows_per_program = best
    return Launch(
        grid=(segments * programs_m,), segments=segments, programs_m=programs_m, rows_per_program=rows_per_program,
        constexprs=dict(GROUP_LEN=length, BLOCK_M=block_m, BLOCK_L=block_l, CHUNKS=chunks,
                        EVEN_L=int(length % block_l == 0), VEC=vec),
        num_warps=_BACKWARD_WARPS,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so the multi-program paths are exercised


def _coefficients(numerator: torch.Tensor, denominator: torch.Tensor):
    num = numerator.detach().contiguous()
    den = denominator.detach().contiguous()
    return num, (0 if num.shape[0] == 1 else 6), den


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 while cuda:0 is current)."""
    if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NO_CONTEXT


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


def _bias_columns(bias, x3):
    """The (G, L) float32 per-column bias the dispatcher hands over, checked; (pointer, flag) for the kernels."""
    if bias is None:
        return x3, 0  # any valid pointer: HAS_BIAS = 0 compiles the loads away
    return check_column_bias(bias, x3, "triton"), 1


def rational_forward_triton(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Forward on a contiguous (M, G, L) view: F(x3 + bias) (bias: None or float32 (G, L), one value per column);
    returns a new tensor of x3's dtype."""
    rows, groups, length = x3.shape
    out = torch.empty_like(x3)
    num, num_row_stride, den = _coefficients(numerator, denominator)
    bias_arg, has_bias = _bias_columns(bias, x3)
    launch = forward_launch(rows, groups, length, x3.element_size())
    flags = torch.empty(launch.grid[0], dtype=torch.int32, device=x3.device)
    args = (x3, out, num, den, bias_arg, flags, rows, groups * length, num_row_stride, launch.segments)
    with _on_device(x3):
        # The plain pass, then the reciprocal form for the tiles it flagged (a pass of programs that mostly exit at
        # once: no host sync, so CUDA graphs can capture both).
        for safe in (0, 1):
            _group_rational_forward_kernel[launch.grid](
                *args, num_warps=launch.num_warps, num_stages=launch.num_stages, HAS_BIAS=has_bias, SAFE=safe,
                **launch.constexprs,
            )
    return out


def rational_backward_triton(
    grad3: torch.Tensor,
    x3: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward on contiguous (M, G, L) views of F(x3 + bias).

    Returns:
        grad_x (x3's dtype), the gradients of numerator and denominator (their shapes and dtypes) and, with a bias,
        the (G, L) float32 per-column sums of grad_x (before its cast to x3's dtype); None without one.
    """
    rows, groups, length = x3.shape
    cols = groups * length
    grad_x = torch.empty_like(x3)
    num, num_row_stride, den = _coefficients(numerator, denominator)
    bias_arg, has_bias = _bias_columns(bias, x3)
    launch = backward_launch(rows, groups, length, x3.dtype, _sm_count(x3.device))
    partials = torch.empty(launch.programs_m, launch.segments, COEFFICIENT_SUMS, dtype=torch.float32,
                           device=x3.device)
    bias_partials = torch.empty(launch.programs_m, cols, dtype=torch.float32, device=x3.device) if has_bias \
        else partials
    grad_numerator = torch.empty(numerator.shape, dtype=numerator.dtype, device=x3.device)
    grad_denominator = torch.empty(denominator.shape, dtype=denominator.dtype, device=x3.device)
    flags = torch.empty(launch.grid[0], dtype=torch.int32, device=x3.device)
    args = (grad3, x3, grad_x, num, den, partials, bias_arg, bias_partials, flags, rows, cols, num_row_stride,
            launch.segments, launch.rows_per_program)
    with _on_device(x3):
        for safe in (0, 1):  # as in the forward: programs that saw an |x| > LARGE_INPUT redo their rows
            _group_rational_backward_kernel[launch.grid](
                *args, num_warps=launch.num_warps, num_stages=launch.num_stages, HAS_BIAS=has_bias, SAFE=safe,
                **launch.constexprs,
            )
        _coefficient_grads_kernel[(1,)](
            partials, den, grad_numerator, grad_denominator, launch.programs_m, groups,
            CHUNKS=launch.constexprs["CHUNKS"], SHARED_NUMERATOR=int(num.shape[0] == 1), BLOCK_R=64, num_warps=4,
        )
    bias_sums = bias_partials.sum(0).view(groups, length) if has_bias else None
    return grad_x, grad_numerator, grad_denominator, bias_sums
