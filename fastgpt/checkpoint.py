"""Checkpoints that survive crashes: written to a temporary file, synced, then renamed into place.

A rename within one directory is atomic, so a reader (or a resumed run) sees either the previous
checkpoint or the new one whole, never a half-written file, even if the process is killed mid-save.

A training run's directory holds ckpt.pt (always the newest checkpoint: what --resume reads),
best.pt (the one with the lowest validation loss) and the newest `keep_last` as ckpt-<step>.pt.
The extra names are hard links to the file written as ckpt.pt, so they cost no extra writes.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from fastgpt.errors import FastGPTError


def atomic_write(path, write):
    """Call write(file_object) on a temporary file next to `path`, then move it into place."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # Sync the directory too, so that the rename itself is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(path, payload):
    atomic_write(path, lambda handle: torch.save(payload, handle))


def link_atomically(source, target):
    """Make `target` name the file `source` names: a hard link, or a copy where links are unsupported."""
    source, target = Path(source), Path(target)
    temporary = target.parent / f".{target.name}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        with open(source, "rb") as original:
            atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))
        return
    os.replace(temporary, target)


def remove_stale_temporaries(directory):
    """Delete the temporary files of saves that a killed process never finished (they can be large)."""
    for temporary in Path(directory).glob(".*.pt.*.tmp"):
        temporary.unlink(missing_ok=True)


class CheckpointFiles:
    """The checkpoints of one training run in out_dir: ckpt.pt, best.pt and ckpt-<step>.pt."""

    def __init__(self, out_dir, keep_last):
        self.out_dir = Path(out_dir)
        self.latest = self.out_dir / "ckpt.pt"
        self.best = self.out_dir / "best.pt"
        self.keep_last = keep_last

    def save(self, payload, step, is_best):
        save_checkpoint(self.latest, payload)
        if is_best:
            link_atomically(self.latest, self.best)
        if self.keep_last:
            link_atomically(self.latest, self.out_dir / f"ckpt-{step}.pt")
            for old in self.numbered()[:-self.keep_last]:
                old.unlink()

    def numbered(self):
        """The ckpt-<step>.pt files, oldest first."""
        steps = {}
        for path in self.out_dir.glob("ckpt-*.pt"):
            match = re.fullmatch(r"ckpt-(\d+)\.pt", path.name)
            if match:
                steps[int(match.group(1))] = path
        return [steps[step] for step in sorted(steps)]


def load_checkpoint(path):
    """The payload saved at `path`, or a FastGPTError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FastGPTError(f"no checkpoint at {path}; train one first with `python -m fastgpt.train`, "
                           "or point --out-dir at the directory that holds ckpt.pt")
    try:
        # Checkpoints hold only tensors and plain Python values, so the safe loader suffices.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise FastGPTError(f"the checkpoint {path} is damaged or not a fastgpt checkpoint ({type(error).__name__}); "
                           "train again or restore it from a backup") from None
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise FastGPTError(f"{path} is not a fastgpt checkpoint (it has no model or model_config)")
    return payload


# What load_trained_model's `checkpoint` names: the newest checkpoint or the one with the lowest val loss.
CHECKPOINT_FILES = {"latest": "ckpt.pt", "best": "best.pt"}


def load_trained_model(out_dir, device, backend="auto", checkpoint="latest"):
    """The model and tokenizer saved in out_dir (ckpt.pt, or best.pt with checkpoint="best"), ready
    for inference on `device`."""
    from fastgpt.model import GPT, GPTConfig  # imported here: the checkpoint format does not need them
    from fastgpt.tokenizers import tokenizer_from_state

    payload = load_checkpoint(Path(out_dir) / CHECKPOINT_FILES[checkpoint])
    model = GPT(GPTConfig(**{**payload["model_config"], "backend": backend}))
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), tokenizer_from_state(payload["tokenizer"])
