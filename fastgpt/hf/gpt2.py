"""GPT-2's files in the Hugging Face layout, read into fastgpt's terms and written from them.

The layout: `config.json` (the architecture, model_type "gpt2"), `model.safetensors` or
`pytorch_model.bin` (the weights) and `vocab.json` plus `merges.txt` (the byte-level BPE tokenizer).

fastgpt's GPT is GPT-2's architecture with GPT-2's parameter names, so the weights map one to one,
with two differences: Hugging Face stores the attention and MLP projections as Conv1D weights, the
transpose of nn.Linear's, and it may drop the output head where that is tied to the token embedding.
Three settings of GPT-2's config.json are fastgpt settings too: layer_norm_epsilon (norm_eps),
n_inner (mlp_hidden; null: 4 n_embd) and tie_word_embeddings (tie_embeddings).

The tokenizer becomes a fastgpt `bpe` tokenizer (fastgpt.tokenizers.BPETokenizer, run by tiktoken):
GPT-2's vocabulary ids are its BPE ranks (the 256 bytes, then one token per merge in merges.txt
order), and BPETokenizer uses GPT-2's split pattern, so its state is just the tokens' bytes in id
order and a checkpoint carries it like any other. Tokens that are neither a byte nor a merge, such as
`<|endoftext|>`, keep their ids; text never encodes to them (as tiktoken's encode_ordinary), but
they decode to their text.
"""

import json

import torch

from fastgpt.errors import FastGPTError
from fastgpt.hf import common
from fastgpt.tokenizers import BPETokenizer, byte_level_bytes

NAME = "GPT-2"
NEEDS = "a GPT-2 checkpoint needs config.json, model.safetensors (or pytorch_model.bin), vocab.json and merges.txt"

# The weights Hugging Face keeps as Conv1D (in, out) matrices, where nn.Linear holds (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MLP_RATIO = 4  # GPT-2's MLP hidden layer is this many times as wide as the model


def describes(hf_config):
    """Whether a config.json is GPT-2's: its model_type says so, or, in a config old enough to lack
    model_type, the architectures it names (if any) are GPT-2's."""
    if "model_type" in hf_config:
        return hf_config["model_type"] == "gpt2"
    return all(name.startswith("GPT2") for name in hf_config.get("architectures") or [])


# ---------------------------------------------------------------------------------------------
# in


def config_fields(hf, path):
    """GPTConfig's fields for GPT-2's config.json settings `hf` (read from `path`), or a FastGPTError
    if GPT cannot represent them."""
    common.require_settings(hf, ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"), path, "GPT-2")
    # Each entry: setting, the value GPT has built in, and what that means.
    built_in = [
        ("scale_attn_weights", True, "attention scores scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", False, "the same attention scale in every layer"),
        ("add_cross_attention", False, "no cross-attention"),
    ]
    for name, value, meaning in built_in:
        found = hf.get(name, value)
        if found != value:
            raise common.unrepresentable(path, name, found, f"{meaning} ({name} = {value!r})")
    # gelu_new and gelu_pytorch_tanh are both the tanh approximation of GELU that MLP uses.
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise common.unrepresentable(path, "activation_function", activation,
                                     "the tanh approximation of GELU (gelu_new)")
    common.require_heads_divide(hf, "n_embd", "n_head", path)
    hf = {"layer_norm_epsilon": 1e-5, "n_inner": None, "tie_word_embeddings": True, **hf}
    common.require_kinds(hf, path, "GPT-2", positive_numbers=["layer_norm_epsilon"], flags=["tie_word_embeddings"])
    if hf["n_inner"] is not None:  # null: 4 n_embd
        common.require_settings(hf, ["n_inner"], path, "GPT-2")
    # GPT-2's switches are GPTConfig's defaults. Dropout only matters for fine-tuning, where the
    # training settings choose it.
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=float(hf["layer_norm_epsilon"]),
                mlp_hidden=0 if hf["n_inner"] in (None, MLP_RATIO * hf["n_embd"]) else hf["n_inner"],
                tie_embeddings=hf["tie_word_embeddings"], bias=True, dropout=0.0)


