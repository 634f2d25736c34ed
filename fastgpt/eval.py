"""Measure a trained model on a text: `python -m fastgpt.eval --out-dir RUN [--data FILE_OR_DIR]
[--checkpoint latest|best] [--json]`.

Prints the loss (nats per token), the perplexity (e to the loss) and the bits per byte over every
token of the text. The text is, by default, the run's own validation split: the last val_fraction of
its corpus's tokens, as the trainer holds them out; `--data` names any other text.

How every token is scored: the tokens are cut into consecutive, non-overlapping windows of
block_size (the last one may be shorter). Within a window the model predicts each token from the
ones before it in that window, as it does in training's blocks, so each token after the text's first
is scored exactly once, with 1 to block_size tokens of context, and the loss is directly comparable
with the trainer's val_loss. (Windows that slide one token at a time would give every token the full
context, scoring a little better, at up to block_size times the cost.)
"""

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastgpt import ops
from fastgpt.bits_per_byte import bits_per_byte, token_byte_lengths
from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import run_cli
from fastgpt.config import parse_config
from fastgpt.settings import setting
from fastgpt.data import TokenBlocks, cached_tokens, corpus_files, encode_corpus
from fastgpt.errors import FastGPTError
from fastgpt.hardware import choose_precision
from fastgpt.run_files import CHECKPOINT_FILES, checkpoint_setting, read_run_config
from fastgpt.device import backend_setting, device_setting, dtype_setting, pick_device, use_backend


@dataclass
class EvalConfig:
    out_dir: str = setting("out", "the training run to evaluate (the --out-dir it was trained with)")
    data: str = setting("", "text file or directory of .txt files to evaluate on (empty: the run's own "
                            "validation split)")
    checkpoint: str = checkpoint_setting()
    json: bool = setting(False, "print the result as one JSON object")
    batch_size: int = setting(16, "windows of block_size tokens evaluated at once", minimum=1)
    device: str = device_setting()
    dtype: str = dtype_setting()
    backend: str = backend_setting()

    def validate(self):
        """Nothing to check beyond each setting's own choices and minimum."""


@dataclass
class Evaluation:
    """Totals over the predicted tokens of a text."""

    tokens: int    # tokens predicted (every token but the text's first)
    bytes: int     # UTF-8 bytes those tokens spell
    nats: float    # summed cross-entropy

    @property
    def loss(self):
        return self.nats / self.tokens

    @property
    def perplexity(self):
        return math.exp(self.loss)

    @property
    def bits_per_byte(self):
        return bits_per_byte(self.nats, self.bytes)


@torch.no_grad()
def evaluate_tokens(model, tokens, block_size, byte_lengths, batch_size=16, precision=None, progress=True):
    """Score every token of `tokens` (a 1-D array) after the first, in windows of block_size (module doc)."""
    predicted = len(tokens) - 1
    if predicted < 1:
        raise FastGPTError("the text is shorter than two tokens, so there is nothing to predict; "
                           "evaluate on a longer text")
    device = model.lm_head.weight.device
    byte_lengths = byte_lengths.to(device)
    autocast = precision.autocast(device) if precision else torch.autocast(device.type, enabled=False)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)

    def score(first, rows, length):
        """Add the windows of `length` targets at tokens[first:], `rows` of them back to back."""
        nonlocal nats, total_bytes
        chunk = torch.from_numpy(np.asarray(tokens[first:first + rows * length + 1]).astype(np.int64)).to(device)
        x, y = chunk[:-1].view(rows, length), chunk[1:].view(rows, length)
        with autocast:
            logits, _ = model(x)
        nats += ops.cross_entropy(logits.flatten(0, 1), y.flatten()).double().sum()
        total_bytes += byte_lengths[y].sum()
        bar.update(rows * length)

    full_windows = predicted // block_size
    with tqdm(total=predicted, desc="evaluating", unit="tok", unit_scale=True, disable=not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for window in range(0, full_windows, batch_size):
            score(window * block_size, min(batch_size, full_windows - window), block_size)
        if predicted % block_size:
            score(full_windows * block_size, 1, predicted % block_size)
    return Evaluation(tokens=predicted, bytes=int(total_bytes), nats=float(nats))


def tokens_to_evaluate(config, run, tokenizer, scratch, progress):
    """The tokens to score and a description of them: --data's text, or the run's validation split."""
    if config.data:
        files = corpus_files(config.data)
        return encode_corpus(files, tokenizer, scratch, progress), f"{config.data} (all of it)"
    files = corpus_files(run["data"])
    # The run's own token cache while its corpus is unchanged, only read: the run may be training on it.
    # Otherwise the corpus is encoded privately. The split is the trainer's.
    tokens = cached_tokens(files, tokenizer, Path(config.out_dir) / "cache")
    if tokens is None:
        tokens = encode_corpus(files, tokenizer, scratch, progress)
    first, end = TokenBlocks(tokens, run["block_size"], run["val_fraction"]).ranges["val"]
    name = run["data"] or "the bundled Tiny Shakespeare"
    return tokens[first:end], f"the validation split of {name} (the last {run['val_fraction'] * 100:g}% of its tokens)"


def evaluate_run(config, progress=True):
    """Evaluate the run in config.out_dir as EvalConfig says; returns the result as a dict."""
    device = pick_device(config.device)
    run = read_run_config(config.out_dir)
    use_backend(config.backend, device)
    model, tokenizer = load_trained_model(config.out_dir, device, config.checkpoint)
    precision = choose_precision(config.dtype, device)
    if precision.warning:
        print(precision.warning, file=sys.stderr)
    # A fine-tuned GPT-2 has more positions than the blocks it was trained on: score as it was trained.
    block_size = min(run["block_size"], model.config.block_size)
    with tempfile.TemporaryDirectory(prefix="fastgpt-eval-") as scratch:
        tokens, description = tokens_to_evaluate(config, run, tokenizer, scratch, progress)
        result = evaluate_tokens(model, tokens, block_size, token_byte_lengths(tokenizer), config.batch_size,
                                 precision, progress)
    return {"checkpoint": str(Path(config.out_dir) / CHECKPOINT_FILES[config.checkpoint]), "text": description,
            "tokens": result.tokens, "bytes": result.bytes, "block_size": block_size, "dtype": precision.dtype,
            "loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}


def report(result):
    return (f"{result['checkpoint']} on {result['text']}: {result['tokens']:,} tokens, {result['bytes']:,} bytes\n"
            f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}, "
            f"{result['bits_per_byte']:.4f} bits/byte")


def main(argv=None):
    def command():
        config = parse_config(sys.argv[1:] if argv is None else argv, EvalConfig, prog="python -m fastgpt.eval",
                              description="Loss, perplexity and bits per byte of a trained model on a text.")
        result = evaluate_run(config)
        print(json.dumps(result) if config.json else report(result))
    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
