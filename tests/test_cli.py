"""The command-line programs end to end, and every bad input they must refuse cleanly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgpt import sample, train

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "2",
        "--sample-tokens", "10", "--warmup-iters", "2"]


def run_module(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_train_then_sample_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    trained = run_module("fastgpt.train", "--data", str(corpus), "--out-dir", "run", *TINY, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "run"
    for name in ("ckpt.pt", "metrics.jsonl", "loss.png", "config.json"):
        assert (out / name).is_file(), f"training wrote no {name}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all({"step", "train_loss", "lr", "tokens_per_sec", "elapsed_s"} <= r.keys() for r in records)
    assert "val_loss" in records[1] and "val_loss" in records[-1]
    assert json.loads((out / "config.json").read_text())["n_layer"] == 1
    assert "sample" in trained.stdout

    sampled = [run_module("fastgpt.sample", "--out-dir", "run", "--prompt", "To be", "--max-new-tokens", "30",
                          "--seed", "3", cwd=tmp_path) for _ in range(2)]
    assert sampled[0].returncode == 0, sampled[0].stderr
    assert sampled[0].stdout.startswith("To be") and len(sampled[0].stdout) > len("To be")
    assert sampled[0].stdout == sampled[1].stdout, "the same seed must give the same text"


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh\n" * 200)
    args = ["--data", str(corpus), "--out-dir", str(tmp_path / "run"), *TINY, "--sample-tokens", "0"]
    assert train.main(args) == 0
    assert train.main(args + ["--max-iters", "9", "--resume"]) == 0
    payload = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert payload["step"] == 9
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6, 8, 9]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing was printed"
    assert err[-1].startswith("fastgpt: error: "), err[-1]
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, this is a small corpus.\n" * 30)
    return path


BAD_TRAINING_INPUTS = {
    "missing corpus": (["--data", "{tmp}/nope.txt"], "does not exist"),
    "empty corpus": (["--data", "{tmp}/empty.txt"], "empty"),
    "directory without text": (["--data", "{tmp}/emptydir"], "no .txt files"),
    "non-UTF-8 corpus": (["--data", "{tmp}/latin1.txt"], "not UTF-8"),
    "corpus shorter than a block": (["--data", "{tmp}/short.txt"], "fewer than block_size + 1"),
    "unknown setting": (["--n-layr", "2"], "did you mean --n-layer"),
    "heads do not divide width": (["--n-embd", "30", "--n-head", "4"], "divisible by n_head"),
    "negative learning rate": (["--learning-rate", "-1"], "learning_rate must not be negative"),
    "block size below one": (["--block-size", "0"], "block_size must be at least 1"),
    "not a number": (["--max-iters", "many"], "invalid int value"),
    "unknown tokenizer": (["--tokenizer", "words"], "tokenizer must be one of"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
    "missing config file": (["--config", "{tmp}/none.toml"], "does not exist"),
    "unknown key in config file": (["--config", "{tmp}/bad.toml"], "unknown setting 'n_layers'"),
}


@pytest.mark.parametrize("case", BAD_TRAINING_INPUTS, ids=list(BAD_TRAINING_INPUTS))
def test_bad_training_input_is_one_clear_line(case, tmp_path, corpus, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    (tmp_path / "short.txt").write_text("abc")
    (tmp_path / "bad.toml").write_text("n_layers = 3\n")
    args, expected = BAD_TRAINING_INPUTS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if "--data" not in args:
        args += ["--data", str(corpus)]
    status = train.main(["--out-dir", str(tmp_path / "out"), *TINY, *args])
    assert status != 0
    assert expected in error_line(capsys)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_device_cuda_without_gpu_is_a_clear_error(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error cannot happen here")
    assert train.main(["--data", str(corpus), "--device", "cuda", "--out-dir", str(tmp_path / "o")]) != 0
    assert "no usable CUDA GPU" in error_line(capsys)


def test_existing_checkpoint_is_never_overwritten_by_a_fresh_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    assert train.main(["--data", str(corpus), "--out-dir", str(out), *TINY]) != 0
    assert "--resume" in error_line(capsys)
    assert (out / "ckpt.pt").read_bytes() == b"precious"


def test_resume_refuses_a_checkpoint_of_another_shape(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data", str(corpus), "--out-dir", out, *TINY, "--sample-tokens", "0"]) == 0
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    assert train.main(["--data", str(corpus), "--out-dir", out, *TINY, "--n-embd", "32", "--resume"]) != 0
    assert "n_embd 16 vs 32" in error_line(capsys)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    from dataclasses import fields

    from fastgpt.config import TrainConfig
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 128)" in text


def test_config_file_and_flags_combine_with_flags_winning(tmp_path):
    from fastgpt.config import parse_config
    (tmp_path / "c.toml").write_text('n_layer = 3\nn_embd = 96\ntokenizer = "bpe"\n')
    config, _ = parse_config(["--config", str(tmp_path / "c.toml"), "--n-layer", "5"])
    assert (config.n_layer, config.n_embd, config.tokenizer) == (5, 96, "bpe")


BAD_SAMPLING_INPUTS = {
    "missing checkpoint": (["--out-dir", "{tmp}/nowhere"], "no checkpoint"),
    "corrupt checkpoint": (["--out-dir", "{tmp}/corrupt"], "damaged"),
    "negative temperature": (["--temperature", "-1"], "temperature"),
}


@pytest.mark.parametrize("case", BAD_SAMPLING_INPUTS, ids=list(BAD_SAMPLING_INPUTS))
def test_bad_sampling_input_is_one_clear_line(case, tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    args, expected = BAD_SAMPLING_INPUTS[case]
    assert sample.main([a.format(tmp=tmp_path) for a in args]) != 0
    assert expected in error_line(capsys)


def test_prompt_with_unknown_characters_is_one_clear_line(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data", str(corpus), "--out-dir", out, *TINY, "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    assert sample.main(["--out-dir", out, "--prompt", "Zebra ✓"]) != 0
    line = error_line(capsys)
    assert "'Z'" in line and "'✓'" in line
