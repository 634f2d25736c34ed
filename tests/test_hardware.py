"""The dtype choice, the warning for emulated bf16, and the start-up line."""

import pytest
import torch

from fastgpt import hardware
from fastgpt.hardware import (Precision, choose_precision, cpu_bf16, cpu_flags, cpu_name, cpu_vendor, startup_line,
                              this_cpu_bf16)
from fastgpt.ops.isa import isa_for_capability

ZEN3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse2 avx avx2 fma\n")
ZEN5 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B45\nflags\t\t: avx2 avx512f avx512_bf16\n"
SAPPHIRE_RAPIDS = "vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
# A Sapphire Rapids whose AMX the virtual machine hides, or a Cooper Lake.
XEON_WITHOUT_AMX = "vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, kind", [(ZEN3, "emulated"), (ZEN5, "native"), (SAPPHIRE_RAPIDS, "native"),
                                           (XEON_WITHOUT_AMX, "slow"), (GRAVITON3, "native"), ("", "emulated")],
                         ids=["avx2", "zen5", "amx", "xeon-without-amx", "arm-bf16", "unreadable"])
def test_bf16_is_read_from_the_cpu_flags_and_vendor(tmp_path, cpuinfo, kind):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_bf16(cpu_flags(str(path)), cpu_vendor(str(path))) == kind
    assert cpu_flags(str(tmp_path / "missing")) == set() and cpu_vendor(str(tmp_path / "missing")) == ""


def test_the_cpu_is_named_with_its_family_and_model_where_cpuinfo_gives_them(tmp_path):
    # "model name" must not be read as "model".
    (tmp_path / "zen3").write_text(ZEN3)
    assert cpu_name(str(tmp_path / "zen3")) == "AMD EPYC 7B13 (family 25, model 1)"
    (tmp_path / "zen5").write_text(ZEN5)
    assert cpu_name(str(tmp_path / "zen5")) == "AMD EPYC 9B45"


def test_where_bf16_runs_but_is_slower_auto_takes_fp32_and_bf16_warns():
    auto = choose_precision("auto", "cpu", bf16="slow")
    assert auto.dtype == "float32" and "AMX" in auto.reason and auto.warning is None
    asked = choose_precision("bfloat16", "cpu", bf16="slow")
    assert asked.dtype == "bfloat16" and asked.matmul_dtype == torch.float32
    assert asked.warning.startswith("fastgpt: warning: ") and "\n" not in asked.warning
    assert "slower than float32" in asked.warning and "--dtype float32" in asked.warning


def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line():
    precision = choose_precision("bfloat16", "cpu", bf16="emulated")
    assert precision.dtype == "bfloat16"  # the user's choice stands, with the warning
    warning = precision.warning
    assert warning.startswith("fastgpt: warning: ") and "\n" not in warning
    assert "about 18x slower" in warning and "--dtype float32" in warning
    assert "AVX512-BF16" in warning


def test_no_warning_where_bf16_is_native_or_not_asked_for():
    assert choose_precision("bfloat16", "cpu", bf16="native").warning is None
    for kind in ("native", "slow", "emulated"):
        assert choose_precision("float32", "cpu", bf16=kind).warning is None
        assert choose_precision("auto", "cpu", bf16=kind).warning is None


def test_auto_on_a_cpu_follows_native_bf16_and_says_why():
    without = choose_precision("auto", "cpu", bf16="emulated")
    with_native = choose_precision("auto", "cpu", bf16="native")
    assert (without.dtype, with_native.dtype) == ("float32", "bfloat16")
    assert "no native bf16" in without.reason
    assert "has native bf16" in with_native.reason


def test_auto_on_a_gpu_follows_native_bf16():
    assert choose_precision("auto", "cuda", bf16="native").dtype == "bfloat16"
    assert choose_precision("auto", "cuda", bf16="emulated").dtype == "float32"
    emulated = choose_precision("bfloat16", "cuda", bf16="emulated").warning
    assert "compute capability 8.0" in emulated and "18x" not in emulated


def test_this_machines_detection_decides_the_warning():
    warned = choose_precision("bfloat16", "cpu").warning is not None
    assert warned is (this_cpu_bf16() != "native")


def test_the_runs_own_matrix_products_are_bf16_only_where_bf16_is_native():
    assert choose_precision("auto", "cpu", bf16="native").matmul_dtype == torch.bfloat16
    assert choose_precision("bfloat16", "cuda", bf16="native").matmul_dtype == torch.bfloat16
    assert choose_precision("bfloat16", "cpu", bf16="emulated").matmul_dtype == torch.float32
    assert choose_precision("float32", "cpu", bf16="native").matmul_dtype == torch.float32
    assert choose_precision("auto", "cpu", bf16="emulated").matmul_dtype == torch.float32


def test_autocast_follows_the_dtype():
    with Precision("bfloat16", "test").autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Precision("float32", "test").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_startup_line_names_processor_build_threads_dtype_and_why(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_name", lambda: "AMD EPYC 7B13")
    precision = choose_precision("auto", "cpu", bf16="emulated")
    line = startup_line(torch.device("cpu"), precision, "cpp")
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith("fastgpt: AMD EPYC 7B13, ")
    assert f", {capability}, " in line
    assert f", {torch.get_num_threads()} thread" in line
    assert f"kernels: cpp ({isa_for_capability(capability)} build)" in line
    assert "dtype: float32 (auto: this CPU has no native bf16" in line
    assert "\n" not in line
    assert "kernels: reference;" in startup_line("cpu", precision, "reference")
