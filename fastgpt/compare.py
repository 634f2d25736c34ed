"""Compare training runs: `python -m fastgpt.compare RUN_A RUN_B ... [--to FILE.png]`.

Draws the validation (and train) curves of every run against steps, tokens seen and training time,
side by side, and prints a table: final and best validation loss and bits per byte, tokens per
second, training time, and the settings that differ between the runs (from each run's config.json).
Runs may still be training: a metrics line being written is left out.

Tokens seen are a record's `tokens` (all processes' together), or where a record has none (an older
metrics file), step x batch_size x block_size x grad_accum_steps, which counts one process.
Training time is the last record's `elapsed_s`, which a resumed run carries on from the record it
resumed at; in a metrics file whose clock starts again at a resume (an older one's), the stretches
are added up.
"""

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from fastgpt.cli import run_cli
from fastgpt.config import parse_config
from fastgpt.settings import setting
from fastgpt.errors import FastGPTError
from fastgpt.plots import plot_comparison
from fastgpt.run_files import read_metrics, read_run_config

# Settings that name where a run went or how it was launched, not what it trained.
NOT_COMPARED = ("out_dir", "resume")


@dataclass
class CompareConfig:
    runs: tuple[str, ...] = setting((), "the training runs to compare (their --out-dir)", positional=True)
    to: str = setting("compare.png", "where to draw the curves (a PNG file)")

    def validate(self):
        # Only a .png: the curves replace what --to names, which a slip of the keyboard must not
        # make a checkpoint or a metrics file.
        if Path(self.to).suffix.lower() != ".png":
            raise FastGPTError(f"--to {self.to!r} is not a .png file; name the PNG image to draw the curves in")


@dataclass
class Run:
    name: str
    config: dict
    records: list  # metrics.jsonl's records, each also with `tokens` and `seconds`


def with_progress(records, config):
    """The records with `tokens` (seen so far) and `seconds` (of training so far) added."""
    tokens_per_step = config["batch_size"] * config["block_size"] * config["grad_accum_steps"]
    completed, offset, previous = [], 0.0, 0.0
    for record in records:
        elapsed = record.get("elapsed_s", 0.0)
        if elapsed < previous:  # an older metrics file: the resumed run's clock started again from zero
            offset += previous
        previous = elapsed
        completed.append({**record, "tokens": record.get("tokens", record["step"] * tokens_per_step),
                          "seconds": offset + elapsed})
    return completed


def load_run(directory, name):
    """The run in `directory`, named `name` in the plot and tables."""
    records = read_metrics(Path(directory) / "metrics.jsonl")
    if not records:
        raise FastGPTError(f"{directory} has no metrics yet; wait for its first logged step")
    config = read_run_config(directory)
    return Run(name, config, with_progress(records, config))


def summary(run):
    """One row of the table: final and best val loss and bpb, tokens/s, time."""
    def final_and_best(key):
        values = [r[key] for r in run.records if key in r]
        return f"{values[-1]:.4f} / {min(values):.4f}" if values else "-"
    speeds = [r["tokens_per_sec"] for r in run.records if "tokens_per_sec" in r]
    last = run.records[-1]
    return [run.name, f"{last['step']:,}", f"{last['tokens']:,}", final_and_best("val_loss"),
            final_and_best("val_bpb"), f"{statistics.median(speeds):,.0f}" if speeds else "-",
            f"{last['seconds']:,.1f}"]


def differing_settings(runs):
    """[setting, value in run 1, value in run 2, ...] for each setting whose values are not all equal."""
    names = sorted({name for run in runs for name in run.config} - set(NOT_COMPARED))
    rows = []
    for name in names:
        values = [run.config.get(name, "-") for run in runs]
        if any(value != values[0] for value in values):
            rows.append([name, *[repr(v) if isinstance(v, str) else str(v) for v in values]])
    return rows


def format_table(header, rows):
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def compare(directories, to, names=None):
    """Load the runs, draw their curves to `to`, and return the text of the tables; `names` label the
    runs there (default: their directories as given)."""
    if len({Path(directory).resolve() for directory in directories}) != len(directories):  # runs/a, runs/a/, ./runs/a
        raise FastGPTError("a run is named twice; give each run directory once")
    names = names or [str(directory) for directory in directories]
    runs = [load_run(directory, name) for directory, name in zip(directories, names, strict=True)]
    try:
        plot_comparison({run.name: run.records for run in runs}, to)
    except OSError as error:
        raise FastGPTError(f"cannot write the curves to {to} ({error.strerror or error}); "
                           "choose another --to") from None
    text = format_table(["run", "steps", "tokens", "val loss final / best", "val bpb final / best",
                         "tokens/s (median)", "time (s)"], [summary(run) for run in runs])
    differences = differing_settings(runs)
    if differences:
        text += "\n\nsettings that differ:\n" + format_table(["setting", *[run.name for run in runs]], differences)
    elif len(runs) > 1:
        text += "\n\nthe runs have the same settings"
    return text + f"\n\ncurves: {to}"


def main(argv=None):
    def command():
        config = parse_config(sys.argv[1:] if argv is None else argv, CompareConfig,
                              prog="python -m fastgpt.compare", description="Compare training runs: curves and a table.")
        print(compare(config.runs, config.to))
    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
