"""Bits per byte: a loss that can be compared across tokenizers.

A loss in nats per token depends on how much text a token holds: a char model and a BPE model of
the same text predict different things. Dividing the total loss by the bytes of text those tokens
spell (UTF-8) and converting nats to bits gives a number about the text alone:

    bits per byte = (sum over predicted tokens of -ln p(token)) / (ln 2 x UTF-8 bytes of those tokens)

A byte-level BPE token may hold part of a multi-byte character; the bytes of a run of tokens still
add up to the bytes of the text they spell, which is all the sum needs.
"""

import math

import torch

from fastgpt.errors import FastGPTError


def token_byte_lengths(tokenizer):
    """How many UTF-8 bytes each token id spells: an int64 tensor of tokenizer.vocab_size entries."""
    return torch.tensor([len(token) for token in tokenizer.token_bytes()], dtype=torch.int64)


def bits_per_byte(total_nats, total_bytes):
    """The loss summed over some tokens (nats), per byte of the text they spell, in bits."""
    total_nats, total_bytes = float(total_nats), float(total_bytes)
    if total_bytes <= 0:
        raise FastGPTError("bits per byte needs at least one byte of text; evaluate on a non-empty text")
    return total_nats / (math.log(2) * total_bytes)
