"""The console progress line: global step, throughput, peers, loss and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressDisplay:
    """Prints one progress line every ``interval`` seconds (rewritten in place on a terminal)."""

    def __init__(self, max_steps: int, interval: float = 5.0, stream: TextIO = sys.stderr, prefix: str = ""):
        self.max_steps = max_steps
        self.interval = interval
        self.stream = stream
        self.prefix = prefix
        self._last_print = 0.0
        self._tty = stream.isatty()

    def update(
        self,
        global_step: int,
        loss: float,
        local_sps: float,
        swarm_sps: float,
        peers: int,
        eta_seconds: float,
        force: bool = False,
    ) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.interval:
            return
        self._last_print = now
        line = (
            f"{self.prefix}step {global_step}/{self.max_steps} | loss {loss:.4f} | "
            f"{local_sps:.0f} samples/s local, {swarm_sps:.0f} swarm | peers {peers} | ETA {format_duration(eta_seconds)}"
        )
        if self._tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
