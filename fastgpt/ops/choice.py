"""`auto` on a GPU: the Triton kernel or torch's built-in, whichever was faster for this kind of input.

A fused kernel is not faster than PyTorch's own everywhere (SDPA's flash and cuDNN kernels, for
one, are very good), so on CUDA tensors `auto` measures instead of assuming. The first call of an op
for a shape class times both implementations on copies of its inputs, forward alone or forward and
backward when a gradient will be needed (CUDA events, a few rounds taken in turns, medians; see
fastgpt/timing.py), and remembers the faster for the rest of the process. Later calls of the class
only look the answer up.

A shape class is what decides which is faster, with lengths rounded up to powers of two so that a
growing sequence (generation) is not measured at every length:
  attention:  dtype, head dim, Tq, Tk, batch x heads, gradient or not (and fp32's matmul precision);
  LayerNorm:  dtype, the parameters' dtype, row width, number of rows, gradient or not, autocast.
GELU is torch's on the GPU (see fastgpt/ops/triton.py). `backend="triton"` (or `--backend triton`)
still forces the kernels. Under torch.compile nothing is measured: a class measured before runs its
choice, any other the Triton kernel.

`Chooser(timer=...)` takes any timer with fastgpt.timing.alternating_medians' meaning, which is how
the tests exercise the choosing on machines without a GPU.
"""

import functools

import torch

from fastgpt import timing
from fastgpt.kernels import dot_precision, interpreting
from fastgpt.ops import reference

CANDIDATES = ("triton", "torch")
DEFAULT = "triton"  # what runs, unmeasured, under torch.compile


def measure_on_gpu(steps):
    """Median seconds of each step: CUDA events, a few rounds in turns after warming up (autotuning)."""
    return timing.alternating_medians(steps, rounds=5, clock=timing.CudaClock(), warmup=2)


def unavailable_reason(device=None):
    """The choice runs on CUDA tensors, where torch's built-ins always can (and, for testing, on CPU
    tensors while Triton's interpreter runs the kernels there)."""
    if device is None:
        return None if torch.cuda.is_available() else "no CUDA GPU"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"it chooses among GPU implementations, not for {device.type} tensors"


def next_power_of_two(n):
    return 1 << max(0, n - 1).bit_length()


def _backend(name):
    from fastgpt import ops

    return ops._module(name)


class Chooser:
    """Remembers, per shape class, which backend of CANDIDATES runs an op faster; measures the new ones."""

    def __init__(self, timer=measure_on_gpu, candidates=CANDIDATES):
        self.timer = timer
        self.candidates = candidates
        self.choices = {}  # shape class -> backend name
        self.times = {}  # shape class -> {backend name: seconds}, for the classes that were measured

    def _choose(self, shape_class, device, step_for):
        if torch.compiler.is_compiling():
            return _remembered_choice(self, shape_class)
        name = self.choices.get(shape_class)
        if name is not None:
            return name
        runnable = [c for c in self.candidates if _backend(c).unavailable_reason(device) is None]
        if len(runnable) == 1:
            name = runnable[0]
        else:
            times = self.timer({c: step_for(c) for c in runnable})
            self.times[shape_class] = times
            name = min(runnable, key=times.get)
        self.choices[shape_class] = name
        return name

    def causal_attention(self, q, k, v, scale):
        grad = _needs_grad(q, k, v)
        batch, n_heads, seq_len_q, head_dim = q.shape
        shape_class = ("attention", q.dtype, head_dim, next_power_of_two(seq_len_q),
                       next_power_of_two(k.shape[2]), next_power_of_two(batch * n_heads), grad,
                       dot_precision(q.dtype))
        name = self._choose(shape_class, q.device, lambda backend: _step(
            lambda *inputs: _backend(backend).causal_attention(*inputs, scale), (q, k, v), grad))
        return _backend(name).causal_attention(q, k, v, scale)

    def layer_norm(self, x, weight, bias, eps):
        grad = _needs_grad(x, weight, bias)
        autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type)
        shape_class = ("layer_norm", x.dtype, None if weight is None else weight.dtype, bias is None,
                       x.shape[-1], next_power_of_two(x.numel() // max(1, x.shape[-1])), grad, autocast)
        name = self._choose(shape_class, x.device, lambda backend: _step(
            functools.partial(_layer_norm, backend, eps=eps), (x, weight, bias), grad))
        return _layer_norm(name, x, weight, bias, eps)

    def chosen(self):
        """What was chosen so far, one readable dict per shape class (for benchmark reports)."""
        rows = []
        for shape_class, name in self.choices.items():
            times = self.times.get(shape_class, {})
            rows.append(dict(shape_class=[str(part) for part in shape_class], backend=name,
                             **{f"{candidate}_ms": seconds * 1e3 for candidate, seconds in times.items()}))
        return rows


@torch._dynamo.assume_constant_result
def _remembered_choice(chooser, shape_class):
    """Under torch.compile: the choice measured before for this class, else the Triton kernel (tracing
    has fake tensors, nothing to time). A constant to the compiler, which calls it while tracing."""
    return chooser.choices.get(shape_class, DEFAULT)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layer_norm(backend, x, weight, bias, eps):
    """LayerNorm on `backend`, its output in the dtype the Triton backend gives (the autocast dtype under
    autocast), so that the choice never changes what the caller receives."""
    out = _backend(backend).layer_norm(x, weight, bias, eps)
    out_dtype = _backend("triton").layer_norm_output_dtype(x)
    return out if out_dtype is None else out.to(out_dtype)


def _step(run, inputs, grad):
    """One call of `run` on fresh copies of `inputs` (None stays None), with its backward when `grad`."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(grad) for x in inputs]
    if not grad:
        return lambda: run(*leaves)
    differentiable = [x for x in leaves if x is not None]
    grad_out = {}

    def forward_backward():
        out = run(*leaves)
        if "tensor" not in grad_out:  # drawn at the first (warm-up) call, in the output's dtype
            grad_out["tensor"] = torch.randn_like(out)
        torch.autograd.grad(out, differentiable, grad_out["tensor"])
    return forward_backward


# The backend's interface (fastgpt.ops calls these), run by one chooser per process.
CHOOSER = Chooser()
causal_attention = CHOOSER.causal_attention
layer_norm = CHOOSER.layer_norm
gelu = reference.gelu  # torch's: on a GPU it is one pass over memory already
