"""What the kernel-level tests (tests/test_kernels_*.py) share.

- check_against_references: a kernel's output and gradients against a plain-PyTorch reference run in
  the same dtype and in float64 (test_ops.py's rule: the kernel must be about as close to the float64
  result as the same-dtype reference is).
- The two kernel backends as pytest parameters (`backend_cases`), so one test holds both to the
  same checks, each skipped where its backend is unavailable.
- The device the Triton kernels run on (`TRITON_DEVICE`), and `on_triton_device`, which moves a test's
  CPU inputs there as they are laid out: the tests make their inputs, and compute their references,
  on the CPU.
- Compiling Triton kernels for Hopper (sm_90) without a GPU and counting their register spills, in a
  subprocess without TRITON_INTERPRET (see tests/test_triton_kernels.py).
"""

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.ops import cpp, dispatch
from op_checks import DEVICE, assert_close_to_float64

ROOT = Path(__file__).resolve().parents[1]

CPP_UNAVAILABLE = cpp.unavailable_reason("cpu")  # loads the extension, which registers the ops

# The kernels' dtypes: the C++ kernels take fp32, bf16 and fp64 (as the existing C++ ops), the Triton
# kernels fp32, bf16 and fp16. fp64 is held to the float64 result directly (see check_against_references).
CPP_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The C++ kernels run on the CPU; the Triton kernels on the GPU when there is one, else on CPU tensors
# through Triton's interpreter (conftest.py).
TRITON_DEVICE = DEVICE


needs_cpp = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=f"C++ extension unavailable: {CPP_UNAVAILABLE}")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def dtype_id(dtype):
    return str(dtype).split(".")[-1]


def backend_cases(cpp_kernel, triton_kernel, every_dtype=True):
    """pytest parameters (kernel, dtype): the C++ and the Triton kernel, each with every dtype it takes
    (or fp32 alone), each skipped where its backend is unavailable."""
    def cases(name, kernel, dtypes, needs):
        return [pytest.param(kernel, dtype, marks=needs, id=f"{name}-{dtype_id(dtype)}")
                for dtype in (dtypes if every_dtype else [torch.float32])]
    return cases("cpp", cpp_kernel, CPP_DTYPES, needs_cpp) + cases("triton", triton_kernel, TRITON_DTYPES, needs_triton)


def on_triton_device(t):
    """t on TRITON_DEVICE with its shape, strides and storage offset (None stays None): its whole storage
    is moved and viewed again, so that a transposed or strided view stays one and the kernels are
    tested on the layouts a model hands them, not on contiguous copies."""
    if t is None or t.device == TRITON_DEVICE:
        return t
    storage = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return storage.to(TRITON_DEVICE).as_strided(t.shape, t.stride(), t.storage_offset())


