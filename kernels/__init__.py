"""Triton kernels of fastgpt, installed as the subpackage `fastgpt.kernels`.

One module per fused op, named after it: `attention.py` (causal flash attention) and
`layer_norm.py`. Each holds the math in its docstring, the kernels, and the launchers that
`fastgpt/ops/triton.py` wraps as PyTorch operators. Importing this package does not import Triton;
importing one of its modules does.
"""

import os


def interpreting():
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET set, read as Triton reads it).

    Triton decides this when a kernel is defined, so the variable must be set before the kernel
    modules are first imported.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def mend_interpreter():
    """Let Triton 3.6's interpreter take loop bounds computed from program ids under numpy >= 2.4.

    The interpreter holds every scalar as a one-element numpy array and turns it into a Python int
    with int(array), which numpy 2.4 refuses for arrays that are not 0-dimensional; `range(start,
    end, step)` over such bounds then fails. Later Triton versions take the element out first; this
    does the same for the older ones. It changes nothing on the GPU (the interpreter is not used there).
    """
    if not interpreting():
        return
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "mended", False):
        return

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_tensor_with_scalar_index.mended = True
    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
