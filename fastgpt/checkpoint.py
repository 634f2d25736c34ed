"""Checkpoints that survive crashes: written to a temporary file, synced, then renamed into place.

A rename within one directory is atomic, so a reader (or a resumed run) sees either the previous
checkpoint or the new one whole, never a half-written file, even if the process is killed mid-save.

A training run's directory holds ckpt.pt (always the newest checkpoint: what --resume reads),
best.pt (the one with the lowest validation loss) and the newest `keep_last` as ckpt-<step>.pt.
The extra names are hard links to the file written as ckpt.pt, so they cost no extra writes.

What makes a model in a checkpoint (its weights, its GPTConfig, its tokenizer) is written by
`model_entries` and read by `model_config_of` and `load_trained_model`, here and nowhere else. A run
that keeps an average of its weights (--weight-average) saves the average as the model, and the
weights it trains, which only --resume reads, as "trained_model".
"""

import json
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path

import torch

from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, GPTConfig, without_unused_rope_base
from fastgpt.run_files import CHECKPOINT_FILES, new_temporary_file
from fastgpt.tokenizers import tokenizer_from_state


class _WriteErrors:
    """A binary file that remembers the OSError its write() raised: torch.save replaces that error
    (a full disk, say) with one of its own that does not say what happened."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


def atomic_write(path, write):
    """Call write(file_object) on a temporary file next to `path`, then move it into place.

    If it fails, the temporary file is removed and whatever was at `path` before stays as it was; an
    OSError (a full disk, say) then names `path`."""
    path = Path(path)
    descriptor, temporary = new_temporary_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            recorder = _WriteErrors(handle)
            try:
                write(recorder)
            except Exception as error:
                if recorder.error is not None and recorder.error is not error:
                    raise recorder.error from error
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def atomic_write_text(path, text):
    """Write `text` (UTF-8) to `path` whole or not at all (atomic_write)."""
    atomic_write(path, lambda handle: handle.write(text.encode()))
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
        self.latest = self.out_dir / CHECKPOINT_FILES["latest"]
        self.best = self.out_dir / CHECKPOINT_FILES["best"]
        self.keep_last = keep_last

    def prepare(self, resume):
        """Make out_dir ready for a run, refusing one that cannot be written to, or, for a fresh run (not
        `resume`), one holding any checkpoint of an earlier run (the run would overwrite ckpt.pt and
        best.pt and prune ckpt-<step>.pt); remove what killed saves left behind."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise FastGPTError(f"cannot write to the output directory {self.out_dir} ({error.strerror}); "
                               "choose another --out-dir") from None
        earlier = [path.name for path in (self.latest, self.best, *self.numbered()) if path.exists()]
        if earlier and not resume:
            raise FastGPTError(f"{self.out_dir} holds an earlier run ({', '.join(earlier)}); continue it with "
                               "--resume, or start afresh in another --out-dir (or delete them)")
        remove_stale_temporaries(self.out_dir)

    def check_room(self, model):
        """Refuse to start a run whose checkpoints would not fit on the disk."""
        # The weights and AdamW's two moments, all fp32, plus room for the rest of the payload.
        needed = 3 * sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)
        free = shutil.disk_usage(self.out_dir).free
        if free < needed:
            raise FastGPTError(f"the output directory {self.out_dir} has {free / 1e6:.1f} MB free but a checkpoint "
                               f"needs about {needed / 1e6:.1f} MB; free some space or choose another --out-dir")

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


def holds_hugging_face_checkpoint(directory):
    """Whether `directory` has a Hugging Face config.json (a fastgpt run's names no model_type)."""
    try:
        return "model_type" in json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def load_checkpoint(path, mmap=False):
    """The payload saved at `path`, or a FastGPTError saying what is wrong with the file. `mmap`: map
    the tensors from the file, read only where used (for a caller that wants the settings alone)."""
    path = Path(path)
    if not path.is_file():
        if holds_hugging_face_checkpoint(path.parent):
            raise FastGPTError(f"{path.parent} holds a Hugging Face checkpoint, not a fastgpt run: sample from it "
                               f"with --init-from {path.parent}, or fine-tune it with `python -m fastgpt.train "
                               f"--init-from {path.parent}`")
        raise FastGPTError(f"no checkpoint at {path}; train one first with `python -m fastgpt.train`, "
                           "or point --out-dir at the directory that holds ckpt.pt")
    try:
        # Checkpoints hold only tensors and plain Python values, so the safe loader suffices.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for a damaged file
        others = sorted(other.name for other in path.parent.glob("*.pt") if other.name != path.name)
        beside = f", or copy one of {', '.join(others)} beside it in its place" if others else ""
        raise FastGPTError(f"the checkpoint {path} is damaged or not a fastgpt checkpoint ({type(error).__name__}); "
                           f"train again or restore it from a backup{beside}") from None
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise FastGPTError(f"{path} is not a fastgpt checkpoint (it has no model or model_config)")
    return payload


def model_entries(model_config, model_state, tokenizer):
    """The entries of a checkpoint that make a model: weights, model config and tokenizer."""
    return {"model": model_state, "model_config": model_config.to_dict(), "tokenizer": tokenizer.state_dict()}


# Keys an older checkpoint's model config may hold that are not model settings, ignored when loading:
# the backend is chosen at run time (fastgpt.ops.use_backend).
_RETIRED_MODEL_SETTINGS = ("backend",)


def model_config_of(payload):
    """The GPTConfig saved in a checkpoint's payload; a switch added since it was saved takes its
    default, which is what the model computed before the switch existed."""
    saved = without_unused_rope_base({name: value for name, value in payload["model_config"].items()
                                      if name not in _RETIRED_MODEL_SETTINGS})
    unknown = sorted(saved.keys() - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise FastGPTError(f"the checkpoint's model has settings this version of fastgpt does not know "
                           f"({', '.join(unknown)}); load it with the version that trained it")
    return GPTConfig(**saved)


def load_trained_model(out_dir, device, checkpoint="latest"):
    """The model (in evaluation mode) and tokenizer saved in out_dir (ckpt.pt, or best.pt with
    checkpoint="best"), on `device`."""
    if checkpoint not in CHECKPOINT_FILES:
        raise FastGPTError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)} (got {checkpoint!r})")
    payload = load_checkpoint(Path(out_dir) / CHECKPOINT_FILES[checkpoint])
    model = GPT(model_config_of(payload))
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), tokenizer_from_state(payload["tokenizer"])
