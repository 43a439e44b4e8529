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
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def slow_peer_entry(factor: float) -> tuple[str, ...]:
    """What ``LocalSwarm.start_peer(entry=...)`` runs instead of ``-m potluck.peer.launch``."""
    return (str(SCRIPT), str(factor))


class SlowedDown:
    """A peer's ``BatchStream`` that idles, before each batch, (factor - 1) x the time the batch's
    samples took on the shortest of the last 10 local steps (per sample: a peer sizes its batches to
    its share of a global step, ``hivemind_ext/tracker.py``)."""

    def __init__(self, stream, factor: float):
        self._stream, self._factor = stream, factor
        self.batch_size = stream.batch_size
        self._per_sample: list[float] = []
        self._last: tuple[float, int] | None = None

    def __iter__(self) -> SlowedDown:
        return self

    def __next__(self):
        return self.take(self.batch_size)

    def take(self, size: int):
        now = time.perf_counter()
        if self._last is not None:
            started, samples = self._last
            self._per_sample = [*self._per_sample[-9:], (now - started) / samples]
            time.sleep((self._factor - 1) * min(self._per_sample) * size)  # the slow machine's extra time
        batch = self._stream.take(size)
        self._last = (time.perf_counter(), max(1, min(size, self.batch_size)))
        return batch


def main(argv: list[str]) -> int:
    from potluck.peer import cli
    from potluck.peer.training.data import PeerDataStream

    factor, run_peer_args = float(argv[0]), argv[1:]
    original = PeerDataStream.batches

    def slow_batches(self, seed: int) -> SlowedDown:
        return SlowedDown(original(self, seed), factor)

    PeerDataStream.batches = slow_batches
    return cli.main(run_peer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
