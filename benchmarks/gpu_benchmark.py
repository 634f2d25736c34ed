"""The GPU check: fastgpt's GPU tests, then its Triton kernels and `auto` timed beside torch's built-ins.

    pip install --no-build-isolation --no-deps -e .                  # once, in a fresh copy of the tree
    python benchmarks/gpu_benchmark.py                                # on an NVIDIA GPU: about 4 minutes
                                                                      # on an H200
    python benchmarks/gpu_benchmark.py --dry-run --out /tmp/rehearsal # anywhere: tiny sizes on CPU
                                                                      # tensors, Triton interpreted

Runs offline and installs nothing. In order:

1. the GPU tests: `pytest` on the Triton and `auto` tests on CUDA tensors (GPU_TESTS: every op's
   Triton numerics in tests/test_op_contract.py and tests/test_kernels_*.py, and test_ops.py,
   test_triton_kernels.py, test_choice.py), with one block-size config per kernel
   (FASTGPT_TRITON_AUTOTUNE=0) so that they do not spend minutes autotuning, and without the tests
   that compile every config for Hopper (CI runs those without a GPU); in GPU_TEST_WORKERS processes
   where pytest-xdist is installed; stopped after GPU_TESTS_TIMEOUT_S (4 minutes), skipped where
   pytest is not installed, and either said so in the report; pytest's whole output goes to
   <out>/gpu-<date>-tests.log; the rehearsal only collects them, which checks the list and selection;
2. LayerNorm (16k rows of 768 to 8192) and RMSNorm (16k rows of 768 and 4096), bf16: Triton,
   torch's F.layer_norm / F.rms_norm and `auto`, in GB/s against a device copy;
3. rotary positions, bf16, on queries laid out as the model's projection makes them, at a GPT-2
   small-like and a Llama-like shape: Triton, the reference path (PyTorch has no built-in) and
   `auto`, in GB/s against a device copy;
4. the MLP activations SwiGLU (16k rows of 2 x 4096) and ReLU^2 (16k rows of 4096), bf16: Triton,
   PyTorch's `F.silu(a) * b` and `F.relu(x).square()`, and `auto`, in GB/s against a device copy;
5. cross-entropy, bf16 logits of 16k rows of GPT-2's vocabulary (50304): Triton, PyTorch's
   F.cross_entropy on the logits in fp32 (the usual way to take a bf16 model's loss) and `auto`, in GB/s
   against a device copy;
6. training steps (bf16 autocast) of GPT-2 small (fused AdamW) and of the recipe's two runs (the
   no-argument run's model and optimizer, and --preset modern's, at their batches: models so small
   that a GPU step is mostly launching kernels), each with the Triton kernels, with torch's built-ins
   and with `auto`: tokens/s and model FLOPs utilisation against a bf16 matmul measured here;
7. causal attention, bf16, head dims 64 and 128, T from 1024 to 8192 (B*T = 16k tokens, H*D = 2048),
   and grouped-query attention (fewer key/value heads than query heads) at a GPT-2 small-like and a
   Llama-3-8B-like shape: forward and forward+backward TFLOP/s of the Triton kernels (autotuned)
   beside SDPA (enable_gqa where the heads differ) forced onto each of its flash, cuDNN and
   memory-efficient backends, and `auto`; the Triton output and gradients are checked against
   SDPA's on the same inputs; last, because autotuning compiles dozens of kernels;
8. the choices `auto` made, with the times it measured.

A section that fails, or failing GPU tests, are named at the top of the report (Report.failures),
the next section still runs, and the script exits with an error at the end.

Implementations are timed in turns with CUDA events and reported as medians (benchmarks/harness.py,
fastgpt/timing.py). Counting: attention forward 4*B*H*T*T*D / 2 (causal; as many with fewer key/value
heads), forward+backward 3.5 times that; LayerNorm and RMSNorm forward 2*M*N*size bytes (x read, y
written), forward+backward 5*M*N*size (x and dy read again, dx written); rotary 2 and 4 times x's
bytes (its backward reads dy and writes dx); SwiGLU 1.5 and 4 times x's bytes (x = [gate, up] read,
half as many written; then x and dy read, dx written), ReLU^2 2 and 5, cross-entropy 1 and 3 times the
logits' bytes (read forward; read again and their gradient written backward); training 6*N + 12*L*H*Q*T
FLOPs per token. The normalisation, rotary and activation tables give speed-ups against torch's
built-in (the reference for rotary), the training table against the built-ins. Results go to
<out>/gpu-<date>.md and .json (-2, -3, ... after a name already taken; date, GPU, versions, every
median, each section's seconds), written after each section so that a run cut short keeps what it
measured.
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import Report, machine_facts, unused_prefix  # noqa: E402

SIZES = {
    "gpu": dict(
        dtype=torch.bfloat16, head_dims=(64, 128), seq_lens=(1024, 2048, 4096, 8192), tokens=16384, width=2048,
        # (B, H, Hkv, T, D): GPT-2 small's heads sharing 4 key/value heads; Llama 3 8B's (32 heads, 8
        # key/value heads of 128), 16k tokens each.
        gqa_shapes=((16, 12, 4, 1024, 64), (4, 32, 8, 4096, 128)),
        norm_rows=16384, layer_norm_cols=(768, 2048, 8192), rms_norm_cols=(768, 4096),
        rotary_shapes=((16, 12, 1024, 64), (4, 32, 4096, 128)),  # (B, H, T, D): those models' queries
        mlp_width=4096,  # the activations' N: GPT-2 small's MLP (4 x 768 = 3072) rounded up to a power of two
        copy_bytes=1 << 30, matmul_size=8192,
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True),
        train_batch=16, recipe_tokens=None, rounds=7, train_rounds=5, warmup=2),
    "dry-run": dict(
        dtype=torch.bfloat16, head_dims=(16,), seq_lens=(40,), tokens=80, width=32, gqa_shapes=((1, 2, 1, 40, 16),),
        norm_rows=16, layer_norm_cols=(48,), rms_norm_cols=(48,), rotary_shapes=((2, 2, 40, 16),), mlp_width=40,
        copy_bytes=1 << 20, matmul_size=64,
        model=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=128, dropout=0.0, bias=True),
        train_batch=2, recipe_tokens=(1, 16), rounds=1, train_rounds=1, warmup=1),
}
# Every op's Triton numerics (the op contract and each kernel's own tests, a new kernel's file
# included by its name), and the Triton backend's and `auto`'s own tests.
GPU_TESTS = ["tests/test_op_contract.py",
             *sorted(f"tests/{path.name}" for path in ROOT.glob("tests/test_kernels_*.py")),
             "tests/test_ops.py", "tests/test_triton_kernels.py", "tests/test_choice.py"]
# The Triton and `auto` tests (the C++ ones run in CI), less the compiles of every config for Hopper:
# CI runs those without a GPU, and here they would take minutes.
GPU_TEST_SELECTION = "(triton or choice or auto or chosen or turns or clock) and not hopper"
# The tests' share of a run that must end well within 10 minutes: past it they are stopped, said so,
# and the benchmarks still run.
GPU_TESTS_TIMEOUT_S = 240
GPU_TEST_WORKERS = 6


def attention_flops(batch, heads, seq_len, head_dim, backward):
    forward = 4 * batch * heads * seq_len * seq_len * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def sdpa_on(backend_name):
    """SDPA forced onto one of its backends; raises when that backend cannot take the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastgpt.ops.definitions import causal_attention

    backend = getattr(SDPBackend, backend_name)

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return causal_attention.builtin(q, k, v, None)  # SDPA as the `torch` backend calls it
    return attention


