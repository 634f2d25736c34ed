"""Llama checkpoints in the Hugging Face layout (LlamaForCausalLM, tokenizer.json): loaded faithfully,
exported exactly, refused clearly. The models are tiny and random, made by transformers here."""

import json

import pytest
import tokenizers as huggingface_tokenizers
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastgpt import GPT, export, sample
from fastgpt.errors import FastGPTError
from fastgpt.model import GPTConfig
from fastgpt.pretrained import export_pretrained, load_pretrained
from fastgpt.tokenizers import train_tokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
CONTEXT = 24
LLAMA_SWITCHES = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)


@pytest.fixture(autouse=True)
def reference_kernels(backend):
    backend("reference")


@pytest.fixture(scope="module")
def tokenizer_json(byte_level_tokenizer_json):
    return byte_level_tokenizer_json(TEXT, 300, "<|end_of_text|>")


def random_llama(vocab_size, tie, **changes):
    """A small LlamaForCausalLM (4 query heads sharing 2 key/value heads) with every weight drawn
    large enough that a wrongly mapped one could not hide."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, **changes)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama_dir(request, tmp_path_factory, tokenizer_json):
    """A random Llama saved by transformers, with its tokenizer.json."""
    directory = tmp_path_factory.mktemp("llama")
    random_llama(320, tie=request.param).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    return directory


def reference_logits(directory, idx):
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(directory).eval()(idx).logits


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_logits_match_transformers(llama_dir, kernels, backend):
    backend(kernels)
    model, tokenizer = load_pretrained(llama_dir)
    idx = torch.tensor([tokenizer.encode(TEXT)[:CONTEXT], tokenizer.encode(TEXT[40:])[:CONTEXT]])
    expected = reference_logits(llama_dir, idx)
    assert expected.abs().max() > 1.0  # large enough that a wrong weight could not hide
    torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(llama_dir):
    hf_model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    model, tokenizer = load_pretrained(llama_dir)
    prompt = torch.tensor([tokenizer.encode("To be, or not")])
    new = CONTEXT - prompt.size(1)
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    ours = torch.cat(list(model.generate(prompt, new, temperature=0)), dim=1)
    assert torch.equal(ours, expected[:, prompt.size(1):])


def test_the_tokenizer_is_tokenizer_json_run_by_the_tokenizers_library(llama_dir):
    _, tokenizer = load_pretrained(llama_dir)
    reference = huggingface_tokenizers.Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    text = "To be, or not to be?  Whether 'tis nobler... Ünïcödé ✓ 12345\n\tend"
    assert tokenizer.kind == "huggingface"
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert sum(map(len, (tokenizer.token_bytes()[i] for i in tokenizer.encode(text)))) == len(text.encode())


def test_export_round_trips_the_weights_exactly(llama_dir, tmp_path):
    model, tokenizer = load_pretrained(llama_dir)
    paths = export_pretrained(model, tokenizer, tmp_path / "out")
    assert sorted(path.name for path in paths) == ["config.json", "model.safetensors", "tokenizer.json"]
    original = LlamaForCausalLM.from_pretrained(llama_dir).state_dict()
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert exported.keys() == original.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    reloaded, reloaded_tokenizer = load_pretrained(tmp_path / "out")
    assert reloaded.config == model.config
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert reloaded_tokenizer.json == tokenizer.json


@pytest.mark.parametrize("bias", [False, True], ids=["no biases", "biases"])
def test_a_fastgpt_llama_with_a_bpe_tokenizer_exports_what_transformers_runs_alike(bias, tmp_path):
    """GPTConfig's default widths (n_kv_head 0, mlp_hidden 0) and biases are written out; the bpe
    tokenizer becomes a tokenizer.json that encodes text to the same ids."""
    bpe = train_tokenizer("bpe", TEXT, 300)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32,
                          **{**LLAMA_SWITCHES, "bias": bias})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    export_pretrained(model, bpe, tmp_path)
    written = huggingface_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "To be, or not to be?  Whether 'tis nobler... Ünïcödé ✓ 12345\n\tend <|endoftext|>'s"
    assert written.encode(text).ids == bpe.encode(text)
    idx = torch.tensor([bpe.encode(TEXT)[:16]])
    torch.testing.assert_close(model(idx)[0], reference_logits(tmp_path, idx), rtol=0, atol=1e-4)


def test_sharded_weights_load_too(tmp_path, tokenizer_json):
    random_llama(320, tie=False).save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    idx = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(GPT.from_pretrained(tmp_path)(idx)[0], reference_logits(tmp_path, idx),
                               rtol=0, atol=1e-4)


def test_training_with_init_from_fine_tunes_a_llama(llama_dir, fine_tune_at_lr_0):
    """--init-from starts from the Llama's weights and tokenizer.json, on blocks shorter than its context."""
    checkpoint = fine_tune_at_lr_0(llama_dir, TEXT)
    assert checkpoint["model_config"]["n_kv_head"] == 2 and checkpoint["tokenizer"]["kind"] == "huggingface"


