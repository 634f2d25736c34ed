"""How the C++ extension is compiled, read by setup.py and by fastgpt/ops/cpp.py (just-in-time build).

The same sources are built once per instruction set, each into its own module, and fastgpt loads the
one that matches `torch.backends.cpu.get_cpu_capability()`. Nothing is built with -march=native: a
wheel built on one machine must run on another. The -D flags select at::vec's implementation (16
floats per vector with AVX-512, 8 with AVX2, a plain loop otherwise); without them at::vec falls back
to the plain version whatever -m flags say.
"""

import glob
import os
import platform

ISA_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}

# -fopenmp on both the compile and the link line, else at::parallel_for runs on one thread.
# -g0 undoes the -g of Python's own compiler flags, which come first: debug information made each
# file compile 2.5 times slower and its object 23 times larger.
# --param inline-unit-growth: GCC stops inlining once inlining has grown a file by 40%, and the
# files of this build (UNITY_FILES below) outgrow that long before every kernel is compiled. The
# kernels compiled last then called vector helpers (ATen's exp_u20, fastgpt's tanh_via_exp and bf16
# stores) as functions, the first and last through the dynamic linker, once per vector instead of as
# a few instructions each: GELU ran 1.7 times slower. 200% lets every such helper be inlined (more
# changes nothing); clang ignores the flag.
COMPILE_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas", "--param", "inline-unit-growth=200"]
LINK_FLAGS = ["-fopenmp"]


# Translation units per build. Every source parses the same large PyTorch headers, about 10 s of CPU
# each, which was most of the build: the sources are compiled as this many files that #include them,
# side by side (ninja), so a build parses the headers twice instead of once per source.
UNITY_FILES = 2


def source_paths(csrc):
    """Every .cpp file in the folder `csrc`: each op's kernels, and module.cpp, the Python module."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")))


def unity_sources(csrc, directory, isa):
    """UNITY_FILES files in `directory` that together #include every source, for the build of `isa`
    (its own files, so that each build's objects stay up to date apart). A file is rewritten only
    when its text changes, so that an unchanged build is not recompiled."""
    os.makedirs(directory, exist_ok=True)
    sources, paths = source_paths(csrc), []
    for group in range(UNITY_FILES):
        text = "".join(f'#include "{os.path.abspath(path)}"\n' for path in sources[group::UNITY_FILES])
        path = os.path.join(directory, f"{isa}_{group}.cpp")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as handle:
                handle.write(text)
        paths.append(path)
    return paths


def module_name(isa):
    return f"_C_{isa}"


def buildable_isas():
    """Every instruction set this machine's architecture has a build for: the x86 ones only on x86."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["avx512", "avx2", "default"] if x86 else ["default"]


def isas_to_build(isa_at_hand):
    """The builds to compile at install: the baseline, which runs on any CPU of the architecture, and
    the build for this CPU (`isa_at_hand`, from fastgpt/ops/isa.py), which is the fast one here.

    A build a CPU needs that was not installed (an installation shared with another kind of CPU) is
    compiled just in time on first use. FASTGPT_ISAS chooses others instead: `all` (for a wheel to
    install elsewhere, or to test every build), `none`, or a comma-separated list, e.g.
    FASTGPT_ISAS=avx512 while working on the kernels.
    """
    buildable = buildable_isas()
    wanted = os.environ.get("FASTGPT_ISAS", "")
    if wanted == "all":
        return buildable
    if wanted:
        return [isa for isa in buildable if isa in wanted.split(",")]
    return [isa for isa in buildable if isa in (isa_at_hand, "default")]
