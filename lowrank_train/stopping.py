"""SIGTERM/SIGINT handling: finish the step, save a checkpoint, exit 0, so the run resumes."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits 0 so the run resumes."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then exiting", self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