def test_export_command_writes_a_llama_that_sampling_loads(saved_run, tmp_path, capsys):
    saved_run(train_tokenizer("bpe", TEXT, 300), n_kv_head=1, **LLAMA_SWITCHES)
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "llama")]) == 0
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sample.main(["--init-from", str(tmp_path / "llama"), "--prompt", "To be", "--max-new-tokens", "5",
                        "--temperature", "0", "--backend", "reference"]) == 0
    assert "To be" in capsys.readouterr().out


@pytest.mark.parametrize("changes, expected", [
    pytest.param(dict(remove=["tokenizer.json"]), "has no tokenizer.json; a Llama checkpoint needs", id="no tokenizer"),
    pytest.param(dict(remove=["model.safetensors"]),
                 "has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)", id="no weights"),
    pytest.param(dict(config={"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}),
                 "sets rope_parameters = {'rope_type': 'llama3'", id="scaled rope"),
    pytest.param(dict(config={"rope_scaling": {"type": "linear", "factor": 2.0}}),
                 "sets rope_scaling = {'type': 'linear'", id="transformers 4 scaling"),
    pytest.param(dict(config={"head_dim": 32}), "sets head_dim = 32", id="other head size"),
    pytest.param(dict(config={"attention_bias": True}), "sets attention_bias = True", id="biases in attention only"),
    pytest.param(dict(config={"hidden_act": "gelu"}), "sets hidden_act = 'gelu'", id="other activation"),
    pytest.param(dict(config={"num_key_value_heads": 3}), "sets num_key_value_heads = 3", id="uneven kv heads"),
    pytest.param(dict(config={"model_type": "mistral"}), "sets model_type = 'mistral'", id="another model"),
    pytest.param(dict(config={"intermediate_size": 64}), "do not fit", id="other shape"),
    pytest.param(dict(config={"rms_norm_eps": 0}), "has rms_norm_eps 0, not a positive number", id="zero epsilon"),
    pytest.param(dict(config={"tie_word_embeddings": "yes"}), "has tie_word_embeddings 'yes', not true or false",
                 id="tie as text"),
])
def test_a_bad_llama_directory_is_one_clear_line(changes, expected, llama_dir, broken_copy, capsys):
    directory = broken_copy(llama_dir, **changes)
    assert sample.main(["--init-from", str(directory), "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgpt: error: ") and expected in err[0], err


@pytest.mark.parametrize("switches, unheld", [
    pytest.param(dict(qk_norm=True), "Llama's has no place for qk_norm = True", id="qk_norm"),
    pytest.param(dict(mlp="relu2"), "Llama's has no place for mlp = 'relu2'", id="relu2"),
    pytest.param(dict(position="learned"), "GPT-2's has no place for norm = 'rmsnorm', mlp = 'swiglu'",
                 id="learned positions with rmsnorm"),
])
def test_a_model_neither_layout_holds_is_one_clear_error_before_any_file(switches, unheld, tmp_path):
    config = GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=16, **{**LLAMA_SWITCHES, **switches})
    with pytest.raises(FastGPTError, match="no Hugging Face layout holds this model") as error:
        export_pretrained(GPT(config), train_tokenizer("bpe", TEXT, 300), tmp_path)
    assert unheld in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_a_char_tokenizer_cannot_be_written_as_a_tokenizer_json(tmp_path):
    char = train_tokenizer("char", "abc")
    model = GPT(GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=8, **LLAMA_SWITCHES))
    with pytest.raises(FastGPTError, match="the char tokenizer has no tokenizer.json"):
        export_pretrained(model, char, tmp_path)
    assert not any(tmp_path.iterdir())
