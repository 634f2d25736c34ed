"""Metrics as TensorBoard event files, for `--log tensorboard`: `tensorboard --logdir OUT/tensorboard`.

TensorBoard is optional: without it installed, making the sink is one error saying how to get it.
"""

from pathlib import Path

from fastgpt.errors import FastGPTError


class TensorBoardSink:
    """Writes every number of each metrics record as a scalar at the record's step, in out_dir/tensorboard.

    On --resume, pass the checkpoint's step as resumed_step: TensorBoard then hides the events an
    earlier run logged after it, which this run is about to log again, and keeps those of that step.
    """

    def __init__(self, out_dir, resumed_step=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FastGPTError("logging to TensorBoard needs the tensorboard package: `pip install tensorboard`, "
                               "or log without it") from None
        # SummaryWriter hides the events at purge_step and after it.
        purge_step = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, record):
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()  # visible in TensorBoard while the run goes on

    def close(self):
        self.writer.close()