def run_reference(reference, tensors, grad_out):
    """reference(*tensors) on leaf copies, and the gradients of <output, grad_out> for every tensor input
    (None for tensors that are None)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = reference(*leaves)
    differentiable = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, differentiable, grad_out))
    return [out.detach()] + [next(grads) if t is not None else None for t in leaves]


def check_against_references(what, kernel_results, reference, tensors, grad_out, names):
    """kernel_results (output, then the gradient of each tensor in `tensors`, None where there is none)
    against `reference` run in the tensors' own dtypes and in float64.

    In float64 the kernel must agree with the float64 reference to rounding; otherwise each result may be
    off the float64 result by its own dtype's tolerance (an fp32 loss of bf16 logits: fp32's) or three
    times the same-dtype reference's own error.
    """
    dtype = tensors[0].dtype
    exact = run_reference(reference, [t.double() if t is not None else None for t in tensors], grad_out.double())
    same_dtype = exact if dtype == torch.float64 else run_reference(reference, tensors, grad_out)
    for name, got, ref, truth in zip(names, kernel_results, same_dtype, exact):
        if truth is None:
            assert got is None or got.numel() == 0, f"{what}: {name} where none was expected"
            continue
        assert got.shape == truth.shape, f"{what}: {name} has shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
        if dtype == torch.float64:
            torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert_close_to_float64(got, ref, truth, got.dtype, f"{what}: {name}")


# ---------------------------------------------------------------------------------------------
# Fake (shape-only) functions of the C++ ops, for torch.library.opcheck
# ---------------------------------------------------------------------------------------------

def _statistics_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if CPP_UNAVAILABLE is None:
    dispatch.resolve_backend("cpp", torch.device("cpu"))  # declares the C++ kernel ops of every op


# ---------------------------------------------------------------------------------------------
# Compiling for Hopper
# ---------------------------------------------------------------------------------------------

def compile_and_count_spills(kernel, dtypes, constexprs, config):
    """Compile one variant for sm_90 (tests/test_triton_kernels.py's compile_for_hopper) and return the
    bytes of registers it spills, read from ptxas's report (TRITON_DUMP_PTXAS_LOG=1 prints it)."""
    from test_triton_kernels import compile_for_hopper

    tensor_dtype, parameters = dtypes if isinstance(dtypes, tuple) else (dtypes, {})
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        compile_for_hopper(kernel, {"*": tensor_dtype, **parameters}, constexprs, config)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report.getvalue())]
    assert spills, "ptxas printed no report: is TRITON_DUMP_PTXAS_LOG=1 set?"
    return sum(spills)


def check_variants_compile_without_spills(variants, shard=0, shards=1):
    """Compile this shard's (description, kernel, dtypes, constexprs, config) variants; print a line for
    each; return the problems found."""
    problems = []
    for index, (description, kernel, dtypes, constexprs, config) in enumerate(variants):
        if index % shards != shard:
            continue
        try:
            spilled = compile_and_count_spills(kernel, dtypes, constexprs, config)
        except Exception as error:  # a CompilationError, or an assertion deep in the compiler
            problems.append(f"{description} {config}: does not compile for sm_90: {type(error).__name__}: {error}")
            continue
        print(f"{description} {config}: compiled, {spilled} bytes spilled", flush=True)
        if spilled:
            problems.append(f"{description} {config}: spills {spilled} bytes of registers")
    return problems


def compiler_environment():
    """The environment of a process that compiles as the GPU machine would (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # ptxas reports only when it runs: a variant found in Triton's cache would be reported as nothing.
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    return env


def compile_for_hopper_in_subprocesses(test_file, shards=2, timeout=600):
    """Run `python test_file --compile-for-hopper SHARD SHARDS` for each shard at once (one compiler per
    core); return (all succeeded, their output)."""
    processes = [subprocess.Popen([sys.executable, str(test_file), "--compile-for-hopper", str(shard), str(shards)],
                                  cwd=ROOT, env=compiler_environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for shard in range(shards)]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    return all(process.returncode == 0 for process in processes), "\n".join(outputs)


def assert_compiles_for_hopper_without_spills(test_file, variants):
    """Every variant `test_file` lists (run as a script, see compile_for_hopper_main) compiles for sm_90
    and spills no register."""
    succeeded, output = compile_for_hopper_in_subprocesses(test_file)
    assert succeeded, output[-5000:]
    assert output.count(", 0 bytes spilled") == len(list(variants)), output[-5000:]


def compile_for_hopper_main(variants, spilling_variant=None):
    """The entry point of a kernel test file run as a script: `--compile-for-hopper SHARD SHARDS`, or
    `--count-spills` to print the spills of a variant known to spill (what shows the count is read)."""
    if sys.argv[1:] == ["--count-spills"] and spilling_variant is not None:
        print(f"spilled {compile_and_count_spills(*spilling_variant[1:])} bytes")
        sys.exit(0)
    if sys.argv[1:2] != ["--compile-for-hopper"] or len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} --compile-for-hopper SHARD SHARDS | --count-spills")
    problems = check_variants_compile_without_spills(variants, int(sys.argv[2]), int(sys.argv[3]))
    print("\n".join(problems))
    sys.exit(1 if problems else 0)
