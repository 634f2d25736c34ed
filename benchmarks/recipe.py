"""The recipe's targets, checked on this machine: the no-argument run and `--preset modern`, side by side.

    python benchmarks/recipe.py                                  # a few minutes (2 cores: 3 to 10)
    python benchmarks/recipe.py --seed 2 -- --dtype float32      # flags after -- go to both runs

Runs `python -m fastgpt.train` and `python -m fastgpt.train --preset modern` one after the other, each
in a fresh folder (under --work, a temporary one by default) on the bundled corpus, as a user runs
them; a run's wall time is from start to exit, as a user waits for it. Then scores each run's final
model over every token of the validation split (`python -m fastgpt.eval --dtype float32`).

Losses are compared per character: a BPE model's loss per token does not compare with a char
model's, and the bundled corpus is ASCII, a byte per character, so the loss per character is bits per
byte x ln 2 (for a char model, its loss itself; with `-- --data` on a text that is not ASCII, the
"per character" figures are per byte). The targets:

- `--preset modern`: a validation loss per character of at most 1.47 (the trainer's), in no more
  wall time than the no-argument run;
- the no-argument run: at most 1.75, in at most 5 minutes.

Each is reported as met or missed; speed is measured here, never asserted, so the script succeeds
either way. On a CPU, a 2048 x 2048 x 2048 matrix product in the runs' dtype is timed before the
first run and after the last: a snapshot of the machine's speed, which drifts on shared machines, to
tell a slow pair from slow code. Writes <out>/recipe-<date>-<CPU capability or GPU>[-<tag>].md and
.json (date, machine, versions, both runs' numbers, the verdicts) and the two runs' curves
(`python -m fastgpt.compare`'s, each run named by its flags) as .png; a name already taken there gets
-2, -3, ... after it.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from fastgpt.cli import run_cli  # noqa: E402
from fastgpt.compare import compare  # noqa: E402
from fastgpt.config import PRESETS, parse_config  # noqa: E402
from fastgpt.device import pick_device  # noqa: E402
from fastgpt.hardware import choose_precision  # noqa: E402
from harness import REFERENCE_SIZE, machine_facts, product_rate, unused_prefix  # noqa: E402

RUNS = {"no arguments": [], "--preset modern": ["--preset", "modern"]}
MODERN_GOAL = 1.47  # nats per character
DEFAULT_GOAL = 1.75
DEFAULT_TIME_LIMIT_S = 300
SPEED_ROUNDS = 25


def run_dtype(flags):
    """The dtype the runs compute in with these flags on this machine, read as the trainer reads them
    (which also refuses a mistaken flag, in one line, before any run starts)."""
    settings = parse_config(flags, presets=PRESETS)
    return choose_precision(settings.dtype, pick_device(settings.device)).dtype


def product_gflops(dtype):
    """The machine's speed now: GFLOP/s of the reference matrix product (harness.product_rate) in `dtype`,
    the median of SPEED_ROUNDS, a few seconds' worth, since a shared machine's speed moves within a second."""
    return round(product_rate(getattr(torch, dtype), rounds=SPEED_ROUNDS) / 1e9, 1)


def per_character(bits_per_byte):
    """Nats per character of an ASCII text (a byte per character) from bits per byte."""
    return bits_per_byte * math.log(2)


def fastgpt(module, *arguments, capture=False):
    """Run `python -m fastgpt.<module> arguments` from the repository root; its output if captured."""
    result = subprocess.run([sys.executable, "-m", f"fastgpt.{module}", *arguments], cwd=ROOT, check=True,
                            text=True, stdout=subprocess.PIPE if capture else None)
    return result.stdout


def train_and_score(out_dir, flags):
    """Train into out_dir with `flags`; the run's wall time and final scores."""
    started = time.perf_counter()
    fastgpt("train", "--out-dir", str(out_dir), *flags)
    wall_s = time.perf_counter() - started
    with open(out_dir / "metrics.jsonl") as f:
        last = [record for record in map(json.loads, f) if "val_loss" in record][-1]
    every_token = json.loads(fastgpt("eval", "--out-dir", str(out_dir), "--dtype", "float32", "--json", capture=True))
    return {"steps": last["step"], "wall_s": round(wall_s, 1), "training_s": round(last["elapsed_s"], 1),
            "val_loss": last["val_loss"], "val_bpb": last["val_bpb"],
            "val_per_character": per_character(last["val_bpb"]),
            "every_token_per_character": per_character(every_token["bits_per_byte"])}