def attention_implementations():
    from fastgpt import ops

    return {
        "triton": lambda q, k, v: ops.causal_attention(q, k, v, backend="triton"),
        "auto": lambda q, k, v: ops.causal_attention(q, k, v),
        "sdpa-flash": sdpa_on("FLASH_ATTENTION"),
        "sdpa-cudnn": sdpa_on("CUDNN_ATTENTION"),
        "sdpa-efficient": sdpa_on("EFFICIENT_ATTENTION"),
    }


def runnable(steps):
    """The steps that run once without error, and why each of the others did not."""
    kept, failed = {}, {}
    for name, step in steps.items():
        try:
            step()
            kept[name] = step
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:  # e.g. no such SDPA kernel here
            failed[name] = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return kept, failed


def max_difference(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_attention(q, k, v, grad_out, reference):
    """Largest differences of the Triton output and gradients from `reference`'s (SDPA's) on the same inputs."""
    from fastgpt import ops

    results = {}
    for name, attention in (("triton", lambda *x: ops.causal_attention(*x, backend="triton")),
                            ("reference", reference)):
        out = attention(q, k, v)
        results[name] = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    return {f"max_diff_{what}": max_difference(a, b)
            for what, a, b in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"])}


def attention_shapes(sizes):
    """(B, H, Hkv, T, D) of each attention row: as many key/value heads as query heads at every head dim
    and length, then the grouped-query shapes."""
    for head_dim in sizes["head_dims"]:
        heads = sizes["width"] // head_dim
        for seq_len in sizes["seq_lens"]:
            yield max(1, sizes["tokens"] // seq_len), heads, heads, seq_len, head_dim
    yield from sizes["gqa_shapes"]


def bench_attention(sizes, device, timer, report):
    from fastgpt.ops.definitions import causal_attention

    def sdpa(q, k, v):
        return causal_attention.builtin(q, k, v, None)

    for batch, heads, kv_heads, seq_len, head_dim in attention_shapes(sizes):
        heads_named = f"H{heads}" + (f" Hkv{kv_heads}" if kv_heads != heads else "")
        row = f"B{batch} {heads_named} T{seq_len} D{head_dim}"
        q, k, v = (torch.randn(batch, n, seq_len, head_dim, device=device, dtype=sizes["dtype"], requires_grad=True)
                   for n in (heads, kv_heads, kv_heads))
        grad_out = torch.randn_like(q)
        implementations = attention_implementations()
        for which, backward in (("forward", False), ("forward+backward", True)):
            table = f"attention {which} (bf16, causal)"

            def step(attention, backward=backward):
                if backward:
                    return lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)
                return lambda: attention(q, k, v)
            flops = attention_flops(batch, heads, seq_len, head_dim, backward)
            steps, failed = runnable({name: step(fn) for name, fn in implementations.items()})
            for name, seconds in timer(steps).items():
                report.add(table, row, name, seconds, tflops=lambda s: flops / s / 1e12)
            for name, reason in failed.items():
                report.skip(table, row, name, reason)
        try:
            report.facts.setdefault("attention_check", {})[row] = check_attention(q, k, v, grad_out, sdpa)
        except RuntimeError as error:
            report.facts.setdefault("attention_check", {})[row] = {"skipped": str(error)[:160]}
        del q, k, v, grad_out
        print(f"attention {row} done", flush=True)


def bench_copy(sizes, device, timer, report):
    source = torch.empty(sizes["copy_bytes"], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timer({"copy": lambda: target.copy_(source)})["copy"]
    report.facts["copy_gb_per_s"] = 2 * sizes["copy_bytes"] / seconds / 1e9  # read + write


def bench_memory_bound(op, row, implementations, baseline, inputs, passes, timer, report):
    """Time `implementations` (name -> function of `inputs`: "triton", "auto" and `baseline`, which
    their speed-ups are against) of a memory-bound op, forward alone and forward+backward (the
    gradients of every input), in GB/s against the device copy. `passes` (forward, forward+backward):
    how many times the bytes of inputs[0] (x) each moves."""
    copy = report.facts["copy_gb_per_s"]
    x = inputs[0]
    differentiable = [t for t in inputs if t.requires_grad]  # not cross-entropy's targets
    grad_out = torch.randn_like(implementations[baseline](*inputs))
    for (which, backward), n in zip((("forward", False), ("forward+backward", True)), passes):
        table = f"{op} {which} (bf16)"
        report.note(table, f"GB/s count {n} times x's bytes; % of the device copy's {copy:.4g} GB/s "
                           "measured in this run")
        report.declare_ratios(table, [(f"{name} vs {baseline}", name, baseline) for name in ("triton", "auto")])
        nbytes = n * x.numel() * x.element_size()

        def step(fn, backward=backward):
            if backward:
                return lambda: torch.autograd.grad(fn(*inputs), differentiable, grad_out)
            return lambda: fn(*inputs)
        for name, seconds in timer({name: step(fn) for name, fn in implementations.items()}).items():
            report.add(table, row, name, seconds, gb_per_s=lambda s: nbytes / s / 1e9,
                       percent_of_copy=lambda s: 100 * nbytes / s / 1e9 / copy)
    print(f"{op} {row} done", flush=True)


def bench_layer_norm(sizes, device, timer, report):
    from fastgpt import ops

    implementations = {
        "triton": lambda x, w, b: ops.layer_norm(x, w, b, backend="triton"),
        "auto": lambda x, w, b: ops.layer_norm(x, w, b),
        "torch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
    }
    n_rows, dtype = sizes["norm_rows"], sizes["dtype"]
    for n_cols in sizes["layer_norm_cols"]:
        x, weight, bias = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
                           for shape in ((n_rows, n_cols), (n_cols,), (n_cols,)))
        bench_memory_bound("layer_norm", f"{n_rows}x{n_cols}", implementations, "torch", (x, weight, bias), (2, 5),
                           timer, report)


def bench_rms_norm(sizes, device, timer, report):
    from fastgpt import ops

    implementations = {
        "triton": lambda x, w: ops.rms_norm(x, w, backend="triton"),
        "auto": lambda x, w: ops.rms_norm(x, w),
        # F.rms_norm as a model would call it, as fastgpt's `torch` backend does.
        "torch": lambda x, w: F.rms_norm(x, x.shape[-1:], w, 1e-6),
    }
    n_rows, dtype = sizes["norm_rows"], sizes["dtype"]
    for n_cols in sizes["rms_norm_cols"]:
        x, weight = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
                     for shape in ((n_rows, n_cols), (n_cols,)))
        bench_memory_bound("rms_norm", f"{n_rows}x{n_cols}", implementations, "torch", (x, weight), (2, 5),
                           timer, report)


def bench_rotary(sizes, device, timer, report):
    from fastgpt import ops

    implementations = {
        "triton": lambda x: ops.rotary(x, backend="triton"),
        "auto": lambda x: ops.rotary(x),
        "reference": lambda x: ops.rotary(x, backend="reference"),  # PyTorch has no built-in
    }
    for batch, heads, seq_len, head_dim in sizes["rotary_shapes"]:
        # Queries as the model's projection lays them out: (B, T, H, D) memory seen as (B, H, T, D).
        x = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=sizes["dtype"],
                        requires_grad=True).transpose(1, 2)
        bench_memory_bound("rotary", f"B{batch} H{heads} T{seq_len} D{head_dim}", implementations, "reference",
                           (x,), (2, 4), timer, report)


