"""Where a training step's time goes, for any settings: by kind of operation and by phase.

    python benchmarks/profile_step.py                                   # the no-argument run's step
    python benchmarks/profile_step.py -- --preset modern                # flags after -- go to the trainer
    python benchmarks/profile_step.py --steps 20 -- --mlp swiglu --dtype float32
    python benchmarks/profile_step.py -- --device cuda --preset modern   # a step on the GPU

Builds the run as `python -m fastgpt.train` would with those flags (its data, model, optimizer,
dtype and kernels, in a temporary out_dir) on the CPU (`-- --device cuda`: on the GPU), trains
--warmup steps, times --steps steps, then runs --steps more under torch.profiler. Each operation's
own time (not counting the operations it calls) goes to a kind (matrix products, attention, norms,
...) and to the phase of the step it ran in, which the trainer labels: forward, backward, optimizer
(gradient clipping and the weight average included), or between them (the batch, the loss's sum
across processes, zeroing the gradients). The kinds are read from the names of fastgpt's fused ops
and of PyTorch's own (`--backend torch`); the reference backend's plain operations count as what
they are (products, elementwise arithmetic). Besides the operations: the bookkeeping of autograd and
of the optimizers' Python loops, and Python's own time outside any operation.

The matrix products' speed is set against a 2048 x 2048 x 2048 product in the same dtype, timed in
the same process: a step whose products run near that rate and take most of its time can only get
faster by doing fewer of them. The profiler adds a little to every operation: the shares are of a
profiled step (the mean), beside which the mean unprofiled step is given.

On a GPU the table's times are the host's: what issuing each kind of operation costs the CPU, the
CUDA calls that launch kernels, and the waiting for the GPU where the step reads its loss. Beside
them come the GPU's kernels (and copies) a step, and how long they kept it busy: a step far longer
than that is bound by the host, by how many operations it launches rather than by their work, and
fewer, fused operations are what make it faster. The products' rate is measured on CPUs only.

Writes <out>/profile-<date>-<CPU capability or GPU>[-<tag>].md and .json (a name already taken there
gets -2, -3, ... after it), and prints the tables.
"""

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fastgpt.cli import run_cli  # noqa: E402
from fastgpt.config import PRESETS, parse_config  # noqa: E402
from fastgpt.device import pick_device  # noqa: E402
from fastgpt.errors import FastGPTError  # noqa: E402
from fastgpt.run_lock import RunLock  # noqa: E402
from fastgpt.train import Trainer  # noqa: E402
from harness import REFERENCE_SIZE, machine_facts, product_rate, unused_prefix  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
BETWEEN = "between phases"
OUTSIDE = "Python, outside any operation"
BOOKKEEPING = "autograd's and the optimizers' bookkeeping"
MATRIX_PRODUCTS = "matrix products"

# Kinds of operation, by what their profiler names contain (lower case), the first that matches.
# The names are ATen's (aten::addmm), fastgpt's (fastgpt::cpp_gelu_forward) and their autograd
# wrappers' (GeneratedBackwardFor_fastgpt_cpp_gelu_forward_default, AddmmBackward0). The first kind
# is no operation's: the time autograd's engine and the optimizers' step methods spend around the
# operations they call ("Optimizer.step#AdamW.step" would otherwise read as an AdamW update).
KINDS = [
    # On a GPU, the CUDA runtime's and driver's calls, which the profiler records under the operations
    # that make them: the launches, and the waits where the host reads a result (the step's loss).
    ("launching GPU kernels", ("cudalaunchkernel", "culaunchkernel")),
    ("waiting for the GPU", ("synchronize", "cudamemcpy")),
    (BOOKKEEPING, ("autograd::engine::evaluate_function", "optimizer.step#", "optimizer.zero_grad#")),
    (MATRIX_PRODUCTS, ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
                       "aten::linear", "mmbackward", "bmmbackward", "linearbackward")),
    ("attention", ("attention",)),
    ("norms", ("layer_norm", "rms_norm")),
    ("activations", ("gelu", "swiglu", "relu", "silu")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("rotary positions", ("rotary",)),
    ("embeddings", ("embedding", "index_select")),
    ("optimizer updates", ("aten::_fused_adam", "aten::_foreach", "aten::lerp")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat",
                          "aten::stack")),
]
OTHER = "other operations"

