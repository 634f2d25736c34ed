"""LayerNorm over the last dimension: forward and backward kernels in Triton.

The math, for one row x of N values, with statistics in fp32 whatever the input dtype:

    mean = sum(x) / N,    var = sum((x - mean)^2) / N,    rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    y = x_hat * w + b                       (w and b are optional)

Backward, with dy the gradient of y and g = dy * w (g = dy without a weight), means over the row:

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat,    db = sum over rows of dy

Forward: each program normalises ROWS_PER_PROGRAM whole rows held in registers (several rows when
rows are short, so that every program moves enough bytes to keep the memory system busy) and saves
mean and rstd for the backward.

Backward: a fixed number of programs each walk a strided share of the rows, write dx, and add their
rows' dy * x_hat and dy into partial dw and db kept in fp32 registers. Each program stores its partial
sums as one row of a (programs, N) buffer, and a single reduction over that buffer gives dw and db:
no atomics, so the result is deterministic.
"""

import torch
import triton
import triton.language as tl

from . import adjacent_elements, as_rows, autotune, autotuning, interpreting, mend_interpreter

mend_interpreter()

MAX_COLUMNS = 65536  # a row is held in registers; longer rows would spill beyond use
BACKWARD_PROGRAMS_PER_SM = 2  # enough resident programs to hide memory latency on the GPU
INTERPRETER_BACKWARD_PROGRAMS = 4  # a few programs still exercise the strided row loop


HOPPER_CONFIGS = [triton.Config({"ROWS_PER_PROGRAM": rows}, num_warps=warps)
                  for rows in (1, 2, 4, 8) for warps in (2, 4, 8, 16)]
# Without autotuning (the interpreter, or FASTGPT_TRITON_AUTOTUNE=0): several rows per program, which
# also makes the interpreter faster.
SINGLE_CONFIG = triton.Config({"ROWS_PER_PROGRAM": 4}, num_warps=4)


class ConfigPruner:
    """Keep the configs whose row tile gives each thread between 4 and `max_values` fp32 values.

    Fewer than 4 values per thread leaves threads idle and loads narrower than 16 bytes. More than
    `max_values` spill registers to local memory: the backward holds more at once than the forward
    (x, dy, x_hat and dy * w, then dx, besides its dw and db sums), so its limit is half the
    forward's, and it never runs on 16 warps. The limits were fitted to sm_90 compiles (the backward
    spilled at 64 values per thread with rows of 4096, and at 32 on 16 warps, never at 32 on fewer);
    tests/test_triton_kernels.py compiles every config they keep and checks that none spills. If none
    qualifies (very long or very short rows), keep the one with the fewest values per thread.
    """

    def __init__(self, max_values, max_warps):
        self.max_values = max_values
        self.max_warps = max_warps

    def __call__(self, configs, named_args, **kwargs):
        block_n = {**named_args, **kwargs}["BLOCK_N"]

        def values_per_thread(config):
            return config.kwargs["ROWS_PER_PROGRAM"] * block_n / (32 * config.num_warps)

        kept = [c for c in configs if 4 <= values_per_thread(c) <= self.max_values and c.num_warps <= self.max_warps]
        return kept or [min(configs, key=values_per_thread)]


FORWARD_PRUNER = ConfigPruner(max_values=64, max_warps=16)
# 16 warps leave a thread 128 registers (65536 per multiprocessor over 512 threads): the backward's
# tiles and sums spilled there.
BACKWARD_PRUNER = ConfigPruner(max_values=32, max_warps=8)


def _autotune(pruner):
    return autotune(HOPPER_CONFIGS if autotuning() else [SINGLE_CONFIG], ["n_cols"], pruner)


