"""Property tests (hypothesis): the ops over drawn shapes and dtypes on every backend that runs here,
the tokenizers over drawn texts, and the data pipeline's chunks and fast char path against the tokenizers."""

import codecs

import numpy as np
import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgpt import data, ops
from fastgpt.ops import dispatch
from fastgpt.data import TokenBlocks, chunk_encoder, encode_corpus
from fastgpt.errors import FastGPTError
from fastgpt.tokenizers import GPT2_SPLIT_PATTERN, tokenizer_from_state, train_tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [name for name in ops.BACKENDS if dispatch.unavailable_reason(name, DEVICE) is None]
# Error allowed against float64, relative to the result's largest magnitude (at least 1).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Triton without a GPU runs in its interpreter: few, small examples.
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def relative_error(actual, exact):
    return (actual.double() - exact).abs().max().item() / max(1.0, exact.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(b=st.integers(1, 2), h=st.integers(1, 3), tq=st.integers(1, 20), extra=st.integers(0, 6),
       d=st.sampled_from([8, 16, 24, 32]), dtype=st.sampled_from(list(TOLERANCE)), seed=st.integers(0, 2**16))
def test_causal_attention_matches_float64_for_any_shape(backend, b, h, tq, extra, d, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=generator).to(DEVICE, dtype) for t in (tq, tq + extra, tq + extra))
    out = ops.causal_attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    exact = ops.causal_attention(q.double(), k.double(), v.double(), backend="reference")
    assert relative_error(out, exact) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=3), n=st.integers(1, 96), bias=st.booleans(),
       dtype=st.sampled_from(list(TOLERANCE)), seed=st.integers(0, 2**16))
def test_layer_norm_matches_float64_for_any_shape(backend, rows, n, bias, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*rows, n, generator=generator) + 1).to(DEVICE, dtype)
    weight = torch.randn(n, generator=generator).to(DEVICE, dtype)
    b = torch.randn(n, generator=generator).to(DEVICE, dtype) if bias else None
    out = ops.layer_norm(x, weight, b, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    exact = ops.layer_norm(x.double(), weight.double(), b.double() if bias else None, backend="reference")
    assert relative_error(out, exact) <= TOLERANCE[dtype]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", "the cat sat on the mat; the dog ate the cat's hat. " * 20 + "naïve café 日本", 300)


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1))
def test_char_tokenizer_round_trips_its_training_text_and_survives_its_state(text):
    tokenizer = train_tokenizer("char", text)
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer_from_state(tokenizer.state_dict()).encode(text) == ids


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_bpe_tokenizer_round_trips_any_text_and_survives_its_state(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert tokenizer_from_state(bpe.state_dict()).encode(text) == ids


@settings(max_examples=100, deadline=None)
@given(training=st.text(min_size=1), text=st.text())
def test_fast_char_path_of_the_data_pipeline_equals_the_tokenizer(training, text):
    tokenizer = train_tokenizer("char", training)
    encode = chunk_encoder(tokenizer)
    if set(text) <= set(training):
        assert encode(text).tolist() == tokenizer.encode(text)
    else:
        with pytest.raises(FastGPTError, match="never saw"):
            encode(text)


# Llama 3's pre-split, which differs from GPT-2's where chunks could end: it joins line breaks to the
# punctuation before them and to the white space after a line.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="ab1.' \t\r\né", max_size=300), chunk_bytes=st.integers(1, 24))
def test_corpus_chunks_split_into_the_pieces_of_the_whole_text(tmp_path_factory, monkeypatch, text, chunk_bytes):
    """Encoding chunk by chunk equals encoding the whole text: a BPE tokenizer encodes each piece of its
    pre-split on its own, so the chunks must split into the whole text's pieces, for GPT-2's pattern (the
    bpe and gpt2 tokenizers') and Llama 3's."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk_bytes)
    chunks = list(data.read_chunks([corpus]))
    assert "".join(chunks) == text
    for pattern in (GPT2_SPLIT_PATTERN, LLAMA3_SPLIT_PATTERN):
        assert [piece for chunk in chunks for piece in regex.findall(pattern, chunk)] == regex.findall(pattern, text)


def test_a_byte_order_mark_at_the_start_of_a_file_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with one; a char tokenizer would learn it as a character."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for file in files:
        file.write_bytes(codecs.BOM_UTF8 + "héllo\n\ufeff".encode())  # later, U+FEFF is a character
    assert "".join(data.read_chunks(files)) == "héllo\n\ufeff" * 2


def test_the_encoding_bar_counts_every_byte_of_the_corpus_once(tmp_path, monkeypatch):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("héllo wörld ✓\n" * 9, encoding="utf-8")
    files[1].write_text("çà et là\n" * 5, encoding="utf-8")
    bars = []

    class Bar:
        def __init__(self, total, **options):
            self.total, self.done, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True
    monkeypatch.setattr(data, "tqdm", Bar)
    monkeypatch.setattr(data, "CHUNK_BYTES", 7)  # chunks that cut multi-byte characters
    encode_corpus(files, train_tokenizer("char", "".join(f.read_text() for f in files)), tmp_path / "cache")
    (bar,) = bars
    assert bar.total == bar.done == sum(f.stat().st_size for f in files) and bar.closed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=40, max_size=400), block_size=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_batches_are_consecutive_tokens_of_the_cache_shifted_by_one(tmp_path_factory, text, block_size, seed):
    tokenizer = train_tokenizer("char", text)
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    tokens = encode_corpus([corpus], tokenizer, corpus.parent / "cache")
    assert tokenizer.decode(np.asarray(tokens).tolist()) == text
    blocks = TokenBlocks(tokens, block_size, 0.5)
    starts = blocks.starts("val", 4, torch.Generator().manual_seed(seed))
    x, y = blocks.batch("val", starts, torch.device("cpu"))
    split = len(tokens) // 2
    for row, start in enumerate(starts.tolist()):
        expected = torch.from_numpy(np.asarray(tokens[split + start:split + start + block_size + 1], dtype=np.int64))
        assert torch.equal(x[row], expected[:-1]) and torch.equal(y[row], expected[1:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(20, 400), block_size=st.integers(1, 8), count=st.integers(1, 50))
def test_evaluation_blocks_spread_evenly_from_the_first_block_of_a_split_to_its_last(tmp_path_factory, length,
                                                                                     block_size, count):
    tokenizer = train_tokenizer("char", "ab")
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("ab" * (length // 2), encoding="utf-8")
    blocks = TokenBlocks(encode_corpus([corpus], tokenizer, corpus.parent / "cache"), block_size, 0.5)
    starts = blocks.spread_starts("val", count).tolist()
    last = blocks.size("val") - block_size - 1
    assert len(starts) == count and starts[0] == 0
    assert starts[-1] == (last if count > 1 else 0)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(gap >= 0 for gap in gaps) and max(gaps, default=0) - min(gaps, default=0) <= 1
    x, _ = blocks.batch("val", torch.tensor(starts), torch.device("cpu"))  # every block lies inside the split
    assert x.shape == (count, block_size)
