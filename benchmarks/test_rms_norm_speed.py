"""RMSNorm speed: the C++ kernels and the reference path against F.rms_norm, and a copy.

    pytest benchmarks/test_rms_norm_speed.py

8192 x 768 with a weight (fp32 and bf16), forward alone and forward+backward, as for LayerNorm. The
forward reads x and writes y, as copying x does: the copy is its floor.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, backends_with_kernels, declare_ratios, op_steps
from fastgpt import ops

M, N = (256, 768) if QUICK else (8192, 768)
EPS = 1e-6
IMPLEMENTATIONS = {"torch": lambda x, w: F.rms_norm(x, (N,), w, EPS),
                   **{name: lambda x, w, name=name: ops.rms_norm(x, w, EPS, backend=name)
                      for name in backends_with_kernels("reference", "cpp")}}
declare_ratios("rms_norm forward", [("cpp vs torch", "cpp", "torch"), ("cpp vs reference", "cpp", "reference"),
                                    ("copy vs cpp", "copy", "cpp")])
declare_ratios("rms_norm forward+backward", [("cpp vs torch", "cpp", "torch"), ("cpp vs reference", "cpp", "reference")])


@pytest.mark.parametrize("which", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rms_norm(compare, dtype, which):
    backward = which == "forward+backward"
    x = torch.randn(M, N, dtype=dtype, requires_grad=backward)
    weight = torch.randn(N, dtype=dtype, requires_grad=backward)
    steps = op_steps(IMPLEMENTATIONS, (x, weight), torch.randn(M, N, dtype=dtype), backward)
    if not backward:
        steps["copy"] = x.clone
    bytes_moved = (3 if backward else 2) * M * N * x.element_size()
    compare(f"rms_norm {which}", f"{M}x{N} {str(dtype).replace('torch.', '')}", steps,
            rounds=5 if QUICK else 40, gb_per_s=lambda seconds: bytes_moved / seconds / 1e9)
