"""Llama's files in the Hugging Face layout (transformers' LlamaForCausalLM), read into fastgpt's terms
and written from them.

The layout: `config.json` (model_type "llama"), `model.safetensors` (or the shards that
`model.safetensors.index.json` lists, or `pytorch_model.bin`) and `tokenizer.json`.

Llama's architecture is fastgpt's GPT with norm rmsnorm, position rope, mlp swiglu and no qk_norm;
config.json's settings map to GPTConfig's fields so (`config_fields`):

    vocab_size -> vocab_size                  max_position_embeddings -> block_size
    num_hidden_layers -> n_layer              num_attention_heads -> n_head
    hidden_size -> n_embd                     num_key_value_heads -> n_kv_head
    intermediate_size -> mlp_hidden           rms_norm_eps -> norm_eps
    rope_theta -> rope_base                   attention_bias (= mlp_bias) -> bias
    tie_word_embeddings -> tie_embeddings

The weights map as `BLOCK` and `OUTSIDE` say: where fastgpt computes several projections with one
matrix product (queries, keys and values in c_attn; SwiGLU's gate and up in c_fc), its weight is
Llama's weights stacked by rows, in that order. Both use nn.Linear's (out, in) orientation, and
fastgpt's rotary positions pair each head's first half of channels with its second half, as
transformers' Llama does, so no weight is transposed or permuted.

The tokenizer is the tokenizer.json itself, run by the `tokenizers` library
(fastgpt.tokenizers.HuggingFaceTokenizer). Exporting writes a huggingface tokenizer's file as it is,
and a bpe or gpt2 tokenizer as a byte-level BPE tokenizer.json that encodes text as it does.
"""

import re

import tokenizers as huggingface_tokenizers
import torch

from fastgpt.hf import common
from fastgpt.tokenizers import GPT2_SPLIT_PATTERN, HuggingFaceTokenizer

NAME = "Llama"
NEEDS = "a Llama checkpoint needs config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json"

# Llama's choice of the switches that make it; every other switch has GPT-2's choice, but for those
# config.json has a setting of its own for (SETTINGS).
SWITCHES = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu"}
SETTINGS = ("norm_eps", "rope_base")

