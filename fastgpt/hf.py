"""GPT-2's files in the Hugging Face layout, read into fastgpt's terms and written from them.

The layout: `config.json` (the architecture), `model.safetensors` or `pytorch_model.bin` (the
weights) and `vocab.json` plus `merges.txt` (the byte-level BPE tokenizer). Nothing is downloaded.
This module knows the files; GPT.from_pretrained and fastgpt.pretrained (loading and exporting a
model with its tokenizer) build on it. It gives the model's settings as GPTConfig's fields by name.

fastgpt's GPT is GPT-2's architecture with GPT-2's parameter names, so the weights map one to one,
with two differences: Hugging Face stores the attention and MLP projections as Conv1D weights, the
transpose of nn.Linear's, and it may drop the output head, which is tied to the token embedding.

The tokenizer becomes a fastgpt `bpe` tokenizer (fastgpt.tokenizers.BPETokenizer, run by tiktoken):
GPT-2's vocabulary ids are its BPE ranks (the 256 bytes, then one token per merge in merges.txt
order), and BPETokenizer uses GPT-2's split pattern, so its state is just the tokens' bytes in id
order and a checkpoint carries it like any other. Tokens that are neither a byte nor a merge, such as
`<|endoftext|>`, keep their ids; text never encodes to them (as tiktoken's encode_ordinary), but
they decode to their text.
"""

import json
from pathlib import Path

import torch

from fastgpt.errors import FastGPTError
from fastgpt.tokenizers import BPETokenizer

# The weights Hugging Face keeps as Conv1D (in, out) matrices, where nn.Linear holds (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, which is how vocab.json spells bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) take the
    characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in characters:
            characters[b] = chr(256 + len(characters) - len(printable))
    return characters


def _files(directory, *names):
    """The paths of `names` in `directory`, or a FastGPTError naming the first one missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FastGPTError(f"{directory} is not a directory; point --init-from at a directory holding a GPT-2 "
                           "checkpoint in the Hugging Face layout (config.json, model.safetensors, vocab.json, merges.txt)")
    for name in names:
        if not (directory / name).is_file():
            raise FastGPTError(f"the GPT-2 checkpoint directory {directory} has no {name}; "
                               "it needs config.json, model.safetensors (or pytorch_model.bin), vocab.json and merges.txt")
    return [directory / name for name in names]


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastGPTError(f"cannot read {path} as JSON ({type(error).__name__}); it is damaged") from None


# ---------------------------------------------------------------------------------------------
# in


def read_config(directory):
    """GPTConfig's fields for the checkpoint in `directory`, or a FastGPTError if GPT cannot represent it."""
    (path,) = _files(directory, "config.json")
    hf = _read_json(path)
    missing = [name for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if name not in hf]
    if missing:
        raise FastGPTError(f"{path} lacks {', '.join(missing)}; it is not a GPT-2 config")
    # Each entry: setting, the value GPT has built in, and what that means.
    built_in = [
        ("model_type", "gpt2", "the GPT-2 architecture"),
        ("layer_norm_epsilon", 1e-5, "LayerNorm with eps 1e-5"),
        ("n_inner", None, "an MLP 4 times as wide as the model"),
        ("scale_attn_weights", True, "attention scores scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", False, "the same attention scale in every layer"),
        ("add_cross_attention", False, "no cross-attention"),
        ("tie_word_embeddings", True, "the output head tied to the token embedding"),
    ]
    for name, value, meaning in built_in:
        found = hf.get(name, value)
        if found != value and not (name == "n_inner" and found == 4 * hf["n_embd"]):
            raise FastGPTError(f"{path} sets {name} = {found!r}, a config the model cannot represent: "
                               f"fastgpt's GPT has {meaning} ({name} = {value!r})")
    # gelu_new and gelu_pytorch_tanh are both the tanh approximation of GELU that MLP uses.
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise FastGPTError(f"{path} sets activation_function = {activation!r}, a config the model cannot represent: "
                           "fastgpt's GPT uses the tanh approximation of GELU (gelu_new)")
    if hf["n_embd"] % hf["n_head"]:
        raise FastGPTError(f"{path} has n_embd {hf['n_embd']} not divisible by n_head {hf['n_head']}, "
                           "a config the model cannot represent")
    # GPT-2's switches are GPTConfig's defaults. Dropout only matters for fine-tuning, where the
    # training settings choose it.
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, dropout=0.0)


