"""The op contract: what every backend of a fused op agrees on, stated once per op.

A fused op is a forward kernel and a backward kernel joined by an autograd formula. Its contract,
a `FusedOp`, states:

- its name, and the schemas of its two kernels (their arguments and what they return);
- the shapes and dtypes the kernels return, as "fake" functions that torch.compile traces with;
- the autograd formula that links them, written once for every backend that supplies kernels;
- the reference implementation in plain PyTorch (the ground truth of the tests), and PyTorch's own
  built-in (the yardstick of the benchmarks, and what runs where a backend has no kernel);
- which backends supply kernels, and sample inputs on which the tests hold each one to the reference.

A backend supplies an op's kernels as two torch ops, `fastgpt::<backend>_<op>_forward` and
`fastgpt::<backend>_<op>_backward`: the C++ backend registers their CPU implementations in
`csrc/<op>.cpp`, the Triton backend registers the launchers of `kernels/<op>.py`. `declare` defines
those ops with the contract's schemas and registers their fake and autograd versions, the same way
for every backend.
"""

import sys
from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "fastgpt"


def require_floating(op_name, **tensors):
    """One clear error for a tensor argument (by name; None is left out) that is not floating point:
    with an integer tensor, some backends would refuse and others return truncated numbers."""
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be a floating-point tensor (float32, bfloat16, float16 or "
                             f"float64), got {tensor.dtype}; cast it first, e.g. with .float()")


def kernel_name(backend, op_name, direction):
    """The torch op name of a backend's kernel: kernel_name("cpp", "layer_norm", "forward") ->
    "cpp_layer_norm_forward" (called as torch.ops.fastgpt.cpp_layer_norm_forward)."""
    return f"{backend}_{op_name}_{direction}"


def statistics_dtype(dtype):
    """Kernels keep statistics and parameter gradients in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class FusedOp:
    """One fused op's contract (see the module docstring).

    The autograd formula is `setup_context(ctx, inputs, outputs)` and
    `backward(ctx, backward_kernel, *grad_outputs) -> one gradient per forward input`, where
    `backward_kernel` is the backend's backward op: the formula is the same for every backend.
    `result` picks what the public op returns from the forward kernel's outputs (the others, such as
    row statistics, are kept for the backward). `samples(device, dtype)` yields argument tuples of
    awkward shapes for the tests.
    """

    name: str
    forward_schema: str
    backward_schema: str
    fake_forward: Callable
    fake_backward: Callable
    setup_context: Callable
    backward: Callable
    result: Callable
    reference: Callable
    builtin: Callable
    samples: Callable
    kernels: tuple  # the backends with kernels for the op


# The parts of an elementwise op whose backward kernel takes (grad_y, x) and whose kernels return
# contiguous tensors (GELU, ReLU^2, SwiGLU): its definition module may take these as its own.

def save_input(ctx, inputs, output):
    """setup_context of an op whose backward needs only its input."""
    ctx.save_for_backward(inputs[0])


def backward_from_input(ctx, backward_kernel, grad_y):
    """backward of an op whose backward kernel takes (grad_y, x)."""
    (x,) = ctx.saved_tensors
    return backward_kernel(grad_y, x)


def contiguous_like(tensor):
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def define_op(module_name, forward_schema, backward_schema, kernels=("cpp", "triton")):
    """The contract of the op defined in the module `module_name` (`fastgpt.ops.definitions.<op>`),
    which names its parts by the fields of `FusedOp`: `fake_forward`, `fake_backward`,
    `setup_context`, `backward`, `result`, `reference`, `builtin` and `samples`."""
    module = sys.modules[module_name]
    parts = ("fake_forward", "fake_backward", "setup_context", "backward", "result", "reference", "builtin", "samples")
    return FusedOp(name=module_name.rsplit(".", 1)[-1], forward_schema=forward_schema, backward_schema=backward_schema,
                   kernels=kernels, **{part: getattr(module, part) for part in parts})


def declare(op, backend):
    """Define `backend`'s two kernel ops for `op` with the contract's schemas, and register their
    fake versions and the op's autograd formula. Returns the forward op, ready to call once the
    backend has registered its implementations."""
    forward_name = kernel_name(backend, op.name, "forward")
    backward_name = kernel_name(backend, op.name, "backward")
    torch.library.define(f"{NAMESPACE}::{forward_name}", op.forward_schema)
    torch.library.define(f"{NAMESPACE}::{backward_name}", op.backward_schema)
    torch.library.register_fake(f"{NAMESPACE}::{forward_name}", op.fake_forward)
    torch.library.register_fake(f"{NAMESPACE}::{backward_name}", op.fake_backward)
    backward_kernel = getattr(torch.ops.fastgpt, backward_name)

    def backward(ctx, *grad_outputs):
        return op.backward(ctx, backward_kernel, *grad_outputs)

    torch.library.register_autograd(f"{NAMESPACE}::{forward_name}", backward, setup_context=op.setup_context)
    return getattr(torch.ops.fastgpt, forward_name)


def kernel_implementation(op, backend):
    """The function that runs `op` on `backend`'s kernels (declared here), taking the forward kernel's
    arguments and returning what the public op returns."""
    forward = declare(op, backend)
    result = op.result
    return lambda *arguments: result(forward(*arguments))
