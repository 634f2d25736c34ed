"""The loss curves as pictures: one run's out_dir/loss.png (redrawn at each evaluation), and the
curves of several runs side by side (python -m fastgpt.compare)."""

import io

import matplotlib

matplotlib.use("Agg")  # draw to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fastgpt.checkpoint import atomic_write  # noqa: E402


def _points(records, key, x="step"):
    """The (x, key) pairs of the records that have `key`."""
    kept = [r for r in records if key in r]
    return [r[x] for r in kept], [r[key] for r in kept]


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    # Written atomically like the checkpoint, so a viewer never shows a half-written image.
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def plot_losses(history, path):
    """Plot train loss at every logged step and validation loss where it was measured; below it, bits
    per byte, when the records have them (val_bpb, train_bpb)."""
    with_bpb = any("val_bpb" in r for r in history)
    figure, panels = plt.subplots(2 if with_bpb else 1, 1, figsize=(7, 7 if with_bpb else 4.5), dpi=110,
                                  sharex=True, squeeze=False)
    axes = panels[0, 0]
    axes.plot(*_points(history, "train_loss"), label="train", linewidth=1)
    axes.plot(*_points(history, "val_loss"), "o-", label="validation")
    axes.set_ylabel("cross-entropy loss (nats per token)")
    if with_bpb:
        bpb = panels[1, 0]
        if any("train_bpb" in r for r in history):
            bpb.plot(*_points(history, "train_bpb"), "s--", label="train", linewidth=1)
        bpb.plot(*_points(history, "val_bpb"), "o-", label="validation")
        bpb.set_ylabel("bits per byte")
    for axes in panels[:, 0]:
        axes.grid(alpha=0.3)
        axes.legend()
    panels[-1, 0].set_xlabel("step")
    figure.tight_layout()
    _save(figure, path)


# The x axes of a comparison: a record's field, and its label.
COMPARISON_AXES = (("step", "step"), ("tokens", "tokens seen"), ("seconds", "training time (s)"))


def plot_comparison(runs, path):
    """Several runs' curves, one panel per x axis (step, tokens, seconds): validation loss as lines
    with markers, train loss as thin lines of the same colour; a second row with bits per byte when
    every run has them. `runs` maps a run's name to its records, each with step, tokens and seconds."""
    with_bpb = all(any("val_bpb" in r for r in records) for records in runs.values())
    rows = [("loss", "val_loss", "train_loss", "loss (nats per token)")]
    if with_bpb:
        rows.append(("bpb", "val_bpb", "train_bpb", "bits per byte"))
    figure, panels = plt.subplots(len(rows), len(COMPARISON_AXES), figsize=(15, 4.5 * len(rows)), dpi=100,
                                  squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (_, val_key, train_key, ylabel) in enumerate(rows):
        for column, (x, xlabel) in enumerate(COMPARISON_AXES):
            axes = panels[row, column]
            for index, (name, records) in enumerate(runs.items()):
                colour = colours[index % len(colours)]
                axes.plot(*_points(records, train_key, x), color=colour, linewidth=0.8, alpha=0.5)
                axes.plot(*_points(records, val_key, x), "o-", color=colour, markersize=3, label=name)
            axes.set_xlabel(xlabel)
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
    panels[0, 0].legend(title="validation (train: thin)")
    figure.tight_layout()
    _save(figure, path)
