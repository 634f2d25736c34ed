"""The MLP activations' speed: the C++ kernels of SwiGLU and ReLU^2 against PyTorch's own.

    pytest benchmarks/test_activations_speed.py

An MLP activation for one batch of the default model (32 x 128 rows) at the GELU MLP's hidden width,
512 (SwiGLU's input holds gate and up, 2 x 512 wide), fp32 and bf16, forward alone and
forward+backward. PyTorch's versions, which are the reference path's too: `F.silu(a) * b` and
`F.relu(x).square()`.
"""

import pytest
import torch

from conftest import QUICK, backends_with_kernels, declare_ratios, op_steps
from fastgpt import ops
from fastgpt.ops.definitions import relu_squared, swiglu

ROWS = (2, 32) if QUICK else (32, 128)
WIDTH = 512
ACTIVATIONS = {  # name: (PyTorch's, as the `torch` backend runs it; fastgpt's op; input width)
    "swiglu": (swiglu.builtin, ops.swiglu, 2 * WIDTH),
    "relu_squared": (relu_squared.builtin, ops.relu_squared, WIDTH),
}
for name in ACTIVATIONS:
    for which in ("forward", "forward+backward"):
        declare_ratios(f"{name} {which}", [("cpp vs torch", "cpp", "torch")])


@pytest.mark.parametrize("which", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation(compare, activation, dtype, which):
    builtin, op, width = ACTIVATIONS[activation]
    backward = which == "forward+backward"
    x = torch.randn(*ROWS, width, dtype=dtype, requires_grad=backward)
    implementations = {"torch": builtin, **{name: lambda x, name=name: op(x, backend=name)
                                            for name in backends_with_kernels("cpp")}}
    grad_output = torch.randn(*ROWS, WIDTH, dtype=dtype)
    compare(f"{activation} {which}", "x".join(map(str, (*ROWS, width))) + " " + str(dtype).replace("torch.", ""),
            op_steps(implementations, (x,), grad_output, backward), rounds=5 if QUICK else 40)
