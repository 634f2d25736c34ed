"""Causal scaled dot-product attention: the op, its contract, its reference and PyTorch's own.

    out = softmax(q k^T * scale + causal mask) v

for q of shape (B, H, Tq, D) and k, v of shape (B, Hkv, Tk, D), Tk >= Tq. The queries are the last Tq
positions of the key sequence (as when decoding with a key/value cache): query i sees keys
0 .. Tk - Tq + i. With Hkv < H (grouped-query attention; Hkv divides H), query head h attends with
key/value head h // (H / Hkv), the convention of Hugging Face's `repeat_kv`; the fused kernels read
the shared heads in place.

The fused kernels never build the Tq x Tk matrix of probabilities: the forward keeps only the
log-sum-exp of each query's scores (lse), from which the backward recomputes the probabilities.

Every backend's kernels return the output and the gradients of q, k and v as (B, H, T, D) views of
(B, T, H, D) memory (`empty_heads`): the layout in which a model's fused projection makes q, k and v
and reads the output back, so that turning them into (B, T, H * D) is a view rather than a copy.
"""

import math

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import define_op, require_floating, statistics_dtype
from fastgpt.ops.dispatch import register, run


def causal_attention(q, k, v, *, scale=None, backend=None):
    """Causal scaled dot-product attention (see the module docstring); differentiable in q, k and v.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with Tk >= Tq and Hkv dividing H, all of one dtype and
    device. `scale` defaults to 1/sqrt(D). Returns (B, H, Tq, D).
    """
    check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return run(CAUSAL_ATTENTION, q.device, backend)(q, k, v, float(scale))


def reference(q, k, v, scale):
    """Every step spelled out: each key/value head repeated for its group of query heads, scores, the
    causal mask aligned to the end of the keys, softmax, sum."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    query_position = torch.arange(t_k - t_q, t_k, device=q.device).unsqueeze(1)
    key_position = torch.arange(t_k, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(key_position > query_position, float("-inf"))
    # Softmax in fp32 for low-precision inputs, as every fused kernel accumulates in fp32.
    probabilities = torch.softmax(scores.to(statistics_dtype(q.dtype)), dim=-1).to(q.dtype)
    return probabilities @ v


def builtin(q, k, v, scale):
    """PyTorch's F.scaled_dot_product_attention."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    grouped = q.shape[1] != k.shape[1]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
    # SDPA's is_causal aligns the mask to the top-left corner; queries that are the tail of the
    # sequence need it aligned to the bottom-right, so spell the mask out.
    query_position = torch.arange(t_k - t_q, t_k, device=q.device).unsqueeze(1)
    visible = torch.arange(t_k, device=q.device).unsqueeze(0) <= query_position
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=grouped)


def check_inputs(q, k, v):
    require_floating("causal_attention", q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention expects 4-D (B, H, T, D) tensors, got q{tuple(q.shape)}, "
                         f"k{tuple(k.shape)}, v{tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[-1] == 0:
        raise ValueError(f"causal_attention needs at least one key/value head and one channel per head, got "
                         f"k{tuple(k.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"causal_attention: q{tuple(q.shape)}, k{tuple(k.shape)} and v{tuple(v.shape)} "
                         "must agree in B and D, k and v must have the same shape, and their heads must "
                         "divide q's")
    if k.shape[-2] < q.shape[-2]:
        raise ValueError(f"causal_attention: k and v need at least as many positions as q "
                         f"(got Tk={k.shape[-2]} < Tq={q.shape[-2]})")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("causal_attention: q, k and v must share one dtype and one device")


# ---- the kernels' contract ----

def result(outputs):
    """What the public op returns of the forward kernel's outputs: the first; the backward uses the rest."""
    return outputs[0]


def empty_heads(shape, like):
    """An uninitialised (B, H, T, D) tensor of `shape` in (B, T, H, D) memory, with `like`'s dtype and device."""
    batch, heads, length, head_dim = shape
    return like.new_empty((batch, length, heads, head_dim)).transpose(1, 2)


def fake_forward(q, k, v, scale):
    return empty_heads(q.shape, q), q.new_empty(q.shape[:3], dtype=statistics_dtype(q.dtype))


def fake_backward(grad_out, q, k, v, out, lse, scale):
    return tuple(empty_heads(x.shape, x) for x in (q, k, v))


def setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def backward(ctx, backward_kernel, grad_out, _grad_lse):
    """dq, dk, dv from the backward kernel, which recomputes the probabilities from lse."""
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_kernel(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def samples(device, dtype):
    """(q, k, v, scale) of awkward shapes: T=1, T not a multiple of any block, head dims 48 and 80,
    keys longer than the queries, keys spanning several blocks, the strided (B, T, 3, H, D) views
    a model's fused projection makes, grouped-query attention (one and two key/value heads), and a
    decoding step's one query over cached keys (grouped, head dim 80)."""
    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    for b, h, t_q, t_k, d in [(1, 1, 1, 1, 16), (2, 3, 37, 37, 48), (1, 2, 21, 21, 80), (1, 2, 5, 70, 32),
                              (1, 1, 300, 300, 16)]:
        yield tensor(b, h, t_q, d), tensor(b, h, t_k, d), tensor(b, h, t_k, d), d ** -0.5
    q, k, v = tensor(2, 33, 3, 3, 48).unbind(dim=2)
    yield q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.7
    yield tensor(1, 4, 19, 32), tensor(1, 1, 19, 32), tensor(1, 1, 19, 32), 32 ** -0.5
    yield tensor(2, 6, 7, 48), tensor(2, 2, 12, 48), tensor(2, 2, 12, 48), 48 ** -0.5
    yield tensor(1, 4, 1, 80), tensor(1, 2, 37, 80), tensor(1, 2, 37, 80), 80 ** -0.5


CAUSAL_ATTENTION = register(define_op(
    __name__,
    # lse: the log-sum-exp of each query's scores (in base 2 in the Triton kernels), (B, H, Tq), fp32 (fp64
    # for fp64 inputs); each backend's backward reads its own forward's.
    forward_schema="(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
    backward_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
                    "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
))
