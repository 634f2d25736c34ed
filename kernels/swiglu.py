"""SwiGLU, the MLP activation of Llama's blocks: forward and backward kernels in Triton.

x = [a, b] holds the gate a and the up projection b side by side in its last dimension (..., 2N), as
one matrix product of the model computes them. For each row and each column j < N, in fp32 whatever
the storage dtype:

    s = sigmoid(a_j),   y_j = silu(a_j) b_j = a_j s b_j                                   (..., N)
    da_j = dy_j b_j s (1 + a_j (1 - s)),   db_j = dy_j a_j s                              (..., 2N) together

PyTorch runs `F.silu(a) * b` as two passes over memory forward and, with the gradient of the split
into a and b, four backward. Here each direction is one pass: every input element is read once and
every output element written once, and the backward writes da and db side by side, the gradient of
the one matrix product's output, so nothing concatenates them.

A program takes BLOCK columns of one row: the rows on the grid's first axis (which holds up to 2^31 - 1
programs) and the blocks of columns on its second. The rows of x may lie any distance apart, as long as
the columns of a row are adjacent (a row of a larger tensor is read in place).
"""

import torch
import triton
import triton.language as tl

from . import as_rows

# Columns per program: 4 warps of 32 threads, 8 values of each half per thread.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _program_columns(X, stride_x_row, n_cols, BLOCK: tl.constexpr):
    """This program's row, its columns and their mask, and the gate a and up b of those columns in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = X + row * stride_x_row + cols
    a = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gate + n_cols, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, a, b


@triton.jit
def _swiglu_forward_kernel(X, Y, stride_x_row, n_cols, BLOCK: tl.constexpr):
    row, cols, mask, a, b = _program_columns(X, stride_x_row, n_cols, BLOCK)

    y = a * tl.sigmoid(a) * b

    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, X, DX, stride_dy_row, stride_x_row, n_cols, BLOCK: tl.constexpr):
    row, cols, mask, a, b = _program_columns(X, stride_x_row, n_cols, BLOCK)
    dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)

    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s

    dgate = DX + row * (2 * n_cols) + cols
    tl.store(dgate, da.to(DX.dtype.element_ty), mask=mask)
    tl.store(dgate + n_cols, db.to(DX.dtype.element_ty), mask=mask)


def _grid(n_rows, n_cols):
    return n_rows, triton.cdiv(n_cols, BLOCK)


def forward(x):
    """y = silu(a) * b, (..., N) contiguous in x's dtype, for x = [a, b] (..., 2N)."""
    x2d = as_rows(x)
    n_rows, n_cols = x2d.shape[0], x2d.shape[1] // 2
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if y.numel():
        _swiglu_forward_kernel[_grid(n_rows, n_cols)](x2d, y, x2d.stride(0), n_cols, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y.view(*x.shape[:-1], n_cols)


def backward(grad_y, x):
    """[da, db], x's shape, contiguous in x's dtype."""
    x2d, dy2d = as_rows(x), as_rows(grad_y)
    n_rows, n_cols = dy2d.shape
    dx = torch.empty((n_rows, 2 * n_cols), dtype=x.dtype, device=x.device)
    if dx.numel():
        _swiglu_backward_kernel[_grid(n_rows, n_cols)](dy2d, x2d, dx, dy2d.stride(0), x2d.stride(0), n_cols,
                                                       BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx.view(x.shape)
