"""Training speed (tokens/s) of the default training config on each CPU backend, and on torch's built-ins.

    pytest benchmarks/test_training_speed.py

"builtins" is the same model on fastgpt.ops' `torch` backend: its attention and LayerNorm calls go
to F.scaled_dot_product_attention and F.layer_norm.
fp32, and bf16 under autocast beside it. One step is forward, backward and an AdamW update on a
batch of random tokens.
"""

import pytest
import torch

from conftest import QUICK, declare_ratios
from fastgpt import ops
from fastgpt.config import TrainConfig
from fastgpt.model import GPT, GPTConfig

DEFAULTS = TrainConfig()  # what `python -m fastgpt.train` trains with no arguments
BATCH, BLOCK = (2, 32) if QUICK else (DEFAULTS.batch_size, DEFAULTS.model.block_size)
SHAPE = (dict(n_layer=2, n_head=2, n_embd=64) if QUICK
         else dict(n_layer=DEFAULTS.model.n_layer, n_head=DEFAULTS.model.n_head, n_embd=DEFAULTS.model.n_embd))
OPS_BACKEND = {"reference": "reference", "cpp": "cpp", "builtins": "torch"}

declare_ratios("training", [("cpp vs reference", "cpp", "reference"), ("cpp vs builtins", "cpp", "builtins")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_training_step(compare, dtype):
    tokens = torch.randint(0, 65, (BATCH, BLOCK + 1))

    def step_of(backend):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, block_size=BLOCK, **SHAPE))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            ops.use_backend(backend)  # the backends take turns: each sets its kernels for its step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    steps = {name: step_of(backend) for name, backend in OPS_BACKEND.items()
             if ops.available_backends()[backend] is None}
    compare("training", f"{SHAPE['n_layer']}L {SHAPE['n_embd']}d B{BATCH} T{BLOCK} {str(dtype).replace('torch.', '')}",
            steps, rounds=3 if QUICK else 11, tokens_per_s=lambda seconds: BATCH * BLOCK / seconds)
