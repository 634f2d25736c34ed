"""SwiGLU, the MLP activation of Llama's blocks: the op, its contract and its reference.

x = [a, b] holds the gate a and the up projection b side by side in its last dimension (..., 2N), as
one matrix product of the model computes them:

    s = sigmoid(a),   y = silu(a) b = a s b                        (..., N)
    da = dy b s (1 + a (1 - s)),   db = dy a s                      (..., 2N) together

PyTorch runs `F.silu(a) * b` as two passes over memory forward and, with the gradient of the split,
four backward; the C++ and Triton kernels are one each way and write the gradient of the one matrix
product's output directly. On a GPU `auto` measures the Triton kernel against PyTorch's and runs
the faster (fastgpt/ops/choice.py).
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import backward_from_input, contiguous_like, define_op, require_floating, save_input
from fastgpt.ops.dispatch import register, run


def swiglu(x, *, backend=None):
    """silu(a) * b for x = [a, b] split in halves along the last dimension (..., 2N) -> (..., N)."""
    require_floating("swiglu", x=x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu expects an even last dimension ([gate, up]), got {tuple(x.shape)}")
    return run(SWIGLU, x.device, backend)(x)


def reference(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


builtin = reference


# ---- the kernels' contract ----

def result(output):
    return output


def fake_forward(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def fake_backward(grad_y, x):
    return contiguous_like(x)


setup_context, backward = save_input, backward_from_input


def samples(device, dtype):
    """(x,): halves below, around and not a multiple of the vector width, empty tensors, a strided
    view, and gates far into both tails of the sigmoid."""
    for shape in [(2,), (0, 6), (3, 0), (3, 34), (2, 5, 200), (32, 2 * 344)]:
        yield (torch.randn(shape, device=device, dtype=dtype) * 3,)
    yield (torch.randn(40, 96, device=device, dtype=dtype).t(),)
    yield (torch.tensor([[-60.0, -5.0, 0.0, 5.0, 60.0, 1.0, -1.0, 2.0, 0.5, 3.0]], device=device, dtype=dtype),)


SWIGLU = register(define_op(
    __name__,
    # The output (..., N) and grad_x (..., 2N) are contiguous, in x's dtype.
    forward_schema="(Tensor x) -> Tensor",
    backward_schema="(Tensor grad_y, Tensor x) -> Tensor",
))
