"""The C++ CPU backend: the kernels of csrc/ as torch ops.

The extension is built once per instruction set (AVX-512, AVX2, baseline; see csrc/build_config.py)
and the build matching this CPU is imported on first use. Importing it registers the CPU
implementations of the kernel ops (the end of each source in csrc/); their schemas, fake versions and
autograd formulas come from each op's contract (`fastgpt.ops.contract.declare`). If that build is
missing (a source checkout that was never compiled), it is compiled just in time with
torch.utils.cpp_extension (one line says so; torch caches the result). If that fails too,
`unavailable_reason` says why and `backend="auto"` runs the reference path.
"""

import importlib
import os
import runpy
import sys
import warnings

import torch

from fastgpt.ops.contract import kernel_implementation
from fastgpt.ops.isa import isa_for_capability

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "csrc")


def import_or_build(isa, package="fastgpt", csrc=CSRC):
    """Load the extension for `isa`: import the compiled module, else compile it now.

    Returns None once the kernels are registered, else the reason they could not be.
    """
    try:
        importlib.import_module(f"{package}._C_{isa}")
        return None
    except ImportError:
        pass
    config_path = os.path.join(csrc, "build_config.py")
    if not os.path.exists(config_path):
        return f"could not build the C++ extension: its sources ({os.path.normpath(csrc)}) are not here"
    config = runpy.run_path(config_path)
    print(f"fastgpt: compiling the C++ extension ({isa}) on first use; torch caches it for later runs",
          file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load

        load(name=f"fastgpt_C_{isa}",
             sources=config["source_paths"](csrc),
             extra_cflags=config["COMPILE_FLAGS"] + config["ISA_FLAGS"][isa],
             extra_ldflags=config["LINK_FLAGS"],
             is_python_module=False)
    except Exception as error:  # a missing compiler, a failed compile or link: all mean "not here"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"could not build the C++ extension: {first_line}"
    return None


_NOT_LOADED = object()
_load_result = _NOT_LOADED


def _load():
    """Load the extension once per process.

    The result is cached in a module variable rather than with functools.cache, which torch.compile
    would trace through (with a warning) whenever a compiled model asks whether the backend is here.
    """
    global _load_result
    if _load_result is _NOT_LOADED:
        _load_result = import_or_build(isa_for_capability(torch.backends.cpu.get_cpu_capability()))
        if _load_result is None:
            _declare_decode_block()
        else:
            warnings.warn(f"fastgpt: the C++ backend is unavailable ({_load_result}); CPU tensors take the "
                          "reference path", RuntimeWarning, stacklevel=3)
    return _load_result


def unavailable_reason(device=None):
    """None when the extension is loaded and `device` is a CPU device (or not given), else why not."""
    reason = _load()
    if reason is not None:
        return reason
    if device is not None and torch.device(device).type != "cpu":
        return "the C++ extension only runs on CPU tensors"
    return None


# The dtypes the kernels take (fp64 for gradcheck); fp16 has no CPU kernels.
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def implementation(op, on_backend=None):
    """The function that runs `op` on the kernels the loaded extension registered, or None without them."""
    return kernel_implementation(op, "cpp") if "cpp" in op.kernels else None


# ---- one block of one decoding step (csrc/decode.cpp) ----

# The block csrc/decode.cpp computes, as a model describes its block (GPTConfig.block_description):
# GPT-2's. A model whose block differs in anything decodes op by op, as does a bf16 model.
DECODE_BLOCK = (("grouped_query", False), ("mlp", "gelu"), ("norm", "layernorm"), ("norm_eps", 1e-5),
                ("position", "learned"), ("qk_norm", False), ("rope_base", 10000.0))
DECODE_BLOCK_DTYPES = (torch.float32, torch.float64)

# One block of the model for one new token per sequence (x: (batch, channels)), inference only: writes
# the token's keys and values into row `position` of the (batch, heads, capacity, head_dim) caches and
# returns the block's output. eps is both LayerNorms' (GPT-2 gives them one value). It has no autograd
# formula: it writes into the caches, and torch.library takes none for such ops.
DECODE_BLOCK_SCHEMA = (
    "(Tensor x, Tensor ln_1_weight, Tensor? ln_1_bias, Tensor attn_weight, Tensor? attn_bias, "
    "Tensor attn_proj_weight, Tensor? attn_proj_bias, Tensor ln_2_weight, Tensor? ln_2_bias, "
    "Tensor fc_weight, Tensor? fc_bias, Tensor mlp_proj_weight, Tensor? mlp_proj_bias, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, int position, float eps) -> Tensor")


def _declare_decode_block():
    torch.library.define("fastgpt::cpp_decode_block", DECODE_BLOCK_SCHEMA)
    torch.library.register_fake("fastgpt::cpp_decode_block",
                                lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format))


def decode_block(x, parameters, k_cache, v_cache, position, eps):
    return torch.ops.fastgpt.cpp_decode_block(x, *parameters, k_cache, v_cache, position, eps)
