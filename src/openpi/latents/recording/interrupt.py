"""Stopping a collection cleanly on SIGINT (Ctrl-C) or SIGTERM.

During the rollouts the first signal only asks to stop: the inference in flight finishes and its record is written,
then the run stops before the next inference (`StopOnSignal.check`), closing the output so that every queued step is
committed. The unfinished episode stays incomplete and a resumed run (``--resume``) re-runs it; finished episodes are
kept. A second signal, or one during setup, stops at once (what was written is still safe to resume from).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Self


class Interrupted(Exception):
    """The run stopped on a signal. ``exit_code`` follows the shell convention (128 + signal: 130 for SIGINT, 143
    for SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Within ``with StopOnSignal() as stop:``, SIGINT / SIGTERM raise `Interrupted`: at once, or, while
    `deferring` is True, at the next `check()` (a second signal raises at once).

    Signal handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.deferring = False
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None or not self.deferring:
            raise Interrupted(signum)
        self.requested = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current inference (send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    def check(self) -> None:
        """Raises `Interrupted` if a stop was requested."""
        if self.requested is not None:
            raise Interrupted(self.requested)
