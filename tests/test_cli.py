"""The command-line programs end to end, and every bad input they must refuse cleanly."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from fastgpt import checkpoint, sample, train
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import run_cli
from fastgpt.config import PRESETS, TrainConfig, parse_config
from fastgpt.errors import FastGPTError
from fastgpt.memory_check import parameter_count
from fastgpt.model import GPT, GPTConfig
from fastgpt.settings import leaves


def test_train_then_sample_end_to_end(corpus, train_args, python, tmp_path):
    trained = python("-m", "fastgpt.train", *train_args(corpus, "run", sample_tokens=10), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "run"
    for name in ("ckpt.pt", "metrics.jsonl", "loss.png", "config.json"):
        assert (out / name).is_file(), f"training wrote no {name}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all({"step", "train_loss", "lr", "tokens", "tokens_per_sec", "elapsed_s"} <= r.keys() for r in records)
    assert [r["tokens"] for r in records] == [r["step"] * 4 * 16 for r in records]  # TINY_RUN: batch 4 x block 16
    assert "val_loss" in records[1] and "val_loss" in records[-1]
    used = json.loads((out / "config.json").read_text())
    assert used["n_layer"] == 1
    assert used["vocab_size"] == len(set(corpus.read_text())), "the char tokenizer's, not the setting's 1024"
    assert "sample" in trained.stdout

    sampled = [python("-m", "fastgpt.sample", "--out-dir", "run", "--prompt", "the fox", "--max-new-tokens", "30",
                      "--seed", "3", cwd=tmp_path) for _ in range(2)]
    assert sampled[0].returncode == 0, sampled[0].stderr
    assert sampled[0].stdout.startswith("the fox") and len(sampled[0].stdout) > len("the fox")
    assert sampled[0].stdout == sampled[1].stdout, "the same seed must give the same text"


def test_text_on_a_single_line_trains_and_samples_without_a_prompt(train_args, tmp_path, capsys):
    """With no prompt a sample starts a new line; a char tokenizer of text without one starts from its
    first character instead, both for the sample that ends training and for fastgpt.sample."""
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert train.main(train_args(one_line, tmp_path / "run", sample_tokens=10)) == 0
    assert "-" * 40 + " sample " in capsys.readouterr().out
    assert sample.main(["--out-dir", str(tmp_path / "run"), "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(" ") and len(printed) >= 6  # " ", the first of its sorted characters, and 5 more


def test_a_bpe_vocabulary_the_corpus_cannot_fill_is_pointed_out(corpus, train_args, tmp_path, capsys):
    assert train.main([*train_args(corpus, tmp_path / "run"), "--tokenizer", "bpe", "--vocab-size", "100000"]) == 0
    vocabulary = load_checkpoint(tmp_path / "run" / "ckpt.pt")["model_config"]["vocab_size"]
    assert vocabulary < 100000
    assert (f"the corpus has no more pairs to merge after {vocabulary} bpe tokens, so the vocabulary is that, "
            "not --vocab-size 100000") in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_pointed_out(corpus, train_args, tmp_path, capsys):
    assert train.main(train_args(corpus, tmp_path / "run", warmup_iters=6)) == 0  # TINY_RUN: 6 steps
    assert ("--warmup-iters 6 is not less than --max-iters 6, so the learning rate never reaches its peak"
            in capsys.readouterr().err)


def test_resume_continues_from_the_checkpoint(corpus, train_args, tmp_path):
    args = train_args(corpus, tmp_path / "run")
    assert train.main(args) == 0
    # As checkpoints were saved when the backend was part of the model's config: it still resumes.
    payload = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    payload["model_config"]["backend"] = "cpp"
    save_checkpoint(tmp_path / "run" / "ckpt.pt", payload)
    assert train.main(args + ["--max-iters", "9", "--resume"]) == 0
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 9
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9]
    # The resumed run's clock goes on from its checkpoint's (saved after the record at step 6): training
    # time so far, never back to 0.
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[4] > payload["elapsed_s"] >= elapsed[3]


def test_a_checkpoint_with_rope_base_beside_learned_positions_resumes_and_loads(corpus, train_args, tmp_path):
    """Settings now refuse rope_base with learned positions, where it computes nothing; a run saved with it
    still resumes (--resume alone) and loads as the model it is."""
    args = train_args(corpus, tmp_path / "run")
    assert train.main(args) == 0
    payload = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    payload["model_config"]["rope_base"] = payload["config"]["rope_base"] = 500.0
    save_checkpoint(tmp_path / "run" / "ckpt.pt", payload)
    assert train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--max-iters", "8"]) == 0
    model, _ = checkpoint.load_trained_model(tmp_path / "run", torch.device("cpu"))
    assert model.config.rope_base == 10000.0 and model.config.position == "learned"


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--data", "{tmp}/nope.txt"], "does not exist", id="missing corpus"),
    pytest.param(["--data", "{tmp}/empty.txt"], "empty", id="empty corpus"),
    pytest.param(["--data", "{tmp}/emptydir"], "no .txt files", id="directory without text"),
    pytest.param(["--data", "{tmp}/latin1.txt"], "not UTF-8", id="non-UTF-8 corpus"),
    pytest.param(["--data", "{tmp}/short.txt"], "fewer than block_size + 1", id="corpus shorter than a block"),
    pytest.param(["--n-layr", "2"], "did you mean --n-layer", id="unknown setting"),
    pytest.param(["--n-embd", "30", "--n-head", "4"], "divisible by n_head", id="heads do not divide width"),
    pytest.param(["--learning-rate", "-1"], "learning_rate must not be negative", id="negative learning rate"),
    pytest.param(["--block-size", "0"], "block_size must be at least 1", id="block size below one"),
    pytest.param(["--max-iters", "many"], "invalid int value", id="not a number"),
    pytest.param(["--tokenizer", "words"], "tokenizer must be one of", id="unknown tokenizer"),
    pytest.param(["--lr-schedule", "step"], "lr_schedule must be one of cosine", id="unknown schedule"),
    pytest.param(["--backend", "fastest"], "backend must be one of auto, reference", id="unknown backend"),
    pytest.param(["--resume"], "no checkpoint", id="resume without checkpoint"),
    pytest.param(["--config", "{tmp}/none.toml"], "does not exist", id="missing config file"),
    pytest.param(["--config", "{tmp}/bad.toml"], "unknown setting 'n_layers'", id="unknown key in config file"),
    pytest.param(["--config", "{tmp}/float.toml"], "bad value 2.9 (expected int)", id="float for an int in TOML"),
    pytest.param(["--config", "{tmp}/preset.toml"], "sets 'preset', which is not a setting but chooses a file of "
                 "them: that is given by the trainer's --preset flag, on the command line", id="preset in a config file"),
    pytest.param(["--config", "{tmp}/latin1.toml"], "cannot read config file", id="config file not UTF-8"),
    pytest.param(["--learning-rate", "nan"], "learning_rate must be a finite number", id="NaN learning rate"),
    pytest.param(["--seed", str(2**64)], "seed must be at most", id="seed beyond 64 bits"),
])
def test_bad_training_input_is_one_clear_line(args, expected, corpus, train_args, tmp_path, error_line):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    (tmp_path / "short.txt").write_text("abc")
    (tmp_path / "bad.toml").write_text("n_layers = 3\n")
    (tmp_path / "float.toml").write_text("max_iters = 2.9\n")
    (tmp_path / "preset.toml").write_text('preset = "modern"\n')
    (tmp_path / "latin1.toml").write_bytes("stop = ['\xe9']\n".encode("latin-1"))
    status = train.main([*train_args(corpus, tmp_path / "out"), *(a.format(tmp=tmp_path) for a in args)])
    assert status != 0
    assert expected in error_line()
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_device_cuda_without_gpu_is_a_clear_error(corpus, train_args, tmp_path, error_line):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error cannot happen here")
    assert train.main([*train_args(corpus, tmp_path / "o"), "--device", "cuda"]) != 0
    assert "no usable CUDA GPU" in error_line()


def test_a_backend_that_cannot_run_here_is_refused_before_training(corpus, train_args, python, tmp_path):
    # Without Triton's interpreter, the triton backend cannot run on a CPU.
    result = python("-m", "fastgpt.train", *train_args(corpus, tmp_path / "o", device="cpu", backend="triton"),
                    TRITON_INTERPRET="0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgpt: error: backend 'triton' cannot run on cpu tensors: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["ckpt.pt", "best.pt", "ckpt-150.pt"])
def test_existing_checkpoint_is_never_overwritten_by_a_fresh_run(name, corpus, train_args, tmp_path, error_line):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"precious")
    assert train.main([*train_args(corpus, out), "--keep-last", "1"]) != 0
    assert "--resume" in error_line()
    assert (out / name).read_bytes() == b"precious"


def test_resume_refuses_a_checkpoint_of_another_shape(corpus, train_args, tmp_path, error_line):
    out = tmp_path / "run"
    assert train.main(train_args(corpus, out)) == 0
    before = (out / "ckpt.pt").read_bytes()
    assert train.main([*train_args(corpus, out, n_embd=32, bias=False), "--resume"]) != 0
    assert "n_embd 16 vs 32, bias True vs False" in error_line()
    assert (out / "ckpt.pt").read_bytes() == before
    # A moved validation split would hold text the run has trained on.
    assert train.main([*train_args(corpus, out, val_fraction=0.2, max_iters=7), "--resume"]) != 0
    assert "val_fraction 0.1 vs 0.2" in error_line()
    # Dropout is not part of the architecture: a resumed run may change it.
    assert train.main([*train_args(corpus, out, dropout=0.1, max_iters=7), "--resume"]) == 0


def test_help_lists_every_setting_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in leaves(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f"default: {f.default!r})" in text
    assert "width of the residual stream (default: 128)" in text  # a model setting, from GPTConfig


def test_config_file_and_flags_combine_with_flags_winning(tmp_path):
    (tmp_path / "c.toml").write_text('n_layer = 3\nn_embd = 96\ntokenizer = "bpe"\nlr_schedule = "wsd"\n')
    config = parse_config(["--config", str(tmp_path / "c.toml"), "--n-layer", "5"])
    assert (config.model.n_layer, config.model.n_embd, config.tokenizer, config.lr_schedule) == (5, 96, "bpe", "wsd")
    assert config.to_dict()["n_layer"] == 5 and "model" not in config.to_dict()
    (tmp_path / "tables.toml").write_text('[model]\nn_layer = 3\n')  # as other projects group them
    with pytest.raises(FastGPTError, match=r"has a table \[model\]; settings are not grouped in tables"):
        parse_config(["--config", str(tmp_path / "tables.toml")])


@pytest.mark.parametrize("typed, meant", [
    ("--lr", "--learning-rate"),  # another project's name, which spelling alone takes to --min-lr
    ("--seq-len", "--block-size"),
    ("--batch", "--batch-size"),  # the one setting it begins; once an ambiguous abbreviation
    ("--warmup=5", "--warmup-iters"),
    ("--n-layr", "--n-layer"),  # a slip of the keyboard
])
def test_an_unknown_flag_names_the_setting_most_likely_meant(typed, meant):
    with pytest.raises(FastGPTError, match=f"unknown setting '{typed.split('=')[0]}'; did you mean {meant}\\?"):
        parse_config([typed, "5"])


def test_a_preset_is_overridden_by_a_config_file_and_flags(tmp_path, capsys):
    assert parse_config(["--preset", "gpt2"], presets=PRESETS) == TrainConfig()  # exactly the defaults
    modern = parse_config(["--preset", "modern"], presets=PRESETS)
    assert modern.model.position == "rope" and modern.optimizer == "muon"
    (tmp_path / "c.toml").write_text('position = "learned"\nn_layer = 3\n')
    config = parse_config(["--preset", "modern", "--config", str(tmp_path / "c.toml"), "--n-layer", "5"],
                          presets=PRESETS)
    assert (config.model.position, config.model.n_layer, config.optimizer) == ("learned", 5, "muon")
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "--preset NAME" in capsys.readouterr().out


def test_the_modern_preset_trains_resumes_and_samples(corpus, train_args, tmp_path, capsys):
    """Its settings together: a BPE tokenizer, Muon with weight decay, the embedding rate, the weight average."""
    tiny = train_args(corpus, tmp_path, max_iters=4, eval_interval=2, sample_tokens=8, muon_lr=0.05)
    assert train.main(["--preset", "modern", *tiny]) == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["tokenizer"]["kind"] == "bpe" and "trained_model" in checkpoint
    assert "sample" in capsys.readouterr().out
    # Resumed, the run keeps its own settings (the corpus, the tiny model, its Muon rate over the
    # preset's): only what is given changes.
    assert train.main(["--preset", "modern", "--out-dir", str(tmp_path), "--max-iters", "6", "--resume"]) == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["step"] == 6 and checkpoint["config"]["muon_lr"] == 0.05


def test_an_unknown_preset_is_one_clear_line(corpus, train_args, tmp_path, error_line):
    assert train.main([*train_args(corpus, tmp_path), "--preset", "newest"]) != 0
    assert "argument --preset: invalid choice: 'newest' (choose from 'gpt2', 'modern')" in error_line()


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--out-dir", "{tmp}/nowhere"], "no checkpoint", id="missing checkpoint"),
    pytest.param(["--out-dir", "{tmp}/corrupt"], "damaged or not a fastgpt checkpoint (UnpicklingError); train again "
                 "or restore it from a backup, or copy one of best.pt, ckpt-4.pt beside it in its place",
                 id="corrupt checkpoint"),
    pytest.param(["--temperature", "-1"], "temperature", id="negative temperature"),
    pytest.param(["--stop", "\\x"], "argument --stop: '\\\\x' has a broken escape", id="broken escape in a stop"),
    pytest.param(["--stop", ""], "an empty stop string would end every sample", id="empty stop"),
    pytest.param(["--init-from", "{tmp}/hf", "--out-dir", "{tmp}/run"], "--init-from samples from a Hugging Face "
                 "checkpoint, --out-dir and --checkpoint from a training run's: give one or the other",
                 id="two models to sample from"),
])
def test_bad_sampling_input_is_one_clear_line(args, expected, tmp_path, error_line):
    (tmp_path / "corrupt").mkdir()
    for name in ("ckpt.pt", "best.pt", "ckpt-4.pt"):
        (tmp_path / "corrupt" / name).write_bytes(b"not a checkpoint at all")
    assert sample.main([a.format(tmp=tmp_path) for a in args]) != 0
    assert expected in error_line()


def test_prompt_with_unknown_characters_is_one_clear_line(corpus, train_args, tmp_path, capsys, error_line):
    out = tmp_path / "run"
    assert train.main(train_args(corpus, out)) == 0
    capsys.readouterr()
    assert sample.main(["--out-dir", str(out), "--prompt", "Zebra ✓"]) != 0
    line = error_line()
    assert "'Z'" in line and "'✓'" in line


def test_the_trainers_help_waits_for_no_module_that_only_training_uses(python):
    """matplotlib, FSDP and torch's distributed checkpointing take most of a second each to import:
    `python -m fastgpt.train --help` (or a mistaken flag) imports none of them."""
    code = ("import sys, fastgpt.train; "
            "print([name for name in ('matplotlib', 'torch.distributed.fsdp', 'torch.distributed.checkpoint') "
            "if name in sys.modules])")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ctrl_c_while_a_command_starts_is_one_line_and_status_130(python):
    """A command spends a second or two importing torch before run_cli can catch a Ctrl-C; one then
    must not print a traceback. The child stands where `python -m fastgpt.<command>` stands after
    importing the package (sys.argv[0] is "-m" then) and interrupts itself."""
    starting = "import os, signal, sys, time; sys.argv[0] = '-m'; import fastgpt; "
    interrupt = "os.kill(os.getpid(), signal.SIGINT); time.sleep(60)"
    result = python("-c", starting + interrupt)
    assert (result.returncode, result.stderr) == (130, "fastgpt: interrupted\n")

    # Once the command runs, Ctrl-C is Python's KeyboardInterrupt again, which lets it save its work.
    handler_inside = ("from fastgpt.cli import run_cli; "
                      "run_cli(lambda: print(signal.getsignal(signal.SIGINT) is signal.default_int_handler))")
    result = python("-c", starting + handler_inside)
    assert (result.returncode, result.stdout) == (0, "True\n"), result.stderr

    # Imported as a library, fastgpt leaves Ctrl-C alone.
    result = python("-c", "import signal, fastgpt; "
                           "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert result.stdout == "True\n", result.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """`python -m fastgpt.sample ... | head -1`: the closed pipe ends the command with status 1 and no traceback."""
    program = tmp_path / "many_lines.py"
    program.write_text("import sys\nfrom fastgpt.cli import run_cli\n"
                       "sys.exit(run_cli(lambda: [print('a line') for _ in range(10**6)]))\n")
    result = subprocess.run(f"{shlex.quote(sys.executable)} {program} | head -1; exit ${{PIPESTATUS[0]}}", shell=True,
                            executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (1, "a line\n", "")

    def write_to_a_closed_socket():  # any other broken pipe is not the user's doing: a traceback
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_cli(write_to_a_closed_socket)


def test_running_out_of_memory_is_one_clear_line(capsys):
    def allocate_too_much():
        torch.empty(2**62, dtype=torch.uint8)

    assert run_cli(allocate_too_much) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastgpt: error: out of memory (tried to allocate 4294967296.0 GiB); make the batch")
    assert len(error.splitlines()) == 1

    def fail():
        raise RuntimeError("a bug, not the user's mistake")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else stays a traceback
        run_cli(fail)


def test_a_model_far_too_large_for_the_machine_is_refused_before_it_is_built(corpus, train_args, tmp_path,
                                                                              error_line):
    """It would otherwise allocate until the system swaps to a standstill or kills the process."""
    args = train_args(corpus, tmp_path / "run", n_layer=10000, n_embd=4096, n_head=32)  # 2e12 parameters
    assert train.main(args) == 2
    assert "this model and batch need at least" in error_line()
    assert not (tmp_path / "run").exists()  # nor the folder it made for itself


@pytest.mark.parametrize("switches", [{}, dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=1,
                                               bias=False, tie_embeddings=False, qk_norm=True)])
def test_the_parameter_count_of_the_memory_check_is_exact(switches):
    config = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=50, block_size=20, **switches)
    assert parameter_count(config) == sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.parametrize("writer", ["torch.save", "file.write"])
def test_a_full_disk_is_one_clear_line_and_keeps_what_was_saved(writer, tmp_path, monkeypatch, capsys):
    """torch.save turns the OSError of a full disk into a RuntimeError that does not say so: the
    error must still name the disk and the file, and the last checkpoint must stay as it was."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"the last checkpoint")
    # Writes to /dev/full fail as they would on a full disk.
    monkeypatch.setattr(checkpoint, "new_temporary_file",
                        lambda directory, prefix, suffix: (os.open("/dev/full", os.O_WRONLY), str(tmp_path / "tmp")))
    write = {"torch.save": lambda handle: torch.save({"weights": torch.zeros(1 << 18)}, handle),
             "file.write": lambda handle: handle.write(bytes(1 << 20))}[writer]
    assert run_cli(lambda: checkpoint.atomic_write(target, write)) == 2
    assert capsys.readouterr().err == (f"fastgpt: error: no room left on the disk to write {target} (No space left "
                                       "on device); free some space, then run again (a training run continues from "
                                       "its last checkpoint with --resume)\n")
    assert target.read_bytes() == b"the last checkpoint"


def test_a_finished_run_is_neither_resumed_without_steps_left_nor_taken_for_a_hugging_face_one(
        corpus, train_args, tmp_path, error_line):
    args = train_args(corpus, tmp_path / "run")
    assert train.main(args) == 0
    assert train.main([*args, "--resume"]) == 2
    assert "is at step 6, so --max-iters 6 leaves nothing to train" in error_line()
    assert train.main([*train_args(corpus, tmp_path / "other"), "--init-from", str(tmp_path / "run")]) == 2
    assert "is a fastgpt run, not a Hugging Face checkpoint; continue it with --resume" in error_line()
