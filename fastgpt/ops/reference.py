"""The reference path: the fused ops written in plain PyTorch, for reading and for testing.

Nothing here is fast on purpose. Every step of the math is spelled out (explicit scores, mask,
softmax; mean and variance), autograd derives the backward, and the other backends are tested
against these functions.
"""

import torch
import torch.nn.functional as F


def unavailable_reason(device=None):
    """The reference path runs wherever PyTorch runs."""
    return None


def causal_attention(q, k, v, scale):
    """softmax(q k^T * scale + causal mask) v for q of shape (B, H, Tq, D) and k, v of (B, H, Tk, D).

    With Tk >= Tq the queries are the last Tq positions of the key sequence (as when decoding with a
    key/value cache): query i may look at keys 0 .. Tk - Tq + i.
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    query_position = torch.arange(t_k - t_q, t_k, device=q.device).unsqueeze(1)
    key_position = torch.arange(t_k, device=q.device).unsqueeze(0)
    future = key_position > query_position
    scores = scores.masked_fill(future, float("-inf"))
    # Softmax in fp32 for low-precision inputs, as every fused kernel accumulates in fp32.
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    probabilities = torch.softmax(scores.to(compute_dtype), dim=-1).to(q.dtype)
    return probabilities @ v


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension.

    Statistics are taken in fp32 at least (fp64 stays fp64), as every fused kernel does.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute_dtype)
    mean = xc.mean(dim=-1, keepdim=True)
    variance = ((xc - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm defines it
    y = (xc - mean) * torch.rsqrt(variance + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def gelu(x):
    """x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2: GELU as GPT-2 approximates it.

    F.gelu computes exactly this formula (approximate="tanh"), and autograd knows its derivative.
    The reference uses it rather than the five separate tensor operations the formula spells,
    which would make the reference look slower than plain PyTorch is.
    """
    return F.gelu(x, approximate="tanh")
