"""RMSNorm over the last dimension: the op, its contract, its reference and PyTorch's own.

    y = x / sqrt(mean(x^2) + eps) * weight

with the mean of squares taken over the last dimension in fp32 at least whatever x's dtype; weight,
of shape (N,), may be None. The forward kernel keeps each row's 1/sqrt(mean(x^2) + eps) (rstd).
Under autocast, y comes in the autocast dtype, for the reason layer_norm's does (see there).
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import define_op, statistics_dtype
from fastgpt.ops.dispatch import register, run
from fastgpt.ops.definitions.layer_norm import check_inputs, output_dtype


def rms_norm(x, weight=None, eps=1e-6, *, backend=None):
    """RMSNorm over the last dimension of x; weight (shape (N,)) may be None."""
    check_inputs("rms_norm", x, weight, None)
    return run(RMS_NORM, x.device, backend)(x, weight, float(eps), output_dtype(x))


def reference(x, weight, eps, out_dtype=None):
    """The formula step by step, statistics in fp32 at least (fp64 stays fp64)."""
    compute_dtype = statistics_dtype(x.dtype)
    xc = x.to(compute_dtype)
    y = xc * torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype)
    return y.to(out_dtype or x.dtype)


def builtin(x, weight, eps, out_dtype=None):
    """PyTorch's F.rms_norm, with the output in the contract's dtype.

    F.rms_norm takes low-precision inputs as they are and keeps its statistics in fp32 itself (on a CPU, a
    bf16 x gives the bits of casting it to fp32 first; on a GPU, one kernel instead of four), so x is
    cast only to meet a weight of another dtype."""
    if weight is not None and weight.dtype != x.dtype:
        compute_dtype = statistics_dtype(x.dtype)
        y = F.rms_norm(x.to(compute_dtype), x.shape[-1:], weight.to(compute_dtype), eps)
    else:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)
    return y.to(out_dtype or x.dtype)


# ---- the kernels' contract ----

def result(outputs):
    """What the public op returns of the forward kernel's outputs: y; the backward uses rstd."""
    return outputs[0]


def fake_forward(x, weight, eps, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(x.shape[:-1], dtype=statistics_dtype(x.dtype))


def fake_backward(grad_y, x, weight, rstd):
    width = x.shape[-1] if weight is not None else 0
    return x.new_empty(x.shape), x.new_empty((width,), dtype=statistics_dtype(x.dtype))


def setup_context(ctx, inputs, output):
    x, weight, _eps, _out_dtype = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.mark_non_differentiable(rstd)


def backward(ctx, backward_kernel, grad_y, _grad_rstd):
    """dx, and dweight in the weight's dtype (the kernel returns it in the statistics' dtype)."""
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = backward_kernel(grad_y, x, weight, rstd)
    return dx, None if ctx.weight_dtype is None else dweight.to(ctx.weight_dtype), None, None


def samples(device, dtype):
    """(x, weight, eps, out_dtype): rows of widths 1, 7, 48, 80, 768 and 1000; rows whose mean square
    is below eps, which then weighs in the result; without a weight, fp32 weights beside a
    low-precision x, low-precision y of an fp32 x (as under autocast) and the other way round, and
    strided rows (a transposed matrix, and the model's queries as attention sees them), and a strided
    weight (a column of a wider tensor)."""
    def tensor(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    for shape in [(1, 1), (3, 7), (5, 48), (4, 3, 80), (33, 768), (2, 1000)]:
        yield tensor(*shape) * 3, tensor(shape[-1]), 1e-6, None
    yield tensor(6, 64) * 1e-3, tensor(64), 1e-5, None
    yield tensor(5, 40), None, 1e-5, None
    if dtype in (torch.bfloat16, torch.float16):
        yield tensor(9, 64), tensor(64, dtype=torch.float32), 1e-6, None
        yield tensor(4, 56), tensor(56, dtype=torch.float32), 1e-6, torch.float32
    if dtype == torch.float32:
        yield tensor(9, 70), tensor(70), 1e-6, torch.bfloat16
        yield tensor(3, 5, 48), None, 1e-6, torch.float16
    yield tensor(96, 40).t(), tensor(96), 1e-6, None
    yield tensor(5, 48), tensor(48, 2)[:, 0], 1e-6, None
    # The model's queries: the (B, H, T, D) view of their share of a (B, T, 3 * H * D) projection.
    yield tensor(2, 5, 3 * 4 * 16)[..., :64].view(2, 5, 4, 16).transpose(1, 2), None, 1e-6, None


RMS_NORM = register(define_op(
    __name__,
    # rstd: the row statistics, x.shape[:-1], fp32 (fp64 for fp64 x). grad_weight is in that dtype,
    # and empty when there is no weight.
    # out_dtype: y's dtype (None: x's).
    forward_schema="(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype=None) -> (Tensor y, Tensor rstd)",
    backward_schema="(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight)",
))
