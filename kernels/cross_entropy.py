"""Cross-entropy of each row of logits against its target: forward and backward kernels in Triton.

The math, for one row x of V logits and its target t, in fp32 whatever the logits' dtype:

    lse = m + log(sum_j exp(x_j - m)),   m = max_j x_j
    loss = lse - x_t
    dx_j = g * (exp(x_j - lse) - [j = t])        (g: the gradient of the row's loss)

One program per row, walking it in blocks of BLOCK_V logits. The forward keeps a running max and a
running sum of exponentials taken against it; when a block raises the max, the sum so far is
rescaled by exp(old max - new max) (the online softmax of flash attention), so a row of any width is
read once and nothing of V's size is written. Blocks whose logits are all -inf so far (masked classes)
add nothing to the sum. The backward reads the row once more and writes dx.

A target outside [0, V) reads nothing and makes its row's loss and gradients NaN, so the mistake
shows in the loss. The C++ kernels refuse such targets with an error; here that check would make the
host wait for the GPU at every call, so it is left to the values (PyTorch's CUDA loss likewise only
asserts on the device).
"""

import torch
import triton
import triton.language as tl

from . import as_rows, mend_interpreter

mend_interpreter()  # the loops over a row's blocks


# Logits per block: a whole row up to this width, else blocks of it.
MAX_BLOCK_V = 4096


@triton.jit
def _cross_entropy_forward_kernel(LOGITS, TARGETS, LOSS, LSE, stride_row, n_cols, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_row
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        # Exponentials are taken against 0 while every logit so far is -inf (masked classes), as
        # -inf - -inf would be NaN; the sum so far is then 0 whatever it is rescaled by.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(TARGETS + row)
    x_target = tl.load(x_row + target, mask=(target >= 0) & (target < n_cols), other=float("nan"))
    tl.store(LOSS + row, lse - x_target.to(tl.float32))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(GRAD_LOSS, LOGITS, TARGETS, LSE, DLOGITS, stride_row, stride_grad, n_cols,
                                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(GRAD_LOSS + row * stride_grad).to(tl.float32)
    lse = tl.load(LSE + row)
    target = tl.load(TARGETS + row)
    g = tl.where((target >= 0) & (target < n_cols), g, float("nan"))
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        dx = g * (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0))
        tl.store(DLOGITS + row * n_cols + cols, dx.to(DLOGITS.dtype.element_ty), mask=mask)


def block_v(n_cols):
    return min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_V)


def num_warps(block):
    """Warps per program: one per 512 logits of a block, 1 to 8, so that a thread holds at most 16
    (blocks are at most MAX_BLOCK_V = 4096 wide)."""
    return max(1, min(8, block // 512))


def forward(logits, targets):
    """(loss, lse) of each row of logits (N, V) against targets (N,), both (N,) fp32."""
    logits = as_rows(logits)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if n_rows:
        block = block_v(n_cols)
        _cross_entropy_forward_kernel[(n_rows,)](logits, targets.contiguous(), loss, lse, logits.stride(0), n_cols,
                                                 BLOCK_V=block, num_warps=num_warps(block))
    return loss, lse


def backward(grad_loss, logits, targets, lse):
    """The gradient of the logits (N, V), contiguous in their dtype, for grad_loss (N,) of the rows' losses."""
    logits = as_rows(logits)
    n_rows, n_cols = logits.shape
    dlogits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows:
        block = block_v(n_cols)
        _cross_entropy_backward_kernel[(n_rows,)](grad_loss, logits, targets.contiguous(), lse.contiguous(), dlogits,
                                                  logits.stride(0), grad_loss.stride(0), n_cols,
                                                  BLOCK_V=block, num_warps=num_warps(block))
    return dlogits
