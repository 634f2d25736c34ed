"""How much faster decoding is with the key/value cache: 500 new tokens from the default model.

    pytest benchmarks/test_generation_speed.py -s                          # 500 tokens, two models
    FASTGPT_BENCH_QUICK=1 pytest benchmarks/test_generation_speed.py -s    # 50 tokens, a tiny model

The default model is the one `python -m fastgpt.train` builds (fastgpt.config.TrainConfig) with the
char tokenizer's 65 tokens, on random weights: speed does not depend on what the weights know. The
second model is the same with a 512-token context.
Three ways to decode, greedily (so all make the same tokens): with the cache, each block of a
one-token step fused into one op where the backend has it (the C++ backend on CPU); with the cache,
but each block run op by op; and without the cache. The speed-ups (median over median) are in the table.
"""

import os
from unittest import mock

import pytest
import torch

from conftest import declare_ratios
from fastgpt.config import TrainConfig
from fastgpt.model import GPT, GPTConfig
from fastgpt import ops
from fastgpt.ops import cpp

QUICK = os.environ.get("FASTGPT_BENCH_QUICK") == "1"
NEW_TOKENS = 50 if QUICK else 500
DEFAULTS = TrainConfig()
DEFAULT_SIZES = dict(n_layer=DEFAULTS.model.n_layer, n_head=DEFAULTS.model.n_head, n_embd=DEFAULTS.model.n_embd,
                     block_size=DEFAULTS.model.block_size)
# The default model, whose context is short (128), and the same model with a 512-token context,
# which shows how the speed-up grows with the context that a step without the cache recomputes.
MODELS = {"tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32)} if QUICK else {
    "default": DEFAULT_SIZES, "context 512": dict(DEFAULT_SIZES, block_size=512)}

declare_ratios("generation", [("cache vs no-cache", "cache", "no-cache"),
                               ("fused vs op by op", "cache", "cache, op by op")])


def decode(model, use_cache, fused=True):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    # Without the fused step: the C++ backend offers it for no dtype, so every block runs op by op.
    with mock.patch.object(cpp, "DECODE_BLOCK_DTYPES", cpp.DECODE_BLOCK_DTYPES if fused else ()):
        return torch.cat(list(model.generate(prompt, NEW_TOKENS, temperature=0, use_cache=use_cache)), dim=1)


@pytest.mark.parametrize("label", list(MODELS))
def test_greedy_decoding(compare, label):
    torch.manual_seed(DEFAULTS.seed)
    ops.use_backend(DEFAULTS.backend)
    model = GPT(GPTConfig(vocab_size=65, **MODELS[label])).eval()
    compare("generation", f"{NEW_TOKENS} new tokens, {label} model",
            {"cache": lambda: decode(model, True), "cache, op by op": lambda: decode(model, True, fused=False),
             "no-cache": lambda: decode(model, False)}, rounds=3,
            tokens_per_s=lambda seconds: NEW_TOKENS / seconds)
