"""Rotary position embeddings (Hugging Face Llama's convention): the op, its contract and its reference.

x is (B, H, T, D) with D even, and row t holds position p = offset + t. Channel i < D/2 is paired
with channel i + D/2, and the pair is rotated by the angle p * theta_i, theta_i = base^(-2i / D):

    y_i       = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i)
    y_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)

A rotation's transpose is the rotation by the opposite angle: the backward rotates the gradient
back. Queries and keys rotated so have dot products that depend only on their positions' difference,
which is what lets a model with rotary positions slide its window over a cached context.
"""

import torch

from fastgpt.ops.contract import define_op, require_floating, statistics_dtype
from fastgpt.ops.dispatch import register, run


def rotary(x, *, offset=0, base=10000.0, backend=None):
    """x (B, H, T, D), D even, rotated as positions offset .. offset + T - 1; differentiable in x."""
    require_floating("rotary", x=x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary expects a (B, H, T, D) tensor with D even, got {tuple(x.shape)}")
    if not base > 0:
        raise ValueError(f"rotary: base must be positive, got {base}")
    return run(ROTARY, x.device, backend)(x, int(offset), float(base))


def angles(positions, head_dim, base, device):
    """cos and sin of p * theta_i for each position p (rows) and pair i (columns), computed in fp64."""
    inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angle = positions.to(torch.float64)[:, None] * inverse_frequencies[None, :]
    return angle.cos(), angle.sin()


def reference(x, offset, base):
    """The rotation spelled out, in fp32 at least."""
    t, d = x.shape[-2], x.shape[-1]
    cos, sin = angles(torch.arange(offset, offset + t, device=x.device), d, base, x.device)
    compute_dtype = statistics_dtype(x.dtype)
    cos, sin, xc = cos.to(compute_dtype), sin.to(compute_dtype), x.to(compute_dtype)
    first, second = xc[..., : d // 2], xc[..., d // 2:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)


# PyTorch has no built-in rotary embedding: its yardstick is the reference, plain PyTorch.
builtin = reference


# ---- the kernels' contract ----

def result(output):
    return output


def laid_out_like(x):
    """The kernels' output layout: the input's, once the channels of a row are adjacent."""
    return torch.empty_like(x if x.stride(-1) == 1 else x.contiguous())


def fake_forward(x, offset, base):
    return laid_out_like(x)


def fake_backward(grad_y, offset, base):
    return laid_out_like(grad_y)


def setup_context(ctx, inputs, output):
    _x, ctx.offset, ctx.base = inputs


def backward(ctx, backward_kernel, grad_y):
    return backward_kernel(grad_y, ctx.offset, ctx.base), None, None


def samples(device, dtype):
    """(x, offset, base): T=1, odd T, head dims 48, 80 and 128, offsets (a cached context), another base,
    and the (B, T, H, D) -> (B, H, T, D) views a model makes."""
    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    yield tensor(1, 1, 1, 8), 0, 10000.0
    yield tensor(2, 3, 17, 48), 0, 10000.0
    yield tensor(1, 2, 5, 80), 123, 10000.0
    yield tensor(1, 2, 33, 128), 7, 500000.0
    yield tensor(2, 9, 3, 16).transpose(1, 2), 4, 10000.0


ROTARY = register(define_op(
    __name__,
    # The output is laid out as the input is (see laid_out_like).
    forward_schema="(Tensor x, int offset, float base) -> Tensor",
    backward_schema="(Tensor grad_y, int offset, float base) -> Tensor",
))
