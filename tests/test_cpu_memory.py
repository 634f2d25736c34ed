"""Freed memory stays in the process on the CPU: a training step stops faulting in fresh pages."""

import subprocess
import sys

import pytest

from fastgpt.cpu_memory import reuse_freed_memory

STEP_FAULTS = """
import resource, sys, torch
from fastgpt.cpu_memory import reuse_freed_memory
from fastgpt.model import GPT, GPTConfig
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=128, n_layer=2, n_head=4, n_embd=128))
tokens = torch.randint(0, 65, (16, 129))
def step():
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    model.zero_grad()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2)
"""


def page_faults_per_step(mode):
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return float(result.stdout)


@pytest.mark.skipif(not reuse_freed_memory(), reason="the C library is not glibc, whose malloc this tunes")
def test_a_training_step_reuses_the_memory_the_last_one_freed():
    plain, reused = page_faults_per_step("plain"), page_faults_per_step("reuse")
    assert plain > 500, f"glibc's defaults faulted only {plain} pages a step; the test no longer shows the cost"
    assert reused < plain / 4, f"{reused} page faults a step with freed memory kept, {plain} without"


def test_picking_the_cpu_keeps_freed_memory(monkeypatch):
    import fastgpt.device
    calls = []
    monkeypatch.setattr(fastgpt.device, "reuse_freed_memory", lambda: calls.append(True))
    assert fastgpt.device.pick_device("cpu").type == "cpu" and calls == [True]
