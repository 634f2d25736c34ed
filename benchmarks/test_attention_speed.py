"""Causal attention speed: the C++ kernels and the reference path against F.scaled_dot_product_attention.

    pytest benchmarks/test_attention_speed.py

B=8, H=12, D=64 at T = 64, 256, 1024 (fp32; bf16 at T=256), forward alone and forward+backward.
GFLOP/s count the causal FLOPs (2*B*H*T*T*D forward, 3.5x that forward+backward) and are set against
the fp32 matmul rate measured in the same run. Triton runs on GPUs only and is not measured here.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, declare_ratios
from fastgpt import ops

B, H, D = (1, 2, 32) if QUICK else (8, 12, 64)
CASES = [(32, torch.float32), (32, torch.bfloat16)] if QUICK else [
    (64, torch.float32), (256, torch.float32), (256, torch.bfloat16), (1024, torch.float32)]
PASSES = ["forward", "forward+backward"]


def implementations():
    yield "sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name in ("reference", "cpp"):
        if ops.available_backends()[name] is None:
            yield name, lambda q, k, v, name=name: ops.causal_attention(q, k, v, backend=name)


IMPLEMENTATIONS = dict(implementations())
for which in PASSES:
    declare_ratios(f"attention {which}", [("cpp vs sdpa", "cpp", "sdpa"), ("cpp vs reference", "cpp", "reference")])


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("t,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_attention(compare, matmul_gflops, t, dtype, which):
    backward = which == "forward+backward"
    # q, k and v as the model makes them: transposed views of one (B, T, 3, H, D) projection.
    qkv = torch.randn(B, t, 3, H, D, dtype=dtype, requires_grad=backward)
    grad_out = torch.randn(B, H, t, D, dtype=dtype)

    def step_of(attention):
        def step():
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # as CausalSelfAttention splits them
            if backward:
                attention(q, k, v).backward(grad_out)
                qkv.grad = None
            else:
                with torch.no_grad():
                    attention(q, k, v)
        return step

    flops = 2 * B * H * t * t * D * (3.5 if backward else 1.0)
    rounds = 3 if QUICK else (5 if t >= 1024 else 15)
    row = f"B{B} H{H} T{t} D{D} {str(dtype).replace('torch.', '')}"
    compare(f"attention {which}", row, {name: step_of(fn) for name, fn in IMPLEMENTATIONS.items()}, rounds,
            gflops=lambda seconds: flops / seconds / 1e9,
            percent_of_matmul=lambda seconds: 100 * flops / seconds / 1e9 / matmul_gflops)
