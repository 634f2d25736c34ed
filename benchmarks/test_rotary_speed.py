"""Rotary positions' speed: the C++ kernels against the reference path (PyTorch has no built-in).

    pytest benchmarks/test_rotary_speed.py

Queries of the default attention benchmark's shape, B8 H12 T256 D64 (fp32 and bf16), forward alone
and forward+backward; the reference computes cos and sin and rotates with a few elementwise passes.
"""

import pytest
import torch

from conftest import QUICK, backends_with_kernels, declare_ratios, op_steps
from fastgpt import ops

SHAPE = (2, 4, 32, 64) if QUICK else (8, 12, 256, 64)
IMPLEMENTATIONS = {name: lambda x, name=name: ops.rotary(x, offset=3, backend=name)
                   for name in backends_with_kernels("reference", "cpp")}
for which in ("forward", "forward+backward"):
    declare_ratios(f"rotary {which}", [("cpp vs reference", "cpp", "reference")])


@pytest.mark.parametrize("which", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rotary(compare, dtype, which):
    backward = which == "forward+backward"
    x = torch.randn(SHAPE, dtype=dtype, requires_grad=backward)
    steps = op_steps(IMPLEMENTATIONS, (x,), torch.randn(SHAPE, dtype=dtype), backward)
    compare(f"rotary {which}", "B{} H{} T{} D{} ".format(*SHAPE) + str(dtype).replace("torch.", ""), steps,
            rounds=5 if QUICK else 40)
