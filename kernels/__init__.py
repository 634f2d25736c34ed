"""Triton kernels of fastgpt, installed as the subpackage `fastgpt.kernels`.

One module per fused op, named after it: `causal_attention.py` (causal flash attention) and
`layer_norm.py`. Each holds the math in its docstring, the kernels, and the two launchers `forward`
and `backward` (with the signatures of the op's contract) that `fastgpt/ops/triton.py` registers as
PyTorch operators. Importing this package does not import Triton;
importing one of its modules does.
"""

import os


def interpreting():
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET set, read as Triton reads it).

    Triton decides this when a kernel is defined, so the variable must be set before the kernel
    modules are first imported.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
