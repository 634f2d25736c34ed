"""ReLU squared, the MLP activation of modded-nanogpt's recipe: forward and backward kernels in Triton.

Elementwise, in fp32 whatever the storage dtype, with r = max(x, 0):

    y = r^2,   dx = 2 r dy

PyTorch runs `F.relu(x).square()` as two passes over memory forward and three backward (the square's
gradient, then the ReLU's); here each direction is one pass. The tensors are read as flat contiguous
arrays, BLOCK elements per program.
"""

import torch
import triton
import triton.language as tl

# Elements per program: 4 warps of 32 threads, 8 values per thread.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _program_relu(X, n, BLOCK: tl.constexpr):
    """This program's offsets, their mask, and r = relu(x) there in fp32 (NaN stays NaN, as in PyTorch)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    return offsets, mask, tl.where(x < 0.0, 0.0, x)


@triton.jit
def _relu_squared_forward_kernel(X, Y, n, BLOCK: tl.constexpr):
    offsets, mask, r = _program_relu(X, n, BLOCK)
    tl.store(Y + offsets, (r * r).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu_squared_backward_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offsets, mask, r = _program_relu(X, n, BLOCK)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, (2.0 * r * dy).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, *tensors):
    """Run `kernel` over the flat elements of `tensors`, contiguous ones; the last is the output."""
    n = tensors[-1].numel()
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return tensors[-1]


def forward(x):
    """relu(x)^2, contiguous in x's dtype."""
    x = x.contiguous()
    return _launch(_relu_squared_forward_kernel, x, torch.empty_like(x))


def backward(grad_y, x):
    """2 relu(x) grad_y, contiguous in x's dtype."""
    x = x.contiguous()
    return _launch(_relu_squared_backward_kernel, grad_y.contiguous(), x, torch.empty_like(x))
