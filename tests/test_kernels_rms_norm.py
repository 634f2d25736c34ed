"""The RMSNorm kernels (csrc/rms_norm.cpp, kernels/rms_norm.py) against plain PyTorch and float64.

The C++ kernels are called as the ops `torch.ops.fastgpt.cpp_rms_norm_forward` / `_backward`, the
Triton ones through their launchers, on the GPU (or under Triton's interpreter when there is none).
Each is held to `rms_norm` below run in the same dtype and in float64, outputs and gradients, on rows
of awkward widths, with and without a weight, on non-contiguous inputs.

Run as a script, `python tests/test_kernels_rms_norm.py --compile-for-hopper SHARD SHARDS` compiles
a share of the Triton kernels' variants for sm_90 and reports their register spills.
"""

import re
import subprocess
import sys

import pytest
import torch

from kernel_checks import (ROOT, TRITON_DTYPES, assert_compiles_for_hopper_without_spills, backend_cases,
                           check_against_references, compile_for_hopper_main, compiler_environment, dtype_id,
                           needs_cpp, needs_triton, on_triton_device)

EPS = 1e-6
WIDTHS = [1, 7, 48, 80, 768, 1000]
ROWS = 37  # more than one task of rows per thread, and not a multiple of any block of rows


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, the statistic in fp32 at least (fp64 stays fp64)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute_dtype)
    y = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype)
    return y.to(x.dtype)


def cpp_rms_norm(x, weight, grad_y):
    """(y, dx, dweight or None) from the C++ kernels."""
    y, rstd = torch.ops.fastgpt.cpp_rms_norm_forward(x, weight, EPS)
    assert rstd.shape == x.shape[:-1]
    assert rstd.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    dx, dweight = torch.ops.fastgpt.cpp_rms_norm_backward(grad_y, x, weight, rstd)
    return y, dx, dweight if weight is not None else None


def triton_rms_norm(x, weight, grad_y):
    """(y, dx, dweight or None) from the Triton kernels, run on TRITON_DEVICE and brought back to the CPU."""
    from fastgpt.kernels.rms_norm import backward as rms_norm_backward, forward as rms_norm_forward

    x, weight, grad_y = (on_triton_device(t) for t in (x, weight, grad_y))
    y, rstd = rms_norm_forward(x, weight, EPS)
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    dx, dweight = rms_norm_backward(grad_y, x, weight, rstd)
    assert dweight.dtype == torch.float32
    return y.cpu(), dx.cpu(), dweight.cpu() if weight is not None else None


def check(kernel, what, x, weight, grad_y):
    results = kernel(x, weight, grad_y)
    assert results[0].dtype == x.dtype and results[1].dtype == x.dtype
    check_against_references(what, results, lambda x, w: rms_norm(x, w, EPS), [x, weight], grad_y,
                             ["y", "dx", "dweight"])


def inputs(rows, width, dtype, weight_dtype, layout="contiguous"):
    if layout == "contiguous":
        x, grad_y = torch.randn(rows, width, dtype=dtype), torch.randn(rows, width, dtype=dtype)
    else:  # transposed views: rows one element apart, columns `rows` apart
        x, grad_y = torch.randn(width, rows, dtype=dtype).t(), torch.randn(width, rows, dtype=dtype).t()
    weight = None if weight_dtype is None else (1 + torch.randn(width)).to(weight_dtype)
    return x, weight, grad_y


# ---- Both backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_rms_norm, triton_rms_norm))
def test_matches_reference_and_float64(kernel, dtype, width, with_weight):
    x, weight, grad_y = inputs(ROWS, width, dtype, dtype if with_weight else None)
    check(kernel, f"{kernel.__name__} {dtype_id(dtype)} width {width}", x, weight, grad_y)


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_rms_norm, triton_rms_norm, every_dtype=False))
def test_on_non_contiguous_inputs_batched_shapes_and_mixed_dtypes(kernel, dtype):
    name = kernel.__name__
    x, weight, grad_y = inputs(ROWS, 80, dtype, dtype, layout="transposed")
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    check(kernel, f"{name} transposed", x, weight, grad_y)
    rows_apart = torch.randn(ROWS, 2, 48, dtype=dtype)[:, 0]  # rows 96 values apart: read in place
    check(kernel, f"{name} strided rows", rows_apart, torch.randn(48, dtype=dtype), torch.randn(ROWS, 48, dtype=dtype))
    # Keys as the model normalises them: the (B, H, T, D) view of their share of a (B, T, 3 * H * D)
    # projection, and a gradient in the (B, T, H, D) memory that attention writes.
    keys = torch.randn(2, 5, 3 * 4 * 16, dtype=dtype)[..., 64:128].view(2, 5, 4, 16).transpose(1, 2)
    grad_keys = torch.randn(2, 5, 4, 16, dtype=dtype).transpose(1, 2)
    check(kernel, f"{name} keys of a projection", keys, None, grad_keys)
    x, weight, grad_y = torch.randn(2, 3, 5, 48, dtype=dtype), torch.randn(48, dtype=dtype), torch.randn(2, 3, 5, 48)
    check(kernel, f"{name} (2, 3, 5, 48)", x, weight, grad_y.to(dtype))
    x, weight, grad_y = inputs(ROWS, 768, torch.bfloat16, torch.float32)  # autocast: bf16 rows, fp32 weight
    check(kernel, f"{name} bf16 x, fp32 weight", x, weight, grad_y)


