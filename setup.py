"""Build and install fastgpt.

    pip install torch==2.13.0              # or any torch >= 2.4 you already have
    pip install --no-build-isolation -e .

`--no-build-isolation` lets the build see the torch you installed: an isolated build would download
another torch to compile against, and an extension built for one torch does not load in another.
"""

import os
import runpy
import sys

from setuptools import setup

try:
    import torch  # the extension is compiled against this torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("fastgpt: error: PyTorch must be installed before fastgpt is built: run "
             "`pip install torch` first, then `pip install --no-build-isolation -e .`")

HERE = os.path.dirname(os.path.abspath(__file__))
TRITON = "triton>=3.6,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'"


def cpp_extensions():
    """The C++ CPU extension: the sources in csrc/, built for the baseline instruction set and for this
    CPU's (csrc/build_config.py says which and how).

    fastgpt.ops.cpp loads the build matching the CPU it runs on. ninja (used by BuildExtension when it
    is installed) compiles each module's files in parallel.
    """
    config_path = os.path.join(HERE, "csrc", "build_config.py")
    if not os.path.exists(config_path):
        return []
    config = runpy.run_path(config_path)
    isa_at_hand = runpy.run_path(os.path.join(HERE, "fastgpt", "ops", "isa.py"))["isa_for_capability"](
        torch.backends.cpu.get_cpu_capability())
    def sources(isa):
        paths = config["unity_sources"](os.path.join(HERE, "csrc"), os.path.join(HERE, "build", "unity"), isa)
        return [os.path.relpath(path, HERE) for path in paths]

    return [CppExtension(
        name="fastgpt." + config["module_name"](isa),
        sources=sources(isa),
        extra_compile_args=config["COMPILE_FLAGS"] + config["ISA_FLAGS"][isa],
        extra_link_args=config["LINK_FLAGS"],
    ) for isa in config["isas_to_build"](isa_at_hand)]


setup(
    name="fastgpt",
    version="0.1.0",
    description="A readable GPT to train from scratch, with fused kernels (C++ for CPUs, Triton for NVIDIA GPUs)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib reads the TOML configs
    # The Triton kernels live in the top-level kernels/ folder of the repository but install as
    # fastgpt.kernels: an unrelated package on the index is called `kernels`.
    packages=["fastgpt", "fastgpt.hf", "fastgpt.ops", "fastgpt.ops.definitions", "fastgpt.kernels"],
    package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
    package_data={"fastgpt": ["data/*.txt", "presets/*.toml"]},
    ext_modules=cpp_extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tiktoken>=0.7",
        "regex",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        # torch.utils.cpp_extension compiles with it: the build of the C++ extension a CPU needs, on
        # first use where the install did not compile it (fastgpt.ops.cpp).
        "ninja",
    ],
    # Triton is not a requirement: PyTorch's CUDA builds bring the Triton they were built with (torch
    # 2.11: Triton 3.6), and a second requirement could only disagree with it; CPU machines need it
    # only to test the kernels through its interpreter. The range is what CI tests: 3.6 and 3.9.
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.40", TRITON, "tensorboard"],
                    "gpu": [TRITON]},
)
