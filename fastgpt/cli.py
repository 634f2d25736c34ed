"""How command-line entry points report mistakes: one line, a non-zero exit, no traceback."""

import argparse
import errno
import os
import re
import select
import sys

import torch

from fastgpt.errors import FastGPTError
from fastgpt.ops import BackendUnavailable
from fastgpt.startup import interrupted, restore_interrupts


def run_cli(command):
    """Run command(); turn user mistakes, running out of memory or disk space, and Ctrl-C into a
    one-line message and an exit status, and a reader that stops reading the output into a quiet one."""
    restore_interrupts()
    try:
        command()
    except (FastGPTError, BackendUnavailable) as error:
        print(f"fastgpt: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        print(f"fastgpt: error: out of memory ({allocation_detail(error)}); make the batch, the context "
              "(block_size) or the model smaller", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not reader_closed_stdout():
            raise
        # Whatever read the output has stopped (`| head`): end quietly, as other command-line programs
        # do. Python would complain again when it flushes stdout on the way out, so that goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" to write {error.filename}" if error.filename else ""
        print(f"fastgpt: error: no room left on the disk{where} ({error.strerror}); free some space, then run "
              "again (a training run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    return 0


def reader_closed_stdout():
    """Whether standard output is a pipe whose reading end has been closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor behind sys.stdout
        return False


def is_out_of_memory(error):
    """Whether `error` is a failed allocation: Python's, the CUDA allocator's (torch.OutOfMemoryError),
    or torch's CPU allocator's, a plain RuntimeError that says so."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error))


def allocation_detail(error):
    """How much could not be allocated, as the allocator said, without torch's source location."""
    cpu = re.search(r"you tried to allocate (\d+) bytes", str(error))
    if cpu:
        return f"tried to allocate {int(cpu.group(1)) / 2**30:.1f} GiB"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises FastGPTError (one error line) instead of printing usage and exiting."""

    def error(self, message):
        raise FastGPTError(f"{message} (see --help)")
