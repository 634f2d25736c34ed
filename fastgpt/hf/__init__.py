"""Checkpoints in the Hugging Face layout, read into fastgpt's terms and written from them, from and to
a local directory; nothing is downloaded.

Two layouts, each a module with the same functions: GPT-2's (fastgpt.hf.gpt2: GPT2LMHeadModel,
vocab.json and merges.txt) and Llama's (fastgpt.hf.llama: LlamaForCausalLM and tokenizer.json).
config.json says which one a directory holds; a model's switches say which one it is written in.
GPT.from_pretrained and fastgpt.pretrained (loading and exporting a model with its tokenizer) build
on this module. It gives the model's settings as GPTConfig's fields by name.
"""

from fastgpt.errors import FastGPTError
from fastgpt.hf import common, gpt2, llama

LAYOUTS = (gpt2, llama)


def layout_of(directory):
    """The layout of the checkpoint in `directory`, with its config.json's settings and path."""
    path = common.require(directory, "config.json", "a checkpoint in the Hugging Face layout (GPT-2's or "
                                                    "Llama's) starts with it")
    hf_config = common.read_json(path)
    if not isinstance(hf_config, dict):
        raise FastGPTError(f"{path} is not a JSON object of settings; it is damaged")
    for layout in LAYOUTS:
        if layout.describes(hf_config):
            return layout, hf_config, path
    raise FastGPTError(f"{path} sets model_type = {hf_config.get('model_type')!r}; fastgpt reads GPT-2 (gpt2) and "
                       "Llama (llama) checkpoints")


def read_config(directory):
    """GPTConfig's fields for the checkpoint in `directory`, or a FastGPTError if GPT cannot represent it."""
    layout, hf_config, path = layout_of(directory)
    return layout.config_fields(hf_config, path)


def read_state_dict(directory, config, expected):
    """The state dict, in fastgpt's names, of the checkpoint in `directory` for a model of `config` (its
    config.json's) whose state dict is `expected`: checked to have its names and shapes."""
    layout, _, _ = layout_of(directory)
    return layout.state_dict_from_hf(common.read_weights(directory, layout.NEEDS), config, expected)


def read_tokenizer(directory):
    """The tokenizer of the checkpoint in `directory`."""
    layout, _, _ = layout_of(directory)
    return layout.read_tokenizer(directory)


def layout_for(config):
    """The layout that holds a model of `config` (a GPTConfig), or a FastGPTError naming, for each
    layout, what of the model it has no place for."""
    unheld = {layout: layout.unheld(config) for layout in LAYOUTS}
    for layout, settings in unheld.items():
        if not settings:
            return layout
    places = "; ".join(f"{layout.NAME}'s has no place for {', '.join(settings)}" for layout, settings in unheld.items())
    raise FastGPTError(f"no Hugging Face layout holds this model: {places}; export a model with GPT-2's switches or "
                       f"Llama's ({', '.join(f'{name} {value}' for name, value in llama.SWITCHES.items())})")
