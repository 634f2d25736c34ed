"""ReLU squared, the MLP activation of modded-nanogpt's recipe: the op, its contract and its reference.

    y = relu(x)^2,   dy/dx = 2 relu(x)

PyTorch runs `F.relu(x).square()` as two passes over memory forward and three backward; the C++
and Triton kernels are one each way. On a GPU `auto` measures the Triton kernel against PyTorch's
and runs the faster (fastgpt/ops/choice.py).
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import backward_from_input, contiguous_like, define_op, require_floating, save_input
from fastgpt.ops.dispatch import register, run


def relu_squared(x, *, backend=None):
    """relu(x) squared, elementwise."""
    require_floating("relu_squared", x=x)
    return run(RELU_SQUARED, x.device, backend)(x)


def reference(x):
    return F.relu(x).square()


builtin = reference


# ---- the kernels' contract ----

def result(output):
    return output


def fake_forward(x):
    return contiguous_like(x)


def fake_backward(grad_y, x):
    return contiguous_like(x)


setup_context, backward = save_input, backward_from_input


def samples(device, dtype):
    """(x,): lengths below, around and not a multiple of the vector width, an empty tensor, a strided
    view, and exact zeros (where the derivative changes)."""
    for shape in [(1,), (0, 5), (3, 17), (2, 5, 100), (32, 512)]:
        yield (torch.randn(shape, device=device, dtype=dtype) * 3,)
    yield (torch.randn(40, 96, device=device, dtype=dtype).t(),)
    yield (torch.tensor([-2.0, -0.0, 0.0, 1e-3, 3.0], device=device, dtype=dtype),)


RELU_SQUARED = register(define_op(
    __name__,
    # The output and grad_x are contiguous, in x's dtype.
    forward_schema="(Tensor x) -> Tensor",
    backward_schema="(Tensor grad_y, Tensor x) -> Tensor",
))
