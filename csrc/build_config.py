"""How the C++ extension is compiled, read by setup.py and by fastgpt/ops/cpp.py (just-in-time build).

The same sources are built once per instruction set, each into its own module, and fastgpt loads the
one that matches `torch.backends.cpu.get_cpu_capability()`. Nothing is built with -march=native: a
wheel built on one machine must run on another. The -D flags select at::vec's implementation (16
floats per vector with AVX-512, 8 with AVX2, a plain loop otherwise); without them at::vec falls back
to the plain version whatever -m flags say.
"""

import os
import platform

SOURCES = ["activations.cpp", "attention.cpp", "decode.cpp", "gelu.cpp", "layer_norm.cpp", "ops.cpp",
           "rms_norm.cpp", "rotary.cpp"]

ISA_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}

# -fopenmp on both the compile and the link line, else at::parallel_for runs on one thread.
COMPILE_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
LINK_FLAGS = ["-fopenmp"]


def module_name(isa):
    return f"_C_{isa}"


def buildable_isas():
    """The instruction sets to build: the x86 ones only on x86, and only those in FASTGPT_ISAS if set
    (e.g. FASTGPT_ISAS=avx512 while working on the kernels: a third of the build time)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isas = ["avx512", "avx2", "default"] if x86 else ["default"]
    wanted = os.environ.get("FASTGPT_ISAS")
    return [isa for isa in isas if isa in wanted.split(",")] if wanted else isas

