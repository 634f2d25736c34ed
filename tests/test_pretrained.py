"""GPT-2 checkpoints in the Hugging Face layout: loaded faithfully, exported exactly, refused clearly."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from fastgpt import GPT, export, sample, train
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.errors import FastGPTError
from fastgpt.model import GPTConfig
from fastgpt.pretrained import export_pretrained, load_pretrained
from fastgpt.tokenizers import BPETokenizer, train_tokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture(autouse=True)
def reference_kernels(backend):
    backend("reference")


@pytest.fixture(scope="module")
def tokenizer():
    trained = train_tokenizer("bpe", TEXT, 300)
    return BPETokenizer(trained.tokens + [b"<|endoftext|>"])  # as GPT-2: BPE tokens, then the special token


def write_tokenizer_files(tokenizer, directory):
    """vocab.json and merges.txt, written by exporting a throwaway model that uses the tokenizer."""
    scratch = directory.parent / (directory.name + "-scratch")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)
    export_pretrained(GPT(config), tokenizer, scratch)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(scratch / name, directory / name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A small GPT-2 with random weights (biases and LayerNorms too), saved by transformers."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=tokenizer.vocab_size,
                        bos_token_id=300, eos_token_id=300, pad_token_id=300)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    write_tokenizer_files(tokenizer, directory)
    return directory


def test_logits_match_transformers(hf_dir, tokenizer):
    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(hf_dir)
    idx = torch.tensor([tokenizer.encode(TEXT)[:24], tokenizer.encode(TEXT[40:])[:24]])
    with torch.no_grad():
        expected = hf_model(idx).logits
    logits = model(idx)[0]
    assert expected.abs().max() > 1.0  # large enough that a wrong weight could not hide
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(hf_dir, tokenizer):
    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(hf_dir)
    prompt = torch.tensor([tokenizer.encode("To be, or not")])
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=24 - prompt.size(1), do_sample=False,
                                     min_new_tokens=24 - prompt.size(1))[:, prompt.size(1):]
    ours = torch.cat(list(model.generate(prompt, expected.size(1), temperature=0)), dim=1)
    assert torch.equal(ours, expected)


@pytest.fixture(scope="module")
def hf_dir_with_gpt2_options(tmp_path_factory, tokenizer):
    """A small GPT-2 with the options of GPT-2's config.json that are fastgpt settings: another LayerNorm
    epsilon, an MLP of another width and an untied head."""
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=tokenizer.vocab_size, n_inner=48,
                        layer_norm_epsilon=1e-3, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    directory = tmp_path_factory.mktemp("gpt2-options")
    model.save_pretrained(directory)
    write_tokenizer_files(tokenizer, directory)
    return directory


def test_gpt2s_epsilon_mlp_width_and_untied_head_load_export_and_match_transformers(hf_dir_with_gpt2_options,
                                                                                    tokenizer, tmp_path):
    model, loaded_tokenizer = load_pretrained(hf_dir_with_gpt2_options)
    assert (model.config.norm_eps, model.config.mlp_hidden, model.config.tie_embeddings) == (1e-3, 48, False)
    idx = torch.tensor([tokenizer.encode(TEXT)[:24]])
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(hf_dir_with_gpt2_options).eval()(idx).logits
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-4)
        export_pretrained(model, loaded_tokenizer, tmp_path / "out")
        reloaded, _ = load_pretrained(tmp_path / "out")
        assert reloaded.config == model.config
        for name, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, model.state_dict()[name]), name
        exported = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()(idx).logits
        torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5)


def test_tokenizer_encodes_as_transformers_does(hf_dir, tokenizer):
    _, loaded = load_pretrained(hf_dir)
    reference = GPT2Tokenizer(vocab=str(hf_dir / "vocab.json"), merges=str(hf_dir / "merges.txt"))
    text = "To be, or not to be?  Whether 'tis nobler... Ünïcödé ✓ 12345\n\tend"
    assert loaded.encode(text) == reference.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.tokens == tokenizer.tokens
    assert loaded.decode([300]) == "<|endoftext|>"


def test_export_and_reload_round_trip_the_weights_exactly(hf_dir, tmp_path):
    model, tokenizer = load_pretrained(hf_dir)
    export_pretrained(model, tokenizer, tmp_path / "out")
    reloaded, reloaded_tokenizer = load_pretrained(tmp_path / "out")
    assert reloaded.config == model.config
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert reloaded_tokenizer.tokens == tokenizer.tokens
    assert (tmp_path / "out" / "merges.txt").read_text() == (hf_dir / "merges.txt").read_text()


def test_a_model_without_biases_exports_as_zero_biases_that_transformers_reads(tokenizer, tmp_path):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          bias=False)).eval()
    export_pretrained(model, tokenizer, tmp_path)
    idx = torch.tensor([tokenizer.encode(TEXT)[:16]])
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(tmp_path).eval()(idx).logits
    torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-5)


def test_export_command_writes_a_checkpoint_that_sampling_loads(tokenizer, saved_run, tmp_path, capsys):
    saved_run(tokenizer)
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "gpt2")]) == 0
    assert sample.main(["--init-from", str(tmp_path / "gpt2"), "--prompt", "To be", "--max-new-tokens", "5",
                        "--temperature", "0", "--backend", "reference"]) == 0
    assert "To be" in capsys.readouterr().out
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "gpt2")]) != 0
    assert "already holds" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.startswith(f"fastgpt: error: cannot write the export to {tmp_path / 'a-file'}")
    assert export.main(["--out-dir", str(tmp_path)]) != 0
    assert "--to DIR" in capsys.readouterr().err


def test_export_and_sample_read_the_best_checkpoint_on_request(tokenizer, saved_run, tmp_path, capsys):
    run = saved_run(tokenizer)
    (run / "ckpt.pt").rename(run / "best.pt")
    assert export.main(["--out-dir", str(run), "--to", str(tmp_path / "latest")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert export.main(["--out-dir", str(run), "--checkpoint", "best", "--to", str(tmp_path / "best")]) == 0
    exported, _ = load_pretrained(tmp_path / "best")
    for name, value in load_checkpoint(run / "best.pt")["model"].items():
        assert torch.equal(exported.state_dict()[name], value), name
    assert sample.main(["--out-dir", str(run), "--checkpoint", "best", "--prompt", "To be", "--max-new-tokens", "3",
                        "--backend", "reference"]) == 0
    assert "To be" in capsys.readouterr().out


def test_an_export_that_runs_out_of_disk_leaves_nothing_behind(tokenizer, saved_run, tmp_path, monkeypatch, capsys):
    """A half-written export would block the retry ("already holds config.json")."""
    saved_run(tokenizer)

    write_bytes = Path.write_bytes

    def disk_full_at_the_weights(path, data):  # config.json is written first
        if path.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_weights)
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "gpt2")]) == 2
    assert capsys.readouterr().err == (f"fastgpt: error: cannot write the export to {tmp_path / 'gpt2'} (No space "
                                       "left on device); choose another --to\n")
    assert list((tmp_path / "gpt2").iterdir()) == []
    monkeypatch.undo()
    assert export.main(["--out-dir", str(tmp_path), "--to", str(tmp_path / "gpt2")]) == 0


def test_a_hugging_face_checkpoint_given_as_a_run_says_to_use_init_from(hf_dir, capsys):
    assert sample.main(["--out-dir", str(hf_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"fastgpt: error: {hf_dir} holds a Hugging Face checkpoint, not a "
                                              f"fastgpt run: sample from it with --init-from {hf_dir}")


def test_a_char_tokenizer_cannot_be_exported(tmp_path):
    char = train_tokenizer("char", "abc")
    with pytest.raises(FastGPTError, match="no GPT-2"):
        export_pretrained(GPT(GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=8)), char, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_model_of_another_architecture_cannot_be_exported(tokenizer, config_with_switch, tmp_path):
    sizes = dict(vocab_size=tokenizer.vocab_size, block_size=4, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(FastGPTError, match="GPT-2's has no place for parallel_blocks = True"):
        export_pretrained(GPT(config_with_switch("parallel_blocks", False, True, **sizes)), tokenizer, tmp_path)
    assert not any(tmp_path.iterdir())
    export_pretrained(GPT(config_with_switch("parallel_blocks", False, False, **sizes)), tokenizer, tmp_path)


@pytest.mark.parametrize("changes, expected", [
    pytest.param(dict(remove=["config.json"]), "has no config.json", id="no config"),
    pytest.param(dict(remove=["model.safetensors"]),
                 "has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)", id="no weights"),
    pytest.param(dict(remove=["vocab.json"]), "has no vocab.json", id="no vocab"),
    pytest.param(dict(remove=["merges.txt"]), "has no merges.txt", id="no merges"),
    pytest.param(dict(config={"layer_norm_epsilon": 0}), "has layer_norm_epsilon 0, not a positive number",
                 id="zero epsilon"),
    pytest.param(dict(config={"n_inner": "wide"}), "has n_inner 'wide', not a positive whole number", id="width as text"),
    pytest.param(dict(config={"tie_word_embeddings": "no"}), "has tie_word_embeddings 'no', not true or false",
                 id="tie as text"),
    pytest.param(dict(config={"activation_function": "relu"}), "cannot represent", id="other activation"),
    pytest.param(dict(config={"tie_word_embeddings": False}), "missing ['lm_head.weight']", id="untied without a head"),
    pytest.param(dict(config={"n_embd": 64}), "do not fit", id="other shape"),
    pytest.param(dict(config={"n_embd": "32"}), "has n_embd '32', not a positive whole number", id="size as text"),
    pytest.param(dict(config={"n_layer": -1}), "has n_layer -1, not a positive whole number", id="negative size"),
])
def test_a_bad_checkpoint_directory_is_one_clear_line(changes, expected, hf_dir, broken_copy, capsys):
    directory = broken_copy(hf_dir, **changes)
    assert sample.main(["--init-from", str(directory), "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgpt: error: ") and expected in err[0], err


def test_pytorch_model_bin_without_the_transformer_prefix_loads_too(hf_dir, broken_copy):
    from safetensors.torch import load_file

    directory = broken_copy(hf_dir, remove=["model.safetensors"])
    tensors = load_file(hf_dir / "model.safetensors")
    torch.save({name.removeprefix("transformer."): t for name, t in tensors.items()}, directory / "pytorch_model.bin")
    loaded, _ = load_pretrained(directory)
    expected, _ = load_pretrained(hf_dir)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(idx)[0], expected(idx)[0])


def test_training_with_init_from_fine_tunes_the_pretrained_weights(hf_dir, fine_tune_at_lr_0):
    """--init-from starts from GPT-2's weights and tokenizer, on blocks shorter than its 24 positions."""
    checkpoint = fine_tune_at_lr_0(hf_dir, TEXT)
    assert checkpoint["model_config"]["n_embd"] == 32 and checkpoint["model_config"]["block_size"] == 24


