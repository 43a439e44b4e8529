"""``run-peer`` as a straggler: ``python bench/slow_peer.py FACTOR [run-peer flags...]``.

For bench/straggler.py and tests/test_straggler.py (``LocalSwarm.start_peer(entry=slow_peer_entry(5))``).
Before each local batch the peer idles (FACTOR - 1) x its local step's compute time, as a machine that
many times slower would: the shortest of its last 10 steps, so the time of an all-reduce or of a state
download is not multiplied too. Its published samples/s, which the others' trackers use to count its
in-flight batch, are therefore the slow machine's.

The slowdown is injected here, by wrapping ``PeerDataStream.batches`` before run-peer's own ``main``
runs, so that ``run-peer`` itself has no benchmark-only branch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def slow_peer_entry(factor: float) -> tuple[str, ...]:
    """What ``LocalSwarm.start_peer(entry=...)`` runs instead of ``-m potluck.peer.cli``."""
    return (str(SCRIPT), str(factor))


def slowed_down(batches: Iterator, factor: float) -> Iterator:
    """Yield ``batches``, idling (factor - 1) x the shortest of the last 10 local steps before each."""
    recent: list[float] = []
    last = None
    for batch in batches:
        now = time.perf_counter()
        if last is not None:
            recent = [*recent[-9:], now - last]
            time.sleep((factor - 1) * min(recent))  # the emulated slow machine's extra time
        last = time.perf_counter()
        yield batch


def main(argv: list[str]) -> int:
    from potluck.peer import cli
    from potluck.peer.training.data import PeerDataStream

    factor, run_peer_args = float(argv[0]), argv[1:]
    original = PeerDataStream.batches

    def slow_batches(self, seed: int) -> Iterator:
        return slowed_down(original(self, seed), factor)

    PeerDataStream.batches = slow_batches
    return cli.main(run_peer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
