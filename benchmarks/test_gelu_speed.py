"""GELU (tanh approximation) speed: the C++ kernel against F.gelu, and a copy.

    pytest benchmarks/test_gelu_speed.py

32 x 128 x 512 values, the default model's MLP activation for one batch (fp32 and bf16), forward
alone and forward+backward. The reference path's GELU is F.gelu itself, so F.gelu ("torch") is the
one column to beat. GELU is elementwise: the forward reads x and writes y, as copying x does.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, declare_ratios
from fastgpt import ops

SHAPE = (2, 32, 512) if QUICK else (32, 128, 512)
PASSES = ["forward", "forward+backward"]


def implementations():
    yield "torch", lambda x: F.gelu(x, approximate="tanh")
    if ops.available_backends()["cpp"] is None:
        yield "cpp", lambda x: ops.gelu(x, backend="cpp")


IMPLEMENTATIONS = dict(implementations())
declare_ratios("gelu forward", [("cpp vs torch", "cpp", "torch"), ("copy vs cpp", "copy", "cpp")])
declare_ratios("gelu forward+backward", [("cpp vs torch", "cpp", "torch")])


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gelu(compare, dtype, which):
    backward = which == "forward+backward"
    x = torch.randn(SHAPE, dtype=dtype, requires_grad=backward)
    grad_y = torch.randn(SHAPE, dtype=dtype)

    def step_of(gelu):
        def step():
            if backward:
                gelu(x).backward(grad_y)
                x.grad = None
            else:
                with torch.no_grad():
                    gelu(x)
        return step

    steps = {name: step_of(fn) for name, fn in IMPLEMENTATIONS.items()}
    if not backward:
        steps["copy"] = x.clone  # the forward's floor
    bytes_moved = (3 if backward else 2) * x.numel() * x.element_size()
    compare(f"gelu {which}", "x".join(map(str, SHAPE)) + f" {str(dtype).replace('torch.', '')}", steps,
            rounds=5 if QUICK else 40, gb_per_s=lambda seconds: bytes_moved / seconds / 1e9)
