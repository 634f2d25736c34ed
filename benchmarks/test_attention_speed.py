"""Causal attention speed: the C++ kernels and the reference path against F.scaled_dot_product_attention.

    pytest benchmarks/test_attention_speed.py

Forward alone and forward+backward, q, k and v made as the model makes them (views of one fused
projection, split as CausalSelfAttention splits it), on two kinds of shape:

- as many key/value heads as query heads (GPT-2's): B=8, H=12, D=64 at T = 64, 256, 1024 (fp32;
  bf16 at T=256);
- grouped-query attention, Hkv < H key/value heads each shared by H / Hkv query heads, in fp32 and
  bf16: the shape of the `--preset modern` model's attention in training (B32 H4 Hkv2 T128 D32;
  there RMS-normalised, rotated q and k reach attention as new contiguous tensors, here all three
  are views) and a larger one (B8 H12 Hkv4 T256 D64). SDPA runs them with enable_gqa=True.

GFLOP/s count the causal FLOPs (2*B*H*T*T*D forward, 3.5x that forward+backward: grouped-query
attention does as many as with H key/value heads) and are set against the fp32 matmul rate measured
in the same run. Triton runs on GPUs only and is not measured here.
"""

import pytest
import torch

from conftest import QUICK, declare_ratios
from fastgpt import ops
from fastgpt.ops.definitions import causal_attention

FP32, BF16 = torch.float32, torch.bfloat16
# (B, H, Hkv, T, D, dtype)
CASES = [(1, 2, kv_heads, 32, 32, dtype) for kv_heads in (2, 1) for dtype in (FP32, BF16)] if QUICK else [
    (8, 12, 12, 64, 64, FP32), (8, 12, 12, 256, 64, FP32), (8, 12, 12, 256, 64, BF16), (8, 12, 12, 1024, 64, FP32),
    (32, 4, 2, 128, 32, FP32), (32, 4, 2, 128, 32, BF16),  # --preset modern
    (8, 12, 4, 256, 64, FP32), (8, 12, 4, 256, 64, BF16)]
PASSES = ["forward", "forward+backward"]


def implementations():
    # PyTorch's SDPA as fastgpt's `torch` backend calls it (enable_gqa where the heads differ).
    yield "sdpa", lambda q, k, v: causal_attention.builtin(q, k, v, None)
    for name in ("reference", "cpp"):
        if ops.available_backends()[name] is None:
            yield name, lambda q, k, v, name=name: ops.causal_attention(q, k, v, backend=name)


IMPLEMENTATIONS = dict(implementations())
for which in PASSES:
    declare_ratios(f"attention {which}", [("cpp vs sdpa", "cpp", "sdpa"), ("cpp vs reference", "cpp", "reference")])


def case_id(case):
    b, h, kv_heads, t, d, dtype = case
    heads = f"H{h}" + (f" Hkv{kv_heads}" if kv_heads != h else "")
    return f"B{b} {heads} T{t} D{d} {str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention(compare, matmul_gflops, case, which):
    b, h, kv_heads, t, d, dtype = case
    backward = which == "forward+backward"
    # The output of the model's one projection: the queries of all heads, then the keys and the values
    # of the key/value heads.
    qkv = torch.randn(b, t, (h + 2 * kv_heads) * d, dtype=dtype, requires_grad=backward)
    grad_out = torch.randn(b, h, t, d, dtype=dtype)

    def step_of(attention):
        def step():
            # As CausalSelfAttention splits it: (B, T, heads * D) -> (B, heads, T, D) views.
            q, k, v = (x.view(b, t, -1, d).transpose(1, 2)
                       for x in qkv.split([h * d, kv_heads * d, kv_heads * d], dim=-1))
            if backward:
                attention(q, k, v).backward(grad_out)
                qkv.grad = None
            else:
                with torch.no_grad():
                    attention(q, k, v)
        return step

    flops = 2 * b * h * t * t * d * (3.5 if backward else 1.0)
    rounds = 3 if QUICK else (5 if t >= 1024 else 15)
    compare(f"attention {which}", case_id(case), {name: step_of(fn) for name, fn in IMPLEMENTATIONS.items()}, rounds,
            gflops=lambda seconds: flops / seconds / 1e9,
            percent_of_matmul=lambda seconds: 100 * flops / seconds / 1e9 / matmul_gflops)
