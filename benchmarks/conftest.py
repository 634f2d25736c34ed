"""Shared set-up of the speed benchmarks: thread count, quick mode, and the ratio tables.

    pytest benchmarks/                          # the full shapes, a few minutes on 2 CPU cores
    FASTGPT_BENCH_QUICK=1 pytest benchmarks/    # tiny shapes, a few rounds: keeps them from rotting
    FASTGPT_BENCH_RESULTS=benchmarks/results/cpu-2025-01-01 pytest benchmarks/   # also save .md/.json

Each benchmark times the implementations of one step side by side through the `compare` fixture,
which files each one's median into the session's report (benchmarks/harness.py, the harness the
GPU script uses too); at the end of the session the tables are printed with the ratios between
columns (and saved as .md and .json when FASTGPT_BENCH_RESULTS names a file prefix). Times drift
on a shared machine: only ratios measured in the same run mean anything.
"""

import os

import pytest
import torch

from fastgpt import timing
from fastgpt.cpu_memory import reuse_freed_memory
from harness import Report, machine_facts

QUICK = os.environ.get("FASTGPT_BENCH_QUICK") == "1"
THREADS = int(os.environ.get("FASTGPT_BENCH_THREADS", "2"))


# As training does: implementations then run on memory the process already has, so that the
# benchmarks compare kernels rather than page faults (fastgpt/cpu_memory.py says why).
reuse_freed_memory()

REPORT = Report("fastgpt CPU benchmarks")


@pytest.fixture(scope="session", autouse=True)
def benchmark_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def median_seconds(fn, rounds, warmup=1):
    return timing.alternating_medians({"fn": fn}, rounds, timing.HostClock(), warmup)["fn"]


@pytest.fixture(scope="session")
def matmul_gflops():
    """The machine's fp32 matrix-multiply rate right now (1024^3 GEMM through torch.mm): the ceiling."""
    n = 256 if QUICK else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), rounds=5 if QUICK else 20) / 1e9
    REPORT.facts["fp32 matmul GFLOP/s"] = round(rate, 1)
    return rate


@pytest.fixture
def compare(benchmark):
    """run(table, row, steps, rounds, **extras): time implementations of one step side by side.

    `steps` maps a column name to a function that runs one step. They are timed in turns
    (fastgpt.timing.Turns: every round gives each step a turn, starting from a different one each
    round), each turn two calls of which only the second is timed, so that the memory allocator
    has settled on this step's own sizes. pytest-benchmark drives the rounds; each column's median
    goes into the report, with `extras` (functions of that median in seconds).
    """
    def run(table, row, steps, rounds, **extras):
        for step in steps.values():  # warm-up: first calls load extensions and fill caches
            step()
        turns = timing.Turns(steps, timing.HostClock(), settle=True)
        benchmark.group = table
        benchmark.extra_info.update(row=row, implementations=list(steps))
        benchmark.pedantic(turns.round, rounds=rounds, iterations=1)
        for name, seconds in turns.medians().items():
            REPORT.add(table, row, name, seconds, **extras)
    return run


def op_steps(implementations, inputs, grad_output, backward):
    """{name: step} for each of `implementations` ({name: fn}) applied to `inputs` (a tuple of tensors):
    the forward alone, or the forward and the backward of `grad_output` (clearing the inputs' gradients)."""
    def step_of(fn):
        def step():
            if backward:
                fn(*inputs).backward(grad_output)
                for x in inputs:
                    x.grad = None
            else:
                with torch.no_grad():
                    fn(*inputs)
        return step
    return {name: step_of(fn) for name, fn in implementations.items()}


def backends_with_kernels(*names):
    """The names among `names` of the fastgpt.ops backends that can run here."""
    from fastgpt import ops

    return [name for name in names if ops.available_backends()[name] is None]


def declare_ratios(table, ratios):
    """Which ratios of median times a table reports: (name, column, baseline column), each the
    baseline's median time over the column's (a speed-up)."""
    REPORT.declare_ratios(table, ratios)


def pytest_terminal_summary(terminalreporter):
    if not REPORT.tables:
        return
    REPORT.facts.update(machine_facts("cpu"), threads=THREADS, quick=QUICK)
    terminalreporter.write_sep("=", "fastgpt speed (medians)")
    for line in REPORT.markdown().splitlines():
        terminalreporter.write_line(line)
    prefix = os.environ.get("FASTGPT_BENCH_RESULTS")
    if prefix:
        REPORT.save(prefix)
