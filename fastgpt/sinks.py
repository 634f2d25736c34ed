"""Where training's metrics go: each sink takes every metrics record as it is made.

A record is a dict: `step`, `train_loss` (the mean since the previous record), `lr`, `tokens`
(trained on so far, by all processes), `tokens_per_sec`, `elapsed_s`, and `val_loss`, `val_bpb` and
`train_bpb` (bits per byte) when the step was evaluated. A sink is any object with `log(record)` and
`close()`; a new destination is one more such class in the trainer's list.
"""

import json

from tqdm import tqdm

from fastgpt.checkpoint import atomic_write_text
from fastgpt.run_files import read_metrics


class MetricsFile:
    """metrics.jsonl: one JSON object per record.

    A resumed run first drops the records of steps after the one it resumes from (written after that
    checkpoint), since it is about to log those steps again; a fresh run starts an empty file.
    """

    def __init__(self, path, resumed_step=None):
        self.path = path
        self.history = []
        if resumed_step is not None and path.exists():
            self.history = [record for record in read_metrics(path) if record["step"] <= resumed_step]
        text = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write_text(path, text)

    def log(self, record):
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self):
        pass


class ProgressBar:
    """A tqdm bar over the steps, with the latest loss, learning rate and speed beside it."""

    def __init__(self, total, initial):
        self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)

    def log(self, record):
        self.bar.update(record["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.1e}",
                             tok_s=f"{record['tokens_per_sec']:,.0f}")

    def close(self):
        self.bar.close()


class LossPlot:
    """loss.png: the train and validation losses so far, redrawn whenever a validation loss arrives."""

    def __init__(self, path, history=()):
        self.path = path
        self.history = list(history)

    def log(self, record):
        self.history.append(record)
        if "val_loss" in record:
            # Imported here: matplotlib takes half a second, which `fastgpt.train --help` need not wait for.
            from fastgpt.plots import plot_losses

            plot_losses(self.history, self.path)

    def close(self):
        pass
