"""What the op tests share: the backends that run here, and the comparison of a fused op with its
reference and with float64.

A fused result must be about as close to the float64 truth as the reference path in the same dtype
is: errors are relative to the largest magnitude in the float64 result (at least 1), so that
gradients summed over many rows (a LayerNorm's dweight) are judged on the same footing as outputs.
"""

import torch

from fastgpt.ops import dispatch
from fastgpt.ops.contract import NAMESPACE, kernel_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Error allowed against the float64 result, per dtype, where the reference path in the same dtype is
# closer than a third of it: a few roundings of a result near the largest (bf16 keeps 8 significant
# bits, rounding by up to 2e-3 of a value, fp16 11 bits, 2.4e-4). The fused kernels' largest errors on
# the contract's samples were about 6e-3, 8e-4 and 1.4e-6 relative to the largest float64 value.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 1e-2}


def runnable_kernel_backends():
    """The kernel backends that can run on DEVICE here (triton without a GPU: through its interpreter)."""
    return [name for name in dispatch.BACKENDS
            if name in ("cpp", "triton") and dispatch.unavailable_reason(name, DEVICE) is None]


def has_kernels(op, backend, dispatch_key):
    """Whether `backend` has registered implementations of both of `op`'s kernels for `dispatch_key`."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{kernel_name(backend, op.name, direction)}", dispatch_key)
        for direction in ("forward", "backward"))


def backend_dtypes(backend):
    """The dtypes a kernel backend's kernels take, as the backend declares them."""
    return dispatch.backend_module(backend).DTYPES


def relative_error(actual, exact):
    return (actual.double() - exact.double()).abs().max().item() / max(1.0, exact.abs().max().item())


def assert_close_to_float64(actual, reference_same_dtype, exact, dtype, what):
    if exact.numel() == 0:
        assert actual.numel() == 0, f"{what}: {actual.numel()} values where none were expected"
        return
    fused_error = relative_error(actual, exact)
    reference_error = relative_error(reference_same_dtype, exact)
    allowed = max(TOLERANCE[dtype], 3 * reference_error)
    assert fused_error <= allowed, (
        f"{what}: error {fused_error:.3g} vs float64 exceeds {allowed:.3g} "
        f"(the reference path in the same dtype is off by {reference_error:.3g})")


def leaves(arguments, cast=None):
    """The arguments with every floating tensor made a fresh leaf that requires grad; with `cast`,
    those tensors and any dtype argument (an output dtype) become `cast`."""
    def leaf(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().to(cast or a.dtype).requires_grad_(True)
        return cast if cast is not None and isinstance(a, torch.dtype) else a
    return [leaf(a) for a in arguments]


def compare_with_reference(fused, reference, arguments, what):
    """Run `fused` and `reference` on `arguments`, and `reference` again in float64, each followed by
    a backward of one random output gradient; the fused output and every input gradient must be
    finite, well formed and as close to float64 as the same-dtype reference is."""
    results = {}
    grad_out = None
    for name, run, cast in (("fused", fused, None), ("reference", reference, None),
                            ("float64", reference, torch.float64)):
        inputs = leaves(arguments, cast)
        out = run(*inputs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        if out.numel():
            out.backward(grad_out.to(out.dtype))
        results[name] = [out] + [leaf.grad for leaf in inputs if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    differentiable = [(i, a) for i, a in enumerate(arguments) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    # The output comes in the reference's dtype (x's, or the output dtype an argument names).
    expected = [("output", results["reference"][0].dtype)] + [(f"gradient of argument {i}", a.dtype) for i, a in differentiable]
    for position, (name, expected_dtype) in enumerate(expected):
        result, reference_result, exact = (results[key][position] for key in ("fused", "reference", "float64"))
        if exact is None:  # an empty input: no gradient flows
            continue
        assert result.shape == exact.shape and result.dtype == expected_dtype, (
            f"{what} {name}: {result.dtype}{tuple(result.shape)}, expected {expected_dtype}{tuple(exact.shape)}")
        assert torch.isfinite(result).all(), f"{what} {name} has non-finite values"
        assert_close_to_float64(result, reference_result, exact, expected_dtype, f"{what} {name}")
