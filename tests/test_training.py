"""The pieces of the training loop: learning-rate schedules and where metrics go."""

import math
from dataclasses import replace

import pytest

from fastgpt.config import TrainConfig
from fastgpt.lr_schedules import SCHEDULES, learning_rate_at
from fastgpt.sinks import LossPlot, MetricsFile, ProgressBar, read_metrics

CONFIG = replace(TrainConfig(), learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, decay_fraction=0.2)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_warms_up_linearly_then_starts_at_the_peak(schedule):
    config = replace(CONFIG, lr_schedule=schedule)
    assert [learning_rate_at(step, config) for step in range(10)] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert learning_rate_at(10, config) == 1.0


@pytest.mark.parametrize("schedule, halfway, end", [
    ("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0), ("wsd", 1.0, 0.1),
])
def test_each_schedule_decays_as_its_name_says(schedule, halfway, end):
    config = replace(CONFIG, lr_schedule=schedule)
    assert learning_rate_at(60, config) == pytest.approx(halfway)
    assert learning_rate_at(110, config) == pytest.approx(end)
    assert learning_rate_at(500, config) == pytest.approx(end)  # past max_iters (a resumed, extended run)


def test_cosine_is_warmup_then_half_a_cosine_wave_to_min_lr():
    for step in range(10, 111, 7):
        expected = 0.1 + 0.5 * (1 + math.cos(math.pi * (step - 10) / 100)) * 0.9
        assert learning_rate_at(step, CONFIG) == pytest.approx(expected, rel=1e-12)


def test_wsd_holds_the_peak_then_decays_over_its_last_fraction():
    config = replace(CONFIG, lr_schedule="wsd")
    assert all(learning_rate_at(step, config) == 1.0 for step in range(10, 91))
    assert learning_rate_at(100, config) == pytest.approx(0.55)


RECORDS = [{"step": 2, "lr": 1e-3, "tokens_per_sec": 10.0, "elapsed_s": 1.0, "train_loss": 3.0},
           {"step": 3, "lr": 1e-3, "tokens_per_sec": 10.0, "elapsed_s": 2.0, "train_loss": 2.5, "val_loss": 2.7},
           {"step": 4, "lr": 1e-3, "tokens_per_sec": 10.0, "elapsed_s": 3.0, "train_loss": 2.0}]


def test_the_metrics_file_holds_each_record_and_a_resumed_run_drops_the_later_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = MetricsFile(path)
    for record in RECORDS:
        sink.log(record)
    sink.close()
    assert read_metrics(path) == RECORDS
    resumed = MetricsFile(path, resumed_step=3)
    assert resumed.history == RECORDS[:2] == read_metrics(path)
    assert MetricsFile(path).history == [] and path.read_text() == ""


def test_the_loss_plot_is_drawn_when_a_validation_loss_arrives(tmp_path):
    path = tmp_path / "loss.png"
    sink = LossPlot(path, history=RECORDS[:1])
    sink.log(RECORDS[2])
    assert not path.exists()
    sink.log(RECORDS[1])
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_progress_bar_follows_the_records(capsys):
    sink = ProgressBar(total=10, initial=1)
    for record in RECORDS:
        sink.log(record)
    sink.close()
    err = capsys.readouterr().err
    assert "4/10" in err and "loss=2.000" in err
