"""Which build of the C++ extension a CPU runs, by instruction set (AVX-512, AVX2, or the baseline).

Free of imports, so that setup.py can read it (with runpy) before fastgpt is installed, to compile
the build for the CPU at hand.
"""


def isa_for_capability(capability):
    """Which build runs on a CPU, given torch.backends.cpu.get_cpu_capability()."""
    capability = capability.upper()
    if capability.startswith("AVX512"):
        return "avx512"
    if capability == "AVX2":
        return "avx2"
    return "default"
