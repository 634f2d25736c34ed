"""How much faster decoding is with the key/value cache: 500 new tokens from the default model.

    pytest benchmarks/test_generation_speed.py -s                          # 500 tokens, the default model
    FASTGPT_BENCH_QUICK=1 pytest benchmarks/test_generation_speed.py -s    # 50 tokens, a tiny model

The default model is the one `python -m fastgpt.train` builds (fastgpt.config.TrainConfig) with the
char tokenizer's 65 tokens, on random weights: speed does not depend on what the weights know.
Greedy decoding, so both runs make the same tokens; the speed-up (median over median) is printed.
"""

import os
import statistics

import pytest
import torch

from fastgpt.config import TrainConfig
from fastgpt.model import GPT, GPTConfig

QUICK = os.environ.get("FASTGPT_BENCH_QUICK") == "1"
NEW_TOKENS = 50 if QUICK else 500
ROUNDS = 3
DEFAULTS = TrainConfig()
SIZES = dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if QUICK else dict(
    n_layer=DEFAULTS.n_layer, n_head=DEFAULTS.n_head, n_embd=DEFAULTS.n_embd, block_size=DEFAULTS.block_size)
MEDIANS = {}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(DEFAULTS.seed)
    model = GPT(GPTConfig(vocab_size=65, backend=DEFAULTS.backend, **SIZES)).eval()
    yield model
    if len(MEDIANS) == 2:
        print(f"\nkv cache speed-up for {NEW_TOKENS} new tokens: {MEDIANS[False] / MEDIANS[True]:.1f}x "
              f"({MEDIANS[False]:.2f} s without, {MEDIANS[True]:.2f} s with)")


def decode(model, use_cache):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    return torch.cat(list(model.generate(prompt, NEW_TOKENS, temperature=0, use_cache=use_cache)), dim=1)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_decoding(benchmark, model, use_cache):
    benchmark.group = f"generate {NEW_TOKENS} tokens"
    benchmark.extra_info.update(new_tokens=NEW_TOKENS, use_cache=use_cache, **SIZES)
    decode(model, use_cache)  # warm-up: the first call loads the C++ extension
    tokens = benchmark.pedantic(decode, args=(model, use_cache), rounds=ROUNDS)
    assert tokens.shape == (1, NEW_TOKENS)
    MEDIANS[use_cache] = statistics.median(benchmark.stats.stats.data)
