"""A duty that runs every few seconds in the background: publishing a report, collecting reports,
keeping DHT routes, averaging a span's adapter."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Periodic:
    """Calls ``tick()`` every ``interval`` seconds on a daemon thread until :meth:`stop`.

    A tick that raises is logged (at ``error_level``, naming the duty) and the next tick runs on
    schedule: a DHT hiccup or a locked database must not end a background duty for good. Ticks never
    overlap; one that takes longer than ``interval`` delays the next. If a duty's log shows its ticks
    failing every time, look at what the tick calls, not at this loop.
    """

    def __init__(
        self,
        tick: Callable[[], object],
        interval: float,
        name: str,
        *,
        immediately: bool = False,
        error_level: int = logging.WARNING,
        aligned_to: Callable[[], float] | None = None,
    ):
        self.tick, self.interval, self.name = tick, interval, name
        self.immediately = immediately
        """Run the first tick at start rather than one interval later."""
        self.aligned_to = aligned_to
        """A clock (seconds) shared with other processes: ticks then fall on its multiples of ``interval`` (the next
        one after a tick ends), so processes that started at different moments tick together."""
        self.error_level = error_level
        self.stopping = threading.Event()
        """Set by :meth:`stop`; a long tick may check it to finish early."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, grace: float = 5.0, *, wait: float | None = None) -> None:
        """Ask the loop to end and wait for a tick in progress, at most ``interval + grace`` seconds, or
        ``wait`` seconds if given (a tick still running then ends on its own, in a daemon thread)."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + grace if wait is None else wait)

    def _run(self) -> None:
        if self.immediately:
            self._tick_once()
        while not self.stopping.wait(self._until_next_tick()):
            self._tick_once()

    def _until_next_tick(self) -> float:
        if self.aligned_to is None:
            return self.interval
        return self.interval - self.aligned_to() % self.interval

    def _tick_once(self) -> None:
        try:
            self.tick()
        except Exception as e:  # the next tick may succeed; the duty goes on
            logger.log(self.error_level, f"{self.name}: {e!r}")
