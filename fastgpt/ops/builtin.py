"""The `torch` backend: PyTorch's own fused built-ins (F.scaled_dot_product_attention, F.layer_norm, F.gelu).

Not part of `auto`: it is here so that benchmarks can run the very same model on torch's built-ins
and compare it with fastgpt's kernels through the one dispatch point.
"""

import torch
import torch.nn.functional as F

from fastgpt.ops import reference


def unavailable_reason(device=None):
    return None


def causal_attention(q, k, v, scale):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # SDPA's is_causal aligns the mask to the top-left corner; queries that are the tail of the
    # sequence need it aligned to the bottom-right, so spell the mask out.
    query_position = torch.arange(t_k - t_q, t_k, device=q.device).unsqueeze(1)
    visible = torch.arange(t_k, device=q.device).unsqueeze(0) <= query_position
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def layer_norm(x, weight, bias, eps):
    if weight is not None and weight.dtype != x.dtype:
        # Under autocast F.layer_norm runs in fp32; outside it, match the contract: output in x's dtype.
        return F.layer_norm(x.float(), x.shape[-1:], weight.float(),
                            None if bias is None else bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


# The reference GELU already is PyTorch's built-in one.
gelu = reference.gelu
