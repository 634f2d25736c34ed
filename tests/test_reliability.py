"""Training never loses work: exact resume, signals, kills mid-save, checkpoint rotation and guards."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint
from fastgpt.model import GPT


@pytest.fixture(scope="module")
def args_for(train_args):
    """args(corpus, out_dir, *extra): a run of 8 steps with dropout on, so that resuming must restore
    dropout's random numbers too; logged every 2 steps and evaluated every 3, so that interruptions
    fall between metric lines and checkpoints."""
    def args(corpus, out_dir, *extra):
        return [*train_args(corpus, out_dir, max_iters=8, dropout=0.1, keep_last=2), *extra]
    return args


def metrics(out_dir):
    """The metrics lines without their timings, which differ from run to run."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("tokens_per_sec", "elapsed_s")} for line in lines]


def weights(out_dir):
    return load_checkpoint(out_dir / "ckpt.pt")["model"]


@pytest.fixture(scope="module")
def straight_run(corpus, args_for, tmp_path_factory):
    """One uninterrupted run of 8 steps: what every interrupted run must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight")
    assert train.main(args_for(corpus, out_dir)) == 0
    return out_dir


def assert_same_run(out_dir, reference):
    assert metrics(out_dir) == metrics(reference)
    for name, tensor in weights(reference).items():
        assert torch.equal(weights(out_dir)[name], tensor), name


def test_a_run_stopped_by_a_signal_and_resumed_equals_the_straight_run(corpus, args_for, straight_run, tmp_path,
                                                                       monkeypatch, capsys):
    # Ask to stop during step 5: between metric lines (2, 4, 6) and checkpoints (3, 6).
    original_step = train.Trainer.train_step

    def step_interrupted_at_5(self):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(self)
    monkeypatch.setattr(train.Trainer, "train_step", step_interrupted_at_5)
    assert train.main(args_for(corpus, tmp_path)) == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5
    command = capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setattr(train.Trainer, "train_step", original_step)

    # The command it printed continues it: the checkpoint holds every setting but the folder.
    assert shlex.split(command) == ["python", "-m", "fastgpt.train", "--out-dir", str(tmp_path), "--resume"]
    assert train.main(shlex.split(command)[3:]) == 0
    assert_same_run(tmp_path, straight_run)


def test_a_run_killed_after_a_checkpoint_and_resumed_equals_the_straight_run(corpus, args_for, straight_run,
                                                                              tmp_path):
    # What a run killed during its last step leaves behind: the step-6 checkpoint, but metric lines
    # (written between checkpoints) up to step 8.
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    shutil.copy(straight_run / "ckpt-6.pt", tmp_path / "ckpt.pt")
    assert train.main(args_for(corpus, tmp_path, "--resume")) == 0
    assert_same_run(tmp_path, straight_run)
    assert [line["step"] for line in metrics(tmp_path)] == [2, 3, 4, 6, 8], "steps after 6 must not be logged twice"


def test_keep_last_rotates_checkpoints_and_best_has_the_lowest_val_loss(straight_run):
    assert sorted(p.name for p in straight_run.glob("ckpt-*.pt")) == ["ckpt-6.pt", "ckpt-8.pt"]
    assert load_checkpoint(straight_run / "ckpt.pt")["step"] == 8
    evaluated = [line for line in metrics(straight_run) if "val_loss" in line]
    best = min(evaluated, key=lambda line: line["val_loss"])
    saved = load_checkpoint(straight_run / "best.pt")
    assert (saved["step"], saved["best_val_loss"]) == (best["step"], best["val_loss"])


def test_a_runs_files_are_as_readable_as_the_umask_allows(straight_run):
    """Others on a shared machine can read a run's checkpoints, token cache and plot wherever the
    user's umask lets them, as with any file a program writes (mkstemp alone makes them private)."""
    umask = os.umask(0o022)
    os.umask(umask)
    files = [path for path in straight_run.rglob("*") if path.is_file()]
    assert {"ckpt.pt", "best.pt", "config.json", "tokens.bin", "loss.png"} <= {path.name for path in files}
    modes = {str(path.relative_to(straight_run)): oct(path.stat().st_mode & 0o777) for path in files}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def start_training(args, script=None):
    command = ["-c", script, *args] if script else ["-m", "fastgpt.train", *args]
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_run_after_the_step_with_a_checkpoint(signum, corpus, args_for, tmp_path):
    child = start_training(args_for(corpus, tmp_path, "--max-iters", "100000", "--log-interval", "1"))
    try:
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.1)
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, err
    assert f"stopped by {signum.name}" in err and "--resume" in err
    step = load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert step >= 1 and f"after step {step}" in err


