"""The one place that decides which backend runs a fused op.

Backends:

- ``reference``: each op's plain-PyTorch implementation, written for reading; the ground truth;
- ``cpp``: the C++ CPU kernels (``csrc/``), for CPU tensors;
- ``triton``: the Triton kernels (``kernels/``), for CUDA tensors, or for CPU tensors when
  ``TRITON_INTERPRET=1`` runs them through Triton's interpreter (how machines without a GPU test them);
- ``torch``: PyTorch's own built-ins; the yardstick of the benchmarks, and what ``auto`` runs on a
  GPU where the Triton kernels cannot (Triton missing, or unable to use the GPU).

``backend=None`` or ``"auto"`` takes the process's default: the backend named by `use_backend` (how a
training run or a sampler applies its ``--backend`` setting), else the environment variable
``FASTGPT_BACKEND``, else the fastest backend that can run on the tensors' device, falling back to
the reference. The backend is a run-time choice, never part of a model. A backend asked for by name
that cannot run raises `BackendUnavailable`.

An op runs on the chosen backend's kernels where the backend supplies them (the op's contract lists
which do, `FusedOp.kernels`), and as PyTorch's built-in otherwise: GELU on a GPU, say, where
PyTorch's own kernel already reads and writes each element once.

A kernel backend is a module with two functions: ``unavailable_reason(device)``, None when it can
run on `device` (on this machine at all when None), else why not; and ``implementation(op,
on_backend)``, the function that runs `op` on it (see `fastgpt.ops.contract.kernel_implementation`),
or None when it has no kernels for `op`. `on_backend(op, name)` gives another backend's function:
on CUDA tensors `auto` is the backend ``fastest`` (`fastgpt.ops.choice`), which measures the Triton
kernels against PyTorch's built-ins once per shape class and runs the faster.
"""

import importlib
import os

import torch

from fastgpt.compile_constant import assume_constant_result

BACKENDS = ("reference", "cpp", "triton", "torch")

# The kernel backends' modules, imported on first use so that `import fastgpt` stays cheap (and so
# that Triton is never imported before a test has had the chance to set TRITON_INTERPRET).
_KERNEL_BACKENDS = {"cpp": "fastgpt.ops.cpp", "triton": "fastgpt.ops.triton", "fastest": "fastgpt.ops.choice"}

# Which backends `auto` tries on a device, fastest first; the reference always comes last.
_AUTO_ORDER = {"cuda": ("fastest", "torch"), "cpu": ("cpp",)}

# Every op's contract, in the order the op modules registered them (fastgpt/ops/__init__.py imports them).
OPS = []


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


BACKEND_CHOICES = ", ".join(("auto",) + BACKENDS)  # what a backend may be named, as errors list it


def unknown_backend(name):
    return BackendUnavailable(f"unknown backend {name!r}: choose one of {BACKEND_CHOICES}")


def register(op):
    """Add an op's contract to the ops the dispatcher knows; returns it."""
    OPS.append(op)
    return op


_loaded = {}


def backend_module(name):
    """The module of a kernel backend (`cpp`, `triton` or `fastest`), imported on first use."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_KERNEL_BACKENDS[name])
    return module


def unavailable_reason(name, device=None):
    """None when backend `name` can run on `device` (on this machine at all when None), else why not."""
    if name not in _KERNEL_BACKENDS:
        return None  # the reference path and PyTorch's built-ins run wherever PyTorch runs
    return backend_module(name).unavailable_reason(device)


def available_backends():
    """Map each backend name to None when it can run on this machine, else a short reason why not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


_default_backend = None


def use_backend(name):
    """Make `name` the backend of every op call that names none (None or "auto": the automatic choice).

    Set it before compiling a model: torch.compile takes the resolved backend as a constant. An unknown
    name is refused here, where the mistake is; whether a known one can run is told at the first op.
    """
    global _default_backend
    name = name.strip().lower() if isinstance(name, str) else name
    if name not in (None, "auto", *BACKENDS):
        raise unknown_backend(name)
    _default_backend = None if name in (None, "auto") else name


# What `resolve_backend` decided for each (request, device type): the answer cannot change within a
# process (the C++ build is loaded once; Triton fixes its interpreter setting when first imported),
# and looking it up is what keeps the ops cheap enough for one-token decoding steps. For the same
# reason torch.compile may take the answer as a constant: it calls resolve_backend while tracing
# instead of tracing into it, whose first call imports and loads modules (which it cannot trace, and
# which would make it give up on the whole model's forward in a fresh process).
_resolved = {}


@assume_constant_result
def resolve_backend(backend, device):
    """The name of the backend that will run an op on `device`, given what the caller asked for
    (one of BACKENDS, or "fastest": `auto`'s measured choice on CUDA tensors)."""
    requested = backend if backend not in (None, "auto") else (
        _default_backend or os.environ.get("FASTGPT_BACKEND", "auto"))
    if not isinstance(requested, str):
        raise BackendUnavailable(f"a backend is named by a string, one of {BACKEND_CHOICES} (got {requested!r})")
    name = _resolved.get((requested, device.type))
    if name is None:
        name = _resolve(requested.strip().lower() or "auto", device)
        for op in OPS:  # made ready now, so that the ops that follow only look them up
            implementation(op, name)
        _resolved[(requested, device.type)] = name
    return name


def _resolve(requested, device):
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(name, device) is None:
                return name
        return "reference"
    if requested not in BACKENDS:
        raise unknown_backend(requested)
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {requested!r} cannot run on {device.type} tensors: {reason}")
    return requested


_implementations = {}


def implementation(op, backend):
    """The function that runs `op` on `backend` (a resolved name), taking the forward kernel's arguments."""
    key = (op.name, backend)
    function = _implementations.get(key)
    if function is None:
        function = _implementations[key] = _implementation(op, backend)
    return function


def _implementation(op, backend):
    if backend == "reference":
        return op.reference
    if backend == "torch":
        return op.builtin
    return backend_module(backend).implementation(op, implementation) or op.builtin


def run(op, device, backend=None):
    """The function that runs `op` for tensors on `device`, on the backend the caller asked for."""
    return implementation(op, resolve_backend(backend, device))
