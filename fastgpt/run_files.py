"""A training run's files: the checkpoints' names, new files with the permissions a user expects, and
reading metrics.jsonl and config.json safely while the run may still be writing.

The trainer appends one JSON object per line. A reader (compare, eval, the plot) can look at the file
between the moment a line's first bytes land and the moment its newline does: that last line is
then partial, and is left out until it is complete. Any other line that is not a JSON object means
the file is damaged, which is an error naming the line.
"""

import json
import os
import tempfile
from pathlib import Path

from fastgpt.errors import FastGPTError
from fastgpt.settings import setting

# A run's checkpoints: the newest and the one with the lowest validation loss (as eval's --checkpoint
# names them); fastgpt.checkpoint keeps older ones as ckpt-<step>.pt.
CHECKPOINT_FILES = {"latest": "ckpt.pt", "best": "best.pt"}


def checkpoint_setting():
    """The setting by which eval, sample and export choose which of a run's checkpoints to read."""
    return setting("latest", "which checkpoint: latest (ckpt.pt) or best (best.pt, lowest val loss)",
                   list(CHECKPOINT_FILES))


def new_temporary_file(directory, prefix, suffix):
    """A new file of a unique name in `directory`, as tempfile.mkstemp makes one (its descriptor and
    path), but with the permissions open() would give it.

    mkstemp makes its files readable by their owner only. The temporary files here are renamed into
    a run's checkpoints, token cache and plots, which others on a shared machine should be able to
    read wherever the user's umask lets them, as with every other file a program writes.
    """
    descriptor, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    umask = os.umask(0o022)  # the only way to read the umask is to set it
    os.umask(umask)
    os.fchmod(descriptor, 0o666 & ~umask)
    return descriptor, path


def read_metrics(path):
    """The records of a metrics.jsonl file, oldest first, without a partially written last line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FastGPTError(f"no metrics at {path}; is this the --out-dir of a training run?") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FastGPTError(f"cannot read {path} ({error}); check the file") from None
    lines = text.split("\n")
    # After the last newline comes either nothing or a line still being written.
    complete = lines[:-1]
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise FastGPTError(f"line {number} of {path} is not a JSON object with a step; the file is damaged "
                               "(delete that line, or the file, to read the rest)")
        records.append(record)
    return records


class RunSettings(dict):
    """A run's config.json: a setting it lacks is an error naming the file, not a KeyError."""

    def __init__(self, path, settings):
        super().__init__(settings)
        self.path = path

    def __missing__(self, name):
        raise FastGPTError(f"{self.path} has no {name!r} setting; it should hold the settings fastgpt.train wrote")


def read_run_config(out_dir):
    """The settings a run was trained with (its config.json, which the trainer writes at start-up)."""
    path = Path(out_dir) / "config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FastGPTError(f"no config.json in {out_dir}; point at a directory that fastgpt.train wrote "
                           "(its --out-dir)") from None
    except (OSError, ValueError) as error:
        raise FastGPTError(f"cannot read {path} ({error}); it should hold the settings fastgpt.train wrote") from None
    if not isinstance(settings, dict):
        raise FastGPTError(f"{path} is not a JSON object; it should hold the settings fastgpt.train wrote")
    return RunSettings(path, settings)
