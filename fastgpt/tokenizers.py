"""Tokenizers: text to token ids and back.

Three kinds that training makes, chosen by name:

- `char`: one token per character of the training text (its sorted unique characters).
- `bpe`: byte-level byte-pair encoding trained on the training text, run by tiktoken. Every UTF-8
  text round-trips exactly, whatever characters it holds.
- `gpt2`: tiktoken's GPT-2 encoding (50257 tokens), read from tiktoken's local cache, never downloaded.

and one that comes with a pretrained checkpoint:

- `huggingface`: a `tokenizer.json` (such as a Llama checkpoint ships), run by Hugging Face's
  `tokenizers` library.

A tokenizer's `state_dict()` is plain Python (str, int, list, bytes) stored in the checkpoint, and
`tokenizer_from_state` rebuilds it.
"""

import functools
import hashlib
import heapq
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken
import tokenizers as huggingface_tokenizers

from fastgpt.errors import FastGPTError

KINDS = ("char", "bpe", "gpt2")  # the kinds train_tokenizer makes
SMALLEST_BPE_VOCAB = 256  # a byte-level BPE vocabulary holds every single byte, then one token per merge

# GPT-2's pre-split: contractions, words with their leading space, numbers, punctuation runs and
# whitespace. BPE merges never cross these pieces, so a token never spans two words.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """What every tokenizer offers: `kind`, `vocab_size`, `encode`, `decode`, `state_dict` and
    `token_bytes`."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """The text of `ids`: a list of ints, or a 1-D tensor or array of them."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise FastGPTError(f"token id {bad} is outside the {self.kind} tokenizer's vocabulary "
                               f"(0 to {self.vocab_size - 1}); decode ids made with this tokenizer")
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes of the text each token id spells, in id order."""
        raise NotImplementedError

    def start_text(self) -> str:
        """What a sample continues when given no prompt: a new line, the start of a line, where the
        tokenizer has one; else its first token (a char tokenizer of text on a single line)."""
        try:
            if self.encode("\n"):
                return "\n"
        except FastGPTError:  # a character the tokenizer never saw
            pass
        return self.decode([0])


# ---------------------------------------------------------------------------------------------
# char


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._id = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError:
            unseen = sorted(set(text) - self._id.keys())
            shown = ", ".join(repr(c) for c in unseen[:10])
            more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
            raise FastGPTError(f"the text contains characters the char tokenizer never saw in training: "
                               f"{shown}{more}; use only characters from the training text or train "
                               f"with --tokenizer bpe") from None

    def _decode(self, ids: list[int]) -> str:
        return "".join([self.chars[i] for i in ids])

    def state_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def token_bytes(self) -> list[bytes]:
        return [c.encode("utf-8") for c in self.chars]


# ---------------------------------------------------------------------------------------------
# bpe


def train_bpe(text: str, vocab_size: int) -> list[bytes]:
    """Learn byte-level BPE tokens from `text`: the 256 single bytes, then one token per merge, in order.

    The algorithm (Sennrich et al. 2016, on bytes as in GPT-2):

    1. Split the text into words with GPT-2's pattern and count each distinct word. Each word starts
       as its UTF-8 bytes, i.e. a sequence of token ids 0-255.
    2. Count every adjacent pair of tokens over all words, weighted by the word's count.
    3. Take the most frequent pair (a, b), ties going to the smallest (a, b); its bytes become a new
       token c. Replace every (a, b) in every word by c, left to right.
    4. Repeat 3 until there are `vocab_size` tokens or no word has two tokens left.

    Recounting all pairs after each merge is what makes naive BPE slow. Here the counts are updated
    instead: a merge touches only the words containing (a, b), found through an index pair -> words.
    In such a word, merging (a, b) at positions i, i+1 removes the pairs ending at i, starting at i
    and starting at i+1 (each once, where two merges are neighbours), and adds the pairs that hold the
    new token; every other pair is untouched. The most frequent pair comes from a heap of
    (-count, pair); an entry whose count has since changed is stale and skipped, since every change
    pushes a fresh entry.

    Each merge makes new bytes, as tiktoken's ranks (keyed by bytes) need: no merge crosses the edge
    of a span that ends up one token, so how that span is built depends on its bytes alone. The
    result has fewer than `vocab_size` tokens only if the text runs out of pairs.
    """
    word_counts = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    words = [list(word.encode("utf-8")) for word in word_counts]
    counts = list(word_counts.values())
    tokens = [bytes([b]) for b in range(256)]

    pair_counts = Counter()
    words_with = defaultdict(set)  # pair -> indices of the words that contain it (or once did)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            words_with[pair].add(w)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    while len(tokens) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -n:
            continue  # stale entry
        new_id = len(tokens)
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
        a, b = pair
        change = defaultdict(int)
        for w in words_with.pop(pair):
            word, weight = words[w], counts[w]
            last = len(word) - 1
            merged, i, previous_merge = [], 0, -2
            while i <= last:
                if i < last and word[i] == a and word[i + 1] == b:
                    if i > 0 and previous_merge != i - 2:
                        change[word[i - 1], a] -= weight
                    change[pair] -= weight
                    if i + 1 < last:
                        change[b, word[i + 2]] -= weight
                    token, previous_merge, i = new_id, i, i + 2
                else:
                    token, i = word[i], i + 1
                if merged and (token == new_id or merged[-1] == new_id):
                    change[merged[-1], token] += weight
                    words_with[merged[-1], token].add(w)
                merged.append(token)
            if previous_merge >= 0:  # else the word lost this pair in an earlier merge
                words[w] = merged
        for p, delta in change.items():
            if delta:
                pair_counts[p] += delta
                if pair_counts[p]:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    del pair_counts[p]
    return tokens


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, tokens: list[bytes]):
        """`tokens[r]` is the bytes of the token of rank (and id) r, in merge order."""
        if len(set(tokens)) != len(tokens) or not {bytes([b]) for b in range(256)} <= set(tokens):
            raise FastGPTError("these BPE tokens are not a valid vocabulary (it needs all 256 single "
                               "bytes and no repeats); retrain with --tokenizer bpe")
        self.tokens = tokens
        self.vocab_size = len(tokens)
        self._encoding = tiktoken.Encoding(
            "fastgpt-bpe", pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks={t: rank for rank, t in enumerate(tokens)}, special_tokens={})

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        return cls(train_bpe(text, vocab_size))

    def encode(self, text: str) -> list[int]:
        # No special tokens: "<|endoftext|>" in the text is just text.
        return self._encoding.encode_ordinary(text)

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "tokens": list(self.tokens)}

    def token_bytes(self) -> list[bytes]:
        return list(self.tokens)


# ---------------------------------------------------------------------------------------------
# gpt2

# The files tiktoken builds its GPT-2 encoding from, with their sha256 (as in tiktoken_ext/openai_public.py).
GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def tiktoken_cache_dir() -> str:
    """The folder tiktoken reads downloaded files from (same rule as tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_files_cached(cache_dir: str) -> bool:
    """Whether tiktoken will find GPT-2's files in `cache_dir`, each named by the sha1 of its URL.

    A missing or corrupt file makes tiktoken download it, which offline can hang, hence checking first.
    """
    if not cache_dir:
        return False  # an empty TIKTOKEN_CACHE_DIR turns tiktoken's cache off
    for url, sha256 in GPT2_FILES.items():
        path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                return False
    return True


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"

    def __init__(self):
        cache_dir = tiktoken_cache_dir()
        if not gpt2_files_cached(cache_dir):
            raise FastGPTError(
                f"the gpt2 tokenizer needs tiktoken's GPT-2 files, which are not in tiktoken's cache "
                f"folder {cache_dir!r}: on a machine with internet run `python -c \"import tiktoken; "
                f"tiktoken.get_encoding('gpt2')\"`, copy its cache folder here and point TIKTOKEN_CACHE_DIR "
                f"at it, or train with --tokenizer bpe")
        self._encoding = tiktoken.get_encoding("gpt2")
        self.vocab_size = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def token_bytes(self) -> list[bytes]:
        return [self._encoding.decode_single_token_bytes(i) for i in range(self.vocab_size)]


# ---------------------------------------------------------------------------------------------
# huggingface


@functools.cache
def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, which is how byte-level BPE vocabularies
    (vocab.json, and tokenizer.json's ByteLevel models) spell bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) take the
    characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in characters:
            characters[b] = chr(256 + len(characters) - len(printable))
    return characters


@functools.cache
def byte_of_character():
    """bytes_to_unicode's inverse: the byte each of its characters stands for."""
    return {character: b for b, character in bytes_to_unicode().items()}


def byte_level_bytes(token):
    """The bytes a byte-level vocabulary's token stands for: its characters read back through
    bytes_to_unicode, or, for a special token spelt in other characters, its own text."""
    byte_of = byte_of_character()
    if all(c in byte_of for c in token):
        return bytes(byte_of[c] for c in token)
    return token.encode("utf-8")


def sentencepiece_bytes(token):
    """The bytes a SentencePiece-style token (as in Llama 2's tokenizer.json) spells: `<0xNN>` is the
    byte NN (byte fallback), and U+2581 "▁" marks a space."""
    if regex.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


class HuggingFaceTokenizer(Tokenizer):
    """The tokenizer of a tokenizer.json file, run by Hugging Face's `tokenizers` library.

    As the other kinds, encode adds no special tokens (no beginning-of-text token): a corpus is encoded
    chunk by chunk and a prompt is continued as it is. Special tokens written out in the text still
    become those tokens, as in transformers. decode spells special tokens out.
    """

    kind = "huggingface"

    def __init__(self, json_text: str, source: str = "the tokenizer state"):
        """`json_text`: the text of a tokenizer.json file; `source`: where it comes from, for errors."""
        try:
            self._tokenizer = huggingface_tokenizers.Tokenizer.from_str(json_text)
        except Exception as error:  # the library reports every kind of bad file as a plain Exception
            raise FastGPTError(f"{source} is not a tokenizer.json the tokenizers library can run ({error})") from None
        self.json = json_text
        # Ids run from 0 to the largest, added tokens included; the vocabulary may skip some.
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def load(cls, path) -> "HuggingFaceTokenizer":
        try:
            return cls(Path(path).read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as error:
            raise FastGPTError(f"cannot read the tokenizer file {path} ({type(error).__name__})") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "json": self.json}

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes, read from its spelling in the vocabulary: through bytes_to_unicode for a
        byte-level tokenizer (one with a ByteLevel decoder, as GPT-2's and Llama 3's), else as
        SentencePiece spells tokens (as Llama 2's). An id the vocabulary skips spells nothing."""
        byte_level = isinstance(self._tokenizer.decoder, huggingface_tokenizers.decoders.ByteLevel)
        spelt = byte_level_bytes if byte_level else sentencepiece_bytes
        tokens = (self._tokenizer.id_to_token(i) for i in range(self.vocab_size))
        return [b"" if token is None else spelt(token) for token in tokens]


# ---------------------------------------------------------------------------------------------
# choosing one


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` for `text`. Only bpe uses `vocab_size` (SMALLEST_BPE_VOCAB or more); gpt2
    ignores `text`."""
    if kind not in KINDS:
        raise FastGPTError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(KINDS)}")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if not text:
        raise FastGPTError(f"cannot train the {kind} tokenizer on empty text; "
                           f"give it a non-empty training text")
    if kind == "char":
        return CharTokenizer.train(text)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < SMALLEST_BPE_VOCAB:
        raise FastGPTError(f"the bpe tokenizer needs a vocab size of at least {SMALLEST_BPE_VOCAB} (its single bytes), "
                           f"got {vocab_size!r}; set it with --vocab-size, e.g. 1024")
    return BPETokenizer.train(text, vocab_size)


def tokenizer_from_state(state: dict) -> Tokenizer:
    """The tokenizer whose `state_dict()` was `state`."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char" and isinstance(state.get("chars"), str):
        return CharTokenizer(state["chars"])
    if kind == "bpe" and isinstance(state.get("tokens"), list):
        return BPETokenizer(state["tokens"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "huggingface" and isinstance(state.get("json"), str):
        return HuggingFaceTokenizer(state["json"])
    raise FastGPTError(f"the checkpoint's tokenizer state is not one of {', '.join(KINDS)}, huggingface "
                       f"(kind {kind!r}); load a checkpoint saved by fastgpt")