def state_dict_from_hf(tensors, config, expected):
    """fastgpt parameter names and orientation for Hugging Face GPT-2 tensors, checked against the
    names and shapes of the state dict `expected` (the model's that is to take them, of `config`)."""
    state = {}
    for name, tensor in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask, stored as a buffer by older versions: fastgpt's ops build it
        # GPT2LMHeadModel prefixes the body's names with "transformer."; a bare GPT2Model does not.
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = common.tied_head(state["transformer.wte.weight"], state.get("lm_head.weight"))
    return common.fitted(state, expected, sorted(expected.keys() - state.keys()),
                         sorted(state.keys() - expected.keys()))


def read_tokenizer(directory):
    """A BPETokenizer equivalent to the GPT-2 tokenizer in vocab.json and merges.txt."""
    vocab_path = common.require(directory, "vocab.json", NEEDS)
    merges_path = common.require(directory, "merges.txt", NEEDS)
    vocab = common.read_json(vocab_path)
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        raise FastGPTError(f"{vocab_path} must map tokens to the ids 0 to N-1, each once")
    tokens = [b""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = byte_level_bytes(token)
    missing_bytes = {bytes([b]) for b in range(256)} - set(tokens)
    if missing_bytes:
        raise FastGPTError(f"{vocab_path} lacks {len(missing_bytes)} of the 256 single bytes; it is not a "
                           "byte-level BPE vocabulary")
    # tiktoken applies merges in the order of their ids, so the ids must follow merges.txt.
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FastGPTError(f"cannot read {merges_path} ({type(error).__name__})") from None
    previous = -1
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = line.split(" ")
        merged = vocab.get("".join(pair)) if len(pair) == 2 else None
        if merged is None or merged <= previous:
            raise FastGPTError(f"line {number} of {merges_path} ({line!r}) is not a merge of two tokens into a "
                               f"token of vocab.json with a higher id than the merge before it")
        previous = merged
    return BPETokenizer(tokens)


# ---------------------------------------------------------------------------------------------
# out


def unheld(config):
    """What of a model's config (a GPTConfig) GPT-2's layout has no place for: its switches other than
    GPT-2's (but the norms' epsilon, which config.json holds), and shared key/value heads.
    ["name = value", ...]"""
    switches = [f"{name} = {value!r}" for name, value in config.non_gpt2_switches().items() if name != "norm_eps"]
    return switches + ([f"n_kv_head = {config.n_kv_head}"] if config.kv_heads != config.n_head else [])


def export_files(model, tokenizer):
    """The files, by name, of `model` (one whose config this layout holds: unheld finds nothing) and
    `tokenizer` in GPT-2's layout; a FastGPTError if the tokenizer has no GPT-2 form."""
    tokens = common.byte_level_bpe_tokens(tokenizer, "GPT-2 (byte-level BPE)")
    merges = "".join(f"{a} {b}\n" for a, b in common.spelt_merges(tokens))
    return {
        "config.json": config_json(model.config, common.end_of_text(tokenizer)),
        "model.safetensors": weights(model.state_dict(), model.config),
        "vocab.json": json.dumps(common.spelt_vocabulary(tokens), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + merges,
    }


def weights(state, config):
    """model.safetensors' tensors for a fastgpt state dict of a model of `config`. Without biases (bias
    False), zero biases are written, which compute the same thing: GPT-2's layout always has them."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the token embedding; Hugging Face re-ties it on loading
        tensors[name] = common.file_tensor(tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor)
    if not config.bias:
        for name, tensor in list(tensors.items()):
            if name.endswith(".weight") and ("ln_" in name or name.endswith(CONV1D_WEIGHTS)):
                width = tensor.shape[0] if "ln_" in name else tensor.shape[1]
                tensors[name[:-len("weight")] + "bias"] = torch.zeros(width)
    return tensors


def config_json(config, end_of_text):
    """config.json for a model config (a GPTConfig) whose switches are GPT-2's."""
    return common.json_text({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "n_inner": None if config.hidden_width == MLP_RATIO * config.n_embd else config.hidden_width,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": end_of_text, "eos_token_id": end_of_text,
    })