# Runs training, but its second checkpoint save writes half the file and then kills the process.
KILLED_MID_SAVE = textwrap.dedent("""
    import io, os, signal, sys, torch
    from fastgpt import train
    real_save, saves = torch.save, []
    def save_half_then_die(payload, handle):
        saves.append(payload)
        if len(saves) < 2:
            return real_save(payload, handle)
        buffer = io.BytesIO()
        real_save(payload, buffer)
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_half_then_die
    sys.exit(train.main(sys.argv[1:]))
""")


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(corpus, args_for, tmp_path):
    child = start_training(args_for(corpus, tmp_path), script=KILLED_MID_SAVE)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err
    assert list(tmp_path.glob(".ckpt.pt.*.tmp")), "the kill should have come in the middle of a save"
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
    assert train.main(args_for(corpus, tmp_path, "--resume")) == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 8
    assert not list(tmp_path.glob(".*.tmp")), "the half-written file should be cleaned up"


def poison_training_loss(monkeypatch, at_step):
    """Make the model's training loss NaN at one step (counted from 1), as a diverging run would."""
    original_forward, calls = GPT.forward, []

    def forward(self, idx, targets=None, cache=None):
        logits, loss = original_forward(self, idx, targets, cache)
        if self.training:
            calls.append(None)
            if len(calls) == at_step:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", forward)


