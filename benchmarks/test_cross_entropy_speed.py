"""Cross-entropy speed: the C++ kernels and the reference path against F.cross_entropy.

    pytest benchmarks/test_cross_entropy_speed.py

The loss of one batch of the modern preset (32 x 128 rows of 512 logits) and of a GPT-2 vocabulary
(1024 rows of 50304), fp32 and bf16 logits, forward alone and forward+backward. PyTorch's is
F.cross_entropy on the logits in fp32, the usual way to take a bf16 model's loss.
"""

import pytest
import torch

from conftest import QUICK, backends_with_kernels, declare_ratios, op_steps
from fastgpt import ops
from fastgpt.ops.definitions import cross_entropy

SHAPES = {"bpe-512": (64 if QUICK else 4096, 512), "gpt2-vocabulary": (16 if QUICK else 1024, 50304)}
IMPLEMENTATIONS = {"torch": cross_entropy.builtin,
                   **{name: lambda logits, targets, name=name: ops.cross_entropy(logits, targets, backend=name)
                      for name in backends_with_kernels("reference", "cpp")}}
for which in ("forward", "forward+backward"):
    declare_ratios(f"cross_entropy {which}", [("cpp vs torch", "cpp", "torch"), ("cpp vs reference", "cpp", "reference")])


@pytest.mark.parametrize("which", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_entropy(compare, shape, dtype, which):
    rows, classes = SHAPES[shape]
    backward = which == "forward+backward"
    logits = (3 * torch.randn(rows, classes)).to(dtype).requires_grad_(backward)
    targets = torch.randint(classes, (rows,))
    steps = op_steps(IMPLEMENTATIONS, (logits, targets), torch.full((rows,), 1 / rows), backward)
    compare(f"cross_entropy {which}", f"{rows}x{classes} {str(dtype).replace('torch.', '')}", steps,
            rounds=5 if QUICK else (40 if classes < 10_000 else 8))
