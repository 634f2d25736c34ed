"""What the run computes in, and one start-up line saying what was chosen on which hardware and why.

bf16 is only fast where the hardware multiplies bf16 natively: on x86 CPUs the AVX512-BF16 or AMX
instructions, on Arm CPUs the BF16 extension, on NVIDIA GPUs compute capability 8.0 (Ampere) and
later. Elsewhere every bf16 operation is emulated through fp32 conversions: a training step of the
default model took 4.8 s in bf16 autocast against 0.27 s in fp32 on a 2-core AMD EPYC (Zen 3, AVX2).

`--dtype auto` takes bf16 autocast wherever the processor has native bf16, and fp32 elsewhere. On
a CPU with native bf16 (an Intel Xeon with AMX) this was measured side by side: bf16 trained the
default and modern runs in about two-thirds of fp32's time, to the same loss within what a change of
seed moves it (README, "Precision").
"""

import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastgpt.ops.isa import isa_for_capability

# The slowdown quoted in the warning: the default model's training step, bf16 autocast vs fp32,
# measured on a CPU without native bf16 (see above).
EMULATED_BF16_SLOWDOWN = 18


@dataclass(frozen=True)
class Precision:
    """The dtype a run computes in and why: `autocast(device)` gives the context to run steps in."""

    dtype: str      # "float32" or "bfloat16" (weights and optimizer state stay fp32 either way)
    reason: str     # why this dtype, for the start-up line
    warning: str | None = None  # one line to print at start-up when the choice will be slow
    native_bf16: bool = False  # whether the processor multiplies bf16 natively (told only where bf16 is chosen)

    @property
    def matmul_dtype(self):
        """The dtype the run's own matrix products (Muon's iteration) should be in: bf16 where the
        run's bf16 is native, fp32 where it is emulated (slow) or not asked for."""
        return torch.bfloat16 if self.dtype == "bfloat16" and self.native_bf16 else torch.float32

    def autocast(self, device):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (x86 `flags`, Arm `Features`) as a set; empty where they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_name(cpuinfo="/proc/cpuinfo"):
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def has_native_bf16(flags):
    """Whether a CPU with these flags multiplies bf16 natively (x86: AVX512-BF16 or AMX; Arm: BF16)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def gpu_has_native_bf16(device):
    """Compute capability 8.0 or later (torch.cuda.is_bf16_supported without emulation)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested, device, native_bf16=None):
    """The Precision for `--dtype requested` ("auto", "float32" or "bfloat16") on `device`.

    native_bf16 overrides the detection (for tests); by default it is read from the CPU's flags or
    the GPU's compute capability.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if native_bf16 is None:
        native_bf16 = gpu_has_native_bf16(device) if on_gpu else has_native_bf16(cpu_flags())
    processor = "GPU" if on_gpu else "CPU"
    if requested == "float32":
        return Precision("float32", "asked for with --dtype float32")
    if requested == "bfloat16":
        if native_bf16:
            return Precision("bfloat16", f"bf16 autocast, asked for with --dtype bfloat16; this {processor} "
                                         "has native bf16", native_bf16=True)
        cost = ("it has no compute capability 8.0 or later, so training is slower than in float32" if on_gpu else
                f"it has no AVX512-BF16, AMX or Arm BF16, so training is about {EMULATED_BF16_SLOWDOWN}x slower "
                "than in float32")
        return Precision("bfloat16", f"bf16 autocast, asked for with --dtype bfloat16, emulated on this {processor}",
                         warning=f"fastgpt: warning: --dtype bfloat16 is emulated on this {processor} ({cost}); "
                                 "use --dtype float32 (or auto, which picks it here)")
    if native_bf16:
        return Precision("bfloat16", f"auto: bf16 autocast, as this {processor} has native bf16", native_bf16=True)
    if on_gpu:
        return Precision("float32", "auto: this GPU has no native bf16")
    return Precision("float32", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated")


def describe_processor(device):
    """'AMD EPYC, AVX2, no native bf16, 2 threads' or 'NVIDIA H200 (compute capability 9.0)'."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    bf16 = "native bf16" if has_native_bf16(cpu_flags()) else "no native bf16"
    threads = torch.get_num_threads()
    return (f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {bf16}, "
            f"{threads} thread{'s' if threads != 1 else ''}")


def describe_kernels(backend):
    """The kernels' backend, and for the C++ one the instruction set of the build that runs."""
    if backend != "cpp":
        return backend
    return f"cpp ({isa_for_capability(torch.backends.cpu.get_cpu_capability())} build)"


def startup_line(device, precision, backend):
    """One line naming the processor, the kernels (and their C++ build), the dtype and why."""
    return (f"fastgpt: {describe_processor(device)}; kernels: {describe_kernels(backend)}; "
            f"dtype: {precision.dtype} ({precision.reason})")
