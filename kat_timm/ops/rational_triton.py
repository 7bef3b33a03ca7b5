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
scalars -> partials[program_m, segment, 10]. A small finalize kernel, one program per group (and one for a shared
numerator's sum over groups), sums the partials over programs and segments in a fixed order, applies d|b|/db =
sign(b) (+1 at 0), and writes both coefficient gradients in their dtypes. The grid and every reduction order depend
only on the shape, the dtype and the device (its SM count and the compiled kernel's occupancy there), so gradients
are bitwise reproducible run to run; there are no atomics.

Input bias (``HAS_BIAS``, a constexpr: the plain variant compiles it away): F(x + bias) with one float32 bias per
column, and the backward's per-column sums of dx (the bias gradient) from the same pass.

Large inputs: above |x| = ``LARGE_INPUT`` (1e3, as every backend) an element is evaluated in the reciprocal form
F = x P~(1/x) / Q~(1/|x|) (and its gradients likewise), so nothing overflows where the true value is finite. Both
directions run two launches: the plain form over the whole input, which also flags each program whose tiles held
such an input, then the safe form on a small fixed grid (a few programs per SM, whatever the input's size) whose
programs read the flags a vector at a time and recompute only the flagged programs' work. The plain pass keeps its
small register footprint, the rare safe one pays for both forms, no input is large -> one flag load per program of
a fixed grid, and nothing waits on the host.

Offsets: a program's row base is 64-bit; the offsets inside a tile (up to BLOCK_M x K) are 32-bit, except in the
``WIDE`` specialisation the launcher picks where BLOCK_M x K passes 2^31 (a channel_dim=1 input with a large
C x H x W).

The launch parameters are plain data (``forward_launch`` / ``backward_launch``): the launchers and the static
resource report (``kernel_report.py``) both read them, so what is reported is what runs. ``GROUP_LEN`` is a
compile-time constant: the compiler then proves the 16-byte alignment of each group's start and vectorises the
loads and stores (one kernel is compiled per distinct group length; a KAT model has two).

``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is imported: set it before importing kat_timm.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from .layout import check_column_bias
from .rational_torch import COEFFICIENT_SUMS

__all__ = [
    "DeviceLimits",
    "Launch",
    "backward_launch",
    "backward_register_cap",
    "coefficient_grads_launch",
    "device_limits",
    "forward_launch",
    "kernels_are_interpreted",
    "rational_backward_triton",
    "rational_forward_triton",
    "resident_programs",
]

_MAX_BLOCK_L = 128  # columns of a segment
_FORWARD_WARPS = 4
_FORWARD_VECTORS = 4  # 16-byte vectors of x each forward thread loads (and of y it stores)
_BACKWARD_WARPS = 4
_BACKWARD_VECTORS = 2  # 16-byte vectors of x (and as many of the gradient) a backward thread loads per iteration
_MAX_WAVES = 4
_UNALIGNED_ELEMENTS = 4
_SAFE_PROGRAMS_PER_SM = 4  # the large-|x| pass: its fixed grid (at most this many programs per SM) ...
_MAX_SAFE_SCAN = 1024  # ... each reading up to this many flags (one vector); past 1024 x 4 x SMs tiles it grows
# The forward's large-|x| pass holds both forms of a tile: with the plain pass's 4 warps ptxas spills 8 bytes
# (sm_90a fp16, sm_70 16-bit); 8 warps halve each thread's share of the tile. It runs only on flagged tiles.
_SAFE_FORWARD_WARPS = 8
_INTERPRETED_PROGRAMS_PER_SM = 4  # the interpreter has no occupancy: a few programs, multi-program paths exercised
_FINALIZE_ROWS = 128  # partial rows a coefficient-gradient program sums at once (x 16 lanes: 16 values a thread)
# NVIDIA: 128 registers x 128 threads = 4 backward programs on a 64K-register SM (32 KB of loads in flight). Where
# the compiler takes more (sm_100's 16-bit backward: 149, 3 programs, 24 KB) the plain backward is compiled with
# this cap, kept only if it doesn't spill (``backward_register_cap``).
_BACKWARD_REGISTER_CAP = 128


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


@triton.jit
def _tile_offsets(rows, cols, K, WIDE: tl.constexpr):
    """Offsets of a [rows, cols] tile in a row-major (M, K) array, from its first row: 32-bit products unless
    ``WIDE`` (BLOCK_M x K may pass 2^31; 64-bit offsets cost registers, so only that specialisation pays)."""
    if WIDE:
        offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    else:
        offsets = rows[:, None] * K + cols[None, :]
    return offsets


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
    EVEN_L: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, SAFE: tl.constexpr,
):
    pid_segment = pid % segments
    pid_m = pid // segments
    group, cols, col_mask = _segment_tile(pid_segment, K, GROUP_LEN, BLOCK_L, CHUNKS)
    a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _segment_coefficients(num_ptr, den_ptr, group, num_row_stride)
    rows = tl.arange(0, BLOCK_M)
    row0 = pid_m * BLOCK_M
    offsets = _tile_offsets(rows, cols, K, WIDE)
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
    flag_ptr,  # int32 (tiles,): written by the plain pass (1: the tile holds an |x| > LARGE_INPUT), read by SAFE
    M,
    K,
    num_row_stride,
    segments,  # G * CHUNKS
    tiles,  # programs of the plain pass: segments x cdiv(M, BLOCK_M)
    GROUP_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr,  # GROUP_LEN % BLOCK_L == 0: no column mask
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,  # BLOCK_M x K passes 2^31: 64-bit tile offsets
    SAFE: tl.constexpr,  # 0: the plain form, flags tiles with large inputs; 1: recompute the flagged tiles
    SCAN: tl.constexpr,  # SAFE: flags each program reads (a power of two >= tiles / programs); 1 otherwise
):
    if SAFE:
        # A small fixed grid walks the flags, program p taking tiles p, p + P, ... (flagged tiles, often
        # neighbours, spread over the programs); nothing flagged: one vector load each.
        # One vector of SCAN flags covers the program's tiles (the launcher sizes SCAN so): no loop around the
        # loop that redoes a tile, which made ptxas spill.
        programs = tl.num_programs(0)
        tile = tl.arange(0, SCAN) * programs + tl.program_id(0)
        if tl.max(tl.load(flag_ptr + tile, mask=tile < tiles, other=0), axis=0) != 0:
            for j in range(0, SCAN):
                pid = j * programs + tl.program_id(0)
                if pid < tiles:
                    if tl.load(flag_ptr + pid) != 0:
                        _forward_program(pid, x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, flag_ptr, M, K,
                                         num_row_stride, segments, GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L,
                                         HAS_BIAS, WIDE, True)
    else:
        # One flat grid, segment fastest: neighbouring programs read neighbouring columns of the same rows.
        _forward_program(tl.program_id(0), x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, flag_ptr, M, K, num_row_stride,
                         segments, GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, HAS_BIAS, WIDE, False)


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
    EVEN_L: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, SAFE: tl.constexpr,
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
    offsets = _tile_offsets(rows, cols, K, WIDE)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # 64-bit base of the program's rows; offsets inside a BLOCK_M-row tile are 32-bit unless WIDE.
    start = row_start.to(tl.int64) * K
    if WIDE:
        step = K.to(tl.int64) * BLOCK_M
    else:
        step = K * BLOCK_M
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
        x_rows += step
        g_rows += step
        dx_rows += step
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
    flag_ptr,  # int32 (tiles,): written by the plain pass (1: an |x| > LARGE_INPUT was seen), read by SAFE
    M,
    K,
    num_row_stride,
    segments,
    rows_per_program,  # a multiple of BLOCK_M
    tiles,  # programs of the plain pass: segments x programs_m
    GROUP_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNKS: tl.constexpr,
    EVEN_L: tl.constexpr,
    VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,  # BLOCK_M x K passes 2^31: 64-bit tile offsets
    SAFE: tl.constexpr,  # 0: the plain form, flags programs with large inputs; 1: redo the flagged programs
    SCAN: tl.constexpr,  # SAFE: flags each program reads (a power of two >= tiles / programs); 1 otherwise
):
    if SAFE:  # as in the forward: a small fixed grid redoes the flagged programs' rows
        programs = tl.num_programs(0)
        tile = tl.arange(0, SCAN) * programs + tl.program_id(0)
        if tl.max(tl.load(flag_ptr + tile, mask=tile < tiles, other=0), axis=0) != 0:
            for j in range(0, SCAN):
                pid = j * programs + tl.program_id(0)
                if pid < tiles:
                    if tl.load(flag_ptr + pid) != 0:
                        _backward_program(pid, grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr, bias_ptr,
                                              bias_partial_ptr, flag_ptr, M, K, num_row_stride, segments,
                                              rows_per_program, GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, VEC,
                                              HAS_BIAS, WIDE, True)
    else:
        _backward_program(tl.program_id(0), grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr, bias_ptr,
                          bias_partial_ptr, flag_ptr, M, K, num_row_stride, segments, rows_per_program, GROUP_LEN,
                          BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, VEC, HAS_BIAS, WIDE, False)


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
    # Grid (G + SHARED_NUMERATOR,): program g < G sums group g's partial rows, its ten sums (S0..S5, T1..T4) side by
    # side, BLOCK_R rows at a time; with a shared numerator, program G sums S0..S5 over every row. A fixed order in
    # each: the sums are reproducible bit for bit.
    group = tl.program_id(0)
    sums = tl.arange(0, 16)
    sum_mask = sums < 10
    total = tl.zeros((BLOCK_R, 16), dtype=tl.float32)
    if group == G:  # only launched with a shared numerator
        rows_total = programs_m * G * CHUNKS
        for start in range(0, rows_total, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            mask = (r < rows_total)[:, None] & (sums < 6)[None, :]
            total += tl.load(partial_ptr + r.to(tl.int64)[:, None] * 10 + sums[None, :], mask=mask, other=0.0)
        tl.store(grad_num_ptr + sums, tl.sum(total, axis=0).to(grad_num_ptr.dtype.element_ty), mask=sums < 6)
    else:
        # The group's rows of the partials: (program p, chunk c) -> p * G * CHUNKS + group * CHUNKS + c.
        group_rows = programs_m * CHUNKS
        for start in range(0, group_rows, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            row = (r // CHUNKS).to(tl.int64) * (G * CHUNKS) + group * CHUNKS + r % CHUNKS
            mask = (r < group_rows)[:, None] & sum_mask[None, :]
            total += tl.load(partial_ptr + row[:, None] * 10 + sums[None, :], mask=mask, other=0.0)
        group_sums = tl.sum(total, axis=0)  # [16]: S0..S5, T1..T4, padding
        b = tl.load(den_ptr + group * 4 + (sums - 6), mask=(sums >= 6) & sum_mask, other=0.0).to(tl.float32)
        sign_b = tl.where(b < 0.0, -1.0, 1.0)
        tl.store(grad_den_ptr + group * 4 + (sums - 6), (-sign_b * group_sums).to(grad_den_ptr.dtype.element_ty),
                 mask=(sums >= 6) & sum_mask)
        if not SHARED_NUMERATOR:
            tl.store(grad_num_ptr + group * 6 + sums, group_sums.to(grad_num_ptr.dtype.element_ty), mask=sums < 6)


def kernels_are_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_group_rational_forward_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class DeviceLimits:
    """What the launch configuration reads of a GPU: from the device at run time (``device_limits``), from the
    target's data sheet in the static report (``kernel_report.TARGETS``).

    Attributes:
        sm_count: SMs (NVIDIA) or compute units (AMD).
        warp_size: 32 on NVIDIA, 64 on AMD Instinct (CDNA).
        registers_per_sm: 32-bit registers of an SM (NVIDIA).
        threads_per_sm: resident threads per SM / CU.
        blocks_per_sm: resident programs per SM / CU at most.
        shared_per_sm: shared memory (LDS) bytes per SM / CU.
        vgprs_per_simd: AMD: VGPRs a SIMD has per lane (512 on CDNA2/3, the accumulation registers included);
            0 on NVIDIA.
    """

    sm_count: int
    warp_size: int = 32
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    vgprs_per_simd: int = 0


def resident_programs(limits: DeviceLimits, registers: int, num_warps: int, shared: int) -> int:
    """Programs of a compiled kernel that one SM (CU) holds at once: the least of what its registers, threads,
    block slots and shared memory allow.

    Args:
        limits: the device's limits.
        registers: registers per thread (VGPRs on AMD), as the compiler allocated them.
        num_warps: warps (wavefronts) per program.
        shared: shared memory (LDS) bytes per program.
    """
    if limits.vgprs_per_simd:
        # CDNA: a CU's 4 SIMDs each hold up to 8 wavefronts, as many as their VGPR file allows (granules of 8); a
        # program's wavefronts are spread over the SIMDs.
        waves_per_simd = min(8, limits.vgprs_per_simd // (math.ceil(max(registers, 1) / 8) * 8))
        by_registers = 4 * waves_per_simd // num_warps
        reserved = 0
    else:
        # NVIDIA: registers are allocated per warp in units of 256; each block reserves 1 KB of shared memory.
        per_warp = math.ceil(max(registers, 1) * limits.warp_size / 256) * 256
        by_registers = (limits.registers_per_sm // per_warp) // num_warps
        reserved = 1024
    by_threads = limits.threads_per_sm // (limits.warp_size * num_warps)
    by_shared = limits.shared_per_sm // (shared + reserved) if shared else limits.blocks_per_sm
    return max(0, min(by_registers, by_threads, limits.blocks_per_sm, by_shared))


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched for one (M, G, L) shape and dtype: grid, tile and compile-time constants.

    Attributes:
        grid: the (flat) grid of the plain pass, ``segments * programs_m`` programs.
        safe_grid: the large-|x| pass's grid: a few programs per SM, whatever the input's size (``_safe_launch``).
        safe_scan: flags each of its programs reads.
        segments: G * chunks, column segments of ``block_l`` columns each, inside one group.
        programs_m: programs along the rows.
        rows_per_program: rows each program walks (backward; the forward's programs own ``block_m`` rows).
        constexprs: the kernel's compile-time arguments (GROUP_LEN, BLOCK_M, BLOCK_L, CHUNKS, EVEN_L, WIDE[, VEC]).
        num_warps: warps per program.
        safe_warps: warps per program of the large-|x| pass.
        num_stages: software-pipelining depth passed to the compiler (1: Triton 3.8 does not pipeline these loops'
            loads at any depth on sm_80 to sm_100, checked with the static report).
    """

    grid: Tuple[int]
    safe_grid: Tuple[int]
    safe_scan: int
    segments: int
    programs_m: int
    rows_per_program: int
    constexprs: dict
    num_warps: int
    safe_warps: int
    num_stages: int = 1


def _segment_shape(length: int, element_size: int) -> Tuple[int, int, int]:
    """(BLOCK_L, CHUNKS, VEC) for groups of ``length`` columns of ``element_size``-byte elements.

    When every group starts on a 16-byte boundary (L x element size a multiple of 16), BLOCK_L is the largest power
    of two (<= 128) dividing L, so segments tile the group exactly with no masked lanes, and VEC is the elements of
    a 16-byte vector. Otherwise no access can be vectorised: VEC = 1 and one masked power of two covers L.
    """
    if length == 0:  # an empty channel axis: nothing to launch, but a valid configuration
        return 1, 0, 1
    if (length * element_size) % 16 == 0:
        block_l, vec = min(_MAX_BLOCK_L, length & -length), 16 // element_size
    else:
        block_l, vec = min(_MAX_BLOCK_L, triton.next_power_of_2(length)), 1
    return block_l, triton.cdiv(length, block_l), vec


def _block_m(block_l: int, elements_per_thread: int, num_warps: int, warp_size: int) -> int:
    """Rows of a tile so that each thread holds ``elements_per_thread`` elements of it."""
    return max(1, (warp_size * num_warps * elements_per_thread) // block_l)


def _elements_per_thread(vec: int, vectors: int) -> int:
    # Unvectorised (VEC = 1) tiles keep a few elements per thread: each costs registers, not bytes in flight.
    return vec * vectors if vec > 1 else _UNALIGNED_ELEMENTS


def _wide(block_m: int, columns: int) -> int:
    """1 when a tile's offsets (up to BLOCK_M x K) or a step of BLOCK_M rows pass int32: the 64-bit specialisation."""
    return int(block_m * columns >= 2**31)


def _safe_launch(tiles: int, limits: DeviceLimits) -> dict:
    """The large-|x| pass over ``tiles`` programs of the plain pass: 4 programs per SM (fewer for a small input),
    each reading ``safe_scan`` (a power of two) flags in one vector. The grid stays fixed up to
    ``_MAX_SAFE_SCAN`` flags per program (540K tiles on 132 SMs: KAT-B act2 forward at a batch of ~1,800), and
    grows by one program per 1024 tiles past that."""
    programs = max(1, min(tiles, limits.sm_count * _SAFE_PROGRAMS_PER_SM), triton.cdiv(tiles, _MAX_SAFE_SCAN))
    return dict(safe_grid=(programs,), safe_scan=triton.next_power_of_2(max(1, triton.cdiv(tiles, programs))))


def forward_launch(rows: int, groups: int, length: int, element_size: int, limits: DeviceLimits) -> Launch:
    """Launch parameters of the forward kernel for an (M, G, L) input of ``element_size``-byte elements on a device
    with ``limits``. Any M, G, L >= 0 (an empty input gives an empty grid, which the launcher does not launch)."""
    block_l, chunks, vec = _segment_shape(length, element_size)
    block_m = _block_m(block_l, _elements_per_thread(vec, _FORWARD_VECTORS), _FORWARD_WARPS, limits.warp_size)
    segments = groups * chunks
    programs_m = triton.cdiv(rows, block_m)
    return Launch(
        grid=(segments * programs_m,), **_safe_launch(segments * programs_m, limits), segments=segments,
        programs_m=programs_m, rows_per_program=block_m,
        constexprs=dict(GROUP_LEN=length, BLOCK_M=block_m, BLOCK_L=block_l, CHUNKS=chunks,
                        EVEN_L=int(length % block_l == 0), WIDE=_wide(block_m, groups * length)),
        num_warps=_FORWARD_WARPS, safe_warps=_SAFE_FORWARD_WARPS,
    )


def backward_launch(rows: int, groups: int, length: int, element_size: int, limits: DeviceLimits,
                    programs_per_sm: int) -> Launch:
    """Launch parameters of the backward kernel.

    Each program walks ``rows_per_program`` rows (a multiple of BLOCK_M) of one segment. Among grids of 1 to
    ``_MAX_WAVES`` whole waves (``limits.sm_count`` SMs x ``programs_per_sm``, the compiled kernel's resident
    programs: ``resident_programs``), the one with the least work on the busiest slot wins (waves x rows per
    program); ties go to the smaller grid (fewer partial sums). The tile (``constexprs``) does not depend on
    ``programs_per_sm``. Any M, G, L >= 0 (an empty input gives an empty grid).
    """
    block_l, chunks, vec = _segment_shape(length, element_size)
    block_m = _block_m(block_l, _elements_per_thread(vec, _BACKWARD_VECTORS), _BACKWARD_WARPS, limits.warp_size)
    segments = groups * chunks
    slots = limits.sm_count * max(1, programs_per_sm)
    row_tiles = triton.cdiv(rows, block_m)
    programs_m, rows_per_program = 0, block_m
    if row_tiles and segments:
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
        grid=(segments * programs_m,), **_safe_launch(segments * programs_m, limits), segments=segments,
        programs_m=programs_m, rows_per_program=rows_per_program,
        constexprs=dict(GROUP_LEN=length, BLOCK_M=block_m, BLOCK_L=block_l, CHUNKS=chunks,
                        EVEN_L=int(length % block_l == 0), VEC=vec, WIDE=_wide(block_m, groups * length)),
        num_warps=_BACKWARD_WARPS, safe_warps=_BACKWARD_WARPS,
    )


def coefficient_grads_launch(groups: int, shared_numerator: bool) -> Tuple[int]:
    """The coefficient-gradient kernel's grid: one program per group, and one for a shared numerator."""
    return (groups + int(shared_numerator),)


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> DeviceLimits:
    """The launch-relevant limits of ``device``, read from it (torch's ROCm build reports AMD GPUs as "cuda"
    devices: their 64-wide wavefronts and VGPR files are taken as such). CPU tensors (the interpreter): a few
    pretend SMs, so the multi-program paths are exercised."""
    if device.type != "cuda":
        return DeviceLimits(sm_count=4)
    props = torch.cuda.get_device_properties(device)
    amd = torch.version.hip is not None
    return DeviceLimits(
        sm_count=props.multi_processor_count,
        warp_size=props.warp_size,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        threads_per_sm=props.max_threads_per_multi_processor,
        shared_per_sm=props.shared_memory_per_multiprocessor,
        vgprs_per_simd=512 if amd else 0,
    )


def backward_register_cap(limits: DeviceLimits, resources: Callable[[Optional[int]], Tuple[int, int, int]]
                          ) -> Tuple[Optional[int], Tuple[int, int, int]]:
    """The register cap (Triton's ``maxnreg``) the plain backward is compiled with on a device, and the compiled
    kernel's (registers, spilled bytes, shared bytes) with it. No cap on AMD or where the kernel needs at most
    ``_BACKWARD_REGISTER_CAP`` registers; the cap where it fits more programs per SM without spilling; else none.

    Args:
        limits: the device's limits.
        resources: compiles the kernel with a cap (or None) and returns its (registers, spilled bytes, shared
            bytes): the launcher reads them from the loaded kernel, the static report from the cubin.
    """
    plain = resources(None)
    if limits.vgprs_per_simd or plain[0] <= _BACKWARD_REGISTER_CAP:
        return None, plain
    capped = resources(_BACKWARD_REGISTER_CAP)
    fits = resident_programs(limits, capped[0], _BACKWARD_WARPS, capped[2]) > \
        resident_programs(limits, plain[0], _BACKWARD_WARPS, plain[2])
    return (_BACKWARD_REGISTER_CAP, capped) if capped[1] == 0 and fits else (None, plain)


_BACKWARD_CONFIG = {}


def _backward_config(x3: torch.Tensor, limits: DeviceLimits, launch: Launch, has_bias: int, args
                     ) -> Tuple[int, dict]:
    """(resident programs per SM, extra compile options) of the backward kernel for this (device, dtype, tile):
    read from the compiled kernel (registers, shared memory, warps) at its first launch and cached, so the grid is
    sized in whole waves of what really fits, whatever the Triton version or GPU. ``args``: a callable giving the
    kernel's runtime arguments (only their types and alignment matter), called on the first launch only."""
    if kernels_are_interpreted():
        return _INTERPRETED_PROGRAMS_PER_SM, {}
    key = (x3.device, x3.dtype, has_bias, tuple(sorted(launch.constexprs.items())))
    config = _BACKWARD_CONFIG.get(key)
    if config is None:
        runtime_args = args()

        def resources(cap):
            compiled = _group_rational_backward_kernel.warmup(
                *runtime_args, grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
                HAS_BIAS=has_bias, SAFE=0, SCAN=1, **launch.constexprs, **({} if cap is None else
                                                                                  {"maxnreg": cap}),
            )
            compiled._init_handles()  # loads the module: n_regs and n_spills are known from here on
            return compiled.n_regs, compiled.n_spills, compiled.metadata.shared

        if has_bias:  # the bias variant (not used on CUDA by the models) is never capped
            cap, (registers, _, shared) = None, resources(None)
        else:
            cap, (registers, _, shared) = backward_register_cap(limits, resources)
        resident = max(1, resident_programs(limits, registers, launch.num_warps, shared))
        config = _BACKWARD_CONFIG[key] = (resident, {} if cap is None else {"maxnreg": cap})
    return config


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
    returns a new tensor of x3's dtype. Two launches: the plain pass over the whole input, then the large-|x| pass
    (a fixed small grid that recomputes only the tiles the first flagged)."""
    rows, groups, length = x3.shape
    out = torch.empty_like(x3)
    if out.numel() == 0:
        return out
    num, num_row_stride, den = _coefficients(numerator, denominator)
    bias_arg, has_bias = _bias_columns(bias, x3)
    launch = forward_launch(rows, groups, length, x3.element_size(), device_limits(x3.device))
    flags = torch.empty(launch.grid[0], dtype=torch.int32, device=x3.device)
    args = (x3, out, num, den, bias_arg, flags, rows, groups * length, num_row_stride, launch.segments, launch.grid[0])
    with _on_device(x3):
        # No host sync between the passes, so CUDA graphs can capture both.
        for safe, grid, warps, scan in ((0, launch.grid, launch.num_warps, 1),
                                        (1, launch.safe_grid, launch.safe_warps, launch.safe_scan)):
            _group_rational_forward_kernel[grid](
                *args, num_warps=warps, num_stages=launch.num_stages, HAS_BIAS=has_bias, SAFE=safe, SCAN=scan,
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
    """Backward on contiguous (M, G, L) views of F(x3 + bias). Three launches: the plain pass, the large-|x| pass
    (a fixed small grid) and the coefficient-gradient reduction (one program per group, one more for a shared
    numerator).

    Returns:
        grad_x (x3's dtype), the gradients of numerator and denominator (their shapes and dtypes) and, with a bias,
        the (G, L) float32 per-column sums of grad_x (before its cast to x3's dtype); None without one.
    """
    rows, groups, length = x3.shape
    cols = groups * length
    grad_x = torch.empty_like(x3)
    bias_arg, has_bias = _bias_columns(bias, x3)
    if x3.numel() == 0:  # no element: every sum is zero
        bias_sums = torch.zeros(groups, length, dtype=torch.float32, device=x3.device) if has_bias else None
        return grad_x, torch.zeros_like(numerator), torch.zeros_like(denominator), bias_sums
    num, num_row_stride, den = _coefficients(numerator, denominator)
    limits = device_limits(x3.device)
    with _on_device(x3):
        launch = backward_launch(rows, groups, length, x3.element_size(), limits, 1)  # the tile only

        def probe_args():
            scratch = torch.empty(16, dtype=torch.float32, device=x3.device)
            flags = torch.empty(16, dtype=torch.int32, device=x3.device)
            return (grad3, x3, grad_x, num, den, scratch, bias_arg, scratch, flags, rows, cols, num_row_stride,
                    launch.segments, launch.rows_per_program * 16, launch.grid[0])

        resident, options = _backward_config(x3, limits, launch, has_bias, probe_args)
        launch = backward_launch(rows, groups, length, x3.element_size(), limits, resident)
        partials = torch.empty(launch.programs_m, launch.segments, COEFFICIENT_SUMS, dtype=torch.float32,
                               device=x3.device)
        bias_partials = torch.empty(launch.programs_m, cols, dtype=torch.float32, device=x3.device) if has_bias \
            else partials
        grad_numerator = torch.empty(numerator.shape, dtype=numerator.dtype, device=x3.device)
        grad_denominator = torch.empty(denominator.shape, dtype=denominator.dtype, device=x3.device)
        flags = torch.empty(launch.grid[0], dtype=torch.int32, device=x3.device)
        args = (grad3, x3, grad_x, num, den, partials, bias_arg, bias_partials, flags, rows, cols, num_row_stride,
                launch.segments, launch.rows_per_program, launch.grid[0])
        for safe, grid, warps, scan in ((0, launch.grid, launch.num_warps, 1),
                                        (1, launch.safe_grid, launch.safe_warps, launch.safe_scan)):
            _group_rational_backward_kernel[grid](
                *args, num_warps=warps, num_stages=launch.num_stages, HAS_BIAS=has_bias, SAFE=safe, SCAN=scan,
                **launch.constexprs, **({} if safe else options),
            )
        _coefficient_grads_kernel[coefficient_grads_launch(groups, num.shape[0] == 1)](
            partials, den, grad_numerator, grad_denominator, launch.programs_m, groups,
            CHUNKS=launch.constexprs["CHUNKS"], SHARED_NUMERATOR=int(num.shape[0] == 1), BLOCK_R=_FINALIZE_ROWS,
            num_warps=4,
        )
    bias_sums = bias_partials.sum(0).view(groups, length) if has_bias else None
    return grad_x, grad_numerator, grad_denominator, bias_sums
