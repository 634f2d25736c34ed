"""Rotary position embeddings (the Hugging Face Llama convention): forward and backward kernels in Triton.

x is (B, H, T, D) with D even, and row t holds position p = offset + t. Channel i < D/2 is paired
with channel i + D/2, and the pair is rotated by the angle p * theta_i, theta_i = base^(-2i / D):

    y_i       = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i)
    y_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)

A rotation's transpose is the rotation by the opposite angle, so the backward is the same kernel with
sin negated (SIGN = -1): dx_i = dy_i cos + dy_{i+D/2} sin, dx_{i+D/2} = dy_{i+D/2} cos - dy_i sin.

Each program takes BLOCK_T positions and HEADS_PER_PROGRAM of the B * H (batch, head) pairs: it computes
the cos and sin of its positions' angles once, then rotates the rows of each of its heads in turn,
in fp32 whatever the storage type. The angle p * theta_i is formed in fp64 and reduced to [-pi, pi]
there, and only then rounded to fp32 for cos and sin: in fp32 the product alone would be off by up to
p * 2^-24 radians (0.5 mrad at position 8192). The cost is a handful of fp64 operations per angle, per
BLOCK_T x D/2 angles of a program, against the HEADS_PER_PROGRAM x BLOCK_T x D elements it moves.

Rows may have any (batch, head, position) strides as long as the channels of a row are adjacent: the
(B, T, H, D) -> (B, H, T, D) transposed views a model makes are read in place, and the output is laid
out as the input is (as PyTorch's elementwise operations do). D/2 need not be a power of two: the
channel range is padded to one with masks.
"""

import math

import torch
import triton
import triton.language as tl

from . import autotune, autotuning, unit_stride_rows

# One warp for one position at a time (decoding: a warp covers up to 64 channel pairs twice over), four
# or eight for blocks of positions. (Compiled for sm_90, one warp over eight positions spilled registers.)
HOPPER_CONFIGS = [triton.Config({"BLOCK_T": block_t, "HEADS_PER_PROGRAM": heads}, num_warps=warps)
                  for block_t, warps in ((1, 1), (8, 4), (8, 8), (32, 4), (32, 8)) for heads in (4, 16)]
# Without autotuning (the interpreter, which cannot time configs, or FASTGPT_TRITON_AUTOTUNE=0): two
# heads per program exercise the loop over heads and its mask when B * H is odd; 16 positions, the mask on T.
SINGLE_CONFIG = triton.Config({"BLOCK_T": 16, "HEADS_PER_PROGRAM": 2}, num_warps=4)


def prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose position block is no longer than the sequence needs and whose tile gives
    each thread between 1 and 16 values of each of x's two halves (more would spill registers: a thread
    also holds their cos, sin and rotated values). If none qualifies, keep the one closest to that.

    fp32 rows never take 8 warps over 32 positions: compiled for sm_90, that spilled 4 to 12 bytes at
    head dims 48, 80 and 128 (ptxas gives a thread of an 8-warp program 64 registers), where 16-bit
    rows, and 4 warps over twice the values, did not.
    """
    args = {**named_args, **kwargs}
    block_t_needed = triton.next_power_of_2(args["seq_len"])
    fits = [c for c in configs if c.kwargs["BLOCK_T"] <= block_t_needed] or \
        [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]

    def values_per_thread(config):
        return config.kwargs["BLOCK_T"] * args["HALF_PADDED"] / (32 * config.num_warps)

    def spills(config):
        return args["X"].dtype == torch.float32 and config.kwargs["BLOCK_T"] == 32 and config.num_warps == 8

    kept = [c for c in fits if 1 <= values_per_thread(c) <= 16 and not spills(c)]
    return kept or [min(fits, key=lambda c: abs(math.log2(values_per_thread(c) / 8)))]


@autotune(HOPPER_CONFIGS if autotuning() else [SINGLE_CONFIG], ["seq_len", "HALF"], prune_configs)
@triton.jit
def _rotary_kernel(
        X, Y, stride_x_batch, stride_x_head, stride_x_pos, stride_y_batch, stride_y_head, stride_y_pos,
        n_heads, n_batch_heads, seq_len, offset,
        LOG2_BASE: tl.constexpr, SIGN: tl.constexpr, HALF: tl.constexpr, HALF_PADDED: tl.constexpr,
        BLOCK_T: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, HALF_PADDED)

    # theta_i = 2^(-2i/D * log2(base)) and the angle p * theta_i in fp64, then reduced by whole turns.
    theta = tl.exp2(i.to(tl.float64) * (-1.0 / HALF) * tl.full([HALF_PADDED], LOG2_BASE, tl.float64))
    angle = (offset + t).to(tl.float64)[:, None] * theta[None, :]
    two_pi = tl.full([1, 1], 6.283185307179586, tl.float64)
    turns = tl.floor(angle / two_pi + 0.5)
    angle = (angle - turns * two_pi).to(tl.float32)
    cos = tl.cos(angle)
    sin = tl.sin(angle) * SIGN

    for j in range(HEADS_PER_PROGRAM):
        pair = tl.program_id(1) * HEADS_PER_PROGRAM + j
        batch = (pair // n_heads).to(tl.int64)
        head = (pair % n_heads).to(tl.int64)
        positions_here = seq_len * (pair < n_batch_heads).to(tl.int32)  # none past the last (batch, head)
        mask = (t[:, None] < positions_here) & (i[None, :] < HALF)
        x_first = X + batch * stride_x_batch + head * stride_x_head + t[:, None].to(tl.int64) * stride_x_pos + i[None, :]
        y_first = Y + batch * stride_y_batch + head * stride_y_head + t[:, None].to(tl.int64) * stride_y_pos + i[None, :]
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_first, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_first + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _rotate(x, offset, base, sign):
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary embeddings take a (B, H, T, D) tensor with D even, got shape {tuple(x.shape)}")
    if base <= 0:
        raise ValueError(f"rotary embeddings need a positive base, got {base}")
    x = unit_stride_rows(x)  # any other strides are read in place
    y = torch.empty_like(x)
    batch, n_heads, seq_len, head_dim = x.shape
    if y.numel() == 0:
        return y
    half = head_dim // 2
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_T"]),  # noqa: E731
                         triton.cdiv(batch * n_heads, meta["HEADS_PER_PROGRAM"]))
    _rotary_kernel[grid](
        x, y, *x.stride()[:3], *y.stride()[:3], n_heads, batch * n_heads, seq_len, offset,
        LOG2_BASE=math.log2(base), SIGN=sign, HALF=half, HALF_PADDED=triton.next_power_of_2(half))
    return y


def forward(x, offset, base):
    """x (B, H, T, D) rotated by the angles of positions offset .. offset + T - 1; x's dtype and layout."""
    return _rotate(x, offset, base, 1.0)


def backward(grad_y, offset, base):
    """The gradient of rotary_forward's input: grad_y rotated by the opposite angles."""
    return _rotate(grad_y, offset, base, -1.0)
