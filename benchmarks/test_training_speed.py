"""Training speed (tokens/s) of the default model on each CPU backend, and on torch's built-ins.

    pytest benchmarks/test_training_speed.py

"builtins" is the same model with its attention and LayerNorm calls sent to
F.scaled_dot_product_attention and F.layer_norm (the model's `ops` swapped for the duration).
fp32, and bf16 under autocast beside it. One step is forward, backward and an AdamW update on a
batch of random tokens.
"""

import types

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, declare_ratios
from fastgpt import model as model_module
from fastgpt import ops
from fastgpt.model import GPT, GPTConfig

BATCH, BLOCK = (2, 32) if QUICK else (16, 128)
SHAPE = dict(n_layer=2, n_head=2, n_embd=64) if QUICK else {}  # else GPTConfig's defaults
BUILTINS = types.SimpleNamespace(
    causal_attention=lambda q, k, v, scale=None, backend=None: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale),
    layer_norm=lambda x, w, b, eps=1e-5, backend=None: F.layer_norm(x, x.shape[-1:], w, b, eps),
)

declare_ratios("training", [("cpp vs reference", "cpp", "reference"), ("cpp vs builtins", "cpp", "builtins")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "builtins"])
def test_training_step(record, monkeypatch, backend, dtype):
    if backend != "builtins" and ops.available_backends()[backend] is not None:
        pytest.skip(f"{backend} unavailable")
    if backend == "builtins":
        monkeypatch.setattr(model_module, "ops", BUILTINS)
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, backend="reference" if backend == "builtins" else backend, **SHAPE)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (BATCH, BLOCK + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    record("training", f"{config.n_layer}L {config.n_embd}d B{BATCH} T{BLOCK} {str(dtype).replace('torch.', '')}",
           backend, step, rounds=3 if QUICK else 5, tokens_per_s=lambda seconds: BATCH * BLOCK / seconds)
