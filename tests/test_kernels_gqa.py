"""Grouped-query attention in the attention kernels (csrc/causal_attention.cpp, kernels/causal_attention.py)
against plain PyTorch and float64.

k and v have Hkv heads, Hkv dividing the H heads of q; query head h attends with key/value head
h // (H / Hkv). The C++ kernels are called as the ops `torch.ops.fastgpt.cpp_causal_attention_forward` /
`_backward`, the Triton ones through their launchers, on the GPU (or under Triton's interpreter when
there is none). Each is held to `grouped_query_attention` below (Hugging Face's repeat_kv, then causal
attention) run in the same dtype and in float64, output and gradients, for Hkv = 1, 2 and H, at T = 1,
odd T, head dims 48, 80 and 128, keys longer than the queries, and on views of one fused projection.
Gradcheck, determinism, opcheck and the refusals are checked on the C++ kernels.
"""

import pytest
import torch

from fastgpt.ops.definitions import causal_attention
from kernel_checks import TRITON_DEVICE, backend_cases, check_against_references, dtype_id, needs_cpp, on_triton_device


def repeat_kv(t, n_rep):
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), each head repeated n_rep times in place (Hugging Face's repeat_kv)."""
    b, kv_heads, t_len, d = t.shape
    return t[:, :, None].expand(b, kv_heads, n_rep, t_len, d).reshape(b, kv_heads * n_rep, t_len, d)


def grouped_query_attention(q, k, v, scale):
    """Causal attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D): each key/value head serves H / Hkv
    consecutive query heads."""
    n_rep = q.shape[1] // k.shape[1]
    return causal_attention.reference(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale)


def cpp_attention(q, k, v, grad_out, scale):
    """(out, dq, dk, dv) from the C++ kernels."""
    out, lse = torch.ops.fastgpt.cpp_causal_attention_forward(q, k, v, scale)
    assert lse.shape == q.shape[:3] and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.ops.fastgpt.cpp_causal_attention_backward(grad_out, q, k, v, out, lse, scale)
    return out, dq, dk, dv


def triton_attention(q, k, v, grad_out, scale):
    """(out, dq, dk, dv) from the Triton kernels, run on TRITON_DEVICE and brought back to the CPU."""
    from fastgpt.kernels.causal_attention import backward as attention_backward, forward as attention_forward

    q, k, v, grad_out = (on_triton_device(t) for t in (q, k, v, grad_out))
    out, lse = attention_forward(q, k, v, scale)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32  # base 2, in fp32 whatever the dtype
    return [t.cpu() for t in (out, *attention_backward(grad_out, q, k, v, out, lse, scale))]


def check(kernel, what, q, k, v, grad_out):
    scale = q.shape[-1] ** -0.5
    results = kernel(q, k, v, grad_out, scale)
    assert [t.dtype for t in results] == [q.dtype] * 4
    check_against_references(what, results, lambda q, k, v: grouped_query_attention(q, k, v, scale), [q, k, v],
                             grad_out, ["output", "dq", "dk", "dv"])


def inputs(b, h, kv_heads, t_q, t_k, d, dtype):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D), and the gradient of the output."""
    q, grad_out = torch.randn(b, h, t_q, d, dtype=dtype), torch.randn(b, h, t_q, d, dtype=dtype)
    k, v = torch.randn(b, kv_heads, t_k, d, dtype=dtype), torch.randn(b, kv_heads, t_k, d, dtype=dtype)
    return q, k, v, grad_out


# ---- Both backends -----------------------------------------------------------------------------

# (B, H, Hkv, Tq, Tk, D): Hkv = 1, 2 and H; T = 1, odd T, T not a multiple of any block; head dims
# 48, 80 and 128; keys longer than the queries (decoding with a cache).
SHAPES = [
    (1, 4, 1, 1, 1, 48),
    (2, 6, 2, 37, 37, 80),
    (1, 4, 4, 33, 33, 128),
    (2, 8, 2, 70, 70, 48),
    (1, 6, 3, 5, 70, 80),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_attention, triton_attention))
def test_matches_reference_and_float64(kernel, dtype, shape):
    check(kernel, f"{kernel.__name__} {dtype_id(dtype)} {shape}", *inputs(*shape, dtype))


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_attention, triton_attention))
def test_one_key_value_head_over_several_key_blocks(kernel, dtype):
    """300 positions: two of the C++ forward's 256-key blocks, and five of its backward's 64-key blocks,
    which the backward deals out to several tasks; on a GPU, several blocks of whichever tiles the
    Triton kernels run with. Triton's interpreter, which runs one program at a time (300 positions
    take it 5 s a dtype), is given 100: seven of its 16-key blocks."""
    t_len = 100 if kernel is triton_attention and TRITON_DEVICE.type == "cpu" else 300
    check(kernel, f"{kernel.__name__} {dtype_id(dtype)} Hkv=1 T={t_len}", *inputs(1, 4, 1, t_len, t_len, 16, dtype))


def qkv_views(b, h, kv_heads, t_len, d, dtype=torch.float32):
    """q, k, v as transposed views of one (B, T, H + 2 Hkv, D) projection, as a model's fused qkv makes them."""
    qkv = torch.randn(b, t_len, h + 2 * kv_heads, d, dtype=dtype)
    q, k, v = qkv.split([h, kv_heads, kv_heads], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_attention, triton_attention, every_dtype=False))
