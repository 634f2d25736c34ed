"""Training under torchrun on CPU (gloo): N processes equal one process with an N times larger batch.

Each run here is a real `torchrun --nproc_per_node=2 -m fastgpt.train` launched by the test.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint

# Global batch 8: one process with batch 8, or two processes with batch 4 each.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "4",
        "--eval-interval", "2", "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0",
        "--warmup-iters", "1", "--grad-accum-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"{i}: a stitch in time saves nine, and many hands make light work.\n" for i in range(50)))
    return path


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one")
    assert train.main(["--data", str(corpus), "--out-dir", str(out_dir), *TINY, "--batch-size", "8"]) == 0
    return out_dir


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(request, corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastgpt.train",
         "--data", str(corpus), "--out-dir", str(out_dir), *TINY, "--batch-size", "4", "--parallel", request.param],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def losses(out_dir):
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["train_loss"], line.get("val_loss")) for line in lines]


def assert_same_losses(out_dir, reference):
    got, expected = losses(out_dir), losses(reference)
    assert [line[0] for line in got] == [line[0] for line in expected] == [1, 2, 3, 4]
    for (step, train_loss, val_loss), (_, expected_train, expected_val) in zip(got, expected):
        assert train_loss == pytest.approx(expected_train, rel=1e-5), f"train loss at step {step}"
        # Validation loss exists only at evaluation steps, on both sides alike.
        assert (val_loss is None) == (expected_val is None), f"evaluated at step {step} on one side only"
        if expected_val is not None:
            assert val_loss == pytest.approx(expected_val, rel=1e-5), f"val loss at step {step}"


def test_two_processes_match_one_process_step_by_step(two_processes, one_process):
    assert_same_losses(two_processes, one_process)
    ours, reference = load_checkpoint(two_processes / "ckpt.pt"), load_checkpoint(one_process / "ckpt.pt")
    assert ours["step"] == 4
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # Only rank 0 writes: a single metrics line per step.
    assert len(losses(two_processes)) == 4


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, tmp_path, corpus):
    shutil.copytree(two_processes, tmp_path, dirs_exist_ok=True)
    shutil.copy(two_processes / "ckpt-2.pt", tmp_path / "ckpt.pt")
    assert train.main(["--data", str(corpus), "--out-dir", str(tmp_path), *TINY, "--batch-size", "8",
                       "--resume"]) == 0
    assert_same_losses(tmp_path, one_process)
