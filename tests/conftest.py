"""Test set-up shared by every test module, and the fixtures several of them use.

Without a GPU, the Triton kernels are tested through Triton's interpreter on CPU tensors. The
interpreter is chosen when Triton is first imported, so the variable is set here, before any test
module can import Triton.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import make_dataclass

import pytest
import tokenizers as huggingface_tokenizers
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgpt import ops  # noqa: E402  (after TRITON_INTERPRET is settled)
from fastgpt.checkpoint import model_entries, save_checkpoint  # noqa: E402
from fastgpt.model import GPT, GPTConfig  # noqa: E402
from fastgpt.settings import setting  # noqa: E402
from fastgpt.tokenizers import train_tokenizer  # noqa: E402

# A pangram: every lowercase letter, no capitals, so that prompts can be made of known and unknown characters.
CORPUS_LINE = "line {}: the quick brown fox jumps over the lazy dog.\n"

# A training run of a few seconds: one tiny block, short blocks, a few steps logged, evaluated and saved.
TINY_RUN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=6, eval_interval=3,
                eval_iters=2, log_interval=2, sample_tokens=0, warmup_iters=2)


@pytest.fixture(autouse=True)
def automatic_backend():
    """Every test starts and ends with the automatic choice of kernels (runs set it process-wide)."""
    ops.use_backend(None)
    yield
    ops.use_backend(None)


@pytest.fixture
def backend():
    """use(name): run the ops of this test on the named backend."""
    return ops.use_backend


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small text file to train on: 60 numbered lines of a pangram."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(CORPUS_LINE.format(i) for i in range(60)))
    return path


@pytest.fixture(scope="session")
def train_args():
    """args(corpus, out_dir, name=value, ...): fastgpt.train's flags for a tiny run, with changes."""
    def args(corpus, out_dir, **changes):
        settings = {**TINY_RUN, "data": corpus, "out_dir": out_dir, **changes}
        return [item for name, value in settings.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    return args


@pytest.fixture
def error_line(capsys):
    """read(): the last line on standard error, checked to be one clean error line (no traceback)."""
    def read():
        err = capsys.readouterr().err.strip().splitlines()
        assert err, "nothing was printed"
        assert err[-1].startswith("fastgpt: error: "), err[-1]
        assert "Traceback" not in "\n".join(err)
        return err[-1]
    return read


def run_python(*args, cwd=None, timeout=300, **env):
    """Run `python ARGS` in a fresh process; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


@pytest.fixture(scope="session")
def python():
    """python(*args, cwd=None, timeout=300, **env): run Python in a fresh process."""
    return run_python


@pytest.fixture(scope="session")
def torchrun():
    """torchrun(n, *args, **env): `torchrun --standalone --nproc_per_node=n ARGS` on CPU (gloo), one thread each."""
    def run(n, *args, timeout=300, **env):
        return run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args,
                          timeout=timeout, OMP_NUM_THREADS="1", **env)
    return run


@pytest.fixture(scope="session")
def tiny_config():
    """config(name=value, ...): a small GPTConfig (2 blocks of width 32, 32 tokens, context 16)."""
    def config(**changes):
        return GPTConfig(**{**dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32), **changes})
    return config


@pytest.fixture(scope="session")
def decode_step_by_step():
    """decode(model, idx, prompt): the logits of idx (B, T) from a key/value cache, the first `prompt`
    tokens in one pass and then one token per step, as generation makes them (inference mode)."""
    def decode(model, idx, prompt):
        with torch.inference_mode():
            cache = model.new_cache()
            steps = [model(idx[:, :prompt], cache=cache)[0]]
            steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt, idx.size(1))]
        return torch.cat(steps, dim=1)
    return decode


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """model(seed=0, name=value, ...): a GPT of tiny_config's, seeded, in evaluation mode."""
    def model(seed=0, **changes):
        torch.manual_seed(seed)
        return GPT(tiny_config(**changes)).eval()
    return model


@pytest.fixture
def saved_run(tmp_path):
    """save(tokenizer, **config): a directory holding ckpt.pt of a fresh tiny GPT for that tokenizer."""
    def save(tokenizer, **changes):
        torch.manual_seed(0)
        config = GPTConfig(**{**dict(block_size=16, n_layer=1, n_head=2, n_embd=16), **changes,
                              "vocab_size": tokenizer.vocab_size})
        save_checkpoint(tmp_path / "ckpt.pt", model_entries(config, GPT(config).state_dict(), tokenizer))
        return tmp_path
    return save


@pytest.fixture(scope="session")
def char_tokenizer():
    return train_tokenizer("char", "".join(CORPUS_LINE.format(i) for i in range(60)))


@pytest.fixture(scope="session")
def config_with_switch():
    """config(name, default, value, name=value, ...): a GPTConfig with one more switch, `name`
    (default `default`), set to `value`: the config of an architecture that fastgpt's kernels and
    formats may not know. (The model itself ignores the switch.)"""
    def config(name, default, value, **changes):
        switched = make_dataclass("ConfigWithSwitch", [(name, type(default), setting(default, "a switch"))],
                                  bases=(GPTConfig,), frozen=True)
        return switched(**{name: value}, **changes)
    return config


@pytest.fixture
def broken_copy(tmp_path):
    """copy(directory, remove=(), config=None): a copy of a checkpoint directory in the Hugging Face
    layout, without the files named in `remove` and with the settings in `config` changed in its
    config.json."""
    def copy(directory, remove=(), config=None):
        broken = tmp_path / "broken"
        shutil.copytree(directory, broken)
        for name in remove:
            (broken / name).unlink()
        if config:
            settings = json.loads((broken / "config.json").read_text())
            (broken / "config.json").write_text(json.dumps({**settings, **config}))
        return broken
    return copy


@pytest.fixture(scope="session")
def byte_level_tokenizer_json():
    """train(text, vocab_size, special_token): the text of a byte-level BPE tokenizer.json (as GPT-2's
    and Llama 3's), trained on `text` by the tokenizers library, with one special token (id 0)."""
    def train(text, vocab_size, special_token):
        tokenizer = huggingface_tokenizers.Tokenizer(huggingface_tokenizers.models.BPE())
        tokenizer.pre_tokenizer = huggingface_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = huggingface_tokenizers.decoders.ByteLevel()
        trainer = huggingface_tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[special_token],
            initial_alphabet=huggingface_tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator([text], trainer)
        return tokenizer.to_str()
    return train


@pytest.fixture
def fine_tune_at_lr_0(tmp_path):
    """run(directory, text, block_size=16): train with --init-from `directory` on `text` for 2 steps at a
    learning rate of 0, on blocks of block_size tokens (the model's positions at most), and check that
    the checkpoint holds the pretrained weights exactly and resumes for a third step; returns the
    checkpoint."""
    from fastgpt import train
    from fastgpt.checkpoint import load_checkpoint
    from fastgpt.pretrained import load_pretrained

    def run(directory, text, block_size=16):
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(text)
        out = tmp_path / "run"
        args = ["--data", str(corpus), "--init-from", str(directory), "--out-dir", str(out), "--block-size", str(block_size),
                "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                "--sample-tokens", "0", "--learning-rate", "0", "--min-lr", "0", "--backend", "reference"]
        assert train.main(args) == 0
        pretrained, _ = load_pretrained(directory)
        checkpoint = load_checkpoint(out / "ckpt.pt")
        for name, value in pretrained.state_dict().items():
            torch.testing.assert_close(checkpoint["model"][name], value, rtol=0, atol=0)
        assert train.main(args[:-2] + ["--max-iters", "3", "--resume", "--backend", "reference"]) == 0
        return checkpoint
    return run
