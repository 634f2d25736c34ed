"""Every op on every backend that claims its kernels, held to the op's contract.

For each registered op (`fastgpt.ops.OPS`) and each backend in its `kernels` that can run here: both
kernel ops are registered; on every sample input of the op's contract, in every dtype the backend
takes, the output and the input gradients agree with the reference path and with float64; and on
every sample, in fp32 (each backend's first dtype), `torch.library.opcheck` accepts both kernels
(schemas, fakes, autograd registration) and torch.compile gives the eager result. Every sample: the
fakes and the autograd formula must hold for each variant the samples cover (absent optional
arguments, grouped-query heads, batched and strided inputs).
"""

import dataclasses
import types

import pytest
import torch

from fastgpt import ops
from fastgpt.ops import contract, dispatch
from op_checks import DEVICE, backend_dtypes, compare_with_reference, has_kernels, leaves, runnable_kernel_backends

BACKENDS = runnable_kernel_backends()
OP_BACKENDS = [pytest.param(op, backend, id=f"{op.name}-{backend}")
               for op in ops.OPS for backend in op.kernels if backend in BACKENDS]
OP_BACKEND_DTYPES = [pytest.param(op, backend, dtype, id=f"{op.name}-{backend}-{str(dtype).split('.')[-1]}")
                     for op in ops.OPS for backend in op.kernels if backend in BACKENDS
                     for dtype in backend_dtypes(backend)]
DISPATCH_KEY = "CUDA" if DEVICE.type == "cuda" else "CPU"


def test_some_backend_with_kernels_runs_here():
    """Without one, every other test here would be skipped: that is a broken build, not a pass."""
    assert OP_BACKENDS, f"no kernel backend can run here: {ops.available_backends()}"


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_a_backend_that_claims_an_op_registers_both_kernels(op, backend):
    dispatch.resolve_backend(backend, DEVICE)  # loads the backend and supplies its ops
    assert has_kernels(op, backend, DISPATCH_KEY)


def test_a_claimed_op_without_kernels_is_caught():
    """The check above can fail: an op declared for the C++ backend that csrc/ never implements."""
    missing = dataclasses.replace(ops.OPS[0], name="op_without_kernels")
    contract.declare(missing, "cpp")
    assert not has_kernels(missing, "cpp", "CPU")


@pytest.mark.parametrize("op,backend,dtype", OP_BACKEND_DTYPES)
def test_outputs_and_gradients_match_the_reference_and_float64(op, backend, dtype):
    fused = dispatch.implementation(op, dispatch.resolve_backend(backend, DEVICE))
    for index, sample in enumerate(op.samples(DEVICE, dtype)):
        compare_with_reference(fused, op.reference, sample, f"{op.name} on {backend}, sample {index}")


def backward_kernel_arguments(op, backward_kernel, arguments, outputs):
    """The arguments the op's autograd formula passes to the backward kernel after this forward."""
    ctx = types.SimpleNamespace(mark_non_differentiable=lambda *tensors: None)
    ctx.save_for_backward = lambda *tensors: setattr(ctx, "saved_tensors", tensors)
    op.setup_context(ctx, arguments, outputs)
    several = isinstance(outputs, (tuple, list))
    grads = [torch.randn_like(outputs[0] if several else outputs)] + [None] * (len(outputs) - 1 if several else 0)
    recorded = []
    op.backward(ctx, lambda *kernel_arguments: recorded.append(kernel_arguments) or backward_kernel(*kernel_arguments),
                *grads)
    # The backward kernel has no gradient of its own: it is called outside autograd.
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in recorded[0])


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_opcheck_accepts_both_kernels(op, backend):
    dispatch.resolve_backend(backend, DEVICE)
    forward = getattr(torch.ops.fastgpt, contract.kernel_name(backend, op.name, "forward")).default
    backward = getattr(torch.ops.fastgpt, contract.kernel_name(backend, op.name, "backward")).default
    for sample in op.samples(DEVICE, backend_dtypes(backend)[0]):
        arguments = tuple(leaves(sample))
        torch.library.opcheck(forward, arguments)
        with torch.no_grad():
            outputs = forward(*arguments)
        torch.library.opcheck(backward, backward_kernel_arguments(op, backward, arguments, outputs))


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_torch_compile_gives_the_eager_result(op, backend):
    fused = dispatch.implementation(op, dispatch.resolve_backend(backend, DEVICE))
    for index, sample in enumerate(op.samples(DEVICE, torch.float32)):
        sample = leaves(sample)
        eager = fused(*sample)
        torch._dynamo.reset()  # every op's runner shares one code object: compile each afresh
        compiled = torch.compile(fused, backend="inductor", fullgraph=True)(*sample)
        torch.testing.assert_close(compiled, eager, msg=lambda m: f"sample {index}: {m}")
        grad = torch.randn_like(eager)
        tensors = [a for a in sample if isinstance(a, torch.Tensor) and a.requires_grad]
        for got, expected in zip(torch.autograd.grad(compiled, tensors, grad),
                                 torch.autograd.grad(eager, tensors, grad)):
            torch.testing.assert_close(got, expected, msg=lambda m: f"sample {index}: {m}")
