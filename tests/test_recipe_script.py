"""benchmarks/recipe.py, the check of the recipe's targets, rehearsed with tiny runs (it trains both,
scores them and writes its report; the targets themselves are measured at full size, not here), and
its verdicts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_RUN
from fastgpt.hardware import choose_precision

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
    assert report["product_gflops_before"] > 0 and report["product_gflops_after"] > 0
    assert (tmp_path / "runs" / "modern" / "ckpt.pt").exists()
    markdown = next(tmp_path.glob("recipe-*.md")).read_text()
    assert list(tmp_path.glob("recipe-*.png")) and "MISSED" in markdown and "GFLOP/s before the runs" in markdown
    # The curves and the comparison table name the runs by their commands, not by their folders.
    table_rows = [line.split("  ")[0] for line in result.stdout.splitlines()]
    assert "no arguments" in table_rows and "--preset modern" in table_rows


def test_verdicts_compare_each_target_the_right_way():
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "benchmarks" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    default = {"val_per_character": 1.70, "wall_s": 100.0}
    modern = {"val_per_character": 1.46, "wall_s": 95.0}
    assert [met for _, met in recipe.verdicts(default, modern)] == [True, True, True, True]
    slow_and_high = {"val_per_character": 1.48, "wall_s": 101.0}
    assert [met for _, met in recipe.verdicts(default, slow_and_high)] == [False, False, True, True]
    long_and_high = {"val_per_character": 1.76, "wall_s": 301.0}
    assert [met for _, met in recipe.verdicts(long_and_high, modern)] == [True, True, False, False]
    assert abs(recipe.per_character(2.121) - 1.4702) < 1e-4  # the goal of 1.47 nats, in bits per byte
    assert recipe.run_dtype(["--dtype", "float32"]) == recipe.run_dtype(["--dtype=float32"]) == "float32"
    assert recipe.run_dtype(["--seed", "2"]) == choose_precision("auto", "cpu").dtype  # no --dtype: auto's choice


def test_a_mistaken_flag_is_one_line_before_any_run(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/recipe.py", "--out", str(tmp_path), "--", "--n-layr", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fastgpt: error: unknown setting '--n-layr'")
    assert not list(tmp_path.iterdir())
