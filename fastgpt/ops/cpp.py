"""The C++ CPU backend: the kernels of csrc/ as torch ops, with their autograd and fake versions.

The extension is built once per instruction set (AVX-512, AVX2, baseline; see csrc/build_config.py)
and the build matching this CPU is imported on first use; importing it registers the ops
`torch.ops.fastgpt.*`. If that build is missing (a source checkout that was never compiled), it is
compiled just in time with torch.utils.cpp_extension (one line says so; torch caches the result).
If that fails too, `unavailable_reason` says why and `backend="auto"` runs the reference path.

Beneath each op: its fake (shape-only) version, which torch.compile traces with, and its autograd
formula, which calls the matching backward op.
"""

import importlib
import os
import runpy
import sys
import warnings

import torch

from fastgpt.ops.attention_autograd import register_attention_autograd
from fastgpt.ops.isa import isa_for_capability

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "csrc")


def import_or_build(isa, package="fastgpt", csrc=CSRC):
    """Load the extension for `isa`: import the compiled module, else compile it now.

    Returns None once the ops are registered, else the reason they could not be.
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
             sources=[os.path.join(csrc, name) for name in config["SOURCES"]],
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
    """Load the extension once per process and register the Python side of its ops.

    The result is cached in a module variable rather than with functools.cache, which torch.compile
    would trace through (with a warning) whenever a compiled model asks whether the backend is here.
    """
    global _load_result
    if _load_result is _NOT_LOADED:
        _load_result = import_or_build(isa_for_capability(torch.backends.cpu.get_cpu_capability()))
        if _load_result is None:
            _register_fake_and_autograd()
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


def causal_attention(q, k, v, scale):
    out, _ = torch.ops.fastgpt.causal_attention_forward(q, k, v, scale)
    return out


def layer_norm(x, weight, bias, eps):
    y, _, _ = torch.ops.fastgpt.layer_norm_forward(x, weight, bias, eps)
    return y


def gelu(x):
    return torch.ops.fastgpt.gelu_forward(x)


# csrc/decode.cpp runs in these dtypes; a bf16 model decodes op by op.
DECODE_BLOCK_DTYPES = (torch.float32, torch.float64)


def decode_block(x, parameters, k_cache, v_cache, position, eps):
    return torch.ops.fastgpt.decode_block(x, *parameters, k_cache, v_cache, position, eps)


def _statistics_dtype(dtype):
    """The kernels keep statistics (log-sum-exp, mean, rstd) in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake_and_autograd():
    # ---- causal attention ----
    @torch.library.register_fake("fastgpt::causal_attention_forward")
    def _(q, k, v, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_statistics_dtype(q.dtype))

    @torch.library.register_fake("fastgpt::causal_attention_backward")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    register_attention_autograd("fastgpt::causal_attention_forward", torch.ops.fastgpt.causal_attention_backward)

    # ---- LayerNorm ----
    @torch.library.register_fake("fastgpt::layer_norm_forward")
    def _(x, weight, bias, eps):
        stats_dtype = _statistics_dtype(x.dtype)
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=stats_dtype), \
            x.new_empty(x.shape[:-1], dtype=stats_dtype)

    @torch.library.register_fake("fastgpt::layer_norm_backward")
    def _(grad_y, x, weight, mean, rstd):
        acc_dtype = _statistics_dtype(x.dtype)
        n = x.shape[-1]
        return x.new_empty(x.shape), x.new_empty((n,), dtype=acc_dtype), x.new_empty((n,), dtype=acc_dtype)

    def layer_norm_setup_context(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.parameter_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, rstd)

    def layer_norm_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.fastgpt.layer_norm_backward(grad_y, x, weight, mean, rstd)
        # Each gradient in its input's dtype: fp32 parameters of a bf16 activation get fp32 gradients.
        weight_dtype, bias_dtype = ctx.parameter_dtypes
        return (dx,
                None if weight_dtype is None else dweight.to(weight_dtype),
                None if bias_dtype is None else dbias.to(bias_dtype),
                None)

    torch.library.register_autograd("fastgpt::layer_norm_forward", layer_norm_backward,
                                    setup_context=layer_norm_setup_context)

    # ---- GELU ----
    @torch.library.register_fake("fastgpt::gelu_forward")
    def _(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastgpt::gelu_backward")
    def _(grad_y, x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def gelu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def gelu_backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return torch.ops.fastgpt.gelu_backward(grad_y, x)

    torch.library.register_autograd("fastgpt::gelu_forward", gelu_backward, setup_context=gelu_setup_context)

    # ---- one block of one decoding step (inference only: it has no autograd formula, and as it
    # writes into the caches, torch.library would not take one) ----
    @torch.library.register_fake("fastgpt::decode_block")
    def _(x, *parameters_caches_position_eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
