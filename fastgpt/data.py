"""From raw text to batches: read the corpus, encode it once into a token cache, draw random blocks.

The corpus is streamed in chunks into a token file on disk, and batches are read from that file a
block at a time, so memory use does not grow with the corpus. The cache is reused as long as the corpus and the tokenizer are the same.
The first (1 - val_fraction) of the tokens train the model; the rest measure it.
"""

import codecs
import hashlib
import json
import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import regex
import torch
from tqdm import tqdm

from fastgpt.errors import FastGPTError
from fastgpt.run_files import new_temporary_file
from fastgpt.tokenizers import train_tokenizer

CHUNK_BYTES = 1 << 20  # bytes of a file read and encoded at a time
# Where a chunk may end: just before a line break that follows a letter or digit. GPT-2's pre-split
# ends a piece there, as does Llama 3's (which joins line breaks to the punctuation before them), and
# the pieces on either side do not depend on the text across it.
CHUNK_END = regex.compile(r"[\p{L}\p{N}](?=\r?\n)", flags=regex.REVERSE)
BPE_TRAINING_CHARS = 8 << 20  # a BPE vocabulary is learnt from (at most) 8 M characters of training text


def bundled_corpus():
    """Tiny Shakespeare, shipped inside the package."""
    return Path(str(resources.files("fastgpt") / "data" / "tinyshakespeare.txt"))


