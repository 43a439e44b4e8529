"""How long averaging rounds take next to their deadline, and what to set when it is too tight.

hivemind's matchmaking and averaging deadlines are fixed numbers that users must guess (hivemind
#676): a deadline shorter than the all-reduce of the model over the peers' links makes every round
time out, and the swarm then trains on local gradients with nothing but a failure counter to show
for it. The run spec's defaults (1 s of matchmaking, 30 s per round) are measured against this
project's links in docs/reliability.md ("Deadlines"); this module makes a peer say when they do not
fit its model: before the first round, from the bytes a round moves at a slow home uplink, and
afterwards from the rounds it measured.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

logger = logging.getLogger(__name__)

SLOW_UPLINK_BYTES_PER_SECOND = 20e6 / 8
"""20 Mbit/s: the slow end of the home links the test bed emulates (docs/reliability.md)."""
HEADROOM = 3.0
"""A round should fit its deadline this many times over: all-reduce times vary with the slowest peer."""


def round_seconds_at(wire_bytes: int, group_size: int, bytes_per_second: float) -> float:
    """Transfer time of one butterfly all-reduce: each peer sends (g-1)/g of its tensors to be reduced,
    and receives as much of the result."""
    return 2 * wire_bytes * (group_size - 1) / group_size / bytes_per_second


def check_deadline_fits(wire_bytes: int, averaging_timeout: float, group_size: int = 3) -> str | None:
    """A warning when a round of ``wire_bytes`` per peer cannot fit ``averaging_timeout`` at a slow uplink."""
    needed = HEADROOM * round_seconds_at(wire_bytes, group_size, SLOW_UPLINK_BYTES_PER_SECOND)
    if needed <= averaging_timeout:
        return None
    return (
        f"an averaging round moves {wire_bytes / 2**20:.0f} MiB per peer: about {needed / HEADROOM:.0f} s "
        f"at 20 Mbit/s, beyond a third of averaging.averaging_timeout ({averaging_timeout:g} s); set "
        f"averaging.averaging_timeout to {needed:.0f} or more, or a smaller codec (averaging.compression)"
    )


class DeadlineWatch:
    """Keeps the durations of recent rounds that formed a group and warns, at most every
    ``warn_every`` seconds, when they use more than 1/HEADROOM of the deadline."""

    def __init__(self, deadline: float, window: int = 20, warn_every: float = 300.0):
        self.deadline = deadline
        self._recent: deque[float] = deque(maxlen=window)
        self._warn_every, self._warned_at = warn_every, -float("inf")

    def observe(self, seconds: float) -> str | None:
        self._recent.append(seconds)
        if len(self._recent) < 3:
            return None
        typical = statistics.median(self._recent)
        if typical * HEADROOM <= self.deadline or time.monotonic() - self._warned_at < self._warn_every:
            return None
        self._warned_at = time.monotonic()
        message = (
            f"averaging rounds take {typical:.1f} s (median of the last {len(self._recent)}) of their "
            f"{self.deadline:g} s deadline: set averaging.averaging_timeout to {typical * HEADROOM:.0f} or more "
            f"before slower rounds start failing"
        )
        logger.warning(message)
        return message
