"""The one benchmark harness: timing in turns (fastgpt.timing) and one writer of tables and raw numbers.

Both the CPU benchmarks (pytest, through conftest.py's `compare` fixture) and the GPU script
(gpu_benchmark.py) file each measurement into a `Report`: a median time under (table, row, column),
with extras computed from it (GFLOP/s, GB/s, tokens/s). A table may declare ratios between its
columns (speed-ups: the second column's median time over the first's). The report prints as
markdown tables and saves as `<prefix>.md` and `<prefix>.json`, with what was measured on (date,
machine, versions) at the top of both.
"""

import datetime
import itertools
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch


class Report:
    def __init__(self, title):
        self.title = title
        self.tables = defaultdict(dict)  # table -> row -> column -> {"median_ms": ..., extras}
        self.ratios = {}  # table -> [(name, column, baseline column)]: the baseline's time over the column's
        self.notes = {}  # table -> text printed under its heading
        self.facts = {}  # what the report's numbers were measured on, and anything else to keep
        self.failures = []  # what failed during the run, said at the top of the report

    def declare_ratios(self, table, ratios):
        self.ratios[table] = ratios

    def note(self, table, text):
        self.notes[table] = text

    def add(self, table, row, column, seconds, **extras):
        """File one median (seconds); each extra is a value, or a function of the median in seconds."""
        entry = {"median_ms": seconds * 1e3}
        for key, value in extras.items():
            entry[key] = value(seconds) if callable(value) else value
        self.tables[table].setdefault(row, {})[column] = entry

    def skip(self, table, row, column, reason):
        """Say why a cell has no number (an implementation that cannot run these inputs here)."""
        self.tables[table].setdefault(row, {})[column] = {"skipped": reason}

    def markdown_tables(self):
        lines = []
        for table, rows in self.tables.items():
            columns = list(dict.fromkeys(c for row in rows.values() for c in row))
            extras = list(dict.fromkeys(k for row in rows.values() for e in row.values() for k in e
                                        if k not in ("median_ms", "skipped")))
            ratios = self.ratios.get(table, [])
            extra_columns = [(c, x) for c in columns for x in extras if any(x in rows[r].get(c, {}) for r in rows)]
            header = ["shape"] + [f"{c} ms" for c in columns] + [f"{c} {x}" for c, x in extra_columns]
            header += [name for name, _, _ in ratios]
            lines += ["", f"### {table}", ""]
            if table in self.notes:
                lines += [self.notes[table], ""]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            for row, cells in rows.items():
                values = [row] + [_time_cell(cells.get(c)) for c in columns]
                values += [_number(cells.get(c, {}).get(x)) for c, x in extra_columns]
                for _, top, bottom in ratios:
                    a, b = cells.get(top, {}), cells.get(bottom, {})
                    both = "median_ms" in a and "median_ms" in b
                    values.append(f"{b['median_ms'] / a['median_ms']:.2f}x" if both else "")
                lines.append("| " + " | ".join(values) + " |")
        return lines

    def markdown(self):
        facts = ", ".join(f"{k}={v}" for k, v in self.facts.items() if not isinstance(v, (list, dict)))
        lines = [f"# {self.title}", "",
                 "Medians of alternating measurements. Ratios are speed-ups: the second column's median time "
                 "over the first's (higher is better).", "", f"measured on: {facts}"]
        if self.failures:
            lines += ["", "**Failed:**", *(f"- {failure}" for failure in self.failures)]
        return "\n".join(lines + self.markdown_tables()) + "\n"

    def to_json(self):
        return {"title": self.title, **self.facts, "failures": self.failures, "results": self.tables}

    def save(self, prefix):
        """Write <prefix>.md and <prefix>.json; returns their paths."""
        prefix = str(prefix)
        with open(prefix + ".md", "w") as f:
            f.write(self.markdown())
        with open(prefix + ".json", "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        return prefix + ".md", prefix + ".json"


def _time_cell(entry):
    if entry is None:
        return ""
    if "skipped" in entry:
        return "skipped"
    return f"{entry['median_ms']:.3f}"


def _number(value):
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def code_version():
    """The commit this checkout is at, with "+changes" when its tracked files differ from it; None
    outside a git checkout."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        commit, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changes else "")


# The matrix product whose speed stands for the machine's at the time of a measurement: these machines'
# speed drifts, and a result file that records it says whether a slow run was the code or the machine.
REFERENCE_SIZE = 2048


def product_rate(dtype, size=REFERENCE_SIZE, rounds=5):
    """FLOP/s of one size x size x size matrix product on the CPU in `dtype`: the median of `rounds`,
    timed as the benchmarks time everything (fastgpt.timing)."""
    from fastgpt import timing  # here, not at the top: see machine_facts

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = timing.alternating_medians({"product": lambda: a @ b}, rounds, timing.HostClock())["product"]
    return 2 * size**3 / seconds


RESULT_SUFFIXES = (".md", ".json", ".png")


def unused_prefix(folder, *name_parts):
    """folder/<name parts joined by "-", leaving out None>, or with "-2", "-3", ... after it when result
    files (.md, .json, .png) of that name are already there: a second run on the same day and machine
    keeps the first's."""
    base = Path(folder) / "-".join(part for part in name_parts if part is not None)
    candidates = (base.with_name(f"{base.name}-{n}") if n > 1 else base for n in itertools.count(1))
    return next(c for c in candidates if not any(c.with_name(c.name + s).exists() for s in RESULT_SUFFIXES))


# Environment variables that keep PyTorch (its own kernels, oneDNN, MKL) to fewer instruction sets.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_facts(device):
    """Date, machine, versions and the code's commit: what every result file starts with."""
    # Imported here, not at the top: gpu_benchmark.py imports this module before it puts the checkout
    # on sys.path (it runs from a checkout that was never installed).
    from fastgpt.hardware import cpu_name

    now = datetime.datetime.now(datetime.timezone.utc)
    facts = {"date": now.date().isoformat(), "time": now.strftime("%H:%M UTC"), "torch": torch.__version__,
             "python": platform.python_version(), "cpu": cpu_name()}
    commit = code_version()
    if commit:
        facts["commit"] = commit
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    else:
        facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        # What limits the instruction sets PyTorch and its matrix libraries use, where set (AVX2 on an AVX-512 CPU).
        facts.update({name: os.environ[name] for name in ISA_LIMITS if name in os.environ})
    for module in ("triton", "numpy"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            pass
    return facts
