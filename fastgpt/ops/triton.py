"""The Triton backend: the kernels in kernels/ (installed as fastgpt.kernels) as PyTorch operators.

Each launch is a `torch.library.custom_op` with a fake (shape-only) implementation and an autograd
registration, so that autograd differentiates through the kernels and `torch.compile` traces through
them as opaque operators. (`torch.library.triton_op` would let the compiler see inside the kernels,
but it does not work under Triton's interpreter, which is how machines without a GPU test them.)

Triton itself is imported only when a kernel first runs, so that importing fastgpt, or asking which
backends are available, never fixes Triton's interpreter setting before a caller has chosen it.
"""

import functools
import importlib.util

import torch

from fastgpt.kernels import interpreting
from fastgpt.ops import reference
from fastgpt.ops.attention_autograd import register_attention_autograd

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


def _kernels(name):
    return importlib.import_module(f"fastgpt.kernels.{name}")


# ---------------------------------------------------------------------------------------------
# Causal attention
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastgpt::triton_attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels("attention").attention_forward(q, k, v, scale)


@_attention_forward.register_fake
def _(q, k, v, scale):
    batch, n_heads, seq_len_q, head_dim = q.shape
    # In the real op's layout: (B, H, T, D) views of (B, T, H, D) memory.
    out = _kernels("attention").empty_heads(batch, n_heads, seq_len_q, head_dim, q)
    return out, q.new_empty((batch, n_heads, seq_len_q), dtype=torch.float32)


@torch.library.custom_op("fastgpt::triton_attention_backward", mutates_args=())
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels("attention").attention_backward(grad_out, q, k, v, out, lse, scale)


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    empty_heads = _kernels("attention").empty_heads
    return tuple(empty_heads(*x.shape, x) for x in (q, k, v))


register_attention_autograd(_attention_forward, _attention_backward)


def causal_attention(q, k, v, scale):
    return _attention_forward(q, k, v, scale)[0]


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastgpt::triton_layer_norm_forward", mutates_args=())
def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, out_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels("layer_norm").layer_norm_forward(x, weight, bias, eps, out_dtype)


@_layer_norm_forward.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    n_rows = x.numel() // x.shape[-1]
    statistic = lambda: x.new_empty(n_rows, dtype=torch.float32)  # noqa: E731
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), statistic(), statistic()


# A custom op returns tensors, never None: a missing parameter's gradient comes back empty.
@torch.library.custom_op("fastgpt::triton_layer_norm_backward", mutates_args=())
def _layer_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _kernels("layer_norm").layer_norm_backward(grad_out, x, weight, bias, mean, rstd)
    empty = lambda: x.new_empty(0)  # noqa: E731
    return dx, dw if dw is not None else empty(), db if db is not None else empty()


@_layer_norm_backward.register_fake
def _(grad_out, x, weight, bias, mean, rstd):
    like = lambda p: p.new_empty(p.shape) if p is not None else x.new_empty(0)  # noqa: E731
    return x.new_empty(x.shape), like(weight), like(bias)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _layer_norm_grad(ctx, grad_out, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward(grad_out, x, weight, bias, mean, rstd)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None


_layer_norm_forward.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup_context)


def layer_norm(x, weight, bias, eps):
    return _layer_norm_forward(x, weight, bias, eps, layer_norm_output_dtype(x))[0]


def layer_norm_output_dtype(x):
    """Under autocast, the autocast dtype; else None (x's dtype).

    Every consumer of a LayerNorm in the model is a matrix product, which autocast runs in its
    dtype: the output it would cast to that dtype anyway is written in it directly, which halves the
    bytes the kernel writes and saves the cast's pass over memory, with the same result (statistics
    stay fp32, and the gradient comes back in x's dtype).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return None


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------

# PyTorch's CUDA GELU is already one elementwise pass that reads and writes each element once,
# which is all a Triton kernel could do: this backend uses it (the reference path's GELU).
gelu = reference.gelu
