"""benchmarks/recipe.py, the check of the recipe's targets, rehearsed with tiny runs: it trains both,
scores them and writes its report (the targets themselves are measured at full size, not here)."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_script_runs_both_and_reports(tmp_path):
    tiny = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_RUN.items()]
    result = subprocess.run([sys.executable, "benchmarks/recipe.py", "--out", str(tmp_path), "--work",
                             str(tmp_path / "runs"), "--", *tiny, "--n-kv-head=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("recipe-*.json")
    report = json.loads(raw.read_text())
    assert set(report["runs"]) == {"no arguments", "--preset modern"}
    for run in report["runs"].values():
        assert run["steps"] == TINY_RUN["max_iters"] and run["wall_s"] > 0 and run["val_per_character"] > 0
    assert len(report["targets"]) == 4 and report["cpu_capability"]
    assert (tmp_path / "runs" / "modern" / "ckpt.pt").exists()
    assert list(tmp_path.glob("recipe-*.png")) and "MISSED" in next(tmp_path.glob("recipe-*.md")).read_text()
