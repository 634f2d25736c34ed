"""Checks particular to the Triton backend; its numerics are tested with the other backends' in
tests/test_op_contract.py and tests/test_kernels_*.py.

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

POINTER_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}
FLOAT_ARGUMENTS = {"qk_scale", "scale", "eps"}
STATISTICS = {"LSE", "DELTA", "MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}  # fp32 whatever the input dtype
LONG_SEQUENCE = 4096  # long enough that no config is pruned for its length; shorter ones keep a subset
# (dtype, head dim, fp32 matmul precision): both 16-bit dtypes, the head dims of GPT-2 (64) and of
# larger models (128), the largest (256), a padded one (48), and fp32 exact and with TF32.
ATTENTION_VARIANTS = [(torch.bfloat16, 64, "ieee"), (torch.bfloat16, 128, "ieee"), (torch.float16, 128, "ieee"),
                      (torch.bfloat16, 256, "ieee"), (torch.bfloat16, 48, "ieee"), (torch.float32, 64, "ieee"),
                      (torch.float32, 64, "tf32")]
# (x, weight and bias, y and dy): one dtype throughout, bf16 rows with fp32 parameters (autocast on a
# bf16 model), and fp32 rows written in bf16 (autocast on an fp32 model); rows of GPT-2 small and of
# wider models (1024 and 8192 columns after rounding up).
LAYER_NORM_DTYPES = [(torch.bfloat16,) * 3, (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.bfloat16),
                     (torch.float32, torch.float32, torch.bfloat16)]
LAYER_NORM_WIDTHS = [1024, 8192]


def hopper_variants():
    """(description, kernel, pointer dtypes, constexprs, config, shared-memory bound) for every variant.

    Every config that autotuning may pick: for each attention kernel and variant, every config its
    pruner keeps; for LayerNorm, every config kept for each dtype combination and width (and once
    without weight and bias).
    """
    import triton.language as tl

    from fastgpt.kernels import causal_attention as attention, layer_norm

    kernels = {  # name: (kernel, its tiles, its pruner, its own constexprs)
        "attention forward": (attention._attention_forward_kernel, attention.HOPPER_FORWARD_TILES,
                              attention.FORWARD_PRUNER, {}),
        "attention backward dK/dV": (attention._attention_backward_dkdv_kernel, attention.HOPPER_BACKWARD_DKDV_TILES,
                                     attention.BACKWARD_DKDV_PRUNER, {"KEY_BLOCKS": True}),
        "attention backward dQ": (attention._attention_backward_dq_kernel, attention.HOPPER_BACKWARD_DQ_TILES,
                                  attention.BACKWARD_DQ_PRUNER, {"KEY_BLOCKS": False}),
    }
    for dtype, head_dim, precision in ATTENTION_VARIANTS:
        padded = triton.next_power_of_2(head_dim)
        dims = dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded)
        constexprs = dict(dims, DOT_PRECISION=precision, DOT_DTYPE={
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype])
        for name, (kernel, tiles, pruner, own_constexprs) in kernels.items():
            args = dict(Q=torch.empty(0, dtype=dtype), HEAD_DIM_PADDED=padded, DOT_PRECISION=precision,
                        tune_len_q=LONG_SEQUENCE, tune_len_k=LONG_SEQUENCE)
            for config in pruner(attention.make_configs(tiles), args):
                bound = pruner.shared_memory_bytes(config, padded, dtype.itemsize)
                yield (f"{name} {dtype} D={head_dim} {precision}", kernel, {"*": dtype},
                       {**constexprs, **own_constexprs}, config, bound)
        delta_config = triton.Config({"BLOCK_M": attention.DELTA_BLOCK}, num_warps=4)
        yield f"attention backward Delta {dtype} D={head_dim}", attention._backward_delta_kernel, {"*": dtype}, dims, \
            delta_config, None

    for x_dtype, param_dtype, y_dtype in LAYER_NORM_DTYPES:
        # Without weight and bias the kernels hold less: once, in the first combination, is enough.
        for affine in (True, False) if (x_dtype, param_dtype, y_dtype) == LAYER_NORM_DTYPES[0] else (True,):
            parameters = {"W": param_dtype, "B": param_dtype} if affine else {"W": None, "B": None}
            pointers = {"*": x_dtype, "Y": y_dtype, "DY": y_dtype, **parameters}
            for block_n in LAYER_NORM_WIDTHS:
                # The backward always sums dbias, whether or not there is a bias.
                for name, kernel, pruner, constexprs in (
                        ("forward", layer_norm._layer_norm_forward_kernel, layer_norm.FORWARD_PRUNER,
                         dict(HAS_WEIGHT=affine, HAS_BIAS=affine, BLOCK_N=block_n)),
                        ("backward", layer_norm._layer_norm_backward_kernel, layer_norm.BACKWARD_PRUNER,
                         dict(HAS_WEIGHT=affine, BLOCK_N=block_n))):
                    for config in pruner(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": block_n}):
                        description = (f"layer_norm {name} N={block_n} x {x_dtype} params "
                                       f"{param_dtype if affine else None} y {y_dtype}")
                        yield description, kernel, pointers, constexprs, config, None


def compile_for_hopper(kernel, pointer_dtypes, constexprs, config):
    """Compile one kernel variant to PTX and cubin for sm_90, with the argument properties of a real launch.

    `pointer_dtypes` maps a pointer argument's name to its element dtype ("*": the others'; None: an
    absent optional tensor). A launch tells the compiler which pointers and integers are multiples of
    16 (here: all of them, as for contiguous bf16 (B, H, 4096, 128) inputs); without that it cannot
    vectorise the loads or pipeline them, and would compile different code from the GPU's.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the @triton.jit function under any @triton.autotune
    signature, constants, attributes = {}, dict(constexprs, **config.kwargs), {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in pointer_dtypes and pointer_dtypes[name] is None:
            signature[name], constants[name] = "constexpr", None
        elif name.isupper():
            dtype = torch.float32 if name in STATISTICS else pointer_dtypes.get(name, pointer_dtypes["*"])
            signature[name] = "*" + POINTER_NAMES[dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGUMENTS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attributes[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile(ASTSource(fn, signature, constants, attributes), target=GPUTarget("cuda", 90, 32), options=options)


def local_memory_bytes(compiled):
    """Bytes of local memory (stack frame: spilled registers) per thread of a compiled kernel.

    Read from the cubin by cuobjdump (shipped in Triton's wheel): Triton reports the same figure as
    `n_spills` only once a GPU driver has loaded the kernel, and there is no GPU here.
    """
    import re
    import tempfile

    from triton.backends.nvidia import compiler

    cuobjdump = Path(compiler.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return sum(int(re.search(rf"{field}:(\d+)", usage).group(1)) for field in ("STACK", "LOCAL"))


def check_hopper_compilation(shard, shards):
    """Compile this shard's variants; print one line each; return the problems found."""
    from fastgpt.kernels.causal_attention import SHARED_MEMORY_BYTES

    problems = []
    for i, (description, kernel, pointers, constexprs, config, bound) in enumerate(hopper_variants()):
        if i % shards != shard:
            continue
        start = time.perf_counter()
        try:
            compiled = compile_for_hopper(kernel, pointers, constexprs, config)
        except Exception as error:  # a CompilationError, or an assertion deep in the compiler
            problems.append(f"{description} {config}: does not compile for sm_90: {type(error).__name__}: {error}")
            continue
        shared, ptx, local = compiled.metadata.shared, compiled.asm["ptx"], local_memory_bytes(compiled)
        print(f"{description} {config}: shared {shared} B, local {local} B, {time.perf_counter() - start:.1f} s",
              flush=True)
        if local:
            problems.append(f"{description} {config}: spills registers ({local} B of local memory per thread)")
        if shared > SHARED_MEMORY_BYTES:
            problems.append(f"{description}: needs {shared} B of shared memory, Hopper has {SHARED_MEMORY_BYTES}")
        if bound is not None:
            if shared > bound:
                problems.append(f"{description} {config}: the pruner's estimate {bound} B is below the real {shared} B")
            low_precision = pointers["*"] in (torch.float16, torch.bfloat16)
            # Hopper's warpgroup products (wgmma) take 64 rows at least; smaller tiles (the 32 x 32
            # dK/dV tile for the largest head dims) use the tensor cores through mma.sync.
            tensor_cores = "wgmma.mma_async" if max(config.kwargs.values()) >= 64 else "mma.sync"
            if low_precision and tensor_cores not in ptx:
                problems.append(f"{description} {config}: its matmuls do not use the tensor cores (no {tensor_cores})")
            if low_precision and "cp.async" not in ptx:
                problems.append(f"{description} {config}: its loads are not pipelined (no cp.async)")
    return problems


def test_every_kept_config_compiles_for_hopper_without_spilling():
    """Every config autotuning may pick compiles for sm_90, fits in shared memory, and spills nothing."""
    shards = 2  # one compiler process per core of a CI machine
    processes = [subprocess.Popen([sys.executable, __file__, "--compile-for-hopper", str(shard), str(shards)],
                                  cwd=ROOT, env=_without_interpreter(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for shard in range(shards)]
    outputs = [p.communicate(timeout=1500)[0] for p in processes]
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


def _kept(pruner, tiles, dtype, head_dim):
    from fastgpt.kernels import causal_attention as attention

    kept = pruner(attention.make_configs(tiles), _attention_args(dtype, head_dim, 4096, 4096))
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept}


def test_attention_pruning_drops_the_configs_that_spilled():
    """Configs seen to spill registers when compiled for sm_90 (bf16) are pruned, their neighbours kept.

    The score tiles (BLOCK_M x BLOCK_N) count, not only the accumulators: the forward's 128 x 128 tile
    at head dim 128 and the dQ kernel's 128 x 64 tile over 4 warps spilled with accumulators that fit.
    """
    from fastgpt.kernels import causal_attention as a

    forward = _kept(a.FORWARD_PRUNER, [(128, 128, 8, 3), (128, 64, 8, 3)], torch.bfloat16, 128)
    assert forward == {(128, 64, 8)}
    dq = _kept(a.BACKWARD_DQ_PRUNER, [(128, 64, 4, 3), (64, 64, 8, 3)], torch.bfloat16, 128)
    assert dq == {(64, 64, 8)}
    dkdv = _kept(a.BACKWARD_DKDV_PRUNER, [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3)], torch.bfloat16, 64)
    assert dkdv == {(64, 64, 8)}


def test_layer_norm_backward_keeps_fewer_values_per_thread_than_the_forward():
    from fastgpt.kernels import layer_norm

    def kept(pruner, block_n):
        return {(c.kwargs["ROWS_PER_PROGRAM"], c.num_warps) for c in pruner(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": block_n})}

    # Rows of 4096, two per program over 4 warps: 64 values per thread; the backward spilled there.
    assert (2, 4) in kept(layer_norm.FORWARD_PRUNER, 4096)
    assert (2, 4) not in kept(layer_norm.BACKWARD_PRUNER, 4096)
    assert (1, 4) in kept(layer_norm.BACKWARD_PRUNER, 4096)


def test_fp32_with_tf32_is_tuned_like_the_16_bit_dtypes():
    from fastgpt.kernels import causal_attention as attention

    configs = attention.make_configs(attention.HOPPER_FORWARD_TILES)
    args = _attention_args(torch.float32, 64, 4096, 4096)
    assert len(attention.FORWARD_PRUNER(configs, args)) == 1
    assert len(attention.FORWARD_PRUNER(configs, dict(args, DOT_PRECISION="tf32"))) > 1


def test_dot_precision_follows_torch_float32_matmul_precision():
    """In a fresh process: whichever of PyTorch's switches allows TF32 for fp32 matmuls, the kernels follow."""
    script = """
import torch
from fastgpt.kernels import dot_precision
print(dot_precision(torch.float32))
torch.set_float32_matmul_precision("high")
print(dot_precision(torch.float32), dot_precision(torch.bfloat16))
torch.backends.cuda.matmul.allow_tf32 = False
print(dot_precision(torch.float32))
torch.set_float32_matmul_precision("medium")
print(dot_precision(torch.float32))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["ieee", "tf32 ieee", "ieee", "tf32"]


def test_without_autotuning_each_kernel_has_one_config():
    from fastgpt.kernels import autotuning, layer_norm, rms_norm, rotary
    from fastgpt.kernels import causal_attention as attention

    if autotuning():
        pytest.skip("the kernels are autotuned here (a GPU without FASTGPT_TRITON_AUTOTUNE=0)")
    for kernel in (attention._attention_forward_kernel, attention._attention_backward_dkdv_kernel,
                   attention._attention_backward_dq_kernel, layer_norm._layer_norm_forward_kernel,
                   layer_norm._layer_norm_backward_kernel, rms_norm._rms_norm_forward_kernel,
                   rms_norm._rms_norm_backward_kernel, rotary._rotary_kernel):
        assert len(kernel.configs) == 1, kernel.fn.__name__


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


@pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter runs a grid's programs one after another: "
                                        "only a GPU, running them at once, could give another sum")
def test_backward_is_deterministic():
    q, k, v = (torch.randn(2, 2, 70, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, 70, 32, device=DEVICE)
    first, second = (torch.autograd.grad(ops.causal_attention(q, k, v, backend="triton"), (q, k, v), grad_out)
                     for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_output_is_laid_out_for_the_model():
    """O comes in (B, T, H, D) memory, so the model's (B, H, T, D) -> (B, T, H * D) step is a view, not a copy."""
    q, k, v = (torch.randn(2, 3, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = ops.causal_attention(q, k, v, backend="triton")
    merged = out.transpose(1, 2).reshape(2, 20, 48)
    assert out.transpose(1, 2).is_contiguous() and merged.data_ptr() == out.data_ptr()
    dq, dk, dv = torch.autograd.grad(merged.square().sum(), (q, k, v))
    expected = ops.causal_attention(q, k, v, backend="reference").transpose(1, 2).reshape(2, 20, 48)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    for grad, expected_grad in zip((dq, dk, dv), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_attention_with_many_heads_on_the_one_dimensional_grid():
    """Hundreds of (batch, head) pairs, each with a few query blocks taken heavy-first, all land right."""
    q, k, v = (torch.randn(150, 4, 40, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(ops.causal_attention(q, k, v, backend="triton"),
                               ops.causal_attention(q, k, v, backend="reference"), rtol=1e-4, atol=1e-4)


def test_the_grid_of_a_huge_batch_fits_cuda_limits():
    """B x H past 65535 (CUDA's limit on a grid's second dimension) launches on the first one."""
    from fastgpt.kernels import causal_attention as attention

    (programs,) = attention.heads_major_grid(batch_heads=100_000 * 12, n_blocks=8192 // 64)
    assert programs == 100_000 * 12 * 128 < 2 ** 31
    with pytest.raises(ValueError, match="smaller batch"):
        attention.heads_major_grid(batch_heads=2 ** 26, n_blocks=64)


def test_offsets_within_a_head_are_checked_without_allocating():
    """Whole heads are addressed with 64-bit offsets (any batch works); within one head 32-bit, which the
    launchers check. Meta tensors have shapes and strides but no memory."""
    from fastgpt.kernels import causal_attention as attention

    like = torch.empty(0, device="meta", dtype=torch.bfloat16)
    huge_batch = attention.empty_heads((70_000, 16, 2048, 128), like)  # 2^38 elements in all
    attention.check_offsets_within_a_head("q", huge_batch)
    assert huge_batch.stride(0) * 70_000 > 2 ** 31 > huge_batch.stride(2) * 2048
    too_long = attention.empty_heads((1, 64, 2 ** 18 + 1, 128), like)  # one head's rows span past 2^31 elements
    with pytest.raises(ValueError, match="within one head"):
        attention.check_offsets_within_a_head("q", too_long)


def test_layer_norm_under_autocast_writes_the_autocast_dtype():
    """The next matrix product would cast the output to bf16: it is written in bf16 directly, the value
    the cast would give; the gradient still comes back in x's dtype."""
    x = torch.randn(8, 64, device=DEVICE, requires_grad=True)
    weight, bias = (torch.randn(64, device=DEVICE, requires_grad=True) for _ in range(2))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = ops.layer_norm(x, weight, bias, backend="triton")
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.double(), (64,), weight.double(), bias.double())
    # One bf16 step of the value: the interpreter truncates where the GPU rounds.
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -7, atol=2 ** -7)
    grad_out = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), grad_out.double())
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-4)


def test_layer_norm_backward_reads_the_gradient_through_its_strides():
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(40, device=DEVICE).expand(6, 40)  # every row the same: row stride 0
    (dx,) = torch.autograd.grad(ops.layer_norm(x, None, None, backend="triton"), x, grad_out)
    (expected,) = torch.autograd.grad(ops.layer_norm(x, None, None, backend="reference"), x, grad_out)
    torch.testing.assert_close(dx, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The GPU benchmark, rehearsed
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="on a GPU, run the benchmark itself")
def test_gpu_benchmark_rehearsal(tmp_path):
    """The GPU script runs end to end at tiny sizes on CPU tensors and writes its report, marked a dry run."""
    result = subprocess.run([sys.executable, "benchmarks/gpu_benchmark.py", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("dry-run-*.json")
    (table,) = tmp_path.glob("dry-run-*.md")
    results = json.loads(raw.read_text())
    for fact in ("date", "torch", "triton", "numpy", "cpu", "bf16_matmul_tflops", "copy_gb_per_s", "auto_choices"):
        assert fact in results, fact
    assert results["dry_run"] is True and "DRY RUN" in table.read_text()
    assert results["failures"] == []
    assert results["gpu_tests"].startswith("collected"), results["gpu_tests"]  # the GPU run's test files exist
    tables = results["results"]
    attention = tables["attention forward+backward (bf16, causal)"]
    assert any("Hkv" in row for row in attention), "no grouped-query attention row"
    for cells in attention.values():
        assert cells["triton"]["median_ms"] > 0 and cells["auto"]["median_ms"] > 0
        assert "skipped" in cells["sdpa-cudnn"]  # no cuDNN on CPU: said, not failed
    for op, baseline in (("layer_norm", "torch"), ("rms_norm", "torch"), ("rotary", "reference"), ("swiglu", "torch"),
                         ("relu_squared", "torch"), ("cross_entropy", "torch")):
        for which in ("forward", "forward+backward"):
            for cells in tables[f"{op} {which} (bf16)"].values():
                assert all(cells[name]["median_ms"] > 0 for name in ("triton", "auto", baseline)), (op, which)
    training = tables["training step (bf16 autocast, eager)"]
    assert [row.split(",")[0] for row in training] == ["GPT-2 small", "no arguments", "--preset modern"]
    assert all(set(cells) == {"triton", "builtins", "auto"} for cells in training.values())
    assert {row["backend"] for row in results["auto_choices"]} <= {"triton", "torch"}
    assert all(max(check.values()) < 0.1 for check in results["attention_check"].values())


def test_gpu_benchmark_training_section_leaves_auto_the_default(monkeypatch):
    """The training section sets each variant's backend for its steps; the sections after it time
    `auto` as a call that names no backend, which must then still be the automatic choice."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_benchmark
    from harness import Report

    from fastgpt.ops import dispatch

    def timer(steps, rounds):  # the built-ins' step last, as a round of turns may end
        steps["builtins"]()
        return {name: 1.0 for name in steps}
    report = Report("test")
    report.facts["bf16_matmul_tflops"] = 1.0
    gpu_benchmark.bench_training(gpu_benchmark.SIZES["dry-run"], torch.device("cpu"), timer, report)
    assert dispatch._default_backend is None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile-for-hopper"]:
        found = check_hopper_compilation(int(sys.argv[2]), int(sys.argv[3]))
        print("\n".join(found))
        sys.exit(1 if found else 0)
    sys.exit(f"usage: {sys.argv[0]} --compile-for-hopper SHARD SHARDS")