@_autotune(FORWARD_PRUNER)
@triton.jit
def _layer_norm_forward_kernel(
        X, W, B, Y, MEAN, RSTD, stride_x_row, n_rows, n_cols, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    mean = tl.sum(x, 1) / n_cols
    x_centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(x_centered * x_centered, 1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = x_centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]

    tl.store(Y + rows[:, None].to(tl.int64) * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < n_rows)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _backward_rows(X, DY, first_row, cols, stride_x_row, stride_dy_row, n_rows, n_cols,
                   ROWS_PER_PROGRAM: tl.constexpr):
    """The rows a backward program takes next: their indices, the mask of what lies inside the
    tensor, and x and dy in fp32 (0 outside it). Shared with kernels/rms_norm.py."""
    rows = first_row + tl.arange(0, ROWS_PER_PROGRAM)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x_row + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None].to(tl.int64) * stride_dy_row + cols[None, :], mask=mask, other=0.0)
    return rows, mask, x.to(tl.float32), dy.to(tl.float32)


@_autotune(BACKWARD_PRUNER)
@triton.jit
def _layer_norm_backward_kernel(
        X, W, DY, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, stride_x_row, stride_dy_row, n_rows, n_cols,
        HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    for first_row in range(tl.program_id(0) * ROWS_PER_PROGRAM, n_rows, tl.num_programs(0) * ROWS_PER_PROGRAM):
        rows, mask, x, dy = _backward_rows(X, DY, first_row, cols, stride_x_row, stride_dy_row, n_rows, n_cols,
                                           ROWS_PER_PROGRAM)
        mean = tl.load(MEAN + rows, mask=rows < n_rows, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)

        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        mean_g = tl.sum(g, 1) / n_cols
        mean_g_x_hat = tl.sum(g * x_hat, 1) / n_cols
        dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None].to(tl.int64) * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        dw += tl.sum(dy * x_hat, 0)
        db += tl.sum(dy, 0)

    tl.store(DW_PARTIAL + tl.program_id(0) * n_cols + cols, dw, mask=cols < n_cols)
    tl.store(DB_PARTIAL + tl.program_id(0) * n_cols + cols, db, mask=cols < n_cols)


def _block_n(n_cols, op="LayerNorm"):
    """The columns a program's tile spans: the row's length rounded up to a power of two."""
    if n_cols > MAX_COLUMNS:
        raise ValueError(f"the Triton {op} kernel takes rows of up to {MAX_COLUMNS} values, got {n_cols}")
    return triton.next_power_of_2(n_cols)


def forward(x, weight, bias, eps, out_dtype):
    """y (x's shape, in out_dtype, default x's) and the per-row mean and rstd (x.shape[:-1], fp32) of
    LayerNorm over x's last dim."""
    x2d, weight, bias = as_rows(x), adjacent_elements(weight), adjacent_elements(bias)
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS_PER_PROGRAM"]),)  # noqa: E731
    _layer_norm_forward_kernel[grid](
        x2d, weight, bias, y, mean, rstd, x2d.stride(0), n_rows, n_cols, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=_block_n(n_cols))
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _backward_programs(device, n_rows):
    if interpreting():
        per_device = INTERPRETER_BACKWARD_PROGRAMS
    else:
        per_device = BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(per_device, n_rows))


def backward(grad_y, x, weight, mean, rstd):
    """(dx, dweight, dbias) of LayerNorm: dx in x's dtype whatever grad_y's (the forward's output may
    have been in another), dweight and dbias in fp32 (the op's autograd formula casts them to the
    parameters' dtypes, and drops those of absent parameters). grad_y is read through its row stride."""
    x2d, weight = as_rows(x), adjacent_elements(weight)
    n_rows, n_cols = x2d.shape
    grad_y = as_rows(grad_y)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    n_programs = _backward_programs(x.device, n_rows)
    dw_partial, db_partial = (torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
                              for _ in range(2))
    _layer_norm_backward_kernel[(n_programs,)](
        x2d, weight, grad_y, dx, mean, rstd, dw_partial, db_partial, x2d.stride(0), grad_y.stride(0),
        n_rows, n_cols, HAS_WEIGHT=weight is not None, BLOCK_N=_block_n(n_cols))
    return dx.view(x.shape), dw_partial.sum(0), db_partial.sum(0)
