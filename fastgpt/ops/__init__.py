"""The fused operations of the model, and the one place that decides which backend runs them.

The ops: causal attention, LayerNorm, and GELU (the tanh approximation GPT-2 uses). Backends that
implement all three:

- ``reference``: plain PyTorch (``fastgpt/ops/reference.py``), the ground truth;
- ``cpp``: the C++ CPU extension (``csrc/``), for CPU tensors;
- ``triton``: the Triton kernels (``kernels/``), for CUDA tensors, or for CPU tensors when
  ``TRITON_INTERPRET=1`` runs them through Triton's interpreter (how machines without a GPU test them);
- ``torch``: PyTorch's own fused built-ins, never chosen by ``auto``; the yardstick of benchmarks.

A fourth op, a whole block for one new token per sequence, speeds up decoding where a backend
offers it (see ``block_decoder``); the model otherwise runs the block op by op.

GELU is elementwise: on CPU the C++ kernel beats PyTorch's (whose tanh is slow); on a GPU,
PyTorch's own kernel already moves each element once, so the Triton backend uses it.

``backend=None`` or ``"auto"`` takes the process's default: the backend named by ``use_backend``
(how a training run or a sampler applies its ``--backend`` setting), else the environment variable
``FASTGPT_BACKEND``, else the fastest backend that can run on the tensors' device, falling back to
the reference. The backend is a run-time choice, never part of a model. An explicitly named backend
that cannot run raises :class:`BackendUnavailable`.
"""

import importlib
import math
import os

import torch

BACKENDS = ("reference", "cpp", "triton", "torch")

# Each backend lives in its own module, imported on first use so that `import fastgpt` stays cheap
# (and so that Triton is never imported before a test has had the chance to set TRITON_INTERPRET).
_MODULES = {
    "reference": "fastgpt.ops.reference",
    "cpp": "fastgpt.ops.cpp",
    "triton": "fastgpt.ops.triton",
    "torch": "fastgpt.ops.builtin",
    "fastest": "fastgpt.ops.choice",  # `auto` on CUDA: Triton or torch's built-in, measured per shape class
}

# Which backends `auto` tries on a device, fastest first; the reference always comes last.
_AUTO_ORDER = {"cuda": ("fastest",), "cpu": ("cpp",)}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


_loaded = {}


def _module(name):
    # A plain dict lookup after the first import: cheap on every call, and traceable by torch.compile.
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def available_backends():
    """Map each backend name to None when it can run on this machine, else a short reason why not."""
    return {name: _module(name).unavailable_reason(None) for name in BACKENDS}


# What `resolve_backend` decided for each (request, device type): the answer cannot change within a
# process (the C++ build is loaded once; Triton fixes its interpreter setting when first imported),
# and looking it up is what keeps the ops cheap enough for one-token decoding steps. For the same
# reason torch.compile may take the answer as a constant: it calls resolve_backend while tracing
# instead of tracing into it, whose first call imports and loads modules (which it cannot trace, and
# which used to make it give up on the whole model's forward in a fresh process).
_resolved = {}
_default_backend = None


def use_backend(name):
    """Make `name` the backend of every op call that names none (None or "auto": the automatic choice).

    Set it before compiling a model: torch.compile takes the resolved backend as a constant.
    """
    global _default_backend
    _default_backend = None if name in (None, "auto") else name


@torch._dynamo.assume_constant_result
def resolve_backend(backend, device):
    """The name of the backend that will run an op on `device`, given what the caller asked for."""
    requested = backend if backend not in (None, "auto") else (
        _default_backend or os.environ.get("FASTGPT_BACKEND", "auto"))
    name = _resolved.get((requested, device.type))
    if name is None:
        name = _resolved[(requested, device.type)] = _resolve(requested.strip().lower() or "auto", device)
        _module(name)  # imported now, so that the ops that follow only look it up
    return name


def _resolve(requested, device):
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if _module(name).unavailable_reason(device) is None:
                return name
        return "reference"
    if requested not in BACKENDS:
        choices = ", ".join(("auto",) + BACKENDS)
        raise BackendUnavailable(f"unknown backend {requested!r}: choose one of {choices}")
    reason = _module(requested).unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend {requested!r} cannot run on {device.type} tensors: {reason}")
    return requested


def causal_attention(q, k, v, *, scale=None, backend=None):
    """Causal scaled dot-product attention.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq, all of one dtype and device. Query i sees
    keys 0 .. Tk - Tq + i (with Tk == Tq: the usual causal mask). `scale` defaults to 1/sqrt(D).
    Returns (B, H, Tq, D), differentiable in q, k and v.
    """
    _check_attention_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device)
    return _module(name).causal_attention(q, k, v, float(scale))


def layer_norm(x, weight, bias, eps=1e-5, *, backend=None):
    """LayerNorm over the last dimension of x; weight and bias (shape (N,)) may be None."""
    _check_layer_norm_inputs(x, weight, bias)
    name = resolve_backend(backend, x.device)
    return _module(name).layer_norm(x, weight, bias, float(eps))


def gelu(x, *, backend=None):
    """GELU with GPT-2's tanh approximation: x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2."""
    name = resolve_backend(backend, x.device)
    return _module(name).gelu(x)


def block_decoder(x, backend=None):
    """The backend's fused op for one whole block of the model and one new token per sequence, or None.

    Decoding with a key/value cache does little arithmetic per token, and run as about twenty
    PyTorch operations per block, each one's fixed cost outweighs its work. So a backend may offer
    the block as one op, for inference only (no autograd, no dropout). The C++ backend does, for
    float32 and float64 CPU tensors (csrc/decode.cpp). It is called as

        op(x, parameters, k_cache, v_cache, position, eps) -> the block's output, (B, C)

    with x the new tokens' residual stream (B, C); parameters the block's tensors in the order
    ln_1 (weight, bias), attention projection (weight, bias), its output projection, ln_2, MLP
    expansion, MLP output projection, each bias possibly None; k_cache and v_cache the
    (B, H, capacity, D) buffers, whose row `position` the op fills with the tokens' keys and values
    before attending over rows 0 .. position. None means the caller runs the block op by op.
    """
    module = _module(resolve_backend(backend, x.device))
    return module.decode_block if x.dtype in getattr(module, "DECODE_BLOCK_DTYPES", ()) else None


def _check_attention_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention expects 4-D (B, H, T, D) tensors, got q{tuple(q.shape)}, "
                         f"k{tuple(k.shape)}, v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"causal_attention: q{tuple(q.shape)}, k{tuple(k.shape)} and v{tuple(v.shape)} "
                         "must agree in B, H and D, and k and v must have the same shape")
    if k.shape[-2] < q.shape[-2]:
        raise ValueError(f"causal_attention: k and v need at least as many positions as q "
                         f"(got Tk={k.shape[-2]} < Tq={q.shape[-2]})")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("causal_attention: q, k and v must share one dtype and one device")


def _check_layer_norm_inputs(x, weight, bias):
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} has shape {tuple(tensor.shape)}, expected ({x.shape[-1]},)")
        if tensor.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {tensor.device} but x is on {x.device}")
