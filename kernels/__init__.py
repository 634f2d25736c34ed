"""Triton kernels of fastgpt, installed as the subpackage `fastgpt.kernels`.

One module per fused op, named after it: `causal_attention.py` (causal flash attention, grouped
queries included), `layer_norm.py`, `rms_norm.py`, `rotary.py`, `swiglu.py`, `relu_squared.py` and
`cross_entropy.py`.
Each holds the math in its docstring, the kernels, and the two launchers `forward` and `backward`
(with the signatures of the op's contract) that `fastgpt/ops/triton.py` registers as PyTorch
operators. Importing this package does not import Triton; importing one of its modules does.
"""

import math
import os

import torch

from fastgpt.compile_constant import assume_constant_result


def unit_stride_rows(x):
    """x itself when each row of its last dimension is contiguous (any other strides), else a copy:
    the kernels load a row's elements as adjacent."""
    return x if x.stride(-1) == 1 else x.contiguous()


def adjacent_elements(parameter):
    """A norm's weight or bias (or None) with its elements adjacent, as the kernels load it: the
    tensor itself, or a copy of a strided view (say, one column of a wider parameter)."""
    return None if parameter is None else unit_stride_rows(parameter)


def as_rows(x):
    """x as a (rows, N) matrix whose rows are contiguous (a view when possible)."""
    # Not reshape(-1, N): a tensor of rows with no columns has no inferable row count.
    return unit_stride_rows(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))


@assume_constant_result  # read once while torch.compile traces, like torch's own matmuls
def dot_precision(dtype):
    """How the kernels' matrix products multiply inputs of `dtype`: "tf32" or "ieee" (exactly).

    fp32 follows PyTorch's own setting for fp32 matmuls: TF32 when it is allowed
    (`torch.set_float32_matmul_precision("high")` or "medium", `torch.backends.cuda.matmul.allow_tf32
    = True`, or `torch.backends.cuda.matmul.fp32_precision = "tf32"`), exact otherwise, the default.
    fp16 and bf16 products are exact either way.
    """
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; readable however it was set
    if precision is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if precision == "none":  # not set for matmuls: the global fp32 setting holds
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def autotuning():
    """Whether the kernels autotune their block sizes: on the GPU, unless FASTGPT_TRITON_AUTOTUNE=0.

    Without autotuning each kernel has one small config, as in the interpreter (which cannot time
    configs): the GPU tests set it, since tuning every new dtype and head dim would take minutes.
    Read when the kernel modules are first imported.
    """
    return not interpreting() and os.environ.get("FASTGPT_TRITON_AUTOTUNE", "1") != "0"


def autotune(configs, key, pruner):
    """`triton.autotune` as every kernel here uses it: over `configs`, retuned for each value of the
    arguments named in `key`, after `pruner` drops the configs that would not fit (each kernel's own).

    The timings are kept in Triton's cache on disk beside the compiled kernels (`cache_results`), so
    that a later process on the same machine, with the same Triton and kernel source, runs the chosen
    config at once instead of timing every config again.
    """
    import triton

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": pruner},
                           cache_results=True)


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
