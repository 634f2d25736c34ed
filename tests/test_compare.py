"""python -m fastgpt.compare on two tiny runs, the plots with bits per byte, and the TensorBoard sink."""

import json
import sys

import matplotlib.image
import pytest

from fastgpt import compare, train
from fastgpt.compare import with_progress
from fastgpt.errors import FastGPTError
from fastgpt.plots import plot_losses
from fastgpt.run_files import read_metrics
from fastgpt.tensorboard_sink import TensorBoardSink

TINY = ["--n-layer", "1", "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--max-iters", "20",
        "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5", "--sample-tokens", "0",
        "--warmup-iters", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("runs")
    (directory / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 60)
    for name, width in (("narrow", "16"), ("wide", "32")):
        assert train.main(["--data", str(directory / "corpus.txt"), "--out-dir", str(directory / name),
                           "--n-embd", width, *TINY]) == 0
    return directory


def test_compare_prints_the_table_and_draws_three_panels(runs, capsys):
    narrow, wide, picture = runs / "narrow", runs / "wide", runs / "compare.png"
    assert compare.main([str(narrow), str(wide), "--to", str(picture)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split("  ")[0] == "run" and "val loss final / best" in lines[0]
    for run, line in ((narrow, lines[1]), (wide, lines[2])):
        validation = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
        assert line.startswith(str(run))
        assert f"{validation[-1]:.4f} / {min(validation):.4f}" in line
        assert " 20 " in line and " 1,280 " in line  # steps, and tokens: 20 x 4 sequences x 16 tokens
    section = out.split("settings that differ:\n")[1].split("\n\n")[0].splitlines()
    assert section[0].split() == ["setting", str(narrow), str(wide)]
    assert [row.split() for row in section[1:]] == [["n_embd", "16", "32"]]
    assert lines[-1] == f"curves: {picture}"
    height, width, _ = matplotlib.image.imread(picture).shape
    assert 1.2 * height < width < 2.5 * height  # three panels side by side, loss above bits per byte
    for run, line in ((narrow, lines[1]), (wide, lines[2])):
        bits = [r["val_bpb"] for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
        assert f"{bits[-1]:.4f} / {min(bits):.4f}" in line


def test_compare_ignores_a_metrics_line_being_written(runs, capsys):
    with open(runs / "wide" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 25, "train_lo')
    try:
        assert compare.main([str(runs / "narrow"), str(runs / "wide"), "--to", str(runs / "c.png")]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [row[1] for row in rows if row and row[0] == str(runs / "wide")] == ["20"]
    finally:
        text = (runs / "wide" / "metrics.jsonl").read_text()
        (runs / "wide" / "metrics.jsonl").write_text(text[:text.rindex("\n") + 1])


def test_compare_refuses_what_is_not_a_run(runs, tmp_path, capsys):
    assert compare.main([str(runs / "narrow"), str(tmp_path), "--to", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.startswith(f"fastgpt: error: no metrics at {tmp_path / 'metrics.jsonl'}")
    assert compare.main([str(runs / "narrow"), str(runs / "narrow")]) == 2
    assert "named twice" in capsys.readouterr().err
    assert compare.main([str(runs / "narrow"), str(runs / "narrow") + "/"]) == 2  # one folder, written two ways
    assert "named twice" in capsys.readouterr().err
    assert compare.main([]) == 2
    assert "RUN" in capsys.readouterr().err


def test_compare_draws_only_into_a_png_it_can_write(runs, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"precious")
    assert compare.main([str(runs / "narrow"), "--to", str(checkpoint)]) == 2
    assert "not a .png file" in capsys.readouterr().err
    assert checkpoint.read_bytes() == b"precious"
    for to in (tmp_path / "no-such-folder" / "c.png", tmp_path / "folder.png"):
        (tmp_path / "folder.png").mkdir(exist_ok=True)
        assert compare.main([str(runs / "narrow"), "--to", str(to)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"fastgpt: error: cannot write the curves to {to}") and "Traceback" not in error


def test_progress_adds_tokens_and_time_across_resumes():
    config = {"batch_size": 2, "block_size": 8, "grad_accum_steps": 3}
    records = [{"step": 10, "elapsed_s": 5.0}, {"step": 20, "elapsed_s": 9.0},  # stopped here, resumed:
               {"step": 30, "elapsed_s": 4.0}, {"step": 40, "elapsed_s": 8.0, "tokens": 7}]
    completed = with_progress(records, config)
    assert [r["seconds"] for r in completed] == [5.0, 9.0, 13.0, 17.0]
    assert [r["tokens"] for r in completed] == [480, 960, 1440, 7]  # a record's own count wins


def test_bits_per_byte_get_their_own_row_of_panels(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.9)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"batch_size": 4, "block_size": 16, "grad_accum_steps": 1,
                                                     "tokenizer": "char" if name == "a" else "bpe"}))
        records = [{"step": s, "train_loss": 3 * scale / s, "val_loss": 3.1 * scale / s, "val_bpb": 4.4 * scale / s,
                    "tokens_per_sec": 1000.0, "elapsed_s": s / 10} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--to", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "1.4667 / 1.4667" in out and "1.3200 / 1.3200" in out  # final / best val bpb
    assert ["tokenizer", "'char'", "'bpe'"] in [line.split() for line in out.splitlines()]
    height, width, _ = matplotlib.image.imread(tmp_path / "c.png").shape
    assert width < 2 * height  # two rows: loss, then bits per byte


def test_the_loss_plot_adds_a_bits_per_byte_panel(tmp_path):
    plain = [{"step": s, "train_loss": 3.0 / s} for s in (1, 2, 3)] + [{"step": 4, "train_loss": 0.7, "val_loss": 0.8}]
    plot_losses(plain, tmp_path / "plain.png")
    with_bpb = plain[:3] + [{**plain[3], "val_bpb": 1.2, "train_bpb": 1.1}]
    plot_losses(with_bpb, tmp_path / "bpb.png")
    plain_height = matplotlib.image.imread(tmp_path / "plain.png").shape[0]
    assert matplotlib.image.imread(tmp_path / "bpb.png").shape[0] > 1.4 * plain_height


# ---- TensorBoard (optional)


def test_tensorboard_sink_writes_the_records_as_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    sink.log({"step": 10, "train_loss": 2.5, "lr": 1e-3, "note": "text is left out", "skipped": True})
    sink.log({"step": 20, "train_loss": 2.0, "val_loss": 2.2, "val_bpb": 3.1})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "train_loss", "val_bpb", "val_loss"]
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(10, 2.5), (20, 2.0)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("val_bpb")] == [(20, 3.1)]

    # Resumed from a checkpoint at step 10: the step-20 event an earlier run logged after it is hidden,
    # the checkpoint's own step kept.
    resumed = TensorBoardSink(tmp_path, resumed_step=10)
    resumed.log({"step": 30, "train_loss": 1.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(10, 2.5), (30, 1.5)]


def test_tensorboard_sink_without_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    with pytest.raises(FastGPTError, match=r"needs the tensorboard package: `pip install tensorboard`"):
        TensorBoardSink(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
