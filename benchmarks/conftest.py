"""Shared set-up of the speed benchmarks: thread count, quick mode, and the ratio tables.

    pytest benchmarks/                          # the full shapes, a few minutes on 2 CPU cores
    FASTGPT_BENCH_QUICK=1 pytest benchmarks/    # tiny shapes, a few rounds: keeps them from rotting
    FASTGPT_BENCH_RESULTS=benchmarks/results/cpu-2025-01-01 pytest benchmarks/   # also save .md/.json

Each benchmark times the implementations of one step side by side through the `compare` fixture,
which files each one's median under a (table, row, column) key;
at the end of the session the tables are printed with the ratios between columns (and saved when
FASTGPT_BENCH_RESULTS names a file prefix). Times drift on a shared machine: only ratios measured in
the same run mean anything.
"""

import ctypes
import datetime
import json
import os
import platform
import statistics
import time
from collections import defaultdict

import pytest
import torch

QUICK = os.environ.get("FASTGPT_BENCH_QUICK") == "1"
THREADS = int(os.environ.get("FASTGPT_BENCH_THREADS", "2"))


def _keep_freed_memory_in_the_process():
    """Make glibc keep the memory of freed tensors for the next ones, as a caching allocator would.

    PyTorch allocates CPU tensors with malloc. By default glibc serves large blocks with fresh mmaps,
    or trims freed ones back to the operating system, under thresholds that move with the history of
    the process; a tensor's pages then have to be faulted in and zeroed again, which costs a
    memory-bound op such as LayerNorm (25 MB in, 25 MB out) more than its own work, and more or less
    at random depending on what ran before. Fixed thresholds (the largest mmap threshold glibc
    accepts, 32 MB; no trimming below 1 GB) make every implementation run on memory the process
    already has, so that the benchmarks compare kernels rather than page faults.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


_keep_freed_memory_in_the_process()

# table -> row -> column -> {"median_ms": ..., plus extras such as "gflops"}
_RESULTS = defaultdict(lambda: defaultdict(dict))
# table -> list of (name, numerator column, denominator column): ratios printed per row
_RATIOS = {}
_NOTES = {}


@pytest.fixture(scope="session", autouse=True)
def benchmark_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def median_seconds(fn, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture(scope="session")
def matmul_gflops():
    """The machine's fp32 matrix-multiply rate right now (1024^3 GEMM through torch.mm): the ceiling."""
    n = 256 if QUICK else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), rounds=5 if QUICK else 20) / 1e9
    _NOTES["fp32 matmul GFLOP/s"] = round(rate, 1)
    return rate


@pytest.fixture
def compare(benchmark):
    """run(table, row, steps, rounds, **extras): time implementations of one step side by side.

    `steps` maps a column name to a function that runs one step. Each round gives every step a turn,
    starting from a different one each round, so that whatever else the machine does meanwhile
    (other processes, clock changes) falls on all of them alike and the ratio of two medians is a
    fair comparison. A turn is two calls, of which only the second is timed: the first lets the
    memory allocator settle on this step's own sizes. (After another step has freed tensors of other
    sizes, the first call may have to fault fresh pages in from the operating system, which can cost
    a memory-bound op such as LayerNorm more than its own work.) pytest-benchmark times the rounds
    as a whole; each column's median goes into the results table, with `extras` (functions of that
    median in seconds).
    """
    def run(table, row, steps, rounds, **extras):
        names = list(steps)
        times = {name: [] for name in names}
        for name in names:  # warm-up: first calls load extensions and fill caches
            steps[name]()

        def one_round():
            first = len(times[names[0]]) % len(names)
            for name in names[first:] + names[:first]:
                steps[name]()
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)

        benchmark.group = table
        benchmark.extra_info.update(row=row, implementations=names)
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
        for name in names:
            median = statistics.median(times[name])
            entry = {"median_ms": median * 1e3}
            for key, value in extras.items():
                entry[key] = value(median) if callable(value) else value
            _RESULTS[table][row][name] = entry
    return run


def declare_ratios(table, ratios):
    """Which ratios (name, numerator column, denominator column) of median times a table reports."""
    _RATIOS[table] = ratios


def _format_tables():
    lines = []
    for table, rows in _RESULTS.items():
        columns = sorted({c for row in rows.values() for c in row})
        extras = sorted({k for row in rows.values() for e in row.values() for k in e if k != "median_ms"})
        ratios = _RATIOS.get(table, [])
        header = ["shape"] + [f"{c} ms" for c in columns] + [f"{c} {x}" for c in columns for x in extras
                                                             if any(x in rows[r].get(c, {}) for r in rows)]
        header += [name for name, _, _ in ratios]
        lines += ["", f"### {table}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row, cells in rows.items():
            values = [row] + [f"{cells[c]['median_ms']:.3f}" if c in cells else "" for c in columns]
            for c in columns:
                for x in extras:
                    if any(x in rows[r].get(c, {}) for r in rows):
                        v = cells.get(c, {}).get(x)
                        values.append("" if v is None else f"{v:.1f}")
            for _, top, bottom in ratios:
                if top in cells and bottom in cells:
                    values.append(f"{cells[bottom]['median_ms'] / cells[top]['median_ms']:.2f}x")
                else:
                    values.append("")
            lines.append("| " + " | ".join(values) + " |")
    return lines


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "torch": torch.__version__,
            "threads": THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quick": QUICK, **_NOTES}


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    machine = _machine()
    lines = ["Ratios are speed-ups: the second column's median time over the first's (higher is better).",
             "", "machine: " + ", ".join(f"{k}={v}" for k, v in machine.items())] + _format_tables()
    terminalreporter.write_sep("=", "fastgpt speed (medians)")
    for line in lines:
        terminalreporter.write_line(line)
    prefix = os.environ.get("FASTGPT_BENCH_RESULTS")
    if prefix:
        with open(prefix + ".md", "w") as f:
            f.write("# fastgpt CPU benchmarks\n\n" + "\n".join(lines) + "\n")
        with open(prefix + ".json", "w") as f:
            json.dump({"machine": machine, "results": _RESULTS}, f, indent=1)
