"""benchmarks/profile_step.py, where a training step's time goes, on a tiny model: every phase and kind
it reports is found, the operations' times fit in the step's, the kinds are read right from the
profiler's names, a mistaken trainer flag is one line, a second run of one name keeps the first's
files, and on a GPU its kernels are counted apart from the host's time."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def profile_step(tmp_path, *flags):
    return subprocess.run([sys.executable, "benchmarks/profile_step.py", "--steps", "2", "--warmup", "1",
                           "--out", str(tmp_path), "--", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_reports_each_phase_and_kind_of_a_step(tmp_path):
    tiny = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_RUN.items()]
    result = profile_step(tmp_path, *tiny, "--optimizer=muon", "--position=rope")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("profile-*.json")
    report = json.loads(raw.read_text())
    phases_of = {}
    for row in report["kinds"]:
        phases_of.setdefault(row["kind"], set()).add(row["phase"])
    # Muon's orthogonalisation multiplies matrices in the optimizer phase.
    assert {"forward", "backward", "optimizer"} <= phases_of["matrix products"]
    assert {"forward", "backward"} <= phases_of["attention"] & phases_of["norms"] & phases_of["rotary positions"]
    assert {"forward", "backward"} <= phases_of["activations"] & phases_of["loss"]
    assert report["step_ms"] > 0 and 0 < report["products_gflops"] and report["reference_gflops"] > 0
    # The operations' own times do not add up to more than the step: nothing is counted twice.
    assert report["outside_ms"] >= -0.01 * report["step_ms"]
    assert "| matrix products |" in next(tmp_path.glob("profile-*.md")).read_text()


def test_a_mistaken_flag_is_one_line(tmp_path):
    result = profile_step(tmp_path, "--n-layr", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fastgpt: error: unknown setting '--n-layr'")
    assert not list(tmp_path.iterdir())


def load_profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    return profile_step


def test_a_second_run_of_the_same_name_keeps_the_first_runs_files(tmp_path):
    unused_prefix = load_profile_step().unused_prefix
    first = unused_prefix(tmp_path, "profile", "2026-12-03", "AVX2")
    assert first == tmp_path / "profile-2026-12-03-AVX2"
    (tmp_path / "profile-2026-12-03-AVX2-zen4.md").write_text("")  # another name that starts the same
    assert unused_prefix(tmp_path, "profile", "2026-12-03", "AVX2") == first
    Path(f"{first}.md").write_text("")
    second = unused_prefix(tmp_path, "profile", "2026-12-03", "AVX2")
    assert second == tmp_path / "profile-2026-12-03-AVX2-2"
    Path(f"{second}.png").write_text("")
    assert unused_prefix(tmp_path, "profile", "2026-12-03", "AVX2") == tmp_path / "profile-2026-12-03-AVX2-3"


def test_kinds_of_the_profilers_names():
    profile_step = load_profile_step()
    kinds = {"aten::addmm": "matrix products", "aten::baddbmm": "matrix products",
             "fastgpt::cpp_causal_attention_backward": "attention",
             "GeneratedBackwardFor_fastgpt_cpp_gelu_forward_default": "activations",
             "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::native_layer_norm": "norms",
             "fastgpt::cpp_rms_norm_forward": "norms", "aten::_fused_adamw_": "optimizer updates",
             # annotations around operations, not operations: their own time is bookkeeping
             "Optimizer.step#AdamW.step": profile_step.BOOKKEEPING,
             "autograd::engine::evaluate_function: AddmmBackward0": profile_step.BOOKKEEPING,
             "aten::cat": "copies and casts", "aten::scatter_add_": profile_step.OTHER}
    assert {name: profile_step.kind_of(name) for name in kinds} == kinds


def test_on_a_gpu_the_kernels_are_counted_apart_from_the_hosts_time():
    profile_step = load_profile_step()
    def event(name, device_type, cpu_us=0.0, gpu_us=0.0, annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, self_cpu_time_total=cpu_us, device_time_total=gpu_us,
                               is_user_annotation=annotation, cpu_parent=None)
    host = [event("aten::mm", DeviceType.CPU, cpu_us=300.0), event("cudaLaunchKernel", DeviceType.CPU, cpu_us=40.0),
            event("cudaStreamSynchronize", DeviceType.CPU, cpu_us=100.0)]
    kernels = [event("sm90_gemm", DeviceType.CUDA, gpu_us=50.0) for _ in range(4)]
    # The phases, as the profiler also draws them on the GPU's timeline: not kernels.
    labels = [event("forward", DeviceType.CUDA, gpu_us=900.0, annotation=True)]
    seconds, by_name = profile_step.breakdown([*host, *kernels, *labels], steps=2)
    assert by_name == {"aten::mm": pytest.approx(150e-6), "cudaLaunchKernel": pytest.approx(20e-6),
                       "cudaStreamSynchronize": pytest.approx(50e-6)}
    assert set(seconds) == {("matrix products", "between phases"), ("launching GPU kernels", "between phases"),
                            ("waiting for the GPU", "between phases")}
    work = profile_step.gpu_work([*host, *kernels, *labels], steps=2)
    assert work == {"gpu_kernels_per_step": 2.0, "gpu_busy_ms": pytest.approx(0.1)}
