"""The MLP activation kernels (ReLU^2 and SwiGLU: csrc/relu_squared.cpp, csrc/swiglu.cpp,
kernels/relu_squared.py and kernels/swiglu.py) against plain PyTorch and float64.

The C++ kernels are called as the ops `torch.ops.fastgpt.cpp_relu_squared_forward` / `_backward` and
`cpp_swiglu_forward` / `_backward`, the Triton ones through their launchers, on the GPU (or under
Triton's interpreter when there is none). Each is held to `relu_squared` and `swiglu` below run in
the same dtype and in float64, outputs and gradients, on rows of awkward widths, non-contiguous
inputs, and values far into both tails.

Run as a script, `python tests/test_kernels_activations.py --compile-for-hopper SHARD SHARDS` compiles
a share of the Triton kernels' variants for sm_90 and reports their register spills.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import (TRITON_DTYPES, assert_compiles_for_hopper_without_spills, backend_cases,
                           check_against_references, compile_for_hopper_main, dtype_id, needs_cpp, needs_triton,
                           on_triton_device)

WIDTHS = [1, 7, 48, 80, 768, 1000, 1500]  # 1500: past one block of columns of the Triton kernels
ROWS = 37  # 37 x 1000 values: split over threads
NAMES = ["relu_squared", "swiglu"]


def relu_squared(x):
    """relu(x)^2."""
    return F.relu(x).square()


def swiglu(x):
    """silu(gate) * up for x = [gate, up] along the last dimension (..., 2N) -> (..., N)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


REFERENCES = {"relu_squared": relu_squared, "swiglu": swiglu}


def cpp_activation(name, x, grad_y):
    """(y, dx) from the C++ kernels."""
    forward, backward = (getattr(torch.ops.fastgpt, f"cpp_{name}_{direction}") for direction in ("forward", "backward"))
    return forward(x), backward(grad_y, x)


def triton_activation(name, x, grad_y):
    """(y, dx) from the Triton kernels, run on TRITON_DEVICE and brought back to the CPU."""
    kernels = importlib.import_module(f"fastgpt.kernels.{name}")
    x, grad_y = on_triton_device(x), on_triton_device(grad_y)
    return kernels.forward(x).cpu(), kernels.backward(grad_y, x).cpu()


def check(kernel, name, x, grad_y):
    y, dx = kernel(name, x, grad_y)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.is_contiguous() and dx.is_contiguous()
    check_against_references(f"{kernel.__name__} {name} {dtype_id(x.dtype)} {tuple(x.shape)}", [y, dx],
                             REFERENCES[name], [x], grad_y, ["y", "dx"])


def output_shape(name, shape):
    return shape if name == "relu_squared" else (*shape[:-1], shape[-1] // 2)


BOTH_BACKENDS = backend_cases(cpp_activation, triton_activation)


# ---- Both backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel, dtype", BOTH_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_and_float64(name, kernel, dtype, width):
    # SwiGLU's rows hold the gate and up halves of `width` values each.
    shape = (ROWS, width) if name == "relu_squared" else (ROWS, 2 * width)
    x = 3 * torch.randn(shape, dtype=dtype)  # over the bend of SiLU, into both tails
    check(kernel, name, x, torch.randn(output_shape(name, shape), dtype=dtype))


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_activation, triton_activation, every_dtype=False))
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs_and_batched_shapes(name, kernel, dtype):
    x = torch.randn(96, 2, 5, 3, dtype=dtype).permute(2, 3, 1, 0)  # (5, 3, 2, 96): no two dims in memory order
    assert not x.is_contiguous()
    grad_y = torch.randn(output_shape(name, (5, 3, 2, 96))[::-1], dtype=dtype).permute(3, 2, 1, 0)
    check(kernel, name, x, grad_y)
    x = torch.randn(4, 130, dtype=dtype)[:, 1:129]  # the (B, T, 2N) rows of a larger tensor
    grad_y = torch.randn(4, 2 * 128, dtype=dtype)[:, :output_shape(name, (4, 128))[1]]  # its rows apart too
    check(kernel, name, x, grad_y)


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_activation, triton_activation, every_dtype=False))
@pytest.mark.parametrize("name", NAMES)
def test_extreme_values(name, kernel, dtype):
    """Zeros, the far tails (exp(-x) overflowing to infinity, or to 0), and NaN handled as PyTorch does."""
    values = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4, float("nan"), 2.5],
                          dtype=dtype)
    x = values if name == "relu_squared" else torch.cat([values, values.flip(0)])
    grad_y = torch.ones(output_shape(name, tuple(x.shape)), dtype=dtype)
    leaf = x.clone().requires_grad_(True)
    expected = REFERENCES[name](leaf)
    (expected_dx,) = torch.autograd.grad(expected, leaf, grad_y)
    y, dx = kernel(name, x, grad_y)
    torch.testing.assert_close(y, expected.detach(), equal_nan=True)
    torch.testing.assert_close(dx, expected_dx, equal_nan=True)


# ---- C++ ---------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("name", NAMES)
def test_cpp_gradcheck(name):
    class Activation(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return getattr(torch.ops.fastgpt, f"cpp_{name}_forward")(x)

        @staticmethod
        def backward(ctx, grad_y):
            (x,) = ctx.saved_tensors
            return getattr(torch.ops.fastgpt, f"cpp_{name}_backward")(grad_y, x)

    # Away from 0, where ReLU^2's second derivative jumps and finite differences straddle it.
    x = torch.randn(5, 38, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_(True)
    assert torch.autograd.gradcheck(Activation.apply, (x,))


@needs_cpp
@pytest.mark.parametrize("name", NAMES)
def test_cpp_opcheck(name):
    x = torch.randn(3, 5, 16)
    grad_y = torch.randn(output_shape(name, (3, 5, 16)))
    torch.library.opcheck(getattr(torch.ops.fastgpt, f"cpp_{name}_forward").default, (x,))
    torch.library.opcheck(getattr(torch.ops.fastgpt, f"cpp_{name}_backward").default, (grad_y, x))


@needs_cpp
def test_cpp_swiglu_rejects_an_odd_last_dimension():
    with pytest.raises(RuntimeError, match=r"x must be \(\.\.\., 2N\)"):
        torch.ops.fastgpt.cpp_swiglu_forward(torch.randn(3, 7))


# ---- Triton ------------------------------------------------------------------------------------

def hopper_variants():
    """Each kernel (one config: the elementwise kernels are not autotuned) in every dtype the Triton
    kernels take."""
    import triton

    from fastgpt.kernels import relu_squared, swiglu

    kernels = [("relu_squared forward", relu_squared._relu_squared_forward_kernel, relu_squared),
               ("relu_squared backward", relu_squared._relu_squared_backward_kernel, relu_squared),
               ("swiglu forward", swiglu._swiglu_forward_kernel, swiglu),
               ("swiglu backward", swiglu._swiglu_backward_kernel, swiglu)]
    for name, kernel, module in kernels:
        config = triton.Config({}, num_warps=module.NUM_WARPS)
        for dtype in TRITON_DTYPES:
            yield f"{name} {dtype_id(dtype)}", kernel, dtype, dict(BLOCK=module.BLOCK), config


@needs_triton
def test_triton_compiles_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills(__file__, hopper_variants())


if __name__ == "__main__":
    compile_for_hopper_main(hopper_variants())