def bench_activations(sizes, device, timer, report):
    from fastgpt import ops
    from fastgpt.ops.definitions import relu_squared, swiglu

    n_rows, width, dtype = sizes["norm_rows"], sizes["mlp_width"], sizes["dtype"]
    # (op, its implementations, x's width, passes): SwiGLU reads x = [gate, up] (2N wide) and writes N
    # forward, then reads x and dy and writes dx (2N) backward: 1.5 and 4 times x's bytes. ReLU^2: 2 and 5.
    activations = [
        ("swiglu", {"triton": lambda x: ops.swiglu(x, backend="triton"), "auto": lambda x: ops.swiglu(x),
                    "torch": swiglu.builtin}, 2 * width, (1.5, 4)),
        ("relu_squared", {"triton": lambda x: ops.relu_squared(x, backend="triton"),
                          "auto": lambda x: ops.relu_squared(x), "torch": relu_squared.builtin}, width, (2, 5)),
    ]
    for op, implementations, x_width, passes in activations:
        x = torch.randn(n_rows, x_width, device=device, dtype=dtype, requires_grad=True)
        bench_memory_bound(op, f"{n_rows}x{x_width}", implementations, "torch", (x,), passes, timer, report)


def bench_cross_entropy(sizes, device, timer, report):
    from fastgpt import ops
    from fastgpt.ops.definitions import cross_entropy

    implementations = {"triton": lambda logits, targets: ops.cross_entropy(logits, targets, backend="triton"),
                       "auto": lambda logits, targets: ops.cross_entropy(logits, targets),
                       "torch": cross_entropy.builtin}
    n_rows, n_classes = sizes["norm_rows"], sizes["model"]["vocab_size"]
    logits = torch.randn(n_rows, n_classes, device=device, dtype=sizes["dtype"], requires_grad=True)
    targets = torch.randint(n_classes, (n_rows,), device=device)
    bench_memory_bound("cross_entropy", f"{n_rows}x{n_classes}", implementations, "torch", (logits, targets), (1, 3),
                       timer, report)


