"""Continue a prompt with a trained model: `python -m fastgpt.sample --prompt "ROMEO:"`.

The text is printed as it is generated; the same --seed gives the same text.
"""

import argparse
import sys

import torch

from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import run_cli
from fastgpt.errors import FastGPTError
from fastgpt.train import pick_device


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise FastGPTError(f"{message} (see --help)")


def build_parser():
    parser = _Parser(prog="python -m fastgpt.sample", description=__doc__.splitlines()[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="out", help="directory holding ckpt.pt from fastgpt.train")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the likeliest token; higher is more random")
    parser.add_argument("--top-k", type=int, default=200, help="sample only among the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="auto", help="kernels for attention and LayerNorm")
    return parser


def stream_text(tokenizer, token_columns):
    """Yield the text of a growing sequence of tokens as it becomes printable.

    A byte-level BPE token can end in the middle of a multi-byte character; such a tail is held back
    until the tokens that complete it arrive.
    """
    ids, shown = [], 0
    for column in token_columns:
        ids.append(int(column[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)


def sample(args, out=sys.stdout):
    if args.max_new_tokens < 0:
        raise FastGPTError(f"--max-new-tokens must not be negative (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise FastGPTError(f"--temperature must not be negative (got {args.temperature})")
    if args.top_k < 0:
        raise FastGPTError(f"--top-k must not be negative (got {args.top_k})")
    device = pick_device(args.device)
    model, tokenizer = load_trained_model(args.out_dir, device, args.backend)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise FastGPTError("the prompt is empty; give some text to continue (for example --prompt 'ROMEO:')")
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids], device=device)
    out.write(args.prompt)
    columns = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, generator=generator)
    for piece in stream_text(tokenizer, columns):
        out.write(piece)
        out.flush()
    out.write("\n")


def main(argv=None):
    return run_cli(lambda: sample(build_parser().parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
