"""Stopping a run cleanly: SIGINT and SIGTERM become a request to stop after the current step."""

import signal
import threading
from contextlib import contextmanager


class StopRequests:
    """Turns SIGINT and SIGTERM into a request to stop after the current step.

    The first signal only sets `signal`; the loop then saves a checkpoint and ends. The handlers are
    put back at once, so a second Ctrl-C interrupts immediately (the previous checkpoint stays whole).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _request(self, signum, frame):
        self.signal = signal.Signals(signum)
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextmanager
    def installed(self):
        """The handlers, for the duration of a with block."""
        # Python lets only the main thread set handlers; elsewhere (a notebook's worker thread) the
        # run simply keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()