# fastgpt's modules in block i (transformer.h.i.*) and the Llama modules (model.layers.i.*) whose
# weights (and biases), stacked by rows in this order, make each one's.
BLOCK = {
    "ln_1": ("input_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "ln_2": ("post_attention_layernorm",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj": ("mlp.down_proj",),
}
# The tensors outside the blocks, fastgpt's name: Llama's.
OUTSIDE = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
BLOCK_TENSOR = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")

# What transformers' LlamaConfig assumes for a setting that config.json leaves out.
DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


def describes(hf_config):
    """Whether a config.json is Llama's: its model_type says so, or, lacking one, it names
    LlamaForCausalLM among its architectures."""
    if "model_type" in hf_config:
        return hf_config["model_type"] == "llama"
    return "LlamaForCausalLM" in (hf_config.get("architectures") or [])


def llama_names(name):
    """The Llama tensors that, stacked by rows in this order, make fastgpt's tensor `name`."""
    if name in OUTSIDE:
        return [OUTSIDE[name]]
    layer, module, kind = BLOCK_TENSOR.fullmatch(name).groups()
    return [f"model.layers.{layer}.{part}.{kind}" for part in BLOCK[module]]


def llama_parts(name, tensor, config):
    """fastgpt's tensor `name` of a model `config`, split by rows into its llama_names' tensors: {name: tensor}."""
    if ".attn.c_attn." in name:
        rows = [config.n_head * config.head_dim] + 2 * [config.kv_heads * config.head_dim]
    elif ".mlp.c_fc." in name:
        rows = 2 * [config.hidden_width]
    else:
        rows = [len(tensor)]
    return dict(zip(llama_names(name), tensor.split(rows)))


# ---------------------------------------------------------------------------------------------
# in


def config_fields(hf, path):
    """GPTConfig's fields for Llama's config.json settings `hf` (read from `path`), or a FastGPTError
    naming the first setting GPT cannot represent."""
    common.require_settings(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"), path, "Llama")
    hf = {**DEFAULTS, **hf}
    common.require_kinds(hf, path, "Llama", positive_numbers=["rms_norm_eps"],
                         flags=["tie_word_embeddings", "attention_bias", "mlp_bias"])
    common.require_heads_divide(hf, "hidden_size", "num_attention_heads", path)
    n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim != n_embd // n_head:
        raise common.unrepresentable(path, "head_dim", head_dim, f"heads of hidden_size / num_attention_heads = "
                                                                 f"{n_embd // n_head} channels")
    n_kv_head = hf.get("num_key_value_heads") or n_head
    if n_head % n_kv_head:
        raise common.unrepresentable(path, "num_key_value_heads", n_kv_head, f"key/value heads that each serve the "
                                                                            f"same number of the {n_head} query heads")
    if hf["hidden_act"] not in ("silu", "swish"):
        raise common.unrepresentable(path, "hidden_act", hf["hidden_act"], "a SiLU-gated MLP (silu)")
    if hf["attention_bias"] != hf["mlp_bias"]:
        raise common.unrepresentable(path, "attention_bias", hf["attention_bias"],
                                     f"biases in all its layers or in none (mlp_bias = {hf['mlp_bias']!r})")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head, mlp="swiglu",
                mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf["rms_norm_eps"], position="rope",
                rope_base=rope_base(hf, path), bias=hf["attention_bias"], tie_embeddings=hf["tie_word_embeddings"],
                qk_norm=False, dropout=0.0)


def rope_base(hf, path):
    """The base of the rotary frequencies (rope_theta), read where transformers writes it: in
    rope_parameters (transformers 5), or beside rope_scaling (transformers 4), which, when set, takes
    the place of rope_parameters; refused for any scaling of the positions."""
    name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(name) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise common.unrepresentable(path, name, rope, "rotary positions on all channels, unscaled (rope_type "
                                                       "'default')")
    return float(rope.get("rope_theta", hf["rope_theta"]))


def state_dict_from_hf(tensors, config, expected):
    """fastgpt's state dict from Llama's tensors, checked against the names and shapes of the state
    dict `expected` (the model's that is to take them, of `config`)."""
    # Older files keep rotary's inverse frequencies, which fastgpt's ops compute.
    tensors = {name: t for name, t in tensors.items() if not name.endswith(".rotary_emb.inv_freq")}
    state, used, missing = {}, set(), []
    for name in expected:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the token embedding's, below
        parts = llama_names(name)
        missing += [part for part in parts if part not in tensors]
        if all(part in tensors for part in parts):
            state[name] = torch.cat([tensors[part] for part in parts])
            used.update(parts)
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = common.tied_head(state["transformer.wte.weight"], tensors.get("lm_head.weight"))
        used.add("lm_head.weight")
    return common.fitted(state, expected, sorted(missing), sorted(tensors.keys() - used))


def read_tokenizer(directory):
    """The tokenizer of tokenizer.json, run by the tokenizers library."""
    return HuggingFaceTokenizer.load(common.require(directory, "tokenizer.json", NEEDS))


# ---------------------------------------------------------------------------------------------
# out


def unheld(config):
    """What of a model's config (a GPTConfig) Llama's layout has no place for: switches other than
    Llama's. ["name = value", ...]"""
    not_llamas = {name: getattr(config, name) for name, value in SWITCHES.items() if getattr(config, name) != value}
    not_gpt2s = {name: value for name, value in config.non_gpt2_switches().items()
                 if name not in (*SWITCHES, *SETTINGS)}
    return [f"{name} = {value!r}" for name, value in {**not_llamas, **not_gpt2s}.items()]


def export_files(model, tokenizer):
    """The files, by name, of `model` (one whose config this layout holds: unheld finds nothing) and
    `tokenizer` in Llama's layout; a FastGPTError if the tokenizer cannot be written as a tokenizer.json."""
    tokenizer_text = tokenizer_json(tokenizer)  # first: a tokenizer it refuses costs no copy of the weights
    return {
        "config.json": config_json(model.config, common.end_of_text(tokenizer)),
        "model.safetensors": weights(model.state_dict(), model.config),
        "tokenizer.json": tokenizer_text,
    }


def weights(state, config):
    """model.safetensors' tensors for a fastgpt state dict of a model `config`."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the token embedding; transformers ties it again on loading
        for part, rows in llama_parts(name, tensor, config).items():
            tensors[part] = common.file_tensor(rows)
    return tensors


def config_json(config, end_of_text):
    """config.json for a model config (a GPTConfig) whose switches are Llama's."""
    return common.json_text({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "hidden_size": config.n_embd, "head_dim": config.head_dim,
        "intermediate_size": config.hidden_width, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}, "rope_theta": config.rope_base,
        "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02,
        "bos_token_id": end_of_text, "eos_token_id": end_of_text,
    })


def tokenizer_json(tokenizer):
    """tokenizer.json's text: a huggingface tokenizer's own, or a bpe or gpt2 tokenizer's as byte-level
    BPE that splits text with GPT-2's pattern, as they do, so that it encodes text to the same ids."""
    if tokenizer.kind == "huggingface":
        return tokenizer.json
    tokens = common.byte_level_bpe_tokens(tokenizer, "tokenizer.json (byte-level BPE)")
    written = huggingface_tokenizers.Tokenizer(huggingface_tokenizers.models.BPE(
        common.spelt_vocabulary(tokens), common.spelt_merges(tokens)))
    written.pre_tokenizer = huggingface_tokenizers.pre_tokenizers.Sequence([
        huggingface_tokenizers.pre_tokenizers.Split(huggingface_tokenizers.Regex(GPT2_SPLIT_PATTERN), "isolated"),
        huggingface_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    written.decoder = huggingface_tokenizers.decoders.ByteLevel()
    return written.to_str()
