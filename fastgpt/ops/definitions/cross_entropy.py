"""Cross-entropy of each row of logits against its target: the op, its contract, its reference and
PyTorch's own.

For a row x of V logits and its target class t:

    lse = log(sum_j exp(x_j))            (computed as m + log(sum_j exp(x_j - m)), m = max_j x_j)
    loss = lse - x_t
    d loss / d x_j = softmax(x)_j - [j = t] = exp(x_j - lse) - [j = t]

in fp32 whatever the logits' dtype (fp64 stays fp64); the forward kernel keeps each row's lse for
the backward. It returns the loss of every row (F.cross_entropy's reduction="none"); the model takes
their mean. Since lse is kept in fp32, the gradient's absolute error is about the spacing of fp32
numbers near lse: 4e-6 for logits in the tens, 3e-5 in the hundreds.

PyTorch computes this as log_softmax, which writes a whole (N, V) tensor of log-probabilities,
then picks one per row; its backward writes an (N, V) tensor of zeros with the picked gradients,
then runs log_softmax's backward over it; and a bf16 model's logits are first copied to fp32 for
it. The fused kernels read the logits once forward and once backward, writing only the gradient,
in the logits' dtype.
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import define_op, require_floating, statistics_dtype
from fastgpt.ops.dispatch import register, run


def cross_entropy(logits, targets, *, backend=None):
    """The loss of each row of logits (N, V) against targets (N,) (class indices in [0, V)):
    logsumexp(row) - row[target], in fp32 (fp64 for fp64 logits)."""
    check_inputs(logits, targets)
    return run(CROSS_ENTROPY, logits.device, backend)(logits, targets)


def check_inputs(logits, targets):
    """One clear error for arguments no backend takes."""
    require_floating("cross_entropy", logits=logits)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}; flatten the leading dimensions first")
    if targets.dtype != torch.int64:
        raise ValueError(f"cross_entropy's targets must be int64 class indices, got {targets.dtype}")
    if logits.shape[1] == 0 and logits.shape[0]:
        raise ValueError("cross_entropy: the logits have no classes (V = 0)")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: targets are on {targets.device} but logits are on {logits.device}")


def reference(logits, targets):
    """The formula step by step, in fp32 at least."""
    x = logits.to(statistics_dtype(logits.dtype))
    return torch.logsumexp(x, dim=-1) - x.gather(-1, targets[:, None]).squeeze(-1)


def builtin(logits, targets):
    """PyTorch's F.cross_entropy on the logits in fp32, the usual way to take a bf16 model's loss. No
    target is ignored (F.cross_entropy would skip -100): every backend takes class indices only."""
    return F.cross_entropy(logits.to(statistics_dtype(logits.dtype)), targets, reduction="none",
                           ignore_index=torch.iinfo(torch.int64).min)


# ---- the kernels' contract ----

def result(outputs):
    """What the public op returns of the forward kernel's outputs: the losses; the backward uses lse."""
    return outputs[0]


def fake_forward(logits, targets):
    rows = logits.new_empty(logits.shape[:1], dtype=statistics_dtype(logits.dtype))
    return rows, torch.empty_like(rows)


def fake_backward(grad_loss, logits, targets, lse):
    return logits.new_empty(logits.shape)


def setup_context(ctx, inputs, output):
    logits, targets = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.mark_non_differentiable(lse)


def backward(ctx, backward_kernel, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return backward_kernel(grad_loss, logits, targets, lse), None


def samples(device, dtype):
    """(logits, targets): one row and one class, widths below, around and past a vector and a block
    (1, 7, 48, 80, 512, 1000, 5000), targets at both ends of the row, a strided (transposed) view,
    and rows whose logits span a wide range (where exp overflows without the max taken out)."""
    def case(rows, width, scale=3.0):
        logits = torch.randn(rows, width, device=device, dtype=dtype) * scale
        targets = torch.randint(width, (rows,), device=device)
        targets[0], targets[-1] = 0, width - 1
        return logits, targets

    for rows, width in [(1, 1), (3, 7), (5, 48), (4, 80), (33, 512), (2, 1000), (3, 5000)]:
        yield case(rows, width)
    yield case(6, 100, scale=60.0)
    # 96 rows of 40 classes, each row's logits 96 elements apart in memory.
    yield torch.randn(40, 96, device=device, dtype=dtype).t() * 3, torch.randint(40, (96,), device=device)


CROSS_ENTROPY = register(define_op(
    __name__,
    # loss and lse: (N,), fp32 (fp64 for fp64 logits). grad_logits: (N, V) in the logits' dtype, contiguous.
    forward_schema="(Tensor logits, Tensor targets) -> (Tensor loss, Tensor lse)",
    backward_schema="(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse) -> Tensor grad_logits",
))
