"""GPU benchmark of the Triton kernels beside torch's built-ins and the reference path, in one run.

    python benchmarks/gpu_benchmark.py --out benchmarks/results      # on an NVIDIA GPU, a few minutes
    python benchmarks/gpu_benchmark.py --dry-run --out /tmp/rehearsal # anywhere: tiny sizes on CPU
                                                                      # tensors, Triton interpreted

Writes gpu-<date>.json (raw numbers), gpu-<date>.md (tables, with the targets of issue 4) and
gpu-<date>.png (attention TFLOP/s against T), after each section, so an interrupted run keeps what
it measured. Installs nothing. What is measured, all bf16:

- causal attention, forward and forward+backward, head dims 64 and 128, B*T = 16k tokens and
  H*D = 2048, T from 512 to 16k: Triton; torch SDPA forced to its flash and its cuDNN backends; the
  reference path (up to T = 4k: beyond, its T x T score matrices take tens of GB);
- LayerNorm, rows of 768 to 8192 values: Triton, F.layer_norm, the reference path; achieved
  bandwidth against a device copy measured in the same run;
- GPT-2 small (124M, T = 1024) training steps with backend="triton" and with torch's built-ins
  (F.scaled_dot_product_attention, F.layer_norm, F.gelu), eager, bf16 autocast, fused AdamW; model FLOPs
  utilisation against a bf16 matmul measured in the same run.

FLOPs and bytes are counted as FlashAttention's and Triton's benchmarks count them: attention forward
4*B*H*T*T*D / 2 (causal), forward+backward 3.5 times that; LayerNorm forward 2*M*N*size bytes,
backward 3*M*N*size; training 6*N + 12*L*H*Q*T FLOPs per token.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {
    "full": dict(
        attention_head_dims=(64, 128), attention_seq_lens=(512, 1024, 2048, 4096, 8192, 16384),
        attention_tokens=16384, attention_width=2048, reference_max_seq_len=4096,
        layer_norm_rows=65536, layer_norm_cols=(768, 1024, 2048, 4096, 8192),
        copy_bytes=1 << 30, matmul_size=8192, dtype=torch.bfloat16,
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True),
        train_batch=16, train_warmup=3, train_steps=10, host_repeats=5),
    "dry-run": dict(
        attention_head_dims=(16, 32), attention_seq_lens=(32, 64),
        attention_tokens=64, attention_width=64, reference_max_seq_len=32,
        layer_norm_rows=16, layer_norm_cols=(48, 96),
        copy_bytes=1 << 20, matmul_size=64, dtype=torch.bfloat16,
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128, dropout=0.0, bias=True),
        train_batch=2, train_warmup=1, train_steps=1, host_repeats=1),
}

# Issue 4's targets, checked in the markdown summary (bf16, causal).
TARGETS = {
    "attention_forward_tflops": 450,          # at T >= 4k
    "attention_forward_backward_tflops": 330,  # at head dim 128
    "attention_vs_sdpa_flash": 1.0,           # forward+backward
    "layer_norm_forward_of_copy": 0.85,
    "layer_norm_backward_of_copy": 0.70,
    "layer_norm_vs_torch": 1.5,               # forward+backward
    "training_vs_builtins": 1.1,
}

class Timer:
    """Median times in ms. On the GPU, kernels are timed by triton.testing.do_bench (CUDA events, the
    L2 cache flushed between runs, so that LayerNorm's bandwidth is HBM's, not the cache's); on CPU
    (the dry run) by the host clock."""

    def __init__(self, device, host_repeats):
        self.device, self.host_repeats = device, host_repeats

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn):
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, return_mode="median")
        return self.steps(fn, warmup=1, repeats=self.host_repeats)

    def steps(self, fn, warmup, repeats):
        """Median of `repeats` timed calls after `warmup` untimed ones (for long calls: training steps)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def attention_flops(batch, heads, seq_len, head_dim, backward):
    forward = 4 * batch * heads * seq_len * seq_len * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def sdpa_with(backend_name):
    """SDPA forced onto one of its backends; raises when that backend cannot take the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attention


def attention_implementations():
    from fastgpt import ops

    return {
        "triton": lambda q, k, v: ops.causal_attention(q, k, v, backend="triton"),
        "sdpa-flash": sdpa_with("FLASH_ATTENTION"),
        "sdpa-cudnn": sdpa_with("CUDNN_ATTENTION"),
        "reference": lambda q, k, v: ops.causal_attention(q, k, v, backend="reference"),
    }


def bench_attention(sizes, device, timer):
    rows = []
    for head_dim in sizes["attention_head_dims"]:
        heads = sizes["attention_width"] // head_dim
        for seq_len in sizes["attention_seq_lens"]:
            batch = max(1, sizes["attention_tokens"] // seq_len)
            q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=sizes["dtype"],
                                   requires_grad=True) for _ in range(3))
            grad_out = torch.randn_like(q)
            for name, attention in attention_implementations().items():
                row = dict(implementation=name, head_dim=head_dim, seq_len=seq_len, batch=batch, heads=heads)
                if name == "reference" and seq_len > sizes["reference_max_seq_len"]:
                    rows.append(dict(row, skipped="materialises T x T scores"))
                    continue
                try:
                    forward_ms = timer(lambda: attention(q, k, v))
                    both_ms = timer(lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out))
                except (RuntimeError, torch.OutOfMemoryError) as error:  # e.g. no such SDPA kernel here
                    rows.append(dict(row, skipped=str(error).splitlines()[0][:120]))
                    continue
                rows.append(dict(
                    row, ms=forward_ms, forward_backward_ms=both_ms,
                    tflops=attention_flops(batch, heads, seq_len, head_dim, False) / forward_ms / 1e9,
                    forward_backward_tflops=attention_flops(batch, heads, seq_len, head_dim, True) / both_ms / 1e9))
                print(f"attention {name:10s} D={head_dim:3d} T={seq_len:5d}: forward {rows[-1]['tflops']:7.1f}, "
                      f"forward+backward {rows[-1]['forward_backward_tflops']:7.1f} TFLOP/s", flush=True)
            del q, k, v, grad_out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_copy(sizes, device, timer):
    """Device copy bandwidth in GB/s (bytes read + bytes written)."""
    source = torch.empty(sizes["copy_bytes"], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = timer(lambda: target.copy_(source))
    return 2 * sizes["copy_bytes"] / ms / 1e6


def bench_layer_norm(sizes, device, timer):
    from fastgpt import ops

    implementations = {
        "triton": lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend="triton"),
        "torch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
        "reference": lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend="reference"),
    }
    rows = []
    for n_cols in sizes["layer_norm_cols"]:
        n_rows = sizes["layer_norm_rows"]
        dtype = sizes["dtype"]
        x = torch.randn(n_rows, n_cols, device=device, dtype=dtype, requires_grad=True)
        weight, bias = (torch.randn(n_cols, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        grad_out = torch.randn_like(x)
        element = x.element_size()
        for name, layer_norm in implementations.items():
            forward_ms = timer(lambda: layer_norm(x, weight, bias))
            y = layer_norm(x, weight, bias)
            backward_ms = timer(lambda: torch.autograd.grad(y, (x, weight, bias), grad_out, retain_graph=True))
            both_ms = timer(lambda: torch.autograd.grad(layer_norm(x, weight, bias), (x, weight, bias), grad_out))
            rows.append(dict(
                implementation=name, rows=n_rows, cols=n_cols, ms=forward_ms, backward_ms=backward_ms,
                forward_backward_ms=both_ms,
                forward_gbps=2 * n_rows * n_cols * element / forward_ms / 1e6,
                backward_gbps=3 * n_rows * n_cols * element / backward_ms / 1e6))
            print(f"layer_norm {name:9s} N={n_cols:5d}: forward {rows[-1]['forward_gbps']:7.0f} GB/s, "
                  f"backward {rows[-1]['backward_gbps']:7.0f} GB/s", flush=True)
    return rows


def bench_matmul(sizes, device, timer):
    """The bf16 matmul ceiling in TFLOP/s, the denominator of the model FLOPs utilisation."""
    n = sizes["matmul_size"]
    a, b = (torch.randn(n, n, device=device, dtype=sizes["dtype"]) for _ in range(2))
    return 2 * n ** 3 / timer(lambda: a @ b) / 1e9


def bench_training(sizes, device, matmul_tflops):
    from fastgpt.model import GPT, GPTConfig

    shape = sizes["model"]
    rows = []
    # "builtins" is the same model on fastgpt.ops' `torch` backend: SDPA, F.layer_norm and F.gelu.
    for variant, backend in (("triton", "triton"), ("builtins", "torch")):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape, backend=backend)).to(device)
        optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), device.type)
        tokens = torch.randint(0, shape["vocab_size"], (sizes["train_batch"], shape["block_size"] + 1), device=device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def step():
            with torch.autocast(device.type, dtype=sizes["dtype"]):
                _, loss = model(inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        step_ms = Timer(device, 1).steps(step, sizes["train_warmup"], sizes["train_steps"])
        loss = step().item()
        tokens_per_step = inputs.numel()
        head_dim = shape["n_embd"] // shape["n_head"]
        flops_per_token = (6 * model.num_parameters()
                           + 12 * shape["n_layer"] * shape["n_head"] * head_dim * shape["block_size"])
        tokens_per_s = tokens_per_step / step_ms * 1e3
        mfu = tokens_per_s * flops_per_token / (matmul_tflops * 1e12)
        rows.append(dict(variant=variant, step_ms=step_ms, tokens_per_s=tokens_per_s, mfu=mfu, loss=loss,
                         parameters=model.num_parameters(), batch=sizes["train_batch"], **shape))
        print(f"training {variant:8s}: {tokens_per_s:10.0f} tokens/s, MFU {100 * mfu:5.1f}% "
              f"(of the measured {matmul_tflops:.0f} TFLOP/s matmul)", flush=True)
        del model, optimizer
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def _by(rows, **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "skipped" not in r]
    return found[0] if found else None


def _ratio(numerator, denominator, field):
    if numerator is None or denominator is None:
        return None
    return numerator[field] / denominator[field]


def _fmt(value, spec=".1f", missing="-"):
    return missing if value is None else format(value, spec)


def _verdict(passed):
    return "-" if passed is None else ("met" if passed else "NOT met")


def markdown(results):
    lines = [f"# GPU benchmark, {results['date']}", "",
             f"{results['device']}; torch {results['torch']}, triton {results['triton']}, "
             f"Python {results['python']}. bf16 matmul ceiling {results['matmul_tflops']:.0f} TFLOP/s, "
             f"device copy {results['copy_gbps']:.0f} GB/s (read + write), measured in this run.", ""]
    if results["dry_run"]:
        lines += ["**Dry run**: tiny sizes on CPU tensors with Triton interpreted. The numbers only show that "
                  "the script works; they say nothing about speed.", ""]

    attention = results["attention"]
    lines += ["## Causal attention (TFLOP/s)", "",
              "| D | T | implementation | forward | forward+backward | fwd+bwd vs sdpa-flash |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in attention:
        if "skipped" in row:
            lines.append(f"| {row['head_dim']} | {row['seq_len']} | {row['implementation']} | "
                         f"skipped: {row['skipped']} | | |")
            continue
        flash = _by(attention, implementation="sdpa-flash", head_dim=row["head_dim"], seq_len=row["seq_len"])
        ratio = _ratio(row, flash, "forward_backward_tflops")
        lines.append(f"| {row['head_dim']} | {row['seq_len']} | {row['implementation']} | {row['tflops']:.1f} | "
                     f"{row['forward_backward_tflops']:.1f} | {_fmt(ratio, '.2f')} |")

    layer_norm = results["layer_norm"]
    copy = results["copy_gbps"]
    lines += ["", "## LayerNorm (bf16, GB/s; % of the device copy)", "",
              "| N | implementation | forward | backward | fwd+bwd ms | fwd+bwd vs F.layer_norm |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in layer_norm:
        torch_row = _by(layer_norm, implementation="torch", cols=row["cols"])
        speedup = None if torch_row is None else torch_row["forward_backward_ms"] / row["forward_backward_ms"]
        lines.append(f"| {row['cols']} | {row['implementation']} | {row['forward_gbps']:.0f} "
                     f"({100 * row['forward_gbps'] / copy:.0f}%) | {row['backward_gbps']:.0f} "
                     f"({100 * row['backward_gbps'] / copy:.0f}%) | {row['forward_backward_ms']:.3f} | "
                     f"{_fmt(speedup, '.2f')} |")

    training = results["training"]
    lines += ["", "## GPT-2 small training (eager, bf16 autocast)", "",
              "| variant | tokens/s | MFU | step ms |", "| --- | --- | --- | --- |"]
    for row in training:
        lines.append(f"| {row['variant']} | {row['tokens_per_s']:.0f} | {100 * row['mfu']:.1f}% | {row['step_ms']:.1f} |")

    lines += ["", "## Targets of issue 4", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    for name, measured, passed in check_targets(results):
        lines.append(f"| {name} | {measured} | {_verdict(passed)} |")
    return "\n".join(lines) + "\n"


def check_targets(results):
    """(target, measured, met?) for each of issue 4's targets; met is None where nothing was measured."""
    attention, layer_norm, training = results["attention"], results["layer_norm"], results["training"]
    checks = []
    triton_rows = [r for r in attention if r["implementation"] == "triton" and "skipped" not in r]
    long_rows = [r for r in triton_rows if r["seq_len"] >= 4096]
    worst = min((r["tflops"] for r in long_rows), default=None)
    checks.append((f"attention forward >= {TARGETS['attention_forward_tflops']} TFLOP/s at T >= 4k (worst)",
                   _fmt(worst), None if worst is None else worst >= TARGETS["attention_forward_tflops"]))
    d128 = [r for r in triton_rows if r["head_dim"] == 128]
    best = max((r["forward_backward_tflops"] for r in d128), default=None)
    checks.append((f"attention fwd+bwd >= {TARGETS['attention_forward_backward_tflops']} TFLOP/s at D=128 (best)",
                   _fmt(best), None if best is None else best >= TARGETS["attention_forward_backward_tflops"]))
    ratios = [_ratio(r, _by(attention, implementation="sdpa-flash", head_dim=r["head_dim"], seq_len=r["seq_len"]),
                     "forward_backward_tflops") for r in triton_rows]
    ratios = [r for r in ratios if r is not None]
    worst_ratio = min(ratios, default=None)
    checks.append((f"attention fwd+bwd >= {TARGETS['attention_vs_sdpa_flash']}x sdpa-flash (worst)",
                   _fmt(worst_ratio, ".2f"), None if worst_ratio is None else worst_ratio >= TARGETS["attention_vs_sdpa_flash"]))

    ln = [r for r in layer_norm if r["implementation"] == "triton"]
    copy = results["copy_gbps"]
    for field, target, label in (("forward_gbps", "layer_norm_forward_of_copy", "forward"),
                                 ("backward_gbps", "layer_norm_backward_of_copy", "backward")):
        worst = min((r[field] / copy for r in ln), default=None)
        checks.append((f"LayerNorm {label} >= {100 * TARGETS[target]:.0f}% of copy bandwidth (worst)",
                       _fmt(None if worst is None else 100 * worst, ".0f") + "%", None if worst is None else worst >= TARGETS[target]))
    speedups = [_by(layer_norm, implementation="torch", cols=r["cols"])["forward_backward_ms"] / r["forward_backward_ms"]
                for r in ln]
    worst = min(speedups, default=None)
    checks.append((f"LayerNorm fwd+bwd >= {TARGETS['layer_norm_vs_torch']}x F.layer_norm (worst)",
                   _fmt(worst, ".2f"), None if worst is None else worst >= TARGETS["layer_norm_vs_torch"]))

    fused, builtins = _by(training, variant="triton"), _by(training, variant="builtins")
    ratio = _ratio(fused, builtins, "tokens_per_s")
    checks.append((f"GPT-2 small tokens/s >= {TARGETS['training_vs_builtins']}x torch built-ins",
                   _fmt(ratio, ".2f"), None if ratio is None else ratio >= TARGETS["training_vs_builtins"]))
    return checks


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = [r for r in results["attention"] if "skipped" not in r]
    head_dims = sorted({r["head_dim"] for r in attention})
    figure, axes = plt.subplots(2, len(head_dims), figsize=(6 * len(head_dims), 8), squeeze=False)
    for column, head_dim in enumerate(head_dims):
        for row_index, (field, label) in enumerate((("tflops", "forward"),
                                                    ("forward_backward_tflops", "forward+backward"))):
            axis = axes[row_index][column]
            for name in dict.fromkeys(r["implementation"] for r in attention):
                points = sorted((r["seq_len"], r[field]) for r in attention
                                if r["implementation"] == name and r["head_dim"] == head_dim)
                if points:
                    axis.plot(*zip(*points), marker="o", label=name)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length T")
            axis.set_ylabel("TFLOP/s")
            axis.set_title(f"causal attention {label}, head dim {head_dim}, bf16")
            axis.grid(True, alpha=0.3)
            axis.legend()
    figure.suptitle(f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(results, out):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    if results["attention"]:
        plot(results, stem.with_suffix(".png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the result files")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on CPU tensors through Triton's interpreter: checks the script, not speed")
    args = parser.parse_args(argv)

    if args.dry_run:
        # Before Triton is first imported (by the kernels, on first use).
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("gpu_benchmark: error: no CUDA GPU here; run with --dry-run to rehearse the script on CPU")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    import triton

    from fastgpt import ops

    reason = ops.available_backends()["triton"]
    if reason is not None:
        sys.exit(f"gpu_benchmark: error: the Triton backend cannot run: {reason}")

    sizes = SIZES["dry-run" if args.dry_run else "full"]
    timer = Timer(device, sizes["host_repeats"])
    results = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        dry_run=args.dry_run, attention=[], layer_norm=[], training=[])
    started = time.perf_counter()
    results["matmul_tflops"] = bench_matmul(sizes, device, timer)
    results["copy_gbps"] = bench_copy(sizes, device, timer)
    for section, run in (("attention", lambda: bench_attention(sizes, device, timer)),
                         ("layer_norm", lambda: bench_layer_norm(sizes, device, timer)),
                         ("training", lambda: bench_training(sizes, device, results["matmul_tflops"]))):
        results[section] = run()
        results["seconds"] = time.perf_counter() - started
        save(results, args.out)  # after every section: a run cut short keeps what it measured
    print(markdown(results))
    print(f"wrote {args.out}/gpu-{results['date']}.{{json,md,png}} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