# ---- C++ ---------------------------------------------------------------------------------------

@needs_cpp
def test_cpp_backward_is_deterministic():
    x, weight, grad_y = inputs(300, 768, torch.float32, torch.float32)
    first, second = cpp_rms_norm(x, weight, grad_y), cpp_rms_norm(x, weight, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class CppRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        y, rstd = torch.ops.fastgpt.cpp_rms_norm_forward(x, weight, EPS)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.fastgpt.cpp_rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dweight if weight is not None else None


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (2, 29), (3, 2, 37)], ids=lambda s: "x".join(map(str, s)))
def test_cpp_gradcheck(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CppRMSNorm.apply, (x, weight))
    assert torch.autograd.gradcheck(lambda x: CppRMSNorm.apply(x, None), (x,))


@needs_cpp
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_cpp_opcheck(with_weight):
    x, weight, grad_y = inputs(6, 40, torch.float32, torch.float32 if with_weight else None)
    _, rstd = torch.ops.fastgpt.cpp_rms_norm_forward(x, weight, EPS)
    torch.library.opcheck(torch.ops.fastgpt.cpp_rms_norm_forward.default, (x, weight, EPS))
    torch.library.opcheck(torch.ops.fastgpt.cpp_rms_norm_backward.default, (grad_y, x, weight, rstd))


@needs_cpp
def test_cpp_rejects_a_weight_of_the_wrong_size():
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8\)"):
        torch.ops.fastgpt.cpp_rms_norm_forward(torch.randn(3, 8), torch.randn(7), EPS)


# ---- Triton ------------------------------------------------------------------------------------

def hopper_variants():
    """Every config autotuning may pick, for rows of 1024 and 8192 values: each kernel with every config
    its pruner keeps for that width, under autocast (bf16 rows with an fp32 weight; fp32 rows with bf16
    y and dy) and for each dtype with a weight of its own and without one."""
    from fastgpt.kernels import layer_norm, rms_norm

    kernels = [("forward", rms_norm._rms_norm_forward_kernel, layer_norm.FORWARD_PRUNER),
               ("backward", rms_norm._rms_norm_backward_kernel, layer_norm.BACKWARD_PRUNER)]
    # (the rows' dtype, the pointers of other dtypes, what they are)
    variants = [(torch.bfloat16, {"W": torch.float32}, "fp32 weight"),
                (torch.float32, {"W": torch.float32, "Y": torch.bfloat16, "DY": torch.bfloat16}, "bf16 y and dy")]
    for dtype in TRITON_DTYPES:
        variants += [(dtype, {"W": dtype}, f"{dtype_id(dtype)} weight"),
                     (dtype, {"W": None, "DW_PARTIAL": None}, "no weight")]
    for name, kernel, prune in kernels:
        for block_n in (1024, 8192):
            for config in prune(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": block_n}):
                for dtype, parameters, description in variants:
                    yield (f"rms_norm {name} {dtype_id(dtype)} rows of {block_n}, {description}", kernel,
                           (dtype, parameters), dict(HAS_WEIGHT=parameters["W"] is not None, BLOCK_N=block_n),
                           config)


def spilling_variant():
    """The backward on rows of 16384 values: even with 16 warps a thread holds 32 of them, and spills."""
    from fastgpt.kernels import layer_norm, rms_norm

    (config,) = layer_norm.BACKWARD_PRUNER(layer_norm.HOPPER_CONFIGS, {"BLOCK_N": 16384})
    return ("rms_norm backward bf16 rows of 16384", rms_norm._rms_norm_backward_kernel, torch.bfloat16,
            dict(HAS_WEIGHT=True, BLOCK_N=16384), config)


@needs_triton
def test_triton_compiles_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills(__file__, hopper_variants())


@needs_triton
def test_spill_counts_are_read():
    """The check above can fail: a variant that spills is reported as spilling."""
    result = subprocess.run([sys.executable, __file__, "--count-spills"], cwd=ROOT, env=compiler_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spilled = int(re.search(r"spilled (\d+) bytes", result.stdout).group(1))
    assert spilled > 0


if __name__ == "__main__":
    compile_for_hopper_main(hopper_variants(), spilling_variant())
