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
        try:
            self._made_out_dir = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        os.ftruncate(descriptor, 0)
        holder = {"pid": os.getpid(), "command": shlex.join(sys.orig_argv)}
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self):
        """Let the directory go (closing the file releases the lock); safe to call twice. A directory
        this lock made and nothing else wrote to (a run refused at start) goes too."""
        if self._descriptor is not None:
            if self._made_out_dir and os.listdir(self.out_dir) == [LOCK_NAME]:
                try:  # while the lock is held, so that no other run can be using the file
                    self.path.unlink()
                    self.out_dir.rmdir()
                except OSError:
                    pass  # another run has just made its own lock there: the directory is its
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
