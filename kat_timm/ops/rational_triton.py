"""Triton kernels of the grouped rational function (CUDA; CPU tensors through ``TRITON_INTERPRET=1``).

Layout: the canonical (M, G, L) array (``layout.py``) seen as an (M, K) matrix, K = G * L; column k belongs to
group k // L. A program owns a [BLOCK_M, BLOCK_K] tile and loads the coefficients of its BLOCK_K columns once, as
vectors, so no element gathers coefficients.

Forward: one pass, reads x and writes y in x's dtype, math in fp32 registers.

Backward: writes dx and the ten coefficient sums per group (S_i = sum g x^i / Q, T_j = sum g P / Q^2 |x|^j). Each
program walks a fixed run of rows of its column tile, accumulating in fp32 registers, then reduces its tile once:
- if its tile lies inside one group (L % BLOCK_K == 0), to ten scalars -> partials[program_m, tile_k, 10];
- otherwise per column -> partials[program_m, k, 10].
The second stage (``partials.sum(0)`` then a sum within groups) runs in PyTorch. The grid and the reduction
order depend only on the shape and the device, so gradients are bitwise reproducible; there are no atomics.

``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is imported: set it before importing kat_timm.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["rational_forward_triton", "rational_backward_triton", "kernels_are_interpreted"]

_FORWARD_TILE = 4096
_BACKWARD_TILE = 1024


@triton.jit
def _load_group_coefficients(num_ptr, den_ptr, cols, col_mask, L, num_row_stride):
    """Coefficients of the groups of `cols` (vectors of BLOCK_K), as fp32; the b's as |b|."""
    g = cols // L
    a_base = num_ptr + g * num_row_stride
    b_base = den_ptr + g * 4
    a0 = tl.load(a_base + 0, mask=col_mask, other=0.0).to(tl.float32)
    a1 = tl.load(a_base + 1, mask=col_mask, other=0.0).to(tl.float32)
    a2 = tl.load(a_base + 2, mask=col_mask, other=0.0).to(tl.float32)
    a3 = tl.load(a_base + 3, mask=col_mask, other=0.0).to(tl.float32)
    a4 = tl.load(a_base + 4, mask=col_mask, other=0.0).to(tl.float32)
    a5 = tl.load(a_base + 5, mask=col_mask, other=0.0).to(tl.float32)
    b1 = tl.abs(tl.load(b_base + 0, mask=col_mask, other=0.0).to(tl.float32))
    b2 = tl.abs(tl.load(b_base + 1, mask=col_mask, other=0.0).to(tl.float32))
    b3 = tl.abs(tl.load(b_base + 2, mask=col_mask, other=0.0).to(tl.float32))
    b4 = tl.abs(tl.load(b_base + 3, mask=col_mask, other=0.0).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, b1, b2, b3, b4


@triton.jit
def _group_rational_forward_kernel(
    x_ptr,  # (M, K) contiguous, x's dtype
    y_ptr,  # (M, K) contiguous, x's dtype
    num_ptr,  # (G, 6) rows, row stride num_row_stride (0: one shared row)
    den_ptr,  # (G, 4) contiguous
    M,
    K,
    L,
    num_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _load_group_coefficients(
        num_ptr, den_ptr, cols, col_mask, L, num_row_stride
    )
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = (rows < M)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    p = a0[None, :] + x * (a1[None, :] + x * (a2[None, :] + x * (a3[None, :] + x * (a4[None, :] + x * a5[None, :]))))
    q = 1.0 + ax * (b1[None, :] + ax * (b2[None, :] + ax * (b3[None, :] + ax * b4[None, :])))
    tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_rational_backward_kernel(
    grad_ptr,  # (M, K) contiguous, x's dtype
    x_ptr,  # (M, K) contiguous
    dx_ptr,  # (M, K) contiguous, x's dtype
    num_ptr,  # (G, 6) rows, row stride num_row_stride
    den_ptr,  # (G, 4)
    partial_ptr,  # fp32: (P_M, K // BLOCK_K, 10) if TILE_IN_ONE_GROUP else (P_M, K, 10)
    M,
    K,
    L,
    num_row_stride,
    rows_per_program,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_IN_ONE_GROUP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _load_group_coefficients(
        num_ptr, den_ptr, cols, col_mask, L, num_row_stride
    )
    a0, a1, a2, a3, a4, a5 = a0[None, :], a1[None, :], a2[None, :], a3[None, :], a4[None, :], a5[None, :]
    b1, b2, b3, b4 = b1[None, :], b2[None, :], b3[None, :], b4[None, :]

    s0 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s4 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s5 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    t4 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)

    row_start = pid_m * rows_per_program
    for step in range(0, rows_per_program, BLOCK_M):
        rows = row_start + step + tl.arange(0, BLOCK_M)
        offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
        mask = (rows < M)[:, None] & col_mask[None, :]
        # Masked lanes read x = 0, g = 0, so they add exactly 0 to every sum.
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        sx = tl.where(x < 0.0, -1.0, 1.0)
        p = a0 + x * (a1 + x * (a2 + x * (a3 + x * (a4 + x * a5))))
        dp = a1 + x * (2.0 * a2 + x * (3.0 * a3 + x * (4.0 * a4 + x * 5.0 * a5)))
        q = 1.0 + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)))
        dq = b1 + ax * (2.0 * b2 + ax * (3.0 * b3 + ax * 4.0 * b4))
        rq = 1.0 / q
        f = p * rq
        tl.store(dx_ptr + offsets, (g * (dp - f * sx * dq) * rq).to(dx_ptr.dtype.element_ty), mask=mask)
        gq = g * rq
        x2 = x * x
        x4 = x2 * x2
        s0 += gq
        s1 += gq * x
        s2 += gq * x2
        s3 += gq * x2 * x
        s4 += gq * x4
        s5 += gq * x4 * x
        gf = gq * f
        t1 += gf * ax
        t2 += gf * x2
        t3 += gf * x2 * ax
        t4 += gf * x4

    if TILE_IN_ONE_GROUP:
        base = partial_ptr + (pid_m * tl.num_programs(1) + pid_k) * 10
        tl.store(base + 0, tl.sum(tl.sum(s0, axis=1), axis=0))
        tl.store(base + 1, tl.sum(tl.sum(s1, axis=1), axis=0))
        tl.store(base + 2, tl.sum(tl.sum(s2, axis=1), axis=0))
        tl.store(base + 3, tl.sum(tl.sum(s3, axis=1), axis=0))
        tl.store(base + 4, tl.sum(tl.sum(s4, axis=1), axis=0))
        tl.store(base + 5, tl.sum(tl.sum(s5, axis=1), axis=0))
        tl.store(base + 6, tl.sum(tl.sum(t1, axis=1), axis=0))
        tl.store(base + 7, tl.sum(tl.sum(t2, axis=1), axis=0))
        tl.store(base + 8, tl.sum(tl.sum(t3, axis=1), axis=0))
        tl.store(base + 9, tl.sum(tl.sum(t4, axis=1), axis=0))
    else:
        base = partial_ptr + (pid_m.to(tl.int64) * K + cols) * 10
        tl.store(base + 0, tl.sum(s0, axis=0), mask=col_mask)
        tl.store(base + 1, tl.sum(s1, axis=0), mask=col_mask)
        tl.store(base + 2, tl.sum(s2, axis=0), mask=col_mask)
        tl.store(base + 3, tl.sum(s3, axis=0), mask=col_mask)
        tl.store(base + 4, tl.sum(s4, axis=0), mask=col_mask)
        tl.store(base + 5, tl.sum(s5, axis=0), mask=col_mask)
        tl.store(base + 6, tl.sum(t1, axis=0), mask=col_mask)
        tl.store(base + 7, tl.sum(t2, axis=0), mask=col_mask)
        tl.store(base + 8, tl.sum(t3, axis=0), mask=col_mask)
        tl.store(base + 9, tl.sum(t4, axis=0), mask=col_mask)


