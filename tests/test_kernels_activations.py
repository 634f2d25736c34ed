"""The MLP activation kernels (csrc/activations.cpp: ReLU^2 and SwiGLU) against plain PyTorch and float64.

The kernels are called as the ops `torch.ops.fastgpt.cpp_relu_squared_forward` / `_backward` and
`cpp_swiglu_forward` / `_backward`, and held to `relu_squared` and `swiglu` below run in the same dtype
and in float64, outputs and gradients, on rows of awkward widths, non-contiguous inputs, and values
far into both tails.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import CPP_DTYPES, CPP_UNAVAILABLE, check_against_references, dtype_id

pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=f"C++ extension unavailable: {CPP_UNAVAILABLE}")

WIDTHS = [1, 7, 48, 80, 768, 1000]
ROWS = 37  # 37 x 1000 values: split over threads


def relu_squared(x):
    """relu(x)^2."""
    return F.relu(x).square()


def swiglu(x):
    """silu(gate) * up for x = [gate, up] along the last dimension (..., 2N) -> (..., N)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


OPS = {
    "relu_squared": (relu_squared, torch.ops.fastgpt.cpp_relu_squared_forward,
                     torch.ops.fastgpt.cpp_relu_squared_backward),
    "swiglu": (swiglu, torch.ops.fastgpt.cpp_swiglu_forward, torch.ops.fastgpt.cpp_swiglu_backward),
} if CPP_UNAVAILABLE is None else {}


def check(name, x, grad_y):
    reference, forward, backward = OPS[name]
    y = forward(x)
    dx = backward(grad_y, x)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.is_contiguous() and dx.is_contiguous()
    check_against_references(f"cpp {name} {dtype_id(x.dtype)} {tuple(x.shape)}", [y, dx], reference, [x], grad_y,
                             ["y", "dx"])


def output_shape(name, shape):
    return shape if name == "relu_squared" else (*shape[:-1], shape[-1] // 2)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["relu_squared", "swiglu"])
def test_matches_reference_and_float64(name, dtype, width):
    # SwiGLU's rows hold the gate and up halves of `width` values each.
    shape = (ROWS, width) if name == "relu_squared" else (ROWS, 2 * width)
    x = 3 * torch.randn(shape, dtype=dtype)  # over the bend of SiLU, into both tails
    check(name, x, torch.randn(output_shape(name, shape), dtype=dtype))


@pytest.mark.parametrize("name", ["relu_squared", "swiglu"])
def test_non_contiguous_inputs_and_batched_shapes(name):
    x = torch.randn(96, 2, 5, 3).permute(2, 3, 1, 0)  # (5, 3, 2, 96): no two dims in memory order
    assert not x.is_contiguous()
    grad_y = torch.randn(output_shape(name, (5, 3, 2, 96))[::-1]).permute(3, 2, 1, 0)
    check(name, x, grad_y)
    x = torch.randn(4, 130)[:, 1:129]  # the (B, T, 2N) rows of a larger tensor
    check(name, x, torch.randn(output_shape(name, (4, 128))))


@pytest.mark.parametrize("name", ["relu_squared", "swiglu"])
def test_extreme_values(name):
    """Zeros, the far tails (exp(-x) overflowing to infinity, or to 0), and NaN handled as PyTorch does."""
    values = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4, float("nan"), 2.5])
    x = values if name == "relu_squared" else torch.cat([values, values.flip(0)])
    reference, forward, backward = OPS[name]
    grad_y = torch.ones(output_shape(name, tuple(x.shape)))
    leaf = x.clone().requires_grad_(True)
    expected = reference(leaf)
    (expected_dx,) = torch.autograd.grad(expected, leaf, grad_y)
    torch.testing.assert_close(forward(x), expected.detach(), equal_nan=True)
    torch.testing.assert_close(backward(grad_y, x), expected_dx, equal_nan=True)


@pytest.mark.parametrize("name", ["relu_squared", "swiglu"])
def test_gradcheck(name):
    _, forward, backward = OPS[name]

    class Activation(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return forward(x)

        @staticmethod
        def backward(ctx, grad_y):
            (x,) = ctx.saved_tensors
            return backward(grad_y, x)

    # Away from 0, where ReLU^2's second derivative jumps and finite differences straddle it.
    x = torch.randn(5, 38, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_(True)
    assert torch.autograd.gradcheck(Activation.apply, (x,))


@pytest.mark.parametrize("name", ["relu_squared", "swiglu"])
def test_opcheck(name):
    _, forward, backward = OPS[name]
    x = torch.randn(3, 5, 16)
    grad_y = torch.randn(output_shape(name, (3, 5, 16)))
    torch.library.opcheck(forward.default, (x,))
    torch.library.opcheck(backward.default, (grad_y, x))


def test_swiglu_rejects_an_odd_last_dimension():
    with pytest.raises(RuntimeError, match=r"x must be \(\.\.\., 2N\)"):
        torch.ops.fastgpt.cpp_swiglu_forward(torch.randn(3, 7))