def test_init_from_names_the_settings_given_that_its_model_replaces(hf_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    args = ["--data", str(corpus), "--init-from", str(hf_dir), "--out-dir", str(tmp_path / "run"), "--block-size", "16",
            "--batch-size", "2", "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0",
            "--n-layer", "8", "--tokenizer", "gpt2", "--n-embd", "32"]  # this GPT-2 is 32 wide: that one holds
    assert train.main(args) == 0
    assert (f"--init-from {hf_dir} brings its own model and tokenizer, so these settings do not apply: n_layer 8, "
            "tokenizer gpt2\n") in capsys.readouterr().err


def test_a_fine_tuning_run_resumes_without_the_folder_it_started_from(hf_dir, tmp_path, monkeypatch, capsys):
    """The checkpoint holds the model and tokenizer: --resume needs neither the pretrained folder (given
    relative to where the run began, then deleted) nor that working directory. Another --init-from is
    refused, naming it."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    shutil.copytree(hf_dir, tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--data", "corpus.txt", "--init-from", "pretrained", "--out-dir", "run", "--block-size", "16",
                       "--batch-size", "2", "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "0"]) == 0
    shutil.rmtree(tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path / "run")
    run = str(tmp_path / "run")
    assert train.main(["--out-dir", run, "--resume", "--max-iters", "3"]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert resumed["step"] == 3 and resumed["config"]["init_from"] == str(tmp_path / "pretrained")
    assert "brings its own model" not in capsys.readouterr().err  # a resumed run reads no --init-from folder
    # A checkpoint that recorded the folder relative to where it began keeps it so, wherever it resumes.
    resumed["config"]["init_from"] = "pretrained"
    save_checkpoint(tmp_path / "run" / "ckpt.pt", resumed)
    assert train.main(["--out-dir", run, "--resume", "--max-iters", "4"]) == 0
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["config"]["init_from"] == "pretrained"
    assert train.main(["--out-dir", run, "--resume", "--max-iters", "5", "--init-from", str(hf_dir)]) != 0
    assert f"init_from {tmp_path / 'run' / 'pretrained'} vs {hf_dir}" in capsys.readouterr().err


def test_init_from_a_model_with_fewer_positions_than_block_size_trains_and_counts_its_blocks(hf_dir,
                                                                                            fine_tune_at_lr_0,
                                                                                            tmp_path, capsys):
    checkpoint = fine_tune_at_lr_0(hf_dir, TEXT, block_size=64)  # the model has 24 positions
    assert "the model has 24 positions, so it trains on blocks of that many tokens, not --block-size 64" in \
        capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [r["step"] * 2 * 24 for r in records]  # batch 2 x 24 positions
    # config.json records the model trained (GPT-2's, not the default settings' 4 layers of 128), on
    # blocks of its 24 positions, and its tokenizer, so that compare and eval read what happened.
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    model = checkpoint["model_config"]
    assert {name: used[name] for name in model} == model and model["block_size"] == 24
    assert used["tokenizer"] == checkpoint["tokenizer"]["kind"] != "char"  # char: the setting's default
