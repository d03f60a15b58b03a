"""How a running fine-tune is asked to stop: a signal, or a stop file where no signal can be sent."""
from __future__ import annotations

import os
import signal

from .. import parentwatch

__all__ = ["StopRequest"]


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next iteration and returns.

    A stop file does the same where no signal can be sent (Windows, or through a launcher that forwards
    none, like Slicer's PythonSlicer): the loop stops once the file exists. So does the death of the program
    that started the run (segbook.parentwatch).
    """

    def __init__(self, stop_file=None):
        self.signum = 0
        self.stop_file = stop_file
        self._old = {}

    def requested(self) -> bool:
        return (self.signum != 0 or parentwatch.gone.is_set()
                or (self.stop_file is not None and os.path.exists(self.stop_file)))

    def reason(self) -> str:
        """What asked for the stop, for the log."""
        if self.signum:
            return f"signal {self.signum}"
        return "the end of the program that started the run" if parentwatch.gone.is_set() else str(self.stop_file)

    def __enter__(self):
        parentwatch.stop_on_death(True)
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a Slicer worker thread): no handlers
                pass
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        parentwatch.stop_on_death(False)
        for s, h in self._old.items():
            signal.signal(s, h)
