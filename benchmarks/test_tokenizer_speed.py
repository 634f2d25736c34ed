"""How long BPE training and encoding take on the Tiny Shakespeare corpus, to a 1024-token vocabulary.

    pytest benchmarks/test_tokenizer_speed.py                           # the full 1.1 MB corpus
    FASTGPT_BENCH_QUICK=1 pytest benchmarks/test_tokenizer_speed.py     # its first 100 KB

Speed is measured here, not asserted: one round each, since a round of training on the full corpus
takes seconds.
"""

import os
from pathlib import Path

import pytest

from fastgpt import tokenizers
from fastgpt.tokenizers import train_tokenizer

CORPUS = (Path(tokenizers.__file__).parent / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
TEXT = CORPUS[:100_000] if os.environ.get("FASTGPT_BENCH_QUICK") == "1" else CORPUS
VOCAB_SIZE = 1024


def test_bpe_training(benchmark):
    benchmark.extra_info.update(chars=len(TEXT), vocab_size=VOCAB_SIZE)
    tok = benchmark.pedantic(train_tokenizer, args=("bpe", TEXT, VOCAB_SIZE), rounds=1)
    assert tok.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode(benchmark, kind):
    tok = train_tokenizer(kind, TEXT, VOCAB_SIZE)
    benchmark.extra_info.update(chars=len(TEXT), kind=kind)
    ids = benchmark.pedantic(tok.encode, args=(TEXT,), rounds=1)
    assert tok.decode(ids) == TEXT
