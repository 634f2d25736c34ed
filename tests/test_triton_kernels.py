"""Checks particular to the Triton backend; its numerics are tested with the others in test_ops.py.

- Every kernel and dtype variant compiles for Hopper (sm_90), without a GPU: in a subprocess
  without TRITON_INTERPRET, as the GPU machine would compile it. This is what catches code that the
  interpreter runs but the compiler rejects.
- The autotuning configs are pruned as intended.
- The backend reports the interpreter mode, and runs through torch.library's checks and torch.compile.
- The GPU benchmark script still runs, rehearsed on CPU tensors at tiny sizes.

Run as a script, `python tests/test_triton_kernels.py --compile-for-hopper SHARD SHARDS` compiles one
share of the variants and prints a line for each.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgpt import ops

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset; 1 is its behaviour so far
    return env


# ---------------------------------------------------------------------------------------------
# Compiling for Hopper
# ---------------------------------------------------------------------------------------------

POINTER_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
FLOAT_ARGUMENTS = {"qk_scale", "scale", "eps"}
STATISTICS = {"LSE", "DELTA", "MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}  # fp32 whatever the input dtype
LONG_SEQUENCE = 4096  # long enough that no config is pruned for its length


def hopper_variants():
    """(description, kernel, pointer dtypes, constexprs, config, shared-memory bound) for every variant.

    Attention: each kernel in each dtype with its most shared-memory-hungry config that survives
    pruning, plus bf16 at a padded head dim (48) and at the largest (256). LayerNorm:
    each dtype with and without weight and bias, and bf16 rows with fp32 parameters (autocast).
    """
    import triton.language as tl

    from fastgpt.kernels import causal_attention as attention, layer_norm

    kernels = {
        "attention forward": (attention._attention_forward_kernel, attention.HOPPER_FORWARD_TILES,
                              attention.FORWARD_PRUNER),
        "attention backward dK/dV": (attention._attention_backward_dkdv_kernel, attention.HOPPER_BACKWARD_DKDV_TILES,
                                     attention.BACKWARD_DKDV_PRUNER),
        "attention backward dQ": (attention._attention_backward_dq_kernel, attention.HOPPER_BACKWARD_DQ_TILES,
                                  attention.BACKWARD_DQ_PRUNER),
    }
    # fp32 at head dim 64: its exact (not TF32) matmuls unroll into FMAs that take ptxas a minute at 128.
    variants = [(torch.float16, 128), (torch.bfloat16, 128), (torch.float32, 64), (torch.bfloat16, 48),
                (torch.bfloat16, 256)]
    for dtype, head_dim in variants:
        padded = triton.next_power_of_2(head_dim)
        dims = dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded)
        constexprs = dict(dims, DOT_DTYPE={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                                           torch.float32: tl.float32}[dtype])
        for name, (kernel, tiles, pruner) in kernels.items():
            args = dict(Q=torch.empty(0, dtype=dtype), HEAD_DIM_PADDED=padded,
                        tune_len_q=LONG_SEQUENCE, tune_len_k=LONG_SEQUENCE)
            kept = pruner(attention.make_configs(tiles), args)
            config = max(kept, key=lambda c: pruner.shared_memory_bytes(c, padded, dtype.itemsize))
            bound = pruner.shared_memory_bytes(config, padded, dtype.itemsize)
            yield f"{name} {dtype} D={head_dim}", kernel, dtype, constexprs, config, bound
        delta_config = triton.Config({"BLOCK_M": attention.DELTA_BLOCK}, num_warps=4)
        yield f"attention backward Delta {dtype} D={head_dim}", attention._backward_delta_kernel, dtype, dims, \
            delta_config, None

    block_n = 1024
    for x_dtype, param_dtype in [(d, d) for d in POINTER_NAMES] + [(torch.bfloat16, torch.float32)]:
        for affine in (True, False):
            if not affine and param_dtype != x_dtype:
                continue
            config = max(layer_norm.prune_configs(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": block_n}),
                         key=lambda c: c.kwargs["ROWS_PER_PROGRAM"])
            parameters = {"W": param_dtype, "B": param_dtype} if affine else {"W": None, "B": None}
            # The backward always sums dbias, whether or not there is a bias.
            for name, kernel, constexprs in (
                    ("forward", layer_norm._layer_norm_forward_kernel,
                     dict(HAS_WEIGHT=affine, HAS_BIAS=affine, BLOCK_N=block_n)),
                    ("backward", layer_norm._layer_norm_backward_kernel, dict(HAS_WEIGHT=affine, BLOCK_N=block_n))):
                description = f"layer_norm {name} x {x_dtype} params {param_dtype if affine else None}"
                yield description, kernel, (x_dtype, parameters), constexprs, config, None


def compile_for_hopper(kernel, dtypes, constexprs, config):
    """Compile one kernel variant to PTX and cubin for sm_90, with the argument properties of a real launch.

    A launch tells the compiler which pointers and integers are multiples of 16 (here: all of them,
    as for a contiguous bf16 (B, H, 4096, 128) input); without that it cannot vectorise the loads
    or pipeline them, and would compile different code from the GPU's.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the @triton.jit function under any @triton.autotune
    tensor_dtype, parameters = dtypes if isinstance(dtypes, tuple) else (dtypes, {})
    signature, constants, attributes = {}, dict(constexprs, **config.kwargs), {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in parameters and parameters[name] is None:
            signature[name], constants[name] = "constexpr", None
        elif name.isupper():
            dtype = torch.float32 if name in STATISTICS else parameters.get(name, tensor_dtype)
            signature[name] = "*" + POINTER_NAMES[dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGUMENTS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attributes[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile(ASTSource(fn, signature, constants, attributes), target=GPUTarget("cuda", 90, 32), options=options)


def check_hopper_compilation(shard, shards):
    """Compile this shard's variants; print one line each; return the problems found."""
    from fastgpt.kernels.causal_attention import SHARED_MEMORY_BYTES

    problems = []
    for i, (description, kernel, dtypes, constexprs, config, bound) in enumerate(hopper_variants()):
        if i % shards != shard:
            continue
        start = time.perf_counter()
        try:
            compiled = compile_for_hopper(kernel, dtypes, constexprs, config)
        except Exception as error:  # a CompilationError, or an assertion deep in the compiler
            problems.append(f"{description}: does not compile for sm_90: {type(error).__name__}: {error}")
            continue
        shared, ptx = compiled.metadata.shared, compiled.asm["ptx"]
        print(f"{description} {config}: shared {shared} B, {time.perf_counter() - start:.1f} s", flush=True)
        if shared > SHARED_MEMORY_BYTES:
            problems.append(f"{description}: needs {shared} B of shared memory, Hopper has {SHARED_MEMORY_BYTES}")
        if bound is not None:
            if shared > bound:
                problems.append(f"{description}: the pruner's estimate {bound} B is below the real {shared} B")
            low_precision = dtypes in (torch.float16, torch.bfloat16)
            if low_precision and "wgmma.mma_async" not in ptx:
                problems.append(f"{description}: its matmuls do not use Hopper's tensor cores (no wgmma)")
            if low_precision and "cp.async" not in ptx:
                problems.append(f"{description}: its loads are not pipelined (no cp.async)")
    return problems


def test_every_kernel_and_dtype_compiles_for_hopper():
    shards = 2  # one compiler process per core of a CI machine
    processes = [subprocess.Popen([sys.executable, __file__, "--compile-for-hopper", str(shard), str(shards)],
                                  cwd=ROOT, env=_without_interpreter(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for shard in range(shards)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-5000:]
    compiled = sum(output.count(": shared ") for output in outputs)
    assert compiled == len(list(hopper_variants())), "\n".join(outputs)


# ---------------------------------------------------------------------------------------------
# Autotuning configs
# ---------------------------------------------------------------------------------------------

def _attention_args(dtype, head_dim, seq_len_q, seq_len_k):
    return dict(Q=torch.empty(0, dtype=dtype), HEAD_DIM_PADDED=head_dim,
                tune_len_q=triton.next_power_of_2(seq_len_q), tune_len_k=triton.next_power_of_2(seq_len_k))


def test_attention_pruning_keeps_configs_that_fit():
    from fastgpt.kernels import causal_attention as attention

    configs = attention.make_configs(attention.HOPPER_FORWARD_TILES)
    kept = attention.FORWARD_PRUNER(configs, _attention_args(torch.bfloat16, 128, 4096, 4096))
    assert 1 < len(kept) < len(configs)
    for config in kept:
        assert attention.FORWARD_PRUNER.shared_memory_bytes(config, 128, 2) <= attention.SHARED_MEMORY_BYTES
    # The tile the fastest published Hopper kernels use for head dim 128 is among the candidates.
    assert any(c.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64} and c.num_warps == 8 for c in kept)
    # fp32 runs without tensor cores: only the smallest tile is worth compiling.
    fp32 = attention.FORWARD_PRUNER(configs, _attention_args(torch.float32, 128, 4096, 4096))
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in fp32] == [(64, 32, 3)]
    # Head dim 256 leaves only small tiles.
    for config in attention.FORWARD_PRUNER(configs, _attention_args(torch.bfloat16, 256, 4096, 4096)):
        assert config.kwargs["BLOCK_N"] <= 64


def test_attention_pruning_drops_blocks_longer_than_the_sequence():
    from fastgpt.kernels import causal_attention as attention

    configs = attention.make_configs(attention.HOPPER_BACKWARD_DQ_TILES)
    kept = attention.BACKWARD_DQ_PRUNER(configs, _attention_args(torch.bfloat16, 64, 40, 40))
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
    # One query against a long cache: the smallest query block is the only useful one.
    kept = attention.FORWARD_PRUNER(attention.make_configs(attention.HOPPER_FORWARD_TILES),
                                    _attention_args(torch.bfloat16, 64, 1, 4096))
    assert {c.kwargs["BLOCK_M"] for c in kept} == {64}


def test_attention_pruning_never_leaves_nothing():
    from fastgpt.kernels import causal_attention as attention

    huge = attention.make_configs([(128, 128, 4, 4), (128, 64, 4, 4)])
    kept = attention.BACKWARD_DKDV_PRUNER(huge, _attention_args(torch.bfloat16, 256, 4096, 4096))
    assert [c.kwargs for c in kept] == [{"BLOCK_M": 128, "BLOCK_N": 64}]


def test_attention_dkdv_pruning_counts_both_accumulators():
    from fastgpt.kernels import causal_attention as attention

    # 128 keys x 128 dims x 2 fp32 accumulators over 4 warps: 256 values per thread, which spills.
    configs = attention.make_configs([(32, 128, 4, 1), (32, 128, 8, 1)])
    kept = attention.BACKWARD_DKDV_PRUNER(configs, _attention_args(torch.bfloat16, 128, 4096, 4096))
    assert [c.num_warps for c in kept] == [8]


def test_layer_norm_pruning():
    from fastgpt.kernels import layer_norm

    def kept(block_n):
        return {(c.kwargs["ROWS_PER_PROGRAM"], c.num_warps)
                for c in layer_norm.prune_configs(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": block_n})}

    # Short rows: several rows per program, few warps.
    assert (1, 16) not in kept(1024) and (8, 4) in kept(1024)
    # Long rows: one or two rows per program, many warps.
    assert (8, 2) not in kept(8192) and (1, 16) in kept(8192)
    # Rows too long for any config to be good still leave one that runs.
    assert kept(65536) == {(1, 16)}


def test_interpreter_uses_one_config_per_kernel():
    from fastgpt.kernels import causal_attention as attention, interpreting, layer_norm

    if not interpreting():
        pytest.skip("on the GPU the kernels are autotuned")
    for kernel in (attention._attention_forward_kernel, attention._attention_backward_dkdv_kernel,
                   attention._attention_backward_dq_kernel, layer_norm._layer_norm_forward_kernel,
                   layer_norm._layer_norm_backward_kernel):
        assert len(kernel.configs) == 1


# ---------------------------------------------------------------------------------------------
# The backend as PyTorch sees it
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="the interpreter mode is for machines without a GPU")
def test_available_backends_reports_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py
    assert ops.available_backends()["triton"] is None
    assert ops.resolve_backend("triton", torch.device("cpu")) == "triton"
    # `auto` never picks the interpreter: it is for testing, not speed.
    assert ops.resolve_backend("auto", torch.device("cpu")) != "triton"

    script = "from fastgpt import ops; print(ops.available_backends()['triton'])"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_without_interpreter(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "no CUDA GPU" in result.stdout


def test_head_dims_beyond_256_are_a_clear_error():
    q = torch.randn(1, 1, 4, 272, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.causal_attention(q, q, q, backend="triton")


def test_largest_head_dim():
    q, k, v = (torch.randn(1, 1, 20, 256, device=DEVICE, requires_grad=True) for _ in range(3))
    out = ops.causal_attention(q, k, v, backend="triton")
    expected = ops.causal_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic():
    q, k, v = (torch.randn(2, 2, 70, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, 70, 32, device=DEVICE)
    first, second = (torch.autograd.grad(ops.causal_attention(q, k, v, backend="triton"), (q, k, v), grad_out)
                     for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The GPU benchmark, rehearsed
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="on a GPU, run the benchmark itself")
def test_gpu_benchmark_rehearsal(tmp_path):
    """The benchmark script runs end to end at tiny sizes on CPU tensors and writes every file."""
    result = subprocess.run([sys.executable, "benchmarks/gpu_benchmark.py", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("*.json")
    (table,) = tmp_path.glob("*.md")
    (plot,) = tmp_path.glob("*.png")
    results = json.loads(raw.read_text())
    for field in ("date", "device", "torch", "triton", "dry_run", "attention", "layer_norm", "training"):
        assert field in results, field
    assert results["dry_run"] is True
    measured = [row for row in results["attention"] + results["layer_norm"] if "skipped" not in row]
    assert {row["implementation"] for row in measured} >= {"triton", "reference", "torch"}
    assert all(row["ms"] > 0 for row in measured)
    assert not [row for row in results["attention"] if row["implementation"] == "triton" and "skipped" in row]
    assert {row["variant"] for row in results["training"]} == {"triton", "builtins"}
    assert "| " in table.read_text() and plot.stat().st_size > 1000


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile-for-hopper"]:
        found = check_hopper_compilation(int(sys.argv[2]), int(sys.argv[3]))
        print("\n".join(found))
        sys.exit(1 if found else 0)
    sys.exit(f"usage: {sys.argv[0]} --compile-for-hopper SHARD SHARDS")
