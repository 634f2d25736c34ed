"""Export a trained fastgpt run as a GPT-2 checkpoint in the Hugging Face layout:
`python -m fastgpt.export --out-dir out --to gpt2-export`.

The directory then holds config.json, model.safetensors, vocab.json and merges.txt, which
`transformers.GPT2LMHeadModel.from_pretrained`, `fastgpt.GPT.from_pretrained` and `--init-from` load.
Only byte-level BPE tokenizers (bpe, gpt2) have a GPT-2 form.
"""

import argparse
import sys

import torch

from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import ArgumentParser, run_cli
from fastgpt.pretrained import export_pretrained


def build_parser():
    parser = ArgumentParser(prog="python -m fastgpt.export", description=__doc__.splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="out", help="directory holding ckpt.pt from fastgpt.train")
    parser.add_argument("--to", required=True, metavar="DIR", help="directory to write the GPT-2 checkpoint to")
    return parser


def export(args):
    model, tokenizer = load_trained_model(args.out_dir, torch.device("cpu"), backend="reference")
    for path in export_pretrained(model, tokenizer, args.to):
        print(path)


def main(argv=None):
    return run_cli(lambda: export(build_parser().parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
