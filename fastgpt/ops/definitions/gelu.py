"""GELU with GPT-2's tanh approximation: the op, its contract, its reference and PyTorch's own.

    gelu(x) = x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2

An elementwise op: on CPU the C++ kernel beats PyTorch's (whose tanh is slow); on a GPU, PyTorch's
own kernel already reads and writes each element once, which is all a Triton kernel could do, so
there is no Triton kernel and GPUs run PyTorch's.
"""

import torch
import torch.nn.functional as F

from fastgpt.ops.contract import backward_from_input, contiguous_like, define_op, require_floating, save_input
from fastgpt.ops.dispatch import register, run


def gelu(x, *, backend=None):
    """GELU with GPT-2's tanh approximation: x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2."""
    require_floating("gelu", x=x)
    return run(GELU, x.device, backend)(x)


def reference(x):
    """F.gelu computes exactly this formula (approximate="tanh"), and autograd knows its derivative.
    The reference uses it rather than the five tensor operations the formula spells, which would
    make the reference look slower than plain PyTorch is."""
    return F.gelu(x, approximate="tanh")


# PyTorch's built-in GELU is the reference.
builtin = reference


# ---- the kernels' contract ----

def fake_forward(x):
    return contiguous_like(x)


def fake_backward(grad_y, x):
    return contiguous_like(x)


def result(output):
    return output


setup_context, backward = save_input, backward_from_input


def samples(device, dtype):
    """(x,): lengths below, around and not a multiple of the vector width, an empty tensor, a strided
    view, and values far into both tails, where tanh saturates: each tail in a sample of its own, as
    the checks measure errors against a sample's largest value, and +-1e4, which overflow exp."""
    for shape in [(1,), (0, 5), (3, 17), (2, 5, 100), (64, 512)]:
        yield (torch.randn(shape, device=device, dtype=dtype) * 4,)
    yield (torch.randn(40, 96, device=device, dtype=dtype).t() * 3,)
    for values in ([-60.0, -20.0, -9.0, -6.0, -1e-7, 0.0, 1e-7, 6.0], [9.0, 20.0, 60.0], [-1e4, 1e4]):
        yield (torch.tensor(values, device=device, dtype=dtype),)


GELU = register(define_op(
    __name__,
    # The output and grad_x are contiguous, in x's dtype.
    forward_schema="(Tensor x) -> Tensor",
    backward_schema="(Tensor grad_y, Tensor x) -> Tensor",
    kernels=("cpp",),
))