# FLOPs the profiler counts (with_flops) for the product operations themselves.
COUNTED_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind_of(name):
    lowered = name.lower()
    for kind, parts in KINDS:
        if any(part in lowered for part in parts):
            return kind
    return OTHER


def phase_of(event):
    """The phase an event ran in: its nearest enclosing phase label."""
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return BETWEEN


def mean_step(trainer, steps):
    """The mean wall time (seconds) of `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def operations(events):
    """The events of operations, not the phase labels."""
    return [e for e in events if e.name not in PHASES]


def breakdown(events, steps):
    """{(kind, phase): seconds per step} and {operation name: seconds per step} of the operations' own
    times on the host (the CPU)."""
    seconds, by_name = defaultdict(float), defaultdict(float)
    for event in operations(events):
        if event.device_type != DeviceType.CPU:
            continue
        own = event.self_cpu_time_total / 1e6 / steps
        seconds[(kind_of(event.name), phase_of(event))] += own
        by_name[event.name] += own
    return seconds, by_name


def gpu_work(events, steps):
    """{"gpu_kernels_per_step", "gpu_busy_ms"}: the kernels and copies the GPU ran a step, and their
    summed time (ms per step), from a profile that recorded CUDA activity."""
    # The profiler also draws each labelled range (the phases, the optimizers' steps) on the GPU's
    # timeline, spanning kernels and the gaps between them: those are not work.
    kernels = [event for event in events
               if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)]
    return {"gpu_kernels_per_step": len(kernels) / steps,
            "gpu_busy_ms": sum(event.device_time_total for event in kernels) / 1e3 / steps}


def product_flops(trainer):
    """The FLOPs of one step's counted matrix products. Counting them needs every operation's shapes,
    which slows the others unevenly, so it is a profile of its own."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as counter:
        trainer.train_step()
    return sum(e.flops or 0 for e in operations(counter.events()) if e.name in COUNTED_PRODUCTS)


