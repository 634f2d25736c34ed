"""The loss curves as a picture: out_dir/loss.png, redrawn at each evaluation."""

import io

import matplotlib

matplotlib.use("Agg")  # draw to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fastgpt.checkpoint import atomic_write  # noqa: E402


def plot_losses(history, path):
    """Plot train loss at every logged step and validation loss where it was measured."""
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    axes.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train", linewidth=1)
    evaluated = [r for r in history if "val_loss" in r]
    axes.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    # Written atomically like the checkpoint, so a viewer never shows a half-written image.
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
