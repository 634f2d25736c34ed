"""LayerNorm speed: the C++ kernels and the reference path against F.layer_norm, and a copy.

    pytest benchmarks/test_layer_norm_speed.py

8192 x 768 (fp32 and bf16), forward alone and forward+backward. LayerNorm is memory-bound: the
forward reads x and writes y, as copying x does, so the copy is the floor the forward is held to.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, declare_ratios
from fastgpt import ops

M, N = (256, 768) if QUICK else (8192, 768)
PASSES = ["forward", "forward+backward"]


def implementations():
    yield "torch", lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)
    for name in ("reference", "cpp"):
        if ops.available_backends()[name] is None:
            yield name, lambda x, w, b, name=name: ops.layer_norm(x, w, b, 1e-5, backend=name)


IMPLEMENTATIONS = dict(implementations())
declare_ratios("layer_norm forward", [("cpp vs torch", "cpp", "torch"), ("cpp vs reference", "cpp", "reference"),
                                      ("copy vs cpp", "copy", "cpp")])
declare_ratios("layer_norm forward+backward", [("cpp vs torch", "cpp", "torch"),
                                               ("cpp vs reference", "cpp", "reference")])


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_layer_norm(compare, dtype, which):
    backward = which == "forward+backward"
    x = torch.randn(M, N, dtype=dtype, requires_grad=backward)
    weight = torch.randn(N, dtype=dtype, requires_grad=backward)
    bias = torch.randn(N, dtype=dtype, requires_grad=backward)
    grad_y = torch.randn(M, N, dtype=dtype)

    def step_of(layer_norm):
        def step():
            if backward:
                layer_norm(x, weight, bias).backward(grad_y)
                x.grad = weight.grad = bias.grad = None
            else:
                with torch.no_grad():
                    layer_norm(x, weight, bias)
        return step

    steps = {name: step_of(fn) for name, fn in IMPLEMENTATIONS.items()}
    if not backward:
        steps["copy"] = x.clone  # the forward's floor
    bytes_moved = (3 if backward else 2) * M * N * x.element_size()  # forward reads x, writes y
    compare(f"layer_norm {which}", f"{M}x{N} {str(dtype).replace('torch.', '')}", steps,
            rounds=5 if QUICK else 40, gb_per_s=lambda seconds: bytes_moved / seconds / 1e9)
