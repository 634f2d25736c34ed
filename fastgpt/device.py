"""Where a program runs: the device and the kernels (fastgpt.ops backend), and the settings every
command shares to choose them and the precision (which fastgpt/hardware.py picks)."""

import torch

from fastgpt import ops
from fastgpt.cpu_memory import reuse_freed_memory
from fastgpt.errors import FastGPTError
from fastgpt.settings import setting


def pick_device(name):
    """The torch.device named by a --device setting: auto (CUDA when present), cpu, cuda or cuda:N.
    On the CPU, freed memory is also kept for reuse from here on (fastgpt.cpu_memory says why)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else named_device(name)
    if device.type == "cpu":
        reuse_freed_memory()
    return device


def named_device(name):
    """The device a --device setting other than auto names, refused where this machine has none such."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastGPTError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastGPTError(f"--device {name} was asked for but this machine has no usable CUDA GPU; "
                           "use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FastGPTError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise FastGPTError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def use_backend(name, device):
    """Make the backend named by a --backend setting the one every op of this process runs on, and
    return the backend that will run on `device`. One that cannot run there is refused first
    (ops.BackendUnavailable, which says why), before anything else changes."""
    if name not in (None, "auto"):
        ops.resolve_backend(name, device)
    ops.use_backend(name)
    return ops.resolve_backend(None, device)


def device_setting(meaning="where to run: auto (CUDA when present), cpu, cuda, cuda:N"):
    return setting("auto", meaning)


def dtype_setting():
    return setting("auto", "auto: bf16 autocast where the GPU or CPU has native bf16, fp32 elsewhere (see "
                           "fastgpt/hardware.py)", ["auto", "float32", "bfloat16"])


def backend_setting():
    return setting("auto", "kernels for the fused ops (a run-time choice, not part of the model)",
                   ["auto", *ops.BACKENDS])
