"""The rotary position embedding kernels (csrc/rotary.cpp, kernels/rotary.py) against plain PyTorch
and float64.

The C++ kernels are called as the ops `torch.ops.fastgpt.cpp_rotary_forward` / `_backward`, the Triton
ones through their launchers, on the GPU (or under Triton's interpreter when there is none). Each is
held to `rotary` below run in the same dtype and in float64, output and gradient, at T = 1, odd T, T
not a multiple of the position block, head dims 48, 80 and 128, offsets (decoding with a cache), and
on the transposed and strided views a model passes.

Run as a script, `python tests/test_kernels_rotary.py --compile-for-hopper SHARD SHARDS` compiles a
share of the Triton kernel's variants for sm_90 and reports their register spills.
"""

import math

import pytest
import torch

from kernel_checks import (TRITON_DTYPES, assert_compiles_for_hopper_without_spills, backend_cases,
                           check_against_references, compile_for_hopper_main, dtype_id, needs_cpp, needs_triton,
                           on_triton_device)

BASE = 10000.0


def rotary(x, offset, base):
    """x (B, H, T, D) with each channel pair (i, i + D/2) of row t rotated by (offset + t) * base^(-2i/D),
    as Hugging Face's Llama applies it (q * cos + rotate_half(q) * sin). The angles and their cos and
    sin are computed in fp64, then the rotation in x's dtype."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / x.shape[-1])
    positions = offset + torch.arange(x.shape[-2], dtype=torch.float64, device=x.device)
    angles = positions[:, None] * theta[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def cpp_rotary(x, offset, base, grad_y):
    y = torch.ops.fastgpt.cpp_rotary_forward(x, offset, base)
    return y, torch.ops.fastgpt.cpp_rotary_backward(grad_y, offset, base)


def triton_rotary(x, offset, base, grad_y):
    """(y, dx) from the Triton kernel, run on TRITON_DEVICE and brought back to the CPU."""
    from fastgpt.kernels.rotary import backward as rotary_backward, forward as rotary_forward

    y, dx = rotary_forward(on_triton_device(x), offset, base), rotary_backward(on_triton_device(grad_y), offset, base)
    return y.cpu(), dx.cpu()


def inputs(shape, dtype, layout):
    """x and grad_y of shape (B, H, T, D) laid out as a model may pass them."""
    b, h, t, d = shape
    if layout == "contiguous":
        return torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, d, dtype=dtype)
    if layout == "transposed":  # (B, T, H, D) -> (B, H, T, D), as q.view(B, T, H, D).transpose(1, 2)
        return tuple(torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    if layout == "qkv-slice":  # q of a fused (B, T, 3, H, D) projection: rows far apart, not dense
        return tuple(torch.randn(b, t, 3, h, d, dtype=dtype)[:, :, 0].transpose(1, 2) for _ in range(2))
    assert layout == "channels-apart"  # channels not adjacent: the kernels copy first
    return tuple(torch.randn(b, h, d, t, dtype=dtype).transpose(2, 3) for _ in range(2))


def check(kernel, what, x, grad_y, offset, base=BASE):
    y, dx = kernel(x, offset, base, grad_y)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    check_against_references(what, [y, dx], lambda x: rotary(x, offset, base), [x], grad_y, ["y", "dx"])
    return y


# (B, H, T, D): T = 1, odd T, T not a multiple of the position block (16 under the interpreter), head
# dims 48, 80 and 128, and a head dim of 2 (one pair).
SHAPES = [(1, 1, 1, 48), (2, 3, 37, 80), (1, 2, 33, 128), (2, 1, 7, 2), (1, 3, 16, 48)]
OFFSETS = [0, 5, 1000]


# ---- Both backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_rotary, triton_rotary))
def test_matches_reference_and_float64(kernel, dtype, shape, offset):
    x, grad_y = inputs(shape, dtype, "contiguous")
    check(kernel, f"{kernel.__name__} {dtype_id(dtype)} {shape} offset {offset}", x, grad_y, offset)


@pytest.mark.parametrize("layout", ["transposed", "qkv-slice", "channels-apart"])
@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_rotary, triton_rotary, every_dtype=False))
def test_on_the_views_a_model_passes(kernel, dtype, layout):
    x, grad_y = inputs((2, 3, 37, 48), dtype, layout)
    y = check(kernel, f"{kernel.__name__} {layout}", x, grad_y, 3, base=500000.0)
    if layout == "transposed":  # dense: read in place, and the output is laid out as the input
        assert y.stride() == x.stride()


# ---- C++ ---------------------------------------------------------------------------------------

@needs_cpp
def test_cpp_angles_stay_exact_far_into_the_sequence():
    """Angles formed in fp32 would be off by about p * 2^-24 rad (2e-3 at p = 40000): these are not."""
    x = torch.randn(1, 2, 8, 64, dtype=torch.float64)
    y = torch.ops.fastgpt.cpp_rotary_forward(x.float(), 40000, BASE)
    assert (y.double() - rotary(x, 40000, BASE)).abs().max() < 2e-6


@needs_cpp
def test_cpp_gradcheck():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    class Rotary(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.ops.fastgpt.cpp_rotary_forward(x, 3, BASE)

        @staticmethod
        def backward(ctx, grad_y):
            return torch.ops.fastgpt.cpp_rotary_backward(grad_y, 3, BASE)

    assert torch.autograd.gradcheck(Rotary.apply, (x,))


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "qkv-slice"])
def test_cpp_opcheck(layout):
    x, grad_y = inputs((1, 2, 9, 16), torch.float32, layout)
    torch.library.opcheck(torch.ops.fastgpt.cpp_rotary_forward.default, (x, 4, BASE))
    torch.library.opcheck(torch.ops.fastgpt.cpp_rotary_backward.default, (grad_y, 4, BASE))


@needs_cpp
def test_cpp_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        torch.ops.fastgpt.cpp_rotary_forward(torch.randn(1, 1, 4, 7), 0, BASE)
    with pytest.raises(RuntimeError, match=r"expects a \(B, H, T, D\) tensor"):
        torch.ops.fastgpt.cpp_rotary_forward(torch.randn(4, 8), 0, BASE)


# ---- Triton ------------------------------------------------------------------------------------

@needs_triton
def test_triton_angles_stay_exact_far_into_the_sequence():
    from fastgpt.kernels.rotary import forward as rotary_forward

    x = torch.randn(1, 2, 8, 64, dtype=torch.float64)
    y = rotary_forward(on_triton_device(x.float()), 40000, BASE).cpu()
    assert (y.double() - rotary(x, 40000, BASE)).abs().max() < 2e-6


@needs_triton
def test_triton_rejects_bad_shapes():
    from fastgpt.kernels.rotary import forward as rotary_forward

    with pytest.raises(ValueError, match="D even"):
        rotary_forward(on_triton_device(torch.randn(1, 1, 4, 7)), 0, BASE)


def pruner_args(seq_len, head_dim, dtype):
    """The launch arguments the configs are pruned by."""
    import triton

    return dict(X=torch.empty(0, dtype=dtype), seq_len=seq_len, HALF_PADDED=triton.next_power_of_2(head_dim // 2))


@needs_triton
def test_triton_pruning():
    from fastgpt.kernels import rotary

    def kept(seq_len, head_dim, dtype=torch.bfloat16):
        args = pruner_args(seq_len, head_dim, dtype)
        return {(c.kwargs["BLOCK_T"], c.num_warps) for c in rotary.prune_configs(rotary.HOPPER_CONFIGS, args)}

    # Decoding (T = 1): one position per program, one warp.
    assert kept(1, 128) == {(1, 1)}
    # Long sequences: blocks of positions, but no tile of more than 16 values per thread.
    assert (32, 4) in kept(4096, 128) and (32, 4) not in kept(4096, 256) and (32, 8) in kept(4096, 256)
    # Short ones: no block of positions longer than needed.
    assert kept(5, 128) == {(1, 1), (8, 4), (8, 8)}
    # fp32 over 32 positions on 8 warps spilled.
    assert (32, 8) in kept(4096, 128) and (32, 8) not in kept(4096, 128, torch.float32)


def hopper_variants():
    """Every config autotuning may pick, for head dims 48, 80 and 128 and T = 1 and 4096: the kernel in
    each dtype, forward (sign +1) and backward (-1), with every config kept for that dtype at either
    length."""
    import triton

    from fastgpt.kernels import rotary

    for head_dim in (48, 80, 128):
        half = head_dim // 2
        for dtype in TRITON_DTYPES:
            # T is no constexpr: a config kept for both lengths is one variant.
            kept = {str(config): config for seq_len in (1, 4096)
                    for config in rotary.prune_configs(rotary.HOPPER_CONFIGS, pruner_args(seq_len, head_dim, dtype))}
            for config in kept.values():
                for sign in (1.0, -1.0):
                    constexprs = dict(LOG2_BASE=math.log2(BASE), SIGN=sign, HALF=half,
                                      HALF_PADDED=triton.next_power_of_2(half))
                    yield (f"rotary {dtype_id(dtype)} D={head_dim} sign {sign:+}", rotary._rotary_kernel, dtype,
                           constexprs, config)


@needs_triton
def test_triton_compiles_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills(__file__, hopper_variants())


if __name__ == "__main__":
    compile_for_hopper_main(hopper_variants())
