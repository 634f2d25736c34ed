"""What `pip install` compiles: the baseline build and the one for this CPU, without debug information,
with the functions on ATen's vectors inlined."""

import platform
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

import fastgpt

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture
def build_config(monkeypatch):
    monkeypatch.delenv("FASTGPT_ISAS", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    return runpy.run_path(str(CSRC / "build_config.py"))


@pytest.mark.parametrize("at_hand, built", [("avx512", ["avx512", "default"]), ("avx2", ["avx2", "default"]),
                                            ("default", ["default"])])
def test_install_builds_the_baseline_and_this_cpus_build(build_config, at_hand, built):
    assert build_config["isas_to_build"](at_hand) == built


def test_fastgpt_isas_chooses_other_builds(build_config, monkeypatch):
    monkeypatch.setenv("FASTGPT_ISAS", "all")
    assert build_config["isas_to_build"]("avx2") == ["avx512", "avx2", "default"]
    monkeypatch.setenv("FASTGPT_ISAS", "avx512")
    assert build_config["isas_to_build"]("avx2") == ["avx512"]


def test_other_architectures_build_only_the_baseline(build_config, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert build_config["isas_to_build"]("default") == ["default"]


def test_installed_builds_carry_no_debug_information():
    # -g0 in build_config.py: Python's own flags ask for -g, which made the build 2.5 times slower.
    builds = list(Path(fastgpt.__file__).parent.glob("_C_*.so"))
    assert builds, "no compiled build of the C++ extension next to fastgpt"
    for build in builds:
        assert b".debug_info" not in build.read_bytes(), f"{build.name} was compiled with debug information"


def test_installed_builds_inline_atens_vector_functions():
    # --param inline-unit-growth in build_config.py: without it GCC stopped inlining part-way through
    # the unity files, and kernels called at::vec functions (exp_u20, the bf16 stores) out of line,
    # through the dynamic linker, once per vector: GELU took 1.7 times as long.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed, so the builds' symbols cannot be listed")
    builds = list(Path(fastgpt.__file__).parent.glob("_C_*.so"))
    assert builds, "no compiled build of the C++ extension next to fastgpt"
    for build in builds:
        symbols = subprocess.run([nm, "-C", str(build)], capture_output=True, text=True, check=True).stdout
        # ATen's own (Vectorized<float>::exp_u20) and fastgpt's that take its vectors (tanh_via_exp).
        out_of_line = [line for line in symbols.splitlines() if "at::vec::" in line]
        assert not out_of_line, f"{build.name} has vector functions compiled out of line: {out_of_line[:3]}"


def test_each_build_compiles_every_source_once_through_its_unity_files(build_config, tmp_path):
    paths = build_config["unity_sources"](str(CSRC), str(tmp_path), "avx2")
    assert len(paths) == build_config["UNITY_FILES"]
    included = sorted(line for path in paths for line in Path(path).read_text().splitlines())
    assert included == sorted(f'#include "{source}"' for source in build_config["source_paths"](str(CSRC)))
    # Unchanged sources leave the files untouched, so that ninja does not recompile them.
    modified = [Path(path).stat().st_mtime_ns for path in paths]
    assert build_config["unity_sources"](str(CSRC), str(tmp_path), "avx2") == paths
    assert [Path(path).stat().st_mtime_ns for path in paths] == modified