def test_a_nonfinite_loss_stops_the_run_naming_the_step(corpus, args_for, tmp_path, monkeypatch, capsys):
    poison_training_loss(monkeypatch, at_step=5)
    assert train.main(args_for(corpus, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastgpt: error: the loss became nan at step 5") and "--skip-nonfinite" in err[-1]
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    assert saved["step"] == 3
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


def test_skip_nonfinite_skips_the_step_and_trains_on(corpus, args_for, tmp_path, monkeypatch, capsys):
    poison_training_loss(monkeypatch, at_step=5)
    assert train.main(args_for(corpus, tmp_path, "--skip-nonfinite")) == 0
    assert "skipped step 5" in capsys.readouterr().err
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    assert saved["step"] == 8
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


def test_no_room_for_a_checkpoint_is_refused_before_training(corpus, args_for, tmp_path, monkeypatch, error_line):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert train.main(args_for(corpus, tmp_path / "out")) == 2
    assert "MB free but a checkpoint needs about" in error_line()
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_an_unwritable_output_directory_is_refused(corpus, args_for, tmp_path, error_line):
    (tmp_path / "a-file").write_text("")
    assert train.main(args_for(corpus, tmp_path / "a-file" / "out")) == 2
    assert "cannot write to the output directory" in error_line()
    assert train.main(args_for(corpus, tmp_path / "a-file")) == 2
    assert error_line() == f"fastgpt: error: the output directory {tmp_path / 'a-file'} is a file; choose another --out-dir"


def test_resume_refuses_a_checkpoint_with_another_vocabulary(corpus, args_for, straight_run, tmp_path, error_line):
    shutil.copy(straight_run / "ckpt.pt", tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert train.main(args_for(corpus, tmp_path, "--tokenizer", "bpe", "--vocab-size", "300", "--resume")) == 2
    assert "tokenizer char vs bpe, vocab_size 1024 vs 300" in error_line()
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default_not_a_presets(straight_run, tmp_path):
    """A checkpoint saved before a setting existed trained without it: a preset given to resume it must
    not switch it on mid-run."""
    from fastgpt.config import PRESETS, parse_config

    checkpoint = load_checkpoint(straight_run / "ckpt.pt")
    del checkpoint["config"]["weight_average"]
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    config = parse_config(["--preset", "modern", "--out-dir", str(tmp_path), "--resume"], presets=PRESETS,
                          resumed_settings=train.resumed_run_settings)
    assert (config.weight_average, config.optimizer, config.max_iters) == (0, "adamw", 8)


def test_resume_set_in_a_config_file_takes_the_runs_settings_too(straight_run, tmp_path):
    from fastgpt.config import parse_config

    shutil.copy(straight_run / "ckpt.pt", tmp_path / "ckpt.pt")
    (tmp_path / "resume.toml").write_text(f'resume = true\nout_dir = "{tmp_path}"\n')
    config = parse_config(["--config", str(tmp_path / "resume.toml")], resumed_settings=train.resumed_run_settings)
    assert (config.max_iters, config.model.dropout, config.keep_last) == (8, 0.1, 2)


def test_a_run_on_a_relative_path_resumes_from_another_directory(corpus, train_args, tmp_path, monkeypatch):
    """The corpus is recorded as an absolute path, so --resume alone finds it from anywhere."""
    (tmp_path / "started_here").mkdir()
    shutil.copy(corpus, tmp_path / "started_here" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "started_here")
    assert train.main(train_args("corpus.txt", tmp_path / "run", max_iters=2)) == 0
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out-dir", "run", "--max-iters", "4", "--resume"]) == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert (checkpoint["step"], checkpoint["config"]["data"]) == (4, str(tmp_path / "started_here" / "corpus.txt"))


def test_resume_refuses_another_text_but_follows_a_moved_corpus(corpus, args_for, straight_run, tmp_path,
                                                                error_line):
    """The corpus given must hold the run's own text, even the bundled one (--data ''): the checkpoint
    keeps a digest of it. The same text moved elsewhere resumes."""
    shutil.copy(straight_run / "ckpt.pt", tmp_path / "ckpt.pt")
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().upper())
    assert train.main(args_for(other, tmp_path, "--resume", "--max-iters", "9")) == 2
    assert f"the text of {other} is not the text the checkpoint in {tmp_path} trained on" in error_line()
    assert train.main([*args_for(corpus, tmp_path, "--resume", "--max-iters", "9"), "--data", ""]) == 2
    assert "the text of the bundled corpus is not the text the checkpoint" in error_line()
    moved = tmp_path / "moved.txt"
    shutil.copy(corpus, moved)
    assert train.main(args_for(moved, tmp_path, "--resume", "--max-iters", "9")) == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["config"]["data"] == str(moved)


# Encodes a corpus into the token cache and draws a few batches, then prints its peak RSS in bytes.
DATA_PIPELINE = textwrap.dedent("""
    import resource, sys, torch
    from fastgpt.data import TokenBlocks, corpus_files, encode_corpus, fit_tokenizer
    files = corpus_files(sys.argv[1])
    tokens = encode_corpus(files, fit_tokenizer("char", files, None, 0.1), sys.argv[2])
    blocks = TokenBlocks(tokens, 64, 0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        blocks.batch("train", blocks.starts("train", 32, generator), torch.device("cpu"))
    print(len(tokens), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def peak_rss_of_data_pipeline(corpus_bytes, directory):
    directory.mkdir()
    line = "".join(chr(ord("a") + i % 26) for i in range(99)) + "\n"
    block = line * 655  # about 64 KB
    with open(directory / "corpus.txt", "w") as out:  # written a block at a time: never held whole
        for _ in range(corpus_bytes // len(block)):
            out.write(block)
    result = subprocess.run([sys.executable, "-c", DATA_PIPELINE, str(directory / "corpus.txt"),
                             str(directory / "cache")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    n_tokens, peak = map(int, result.stdout.split())
    assert n_tokens == corpus_bytes // len(block) * len(block)
    return peak


def test_data_pipeline_memory_does_not_grow_with_the_corpus(tmp_path):
    small = peak_rss_of_data_pipeline(1 << 20, tmp_path / "small")
    large = peak_rss_of_data_pipeline(200 << 20, tmp_path / "large")
    assert large - small < 40 << 20, f"peak RSS {large / 2**20:.0f} MiB for 200 MB vs {small / 2**20:.0f} MiB for 1 MB"