def bench_matmul(sizes, device, timer, report):
    n = sizes["matmul_size"]
    a, b = (torch.randn(n, n, device=device, dtype=sizes["dtype"]) for _ in range(2))
    seconds = timer({"matmul": lambda: a @ b})["matmul"]
    report.facts["bf16_matmul_tflops"] = 2 * n ** 3 / seconds / 1e12


def training_cases(sizes):
    """(row, model config, optimizer settings, batch size, sequence length) of each training row: GPT-2
    small with AdamW; then the no-argument run's model and optimizer and `--preset modern`'s, with
    their settings read as the trainer reads them and their vocabularies learnt from the bundled
    corpus, at their own batches (the dry run's `recipe_tokens` instead)."""
    from recipe import RUNS as RECIPE_RUNS

    from fastgpt.config import PRESETS, TrainConfig, parse_config
    from fastgpt.data import corpus_files, fit_tokenizer
    from fastgpt.model import GPTConfig
    from fastgpt.train import requested_model_config

    shape = sizes["model"]
    yield (f"GPT-2 small, {shape['n_layer']}L {shape['n_embd']}d", GPTConfig(**shape),
           TrainConfig(optimizer="adamw", learning_rate=6e-4, beta2=0.95, weight_decay=0.1),
           sizes["train_batch"], shape["block_size"])
    for name, flags in RECIPE_RUNS.items():
        settings = parse_config(flags, presets=PRESETS)
        tokenizer = fit_tokenizer(settings.tokenizer, corpus_files(settings.data), settings.model.vocab_size,
                                  settings.val_fraction)
        model = requested_model_config(settings, tokenizer.vocab_size)
        batch, seq_len = sizes["recipe_tokens"] or (settings.batch_size, model.block_size)
        yield f"{name}, {model.n_layer}L {model.n_embd}d", model, settings, batch, seq_len


