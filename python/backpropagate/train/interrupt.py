"""Ctrl-C and SIGTERM stop a run at the next step boundary, after a checkpoint.

A first SIGINT or SIGTERM only asks the loop to stop: it finishes the step it is in,
writes a checkpoint, and the run ends with a coded error that says how to resume. A
second signal ends the process at once (the checkpoint being written, if any, is
atomic, so the previous one stays valid). Handlers are installed only in the main
thread, where Python delivers signals; elsewhere the default behaviour is kept.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from backpropagate.log import get_logger

log = get_logger("train")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns the first SIGINT / SIGTERM into a request the loop polls."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a signal asked the run to stop."""
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)",
            self.signal_name,
        )
