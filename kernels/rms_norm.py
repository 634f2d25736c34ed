"""RMSNorm over the last dimension: forward and backward kernels in Triton.

The math, for one row x of N values, with statistics in fp32 whatever the input dtype:

    rstd = 1 / sqrt(sum(x^2) / N + eps)
    x_hat = x * rstd
    y = x_hat * w                            (w is optional)

Backward, with dy the gradient of y and g = dy * w (g = dy without a weight), means over the row:

    dx = rstd * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat

This is LayerNorm without the mean and the bias, and the kernels are laid out as kernels/layer_norm.py's,
with its tiling, autotuning configs and pruners.
Each forward program normalises ROWS_PER_PROGRAM whole rows held in registers and saves rstd for the
backward. In the backward a fixed number of programs each walk a strided share of the rows, write dx,
and add their rows' dy * x_hat into a partial dw kept in fp32 registers, stored as one row of a
(programs, N) buffer that a single reduction sums: no atomics, so the result is deterministic.
"""

import torch
import triton
import triton.language as tl

from . import adjacent_elements, as_rows, mend_interpreter
from .layer_norm import BACKWARD_PRUNER, FORWARD_PRUNER, _autotune, _backward_programs, _backward_rows, _block_n

mend_interpreter()


@_autotune(FORWARD_PRUNER)
@triton.jit
def _rms_norm_forward_kernel(
        X, W, Y, RSTD, stride_x_row, n_rows, n_cols, eps,
        HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]

    tl.store(Y + rows[:, None].to(tl.int64) * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@_autotune(BACKWARD_PRUNER)
@triton.jit
def _rms_norm_backward_kernel(
        X, W, DY, DX, RSTD, DW_PARTIAL, stride_x_row, stride_dy_row, n_rows, n_cols,
        HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)

    for first_row in range(tl.program_id(0) * ROWS_PER_PROGRAM, n_rows, tl.num_programs(0) * ROWS_PER_PROGRAM):
        rows, mask, x, dy = _backward_rows(X, DY, first_row, cols, stride_x_row, stride_dy_row, n_rows, n_cols,
                                           ROWS_PER_PROGRAM)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)

        x_hat = x * rstd[:, None]  # 0 outside the rows and columns: x loads as 0 there
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        mean_g_x_hat = tl.sum(g * x_hat, 1) / n_cols
        dx = (g - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None].to(tl.int64) * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if HAS_WEIGHT:
            dw += tl.sum(dy * x_hat, 0)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + tl.program_id(0) * n_cols + cols, dw, mask=cols < n_cols)


def forward(x, weight, eps, out_dtype=None):
    """y (x's shape, in out_dtype, default x's) and the per-row rstd (x.shape[:-1], fp32) of RMSNorm over
    x's last dim."""
    x2d, weight = as_rows(x), adjacent_elements(weight)
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS_PER_PROGRAM"]),)  # noqa: E731
    _rms_norm_forward_kernel[grid](
        x2d, weight, y, rstd, x2d.stride(0), n_rows, n_cols, eps,
        HAS_WEIGHT=weight is not None, BLOCK_N=_block_n(n_cols, "RMSNorm"))
    return y.view(x.shape), rstd.view(x.shape[:-1])


def backward(grad_y, x, weight, rstd):
    """(dx in x's dtype, dweight in fp32) of RMSNorm; dweight is an empty tensor without a weight."""
    x2d, weight = as_rows(x), adjacent_elements(weight)
    n_rows, n_cols = x2d.shape
    grad_y = as_rows(grad_y)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    n_programs = _backward_programs(x.device, n_rows)
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if weight is not None \
        else None
    _rms_norm_backward_kernel[(n_programs,)](
        x2d, weight, grad_y, dx, rstd.contiguous(), dw_partial, x2d.stride(0), grad_y.stride(0), n_rows, n_cols,
        HAS_WEIGHT=weight is not None, BLOCK_N=_block_n(n_cols, "RMSNorm"))
    dw = dw_partial.sum(0) if weight is not None else torch.empty(0, dtype=torch.float32, device=x.device)
    return dx.view(x.shape), dw