def read_weights(directory):
    """The tensors of model.safetensors (preferred) or pytorch_model.bin, by their Hugging Face names."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(directory / "model.safetensors")
        except (OSError, SafetensorError) as error:
            raise FastGPTError(f"cannot read {directory / 'model.safetensors'} ({error}); it is damaged") from None
    (path,) = _files(directory, "pytorch_model.bin")
    try:
        # Weights only: the safe loader never runs code from the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise FastGPTError(f"cannot read {path} ({type(error).__name__}); it is damaged") from None


def state_dict_from_hf(tensors, expected):
    """fastgpt parameter names and orientation for Hugging Face GPT-2 tensors, checked against the
    names and shapes of the state dict `expected` (the model's that is to take them)."""
    state = {}
    for name, tensor in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask, stored as a buffer by older versions: fastgpt's ops build it
        # GPT2LMHeadModel prefixes the body's names with "transformer."; a bare GPT2Model does not.
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    embedding = state.get("transformer.wte.weight")
    head = state.setdefault("lm_head.weight", embedding)
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise FastGPTError("the checkpoint's lm_head differs from its token embedding, a config the model cannot "
                           "represent: fastgpt's GPT ties them")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise FastGPTError(f"the checkpoint's weights do not fit its config.json: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise FastGPTError(f"the checkpoint's weights do not fit its config.json: {name} has shape "
                               f"{tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}")
    return state


def read_tokenizer(directory):
    """A BPETokenizer equivalent to the GPT-2 tokenizer in vocab.json and merges.txt."""
    vocab_path, merges_path = _files(directory, "vocab.json", "merges.txt")
    vocab = _read_json(vocab_path)
    byte_of = {character: b for b, character in bytes_to_unicode().items()}

    def to_bytes(token):
        # Tokens are spelt in bytes_to_unicode's characters; a special token in others is its own text.
        if all(c in byte_of for c in token):
            return bytes(byte_of[c] for c in token)
        return token.encode("utf-8")

    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        raise FastGPTError(f"{vocab_path} must map tokens to the ids 0 to N-1, each once")
    tokens = [b""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = to_bytes(token)
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


def merges_of(tokens):
    """The merges (pairs of tokens) that build each token from the ones before it, in rank order.

    A token's merge is found by running BPE on its bytes with only the lower-ranked tokens: the two
    pieces left at the end are the pair it merges. A token that does not end in two pieces (such as
    `<|endoftext|>`) is not a merge.
    """
    rank = {token: r for r, token in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) < 2:
            continue
        pieces = [token[i:i + 1] for i in range(len(token))]
        while len(pieces) > 2:
            ranks = [rank.get(a + b, r) for a, b in zip(pieces, pieces[1:])]
            best = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[best] >= r:
                break
            pieces[best:best + 2] = [pieces[best] + pieces[best + 1]]
        if len(pieces) == 2 and rank.get(pieces[0], r) < r and rank.get(pieces[1], r) < r:
            merges.append(tuple(pieces))
    return merges


def tokenizer_tokens(tokenizer):
    """The bytes of each token, in id order, of a byte-level BPE tokenizer (kinds bpe and gpt2)."""
    if tokenizer.kind == "bpe":
        return list(tokenizer.tokens)
    if tokenizer.kind == "gpt2":
        import tiktoken

        encoding = tiktoken.get_encoding("gpt2")  # cached: the tokenizer already checked
        return [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
    raise FastGPTError(f"the {tokenizer.kind} tokenizer has no GPT-2 (byte-level BPE) form; "
                       "train with --tokenizer bpe or gpt2 to export a complete GPT-2 checkpoint")


def write_weights(state, bias, directory):
    """model.safetensors from a fastgpt state dict. Without biases (bias False), zero biases are
    written, which compute the same thing: GPT-2's layout always has them."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to the token embedding; Hugging Face re-ties it on loading
        tensors[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).float().contiguous().cpu()
    if not bias:
        for name, tensor in list(tensors.items()):
            if name.endswith(".weight") and ("ln_" in name or name.endswith(CONV1D_WEIGHTS)):
                width = tensor.shape[0] if "ln_" in name else tensor.shape[1]
                tensors[name[:-len("weight")] + "bias"] = torch.zeros(width)
    save_file(tensors, Path(directory) / "model.safetensors", metadata={"format": "pt"})


def write_config(config, end_of_text, directory):
    """config.json for a model config (GPTConfig's fields by name) whose switches are GPT-2's."""
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config["vocab_size"], "n_positions": config["block_size"], "n_ctx": config["block_size"],
        "n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"], "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config["dropout"], "embd_pdrop": config["dropout"], "attn_pdrop": 0.0,
        "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": end_of_text, "eos_token_id": end_of_text,
    }
    (Path(directory) / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(tokens, directory):
    """vocab.json and merges.txt for the tokens (bytes, in id order) of a byte-level BPE tokenizer."""
    character = bytes_to_unicode()

    def spell(token):
        return "".join(character[b] for b in token)

    directory = Path(directory)
    vocab = {spell(token): i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [f"{spell(a)} {spell(b)}" for a, b in merges_of(tokens)]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