def markdown(facts, summary, seconds, by_name, listed=12):
    step = summary["step_ms"] / 1e3
    columns = [*PHASES, BETWEEN]
    kinds = sorted({kind for kind, _ in seconds}, key=lambda k: -sum(v for (kk, _), v in seconds.items() if kk == k))
    lines = ["# Where a training step's time goes", "",
             "measured on: " + ", ".join(f"{key}={value}" for key, value in facts.items()), "",
             f"A step: {summary['step_ms']:.1f} ms under the profiler, {summary['unprofiled_step_ms']:.1f} ms "
             f"without it ({summary['tokens_per_s']:,.0f} tokens/s); means of {summary['steps']} steps each.", "",
             "| operations | " + " | ".join(f"{c} ms" for c in columns) + " | per step ms | share of the step |",
             "|" + " --- |" * (len(columns) + 3)]
    for kind in kinds:
        cells = [seconds.get((kind, column), 0.0) * 1e3 for column in columns]
        lines.append(f"| {kind} | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {sum(cells):.2f} | {sum(cells) / 1e3 / step:.1%} |")
    outside = summary["outside_ms"]
    lines.append(f"| {OUTSIDE} | | | | | {outside:.2f} | {outside / 1e3 / step:.1%} |")
    if "gpu_busy_ms" in summary:
        lines += ["", f"On the GPU: {summary['gpu_kernels_per_step']:.0f} kernels and copies a step, busy for "
                      f"{summary['gpu_busy_ms']:.2f} ms of the {summary['step_ms']:.1f} ms step "
                      f"({summary['gpu_busy_ms'] / summary['step_ms']:.0%}). The times above are the host's: "
                      "issuing the operations, launching their kernels, waiting for the GPU."]
    lines += ["", f"The {listed} operations that took the most time of their own:", "",
              "| operation | kind | per step ms | share of the step |", "| --- | --- | --- | --- |"]
    for name, value in sorted(by_name.items(), key=lambda item: -item[1])[:listed]:
        lines.append(f"| `{name}` | {kind_of(name)} | {value * 1e3:.2f} | {value / step:.1%} |")
    rate = summary.get("products_gflops")
    if rate:
        lines += ["", f"The matrix products counted ({', '.join(sorted(COUNTED_PRODUCTS))}) ran at {rate:.0f} GFLOP/s, "
                      f"{summary['products_share_of_reference']:.0%} of a {REFERENCE_SIZE} x {REFERENCE_SIZE} x "
                      f"{REFERENCE_SIZE} product in "
                      f"{facts['dtype']} ({summary['reference_gflops']:.0f} GFLOP/s, timed just before)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps timed, and as many profiled (default 10)")
    parser.add_argument("--warmup", type=int, default=10, help="steps trained first, not counted (default 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for the result files (default: benchmarks/results)")
    parser.add_argument("--tag", help="ends the result files' names (say, the machine)")
    parser.add_argument("flags", nargs="*", help="after --: the trainer's flags (e.g. --preset modern)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")

    with tempfile.TemporaryDirectory() as out_dir:
        config = parse_config(["--device", "cpu", *args.flags, "--out-dir", out_dir], presets=PRESETS)
        device_type = pick_device(config.device).type
        if device_type not in ("cpu", "cuda"):
            raise FastGPTError(f"profile_step.py profiles steps on a CPU or a CUDA GPU, not on {device_type}")
        on_gpu = device_type == "cuda"
        lock = RunLock(config.out_dir)
        try:
            trainer = Trainer(config, lock)
            mean_step(trainer, args.warmup)
            # Each step reads its loss (.item()), which waits for the GPU: the steps' wall times are whole.
            unprofiled = mean_step(trainer, args.steps)
            reference = None if on_gpu else product_rate(getattr(torch, trainer.precision.dtype))
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
            with profile(activities=activities) as profiler:
                step = mean_step(trainer, args.steps)
            flops = None if on_gpu else product_flops(trainer)
        finally:
            lock.release()
    events = profiler.events()
    seconds, by_name = breakdown(events, args.steps)
    product_seconds = sum(by_name.get(name, 0.0) for name in COUNTED_PRODUCTS)
    tokens = config.batch_size * config.grad_accum_steps * config.model.block_size
    summary = {"steps": args.steps, "step_ms": step * 1e3, "unprofiled_step_ms": unprofiled * 1e3,
               "tokens_per_s": tokens / unprofiled, "outside_ms": (step - sum(seconds.values())) * 1e3}
    if on_gpu:
        summary.update(gpu_work(events, args.steps))
    elif flops and product_seconds > 0:
        summary["reference_gflops"] = reference / 1e9
        summary["products_gflops"] = flops / product_seconds / 1e9
        summary["products_share_of_reference"] = flops / product_seconds / reference

    facts = {**machine_facts(trainer.device), "threads": torch.get_num_threads(), "dtype": trainer.precision.dtype,
             "kernels": trainer.backend, "flags": " ".join(args.flags) or "none"}
    report = markdown(facts, summary, seconds, by_name)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = facts.get("cpu_capability") or facts["gpu"].replace(" ", "-")
    prefix = unused_prefix(args.out, "profile", facts["date"], machine, args.tag)
    Path(f"{prefix}.md").write_text(report)
    rows = [{"kind": kind, "phase": phase, "ms_per_step": value * 1e3} for (kind, phase), value in seconds.items()]
    names = {name: value * 1e3 for name, value in sorted(by_name.items(), key=lambda item: -item[1])}
    Path(f"{prefix}.json").write_text(json.dumps({**facts, **summary, "kinds": rows, "operations_ms_per_step": names},
                                                 indent=1) + "\n")
    print(report)
    print(f"wrote {prefix}.md and .json")


if __name__ == "__main__":
    sys.exit(run_cli(main))