def kernels_are_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_group_rational_forward_kernel, triton.runtime.JITFunction)


def _block_k(total_cols: int) -> int:
    """Column tile: the largest power of two (<= 256) dividing K, so tiles are unmasked and, when L allows it,
    inside one group; for awkward K (odd, prime) a masked power of two."""
    block = 1
    while block < 256 and total_cols % (block * 2) == 0:
        block *= 2
    if block < 16:
        block = min(256, triton.next_power_of_2(total_cols))
    return block


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _coefficients(numerator: torch.Tensor, denominator: torch.Tensor):
    num = numerator.detach().contiguous()
    den = denominator.detach().contiguous()
    return num, (0 if num.shape[0] == 1 else 6), den


def rational_forward_triton(x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Forward on a contiguous (M, G, L) view; returns a new tensor of x3's dtype."""
    rows, groups, length = x3.shape
    cols = groups * length
    out = torch.empty_like(x3)
    num, num_row_stride, den = _coefficients(numerator, denominator)
    block_k = _block_k(cols)
    block_m = max(1, _FORWARD_TILE // block_k)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
    _group_rational_forward_kernel[grid](
        x3, out, num, den, rows, cols, length, num_row_stride, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8
    )
    return out


def rational_backward_triton(
    grad3: torch.Tensor, x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward on contiguous (M, G, L) views: grad_x and the (G, 10) fp32 coefficient sums."""
    rows, groups, length = x3.shape
    cols = groups * length
    grad_x = torch.empty_like(x3)
    num, num_row_stride, den = _coefficients(numerator, denominator)
    block_k = _block_k(cols)
    block_m = max(1, _BACKWARD_TILE // block_k)
    col_tiles = triton.cdiv(cols, block_k)
    programs_m = max(1, min(triton.cdiv(rows, block_m), _target_programs(x3.device) // col_tiles))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs_m), block_m) * block_m
    programs_m = triton.cdiv(rows, rows_per_program)
    tile_in_one_group = length % block_k == 0
    partial_cols = col_tiles if tile_in_one_group else cols
    partials = torch.empty(programs_m, partial_cols, 10, dtype=torch.float32, device=x3.device)
    _group_rational_backward_kernel[(programs_m, col_tiles)](
        grad3, x3, grad_x, num, den, partials, rows, cols, length, num_row_stride, rows_per_program,
        BLOCK_M=block_m, BLOCK_K=block_k, TILE_IN_ONE_GROUP=int(tile_in_one_group), num_warps=4,
    )
    sums = partials.sum(0).view(groups, partial_cols // groups, 10).sum(1)
    return grad_x, sums
