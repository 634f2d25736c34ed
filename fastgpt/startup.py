"""Ctrl-C while a command starts: one line and exit status 130, as once it runs, never a traceback.

`python -m fastgpt.train` (or any of fastgpt's commands) spends a second or two importing torch
before the command's own code can catch anything. A Ctrl-C in that time would print a traceback
through Python's import machinery. The package's `__init__` calls `quiet_interrupts_while_starting`
when a command is starting, and `fastgpt.cli.run_cli` calls `restore_interrupts` as the command
begins; from then on the command's own handling (which lets it save its work) takes over.
"""

import signal
import sys


def interrupted():
    """Say that Ctrl-C ended the command; returns the exit status to end with."""
    print("fastgpt: interrupted", file=sys.stderr)
    return 130  # 128 + SIGINT: what shells report for a command that Ctrl-C ended


def _interrupted_while_starting(signum, frame):
    raise SystemExit(interrupted())


def quiet_interrupts_while_starting():
    """Make Ctrl-C end the process quietly until `restore_interrupts`.

    Leaves a handler someone else set alone (an embedding program's, or SIG_IGN for a job a shell
    started in the background).
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def restore_interrupts():
    """Give Ctrl-C back to Python (KeyboardInterrupt), if `quiet_interrupts_while_starting` took it."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
