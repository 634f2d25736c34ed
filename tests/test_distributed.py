"""Training under torchrun on CPU (gloo): N processes equal one process with an N times larger batch.

Each run here is a real `torchrun --nproc_per_node=2 ...` launched by the test.
"""

import json
import shutil
import textwrap

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint

# Global batch 8: one process with batch 8, or two processes with batch 4 each. In fp32, because bf16's
# rounding (auto's choice on a CPU with native bf16) differs between one batch of 8 and two of 4. With a
# weight average, which FSDP shards like the weights: evaluated, saved and resumed as one process does.
# With Muon, whose orthogonalisation under FSDP runs on the sharded matrices (DTensors) and must give
# what it gives on whole ones, and AdamW for the rest.
RUN = dict(n_layer=2, max_iters=4, eval_interval=2, log_interval=1, warmup_iters=1, grad_accum_steps=2, device="cpu",
           dtype="float32", weight_average=0.5, optimizer="muon")


@pytest.fixture(scope="module")
def one_process(corpus, train_args, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one")
    assert train.main(train_args(corpus, out_dir, **RUN, batch_size=8)) == 0
    return out_dir


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(request, corpus, train_args, torchrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    # Ending with a sample, as a run does by default: in fp32 on a CPU the model decodes with the fused C++
    # block where it can, which must not be handed FSDP's shards.
    result = torchrun(2, "-m", "fastgpt.train", *train_args(corpus, out_dir, **RUN, batch_size=4,
                                                            parallel=request.param, sample_tokens=8))
    assert result.returncode == 0, result.stderr[-3000:]
    assert " sample " in result.stdout
    return out_dir


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir):
    return [(line["step"], line["train_loss"], line.get("val_loss")) for line in records(out_dir)]


def assert_same_losses(out_dir, reference):
    got, expected = losses(out_dir), losses(reference)
    assert [line[0] for line in got] == [line[0] for line in expected] == [1, 2, 3, 4]
    # The tokens trained on count every process's: two batches of 4 are one of 8.
    assert [line["tokens"] for line in records(out_dir)] == [line["tokens"] for line in records(reference)]
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
    for entry in ("model", "trained_model"):
        for name, tensor in reference[entry].items():
            torch.testing.assert_close(ours[entry][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{entry} {name}")
    # Only rank 0 writes: a single metrics line per step.
    assert len(losses(two_processes)) == 4


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, corpus, train_args, tmp_path):
    shutil.copytree(two_processes, tmp_path, dirs_exist_ok=True)
    shutil.copy(two_processes / "ckpt-2.pt", tmp_path / "ckpt.pt")
    assert train.main([*train_args(corpus, tmp_path, **RUN, batch_size=8), "--resume"]) == 0
    assert_same_losses(tmp_path, one_process)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_in_bf16_autocast_close_to_one_in_fp32(parallel, one_process, corpus, train_args,
                                                                   torchrun, tmp_path):
    # bf16 is what `auto` picks on a CPU with native bf16 (on others it is emulated: slower, the same numbers).
    # Without the weight average, which leaves the train losses compared here alone.
    result = torchrun(2, "-m", "fastgpt.train", *train_args(corpus, tmp_path, **{**RUN, "dtype": "bfloat16",
                                                                                 "weight_average": 0.0},
                                                            batch_size=4, parallel=parallel))
    assert result.returncode == 0, result.stderr[-3000:]
    got, expected = losses(tmp_path), losses(one_process)
    assert [line[0] for line in got] == [line[0] for line in expected]
    for (step, train_loss, _), (_, expected_train, _) in zip(got, expected):
        assert train_loss == pytest.approx(expected_train, rel=2e-2), f"train loss at step {step}"


# Trains under torchrun as fastgpt.train would, recording for each forward pass of the model whether
# it ran in training mode and whether torch.compile had traced it; rank 0 prints what it saw.
# torch.compile is given the "eager" backend: what is compiled matters here, not how fast.
RECORD_COMPILED_FORWARDS = textwrap.dedent("""
    import os, sys, torch
    from fastgpt import train
    from fastgpt.model import GPT
    compile_, forward, seen = torch.compile, GPT.forward, set()
    torch.compile = lambda model, **options: compile_(model, backend="eager")
    @torch.compiler.disable  # run as it is, called with what the (possibly traced) forward saw
    def record(training, compiling):
        seen.add((training, compiling))
    def recording_forward(self, idx, targets=None, cache=None):
        record(self.training, torch.compiler.is_compiling())
        return forward(self, idx, targets, cache)
    GPT.forward = recording_forward
    status = train.main(sys.argv[1:])
    if os.environ["RANK"] == "0":
        print("seen:", sorted(seen))
    sys.exit(status)
""")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compile_compiles_what_trains(parallel, corpus, train_args, torchrun, tmp_path):
    script = tmp_path / "train_recording_forwards.py"
    script.write_text(RECORD_COMPILED_FORWARDS)
    result = torchrun(2, script, *train_args(corpus, tmp_path / "out", **RUN, batch_size=4, parallel=parallel,
                                             compile=True))
    assert result.returncode == 0, result.stderr[-3000:]
    seen = result.stdout.split("seen:")[-1].strip()
    assert seen == "[(False, True), (True, True)]", "training and evaluation must both run the compiled model"


# Trains under torchrun with a 5-second collective timeout, while rank 0 takes 12 seconds to fit
# the tokenizer and as long to encode the corpus (as a large corpus would take hours against NCCL's
# 10 minutes): the other rank must wait for it rather than time out.
SLOW_PREPARATION = textwrap.dedent("""
    import datetime, os, sys, time, torch.distributed
    from fastgpt import train
    init = torch.distributed.init_process_group
    torch.distributed.init_process_group = lambda *args, **options: init(
        *args, **{**options, "timeout": datetime.timedelta(seconds=5)})
    def slowly(work):
        def slow(*args, **options):
            if os.environ["RANK"] == "0":
                time.sleep(12)
            return work(*args, **options)
        return slow
    train.fit_tokenizer, train.encode_corpus = slowly(train.fit_tokenizer), slowly(train.encode_corpus)
    sys.exit(train.main(sys.argv[1:]))
""")


def test_processes_wait_for_a_preparation_longer_than_the_collective_timeout(corpus, train_args, torchrun, tmp_path):
    script = tmp_path / "train_slowly_prepared.py"
    script.write_text(SLOW_PREPARATION)
    result = torchrun(2, script, *train_args(corpus, tmp_path / "out", **{**RUN, "max_iters": 2}, batch_size=4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2