def verdicts(default, modern):
    """(target, met) for each of the recipe's targets."""
    return [
        (f"--preset modern at most {MODERN_GOAL} per character", modern["val_per_character"] <= MODERN_GOAL),
        ("--preset modern in no more wall time than the no-argument run", modern["wall_s"] <= default["wall_s"]),
        (f"the no-argument run at most {DEFAULT_GOAL} per character", default["val_per_character"] <= DEFAULT_GOAL),
        (f"the no-argument run within {DEFAULT_TIME_LIMIT_S} s", default["wall_s"] <= DEFAULT_TIME_LIMIT_S),
    ]


def markdown(facts, runs, targets):
    lines = ["# The recipe, side by side", "",
             "measured on: " + ", ".join(f"{k}={v}" for k, v in facts.items()), "",
             "| run | steps | val loss (trainer, per token) | per character (trainer) | per character (every token) "
             "| training time | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        command = " ".join(["python -m fastgpt.train", *RUNS[name]])
        lines.append(f"| `{command}` | {run['steps']} | {run['val_loss']:.4f} | {run['val_per_character']:.4f} "
                     f"| {run['every_token_per_character']:.4f} | {run['training_s']:.1f} s | {run['wall_s']:.1f} s |")
    lines += ["", *(f"- {'met' if met else 'MISSED'}: {target}" for target, met in targets)]
    if "product_gflops_before" in facts:
        lines += ["", f"The machine's speed: a {REFERENCE_SIZE} x {REFERENCE_SIZE} x {REFERENCE_SIZE} product in "
                      f"{facts['dtype']} ran at {facts['product_gflops_before']:.0f} GFLOP/s before the runs and "
                      f"{facts['product_gflops_after']:.0f} GFLOP/s after them."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the result files")
    parser.add_argument("--work", type=Path, help="folder for the two runs (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=1337, help="both runs' --seed")
    parser.add_argument("--tag", help="ends the result files' names (say, the machine)")
    parser.add_argument("flags", nargs="*", help="after --: more flags for both runs (e.g. --dtype float32)")
    args = parser.parse_args(argv)

    facts = {**machine_facts("cuda" if torch.cuda.is_available() else "cpu"), "threads": torch.get_num_threads(),
             "dtype": run_dtype(args.flags), "seed": args.seed, "flags": " ".join(args.flags) or "none"}
    on_cpu = "cpu_capability" in facts
    if on_cpu:
        facts["product_gflops_before"] = product_gflops(facts["dtype"])
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        directories = {name: work / ("modern" if flags else "default") for name, flags in RUNS.items()}
        runs = {}
        for name, flags in RUNS.items():
            print(f"recipe: training with {name} into {directories[name]}", flush=True)
            runs[name] = train_and_score(directories[name], [*flags, "--seed", str(args.seed), *args.flags])
        if on_cpu:
            facts["product_gflops_after"] = product_gflops(facts["dtype"])
        args.out.mkdir(parents=True, exist_ok=True)
        machine = facts.get("cpu_capability") or facts["gpu"].replace(" ", "-")
        prefix = unused_prefix(args.out, "recipe", facts["date"], machine, args.tag)
        print(compare(list(directories.values()), f"{prefix}.png", names=list(directories)))
    targets = verdicts(runs["no arguments"], runs["--preset modern"])
    report = markdown(facts, runs, targets)
    Path(f"{prefix}.md").write_text(report)
    Path(f"{prefix}.json").write_text(json.dumps({**facts, "runs": runs, "targets": dict(targets)}, indent=1) + "\n")
    print(report)
    print(f"wrote {prefix}.md, .json and .png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