def bench_training(sizes, device, timer, report):
    from fastgpt import ops
    from fastgpt.model import GPT
    from fastgpt.optim import build_optimizer

    table = "training step (bf16 autocast, eager)"
    ceiling = report.facts["bf16_matmul_tflops"] * 1e12
    report.note(table, f"GPT-2 small: batch {sizes['train_batch']} x {sizes['model']['block_size']} tokens, AdamW; "
                       "the recipe's runs: their models, batches and optimizers (Muon's iteration in bf16, as the "
                       "trainer runs it on a GPU), without the weight average. MFU against the bf16 matmul "
                       f"measured in this run ({ceiling / 1e12:.4g} TFLOP/s)")
    report.declare_ratios(table, [("triton vs builtins", "triton", "builtins"),
                                  ("auto vs builtins", "auto", "builtins")])
    for row, model_config, settings, batch, seq_len in training_cases(sizes):
        tokens = torch.randint(0, model_config.vocab_size, (batch, seq_len + 1), device=device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        steps = {}
        # "builtins" is the same model on fastgpt.ops' `torch` backend: SDPA, F.layer_norm, F.gelu, ...
        for variant, backend in (("triton", "triton"), ("builtins", "torch"), ("auto", "auto")):
            torch.manual_seed(0)
            model = GPT(model_config).to(device)
            optimizer = build_optimizer(model, settings, device_type=device.type, ns_dtype=sizes["dtype"])

            def step(model=model, optimizer=optimizer, backend=backend):
                ops.use_backend(backend)  # the variants take turns: each sets its kernels for its step
                with torch.autocast(device.type, dtype=sizes["dtype"]):
                    _, loss = model(inputs, targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps[variant] = step
        flops_per_token = 6 * model.num_parameters() + 12 * model_config.n_layer * model_config.n_embd * seq_len
        tokens_per_step = inputs.numel()
        try:
            times = timer(steps, rounds=sizes["train_rounds"])
        finally:  # the sections after this one time `auto` as a call with no backend named runs it
            ops.use_backend(None)
        for name, seconds in times.items():
            report.add(table, row, name, seconds, tokens_per_s=lambda s: tokens_per_step / s,
                       mfu_percent=lambda s: 100 * tokens_per_step * flops_per_token / s / ceiling)
        print(f"training {row} done", flush=True)


def run_gpu_tests(log_path, collect_only=False):
    """pytest on the GPU tests, its whole output written to `log_path`; returns a summary line for the
    report. `collect_only` (the rehearsal) only checks that the files exist and the selection finds
    tests, which the GPU run would learn late."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "skipped: pytest is not installed here"
    # Wide lines, so that the summary names each failure's error beside the test; no captured log
    # records, which torch.compile's debug tracing would fill for every failing compile test.
    env = dict(os.environ, FASTGPT_TRITON_AUTOTUNE="0", COLUMNS="250")
    # --durations: where the tests' time goes, for keeping them within GPU_TESTS_TIMEOUT_S.
    # Most of the tests' time is Triton compiling kernels on the host's CPU: several pytest workers
    # (pytest-xdist, where installed) compile side by side. Every failure is reported, up to a point.
    workers = ["-n", str(GPU_TEST_WORKERS)] if importlib.util.find_spec("xdist") and not collect_only else []
    command = [sys.executable, "-m", "pytest", "-q", "--maxfail=25", "-p", "no:cacheprovider", "-p", "no:logging",
               "--tb=short", "--durations=15", *workers, *GPU_TESTS, "-k", GPU_TEST_SELECTION,
               *(["--collect-only"] if collect_only else [])]
    # A session of its own, so that a timeout ends pytest's workers too, not only pytest: they would
    # go on compiling and running kernels while the benchmarks are timed.
    with open(log_path, "w+") as log:
        tests = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            tests.wait(timeout=GPU_TESTS_TIMEOUT_S)
            outcome = "FAILED" if tests.returncode != 0 else "collected" if collect_only else "passed"
        except subprocess.TimeoutExpired:
            os.killpg(tests.pid, signal.SIGKILL)
            tests.wait()
            outcome = f"TIMED OUT after {GPU_TESTS_TIMEOUT_S} s"
        log.seek(0)
        output = log.read()
    print(output[-4000:], flush=True)
    last = (output.strip().splitlines() or ["(no output)"])[-1]
    return f"{outcome}: {last}"


def make_timer(sizes, device):
    from fastgpt import timing

    clock = timing.clock_for(device)

    def timer(steps, rounds=sizes["rounds"]):
        return timing.alternating_medians(steps, rounds, clock, warmup=sizes["warmup"])
    return timer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the result files")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on CPU tensors through Triton's interpreter: checks the script, not speed")
    parser.add_argument("--skip-tests", action="store_true", help="go straight to the benchmarks")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported (by the kernels, on first use)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("gpu_benchmark: error: no CUDA GPU here; run with --dry-run to rehearse the script on CPU")
    sys.path.insert(0, str(ROOT))  # run from a checkout even without installing
    from fastgpt.ops import choice

    # Asked of the Triton backend alone: asking every backend would load (or first compile) the C++
    # one, which the GPU runs do not use.
    reason = choice.unavailable_reason()
    if reason is not None:
        sys.exit(f"gpu_benchmark: error: the Triton backend cannot run: {reason}")
    if args.dry_run:  # `auto` on CPU tensors picks the CPU kernels: rehearse the GPU's choice instead
        from fastgpt import timing

        from fastgpt.ops import dispatch

        dispatch._AUTO_ORDER["cpu"] = ("fastest",)
        choice.CHOOSER.timer = lambda steps: timing.alternating_medians(steps, 1, timing.HostClock())

    started = time.perf_counter()
    sizes = SIZES["dry-run" if args.dry_run else "gpu"]
    report = Report("fastgpt GPU benchmarks" + (" (DRY RUN on CPU: not GPU numbers)" if args.dry_run else ""))
    report.facts.update(machine_facts(device), dry_run=args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = unused_prefix(args.out, "dry-run" if args.dry_run else "gpu", report.facts["date"])
    if not args.skip_tests:
        report.facts["gpu_tests"] = run_gpu_tests(f"{prefix}-tests.log", collect_only=args.dry_run)
        if report.facts["gpu_tests"].startswith(("FAILED", "TIMED OUT")):
            report.failures.append(f"the GPU tests: {report.facts['gpu_tests']}")
        report.facts.setdefault("section_seconds", {})["gpu_tests"] = round(time.perf_counter() - started)
        print(f"GPU tests: {report.facts['gpu_tests']} ({time.perf_counter() - started:.0f} s)", flush=True)

    timed = make_timer(sizes, device)

    def timer(steps, **kwargs):
        report.save(prefix)  # what is measured so far, before each measurement: a run cut short keeps it
        return timed(steps, **kwargs)
    bench_matmul(sizes, device, timer, report)
    bench_copy(sizes, device, timer, report)
    # Attention last: autotuning it compiles dozens of kernels, the longest section by far, and a run
    # cut short should keep the rest.
    for section in (bench_layer_norm, bench_rms_norm, bench_rotary, bench_activations, bench_cross_entropy,
                    bench_training, bench_attention):
        section_started = time.perf_counter()
        try:
            section(sizes, device, timer, report)
        except Exception as error:  # one section's failure (a kernel that fails on this GPU) spares the others
            traceback.print_exc()
            report.failures.append(f"{section.__name__}: {type(error).__name__}: {str(error)[:400]}")
        # Each section's share of the run, to keep the whole within its few minutes.
        name = section.__name__.removeprefix("bench_")
        report.facts.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_started)
        report.facts["auto_choices"] = choice.CHOOSER.chosen()
        report.facts["seconds"] = round(time.perf_counter() - started)
        report.save(prefix)
    print(report.markdown())
    print(f"wrote {prefix}.md and .json in {report.facts['seconds']} s")
    if report.failures:
        sys.exit("gpu_benchmark: error: some sections failed: " + "; ".join(report.failures))


if __name__ == "__main__":
    main()
