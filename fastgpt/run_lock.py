"""One training run per output directory.

Two trainers writing one out_dir would interleave their checkpoints and metrics. So a trainer holds
an exclusive `flock` on out_dir/.lock for the whole run and writes its PID and command line into the
file (one JSON line); a second trainer (or a --resume) that finds the lock taken stops at once, naming the holder.

The kernel releases a flock when the last file descriptor of its holder closes, which includes a
crash or SIGKILL, so a lock can never outlive its run and nothing ever needs cleaning up. (A child
forked without exec shares the descriptor and keeps the lock while it lives.) Readers of a run
(sample, eval, compare) never take the lock: the files they read are written atomically, or, for
metrics.jsonl, read by fastgpt.run_files.read_metrics, which leaves out a line still being written.
"""

import fcntl
import json
import os
import shlex
import sys
import time
from pathlib import Path

from fastgpt.errors import FastGPTError

LOCK_NAME = ".lock"
# How often a starting run tries again when the lock file it locked was removed meanwhile (a
# refused run taking away the folder it made); once is almost always enough.
LOCK_ATTEMPTS = 5


class RunLock:
    """The lock on one output directory: `with RunLock(out_dir): ...train...`."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._descriptor = None
        self._made_out_dir = False

    def acquire(self):
        """Take the lock, creating out_dir if needed; a FastGPTError naming the holder if it is taken."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise FastGPTError(f"the output directory {self.out_dir} is a file; choose another --out-dir")
        self._made_out_dir = not self.out_dir.exists()
        for _ in range(LOCK_ATTEMPTS):
            # A run refused at start may take its folder and lock file away (release) between our
            # making the folder and opening the file, or opening and locking it: then try again.
            descriptor = self._open_and_lock()
            if descriptor is not None:
                if self._is_at_path(descriptor):
                    break
                os.close(descriptor)
        else:
            raise FastGPTError(f"the output directory {self.out_dir} keeps being removed while this run starts; "
                               "choose another --out-dir")
        os.ftruncate(descriptor, 0)
        holder = {"pid": os.getpid(), "command": shlex.join(sys.orig_argv)}
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        self._descriptor = descriptor
        return self

    def _open_and_lock(self):
        """A descriptor of the lock file, created (with out_dir) where missing, and locked; None when
        out_dir was removed before the file could be opened."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise FastGPTError(f"cannot write to the output directory {self.out_dir} ({error.strerror}); "
                               "choose another --out-dir") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise FastGPTError(f"another training run is using {self.out_dir} ({holder}); wait for it to end "
                               "or stop it, or choose another --out-dir") from None
        return descriptor

    def _is_at_path(self, descriptor):
        """Whether the locked file is still the one at the lock's path."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(descriptor)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def release(self):
        """Let the directory go (closing the file releases the lock); safe to call twice. A directory
        this lock made and nothing else wrote to (a run refused at start) goes too, lock file and all:
        a run that opened the file meanwhile finds it gone once it holds the lock, and makes another."""
        if self._descriptor is not None:
            try:
                if self._made_out_dir and os.listdir(self.out_dir) == [LOCK_NAME]:
                    self.path.unlink()
                    self.out_dir.rmdir()
            except OSError:
                pass  # the directory changed meanwhile (another run's files): it stays
            os.ftruncate(self._descriptor, 0)  # the next reader of the file sees no stale holder
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def _read_holder(descriptor, wait_s=1.0):
    """'PID 123: python -m fastgpt.train ...' from a taken lock's file.

    The holder writes its line just after locking, so an empty file means it is starting: read again
    for a moment before giving up on the details.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(os.pread(descriptor, 1 << 16, 0))
            # A command's arguments may hold line breaks; the message stays one line.
            return f"PID {holder['pid']}: {holder['command']}".replace("\n", "\\n")
        except (ValueError, TypeError, KeyError):
            if time.monotonic() > deadline:
                return "a process that is just starting"
            time.sleep(0.05)
