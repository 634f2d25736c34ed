"""benchmarks/profile_step.py, where a training step's time goes, on a tiny model: every phase and kind
it reports is found, and a mistaken trainer flag is one line."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert "| matrix products |" in next(tmp_path.glob("profile-*.md")).read_text()


def test_a_mistaken_flag_is_one_line(tmp_path):
    result = profile_step(tmp_path, "--n-layr", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fastgpt: error: unknown setting '--n-layr'")
    assert not list(tmp_path.iterdir())
