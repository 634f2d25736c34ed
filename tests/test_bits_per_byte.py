"""Bits per byte: each token's UTF-8 length for every tokenizer kind, against a hand count."""

import math

import pytest
import tiktoken
import torch

from fastgpt import tokenizers
from fastgpt.bits_per_byte import bits_per_byte, token_byte_lengths
from fastgpt.errors import FastGPTError
from fastgpt.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer

TEXT = "héllo wörld ✓"
# By hand: h é l l o ␠ w ö r l d ␠ ✓ is 13 characters; é and ö take 2 bytes in UTF-8, ✓ takes 3,
# the other 10 take 1: 10 + 2 + 2 + 3 = 17 bytes.
TEXT_BYTES = 17


def spelled_bytes(tokenizer, text):
    return int(token_byte_lengths(tokenizer)[torch.tensor(tokenizer.encode(text))].sum())


def test_char_tokens_have_their_characters_lengths():
    tokenizer = CharTokenizer.train(TEXT)
    lengths = token_byte_lengths(tokenizer)
    assert lengths.dtype == torch.int64 and lengths.shape == (tokenizer.vocab_size,)
    assert {c: int(lengths[tokenizer.encode(c)[0]]) for c in "hé ö✓"} == {"h": 1, "é": 2, " ": 1, "ö": 2, "✓": 3}
    assert spelled_bytes(tokenizer, TEXT) == TEXT_BYTES


def test_bpe_tokens_spell_the_texts_bytes_even_when_they_split_characters():
    single_bytes = BPETokenizer.train(TEXT, 256)  # no merges: one token per byte
    assert len(single_bytes.encode(TEXT)) == TEXT_BYTES
    assert spelled_bytes(single_bytes, TEXT) == TEXT_BYTES
    merged = BPETokenizer.train(TEXT * 20, 290)
    assert len(merged.encode(TEXT)) < TEXT_BYTES
    assert spelled_bytes(merged, TEXT) == TEXT_BYTES
    assert token_byte_lengths(merged)[:256].eq(1).all()


def test_gpt2_tokens_spell_the_texts_bytes(monkeypatch):
    # tiktoken's GPT-2 files are not shipped; a byte-level encoding stands in for them, read through
    # the same tiktoken.get_encoding("gpt2") call the gpt2 tokenizer makes.
    stand_in = BPETokenizer.train(TEXT * 20, 290)._encoding
    monkeypatch.setattr(tokenizers, "gpt2_files_cached", lambda cache_dir: True)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    tokenizer = GPT2Tokenizer()
    assert token_byte_lengths(tokenizer).shape == (stand_in.n_vocab,) == (tokenizer.vocab_size,)
    assert spelled_bytes(tokenizer, TEXT) == TEXT_BYTES


def test_real_gpt2_when_cached():
    if not tokenizers.gpt2_files_cached(tokenizers.tiktoken_cache_dir()):
        pytest.skip("tiktoken's GPT-2 files are not cached on this machine")
    tokenizer = GPT2Tokenizer()
    assert spelled_bytes(tokenizer, TEXT) == TEXT_BYTES
    assert token_byte_lengths(tokenizer).shape == (50257,)


def test_bits_per_byte_converts_nats_per_byte_to_bits():
    assert bits_per_byte(TEXT_BYTES * math.log(2), TEXT_BYTES) == pytest.approx(1.0)
    # A model guessing uniformly among 256 byte values needs 8 bits for each byte.
    assert bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    assert bits_per_byte(torch.tensor(3.0, dtype=torch.float64), torch.tensor(5)) == pytest.approx(3 / 5 / math.log(2))
    with pytest.raises(FastGPTError, match="at least one byte"):
        bits_per_byte(1.0, 0)
