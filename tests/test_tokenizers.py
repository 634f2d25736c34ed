"""The char, bpe, gpt2 and huggingface tokenizers: exact round trips, the BPE trainer against a naive
one, saving and loading, and the errors a user sees."""

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken.load
import tokenizers as huggingface_tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgpt import tokenizers
from fastgpt.data import fit_tokenizer
from fastgpt.errors import FastGPTError
from fastgpt.tokenizers import (BPETokenizer, CharTokenizer, GPT2Tokenizer, HuggingFaceTokenizer,
                                tokenizer_from_state, train_bpe, train_tokenizer)

CORPUS = (Path(tokenizers.__file__).parent / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
SAMPLE = CORPUS[:100_000]

# Pieces that stress byte-level BPE: multi-byte and combining characters, emoji sequences, NUL,
# whitespace runs, contractions and the text of a special token.
AWKWARD = ["\x00", "\n", "\r\n", " " * 17, "\t\t", "é", "e\u0301", "👍🏽", "🇫🇷", "👨‍👩‍👧", "€",
           "日本語", "'s", "'ll", "<|endoftext|>", "\uffff", "\U0010ffff"]
texts = st.lists(st.one_of(st.text(), st.sampled_from(AWKWARD)), max_size=30).map("".join)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", SAMPLE, 512)


def merge_pair(ids, pair, new_id):
    """`ids` with every occurrence of `pair`, scanning left to right, replaced by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_train_bpe(text, vocab_size):
    """BPE as in the textbook: recount every pair after every merge. Same tie rule as train_bpe."""
    words = Counter(regex.findall(tokenizers.GPT2_SPLIT_PATTERN, text))
    seqs = {tuple(w.encode("utf-8")): n for w, n in words.items()}
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size:
        pairs = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += n
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
        new_seqs = Counter()
        for seq, n in seqs.items():
            new_seqs[tuple(merge_pair(list(seq), pair, len(tokens) - 1))] += n
        seqs = new_seqs
    return tokens


# ---- char


def test_char_round_trips_the_corpus():
    tok = train_tokenizer("char", CORPUS)
    assert tok.vocab_size == len(set(CORPUS)) == len(tok.chars)
    assert list(tok.chars) == sorted(set(CORPUS))
    assert tok.decode(tok.encode(CORPUS)) == CORPUS


def test_char_error_names_the_unseen_characters():
    tok = train_tokenizer("char", "hello world")
    with pytest.raises(FastGPTError, match=r"never saw in training: 'é', '€'; .*--tokenizer bpe"):
        tok.encode("héllo €")


# ---- bpe


@settings(max_examples=200, deadline=None)
@given(texts)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(texts, texts)
def test_bpe_trained_on_awkward_text_round_trips(train_text, text):
    # Trained on such text, merges split multi-byte characters and span whitespace runs.
    tok = train_tokenizer("bpe", train_text + "x", 300)
    assert tok.decode(tok.encode(train_text)) == train_text
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text, vocab_size", [
    (SAMPLE[:5000], 400),
    ("aaaaaaa aaaa aa a " * 3, 300),   # overlapping pairs
    ("abc xabc abbc abcd bcd " * 2, 300),
    ("hé👍🏽 " * 4 + "e\u0301 é  \n\n", 290),
])
def test_bpe_trainer_matches_the_naive_trainer(text, vocab_size):
    assert train_bpe(text, vocab_size) == naive_train_bpe(text, vocab_size)


@given(st.text(alphabet="ab c\n", max_size=300))
@settings(max_examples=200, deadline=None)
def test_bpe_trainer_matches_the_naive_trainer_on_runs_of_few_letters(text):
    # Few letters make long runs (aaaa, abab), where merges neighbour and overlap each other.
    assert train_bpe(text, 300) == naive_train_bpe(text, 300)


def test_bpe_has_the_requested_vocab_size_and_is_deterministic(bpe):
    assert bpe.vocab_size == len(bpe.tokens) == 512
    assert train_tokenizer("bpe", SAMPLE, 512).tokens == bpe.tokens
    assert bpe.tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(set(bpe.tokens)) == 512


def test_bpe_stops_when_the_text_runs_out_of_pairs():
    tok = train_tokenizer("bpe", "ab ab", 1000)
    assert tok.tokens[256:] == [b"ab", b" ab"]
    assert tok.encode("ab ab") == [256, 257]


def test_bpe_merges_are_learnt_from_the_training_text_only(tmp_path):
    # The corpus's last 10% (the validation split) repeats a word its first 90% never holds; multi-byte
    # characters make bytes and characters differ. Fitting on every byte would learn that word's merges.
    training, validation = "the café sat on the mat.\n" * 90, "zyxw zyxw zyxw\n" * 17
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(training + validation, encoding="utf-8")
    unseen = fit_tokenizer("bpe", [corpus], 300, val_fraction=0.1)
    everything = fit_tokenizer("bpe", [corpus], 300, val_fraction=0.0)
    assert not any(b"zy" in token for token in unseen.tokens[256:])
    assert any(b"zyxw" in token for token in everything.tokens[256:])
    assert b" caf\xc3\xa9" in unseen.tokens


def test_bpe_compresses_the_corpus(bpe):
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE.encode()) / 2


def test_bpe_treats_special_token_text_as_text(bpe):
    text = "the end<|endoftext|>"
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_tokens_without_every_single_byte_are_refused():
    with pytest.raises(FastGPTError, match="256 single bytes"):
        tokenizer_from_state({"kind": "bpe", "tokens": [b"a"]})


# ---- gpt2


def test_gpt2_offline_error_is_fast_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda *a: pytest.fail("tiktoken tried to download"))
    start = time.perf_counter()
    with pytest.raises(FastGPTError, match=r"tiktoken's GPT-2 files.*TIKTOKEN_CACHE_DIR"):
        train_tokenizer("gpt2", "ignored")
    assert time.perf_counter() - start < 1.0


def test_gpt2_round_trips_when_cached():
    if not tokenizers.gpt2_files_cached(tokenizers.tiktoken_cache_dir()):
        pytest.skip("tiktoken's GPT-2 files are not cached on this machine")
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode(tok.encode(SAMPLE[:5000])) == SAMPLE[:5000]


# ---- huggingface


@pytest.fixture(scope="module")
def byte_level_json(byte_level_tokenizer_json):
    return byte_level_tokenizer_json(SAMPLE[:20_000], 400, "<s>")


def test_huggingface_runs_tokenizer_json_and_its_state_survives_torch_save(byte_level_json, tmp_path):
    tok = HuggingFaceTokenizer(byte_level_json)
    text = SAMPLE[:2000] + "".join(AWKWARD[:-3])
    assert tok.vocab_size == 400 and tok.decode(tok.encode(text)) == text
    assert tok.encode("<s>") == [0] and tok.decode([0]) == "<s>"
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ckpt.pt")
    restored = tokenizer_from_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"])
    assert restored.kind == "huggingface" and restored.encode(text) == tok.encode(text)


def test_huggingface_token_bytes_add_up_to_the_text(byte_level_json):
    tok = HuggingFaceTokenizer(byte_level_json)
    text = SAMPLE[:2000] + "".join(AWKWARD[:-3])
    spelt = tok.token_bytes()
    assert b"".join(spelt[i] for i in tok.encode(text)) == text.encode()


def test_huggingface_token_bytes_of_a_sentencepiece_vocabulary():
    """As Llama 2's tokenizer.json spells tokens: U+2581 for a space, <0xNN> for a byte."""
    vocab = {"<unk>": 0, "<0x0A>": 1, "\u2581the": 2, "\u2581": 3, "t": 4, "h": 5, "e": 6, "\u2581t": 7, "he": 8}
    model = huggingface_tokenizers.models.BPE(vocab, [("\u2581", "t"), ("h", "e"), ("\u2581t", "he")],
                                              unk_token="<unk>", byte_fallback=True)
    tok = HuggingFaceTokenizer(huggingface_tokenizers.Tokenizer(model).to_str())
    assert tok.token_bytes()[:4] == [b"<unk>", b"\n", b" the", b" "]


def test_huggingface_bad_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(FastGPTError, match="tokenizer.json is not a tokenizer.json the tokenizers library can run"):
        HuggingFaceTokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(FastGPTError, match="cannot read the tokenizer file"):
        HuggingFaceTokenizer.load(tmp_path / "missing.json")


# ---- every kind


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_state_dict_round_trip(kind):
    tok = train_tokenizer(kind, SAMPLE[:20_000], 300)
    state = tok.state_dict()
    assert state["kind"] == kind
    restored = tokenizer_from_state(state)
    assert type(restored) is type(tok) and restored.vocab_size == tok.vocab_size
    assert restored.encode(SAMPLE[:20_000]) == tok.encode(SAMPLE[:20_000])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_state_dict_survives_torch_save(kind, tmp_path):
    # A checkpoint is loaded with weights_only=True, which takes only plain Python types.
    tok = train_tokenizer(kind, SAMPLE[:20_000], 300)
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert tokenizer_from_state(state).encode(SAMPLE[:2000]) == tok.encode(SAMPLE[:2000])


@pytest.mark.parametrize("tok", [CharTokenizer.train(SAMPLE), BPETokenizer.train(SAMPLE[:5000], 300)],
                         ids=["char", "bpe"])
def test_decode_takes_tensors_and_arrays(tok):
    ids = tok.encode(SAMPLE[:500])
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == SAMPLE[:500]
    with pytest.raises(FastGPTError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(FastGPTError, match="token id -1 is outside"):
        tok.decode([-1])


@pytest.mark.parametrize("kind, text, vocab_size, message", [
    ("word", "text", None, r"unknown tokenizer 'word'; choose one of: char, bpe, gpt2"),
    ("char", "", None, "empty text"),
    ("bpe", "", 512, "empty text"),
    ("bpe", "text", None, "vocab size of at least 256"),
    ("bpe", "text", 255, "vocab size of at least 256"),
    ("bpe", "text", 512.0, "vocab size of at least 256"),
])
def test_bad_input_is_a_clear_error(kind, text, vocab_size, message):
    with pytest.raises(FastGPTError, match=message):
        train_tokenizer(kind, text, vocab_size)


@pytest.mark.parametrize("state", [{}, {"kind": "bpe"}, {"kind": "char", "chars": 3}, {"kind": "huggingface"}, None])
def test_unrecognised_state_is_a_clear_error(state):
    with pytest.raises(FastGPTError, match="tokenizer state is not one of"):
        tokenizer_from_state(state)


def test_a_corpus_directory_gives_its_text_files_but_not_hidden_ones(tmp_path):
    from fastgpt.data import corpus_files

    for name in ("a.txt", "sub/b.txt", ".notes.txt", ".cache/c.txt", "sub/.d.txt", "e.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    assert corpus_files(tmp_path) == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
