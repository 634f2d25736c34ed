"""GPT-2 checkpoints in the Hugging Face layout, in and out, from and to a local directory.

`load_pretrained` gives the model and its tokenizer; `export_pretrained` writes a model and a
byte-level BPE tokenizer so that transformers' GPT2LMHeadModel (and `load_pretrained`) read them.
The files themselves are fastgpt.hf's business. Nothing is downloaded.
"""

from pathlib import Path

from fastgpt import hf
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT

FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def load_pretrained(directory):
    """The GPT (in evaluation mode) and tokenizer of the GPT-2 checkpoint in `directory`."""
    model = GPT.from_pretrained(directory)
    tokenizer = hf.read_tokenizer(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise FastGPTError(f"{Path(directory) / 'vocab.json'} has {tokenizer.vocab_size} tokens, more than the "
                           f"model's vocab_size of {model.config.vocab_size}")
    return model, tokenizer


def export_pretrained(model, tokenizer, directory):
    """Write `model` and `tokenizer` to `directory` in the Hugging Face GPT-2 layout; return the paths.

    Loading the result with `load_pretrained`, or with transformers' GPT2LMHeadModel.from_pretrained,
    gives the same weights. Only a model with GPT-2's switches has that layout.
    """
    # Checked first, so that nothing is written for what cannot be exported.
    tokens = hf.tokenizer_tokens(tokenizer)
    changed = model.config.non_gpt2_switches()
    if changed:
        raise FastGPTError(f"the model sets {', '.join(changed)}; GPT-2's layout holds only GPT-2's architecture")
    directory = Path(directory)
    taken = [name for name in FILES if (directory / name).exists()]
    if taken:
        raise FastGPTError(f"{directory} already holds {', '.join(taken)}; export to an empty or new directory")
    directory.mkdir(parents=True, exist_ok=True)
    hf.write_weights(model.state_dict(), model.config.bias, directory)
    end_of_text = next((i for i, t in enumerate(tokens) if t == b"<|endoftext|>"), None)
    hf.write_config(model.config.to_dict(), end_of_text, directory)
    hf.write_tokenizer(tokens, directory)
    return [directory / name for name in FILES]
