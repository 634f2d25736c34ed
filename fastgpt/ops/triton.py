"""The Triton backend: the kernels in kernels/ (installed as fastgpt.kernels) as torch ops.

For an op that lists "triton" among its kernels, `fastgpt.kernels.<op name>` holds two launchers,
`forward` and `backward`, with the signatures of the op's contract. `implementation` declares the
op's two kernel ops (`fastgpt::triton_<op>_forward`, `..._backward`) from the contract and registers
the launchers as their implementations, for CUDA tensors and, under Triton's interpreter, for CPU ones.
To torch.compile they are opaque operators. (`torch.library.triton_op` would let the compiler see
inside the kernels, but it does not work under Triton's interpreter, which is how machines without
a GPU test them.)

Triton itself is imported only when a kernel module first is, so that importing fastgpt, or asking
which backends are available, never fixes Triton's interpreter setting before a caller has chosen it.
"""

import functools
import importlib
import importlib.util

import torch

from fastgpt.kernels import interpreting
from fastgpt.ops.contract import NAMESPACE, kernel_implementation, kernel_name

NO_GPU = "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors through Triton's interpreter, for testing)"


def unavailable_reason(device=None):
    """None when the Triton kernels can run on `device` (on this machine at all when None), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if interpreting():
        if device is None or device.type == "cpu":
            return None
        return "TRITON_INTERPRET=1 is set: Triton's interpreter runs the kernels on CPU tensors only"
    if device is not None and device.type != "cuda":
        return f"the Triton kernels run on CUDA tensors, not {device.type} ones ({NO_GPU})"
    return _gpu_unavailable_reason()


@functools.lru_cache(maxsize=None)
def _gpu_unavailable_reason():
    if not torch.cuda.is_available():
        return NO_GPU
    try:
        from triton.runtime import driver
        driver.active.get_current_device()
    except Exception as error:  # Triton raises RuntimeError, or others from a broken driver install
        return f"Triton cannot use the GPU driver: {error}"
    return None


# The dtypes the kernels take; they accumulate in fp32.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def implementation(op, on_backend=None):
    """The function that runs `op` on the launchers of kernels/<op name>.py, or None without them."""
    if "triton" not in op.kernels:
        return None
    launchers = importlib.import_module(f"fastgpt.kernels.{op.name}")
    run = kernel_implementation(op, "triton")
    device_types = ("cpu",) if interpreting() else ("cuda",)
    for direction in ("forward", "backward"):
        torch.library.impl(f"{NAMESPACE}::{kernel_name('triton', op.name, direction)}", device_types,
                           func=getattr(launchers, direction))
    return run
