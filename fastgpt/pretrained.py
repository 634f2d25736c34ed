"""GPT-2 and Llama checkpoints in the Hugging Face layout, in and out, from and to a local directory.

`load_pretrained` gives the model and its tokenizer; `export_pretrained` writes a model and its
tokenizer so that transformers (GPT2LMHeadModel or LlamaForCausalLM, as the model's switches say) and
`load_pretrained` read them. The files themselves are fastgpt.hf's business. Nothing is downloaded.
"""

from pathlib import Path

from fastgpt import hf
from fastgpt.errors import FastGPTError
from fastgpt.hf import common
from fastgpt.model import GPT


def load_pretrained(directory):
    """The GPT (in evaluation mode) and tokenizer of the checkpoint in `directory`."""
    model = GPT.from_pretrained(directory)
    tokenizer = hf.read_tokenizer(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise FastGPTError(f"the tokenizer of {directory} has {tokenizer.vocab_size} tokens, more than the "
                           f"model's vocab_size of {model.config.vocab_size}")
    return model, tokenizer


def export_pretrained(model, tokenizer, directory):
    """Write `model` and `tokenizer` to `directory` in the Hugging Face layout that holds the model:
    GPT-2's for GPT-2's switches, Llama's for Llama's. Return the paths written.

    Loading the result with `load_pretrained`, or with transformers' model of that layout, gives the
    same weights. Nothing is written for a model or tokenizer the layout cannot hold.
    """
    contents = hf.layout_for(model.config).export_files(model, tokenizer)
    directory = Path(directory)
    taken = [name for name in contents if (directory / name).exists()]
    if taken:
        raise FastGPTError(f"{directory} already holds {', '.join(taken)}; export to an empty or new directory")
    directory.mkdir(parents=True, exist_ok=True)
    common.write_files(directory, contents)
    return [directory / name for name in contents]
