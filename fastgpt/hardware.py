"""What the run computes in, and one start-up line saying what was chosen on which hardware and why.

bf16 is only fast where the hardware multiplies bf16 natively and faster than fp32: on x86 CPUs AMX,
and AVX512-BF16 on AMD's cores (Zen 4 and 5); on Arm CPUs the BF16 extension; on NVIDIA GPUs compute
capability 8.0 (Ampere) and later. Without any of these every bf16 operation is emulated through fp32
conversions: a training step of the default model took 4.8 s in bf16 autocast against 0.27 s in fp32
on a 2-core AMD EPYC (Zen 3, AVX2). An Intel core with AVX512-BF16 but no AMX (Cooper Lake, or a
Sapphire Rapids whose AMX a virtual machine does not expose) multiplies bf16 at about fp32's rate and
pays for the conversions on top: there the default model's step took 1.3x as long in bf16 as in fp32,
and the modern preset's 1.4x (2-core Intel Xeon, torch 2.13.0, 2 threads).

`--dtype auto` takes bf16 autocast wherever bf16 is native in that sense, and fp32 elsewhere. On
CPUs with native bf16 this was measured side by side: bf16 trained the default and modern runs in
about two-thirds of fp32's time on an Intel Xeon with AMX, and a step of the default model was 1.45x
faster on an AMD Zen 5 (README, "Precision").
"""

import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastgpt.ops.isa import isa_for_capability

# The slowdown quoted in the warning: the default model's training step, bf16 autocast vs fp32,
# measured on a CPU without native bf16 (see above).
EMULATED_BF16_SLOWDOWN = 18
# What a CPU has where bf16 runs but trains slower than fp32 (see above).
SLOW_BF16 = "AVX512-BF16 on an Intel core without AMX"


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


def cpuinfo_value(keys, cpuinfo="/proc/cpuinfo"):
    """The first non-empty value of one of `keys` in /proc/cpuinfo (the first processor's), or ""."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in keys and value.strip():
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (x86 `flags`, Arm `Features`) as a set; empty where they cannot be read."""
    return set(cpuinfo_value(("flags", "Features"), cpuinfo).split())


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The processor's model name, with its x86 family and model numbers where /proc/cpuinfo gives them:
    a virtual machine may name only "AMD EPYC", and the numbers tell a Zen 3 (family 25, model 1) from a
    Zen 4 (family 25, model 17)."""
    name = cpuinfo_value(("model name",), cpuinfo) or platform.processor() or platform.machine() or "unknown CPU"
    family, model = cpuinfo_value(("cpu family",), cpuinfo), cpuinfo_value(("model",), cpuinfo)
    return f"{name} (family {family}, model {model})" if family and model else name


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """The x86 vendor string (GenuineIntel, AuthenticAMD), or "" where there is none to read."""
    return cpuinfo_value(("vendor_id",), cpuinfo)


def cpu_bf16(flags, vendor):
    """How a CPU with these flags (and x86 vendor) multiplies bf16 (see the module docstring):
    "native" (faster than fp32), "slow" (AVX512-BF16 on an Intel core without AMX) or "emulated"."""
    flags = set(flags)
    if {"amx_bf16", "bf16"} & flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD"):
        return "native"
    return "slow" if "avx512_bf16" in flags else "emulated"


def this_cpu_bf16():
    return cpu_bf16(cpu_flags(), cpu_vendor())


def gpu_has_native_bf16(device):
    """Compute capability 8.0 or later (torch.cuda.is_bf16_supported without emulation)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested, device, bf16=None):
    """The Precision for `--dtype requested` ("auto", "float32" or "bfloat16") on `device`.

    bf16 ("native", "slow" or "emulated", as `cpu_bf16` says) overrides the detection (for tests); by
    default it is read from the CPU's flags and vendor or the GPU's compute capability.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if bf16 is None:
        bf16 = ("native" if gpu_has_native_bf16(device) else "emulated") if on_gpu else this_cpu_bf16()
    processor = "GPU" if on_gpu else "CPU"
    if requested == "float32":
        return Precision("float32", "asked for with --dtype float32")
    if requested == "bfloat16":
        if bf16 == "native":
            return Precision("bfloat16", f"bf16 autocast, asked for with --dtype bfloat16; this {processor} "
                                         "has native bf16", native_bf16=True)
        if bf16 == "slow":
            return Precision("bfloat16", "bf16 autocast, asked for with --dtype bfloat16, slower than fp32 here",
                             warning=f"fastgpt: warning: --dtype bfloat16 is slower than float32 on this CPU "
                                     f"({SLOW_BF16}: a training step took 1.3-1.4x as long); use --dtype float32 "
                                     "(or auto, which picks it here)")
        cost = ("it has no compute capability 8.0 or later, so training is slower than in float32" if on_gpu else
                f"it has no AVX512-BF16, AMX or Arm BF16, so training is about {EMULATED_BF16_SLOWDOWN}x slower "
                "than in float32")
        return Precision("bfloat16", f"bf16 autocast, asked for with --dtype bfloat16, emulated on this {processor}",
                         warning=f"fastgpt: warning: --dtype bfloat16 is emulated on this {processor} ({cost}); "
                                 "use --dtype float32 (or auto, which picks it here)")
    if bf16 == "native":
        return Precision("bfloat16", f"auto: bf16 autocast, as this {processor} has native bf16", native_bf16=True)
    if on_gpu:
        return Precision("float32", "auto: this GPU has no native bf16")
    if bf16 == "slow":
        return Precision("float32", f"auto: this CPU has {SLOW_BF16}, where bf16 trains slower than fp32")
    return Precision("float32", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated")


def describe_processor(device):
    """'AMD EPYC, AVX2, no native bf16, 2 threads' or 'NVIDIA H200 (compute capability 9.0)'."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    bf16 = {"native": "native bf16", "slow": "bf16 slower than fp32", "emulated": "no native bf16"}[this_cpu_bf16()]
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
