"""`auto` on a GPU: the Triton kernel or torch's built-in, whichever was faster for this kind of input.

A fused kernel is not faster than PyTorch's own everywhere (SDPA's flash and cuDNN kernels, for
one, are very good), so on CUDA tensors `auto` measures instead of assuming. The first call of an op
for a shape class times both implementations on copies of its inputs, forward alone or forward and
backward when a gradient will be needed (CUDA events, a few rounds taken in turns, medians; see
fastgpt/timing.py), and remembers the faster for the rest of the process. Later calls of the class
only look the answer up.

A shape class is what decides which is faster: the op; each tensor argument's dtype and shape, its
last dimension exact (a head dim, a row width) and the others rounded up to powers of two, so that a
growing sequence is not measured at every length; the other arguments that are dtypes (an output
dtype); whether a gradient is needed; the autocast dtype; and fp32's matmul precision (TF32 or not).
An op with no Triton kernel (GELU) runs torch's built-in. `backend="triton"` (`--backend triton`)
still forces the kernels. Under torch.compile nothing is measured: a class measured before runs its
choice, any other the Triton kernel.

`Chooser(timer=...)` takes any timer with fastgpt.timing.alternating_medians' meaning, which is how
the tests exercise the choosing on machines without a GPU.
"""

import torch

from fastgpt import timing
from fastgpt.compile_constant import assume_constant_result
from fastgpt.kernels import dot_precision
from fastgpt.ops import dispatch

CANDIDATES = ("triton", "torch")
DEFAULT = "triton"  # what runs, unmeasured, under torch.compile


def measure_on_gpu(steps):
    """Median seconds of each step: CUDA events, a few rounds in turns after warming up (autotuning)."""
    return timing.alternating_medians(steps, rounds=5, clock=timing.CudaClock(), warmup=2)


def unavailable_reason(device=None):
    """A choice between the Triton kernels and torch's built-ins runs where the kernels can: on CUDA
    tensors (and, for testing, on CPU tensors while Triton's interpreter runs the kernels there)."""
    return dispatch.unavailable_reason("triton", device)


def next_power_of_two(n):
    return 1 << max(0, n - 1).bit_length()


def shape_class(op, arguments):
    """What decides which implementation of `op` is faster for these arguments (see the module docstring)."""
    tensors = [a for a in arguments if isinstance(a, torch.Tensor)]
    device_type = tensors[0].device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    return (op.name, _needs_grad(tensors), autocast, dot_precision(torch.float32),
            *(_argument_class(a) for a in arguments))


def _argument_class(argument):
    """A tensor's dtype and shape class; a dtype or None as it is; other values (a scale, an eps) not at all."""
    if isinstance(argument, torch.Tensor):
        return argument.dtype, *map(next_power_of_two, argument.shape[:-1]), argument.shape[-1]
    return argument if argument is None or isinstance(argument, torch.dtype) else ""


class Chooser:
    """Remembers, per shape class, which of CANDIDATES runs an op faster; measures the new classes."""

    def __init__(self, timer=measure_on_gpu):
        self.timer = timer
        self.choices = {}  # shape class -> backend name
        self.times = {}  # shape class -> {backend name: seconds}, for the classes that were measured

    def implementation(self, op, implementations):
        """The function that runs `op` on whichever of `implementations` ({backend name: function}) is
        faster for the shape class of its arguments."""
        def run(*arguments):
            return implementations[self._choose(shape_class(op, arguments), arguments, implementations)](*arguments)
        return run

    def _choose(self, key, arguments, implementations):
        if torch.compiler.is_compiling():
            return self._remembered_choice(key)
        name = self.choices.get(key)
        if name is None:
            times = self.timer({backend: _step(run, arguments) for backend, run in implementations.items()})
            self.times[key] = times
            name = self.choices[key] = min(implementations, key=times.get)
        return name

    @assume_constant_result
    def _remembered_choice(self, key):
        """Under torch.compile: the choice measured before for this class, else the Triton kernel (tracing
        has fake tensors, nothing to time). A constant to the compiler, which calls it while tracing; a
        method, because torch 2.11 gives a marked function only constants and tensors as arguments (a
        Chooser it refuses), while a marked method gets its object."""
        return self.choices.get(key, DEFAULT)

    def chosen(self):
        """What was chosen so far, one readable dict per shape class (for benchmark reports)."""
        return [dict(shape_class=[str(part) for part in key], backend=name,
                     **{f"{candidate}_ms": seconds * 1e3 for candidate, seconds in self.times.get(key, {}).items()})
                for key, name in self.choices.items()]


def _needs_grad(tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _step(run, arguments):
    """One call of `run` on fresh copies of the tensor arguments, with its backward when a gradient is needed."""
    tensors = [a for a in arguments if isinstance(a, torch.Tensor)]
    grad = _needs_grad(tensors)
    copies = [a.detach().clone().requires_grad_(grad and a.requires_grad) if isinstance(a, torch.Tensor) else a
              for a in arguments]
    if not grad:
        return lambda: run(*copies)
    differentiable = [a for a in copies if isinstance(a, torch.Tensor) and a.requires_grad]
    grad_out = {}

    def forward_backward():
        out = run(*copies)
        if "tensor" not in grad_out:  # drawn at the first (warm-up) call, in the output's dtype
            grad_out["tensor"] = torch.randn_like(out)
        torch.autograd.grad(out, differentiable, grad_out["tensor"])
    return forward_backward


# One chooser per process: the backend "fastest" of fastgpt.ops.dispatch.
CHOOSER = Chooser()


def implementation(op, on_backend):
    """`op` on the faster of its Triton kernels and torch's built-in, or None (torch's) without kernels."""
    if "triton" not in op.kernels:
        return None
    return CHOOSER.implementation(op, {name: on_backend(op, name) for name in CANDIDATES})