def corpus_files(data):
    """The text files that make up the corpus named by `data` (a file, a directory, or '' for the default).
    A directory gives its .txt files and those of its folders, leaving out hidden ones (a name starting
    with "."), as an editor's or a version-control tool's files are."""
    path = Path(data) if data else bundled_corpus()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FastGPTError(f"the data directory {path} holds no .txt files; point --data at a text file "
                               "or a directory of .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise FastGPTError(f"the corpus {path} does not exist; point --data at a text file or a directory of .txt files")
    for file in files:
        if not os.access(file, os.R_OK):
            raise FastGPTError(f"the corpus file {file} is not readable; check its permissions")
    if all(file.stat().st_size == 0 for file in files):
        raise FastGPTError(f"the corpus {path} is empty; point --data at a file or directory with text in it")
    return files


def read_chunks(files):
    """The corpus as a stream of text chunks of about CHUNK_BYTES, each ending where CHUNK_END allows
    (a chunk grows until it can), so that a tokenizer splitting text as GPT-2's does encodes the
    stream exactly as it would encode the whole text at once.
    """
    for file in files:
        # An incremental decoder carries a multi-byte character cut by a chunk boundary over to the next.
        # utf-8-sig drops the byte order mark some editors put at the start of a file: it is not text.
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        carry, offset = "", 0
        with open(file, "rb") as handle:
            while True:
                raw = handle.read(CHUNK_BYTES)
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as error:
                    raise FastGPTError(f"{file} is not UTF-8 text (bad byte near offset {offset + error.start}); "
                                       "convert it to UTF-8 first") from None
                offset += len(raw)
                if not raw:
                    break
                end = CHUNK_END.search(text)
                cut = end.end() if end else 0
                carry = text[cut:]
                if cut:
                    yield text[:cut]
        if text:
            yield text


def text_digest(files):
    """A digest of the corpus's text (its files' contents in order, not their names or times): a resumed
    run checks by it that it trains on the text its checkpoint did, wherever that text now lies."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _fingerprint(files):
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer):
    state = json.dumps(tokenizer.state_dict(), sort_keys=True, default=repr)
    return hashlib.sha256(state.encode()).hexdigest()


def fit_tokenizer(kind, files, vocab_size, val_fraction):
    """Learn a tokenizer from the corpus: its characters (char), its merges (bpe), or none (gpt2).

    BPE merges are learnt from the text the model trains on: the corpus's first (1 - val_fraction)
    of bytes, at most BPE_TRAINING_CHARS characters of them. Merges learnt from the validation text
    would encode it in fewer tokens than text never seen, and bits per byte would flatter the model.
    The validation split is cut in tokens, not bytes; it holds the last val_fraction of the bytes or
    less wherever the corpus's end takes no fewer tokens per byte than the rest, as text the merges
    never saw does. A char tokenizer takes every character of the corpus, so that it can encode the
    validation text too.
    """
    if kind == "char":
        characters = set()
        for chunk in read_chunks(files):
            characters.update(chunk)
        return train_tokenizer("char", "".join(sorted(characters)))
    if kind == "bpe":
        bytes_left = int(sum(file.stat().st_size for file in files) * (1 - val_fraction))
        sample, size = [], 0
        for chunk in read_chunks(files):
            encoded = chunk.encode("utf-8")
            if len(encoded) > bytes_left:  # the training text ends inside this chunk
                chunk = encoded[:bytes_left].decode("utf-8", errors="ignore")
            sample.append(chunk)
            size += len(chunk)
            bytes_left -= len(encoded)
            if size >= BPE_TRAINING_CHARS or bytes_left <= 0:
                break
        return train_tokenizer("bpe", "".join(sample), vocab_size)
    return train_tokenizer(kind, "", vocab_size)


def chunk_encoder(tokenizer):
    """A function from a text chunk to its token ids as a numpy array.

    The char tokenizer's ids come from a table indexed by code point, looked up by numpy: going
    character by character in Python would take minutes on a corpus of a few hundred MB.
    """
    if tokenizer.kind != "char":
        return lambda chunk: np.asarray(tokenizer.encode(chunk), dtype=np.int64)
    points = np.array([ord(c) for c in tokenizer.chars])
    table = np.full(points.max() + 1, -1, dtype=np.int64)
    table[points] = np.arange(len(points))

    def encode(chunk):
        codes = np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)
        known = codes < len(table)
        ids = np.where(known, table[np.where(known, codes, 0)], -1)
        if (ids < 0).any():
            # The tokenizer's own encode names the characters it never saw.
            return np.asarray(tokenizer.encode(chunk), dtype=np.int64)
        return ids
    return encode


def _cache_entries(files, tokenizer, cache_dir):
    """The token cache's two files, the tokens' dtype, and what the cache must record to be reused."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    meta = {"corpus": _fingerprint(files), "tokenizer": _tokenizer_fingerprint(tokenizer), "dtype": np.dtype(dtype).name}
    return cache_dir / "tokens.bin", cache_dir / "tokens.json", dtype, meta


def cached_tokens(files, tokenizer, cache_dir):
    """The tokens cache_dir holds (a read-only memmap) when they are of this corpus and tokenizer, else
    None. Reading only: eval uses it on a run that may be training, whose cache it must not replace."""
    return _read_cache(*_cache_entries(files, tokenizer, Path(cache_dir)))


def _read_cache(tokens_path, meta_path, dtype, meta):
    """The cached tokens when the cache records `meta` and holds all the tokens it counted, else None."""
    try:
        cached = json.loads(meta_path.read_text())
        size = tokens_path.stat().st_size
    except (OSError, ValueError):
        return None
    if {k: cached.get(k) for k in meta} != meta or cached.get("tokens") != size // np.dtype(dtype).itemsize:
        return None
    return np.memmap(tokens_path, dtype=dtype, mode="r")


def encode_corpus(files, tokenizer, cache_dir, progress=True):
    """Encode the corpus into cache_dir/tokens.bin (reused when corpus and tokenizer are unchanged).

    Returns the tokens as a read-only memmap. With `progress`, encoding that takes more than a couple of
    seconds (a large corpus) shows a bar on stderr.
    """
    cache_dir = Path(cache_dir)
    tokens_path, meta_path, dtype, meta = entries = _cache_entries(files, tokenizer, cache_dir)
    cached = _read_cache(*entries)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A private partial file: several machines of one run may encode into a shared cache at once.
    descriptor, partial = new_temporary_file(cache_dir, prefix="tokens.", suffix=".partial")
    encode = chunk_encoder(tokenizer)
    count = 0
    bar = tqdm(total=sum(file.stat().st_size for file in files), desc="encoding the corpus", unit="B",
               unit_scale=True, delay=2, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        with os.fdopen(descriptor, "wb") as out:
            for chunk in read_chunks(files):
                ids = encode(chunk).astype(dtype)
                out.write(ids.tobytes())
                count += len(ids)
                bar.update(len(chunk.encode("utf-8")))
    except BaseException:
        os.unlink(partial)
        raise
    finally:
        bar.close()
    os.replace(partial, tokens_path)
    meta_path.write_text(json.dumps({**meta, "tokens": count}))
    if count == 0:
        raise FastGPTError("the corpus encodes to no tokens; point --data at a file or directory with text in it")
    return np.memmap(tokens_path, dtype=dtype, mode="r")


class TokenBlocks:
    """Blocks of block_size + 1 consecutive tokens from the train or validation split: random ones
    to train on, evenly spread ones to evaluate on.

    The inputs are a block's first block_size tokens and the targets the same block shifted by one.
    Blocks are read from the token cache's file, one pread each, rather than through its memmap:
    touching a mapped page maps the page cache's whole folio around it, so a long run reading
    through the memmap would end up holding much of the corpus in its resident memory.
    """

    def __init__(self, tokens, block_size, val_fraction):
        split = int(len(tokens) * (1 - val_fraction))
        self.path, self.dtype = tokens.filename, tokens.dtype
        self.ranges = {"train": (0, split), "val": (split, len(tokens))}
        self.block_size = block_size
        for name in self.ranges:
            if self.size(name) < block_size + 1:
                raise FastGPTError(
                    f"the {name} split has {self.size(name)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                    "use a longer corpus, a smaller --block-size or another --val-fraction")

    def size(self, split):
        """Tokens in a split."""
        first, end = self.ranges[split]
        return end - first

    def start_count(self, split):
        """How many positions a block can start at in a split (its last token must lie inside it)."""
        return self.size(split) - self.block_size

    def starts(self, split, batch_size, generator):
        """Random start positions of batch_size blocks in a split."""
        return torch.randint(self.start_count(split), (batch_size,), generator=generator)

    def spread_starts(self, split, count):
        """Start positions of `count` blocks spread evenly over a split, its first block to its last.

        A text is not uniform (Tiny Shakespeare's validation split is four plays), so which blocks an
        evaluation scores moves its loss: on that split, a trained model's loss over 320 random blocks
        scattered by 0.018 from draw to draw, while 320 evenly spread ones came within 0.008 of its loss
        over every token. The spread is also the same whatever the seed, so runs compare on the same text.
        """
        return torch.linspace(0, self.start_count(split) - 1, count, dtype=torch.float64).round().long()

    def batch(self, split, starts, device):
        """Inputs and targets (each (len(starts), block_size) int64) for the blocks at `starts`."""
        first = self.ranges[split][0]
        length = (self.block_size + 1) * self.dtype.itemsize
        with open(self.path, "rb") as handle:
            rows = [os.pread(handle.fileno(), length, (first + start) * self.dtype.itemsize)
                    for start in starts.tolist()]
        block = torch.from_numpy(np.frombuffer(b"".join(rows), dtype=self.dtype).astype(np.int64))
        block = block.view(len(rows), self.block_size + 1)
        x, y = block[:, :-1], block[:, 1:]
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
