"""LayerNorm over the last dimension: the op, its contract, its reference and PyTorch's own.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

with the mean and the (biased) variance taken over the last dimension, in fp32 at least whatever
x's dtype; weight and bias, of shape (N,), may each be None. The forward kernel keeps each row's
mean and 1/sqrt(var + eps) (rstd) for the backward.

Under autocast, y comes in the autocast dtype: every consumer of a LayerNorm in the model is a
matrix product, which autocast runs in that dtype, so the kernel writes y in it directly instead of
writing fp32 for the product to cast again (half the bytes written, one pass over memory fewer,
the same result: the statistics stay fp32, and the gradient comes back in x's dtype).
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import define_op, require_floating, statistics_dtype
from fastgpt.ops.dispatch import register, run


def layer_norm(x, weight, bias, eps=1e-5, *, backend=None):
    """LayerNorm over the last dimension of x; weight and bias (shape (N,)) may be None."""
    check_inputs("layer_norm", x, weight, bias)
    return run(LAYER_NORM, x.device, backend)(x, weight, bias, float(eps), output_dtype(x))


def output_dtype(x):
    """The autocast dtype for an fp32 x under autocast, else None (x's dtype)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return None


def reference(x, weight, bias, eps, out_dtype=None):
    """The formula step by step, statistics in fp32 at least (fp64 stays fp64)."""
    compute_dtype = statistics_dtype(x.dtype)
    xc = x.to(compute_dtype)
    mean = xc.mean(dim=-1, keepdim=True)
    variance = ((xc - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm defines it
    y = (xc - mean) * torch.rsqrt(variance + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype or x.dtype)


def builtin(x, weight, bias, eps, out_dtype=None):
    """PyTorch's F.layer_norm, with the output in the contract's dtype."""
    if weight is not None and weight.dtype != x.dtype:
        # Under autocast F.layer_norm runs in fp32; outside it, fp32 parameters meeting a bf16 x need a cast.
        y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)
    else:
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y.to(out_dtype or x.dtype)


def check_inputs(op_name, x, weight, bias):
    """x and the affine parameters are floating point, which match x's last dimension and device
    (shared with rms_norm)."""
    require_floating(op_name, x=x, weight=weight, bias=bias)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.shape != x.shape[-1:]:
            raise ValueError(f"{op_name}: {name} has shape {tuple(tensor.shape)}, expected ({x.shape[-1]},)")
        if tensor.device != x.device:
            raise ValueError(f"{op_name}: {name} is on {tensor.device} but x is on {x.device}")


# ---- the kernels' contract ----

def result(outputs):
    """What the public op returns of the forward kernel's outputs: the first; the backward uses the rest."""
    return outputs[0]


def fake_forward(x, weight, bias, eps, out_dtype):
    rows = x.shape[:-1]
    stats = statistics_dtype(x.dtype)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(rows, dtype=stats), \
        x.new_empty(rows, dtype=stats)


def fake_backward(grad_y, x, weight, mean, rstd):
    n, stats = x.shape[-1], statistics_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((n,), dtype=stats), x.new_empty((n,), dtype=stats)


def setup_context(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.parameter_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def backward(ctx, backward_kernel, grad_y, _grad_mean, _grad_rstd):
    """dx in x's dtype (whatever grad_y's), and dweight and dbias in their parameters' dtypes (fp32
    parameters of a bf16 activation get fp32 gradients); the kernel returns the parameter gradients in
    the statistics' dtype."""
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward_kernel(grad_y, x, weight, mean, rstd)
    weight_dtype, bias_dtype = ctx.parameter_dtypes
    return (dx,
            None if weight_dtype is None else dweight.to(weight_dtype),
            None if bias_dtype is None else dbias.to(bias_dtype),
            None, None)


def samples(device, dtype):
    """(x, weight, bias, eps, out_dtype): rows shorter than a vector, of some vectors and a part, 768
    and 1000 wide; rows whose variance is below eps, which then weighs in the result; no parameters,
    a weight only, fp32 parameters beside a low-precision x, low-precision y of an fp32 x (as under
    autocast) and the other way round, rows that are strided, and a weight and bias that are strided
    (columns of a wider tensor)."""
    def tensor(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    for shape in [(1, 1), (3, 5), (7, 48), (3, 57), (4, 6, 80), (33, 768), (2, 1000)]:
        n = shape[-1]
        yield tensor(*shape) * 3 + 1, tensor(n), tensor(n), 1e-5, None
    yield tensor(6, 64) * 1e-3, tensor(64), tensor(64), 1e-5, None
    yield tensor(5, 40), tensor(40), None, 1e-5, None
    yield tensor(5, 40), None, None, 1e-6, None
    if dtype in (torch.bfloat16, torch.float16):
        yield tensor(9, 64), tensor(64, dtype=torch.float32), tensor(64, dtype=torch.float32), 1e-5, None
        yield tensor(4, 56), tensor(56, dtype=torch.float32), None, 1e-5, torch.float32
    if dtype == torch.float32:
        yield tensor(9, 70), tensor(70), tensor(70), 1e-5, torch.bfloat16
        yield tensor(3, 5, 48), tensor(48), None, 1e-5, torch.float16
    yield tensor(96, 40).t(), tensor(96), tensor(96), 1e-5, None
    yield tensor(5, 48), tensor(48, 2)[:, 0], tensor(48, 2)[:, 1], 1e-5, None


LAYER_NORM = register(define_op(
    __name__,
    # mean, rstd: the row statistics, x.shape[:-1], fp32 (fp64 for fp64 x). grad_weight and grad_bias
    # come back in that dtype whether or not weight and bias were given.
    # out_dtype: y's dtype (None: x's).
    forward_schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType? out_dtype) "
                   "-> (Tensor y, Tensor mean, Tensor rstd)",
    backward_schema="(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) "
                    "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
))
