"""What the Hugging Face layouts (fastgpt.hf.gpt2, fastgpt.hf.llama) share.

Finding and reading a checkpoint's files, checking its weights against the model that is to take
them, refusing a setting the model cannot represent, writing files, and the spelling of byte-level
BPE tokens (vocabulary and merges) that GPT-2's vocab.json and merges.txt and a byte-level
tokenizer.json both use.
"""

import json
from pathlib import Path

import torch

from fastgpt.errors import FastGPTError
from fastgpt.run_files import CHECKPOINT_FILES
from fastgpt.tokenizers import bytes_to_unicode

# A checkpoint too large for one file splits its weights into shards that this file lists.
SHARD_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# reading


def checkpoint_directory(directory):
    """`directory` as a Path, or a FastGPTError if it is not a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        # Said to the command line's --init-from and to GPT.from_pretrained alike.
        raise FastGPTError(f"{directory} is not a directory; a GPT-2 or Llama checkpoint in the Hugging Face layout "
                           "is a directory holding config.json, model.safetensors, ...")
    if (directory / CHECKPOINT_FILES["latest"]).is_file():
        raise FastGPTError(f"{directory} is a fastgpt run, not a Hugging Face checkpoint; continue it with --resume "
                           f"--out-dir {directory}, sample from it with --out-dir {directory}, or convert it with "
                           "`python -m fastgpt.export`")
    return directory


def require(directory, name, needs):
    """The path of the file `name` in `directory`, or a FastGPTError naming it and saying what the
    directory `needs` (a sentence)."""
    path = checkpoint_directory(directory) / name
    if not path.is_file():
        raise FastGPTError(f"the checkpoint directory {directory} has no {name}; {needs}")
    return path


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastGPTError(f"cannot read {path} as JSON ({type(error).__name__}); it is damaged") from None


def require_settings(hf_config, names, path, architecture):
    """Refuse a config.json that lacks any of the sizes `names`, which `architecture` states, or gives
    one that is not a positive whole number."""
    missing = [name for name in names if name not in hf_config]
    if missing:
        raise FastGPTError(f"{path} lacks {', '.join(missing)}; it is not a {architecture} config")
    for name in names:
        value = hf_config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FastGPTError(f"{path} has {name} {value!r}, not a positive whole number; it is not a valid "
                               f"{architecture} config")


def require_kinds(hf_config, path, architecture, positive_numbers=(), flags=()):
    """Refuse a config.json whose settings named in `positive_numbers` are not positive numbers, or in
    `flags` not true or false (each name present: a layout fills in its defaults first)."""
    for name in positive_numbers:
        value = hf_config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise FastGPTError(f"{path} has {name} {value!r}, not a positive number; it is not a valid "
                               f"{architecture} config")
    for name in flags:
        if not isinstance(hf_config[name], bool):
            raise FastGPTError(f"{path} has {name} {hf_config[name]!r}, not true or false; it is not a valid "
                               f"{architecture} config")


def require_heads_divide(hf_config, width, heads, path):
    """Refuse a config.json whose model width (the setting named `width`) its number of attention heads
    (`heads`) does not divide: each head gets an equal share of the channels."""
    if hf_config[width] % hf_config[heads]:
        raise FastGPTError(f"{path} has {width} {hf_config[width]} not divisible by {heads} {hf_config[heads]}, "
                           "a config the model cannot represent")


def unrepresentable(path, name, found, fastgpt_has):
    """The error for config.json's setting `name` = `found`, which fastgpt's GPT cannot represent:
    it has `fastgpt_has` instead."""
    return FastGPTError(f"{path} sets {name} = {found!r}, a config the model cannot represent: "
                        f"fastgpt's GPT has {fastgpt_has}")


def read_weights(directory, needs):
    """The tensors of model.safetensors, of the shards model.safetensors.index.json lists, or of
    pytorch_model.bin (the first of these there is), by their Hugging Face names."""
    directory = checkpoint_directory(directory)
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / SHARD_INDEX).is_file():
        tensors = {}
        for shard in shards(directory / SHARD_INDEX):
            tensors.update(read_safetensors(require(directory, shard, needs)))
        return tensors
    path = directory / "pytorch_model.bin"
    if not path.is_file():
        raise FastGPTError(f"the checkpoint directory {directory} has no weights (model.safetensors, "
                           f"{SHARD_INDEX} or pytorch_model.bin); {needs}")
    try:
        # Weights only: the safe loader never runs code from the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise FastGPTError(f"cannot read {path} ({type(error).__name__}); it is damaged") from None


def shards(index_path):
    """The files a shard index names (its weight_map: tensor name -> file), each once."""
    weight_map = read_json(index_path)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise FastGPTError(f"{index_path} has no weight_map from tensor names to files; it is damaged")
    return sorted(set(weight_map.values()))


def read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise FastGPTError(f"cannot read {path} ({error}); it is damaged") from None


def tied_head(embedding, head):
    """The output head of a model that ties it to the token embedding: the embedding, which a head
    stored beside it (`head`, or None) must equal."""
    if head is not None and not torch.equal(head, embedding):
        raise FastGPTError("the checkpoint's lm_head differs from its token embedding, a config the model cannot "
                           "represent: its config ties them")
    return embedding


def fitted(state, expected, missing, unexpected):
    """`state` (fastgpt's names), once checked to fit the state dict `expected` (the model's that is to
    take it): nothing `missing` or `unexpected` (lists of the tensors' names) and every shape right."""
    if missing or unexpected:
        raise FastGPTError(f"the checkpoint's weights do not fit its config.json: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise FastGPTError(f"the checkpoint's weights do not fit its config.json: {name} has shape "
                               f"{tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}")
    return state


# ---------------------------------------------------------------------------------------------
# writing


def file_tensor(tensor):
    """A float32 copy of `tensor` on the CPU, contiguous and sharing memory with no other tensor, as
    safetensors stores tensors."""
    return tensor.detach().cpu().float().clone(memory_format=torch.contiguous_format)


def json_text(settings):
    return json.dumps(settings, indent=2) + "\n"


def write_files(directory, contents):
    """Write each file of `contents` (name -> text, or name -> tensors for a safetensors file). If one
    cannot be written (a full disk, say), none is left behind, and the OSError says why."""
    from safetensors.torch import save

    try:
        for name, content in contents.items():
            # safetensors' own save_file reports a failed write as its own error, not an OSError.
            data = content.encode() if isinstance(content, str) else save(content, metadata={"format": "pt"})
            (directory / name).write_bytes(data)
    except BaseException:
        for name in contents:
            (directory / name).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# byte-level BPE tokens, spelt as Hugging Face spells them


def byte_level_bpe_tokens(tokenizer, form):
    """The bytes of each token, in id order, of a byte-level BPE tokenizer with GPT-2's split (kinds
    bpe and gpt2), which can be written in `form` (as the error names it)."""
    if tokenizer.kind in ("bpe", "gpt2"):
        return tokenizer.token_bytes()
    raise FastGPTError(f"the {tokenizer.kind} tokenizer has no {form} form; "
                       "train with --tokenizer bpe or gpt2 to export a complete checkpoint")


def end_of_text(tokenizer):
    """The id of GPT-2's `<|endoftext|>` token, or None: what config.json names as bos and eos."""
    return next((i for i, token in enumerate(tokenizer.token_bytes()) if token == b"<|endoftext|>"), None)


def spell(token):
    """A token's bytes in bytes_to_unicode's characters."""
    character = bytes_to_unicode()
    return "".join(character[b] for b in token)


def spelt_vocabulary(tokens):
    """{spelt token: id} for the tokens (bytes, in id order)."""
    return {spell(token): i for i, token in enumerate(tokens)}


def spelt_merges(tokens):
    """The merges of the tokens (bytes, in id order), each a pair of spelt tokens, in rank order."""
    return [(spell(a), spell(b)) for a, b in merges_of(tokens)]


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
