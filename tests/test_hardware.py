"""The dtype choice, the warning for emulated bf16, and the start-up line."""

import pytest
import torch

from fastgpt import hardware
from fastgpt.hardware import Precision, choose_precision, cpu_flags, has_native_bf16, startup_line
from fastgpt.ops.isa import isa_for_capability

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(ZEN3, False), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), ("", False)],
                         ids=["avx2", "amx", "arm-bf16", "unreadable"])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert has_native_bf16(cpu_flags(str(path))) is native
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line():
    precision = choose_precision("bfloat16", "cpu", native_bf16=False)
    assert precision.dtype == "bfloat16"  # the user's choice stands, with the warning
    warning = precision.warning
    assert warning.startswith("fastgpt: warning: ") and "\n" not in warning
    assert "about 18x slower" in warning and "--dtype float32" in warning
    assert "AVX512-BF16" in warning


def test_no_warning_where_bf16_is_native_or_not_asked_for():
    assert choose_precision("bfloat16", "cpu", native_bf16=True).warning is None
    for native in (True, False):
        assert choose_precision("float32", "cpu", native_bf16=native).warning is None
        assert choose_precision("auto", "cpu", native_bf16=native).warning is None


def test_auto_on_a_cpu_follows_native_bf16_and_says_why():
    without = choose_precision("auto", "cpu", native_bf16=False)
    with_native = choose_precision("auto", "cpu", native_bf16=True)
    assert (without.dtype, with_native.dtype) == ("float32", "bfloat16")
    assert "no native bf16" in without.reason
    assert "has native bf16" in with_native.reason


def test_auto_on_a_gpu_follows_native_bf16():
    assert choose_precision("auto", "cuda", native_bf16=True).dtype == "bfloat16"
    assert choose_precision("auto", "cuda", native_bf16=False).dtype == "float32"
    emulated = choose_precision("bfloat16", "cuda", native_bf16=False).warning
    assert "compute capability 8.0" in emulated and "18x" not in emulated


def test_this_machines_detection_decides_the_warning():
    warned = choose_precision("bfloat16", "cpu").warning is not None
    assert warned is not has_native_bf16(cpu_flags())


def test_the_runs_own_matrix_products_are_bf16_only_where_bf16_is_native():
    assert choose_precision("auto", "cpu", native_bf16=True).matmul_dtype == torch.bfloat16
    assert choose_precision("bfloat16", "cuda", native_bf16=True).matmul_dtype == torch.bfloat16
    assert choose_precision("bfloat16", "cpu", native_bf16=False).matmul_dtype == torch.float32
    assert choose_precision("float32", "cpu", native_bf16=True).matmul_dtype == torch.float32
    assert choose_precision("auto", "cpu", native_bf16=False).matmul_dtype == torch.float32


def test_autocast_follows_the_dtype():
    with Precision("bfloat16", "test").autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Precision("float32", "test").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_startup_line_names_processor_build_threads_dtype_and_why(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_name", lambda: "AMD EPYC 7B13")
    precision = choose_precision("auto", "cpu", native_bf16=False)
    line = startup_line(torch.device("cpu"), precision, "cpp")
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith("fastgpt: AMD EPYC 7B13, ")
    assert f", {capability}, " in line
    assert f", {torch.get_num_threads()} thread" in line
    assert f"kernels: cpp ({isa_for_capability(capability)} build)" in line
    assert "dtype: float32 (auto: this CPU has no native bf16" in line
    assert "\n" not in line
    assert "kernels: reference;" in startup_line("cpu", precision, "reference")
