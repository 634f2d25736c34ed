"""Export a trained fastgpt run as a GPT-2 or Llama checkpoint in the Hugging Face layout:
`python -m fastgpt.export --out-dir out --to my-export`.

A model with GPT-2's switches becomes config.json, model.safetensors, vocab.json and merges.txt, which
`transformers.GPT2LMHeadModel.from_pretrained` loads; one with Llama's (norm rmsnorm, position rope,
mlp swiglu) becomes config.json, model.safetensors and tokenizer.json, which
`transformers.LlamaForCausalLM.from_pretrained` loads. `fastgpt.GPT.from_pretrained` and `--init-from`
load either. Only byte-level BPE tokenizers (bpe, gpt2, and a Llama's own tokenizer.json for Llama)
can be written. Exporting runs no kernels, so it has no backend setting.
"""

import sys
from dataclasses import dataclass

import torch

from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import run_cli
from fastgpt.config import parse_config
from fastgpt.errors import FastGPTError
from fastgpt.pretrained import export_pretrained
from fastgpt.run_files import checkpoint_setting
from fastgpt.settings import setting


@dataclass
class ExportConfig:
    out_dir: str = setting("out", "directory holding ckpt.pt from fastgpt.train")
    checkpoint: str = checkpoint_setting()
    to: str = setting("", "directory to write the Hugging Face checkpoint to (required)")

    def validate(self):
        if not self.to:
            raise FastGPTError("say where to write the checkpoint with --to DIR")


def export(config):
    model, tokenizer = load_trained_model(config.out_dir, torch.device("cpu"), config.checkpoint)
    try:
        written = export_pretrained(model, tokenizer, config.to)
    except OSError as error:
        raise FastGPTError(f"cannot write the export to {config.to} ({error.strerror or error}); "
                           "choose another --to") from None
    for path in written:
        print(path)


def main(argv=None):
    return run_cli(lambda: export(parse_config(sys.argv[1:] if argv is None else argv, ExportConfig,
                                               prog="python -m fastgpt.export",
                                               description="Export a trained fastgpt run as a GPT-2 or Llama "
                                                           "checkpoint in the Hugging Face layout.")))


if __name__ == "__main__":
    sys.exit(main())