def test_on_views_of_one_projection(kernel, dtype, kv_heads):
    q, k, v = qkv_views(2, 6, kv_heads, 41, 48, dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    grad_out = torch.randn(2, 41, 6, 48, dtype=dtype).transpose(1, 2)
    check(kernel, f"{kernel.__name__} views Hkv={kv_heads}", q, k, v, grad_out)


# ---- C++ ---------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gradcheck(kv_heads):
    q = torch.randn(1, 4, 9, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, 11, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, 11, 6, dtype=torch.float64, requires_grad=True)
    forward = torch.ops.fastgpt.cpp_causal_attention_forward  # differentiable through fastgpt.ops.cpp's registration
    assert torch.autograd.gradcheck(lambda q, k, v: forward(q, k, v, 0.4)[0], (q, k, v))


@needs_cpp
def test_backward_is_deterministic_and_independent_of_the_thread_count():
    """dK and dV of a shared head are summed over its query heads in one fixed order by one task."""
    q, k, v = torch.randn(1, 8, 200, 32), torch.randn(1, 2, 200, 32), torch.randn(1, 2, 200, 32)
    grad_out = torch.randn(1, 8, 200, 32)
    first, second = cpp_attention(q, k, v, grad_out, 0.2), cpp_attention(q, k, v, grad_out, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpp_attention(q, k, v, grad_out, 0.2)
    finally:
        torch.set_num_threads(threads)
    out, dq, dk, dv = first
    assert torch.equal(out, single[0]) and torch.equal(dk, single[2]) and torch.equal(dv, single[3])
    # dQ sums per-task partials, and how many tasks share a head depends on the thread count.
    torch.testing.assert_close(dq, single[1], rtol=1e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_opcheck(kv_heads):
    q = torch.randn(1, 3, 12, 16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, 12, 16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.fastgpt.cpp_causal_attention_forward.default, (q, k, v, 0.25))
    out, lse = torch.ops.fastgpt.cpp_causal_attention_forward(q, k, v, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25)
    torch.library.opcheck(torch.ops.fastgpt.cpp_causal_attention_backward.default, args)


@needs_cpp
def test_rejects_heads_that_do_not_divide():
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(RuntimeError, match="the 4 key/value heads must divide the 6 query heads"):
        torch.ops.fastgpt.cpp_causal_attention_forward(q, k, k, 0.3)
    with pytest.raises(RuntimeError, match="k and v must have one shape"):
        torch.ops.fastgpt.cpp_causal_attention_forward(q, k[:, :2], k, 0.3)


@needs_cpp
def test_the_fused_decoding_step_refuses_a_grouped_query_block():
    """csrc/decode.cpp runs GPT-2 blocks only: given a block with fewer key/value heads (caches of Hkv
    heads, a projection of (H + 2 Hkv) D outputs instead of 3 C) it stops with an error, whichever
    cache it is handed, instead of reading the block wrongly."""
    batch, heads, kv_heads, d, capacity = 2, 4, 2, 8, 16
    c = heads * d
    ones, zeros = torch.ones(c), torch.zeros(c)
    attn_weight = torch.randn((heads + 2 * kv_heads) * d, c)
    for cache_heads, error in ((kv_heads, "caches' shape"), (heads, "attn_weight has shape")):
        k_cache, v_cache = (torch.zeros(batch, cache_heads, capacity, d) for _ in range(2))
        with pytest.raises(RuntimeError, match=error):
            torch.ops.fastgpt.cpp_decode_block(torch.randn(batch, c), ones, zeros, attn_weight, None,
                                           torch.randn(c, c), None, ones, zeros, torch.randn(4 * c, c), None,
                                           torch.randn(c, 4 * c), None, k_cache, v_cache, 0, 1e-5)
