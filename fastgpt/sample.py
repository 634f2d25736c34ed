"""Continue a prompt with a trained model: `python -m fastgpt.sample --prompt "ROMEO:"`.

The text is printed as it is generated; the same --seed gives the same text. --init-from DIR samples
from a GPT-2 checkpoint in the Hugging Face layout instead of a fastgpt run; --interactive reads one
prompt per line from standard input.

In Python, `generate_text` streams the same text and `complete` returns it whole:

    model, tokenizer = load_trained_model("out", "cpu")
    texts = complete(model, tokenizer, "ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=1)
"""

import argparse
import sys

import torch

from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import ArgumentParser, run_cli
from fastgpt.errors import FastGPTError
from fastgpt.model import Sampler
from fastgpt.train import pick_device


class TextStream:
    """One sample's text as its tokens arrive: what is final and not yet shown, cut at a stop string.

    Two kinds of tail are held back until the next tokens settle them: a byte-level BPE token can end
    in the middle of a multi-byte character, and the text can end with the start of a stop string.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids, self.shown, self.done = [], 0, False

    def add(self, token):
        """Take the next token id; return the newly final text (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        stops = [text.find(s) for s in self.stop if s in text]
        if stops:
            self.done = True
            return self._show(text, min(stops))
        if text.endswith("\ufffd"):
            return ""
        pending = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._show(text, len(text) - pending)

    def finish(self):
        """The text still held back once generation has ended without a stop string."""
        return "" if self.done else self._show(self.tokenizer.decode(self.ids), None)

    def _show(self, text, end):
        piece = text[self.shown:end]
        self.shown += len(piece)
        return piece


def generate_text(model, tokenizer, prompt, max_new_tokens=200, num_samples=1, stop=(), seed=None, **sampling):
    """Yield (i, text) pieces of the continuations of `prompt`, sample i of num_samples, as they are made.

    Each sample ends at the first of its stop strings (left out of the text) or after max_new_tokens
    tokens. `seed` makes the samples reproducible. `sampling` goes to GPT.generate: temperature,
    top_k, top_p, repetition_penalty, use_cache. The prompt is checked here, before the first piece.
    """
    if max_new_tokens < 0 or num_samples < 1:
        raise FastGPTError(f"max_new_tokens must not be negative and num_samples must be at least 1 "
                           f"(got {max_new_tokens} and {num_samples})")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise FastGPTError("the prompt is empty; give some text to continue (for example --prompt 'ROMEO:')")
    device = model.lm_head.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    columns = model.generate(idx, max_new_tokens, generator=generator, **sampling)
    return _pieces(columns, [TextStream(tokenizer, stop) for _ in range(num_samples)])


def _pieces(columns, streams):
    for column in columns:
        for i, stream in enumerate(streams):
            piece = "" if stream.done else stream.add(int(column[i]))
            if piece:
                yield i, piece
        if all(stream.done for stream in streams):
            return
    for i, stream in enumerate(streams):
        piece = stream.finish()
        if piece:
            yield i, piece


def complete(model, tokenizer, prompt, **options):
    """The continuations of `prompt`, one string per sample; `options` as for generate_text."""
    texts = [""] * options.get("num_samples", 1)
    for i, piece in generate_text(model, tokenizer, prompt, **options):
        texts[i] += piece
    return texts


def _unescape(text):
    """`\\n`, `\\t` and other backslash escapes in a flag's value, so that stop strings can span lines."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def build_parser():
    parser = ArgumentParser(prog="python -m fastgpt.sample", description=__doc__.splitlines()[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="out", help="directory holding ckpt.pt from fastgpt.train")
    parser.add_argument("--init-from", metavar="DIR", help="sample from the GPT-2 checkpoint in DIR (Hugging Face "
                        "layout: config.json, model.safetensors, vocab.json, merges.txt) instead of --out-dir")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--interactive", action="store_true", help="read prompts from standard input, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to generate at once, for each prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the likeliest token; higher is more random")
    parser.add_argument("--top-k", type=int, default=200, help="sample only among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample only among the likeliest tokens whose probabilities add up to p, in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1 makes tokens already in the text less likely")
    parser.add_argument("--stop", action="append", default=[], type=_unescape, metavar="TEXT",
                        help="end a sample where this text appears (repeatable; backslash escapes like \\n work)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="auto", help="kernels for attention and LayerNorm")
    return parser


def write_samples(pieces, prompt, num_samples, out):
    """Print sample 0 as it is generated, then the others, each after the prompt and a rule."""
    held = [""] * num_samples
    out.write(prompt)
    for i, piece in pieces:
        if i == 0:
            out.write(piece)
            out.flush()
        else:
            held[i] += piece
    for text in held[1:]:
        out.write("\n" + "-" * 40 + "\n" + prompt + text)
    out.write("\n")
    out.flush()


def sample(args, out=None, prompts=None):
    """Run the sampler for parsed `args`, printing to `out` and, with --interactive, reading `prompts`."""
    out = out or sys.stdout
    if args.top_k < 0:
        raise FastGPTError(f"--top-k must not be negative (got {args.top_k})")
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)
    Sampler(**sampling)  # refuses bad settings before anything is loaded or printed
    if args.max_new_tokens < 0:
        raise FastGPTError(f"--max-new-tokens must not be negative (got {args.max_new_tokens})")
    if args.num_samples < 1:
        raise FastGPTError(f"--num-samples must be at least 1 (got {args.num_samples})")
    device = pick_device(args.device)
    if args.init_from:
        from fastgpt.pretrained import load_pretrained

        model, tokenizer = load_pretrained(args.init_from, args.backend)
        model.to(device)
    else:
        model, tokenizer = load_trained_model(args.out_dir, device, args.backend)

    def run(prompt):
        pieces = generate_text(model, tokenizer, prompt, args.max_new_tokens, args.num_samples, args.stop,
                               args.seed, **sampling)
        write_samples(pieces, prompt, args.num_samples, out)

    if not args.interactive:
        run(args.prompt)
        return
    for line in prompts or sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            run(prompt)
        except FastGPTError as error:  # one bad prompt does not end the session
            out.flush()
            print(f"fastgpt: error: {error}", file=sys.stderr)


def main(argv=None):
    return run_cli(lambda: sample(build_parser().parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
